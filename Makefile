# gpuportal: `make run` starts the portal, `make test` runs the suite.
# Both create .venv and install into it when needed; a second run is fast.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install run test lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@# jsonschema's optional IRI format check (rfc3987-syntax) builds a Lark parser on
	@# import: ~4 s of CPU in every process that imports Ray or jupyter_events (each Ray
	@# agent, every job, every server). Nothing here checks IRIs; without it Ray's
	@# agents start within Ray's own start-up windows on a small machine.
	$(BIN)/python -m pip uninstall --quiet --yes rfc3987-syntax lark
	@# An editable install skips data-files; a wheel install ships this enabling file itself.
	install -D -m 644 extensions/jupyter-config/jupyter_server_config.d/gpuportal.json \
		$(VENV)/etc/jupyter/jupyter_server_config.d/gpuportal.json
	@touch $(STAMP)

run: install
	$(BIN)/gpuportal up

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy hub provider spawners extensions

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf .gpuportal build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
