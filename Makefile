# containerd-kuasar
#
#   make demo    install what is needed, build, run a pod of every handler
#   make test    install what is needed, unit, end-to-end, conformance and kubelet tests
#
# Builds are cached machine-wide under $(CACHE) (default /var/cache/containerd-kuasar,
# outside the clone), so a new clone on the same machine starts warm.

SHELL := /bin/bash
.DEFAULT_GOAL := build

ROOT        := $(CURDIR)
OUT         := $(ROOT)/_output
BIN         := $(OUT)/bin
STOCK_BIN   := $(OUT)/stock/bin
CACHE       ?= /var/cache/containerd-kuasar
export GOCACHE    ?= $(CACHE)/go-build
export GOMODCACHE ?= $(CACHE)/go-mod
export GOFLAGS    ?= -mod=mod
export GONOSUMDB  := sigs.k8s.io/cri-tools,k8s.io
export PATH       := $(BIN):/usr/local/go/bin:$(PATH)

PREFIX  ?= /usr/local
DESTDIR ?=

MODULE             := github.com/kuasar-io/containerd-kuasar
VERSION            ?= $(shell git describe --tags --match 'v*' --dirty 2>/dev/null || echo v0.1.0-dev)
REVISION           ?= $(shell git rev-parse HEAD 2>/dev/null)
CONTAINERD_VERSION := $(shell go list -m -f '{{.Version}}' github.com/containerd/containerd/v2 2>/dev/null)
BUILDTAGS          := no_btrfs
LDFLAGS := -s -w \
	-X $(MODULE)/cmd/internal/version.Version=$(VERSION) \
	-X $(MODULE)/cmd/internal/version.Revision=$(REVISION) \
	-X github.com/containerd/containerd/v2/version.Version=$(CONTAINERD_VERSION)
GOBUILD := go build -trimpath -tags "$(BUILDTAGS)" -ldflags "$(LDFLAGS)"

# Debian packages the daemon, the tests and the demo use.
DEB_PACKAGES := runc containernetworking-plugins docker-registry busybox-static \
	iproute2 procps psmisc gcc libc6-dev util-linux qemu-system-x86 xz-utils

BINARIES := $(BIN)/containerd-kuasar $(BIN)/containerd-shim-kuasar-v1 $(BIN)/kuasar-keeper $(BIN)/kuasar-wasm-host $(BIN)/runsc

# gVisor, for kuasar-gvisor: runsc (shipped beside the daemon) and, for the
# stock baseline only, its containerd shim, both from the one version
# contrib/gvisor/go.mod pins and built with that module's own dependencies.
# runsc must be static (a cgo build fails at run time: it re-executes itself
# in an empty chroot). Both are kept in the machine cache by version, so a
# clone builds them once per machine.
GVISOR_MOD     := $(ROOT)/contrib/gvisor
GVISOR_VERSION := $(shell awk '$$1 == "gvisor.dev/gvisor" {print $$2}' $(GVISOR_MOD)/go.mod)
GVISOR_CACHE   := $(CACHE)/gvisor/$(GVISOR_VERSION)
GVISOR_LDFLAGS := -s -w -X gvisor.dev/gvisor/runsc/version.version=$(GVISOR_VERSION)

# The kuasar-vmm guest image (kernel + initramfs), as `make guest` publishes
# it; the files themselves live in the machine cache, $(CACHE)/guest/<key>.
GUEST_OUT := $(OUT)/share/kuasar/guest
GUEST_FILES := vmlinux initramfs.cpio guest.json

.PHONY: all build deps tools stock lint unit e2e e2e-vmm-cold test demo run install clean bench conformance protos check-protos guest kube-tools e2e-kube FORCE

all: build tools

## deps: install missing system packages (idempotent)
deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

## build: the daemon, the runtime-type binary, the keeper and the Wasm host
build: $(BINARIES)

