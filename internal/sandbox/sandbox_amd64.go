//go:build linux

package sandbox

import "golang.org/x/sys/unix"

const (
	auditArch     = unix.AUDIT_ARCH_X86_64
	x32Bit        = 0x40000000 // __X32_SYSCALL_BIT: x32 ABI numbers have it
	cloneFlagsArg = 0          // clone(flags, stack, parent_tid, child_tid, tls)
)

// deniedArch are amd64's older spellings of the calls in deniedCommon.
var deniedArch = []uintptr{
	unix.SYS_OPEN, unix.SYS_CREAT, unix.SYS_RENAMEAT, unix.SYS_UNLINK, unix.SYS_RMDIR, unix.SYS_RENAME,
	unix.SYS_LINK, unix.SYS_SYMLINK, unix.SYS_MKDIR, unix.SYS_MKNOD, unix.SYS_CHMOD,
	unix.SYS_CHOWN, unix.SYS_LCHOWN, unix.SYS_FORK, unix.SYS_VFORK, unix.SYS_KEXEC_FILE_LOAD,
	unix.SYS_IOPL, unix.SYS_IOPERM,
}
