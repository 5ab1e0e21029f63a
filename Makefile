# The two set-up commands of the README: `make demo` (main job) and `make test` (test suite).
# Both create .venv on first use from constraints.txt, the one exact, tested dependency set.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1

.PHONY: demo test test-slow test-all install

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/nvila-ft finetune

# the suite a developer runs before every change: everything but the slow tier (under 10 minutes on 2 cores)
test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

# the slow tier: multi-process launches (torchrun, the deepspeed launcher) and the example scripts end to end
test-slow: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m slow

# both tiers, as CI runs them (.ci/run)
test-all: test test-slow
