# Every target sets up what it needs: `make run` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test test-pure compile maybe-compile lint system-packages docs fuzz bench bench-peer bench-tls bench-smoke bench-10k bench-grpc bench-registry bench-affinity locust chaos protos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,load]'
	$(PY) -m pip check
	touch $(STAMP)

run: $(STAMP) maybe-compile
	$(PY) -m router serve $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check router backends bench chaos tests
	$(VENV)/bin/mypy

test: $(STAMP) system-packages lint maybe-compile
	$(PY) -m pytest -q
	ROUTER_PURE=1 $(PY) -m pytest -q $(DATA_PLANE_TESTS)

# The whole suite on the pure-Python sources (the compiled modules set aside by ROUTER_PURE=1).
test-pure: $(STAMP) system-packages lint
	ROUTER_PURE=1 $(PY) -m pytest -q

# The tests of the compiled modules' code: `make test` runs them on the pure build too.
DATA_PLANE_TESTS := tests/test_wire.py tests/test_keyed_frames.py tests/test_tcp_session.py \
	tests/test_read_budget.py tests/test_pool.py tests/test_upstream.py tests/test_dispatch_unit.py \
	tests/test_balance.py tests/test_clock.py tests/test_errors.py tests/test_h2_codec.py \
	tests/test_h2_connection.py tests/test_grpc_relay.py tests/test_router_integration.py \
	tests/test_limits.py tests/test_build.py tests/fuzz

# mypyc compiles the modules setup.py lists (COMPILED) into extension modules beside their
# sources, when one of them (or setup.py) is newer than its extension module or it has none;
# the router refuses a stale one (router/core/build.py). EXT_SUFFIX: this Python's ABI tag.
COMPILED_SOURCES = $(shell grep -o '"router/[a-z0-9_/]*\.py"' setup.py | tr -d '"')
EXT_SUFFIX = $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')

compile: $(STAMP)
	@stale=""; for src in $(COMPILED_SOURCES); do \
		ext="$${src%.py}$(EXT_SUFFIX)"; \
		{ [ "$$ext" -nt "$$src" ] && [ "$$ext" -nt setup.py ]; } || stale="$$stale $$src"; \
	done; \
	if [ -n "$$stale" ]; then \
		echo "mypyc: compiling $(words $(COMPILED_SOURCES)) modules (stale or missing:$$stale)"; \
		mkdir -p build; \
		ROUTER_COMPILE=1 $(PY) setup.py --quiet build_ext --inplace --force \
			>build/mypyc.log 2>&1 || { tail -n 30 build/mypyc.log; exit 1; }; \
	fi

# Compile when a C compiler and this Python's headers are there (system-packages installs gcc
# and python3-dev on Debian); else one line, and everything runs on the pure-Python sources.
maybe-compile: $(STAMP) system-packages
	@if command -v $${CC:-cc} >/dev/null 2>&1 && $(PY) -c 'import os, sysconfig, sys; \
		sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; \
	then $(MAKE) --no-print-directory compile; \
	else echo "no C compiler or Python headers: running the pure-Python build"; fi

# System tools the tests run as real processes: etcd (the shared registry) and, for the
# proxy comparisons, haproxy, nginx and nghttp; gcc and the Python headers for `make compile`.
# Installed (Debian's apt-get, as root or with sudo) only when one of them is missing;
# /usr/sbin is searched too, where Debian puts daemons.
SYSTEM_TOOLS    := etcd haproxy nginx nghttp gcc
SYSTEM_PACKAGES := etcd-server haproxy nginx nghttp2-client gcc python3-dev

system-packages:
	@missing=""; \
	for tool in $(SYSTEM_TOOLS); do \
		PATH="$$PATH:/usr/sbin:/sbin" command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "missing:$$missing; installing $(SYSTEM_PACKAGES)"; \
		sudo=""; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
		$$sudo apt-get update && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y $(SYSTEM_PACKAGES); \
	fi

# The fuzz targets of tests/fuzz (frame decoder, TCP session, KServe reader, config loader), each
# for FUZZ_SECONDS instead of its smoke budget in `make test`: hypothesis runs again and again
# (ROUTER_FUZZ_EXAMPLES examples each, fresh seeds) until the time is spent. A failure prints
# its @reproduce_failure blob; the timeout leaves room for one run past the budget and shrinking.
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	ROUTER_FUZZ=fuzz ROUTER_FUZZ_SECONDS=$(FUZZ_SECONDS) $(PY) -m pytest -q tests/fuzz \
		--timeout=$$(( $(FUZZ_SECONDS) * 2 + 600 ))

