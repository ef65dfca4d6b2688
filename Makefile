# `make test` is the README's test command and what CI runs (.ci/run): install from nothing, lint, type-check, test.
PY ?= python3

.PHONY: install lint test demo

install:
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0 -e '.[dev]'

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy smalto bench

test: install lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

demo:
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0 -e .
	smalto train
