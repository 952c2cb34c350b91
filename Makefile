# Set-up and entry points. `make demo` and `make test` each create .venv and install everything.
# torch is installed first and explicitly: a bare `torch` requirement would pull a multi-GB CUDA
# build on a machine without torch. Override for a GPU machine, e.g.
#   make demo TORCH_SPEC="torch==2.9.1 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test test-all bench fixtures clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	# the project and its extras under a constraint that holds torch at the installed version: a
	# package that wants another torch fails to resolve instead of replacing it
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-pin.txt
	$(BIN)/python -m pip install -q -c $(VENV)/torch-pin.txt -e '.[test,tensorboard]'
	touch $@

demo: setup
	$(BIN)/ldcache demo

# Lint first (ruff, the rules in pyproject.toml), then the default suite.
test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m ''

# Regenerate the golden mmdetection fixtures (needs the oracle venv, see tools/make_mmdet_fixtures.py).
fixtures:
	bash ../shared/tools/mmdet_oracle/make_venv.sh /tmp/mmdet_venv
	/tmp/mmdet_venv/bin/python tools/make_mmdet_fixtures.py --out tests/fixtures

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# Every benchmark at CPU size (on an idle machine): benchmarks/results/*.json and SUMMARY.md.
bench: setup
	$(BIN)/python -m benchmarks.run_all $(if $(TEACHER),--teacher $(TEACHER),)