$(BIN)/containerd-kuasar: FORCE
	@mkdir -p $(BIN)
	$(GOBUILD) -o $@ ./cmd/containerd-kuasar

$(BIN)/containerd-shim-kuasar-v1: FORCE
	@mkdir -p $(BIN)
	$(GOBUILD) -o $@ ./cmd/containerd-shim-kuasar-v1

$(BIN)/kuasar-keeper: FORCE
	@mkdir -p $(BIN)
	CGO_ENABLED=0 $(GOBUILD) -o $@ ./cmd/kuasar-keeper

$(BIN)/kuasar-wasm-host: FORCE
	@mkdir -p $(BIN)
	CGO_ENABLED=0 $(GOBUILD) -o $@ ./cmd/kuasar-wasm-host

# The guest agent: static, and without gRPC's x/net/trace (and the net/http
# server it brings: 4.5 MB of the binary, in every VM's RAM).
# A hard link when the cache is on the same filesystem (runsc is ~100 MB).
$(BIN)/runsc: $(GVISOR_CACHE)/runsc
	@mkdir -p $(BIN)
	ln -f $< $@ 2>/dev/null || install -m 0755 $< $@

$(GVISOR_CACHE)/runsc:
	@mkdir -p $(@D)
	cd $(GVISOR_MOD) && CGO_ENABLED=0 go build -trimpath -ldflags "$(GVISOR_LDFLAGS)" -o $@.tmp gvisor.dev/gvisor/runsc
	mv $@.tmp $@

# gVisor's shim sets its own oom_score_adj to -999 and gives up when it may
# not (no CAP_SYS_RESOURCE, as on the machines the project is tested on);
# containerd's own shims carry on. The baseline is built with that one error
# made a warning, in a vendored copy in the machine cache (the module cache
# and this tree untouched); it is the stock shim otherwise.
GVISOR_SHIM_BUILD = $(GVISOR_CACHE)/shim-build
$(GVISOR_CACHE)/containerd-shim-runsc-v1:
	@rm -rf $(GVISOR_SHIM_BUILD) && mkdir -p $(GVISOR_SHIM_BUILD)
	cp $(GVISOR_MOD)/go.mod $(GVISOR_MOD)/go.sum $(GVISOR_SHIM_BUILD)/
	cd $(GVISOR_SHIM_BUILD) && go mod vendor
	sed -i 's|return shim.BootstrapParams{}, fmt.Errorf("failed to set OOM Score on shim: %w", err)|_ = err // kuasar baseline: keep the inherited score|' \
		$(GVISOR_SHIM_BUILD)/vendor/gvisor.dev/gvisor/pkg/shim/v1/manager.go
	grep -q "kuasar baseline: keep the inherited score" $(GVISOR_SHIM_BUILD)/vendor/gvisor.dev/gvisor/pkg/shim/v1/manager.go
	cd $(GVISOR_SHIM_BUILD) && CGO_ENABLED=0 go build -mod=vendor -trimpath -ldflags "-s -w" -o $@.tmp gvisor.dev/gvisor/shim
	mv $@.tmp $@
	rm -rf $(GVISOR_SHIM_BUILD)

$(BIN)/kuasar-vmm-agent: FORCE
	@mkdir -p $(BIN)
	CGO_ENABLED=0 go build -trimpath -tags "$(BUILDTAGS) grpcnotrace" -ldflags "$(LDFLAGS)" -o $@ ./cmd/kuasar-vmm-agent

## guest: the kuasar-vmm guest image: Debian's kernel (apt-get download of
## linux-image-amd64) as vmlinux, and an initramfs holding kuasar-vmm-agent as
## /init, the kernel modules it needs, and runc with its libraries. Reproducible
## and cached under $(CACHE)/guest (keyed by every input: a rebuild with nothing
## changed takes milliseconds); linked into $(GUEST_OUT)
guest: $(BIN)/kuasar-vmm-agent
	go build -trimpath -o $(BIN)/kuasar-guest-build ./contrib/guest
	$(BIN)/kuasar-guest-build -cache $(CACHE)/guest -agent $(BIN)/kuasar-vmm-agent -out $(GUEST_OUT)

