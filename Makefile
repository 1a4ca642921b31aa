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
# The checksum database's cache (GOPATH/pkg/sumdb) too, not ~/go.
export GOPATH     ?= $(CACHE)/gopath
export GOFLAGS    ?= -mod=mod
export GONOSUMDB  := sigs.k8s.io/cri-tools,k8s.io
export PATH       := $(BIN):/usr/local/go/bin:$(PATH)

PREFIX  ?= /usr/local
DESTDIR ?=
# Where `make install` puts each kind of file (the packages use PREFIX=/usr).
BINDIR     ?= $(PREFIX)/bin
LIBEXECDIR ?= $(PREFIX)/libexec
DATADIR    ?= $(PREFIX)/share
MANDIR     ?= $(DATADIR)/man
SYSCONFDIR ?= /etc
UNITDIR    ?= $(if $(filter /usr,$(PREFIX)),/usr/lib/systemd/system,/etc/systemd/system)
# 0: no kuasar-vmm guest image and agent
WITH_VMM   ?= 1

MODULE             := github.com/kuasar-io/containerd-kuasar
VERSION            ?= $(shell git describe --tags --match 'v*' --dirty 2>/dev/null || echo v0.1.0-dev)
REVISION           ?= $(shell git rev-parse HEAD 2>/dev/null)
# $(shell) does not see what this file exports (GNU make < 4.4): go run
# from it gets the caches and PATH spelled out, or it would look for Go
# elsewhere and write ~/go.
GO_SHELL := PATH="$(PATH)" GOCACHE="$(GOCACHE)" GOMODCACHE="$(GOMODCACHE)" GOPATH="$(GOPATH)" GOFLAGS="$(GOFLAGS)" GONOSUMDB="$(GONOSUMDB)" go
# Evaluated once, when first used (after deps may have installed Go).
CONTAINERD_VERSION = $(eval CONTAINERD_VERSION := $(shell $(GO_SHELL) list -m -f '{{.Version}}' github.com/containerd/containerd/v2 2>/dev/null))$(CONTAINERD_VERSION)
BUILDTAGS          := no_btrfs
LDFLAGS = -s -w \
	-X $(MODULE)/cmd/internal/version.Version=$(VERSION) \
	-X $(MODULE)/cmd/internal/version.Revision=$(REVISION) \
	-X github.com/containerd/containerd/v2/version.Version=$(CONTAINERD_VERSION)
GOBUILD = go build -trimpath -tags "$(BUILDTAGS)" -ldflags "$(LDFLAGS)"

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

# containerd's own commands, built from the containerd release of go.mod with
# the same flags, shipped beside the daemon as containerd's package ships them.
STOCK_TOOLS := $(STOCK_BIN)/ctr $(STOCK_BIN)/containerd-shim-runc-v2 $(STOCK_BIN)/containerd-stress

# containerd's manual pages and ctr's shell completions, as containerd's
# packages ship them, made from the containerd module of go.mod.
MAN_OUT   := $(OUT)/man
MAN_PAGES := man8/containerd.8 man8/ctr.8 man8/containerd-config.8 man5/containerd-config.toml.5
CONTAINERD_DIR = $(shell $(GO_SHELL) list -m -f '{{.Dir}}' github.com/containerd/containerd/v2 2>/dev/null)

# gVisor's licence and README go with runsc, kuasar-gvisor's (from the
# gVisor module contrib/gvisor pins, in the module cache once runsc is built).
GVISOR_DOC_DIR = $(if $(wildcard contrib/gvisor/go.mod),$(shell cd contrib/gvisor && $(GO_SHELL) list -m -f '{{.Dir}}' gvisor.dev/gvisor 2>/dev/null))

# The kuasar-vmm guest image (kernel + initramfs), as `make guest` publishes
# it; the files themselves live in the machine cache, $(CACHE)/guest/<key>.
GUEST_OUT := $(OUT)/share/kuasar/guest
GUEST_FILES := vmlinux initramfs.cpio guest.json

.PHONY: all build deps tools stock stock-tools agent man lint unit e2e e2e-vmm-cold test demo run install install-files clean bench conformance protos check-protos guest \
	pkg-deps rpm-sources rpm srpm deb package-test kube-tools e2e-kube FORCE

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

