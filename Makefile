# make install: Debian packages and .venv; make run: the node locally; make test: the whole suite.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
DEBIAN_PACKAGES := mariadb-server mariadb-client redis-server redis-sentinel
# Debian's own python3 has no venv module until python3-venv is installed.
DEBIAN_PACKAGES += $(shell python3 -c 'import ensurepip' 2>/dev/null || echo python3-venv)

.PHONY: install run test lint bench bench-storage lock clean

install: $(VENV)/.installed

# Reinstall whenever what the install depends on changes.
$(VENV)/.installed: setup.cfg constraints.txt
	@missing=$$(for p in $(DEBIAN_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:" $$missing; \
	    sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	    $$sudo apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,lint,bench]'
	touch $@

run: install
	$(PY) -m appliance.local

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check scaigrid appliance migrations tests bench
	$(VENV)/bin/mypy

# Mock vs floor proxy vs one pinned http process (about 5 minutes); rewrites bench/RESULTS.md.
bench: install
	$(PY) -m bench.run

# A 256 MiB object through bunker_proxy vs straight to S3 (moto), about a minute; rewrites its block of RESULTS.md.
bench-storage: install
	$(PY) -m bench.storage

# Refreshes the pinned versions after a change of setup.cfg's dependencies.
lock:
	rm -rf .venv-lock && python3 -m venv .venv-lock
	.venv-lock/bin/pip install --quiet -e '.[test,lint,bench]'
	.venv-lock/bin/pip freeze --exclude-editable | grep -v "^pkg_resources" > constraints.txt
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) var
