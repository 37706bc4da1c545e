// Package sandbox confines a vsdpd worker process once it has set itself
// up, so that a guest that takes over its worker (ARCHITECTURE §6: a
// compromise stays inside one VM's worker) gains little beyond what that
// worker already holds: its own VM's memory and streams.
//
// Worker applies, in this order:
//   - PR_SET_DUMPABLE 0: no process of the same uid may ptrace the worker
//     or read its memory (its guest's RAM) through /proc/PID/mem, and it
//     leaves no core dump;
//   - PR_SET_NO_NEW_PRIVS: no exec can ever raise its privileges;
//   - a seccomp filter, synchronised to every thread of the process
//     (SECCOMP_FILTER_FLAG_TSYNC), that answers EPERM to opening any file,
//     exec, creating processes (threads stay allowed), ptrace and
//     cross-process memory access, signals to any process but itself,
//     path-based changes to the filesystem (unlink, rename, link, mkdir,
//     chmod, chown, mknod), bind and listen (no new listeners, no socket
//     files), changes of identity (set*id, setgroups, capset), sockets
//     other than Unix and IP or raw and packet ones, ioctl requests other
//     than a few descriptor and terminal queries (a worker left as root
//     keeps its capabilities: CAP_NET_ADMIN works through any socket's
//     ioctl), the clock, host and domain names, and the kernel's
//     administrative calls (mount, namespaces, modules, bpf, perf, keys,
//     kexec, reboot, syslog, accounting, quotas), and ENOSYS to clone3 (so
//     a C library falls back to clone, whose flags the filter can read). A
//     system call of another architecture's ABI (x32, or a 32-bit entry on
//     a 64-bit kernel) kills the process.
//
// What stays allowed is what a worker does while serving: I/O on its
// descriptors, accepting on listeners it already has, new Unix and IP
// sockets and connect (the fabric's endpoints and host TCP), mmap of the
// memory QEMU hands over, futexes, timers, and the Go runtime's signals to
// its own threads.
//
// Not covered, and said so in the README: connect to a Unix socket by path
// cannot be told apart by seccomp (the path is behind a pointer), so the
// supervisor's control socket refuses its workers by peer PID (a confined
// worker cannot create a process to connect from); resource use is bounded
// by the worker's own limits, not here.
//
// # Threat model
//
// The code runs in the process it confines and trusts nothing it gets
// later; the filter is fixed before any guest input is read. Arguments
// the filter compares (clone flags, a signal's target PID) are values, not
// pointers, so a racing thread cannot change them after the check.
//
// # Concurrency
//
// Worker may be called from any goroutine; the filter and no_new_privs
// reach every thread of the process at once. It is meant to be called
// once; a second call stacks a second, identical filter.
package sandbox
