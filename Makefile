# Two commands: `make demo` and `make test`. Each does all set-up idempotently, then runs.
# Set-up steps leave stamp files in .venv/ so a second run skips them in seconds.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
VPY := $(VENV)/bin/python
APT_PKGS := pkg-config libturbojpeg0-dev libopencv-dev dataset-fashion-mnist
PIP_PINS := torch==2.14.1 torchvision==0.29.1 timm numba nvidia-dali-cuda130==2.4.0 'packaging<=26.3' \
            ffcv==1.0.2 pytest pytest-timeout pyyaml tqdm matplotlib scikit-image pillow

.PHONY: setup test demo clean-venv
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

$(VENV)/.deps-ok: $(VENV)/.apt-ok
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip wheel setuptools cython numpy
	$(VPY) -m pip install -q $(PIP_PINS)
	@touch $@

# Editable install; re-run only when the packaging metadata changes.
$(VENV)/.pkg-ok: $(VENV)/.deps-ok pyproject.toml
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

test: setup
	$(VPY) -m pytest -q tests

demo: setup
	$(VPY) -m sdmp_fast.demo

clean-venv:
	rm -rf $(VENV)
