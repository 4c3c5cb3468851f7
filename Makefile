# make test   set up .venv if needed, then run the test suite
# make bench  set up .venv if needed, then run the main job (python -m fastcnn bench)
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch is enough here; on a GPU machine install a CUDA build first
# (or point VENV at an environment that has one) and this step keeps it.
TORCH_SPEC ?= torch==2.13.0
KERNEL_SOURCES := $(shell find kernels -type f) setup.py pyproject.toml

.PHONY: test bench setup build clean

setup: $(VENV)/.fastcnn-installed

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.fastcnn-installed: $(PY) $(KERNEL_SOURCES)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,plot,data]"
	touch $@

# Rebuild the C++/CUDA modules in place after editing kernels/.
build: setup
	$(PY) setup.py --quiet build_ext --inplace

test: setup
	$(PY) -m pytest tests -n auto

bench: setup
	$(PY) -m fastcnn bench

clean:
	rm -rf build fastcnn/*.so
