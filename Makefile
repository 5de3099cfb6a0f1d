# The two commands of the README: `make demo` and `make test`. Both set everything up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Host tools the pipeline and its tests run (see docs/install.md); PostgreSQL: the
# request service's database (`serve` alone starts a private cluster of it under state/; the
# tests start theirs, on a Unix socket or on loopback, with the same code);
# Chromium, a font and tesseract to look at the audit reports the way a person does (and
# chromium-driver, through which Selenium drives it over the web page: tests/integration/test_web.py); virt-v2v
# to read our OVAs the way VMware-exported appliances are read (tests/integration/test_big_ova.py).
# The test clouds: OpenSSH's server as a Eucalyptus node (and its client's ssh-keygen and
# ssh-keyscan, which the boot check uses too), the real Glance; mmdebstrap builds the real Debian
# samples. xfsprogs, btrfs-progs: the XFS and btrfs roots are checked and grown with their own
# tools; lvm2 only builds the tests' volume groups (guests' LVM metadata is read in Python);
# acl's setfacl plants ACLs for the tests to find. dosfstools and mtools check and read a UEFI
# source's EFI system partition (00-acquire) and build the samples' ones. sbsigntool's sbverify and
# openssl check the guest's Secure Boot signatures before any boot (guest/signatures.py). zstd unpacks
# a Eucalyptus node's copy, packed on the node (clouds/eucalyptus.py).
APT_PACKAGES := qemu-utils qemu-system-x86 grub-pc-bin grub-common e2fsprogs fdisk util-linux \
	busybox-static cpio kmod rsync dpkg binutils procps bubblewrap pigz zstd \
	postgresql chromium chromium-driver fonts-dejavu-core tesseract-ocr tesseract-ocr-eng virt-v2v \
	openssh-server openssh-client glance-api mmdebstrap xfsprogs btrfs-progs lvm2 acl dosfstools mtools \
	sbsigntool openssl ovmf grub-efi-amd64-bin shim-signed grub-efi-amd64-signed

.PHONY: setup apt venv demo lab test test-fast lint bench docs docs-example clean campaign

setup: apt venv

# Installs only what is missing, so a second `make test` does not touch apt. The package lists
# are also what the sample builder's `apt-get download` reads. policy-rc.d keeps the servers the
# tests start themselves on loopback (sshd, glance-api, PostgreSQL) from being started by apt
# on every address.
apt:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	lists=$$(ls /var/lib/apt/lists/ 2>/dev/null | grep -c _Packages || true); \
	if [ -n "$$missing" ] || [ "$$lists" = 0 ]; then \
		echo "installing:" $$missing; \
		policy=; if [ ! -e /usr/sbin/policy-rc.d ]; then policy=1; \
			printf '#!/bin/sh\nexit 101\n' | $(SUDO) tee /usr/sbin/policy-rc.d >/dev/null; \
			$(SUDO) chmod 755 /usr/sbin/policy-rc.d; fi; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
		status=$$?; [ -z "$$policy" ] || $(SUDO) rm -f /usr/sbin/policy-rc.d; exit $$status; \
	fi

venv: $(VENV)/.done

$(VENV)/.done: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	# The kernel papermill starts for every stage notebook (kernelspec "imaging").
	$(PY) -m ipykernel install --sys-prefix --name imaging --display-name "Python (imaging)" >/dev/null
	touch $@

# The original system's main job on the built-in Xen sample (CentOS-5-like): cleaned, migrated
# for OpenStack/KVM, a qcow2 that must boot to the sample's marker; then the run's audit page
# (its path on stderr, so the last line on stdout stays the export's JSON result).
DEMO_RUN := demo-$(shell date -u +%Y%m%dT%H%M%SZ)
demo: setup
	$(PY) -m imaging export sample:xen --name demo --format qcow2 --target openstack --run $(DEMO_RUN)
	@$(PY) -m imaging report $(DEMO_RUN) >&2

