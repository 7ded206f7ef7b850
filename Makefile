# quotad — the two commands: `make demo` and `make test`.
.PHONY: demo demo-regions test deps build release bench chaos fuzz clean

deps:
	scripts/install-deps.sh

build: deps
	swift build

release: deps
	swift build -c release

demo: release
	scripts/demo.sh

# Two regions, one of them a Redis Cluster with replicas, quota moved between them mid-sale.
demo-regions: release
	scripts/demo-regions.sh

test: deps
	scripts/test.sh

bench: release
	.build/release/quota-bench compare --chart docs/bench.svg > docs/bench-results.md
	.build/release/quota-bench scale --quiet >> docs/bench-results.md
	cat docs/bench-results.md

# The long chaos pass (release build): RUNS runs of DURATION seconds each; failing runs are kept in chaos-failures/.
RUNS ?= 200
DURATION ?= 15
chaos: release
	. scripts/kafka-env.sh && .build/release/quota-bench chaos --runs $(RUNS) --duration $(DURATION) $(if $(SEED),--seed $(SEED),)

# libFuzzer on the RESP decoder and the command parser (Fuzz/README.md): FUZZ_SECONDS (default 120) or
# FUZZ_RUNS executions; a crash is saved in Fuzz/crashes/ and fails the target.
fuzz:
	scripts/fuzz.sh

clean:
	rm -rf .build
