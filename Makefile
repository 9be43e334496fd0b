# Two commands: `make demo` and `make test`. Each does all set-up idempotently, then runs.
# Set-up steps leave stamp files in .venv/ so a second run skips them in seconds.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# pipefail: a failing pip still fails the target even though its warnings are filtered.
PY ?= python3.11
VENV := .venv
VPY := $(VENV)/bin/python
APT_PKGS := pkg-config libturbojpeg0-dev libopencv-dev dataset-fashion-mnist

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

clean-venv:
	rm -rf $(VENV)
