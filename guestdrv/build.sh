#!/usr/bin/env bash
# Build libvsdp.so and vsdp-conf (the configuration checker) for a guest.
#   guestdrv/build.sh [OUTDIR]          (default: build/guest)
# Environment: CC (default gcc), EXTRA_CFLAGS (added last, e.g. sanitizers).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-build/guest}"
cc="${CC:-gcc}"
mkdir -p "$out"
src="$here/libvsdp"
cflags=(-std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -fPIC -O2 -g -pthread)
# shellcheck disable=SC2206
extra=(${EXTRA_CFLAGS:-})
"$cc" "${cflags[@]}" -fvisibility=hidden -shared "${extra[@]}" \
	-o "$out/libvsdp.so" \
	"$src/init.c" "$src/table.c" "$src/ctlconn.c" "$src/transport.c" \
	"$src/sock.c" "$src/io.c" "$src/fd.c" "$src/rules.c" \
	-ldl -Wl,--no-undefined -Wl,-z,defs
"$cc" "${cflags[@]}" "${extra[@]}" -o "$out/vsdp-conf" "$src/vsdp_conf.c" "$src/rules.c"
# The C test client the guest-side tests run (also inside VM tests).
"$cc" "${cflags[@]}" "${extra[@]}" -U_GNU_SOURCE -o "$out/vsdptest" "$here/testdata/vsdptest.c" -I"$src" -ldl
# The epoll stream-check client and server (streamcheck's protocol; VM tests).
"$cc" "${cflags[@]}" "${extra[@]}" -U_GNU_SOURCE -o "$out/vsdpstreams" "$here/testdata/vsdpstreams.c" -I"$src" -ldl
