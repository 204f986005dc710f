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

# synth -> prepare -> train (about two minutes on 2 cores) -> calibrate -> scan -> report
RI := $(VENV)/bin/ray-inspect
demo: install
	$(RI) synth $(DEMO)/data --texture plain
	$(RI) prepare $(DEMO)/data/plain $(DEMO)/patches.zarr --patches 3000
	$(RI) train $(DEMO)/patches.zarr $(DEMO)/model --epochs 10 --batch-size 64
	$(RI) calibrate $(DEMO)/model $(DEMO)/data/plain --min-area 50
	$(RI) scan $(DEMO)/model $(DEMO)/data/plain $(DEMO)/scan
	$(RI) report $(DEMO)/scan

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
