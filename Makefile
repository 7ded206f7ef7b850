# quotad — the two commands: `make demo` and `make test`.
.PHONY: demo test deps build release bench clean

deps:
	scripts/install-deps.sh

build: deps
	swift build

release: deps
	swift build -c release

demo: release
	scripts/demo.sh

test: deps
	scripts/test.sh

clean:
	rm -rf .build
