# hvext: one entry point for setting up a Debian 12 host, the demo and the tests.
# Every step is idempotent and cached; a rerun on a set-up machine takes seconds.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup packages libvirtd swap venv completion image qemu demo demo-ha test unit vm bench man clean-vms

setup: packages libvirtd swap venv completion image qemu

packages:
	setup/host.sh packages

libvirtd: packages
	setup/host.sh libvirtd

swap:
	setup/host.sh swap
	setup/host.sh sysctls

# The venv is rebuilt when pyproject.toml changes.
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml | packages
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

# Shell completion of commands, options and domain names: /etc/bash_completion.d/hvext.
completion: venv
	HVEXT_VENV=$(VENV) setup/host.sh completion

image: venv
	$(PY) -m hvext.image build

qemu: packages
	@if [ -x qemu-patches/build.sh ] && [ -f qemu-patches/series ]; then qemu-patches/build.sh; \
	else echo "qemu: no patch series yet, using Debian's QEMU"; fi

demo: setup
	./demo.sh

demo-ha: setup
	./demo-ha.sh

test: setup
	$(PY) -m pytest -v -ra $(PYTEST_ARGS) tests

unit: venv
	$(PY) -m pytest -q -ra $(PYTEST_ARGS) tests/unit

vm: setup
	$(PY) -m pytest -v -ra $(PYTEST_ARGS) tests/vm

# Every benchmark runs to its table even when an earlier one failed; the target
# fails at the end, naming the ones that did. Each also draws a PNG into PLOT_DIR
# (bench/plot.py draws them; it is not a benchmark).
BENCHES ?= $(sort $(filter-out bench/plot.py,$(wildcard bench/*.py)))
BENCH_ARGS ?= --quick
PLOT_DIR ?= bench/out
bench: setup
	@failed=""; for b in $(BENCHES); do echo "== $$b $(BENCH_ARGS)"; \
	  $(PY) $$b $(BENCH_ARGS) --plot-dir "$(PLOT_DIR)" || failed="$$failed $$b"; echo; done; \
	echo "make bench: plots in $(PLOT_DIR)/"; \
	if [ -n "$$failed" ]; then echo "make bench: failed:$$failed" >&2; exit 1; fi

# The manual page, generated from the CLI's parser: man -l docs/hvext.1
man: venv
	COLUMNS=80 $(PY) -m hvext.cli.manpage > docs/hvext.1.tmp || { rm -f docs/hvext.1.tmp; exit 1; }
	mv docs/hvext.1.tmp docs/hvext.1

# Remove domains left by interrupted test runs (names start with hvext-test-).
clean-vms: venv
	$(PY) -m tests.vm.cleanup