## tools: crictl, critest (cri-tools v1.34.0), test image builder, stock baseline
tools: stock
	@mkdir -p $(BIN)
	cd integration/tools && go build -trimpath -o $(BIN)/crictl sigs.k8s.io/cri-tools/cmd/crictl
	cd integration/tools && go test -c -trimpath -o $(BIN)/critest sigs.k8s.io/cri-tools/cmd/critest
	cd integration/tools && go build -trimpath -o $(BIN)/ginkgo github.com/onsi/ginkgo/v2/ginkgo
	go build -trimpath -o $(BIN)/testimages ./integration/cmd/testimages

## stock: stock containerd, its runc shim and ctr, same version and flags;
## gVisor's containerd shim (containerd-shim-runsc-v1) and runsc, same version
## as kuasar-gvisor's
stock: $(GVISOR_CACHE)/containerd-shim-runsc-v1 $(GVISOR_CACHE)/runsc
	@mkdir -p $(STOCK_BIN)
	for b in containerd-shim-runsc-v1 runsc; do ln -f $(GVISOR_CACHE)/$$b $(STOCK_BIN)/$$b 2>/dev/null || install -m 0755 $(GVISOR_CACHE)/$$b $(STOCK_BIN)/; done
	$(GOBUILD) -o $(STOCK_BIN)/containerd github.com/containerd/containerd/v2/cmd/containerd
	$(GOBUILD) -o $(STOCK_BIN)/containerd-shim-runc-v2 github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2
	$(GOBUILD) -o $(STOCK_BIN)/ctr github.com/containerd/containerd/v2/cmd/ctr

## kube-tools: a real Kubernetes node's parts for `make e2e-kube`: kube-apiserver,
## kubelet and kubectl (k8s.io/kubernetes v1.34.4) and etcd (server v3.6.4), pinned
## by integration/kubetools/go.mod. About 10 minutes cold on 2 cores, so they are
## kept in the machine cache, keyed by that module, the Go version and the flags
## (a fresh clone on the same machine links them in seconds)
KUBE_MOD      := $(ROOT)/integration/kubetools
KUBE_VERSION  := $(shell awk '$$1 !~ "^//" {for (i = 1; i < NF; i++) if ($$i == "k8s.io/kubernetes" && $$(i+1) ~ /^v[0-9]/) print $$(i+1)}' $(KUBE_MOD)/go.mod)
KUBE_VER_PKG  := k8s.io/component-base/version
KUBE_LDFLAGS  := -s -w -X $(KUBE_VER_PKG).gitVersion=$(KUBE_VERSION) -X $(KUBE_VER_PKG).gitTreeState=clean \
	-X $(KUBE_VER_PKG).buildDate=1970-01-01T00:00:00Z
KUBE_KEY      := $(shell { cat $(KUBE_MOD)/go.mod $(KUBE_MOD)/go.sum; PATH=/usr/local/go/bin:$$PATH go env GOVERSION GOARCH; echo '$(KUBE_LDFLAGS)'; } | sha256sum | cut -c1-16)
KUBE_CACHE    := $(CACHE)/kube/$(KUBE_KEY)
KUBE_TOOLS    := kube-apiserver kubelet kubectl etcd

kube-tools: $(addprefix $(BIN)/,$(KUBE_TOOLS))

# Hard links when the cache is on the same file system (the four are ~350 MB).
$(addprefix $(BIN)/,$(KUBE_TOOLS)): $(BIN)/%: $(KUBE_CACHE)/.done
	@mkdir -p $(BIN)
	@ln -f $(KUBE_CACHE)/$* $@ 2>/dev/null || install -m 0755 $(KUBE_CACHE)/$* $@

