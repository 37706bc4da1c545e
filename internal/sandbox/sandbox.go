//go:build linux

package sandbox

import (
	"errors"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ErrUnsupported means this build's architecture has no filter here.
var ErrUnsupported = errors.New("sandbox: no seccomp filter for this architecture")

// Worker confines the calling process for good (see the package comment).
// An error means nothing past the step that failed was applied.
func Worker() error {
	if auditArch == 0 {
		return ErrUnsupported
	}
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		return fmt.Errorf("sandbox: PR_SET_DUMPABLE: %w", err)
	}
	// no_new_privs is per thread; the kernel copies it to every thread
	// with the filter below (TSYNC), which it also requires without
	// CAP_SYS_ADMIN.
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("sandbox: PR_SET_NO_NEW_PRIVS: %w", err)
	}
	prog := filter(unix.Getpid())
	fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	r, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER,
		unix.SECCOMP_FILTER_FLAG_TSYNC, uintptr(unsafe.Pointer(&fprog)))
	if errno != 0 {
		return fmt.Errorf("sandbox: seccomp: %w", errno)
	}
	if r != 0 {
		// TSYNC's failure: the thread whose filters are not an ancestor
		// of ours.
		return fmt.Errorf("sandbox: seccomp: thread %d could not be synchronised", r)
	}
	return nil
}

// Offsets in struct seccomp_data.
const (
	offNr   = 0
	offArch = 4
	offArg0 = 16 // the low 32 bits on a little-endian machine
)

// filter returns the classic-BPF program Worker installs, for a process
// whose PID is self (the tests also run it through an interpreter).
func filter(self int) []unix.SockFilter {
	var p []unix.SockFilter
	stmt := func(code uint16, k uint32) { p = append(p, unix.SockFilter{Code: code, K: k}) }
	jump := func(code uint16, k uint32, jt, jf uint8) {
		p = append(p, unix.SockFilter{Code: code, K: k, Jt: jt, Jf: jf})
	}
	const (
		ld    = unix.BPF_LD | unix.BPF_W | unix.BPF_ABS
		jeq   = unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K
		jge   = unix.BPF_JMP | unix.BPF_JGE | unix.BPF_K
		jset  = unix.BPF_JMP | unix.BPF_JSET | unix.BPF_K
		and   = unix.BPF_ALU | unix.BPF_AND | unix.BPF_K
		ret   = unix.BPF_RET | unix.BPF_K
		allow = unix.SECCOMP_RET_ALLOW
		eperm = unix.SECCOMP_RET_ERRNO | uint32(unix.EPERM)
		nosys = unix.SECCOMP_RET_ERRNO | uint32(unix.ENOSYS)
		kill  = unix.SECCOMP_RET_KILL_PROCESS
	)
	stmt(ld, offArch)
	jump(jeq, auditArch, 1, 0)
	stmt(ret, kill)
	stmt(ld, offNr)
	if x32Bit != 0 {
		jump(jge, x32Bit, 0, 1)
		stmt(ret, kill)
	}
	for _, nr := range denied {
		jump(jeq, uint32(nr), 0, 1)
		stmt(ret, eperm)
	}
	jump(jeq, uint32(unix.SYS_CLONE3), 0, 1)
	stmt(ret, nosys)
	// clone: threads only (a new process would have no filter of its own
	// to worry about, but could connect to the control socket under a PID
	// the supervisor does not know).
	jump(jeq, uint32(unix.SYS_CLONE), 0, 4)
	stmt(ld, offArg0+cloneFlagsArg*8)
	jump(jset, unix.CLONE_THREAD, 0, 1)
	stmt(ret, allow)
	stmt(ret, eperm)
	// kill and tgkill: only to this process (the Go runtime preempts its
	// threads with tgkill(getpid(), tid, SIGURG)).
	for _, nr := range []uintptr{unix.SYS_KILL, unix.SYS_TGKILL} {
		jump(jeq, uint32(nr), 0, 4)
		stmt(ld, offArg0)
		jump(jeq, uint32(self), 0, 1)
		stmt(ret, allow)
		stmt(ret, eperm)
	}
	// socket: Unix and IP families only, and no raw or packet sockets (a
	// worker left as root still holds CAP_NET_RAW).
	jump(jeq, uint32(unix.SYS_SOCKET), 0, 11)
	stmt(ld, offArg0)
	jump(jeq, unix.AF_UNIX, 3, 0)
	jump(jeq, unix.AF_INET, 2, 0)
	jump(jeq, unix.AF_INET6, 1, 0)
	stmt(ret, eperm)
	stmt(ld, offArg0+8)
	stmt(and, 0xf) // the type without SOCK_NONBLOCK and SOCK_CLOEXEC
	jump(jeq, unix.SOCK_RAW, 1, 0)
	jump(jeq, unix.SOCK_PACKET, 0, 1)
	stmt(ret, eperm)
	stmt(ret, allow)
	// ioctl: only the requests a worker's descriptors need (and CAP_NET_ADMIN
	// would otherwise let a root worker reconfigure the host's network
	// through any socket).
	n := len(ioctlAllowed)
	jump(jeq, uint32(unix.SYS_IOCTL), 0, uint8(n+3))
	stmt(ld, offArg0+8)
	for i, req := range ioctlAllowed {
		jump(jeq, req, uint8(n-i), 0)
	}
	stmt(ret, eperm)
	stmt(ret, allow)
	stmt(ret, allow)
	return p
}

