//go:build linux

package sandbox

import "golang.org/x/sys/unix"

const (
	auditArch     = unix.AUDIT_ARCH_AARCH64
	x32Bit        = 0 // no second ABI on the same entry
	cloneFlagsArg = 0 // clone(flags, stack, parent_tid, tls, child_tid)
)

// deniedArch: arm64 has only the *at spellings, which deniedCommon holds.
var deniedArch = []uintptr{unix.SYS_KEXEC_FILE_LOAD}