# One go build for the four (they share most packages); built aside and
# renamed into place, so that a build cut short or run twice at once on the
# machine never leaves a half-filled cache entry.
$(KUBE_CACHE)/.done:
	@mkdir -p $(CACHE)/kube
	@tmp=$$(mktemp -d $(CACHE)/kube/.build-XXXXXX) && chmod 0755 $$tmp && \
	echo "building $(KUBE_TOOLS) ($(KUBE_VERSION)) into $(KUBE_CACHE)" && \
	cd $(KUBE_MOD) && go build -trimpath -ldflags "$(KUBE_LDFLAGS)" -o $$tmp/ \
		k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kubectl \
		go.etcd.io/etcd/server/v3 && \
	mv $$tmp/server $$tmp/etcd && touch $$tmp/.done && \
	{ mv -T $$tmp $(KUBE_CACHE) 2>/dev/null || { rm -rf $$tmp; test -e $@; }; }

## protos: regenerate the ttrpc APIs between our processes (*.proto -> *.pb.go,
## committed); needs protoc (Debian protobuf-compiler), the Go plugins are tools
## of go.mod
PROTOS := $(shell git ls-files '*.proto' 2>/dev/null)
protos:
	@command -v protoc >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler >/dev/null; }
	@for p in $(PROTOS); do \
		echo "protoc $$p"; \
		protoc -I$$(dirname $$p) -I/usr/include \
			--plugin=protoc-gen-go=$$(go tool -n protoc-gen-go) \
			--plugin=protoc-gen-go-ttrpc=$$(go tool -n protoc-gen-go-ttrpc) \
			--go_out=paths=source_relative:$$(dirname $$p) \
			--go-ttrpc_out=paths=source_relative:$$(dirname $$p) $$p || exit 1; \
	done

## check-protos: the generated code matches the .proto files
check-protos: protos
	@git diff --exit-code -- $$(for p in $(PROTOS); do echo $${p%.proto}.pb.go $${p%.proto}_ttrpc.pb.go; done) >/dev/null || \
		{ echo "generated protobuf code is stale: run make protos and commit"; exit 1; }

## lint: gofmt and go vet
lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	go vet ./...
	go vet -tags "e2e conformance bench" ./integration/...
	go vet -tags kube ./integration/

## unit: unit tests
unit:
	go test -count=1 ./...

## e2e: end-to-end tests against a real daemon (needs root)
E2E_FLAGS ?=
e2e: build tools guest
	KUASAR_BIN_DIR=$(BIN) KUASAR_STOCK_BIN_DIR=$(STOCK_BIN) KUASAR_CACHE_DIR=$(CACHE) KUASAR_GUEST_DIR=$(GUEST_OUT) \
		go test -count=1 -tags e2e -timeout 30m -v ./integration/ $(E2E_FLAGS) 2>&1 | tee $(OUT)/e2e.log | grep -E '^(=== RUN|--- |PASS|FAIL|ok|panic|\s+\S+_test.go)' ; \
		exit $${PIPESTATUS[0]}

## e2e-vmm-cold: the kuasar-vmm pod tests again with every pod VM booted
## (template = "off"); e2e runs them on clones of templates, the default
e2e-vmm-cold: build tools guest
	KUASAR_BIN_DIR=$(BIN) KUASAR_STOCK_BIN_DIR=$(STOCK_BIN) KUASAR_CACHE_DIR=$(CACHE) KUASAR_GUEST_DIR=$(GUEST_OUT) \
	KUASAR_VMM_TEMPLATE=off \
		go test -count=1 -tags e2e -timeout 20m -v ./integration/ -run 'TestVMM(Lifecycle|Streams|PodNetwork|Restart|PortForward)$$' 2>&1 | tee $(OUT)/e2e-vmm-cold.log | grep -E '^(=== RUN|--- |PASS|FAIL|ok|panic|\s+\S+_test.go)' ; \
		exit $${PIPESTATUS[0]}

