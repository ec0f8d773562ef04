# Every target sets up what it needs: `make run` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench bench-smoke chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,load]'
	$(PY) -m pip check
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m router serve $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check router backends bench chaos tests
	$(VENV)/bin/mypy

test: $(STAMP) lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench.run --update-readme

bench-smoke: $(STAMP)
	$(PY) -m bench.regress

# Full-size chaos scenarios; each prints its summary and exits 1 on a broken invariant.
chaos: $(STAMP)
	$(PY) -m chaos.drain --clients 50 --requests 100 --seed 7
	$(PY) -m chaos.backend_crash
	$(PY) -m chaos.hung_backend
	$(PY) -m chaos.rolling_restart
	$(PY) -m chaos.hostile_clients

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
