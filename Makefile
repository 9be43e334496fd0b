# Two commands: `make demo` and `make test`. Each does all set-up idempotently, then runs.
# Set-up steps leave stamp files in .venv/ so a second run skips them in seconds.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# pipefail: a failing pip still fails the target even though its warnings are filtered.
PY ?= python3.11
VENV := .venv
VPY := $(VENV)/bin/python
APT_PKGS := pkg-config libturbojpeg0-dev libopencv-dev dataset-fashion-mnist

.PHONY: setup test demo test-min gpu-prebuilt clean-venv
setup: $(VENV)/.apt-ok $(VENV)/.deps-ok $(VENV)/.pkg-ok

$(VENV)/.apt-ok:
	@mkdir -p $(VENV)
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi
	@touch $@

$(VENV)/.deps-ok: $(VENV)/.apt-ok requirements.txt
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip wheel setuptools cython numpy 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	$(VPY) -m pip install -q -r requirements.txt 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	@touch $@

# Editable install; re-run only when the packaging metadata changes.
$(VENV)/.pkg-ok: $(VENV)/.deps-ok pyproject.toml setup.py
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	@touch $@

test: setup
	$(VPY) -m pytest -q tests

demo: setup
	$(VPY) -m sdmp_fast.demo

# The oldest release the package supports (pyproject: torch>=2.11), which the GPU machines run: the same suite on
# torch 2.11.0 + torchvision 0.26.0 and Python 3.12 where it is installed, in a venv of its own. Not part of
# `make test`: PyPI's torch 2.11 is a CUDA build (~3 GB download once). No FFCV there (as on the GPU machines).
MIN_VENV := .venv-min
# the first Python 3.12 that runs (a pyenv shim may exist without one behind it), else $(PY)
MIN_PY ?= $(firstword $(foreach p,python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12),\
	$(shell $(p) -c 'import sys' >/dev/null 2>&1 && echo $(p))) $(PY))
# requirements.txt with the oldest torch / torchvision and without FFCV, plus what `make setup` adds to .venv
MIN_PINS := torch==2.11.0 torchvision==0.26.0 setuptools wheel

$(MIN_VENV)/.deps-ok: $(VENV)/.apt-ok requirements.txt
	@test -x $(MIN_VENV)/bin/python || $(MIN_PY) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install -q --upgrade pip 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	grep -v -E '^(torch|torchvision|ffcv)==' requirements.txt > $(MIN_VENV)/requirements-min.txt
	$(MIN_VENV)/bin/python -m pip install -q $(MIN_PINS) -r $(MIN_VENV)/requirements-min.txt 2>&1 | \
	  { grep -v 'is ignored: it is neither' || true; }
	SDMP_KERNELS_AOT=0 $(MIN_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | \
	  { grep -v 'is ignored: it is neither' || true; }
	@touch $@

test-min: $(MIN_VENV)/.deps-ok
	$(MIN_VENV)/bin/python -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__)"
	$(MIN_VENV)/bin/python -m pytest -q tests

# The kernels compiled here, ahead of time, for the GPU machines (Python 3.12, torch 2.11, sm_90): carried to a
# device `run` call, the scripts there load them instead of spending ~35 s of device time on the JIT build. Used
# only while their tag matches the kernel sources and the torch / CUDA / Python there (else the JIT build runs).
GPU_PREBUILT_DIR := build/gpu-prebuilt
gpu-prebuilt: $(MIN_VENV)/.deps-ok
	@$(MIN_VENV)/bin/python -c "import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else \
	  'gpu-prebuilt: $(MIN_VENV) runs Python %d.%d; the GPU machines run 3.12 (install it, then rm -r $(MIN_VENV))' % sys.version_info[:2])"
	rm -rf $(GPU_PREBUILT_DIR) kernels/_C.cpython-*.so
	SDMP_KERNELS_AOT=1 SDMP_KERNELS_ARCHS=90 $(MIN_VENV)/bin/python -m pip wheel -q --no-deps --no-build-isolation \
	  -w $(GPU_PREBUILT_DIR) . 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	cd $(GPU_PREBUILT_DIR) && $(MIN_VENV:%=../../%)/bin/python -m zipfile -e *.whl unpacked
	cp $(GPU_PREBUILT_DIR)/unpacked/sdmp_fast/kernels/_C.cpython-*.so kernels/
	strip --strip-debug kernels/_C.cpython-*.so
	# what a device call carries (beside a ~48 MiB DALI part, under the 64 MiB limit): ~3 MB compressed
	xz -T2 -c kernels/_C.cpython-*.so > $(GPU_PREBUILT_DIR)/_C.so.xz
	@ls -l kernels/_C.cpython-*.so $(GPU_PREBUILT_DIR)/_C.so.xz

clean-venv:
	rm -rf $(VENV) $(MIN_VENV)
