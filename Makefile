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

bench: release
	.build/release/quota-bench compare --chart docs/bench.svg > docs/bench-results.md
	.build/release/quota-bench scale --quiet >> docs/bench-results.md
	cat docs/bench-results.md

clean:
	rm -rf .build
