# The README's two commands: `make demo` runs the main job, `make test` runs the tests.
# Both create/reuse .venv and install cvops with the pins of SPEC §8 by themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cvops-installed
export FIFTYONE_DO_NOT_TRACK ?= true
export WANDB_SILENT ?= true

.PHONY: demo test install check-sync stages nbtest pytest readme bench device-wheels docs clean

$(STAMP): setup.py settings.ini
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --progress-bar off -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

## main job: synthetic data → pipeline → served model answering requests
demo: install
	$(BIN)/cvops demo

## tests: library in sync with notebooks, notebook tests, integration tests
test: install
	@$(MAKE) --no-print-directory check-sync nbtest pytest

# nbdev_export must not change cvops/ (the library is generated from nbs/); a hand edit is kept, and reported.
check-sync:
	@snap=$$(mktemp -d); cp -a cvops "$$snap/cvops"; \
	if ! $(BIN)/nbdev_export; then rm -rf cvops; cp -a "$$snap/cvops" cvops; rm -rf "$$snap"; \
	  echo "ERROR: nbdev_export failed: cannot check cvops/ against the notebooks." >&2; exit 1; fi; \
	if ! diff -r -q -x __pycache__ "$$snap/cvops" cvops; then \
	  rm -rf cvops; cp -a "$$snap/cvops" cvops; rm -rf "$$snap"; \
	  echo "ERROR: cvops/ differs from what the notebooks export. cvops/*.py is generated: do not edit it by hand." >&2; \
	  echo "Make the change in nbs/*.ipynb, then run '$(BIN)/nbdev_export' and commit notebooks and cvops/ together." >&2; \
	  exit 1; fi; rm -rf "$$snap"
	@snap=$$(mktemp -d); cp -a nbs "$$snap/nbs"; $(BIN)/nbdev_clean; \
	if ! diff -r -q "$$snap/nbs" nbs; then rm -rf "$$snap"; \
	  echo "ERROR: the notebooks above were not clean; nbdev_clean has now cleaned them: review and commit." >&2; exit 1; fi; rm -rf "$$snap"
	@tmp=$$(mktemp -d); $(BIN)/jupyter nbconvert --log-level ERROR --to markdown nbs/index.ipynb --output-dir "$$tmp" --output README >/dev/null; \
	if ! diff -q "$$tmp/README.md" README.md >/dev/null; then rm -rf "$$tmp"; \
	  echo "ERROR: README.md differs from nbs/index.ipynb. Edit the notebook, then run 'make readme'." >&2; exit 1; fi; rm -rf "$$tmp"
	@if ! diff -r -q -x .notest nbs/stages cvops/stages; then \
	  echo "ERROR: cvops/stages/ (the stage notebooks shipped in the package) differs from nbs/stages/. Run 'make stages' and commit both." >&2; exit 1; fi
	@echo "check-sync: notebooks clean; cvops/, cvops/stages/ and README.md match them"

# the default stage notebooks ship inside the package (cvops/stages/): copies of nbs/stages/, checked by check-sync
stages:
	rm -f cvops/stages/*.ipynb; mkdir -p cvops/stages; cp nbs/stages/*.ipynb cvops/stages/

nbtest:
	$(BIN)/nbdev_test --n_workers 2 --timing

# One pytest process per test file, one file at a time (CVOPS_TEST_JOBS=2: two at a time): tests/run_files.py
pytest:
	$(BIN)/python tests/run_files.py

readme: install
	$(BIN)/jupyter nbconvert --log-level ERROR --to markdown nbs/index.ipynb --output-dir . --output README

## docs site from the notebooks, into _docs/ (cvops docs --serve to look at it)
docs: install
	$(BIN)/cvops docs

bench: install
	$(BIN)/cvops bench

# the lent GPU machine has Python 3.12 and no pydantic: its wheels, carried there by bench/device_train.sh's run
device-wheels: install
	$(BIN)/python -m pip download --quiet --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --dest .device-wheels pydantic

clean:
	rm -rf .cvops _docs site build *.egg-info
