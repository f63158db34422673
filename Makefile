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
# The container image and compose (make container, tests/scale): podman from Debian with runc (this machine's hybrid
# cgroups v1/v2, which crun refuses) and catatonit, docker-compose 1.29 (honours service_completed_successfully
# through podman's Docker API; podman-compose does not), dnsname (containers find each other by service name).
CONTAINER_PACKAGES := podman runc catatonit docker-compose golang-github-containernetworking-plugin-dnsname
DEBIAN_PACKAGES += $(CONTAINER_PACKAGES)
# The fault table (make chaos, and its short run make test-chaos): one worker's clock stepped by libfaketime.
DEBIAN_PACKAGES += faketime
# tests/test_kubernetes_manifests.py renders deploy/kubernetes with kubectl (v1.32, kustomize built in): not a Debian
# package, it comes with the machine image (deploy/kubernetes/README.md); kubernetes-validate is in setup.cfg's test.
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

.PHONY: install debian-packages container-setup container run test test-chaos test-appliance test-scale test-image lint chaos bench bench-storage bench-tunnel image lock clean

install: debian-packages container-setup $(VENV)/.installed

debian-packages:
	@$(call apt_install,$(DEBIAN_PACKAGES))

# Podman as it runs on these machines (containers.conf.d is read after /usr/share/containers/containers.conf):
# runc, as crun refuses hybrid cgroups; default ulimits below this host's hard limits (nofile 20000, nproc), which
# podman's defaults exceed so that runc fails with "error setting rlimits"; catatonit for --init.
PODMAN_CONF := /etc/containers/containers.conf.d/scaigrid.conf
container-setup: debian-packages
	@test -f $(PODMAN_CONF) || { \
	    sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	    printf '%s\n' '# Written by make container-setup (ScaiGrid Makefile): podman as it runs on these hosts.' \
	        '[containers]' 'default_ulimits = ["nofile=10240:10240", "nproc=4096:4096"]' \
	        'init_path = "/usr/bin/catatonit"' '[engine]' 'runtime = "runc"' \
	        | $$sudo install -D -m 0644 /dev/stdin $(PODMAN_CONF); }

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
# The three suites below are too long for make test's 25 minutes; .ci/run runs them after it. --durations: the slowest
# tests, in every CI log.
SEPARATE_SUITES := tests/test_chaos.py tests/test_appliance_boot.py tests/scale tests/test_image.py
test: install
	$(PY) -m pytest -n 2 --dist loadfile --durations=25 $(addprefix --ignore=,$(SEPARATE_SUITES))

# The short fault table (each fault class once, under load, about 8 minutes; tests/chaos). Needs root (tmpfs mounts).
test-chaos: install
	$(PY) -m pytest tests/test_chaos.py

# Beyond one machine (tests/scale, docs/scaling.md): the container image, compose with a rolling upgrade, podman kube
# play of the Kubernetes manifests, Galera and Sentinel failovers; needs root. The images are cached in podman's store
# (a fresh machine builds its Debian base and services images first, about 12 minutes).
test-scale: install
	$(PY) -m pytest --durations=10 tests/scale

# The boot test: provisions a cached Debian root filesystem with appliance/provision.sh and boots it with
# systemd-nspawn, about 4 minutes the first time, under 2 after; needs root. See systemd/README.md.
test-appliance: install
	$(PY) -m pytest tests/test_appliance_boot.py

# The VM image built and booted (tests/test_image.py, packer/README.md): make image BASE=local with software emulation,
# then two appliances from it under qemu (HTTPS, the OpenAI SDK, status over SSH, upgrade and rollback, poweroff), about
# 30 minutes; the base disk is cached (a fresh machine makes it first, about 4 minutes). Needs root (loop devices).
test-image: install
	@$(call apt_install,$(IMAGE_PACKAGES) socat openssh-client)
	$(PY) -m pytest --durations=10 tests/test_image.py

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

# The VM image: qcow2, vmdk and ova in IMAGE_DIR (packer/README.md), built on Debian's cloud image, or with BASE=local
# on a Debian 12 disk made here from Debian packages (packer/scripts/local-base.sh, as root; LOCAL_BASE is made once,
# delete it to make it again) where cloud.debian.org cannot be reached. The build VM installs from Debian's mirror and
# PyPI. Overrides: make image BASE=local PACKER_VARS='-var accelerator=tcg -var disk_size_gb=80'
IMAGE_DIR ?= build/image
LOCAL_BASE ?= build/base/debian-12-local-amd64.qcow2
IMAGE_PACKAGES := qemu-system-x86 xorriso fdisk extlinux syslinux-common
image: install
	@$(call apt_install,$(IMAGE_PACKAGES))
	@case "$(BASE)" in cloud|local|"") ;; *) echo "make image: BASE must be cloud or local, not $(BASE)" >&2; exit 2;; esac
	rm -rf build/dist build/lib
	$(PY) -m pip wheel --quiet --no-deps --wheel-dir build/dist .
	if [ "$(BASE)" = local ] && [ ! -f $(LOCAL_BASE) ]; then packer/scripts/local-base.sh $(LOCAL_BASE); fi
	PACKER_CACHE_DIR=build/packer_cache packer build -force -var base=$(or $(BASE),cloud) -var local_base=$(LOCAL_BASE) \
	    -var wheel=$$(ls build/dist/scaigrid-*.whl) -var output_dir=$(IMAGE_DIR) $(PACKER_VARS) packer/

# The container image (Containerfile) as localhost/scaigrid:latest: wheels built on the host (constraints.txt's pins),
# so the build itself needs no network. The Containerfile's BASE is the public Python slim image for Debian 12; with no
# registry reachable (as on these machines), BASE left empty (or local, as for make image) builds one from Debian
# packages instead (mmdebstrap | podman import, cached: tests/support/containers.py's base_image()). Where one is:
# make container BASE=docker.io/...
BASE ?=
container: install
	rm -rf build/container/wheels
	$(PY) -m pip wheel --quiet -c constraints.txt --wheel-dir build/container/wheels '.[container]'
	base="$(BASE)"; [ -n "$$base" ] && [ "$$base" != local ] || base=$$($(PY) -c 'from tests.support.containers import base_image; print(base_image())'); \
	podman build --format docker --build-arg BASE=$$base --tag localhost/scaigrid:latest .
	podman image inspect --format '{{.Size}} bytes' localhost/scaigrid:latest

# Refreshes the pinned versions after a change of setup.cfg's dependencies.
lock:
	rm -rf .venv-lock && python3 -m venv .venv-lock
	.venv-lock/bin/pip install --quiet -e '.[test,lint,bench,container]'
	.venv-lock/bin/pip freeze --exclude-editable | grep -v "^pkg_resources" > constraints.txt
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) var
