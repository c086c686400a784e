# The two commands of the README: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE := offline
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test lint bench

$(VENV)/.installed: requirements-lock.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# Plain pip with the machine's config: torch==2.13.0 resolves to the CPU wheel on disk.
	$(VENV)/bin/pip install -q -r requirements-lock.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) cli.py fit --config configs/cappo.yaml

lint: venv
	$(VENV)/bin/ruff check cappo_pl cli.py tests bench

# Two workers, each whole test file on one (its module fixtures are shared): most of the suite is subprocess runs
# that spend their time importing on one core, so two at a time fill the machine's two cores.
test: venv lint
	$(PY) -m pytest -q -n 2 --dist loadfile tests

bench: venv
	$(PY) bench/step.py