# docs/configuration.md from the config schema (a test fails when the file is stale).
docs: $(STAMP)
	$(PY) -m router config-reference --output docs/configuration.md

bench: $(STAMP) maybe-compile
	$(PY) -m bench.run --update-docs
	$(PY) -m bench.run --mode per-request --name per-request --update-docs
	$(PY) -m bench.registry_scale --update-docs

# The C++ inference-router, the connection-per-request peer of `make bench`, from a clone in
# bench/peers/inference-router (docs/benchmarks.md): its tests off, so its build fetches nothing.
PEER_SRC ?= bench/peers/inference-router
bench-peer:
	cmake -S $(PEER_SRC) -B $(PEER_SRC)/build -DIR_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=Release
	cmake --build $(PEER_SRC)/build --target inference-router load_bench

# 1,000 registered backends (two backends.echo_many processes) against 2: throughput, router CPU
# for 1,000 heartbeats/s, registration-to-first-request and lease-expiry-to-removal; writes
# bench/results/registry.json and the registry table of docs/benchmarks.md.
bench-registry: $(STAMP) maybe-compile
	$(PY) -m bench.registry_scale --update-docs

# TLS on the router's listener against the plain router, 50 clients; the TLS table of
# docs/benchmarks.md and bench/results/tls.json.
bench-tls: $(STAMP) maybe-compile
	$(PY) -m bench.run --clients 50 --rounds 3 --name tls --update-docs

bench-smoke: $(STAMP) maybe-compile
	$(PY) -m bench.regress

# 10,000 concurrent connections x 50 requests, twice (fresh router each time), plus the idle
# RSS probe; writes bench/results/tenk.json and the 10k table of docs/benchmarks.md.
bench-10k: $(STAMP) maybe-compile
	$(PY) -m bench.tenk --repeat 2 --update-docs

# gRPC: unary ModelInfer through the router vs directly to the backend, 1 and 64 callers;
# writes bench/results/grpc.json and the gRPC table of docs/benchmarks.md.
bench-grpc: $(STAMP) maybe-compile
	$(PY) -m bench.grpc_bench --update-docs

# Model-affinity routing against the seed experiment (its two runs, time-scaled by 0.1), then
# the 16 x 4 Zipf scenario; writes bench/results/affinity.json and the affinity table of
# docs/benchmarks.md.
bench-affinity: $(STAMP) maybe-compile
	$(PY) -m bench.affinity --zipf --update-docs

# Locust, headless and bounded, against a router it starts; CSV stats in bench/results/locust_*.
locust: $(STAMP) maybe-compile
	$(PY) -m bench.locust_run --users 50 --spawn-rate 50 --run-time 30 --csv bench/results/locust

# Full-size chaos scenarios; each prints its summary and exits 1 on a broken invariant.
chaos: $(STAMP) maybe-compile
	$(PY) -m chaos.drain --clients 50 --requests 100 --seed 7 --grpc-clients 10
	$(PY) -m chaos.drain --clients 50 --requests 100 --seed 7 --processes 2
	$(PY) -m chaos.backend_crash
	$(PY) -m chaos.hung_backend
	$(PY) -m chaos.rolling_restart
	$(PY) -m chaos.hostile_clients
	$(PY) -m chaos.frame_flood

# Regenerate router/protocol/proto/*_pb2*.py from the .proto files there (grpcio-tools, the
# protos extra), then check that the result imports with the pinned protobuf runtime.
protos: $(STAMP)
	$(PY) -m pip install --quiet -e '.[protos]'
	$(PY) -m backends.proto.generate
	$(PY) -c 'import router.protocol.proto.grpc_predict_v2_pb2_grpc, router.protocol.proto.model_stream_infer_pb2, router.protocol.proto.triton_extensions_pb2, router.protocol.proto.registry_pb2_grpc, router.protocol.proto.anyserve_worker_management_pb2_grpc'
	$(PY) -m pip check

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build
	find router -name '*.so' -delete