## e2e-kube: a real kubelet, kube-apiserver and etcd on loopback against
## containerd-kuasar: pods of every handler through the Kubernetes API (needs root)
e2e-kube: build tools kube-tools guest
	@mkdir -p $(OUT)
	KUASAR_BIN_DIR=$(BIN) KUASAR_STOCK_BIN_DIR=$(STOCK_BIN) KUASAR_CACHE_DIR=$(CACHE) KUASAR_GUEST_DIR=$(GUEST_OUT) \
		go test -count=1 -tags kube -timeout 30m -run TestKube -v ./integration/ 2>&1 | tee $(OUT)/e2e-kube.log | grep -E '^(=== RUN|--- |PASS|FAIL|ok|panic)|^\s+(--- |\S+_test.go)' ; \
		exit $${PIPESTATUS[0]}

## test: everything CI runs
test: deps lint unit e2e e2e-vmm-cold conformance e2e-kube

## run: the daemon in the foreground on the scratch config
SCRATCH ?= /tmp/containerd-kuasar
run: deps build
	@echo "socket: unix://$(SCRATCH)/containerd.sock"
	$(BIN)/containerd-kuasar scratch --dir $(SCRATCH) --mirror 127.0.0.1:5000

## demo: a pod of every handler through crictl, with what each costs
demo: deps build tools guest
	KUASAR_BIN_DIR=$(BIN) KUASAR_CACHE_DIR=$(CACHE) integration/demo.sh

## install: binaries, the kuasar-vmm guest image (under $(PREFIX)/share/kuasar/guest),
## node config and systemd unit (honours DESTDIR, PREFIX)
install: build guest
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/kuasar/guest $(DESTDIR)/etc/containerd $(DESTDIR)/etc/systemd/system
	install -m 0755 $(BINARIES) $(DESTDIR)$(PREFIX)/bin/
	install -m 0644 $(addprefix $(GUEST_OUT)/,$(GUEST_FILES)) $(DESTDIR)$(PREFIX)/share/kuasar/guest/
	@if [ -n "$(DESTDIR)" ] || [ ! -e /etc/containerd/config.toml ]; then \
		install -m 0644 contrib/config.toml $(DESTDIR)/etc/containerd/config.toml; \
	else echo "keeping existing /etc/containerd/config.toml (see contrib/config.toml)"; fi
	sed 's#@BINDIR@#$(PREFIX)/bin#g' contrib/systemd/containerd.service > $(DESTDIR)/etc/systemd/system/containerd.service

clean:
	rm -rf $(OUT)

FORCE:

## bench: containerd-kuasar vs stock containerd, same version, same machine
BENCH_PODS ?= 50
bench: deps build tools guest
	KUASAR_BIN_DIR=$(BIN) KUASAR_STOCK_BIN_DIR=$(STOCK_BIN) KUASAR_CACHE_DIR=$(CACHE) \
	KUASAR_BENCH_PODS=$(BENCH_PODS) KUASAR_BENCH_OUT=$(ROOT)/bench/results \
		go test -count=1 -tags bench -timeout 60m -run TestBench -v ./integration/ 2>&1 | tee $(OUT)/bench.log | grep -vE '^\s+(time=|level=)' | tail -40; \
		exit $${PIPESTATUS[0]}

## conformance: critest's validation suite on stock runc and on kuasar-runc
conformance: deps build tools guest
	KUASAR_BIN_DIR=$(BIN) KUASAR_STOCK_BIN_DIR=$(STOCK_BIN) KUASAR_CACHE_DIR=$(CACHE) \
	KUASAR_CONFORMANCE_OUT=$(OUT)/conformance \
		go test -count=1 -tags conformance -timeout 40m -run TestConformance -v ./integration/ 2>&1 | tee $(OUT)/conformance.log | grep -vE '^\s+(time=|level=)' | grep -E '^\s+(\||Stock|###|conformance_test)|^(---|ok|FAIL|PASS)'; \
		exit $${PIPESTATUS[0]}
