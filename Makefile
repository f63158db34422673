# make install: Debian packages and .venv; make run: the node locally; make test: the whole suite;
# make lint: ruff and mypy, which need the venv alone (no Debian packages), so CI runs them first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
DEBIAN_PACKAGES := mariadb-server mariadb-client redis-server redis-sentinel
# The appliance's parts, run for real by the tests: nginx, supervisord, Prometheus, openssl.
DEBIAN_PACKAGES += nginx supervisor prometheus openssl curl
# The image's tests: Debian's packer validates the template, qemu-img makes the OVA's VMDK.
DEBIAN_PACKAGES += packer qemu-utils
# The boot test: mmdebstrap builds a Debian root filesystem, systemd-nspawn boots it with systemd as PID 1.
DEBIAN_PACKAGES += mmdebstrap systemd-container
# The fault table (make chaos, and its short run in make test): one worker's clock stepped by libfaketime.
DEBIAN_PACKAGES += faketime
# The Galera tests (tests/scale/test_galera.py): a 3-node galera-4 cluster with rsync state transfer, behind HAProxy.
DEBIAN_PACKAGES += galera-4 rsync haproxy
# The load generator of make bench (wrk; bench.run's c=1 latency and bench.stack's TLS throughput).
BENCH_PACKAGES := wrk
# Debian's own python3 has no venv module until python3-venv is installed: the venv's one Debian package.
VENV_PACKAGES := $(shell python3 -c 'import ensurepip' 2>/dev/null || echo python3-venv)

# Installs those of the Debian packages given that are missing (nothing to do, no apt: the usual case).
define apt_install
missing=$$(for p in $(1); do \
    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
if [ -n "$$missing" ]; then \
    echo "installing Debian packages:" $$missing; \
    sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
    $$sudo apt-get update -qq && \
    DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing; \
fi
endef

.PHONY: install debian-packages run test test-chaos test-appliance lint chaos bench bench-storage bench-tunnel image lock clean

install: debian-packages $(VENV)/.installed

debian-packages:
	@$(call apt_install,$(DEBIAN_PACKAGES))

# The venv alone, all `make lint` needs; reinstalled whenever what it depends on changes.
$(VENV)/.installed: setup.cfg constraints.txt
	@$(call apt_install,$(VENV_PACKAGES))
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,lint,bench]'
	touch $@

run: install
	$(PY) -m appliance.local

# Two workers, one test file each at a time: the suite mostly waits on real servers starting and streams pacing.
# The two suites below are too long for make test's 25 minutes; .ci/run runs them after it. --durations: the slowest
# tests, in every CI log.
SEPARATE_SUITES := tests/test_chaos.py tests/test_appliance_boot.py
test: install
	$(PY) -m pytest -n 2 --dist loadfile --durations=25 $(addprefix --ignore=,$(SEPARATE_SUITES))

# The short fault table (each fault class once, under load, about 8 minutes; tests/chaos). Needs root (tmpfs mounts).
test-chaos: install
	$(PY) -m pytest tests/test_chaos.py

# The boot test: provisions a cached Debian root filesystem with appliance/provision.sh and boots it with
# systemd-nspawn, about 4 minutes the first time, under 2 after; needs root. See systemd/README.md.
test-appliance: install
	$(PY) -m pytest tests/test_appliance_boot.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check scaigrid appliance migrations tests bench
	$(VENV)/bin/mypy

# Mock vs floor proxy vs one pinned http process (bench.run, about 7 minutes), then the whole appliance as make run
# starts it, through nginx and TLS (bench.stack, about 3 minutes): about 10 minutes in all. Each rewrites its own block
# of bench/RESULTS.md and runs alone as well: $(PY) -m bench.run, $(PY) -m bench.stack.
bench: install
	@$(call apt_install,$(BENCH_PACKAGES))
	$(PY) -m bench.run
	$(PY) -m bench.stack

# The fault table under load (tests/chaos, docs/reliability.md), about 12 minutes; writes var/chaos/results.jsonl
# and var/chaos/results.md. Its short run is make test-chaos. Needs root (tmpfs mounts).
chaos: install
	$(PY) -m tests.chaos.run

# A 256 MiB object through bunker_proxy vs straight to S3 (moto), about a minute; rewrites its block of RESULTS.md.
bench-storage: install
	$(PY) -m bench.storage

# A request tunnelled down the hybrid link vs the same request made to the appliance (about 3 minutes).
bench-tunnel: install
	$(PY) -m bench.tunnel

# The VM image: qcow2, vmdk and ova in build/image/ (packer/README.md). Needs network to cloud.debian.org and PyPI;
# qemu and xorriso (the cloud-init seed ISO) only matter here, so make install leaves them out.
# Overrides: make image PACKER_VARS='-var accelerator=tcg -var disk_size_gb=80'
image: install
	@command -v qemu-system-x86_64 >/dev/null && command -v xorriso >/dev/null || { \
	    sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	    $$sudo apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends qemu-system-x86 xorriso; }
	rm -rf build/dist build/lib
	$(PY) -m pip wheel --quiet --no-deps --wheel-dir build/dist .
	PACKER_CACHE_DIR=build/packer_cache packer build -force -var wheel=$$(ls build/dist/scaigrid-*.whl) \
	    -var output_dir=build/image $(PACKER_VARS) packer/

# Refreshes the pinned versions after a change of setup.cfg's dependencies.
lock:
	rm -rf .venv-lock && python3 -m venv .venv-lock
	.venv-lock/bin/pip install --quiet -e '.[test,lint,bench]'
	.venv-lock/bin/pip freeze --exclude-editable | grep -v "^pkg_resources" > constraints.txt
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) var
