# gpuportal: `make run` starts the portal, `make test` runs the suite.
# Both create .venv and install into it when needed; a second run is fast.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install run test lint format clean mutate labextension labextension-test

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
	@# The same for the JupyterLab front end (a wheel ships the bundle under
	@# share/jupyter/labextensions): link the prebuilt bundle there, as
	@# `jupyter labextension develop` does, so `make labextension` takes effect at once.
	mkdir -p $(VENV)/share/jupyter/labextensions/@gpuportal
	rm -rf $(LABEXT_DEST) && ln -s $(CURDIR)/extensions/labextension $(LABEXT_DEST)
	@touch $(STAMP)

# The JupyterLab front end (docs/extension.md). Its prebuilt bundle is committed in
# extensions/labextension, so `make run` and `make test` need no Node.js; rebuilding it
# from the TypeScript in extensions/lab does (Node.js 20 and npm). The build records a
# hash of the sources, which a test of `make test` compares (tests/extension/test_bundle.py).
LAB         := extensions/lab
LABEXT_DEST := $(VENV)/share/jupyter/labextensions/@gpuportal/jupyterlab
LAB_DEPS    := $(LAB)/node_modules/.installed-stamp

$(LAB_DEPS): $(LAB)/package-lock.json
	@command -v npm >/dev/null || { echo "Building the JupyterLab extension needs Node.js 20+ and npm."; exit 2; }
	cd $(LAB) && npm ci --no-audit --no-fund
	@touch $@

labextension: install $(LAB_DEPS)
	cd $(LAB) && rm -rf lib tsconfig.tsbuildinfo && npx tsc
	@# The builder of the installed JupyterLab's own version (its staging folder pins
	@# the shared packages), not whatever the npm registry has newest.
	cd $(LAB) && node node_modules/@jupyterlab/builder/lib/build-labextension.js \
		--core-path "$$($(CURDIR)/$(BIN)/python -c 'import jupyterlab, pathlib; print(pathlib.Path(jupyterlab.__file__).parent / "staging")')" .
	$(BIN)/python -m gpuportal.extensions.bundle record

labextension-test: $(LAB_DEPS)
	cd $(LAB) && npx jest

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