# The guest agent: static, and without gRPC's x/net/trace (and the net/http
# server it brings: 4.5 MB of the binary, in every VM's RAM).
$(BIN)/kuasar-vmm-agent: FORCE
	@mkdir -p $(BIN)
	CGO_ENABLED=0 go build -trimpath -tags "$(BUILDTAGS) grpcnotrace" -ldflags "$(LDFLAGS)" -o $@ ./cmd/kuasar-vmm-agent

## agent: the kuasar-vmm guest agent
agent: $(BIN)/kuasar-vmm-agent

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

## stock: stock containerd, its runc shim, ctr and containerd-stress, same
## version and flags; gVisor's containerd shim (containerd-shim-runsc-v1) and
## runsc, same version as kuasar-gvisor's
stock: $(STOCK_BIN)/containerd stock-tools $(GVISOR_CACHE)/containerd-shim-runsc-v1 $(GVISOR_CACHE)/runsc
	@mkdir -p $(STOCK_BIN)
	for b in containerd-shim-runsc-v1 runsc; do ln -f $(GVISOR_CACHE)/$$b $(STOCK_BIN)/$$b 2>/dev/null || install -m 0755 $(GVISOR_CACHE)/$$b $(STOCK_BIN)/; done

## stock-tools: containerd's commands that ship beside containerd-kuasar
stock-tools: $(STOCK_TOOLS)

$(STOCK_BIN)/%: FORCE
	@mkdir -p $(STOCK_BIN)
	$(GOBUILD) -o $@ github.com/containerd/containerd/v2/cmd/$*

## man: containerd's manual pages (containerd.8, ctr.8, containerd-config.8,
## containerd-config.toml.5) in $(MAN_OUT), generated from the containerd
## release of go.mod as containerd's build does (its gen-manpages, and
## go-md2man for the Markdown ones; both tools of go.mod)
man:
	@test -d "$(CONTAINERD_DIR)/docs/man" || { echo "man: no source of github.com/containerd/containerd/v2 in the module cache (go mod download)"; exit 1; }
	@mkdir -p $(MAN_OUT)/man5 $(MAN_OUT)/man8
	go tool gen-manpages containerd.8 $(MAN_OUT)/man8
	go tool gen-manpages ctr.8 $(MAN_OUT)/man8
	go tool go-md2man -in $(CONTAINERD_DIR)/docs/man/containerd-config.8.md -out $(MAN_OUT)/man8/containerd-config.8
	go tool go-md2man -in $(CONTAINERD_DIR)/docs/man/containerd-config.toml.5.md -out $(MAN_OUT)/man5/containerd-config.toml.5

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
KUBE_KEY      := $(shell { cat $(KUBE_MOD)/go.mod $(KUBE_MOD)/go.sum; $(GO_SHELL) env GOVERSION GOARCH; echo '$(KUBE_LDFLAGS)'; } | sha256sum | cut -c1-16)
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
	go vet -tags "e2e conformance bench pkg" ./integration/...
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
test: deps lint unit e2e e2e-vmm-cold conformance e2e-kube package-test

## run: the daemon in the foreground on the scratch config
SCRATCH ?= /tmp/containerd-kuasar
run: deps build
	@echo "socket: unix://$(SCRATCH)/containerd.sock"
	$(BIN)/containerd-kuasar scratch --dir $(SCRATCH) --mirror 127.0.0.1:5000

## demo: a pod of every handler through crictl, with what each costs
demo: deps build tools guest
	KUASAR_BIN_DIR=$(BIN) KUASAR_CACHE_DIR=$(CACHE) integration/demo.sh

## install: the daemon (also as containerd), its helpers, containerd's ctr,
## containerd-shim-runc-v2 and containerd-stress of the same release, its
## manual pages and ctr's bash and zsh completions, the
## kuasar-vmm guest image and agent, node config, systemd unit, RuntimeClasses,
## docs and licences (honours DESTDIR, PREFIX and the *DIR variables above)
install: build stock-tools man $(if $(filter 1,$(WITH_VMM)),agent guest)
	@$(MAKE) --no-print-directory install-files