// ioctlAllowed are the ioctl requests the filter lets through: descriptor
// flags, bytes readable, and the terminal queries a logger makes.
var ioctlAllowed = []uint32{ioFIOCLEX, ioFIONCLEX, ioFIONBIO, ioFIONREAD, unix.TCGETS, unix.TIOCGWINSZ}

// The asm-generic numbers of descriptor ioctls (amd64 and arm64 share
// them; golang.org/x/sys does not name them all).
const (
	ioFIONREAD = 0x541B
	ioFIONBIO  = 0x5421
	ioFIONCLEX = 0x5450
	ioFIOCLEX  = 0x5451
)

// deniedCommon are the calls answered EPERM on every architecture.
var deniedCommon = []uintptr{
	// files by path
	unix.SYS_OPENAT, unix.SYS_OPENAT2, unix.SYS_OPEN_BY_HANDLE_AT, unix.SYS_NAME_TO_HANDLE_AT,
	unix.SYS_UNLINKAT, unix.SYS_RENAMEAT2, unix.SYS_LINKAT, unix.SYS_SYMLINKAT,
	unix.SYS_MKDIRAT, unix.SYS_MKNODAT, unix.SYS_FCHMODAT, unix.SYS_FCHOWNAT, unix.SYS_TRUNCATE,
	// programs and processes
	unix.SYS_EXECVE, unix.SYS_EXECVEAT, unix.SYS_PTRACE, unix.SYS_PROCESS_VM_READV,
	unix.SYS_PROCESS_VM_WRITEV, unix.SYS_PIDFD_OPEN, unix.SYS_PIDFD_GETFD, unix.SYS_PIDFD_SEND_SIGNAL,
	unix.SYS_TKILL, unix.SYS_RT_SIGQUEUEINFO, unix.SYS_RT_TGSIGQUEUEINFO, unix.SYS_KCMP,
	unix.SYS_SETNS, unix.SYS_UNSHARE,
	// new listening sockets and socket files (a bind to a path creates
	// one), and changes of identity
	unix.SYS_BIND, unix.SYS_LISTEN, unix.SYS_SETUID, unix.SYS_SETGID, unix.SYS_SETREUID,
	unix.SYS_SETREGID, unix.SYS_SETRESUID, unix.SYS_SETRESGID, unix.SYS_SETFSUID, unix.SYS_SETFSGID,
	unix.SYS_SETGROUPS, unix.SYS_CAPSET,
	// the kernel's administration
	unix.SYS_MOUNT, unix.SYS_UMOUNT2, unix.SYS_PIVOT_ROOT, unix.SYS_CHROOT, unix.SYS_SWAPON,
	unix.SYS_SWAPOFF, unix.SYS_REBOOT, unix.SYS_KEXEC_LOAD, unix.SYS_INIT_MODULE,
	unix.SYS_FINIT_MODULE, unix.SYS_DELETE_MODULE, unix.SYS_BPF, unix.SYS_PERF_EVENT_OPEN,
	unix.SYS_ADD_KEY, unix.SYS_REQUEST_KEY, unix.SYS_KEYCTL, unix.SYS_USERFAULTFD,
	unix.SYS_FANOTIFY_INIT, unix.SYS_OPEN_TREE, unix.SYS_MOVE_MOUNT, unix.SYS_FSOPEN,
	unix.SYS_FSMOUNT, unix.SYS_FSPICK, unix.SYS_MOUNT_SETATTR, unix.SYS_SETHOSTNAME,
	unix.SYS_SETDOMAINNAME, unix.SYS_SETTIMEOFDAY, unix.SYS_CLOCK_SETTIME, unix.SYS_CLOCK_ADJTIME,
	unix.SYS_ADJTIMEX, unix.SYS_SYSLOG, unix.SYS_ACCT, unix.SYS_QUOTACTL, unix.SYS_MIGRATE_PAGES,
	unix.SYS_MOVE_PAGES, unix.SYS_VHANGUP,
}

// denied is every call the filter answers EPERM.
var denied = append(append([]uintptr(nil), deniedCommon...), deniedArch...)
