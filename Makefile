# Two commands do everything (see README.md):
#   make book   set up .venv if needed, execute every chapter (profile "book"), build _build/html
#   make test   same environment: strict book build at the "ci" profile, unit tests, nbval, HTML checks,
#               the built pages in headless Chromium with the network off (screenshots kept)
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
ASSETS := book/static/.vendored
TEST_BUILD := _build/test
# Numeric unit tests re-run by `make test` on torch's portable kernels (no SIMD) with one thread: a
# check that holds on every CPU type must hold there too (see CONTRIBUTING.md, "Portable checks").
PORTABLE_TESTS := tests/test_metrics.py tests/test_geometry.py tests/test_symbolic.py tests/test_data.py \
	tests/test_weights.py tests/test_models.py tests/test_train.py tests/test_gradients.py tests/test_values.py tests/test_models_values.py

# Offline by construction: no model hub, quiet progress bars, stable notebook output.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export PYDEVD_DISABLE_FILE_VALIDATION := 1
# glibc returns big buffers to the OS and re-faults them every training step; keep them: no mmap for
# large blocks, and no trimming of the heap's top when they are freed (a fresh 200 MB GEMM output
# costs twice the GEMM on the Xeon type when its pages are faulted in again; benchmarks/README.md).
export MALLOC_MMAP_MAX_ := 0
export MALLOC_TRIM_THRESHOLD_ := 68719476736

.PHONY: help setup browser book test unit notebooks mutation clean

help:
	@echo "make book   build the book into _build/html (profile book; first run installs .venv)"
	@echo "make test   run every test: strict book build (profile ci), pytest, nbval, HTML checks"
	@echo "make notebooks   re-execute every chapter in place (profile book) to refresh committed outputs"

$(STAMP): requirements.txt requirements-assets.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-assets.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# Headless Chromium for the browser tests: Debian's package, installed once where missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser tests"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# Test-only extra (SAELens and sparsify for the interop round trips, actionlint for the workflow),
# resolved together with the main pins.
$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-test.txt
	touch $(TEST_STAMP)

$(ASSETS): tools/vendor_assets.sh
	bash tools/vendor_assets.sh book/static
	touch $(ASSETS)

setup: $(STAMP) $(ASSETS)

book: setup
	WSAE_PROFILE=$${WSAE_PROFILE:-book} $(BIN)/jupyter-book build . -W -n --keep-going
	@echo "Open _build/html/index.html in a browser."

# Under make test, a missing test extra fails the interop and workflow tests instead of skipping them.
test: export WSAE_REQUIRE_TEST_EXTRA := 1
# The test build has its own output folder and execution cache, so it never mixes ci-sized results
# into the book's cache.
test: setup $(TEST_STAMP) browser
	rm -rf $(TEST_BUILD)/_build/html $(TEST_BUILD)/_build/screenshots
	WSAE_PROFILE=ci $(BIN)/jupyter-book build . --path-output $(TEST_BUILD) -W -n --keep-going
	WSAE_PROFILE=ci WSAE_REQUIRE_BROWSER=1 WSAE_BUILT_HTML=$(TEST_BUILD)/_build/html $(BIN)/python -m pytest tests book \
		--nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout=900 \
		-p no:cacheprovider -q
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WSAE_PROFILE=ci \
		$(BIN)/python -m pytest $(PORTABLE_TESTS) -p no:cacheprovider -q

unit: setup
	WSAE_PROFILE=ci $(BIN)/python -m pytest tests -q -p no:cacheprovider

# Mutation testing of the core modules with mutmut (configured in pyproject.toml), outside make test:
# hours for all eight modules on two cores. Resumable: a second run continues where the first stopped.
#   make mutation MUTATE="models train"    (module names in wsae_core; the score is printed per module)
MUTATE ?= weights metrics geometry models train symbolic lm interp
MUTATION_JOBS ?= 2
MUTATION_STAMP := $(VENV)/.installed-mutation
$(MUTATION_STAMP): $(STAMP) requirements-mutation.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-mutation.txt
	touch $(MUTATION_STAMP)

mutation: setup $(MUTATION_STAMP)
	for m in $(MUTATE); do \
	  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WSAE_PROFILE=ci WSAE_SKIP_SMOLLM2=1 \
	    $(BIN)/mutmut run --max-children $(MUTATION_JOBS) "wsae_core.$$m.*"; done
	$(BIN)/python tools/mutation_score.py $(MUTATE)

notebooks: setup
	WSAE_PROFILE=book $(BIN)/python tools/execute_notebooks.py book/*.ipynb

clean:
	rm -rf _build