## install-files: install what the build made, building nothing (the RPM's
## %install); the file list is the packages' (make package-test checks it)
install-files:
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(SYSCONFDIR)/containerd $(DESTDIR)$(UNITDIR) \
		$(DESTDIR)$(DATADIR)/containerd-kuasar $(DESTDIR)$(DATADIR)/doc/containerd-kuasar $(DESTDIR)$(DATADIR)/licenses/containerd-kuasar
	install -m 0755 $(BINARIES) $(STOCK_TOOLS) $(DESTDIR)$(BINDIR)/
	ln -sfn containerd-kuasar $(DESTDIR)$(BINDIR)/containerd
	@if [ -n "$(DESTDIR)" ] || [ ! -e $(SYSCONFDIR)/containerd/config.toml ]; then \
		echo "install -m 0644 contrib/config.toml $(DESTDIR)$(SYSCONFDIR)/containerd/config.toml"; \
		install -m 0644 contrib/config.toml $(DESTDIR)$(SYSCONFDIR)/containerd/config.toml; \
	else echo "keeping existing $(SYSCONFDIR)/containerd/config.toml (see contrib/config.toml)"; fi
	sed 's#@BINDIR@#$(BINDIR)#g' contrib/systemd/containerd.service > $(DESTDIR)$(UNITDIR)/containerd.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/containerd.service
	install -m 0644 contrib/kubernetes/runtimeclasses.yaml $(DESTDIR)$(DATADIR)/containerd-kuasar/
	install -m 0644 README.md RELEASES.md $(DESTDIR)$(DATADIR)/doc/containerd-kuasar/
	install -m 0644 LICENSE NOTICE $(DESTDIR)$(DATADIR)/licenses/containerd-kuasar/
	install -d $(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(MANDIR)/man8 \
		$(DESTDIR)$(DATADIR)/bash-completion/completions $(DESTDIR)$(DATADIR)/zsh/site-functions
	for p in $(MAN_PAGES); do gzip -9n < $(MAN_OUT)/$$p > $(DESTDIR)$(MANDIR)/$$p.gz && chmod 0644 $(DESTDIR)$(MANDIR)/$$p.gz || exit 1; done
	install -m 0644 $(CONTAINERD_DIR)/contrib/autocomplete/ctr $(DESTDIR)$(DATADIR)/bash-completion/completions/ctr
	install -m 0644 $(CONTAINERD_DIR)/contrib/autocomplete/zsh_autocomplete $(DESTDIR)$(DATADIR)/zsh/site-functions/_ctr
ifneq ($(wildcard contrib/gvisor/go.mod),)
	@test -f "$(GVISOR_DOC_DIR)/LICENSE" || { echo "install: gVisor's module is not in the module cache (make build fetches it)"; exit 1; }
	install -d $(DESTDIR)$(DATADIR)/licenses/containerd-kuasar-gvisor $(DESTDIR)$(DATADIR)/doc/containerd-kuasar-gvisor
	install -m 0644 $(GVISOR_DOC_DIR)/LICENSE $(DESTDIR)$(DATADIR)/licenses/containerd-kuasar-gvisor/
	install -m 0644 $(GVISOR_DOC_DIR)/README.md $(DESTDIR)$(DATADIR)/doc/containerd-kuasar-gvisor/
endif
ifeq ($(WITH_VMM),1)
	install -d $(DESTDIR)$(LIBEXECDIR)/kuasar $(DESTDIR)$(DATADIR)/kuasar/guest $(DESTDIR)$(DATADIR)/doc/containerd-kuasar-vmm
	install -m 0755 $(BIN)/kuasar-vmm-agent $(DESTDIR)$(LIBEXECDIR)/kuasar/
	install -m 0644 plugins/vmm/README.md $(DESTDIR)$(DATADIR)/doc/containerd-kuasar-vmm/
	install -m 0644 $(addprefix $(GUEST_OUT)/,$(GUEST_FILES)) $(DESTDIR)$(DATADIR)/kuasar/guest/
endif

## ---- packages: RPM (contrib/rpm) and deb (contrib/deb), from this tree, offline
SPEC         := contrib/rpm/containerd-kuasar.spec
PKG_VERSION  := $(shell awk '$$1 == "Version:" {print $$2; exit}' $(SPEC))
PKG_RELEASE  ?= 1
PKG_OUT      := $(OUT)/pkg
RPM_TOP      := $(PKG_OUT)/rpmbuild
RPM_DIR      := $(RPM_TOP)/RPMS/x86_64
PKG_TREE     := $(PKG_OUT)/tree
DEB_DIR      := $(PKG_OUT)/deb
PKG_SOURCE   := $(RPM_TOP)/SOURCES/containerd-kuasar-$(PKG_VERSION).tar.gz
PKG_GUEST    := $(RPM_TOP)/SOURCES/kuasar-guest-$(PKG_VERSION).tar
# Debian has no RPM database of its packages, so rpmbuild cannot check
# BuildRequires here (--nodeps); the payload is compressed fast for CI.
RPMBUILD_FLAGS ?= --define "_binary_payload w3.zstdio"
# systemd: systemd-analyze, for the unit check (nothing is started).
PKG_DEB_PACKAGES := rpm rpmlint systemd

## pkg-deps: rpmbuild, rpmlint and systemd-analyze (Debian's rpm, rpmlint and
## systemd), if missing
pkg-deps:
	@missing=$$(for p in $(PKG_DEB_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

## rpm-sources: Source0 (the tree: tracked and new files, not ignored ones)
## and Source1 (the kuasar-vmm guest image) of the spec, both reproducible
## (sorted, no times or owners), so that `make rpm` can tell a tree it built
REPRO_TAR := tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner
rpm-sources: guest
	@mkdir -p $(RPM_TOP)/SOURCES
	git ls-files -z --cached --others --exclude-standard | \
		$(REPRO_TAR) --null -T - --ignore-failed-read --warning=no-failed-read \
			--transform 's,^,containerd-kuasar-$(PKG_VERSION)/,' -cf - | gzip -n > $(PKG_SOURCE)
	$(REPRO_TAR) -chf $(PKG_GUEST) -C $(GUEST_OUT) --transform 's,^,guest/,' $(GUEST_FILES)

## rpm: containerd-kuasar, -vmm and -gvisor RPMs (PKG_RELEASE=N) in
## $(RPM_DIR); rpmbuild builds from Source0, offline (the Go module cache is
## filled by building here first). The packages are kept in $(CACHE)/rpm,
## keyed by every input (contrib/rpm/build.sh): the same tree again takes
## a second
rpm: pkg-deps build stock-tools man agent rpm-sources
	GOPROXY=off contrib/rpm/build.sh $(RPM_TOP) $(CACHE)/rpm $(SPEC) \
		--define "pkg_release $(PKG_RELEASE)" \
		--define "commit $(REVISION)" \
		$(if $(wildcard contrib/gvisor/go.mod),--with gvisor) \
		$(RPMBUILD_FLAGS)

## srpm: the source RPM (with the guest image as Source1)
srpm: pkg-deps rpm-sources
	rpmbuild -bs --nodeps --define "_topdir $(RPM_TOP)" --define "pkg_release $(PKG_RELEASE)" $(SPEC)

## deb: containerd-kuasar, -vmm and -gvisor .debs in $(DEB_DIR), made
## with dpkg-deb from what `make install DESTDIR=$(PKG_TREE) PREFIX=/usr` puts down
## (kept in $(CACHE)/deb, keyed by the tree and the packaging)
deb: build stock-tools man agent guest
	rm -rf $(PKG_TREE)
	@$(MAKE) --no-print-directory install-files DESTDIR=$(PKG_TREE) PREFIX=/usr
	DEB_CACHE=$(CACHE)/deb contrib/deb/mkdeb.sh $(PKG_TREE) $(DEB_DIR) $(PKG_VERSION)-$(PKG_RELEASE) $(CONTAINERD_VERSION:v%=%)

## package-test: the packages' file lists against the install tree, rpmlint,
## the systemd unit (systemd-analyze verify), and the daemon run from the RPM
## installed in a scratch root: a pod of every handler, kept running across
## an upgrade to the next release (built here too)
PKG_NEXT_RELEASE = $(shell echo $$(( $(PKG_RELEASE) + 1 )))
package-test: deps pkg-deps tools rpm deb
	@$(MAKE) --no-print-directory rpm PKG_RELEASE=$(PKG_NEXT_RELEASE)
	KUASAR_BIN_DIR=$(BIN) KUASAR_STOCK_BIN_DIR=$(STOCK_BIN) KUASAR_CACHE_DIR=$(CACHE) \
	KUASAR_RPM_DIR=$(RPM_DIR) KUASAR_DEB_DIR=$(DEB_DIR) KUASAR_PKG_TREE=$(PKG_TREE) \
	KUASAR_PKG_VERSION=$(PKG_VERSION) KUASAR_PKG_RELEASE=$(PKG_RELEASE) KUASAR_PKG_NEXT_RELEASE=$(PKG_NEXT_RELEASE) \
		go test -count=1 -tags pkg -timeout 20m -run TestPackage -v ./integration/ 2>&1 | tee $(OUT)/package-test.log | grep -E '^(=== RUN|--- |PASS|FAIL|ok|panic|\s+\S+_test.go)' ; \
		exit $${PIPESTATUS[0]}

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
