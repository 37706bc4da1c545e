# vsdp — the two commands are `make demo` and `make test`; see README.md.
SHELL := /bin/bash
GO    ?= go
export PATH := /usr/local/go/bin:$(PATH)
# VM tests run one at a time; everything else in parallel.
PKGS  := ./...
BENCHTIME ?= 500ms
FUZZTIME  ?= 30s

.PHONY: all deps build test test-host test-vm lint bench bench-vm fuzz demo clean

all: build

deps:
	@bash scripts/deps.sh

build:
	CGO_ENABLED=0 $(GO) build ./...
	$(GO) build -o build/bin/ ./cmd/...
	bash guestdrv/build.sh build/guest

lint:
	@echo "== lint: gofmt, go vet"
	@out=$$(gofmt -l $$(git ls-files '*.go') 2>/dev/null); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	CGO_ENABLED=0 $(GO) vet ./...

# Tier 1: pure Go, race detector, seed corpora of every fuzz target.
test-host:
	@echo "== tier 1: host tests (go test -race)"
	@start=$$(date +%s); \
	VSDP_VMTEST=0 $(GO) test -race -count=1 -timeout 10m $(PKGS); rc=$$?; \
	echo "== tier 1 wall time: $$(( $$(date +%s) - start )) s"; exit $$rc

# Tier 2: QEMU guests (TCG), one at a time.
test-vm: deps
	@echo "== tier 2: VM tests (QEMU, one at a time)"
	@start=$$(date +%s); \
	VSDP_VMTEST=1 $(GO) test -p 1 -count=1 -timeout 20m -run 'TestVM' $(PKGS); rc=$$?; \
	echo "== tier 2 wall time: $$(( $$(date +%s) - start )) s"; exit $$rc

test: deps lint build
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory test-host && $(MAKE) --no-print-directory test-vm; rc=$$?; \
	echo "== make test total wall time: $$(( $$(date +%s) - start )) s"; exit $$rc

# Host-tier tables (Go benchmarks), then the VM tier (bench-vm).
bench:
	@$(GO) run ./cmd/benchtab -benchtime $(BENCHTIME) $(PKGS)
	@$(MAKE) --no-print-directory bench-vm

fuzz:
	@bash scripts/fuzz.sh $(FUZZTIME)

demo: deps build
	@$(GO) run ./cmd/vsdp-demo

clean:
	rm -rf build/bin build/images

# VM-tier tables (QEMU TCG, one boot each; log in build/bench-vm.log):
# verbs/ibv beside perftest between two soft-RoCE guests (bandwidth at
# 4 KiB and 64 KiB, 64-byte SEND latency polled and on events); SDP beside
# perftest and kernel TCP on that link; the product path (vsock device ->
# SDP -> exported host service) beside virtio-net/slirp.
bench-vm: deps build
	@$(GO) run ./cmd/benchtab -vm
