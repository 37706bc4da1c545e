#!/bin/sh
# deps.sh: install what the VM tests need, then fetch the guest kernel.
# Idempotent: when every package is present it only checks (seconds).
# Usage: scripts/deps.sh   (run from anywhere; `make deps` runs it)
set -eu

# The package list of /work/shared/ref/vm-recipes.md, plus xz-utils and gzip
# (vsdp-image extracts the uncompressed kernel from vmlinuz).
PACKAGES="qemu-system-x86 qemu-utils busybox-static cpio kmod socat iproute2
libibverbs-dev librdmacm-dev ibverbs-providers ibverbs-utils rdmacm-utils
perftest iperf3 xz-utils gzip wget"

die() { echo "deps.sh: $*" >&2; exit 1; }

cd "$(dirname "$0")/.."

missing=""
for p in $PACKAGES; do
	st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
	[ "$st" = installed ] || missing="$missing $p"
done

if [ -n "$missing" ]; then
	echo "deps.sh: installing:$missing"
	SUDO=""
	if [ "$(id -u)" != 0 ]; then
		command -v sudo >/dev/null 2>&1 || die "not root and no sudo; install as root:$missing"
		SUDO=sudo
	fi
	$SUDO apt-get update -q || die "apt-get update failed"
	# shellcheck disable=SC2086
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing \
		|| die "apt-get install failed:$missing"
fi

GO=${GO:-go}
command -v "$GO" >/dev/null 2>&1 || GO=/usr/local/go/bin/go
[ -x "$(command -v "$GO")" ] || die "no go tool (set GO=/path/to/go)"

# The guest kernel: the package linux-image-amd64 depends on now, downloaded
# once into build/kernel (apt-get download, dpkg -x, depmod), plus vmlinux.
"$GO" run ./cmd/vsdp-image kernel || die "fetching the guest kernel failed (see above)"
