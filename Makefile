# ray-inspect: `make demo` and `make test` work on a fresh machine (they create .venv themselves).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO   ?= demo-output
# The CPU build of torch is pinned and installed first, so nothing pulls a CUDA build.
TORCH  := torch==2.13.0

.PHONY: install demo test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

demo: install
	$(PY) -m ray_inspect.demo --out $(DEMO)

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
