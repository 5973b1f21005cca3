# The two commands a new user needs: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test bench venv clean browser

venv: $(STAMP)

# torch is pinned and installed first: on CPU machines this picks the local CPU wheel
# instead of pulling gigabytes of CUDA packages; pyproject only asks torch>=2.5.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m nanoseek.demo

test: $(STAMP) browser
	$(BIN)/python -m pytest tests

# Debian's chromium for the chat-page test (tests/test_ui.py); skipped when already installed.
browser:
	@test -x /usr/bin/chromium || (apt-get update -q && apt-get install -y -q chromium) \
		|| echo "could not install chromium: tests/test_ui.py will be skipped" 

bench: $(STAMP)
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) runs build *.egg-info
