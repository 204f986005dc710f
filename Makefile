# ray-inspect: `make demo` and `make test` work on a fresh machine (they create .venv themselves).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO   ?= demo-output
# torch is installed first (the CPU build, so nothing pulls a CUDA one), then the package; both are
# pinned by constraints.txt alone, exactly as cluster/Dockerfile installs them.

.PHONY: install demo lint test test-fast bench clean prometheus-tools

install: $(VENV)/.installed

# Debian's Prometheus, Pushgateway and promtool for the monitoring tests; skipped when installed.
# Tests start their own on 127.0.0.1, so the packaged services are not left running.
prometheus-tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v prometheus-pushgateway >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo -n ); \
	  $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends \
	    prometheus prometheus-pushgateway && \
	  { systemctl disable --now prometheus prometheus-pushgateway >/dev/null 2>&1 || true; }; }

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch
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

# ruff: pycodestyle, pyflakes, isort, bugbear, simplify, complexity and argument limits (pyproject.toml).
lint: install
	$(VENV)/bin/ruff check .

test: lint prometheus-tools
	$(PY) -m pytest -q

# Unit tests only: no Ray, no S3 server, no Prometheus (a minute or two).
test-fast: install
	$(PY) -m pytest -q tests/unit

# Speed and memory benchmarks (minutes each); docs/benchmarks.md records their figures.
bench: install
	$(PY) benchmarks/scan_speed.py
	$(PY) benchmarks/train_speed.py
	$(PY) benchmarks/metrics_overhead.py
	$(PY) benchmarks/large_image.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