# JupyterLab on the project, notebooks/explore.ipynb open, the "Python (imaging)" kernel ready.
# Loopback only: a notebook server runs code as whoever started it (here root). Its URL, with
# its token, is printed below.
LAB_PORT ?= 8888
lab: setup
	$(VENV)/bin/jupyter lab --ip=127.0.0.1 --port=$(LAB_PORT) --no-browser --allow-root \
		--ServerApp.root_dir=$(CURDIR) notebooks/explore.ipynb

# Both cores: a QEMU boot under TCG uses one, and most of the suite is boots.
TEST_JOBS ?= 2
test: setup
	$(PY) -m pytest -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder --durations=25

# The campaigns: faults, load and inputs nobody chose, each bounded in count and time, on loopback,
# one a line, each printing its figures (their short forms are in `make test`). Root, loop
# devices, QEMU. A boot (50-verify, QEMU under TCG) is most of an export's time, so only what
# tests a boot boots. Full disks: the runs directory and --out on small loop-mounted ext4s that
# run out in each stage in turn, for qcow2, ova and vmdk (33 cases, three boots). Services away:
# fifty requests of the sample on two workers, their exports ending at 40-export (--no-boot: the
# hosts' export pipeline without 50-verify; what is tested is the service's survival). Crash
# consistency: BIOS-only exports of sample:kvm killed 5 times each at random moments, each kill
# resumed and checked: 40 runs, and more until 200 SIGKILLs have hit a run (a run that ends
# before its next kill moment is not killed again), one in four booted (the kills in 50-verify),
# the others ending at 40-export, 4 at a time (a case waits much: kernels starting, kill
# moments); then 6 kills of the service's
# worker and 6 of its API, on requests that do not boot. Load: 5,000 requests made by
# 50 clients, then 20 approved at once on two workers, unbooted. Fuzzed images: mutated metadata
# of the kvm sample as raw, qcow2 and VMDK, each exported to qcow2 through the CLI, four at a time
# (a case waits on its tools and kernels half its time), one in a hundred with its boot; a failed
# case joins tests/data/fuzz-corpus/.
campaign: setup
	$(PY) -m tests.campaigns.crash --runs 40 --kills 5 --min-kills 200 --seed 29 --service 6 --boot-share 0.25 --jobs 4
	$(PY) -m tests.campaigns.full_disks
	$(PY) -m tests.campaigns.services_away --count 50 --no-boot
	$(PY) -m tests.campaigns.load --clients 50 --requests 5000 --approved 20 --no-boot
	$(PY) -m tests.campaigns.fuzz_images --cases 1000 --seed 1 --jobs 4 --boot-share 0.01

test-fast: setup
	$(PY) -m pytest -m "not integration"

lint: setup
	$(PY) -m ruff check imaging tests bench docs
	$(PY) -m ruff format --check imaging tests bench docs
	$(PY) -m mypy

# The reference client of bench/clouds.py's EBS direct row, `aws ebs get-snapshot-block`: awscli
# pins docutils below what Sphinx needs, so it gets a venv of its own.
AWSCLI := $(VENV)-awscli
$(AWSCLI)/.done: requirements-awscli.txt
	test -x $(AWSCLI)/bin/python || $(PYTHON) -m venv $(AWSCLI)
	$(AWSCLI)/bin/pip install -q -r requirements-awscli.txt
	touch $@

# BENCH="node_copy clouds": those benchmarks only (bench/run.py's names).
bench: setup $(AWSCLI)/.done
	IMAGING_BENCH_AWS=$(AWSCLI)/bin/aws $(PY) bench/run.py $(BENCH)

# The manual (docs/, Sphinx + MyST): docs/_build/html/index.html. Warnings are errors: a broken
# link, or an option or clean operation without its entry, fails the build (tests/unit/test_docs.py
# builds it the same way).
docs: setup
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	@echo "docs/_build/html/index.html" >&2

# The audit record's example in the manual (docs/audit-example/): one export of the kvm sample,
# booted, recorded as its run wrote it. Root, loop devices, one QEMU boot (about a minute).
docs-example: setup
	$(PY) docs/record_example.py

clean:
	rm -rf runs out .pytest_cache .mypy_cache .ruff_cache docs/_build docs/_generated
