# gpuportal: `make run` starts the portal, `make test` runs the suite.
# Both create .venv and install into it when needed; a second run is fast.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install run test lint format clean mutate

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
	$(BIN)/mypy hub provider spawners extensions dashboards

# Mutation testing of the money modules ([tool.cosmic-ray] in pyproject.toml; see
# docs/testing.md). cosmic-ray rewrites each module on disk, one mutant at a time, so
# this runs in a copy of the tree (tracked and untracked, not ignored, files) whose
# gpuportal package is put first on PYTHONPATH; your checkout is never edited.
# MUTATE_MODULES="hub/billing/quotas.py hub/billing/reservation_billing.py" narrows the
# run. The report, with the diff of every surviving mutant, is .mutate/report.txt.
MUTATE := .mutate
MUTATE_MODULES ?=

mutate: install
	rm -rf $(MUTATE)/tree && mkdir -p $(MUTATE)/tree/.shim/gpuportal
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t $(MUTATE)/tree
	for pkg in hub provider spawners extensions notebooks dashboards; do \
		ln -s ../../$$pkg $(MUTATE)/tree/.shim/gpuportal/$$pkg; done
	$(BIN)/python -c 'import sys, tomllib, toml; \
		cfg = tomllib.load(open("pyproject.toml", "rb"))["tool"]["cosmic-ray"]; \
		cfg["module-path"] = sys.argv[1].split() or cfg["module-path"]; \
		print(toml.dumps({"cosmic-ray": cfg}))' "$(MUTATE_MODULES)" > $(MUTATE)/tree/cosmic-ray.toml
	cd $(MUTATE)/tree && export PATH="$(CURDIR)/$(BIN):$$PATH" PYTHONPATH="$(CURDIR)/$(MUTATE)/tree/.shim" && \
		cosmic-ray init cosmic-ray.toml session.sqlite && \
		cr-filter-operators session.sqlite cosmic-ray.toml && \
		cr-filter-pragma session.sqlite && \
		cosmic-ray --verbosity ERROR baseline cosmic-ray.toml && \
		cosmic-ray exec cosmic-ray.toml session.sqlite
	$(BIN)/cr-report --show-diff --surviving-only $(MUTATE)/tree/session.sqlite | tee $(MUTATE)/report.txt

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf .gpuportal .mutate build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
