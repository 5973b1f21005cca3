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

# Each prints its figures and the command that measures them (results: docs/benchmarks.md).
bench: $(STAMP)
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/decode.py
	$(BIN)/python benchmarks/serve_load.py
	@if [ -d runs/demo/sft/model ]; then $(BIN)/python benchmarks/grpo.py --ckpt runs/demo/sft/model; \
	else echo "benchmarks/grpo.py compares against TRL on the demo's SFT checkpoint: run make demo first"; fi
	@if [ -d runs/demo/grpo/model ]; then $(BIN)/python benchmarks/distill.py --teacher runs/demo/grpo; \
	else echo "benchmarks/distill.py compares against TRL on the demo's GRPO checkpoint: run make demo first"; fi

clean:
	rm -rf $(VENV) runs build *.egg-info
