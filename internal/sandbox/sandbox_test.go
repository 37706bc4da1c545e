//go:build linux

package sandbox

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// childEnv makes the test binary the confined child (TestMain).
const childEnv = "VSDP_SANDBOX_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		os.Exit(child(os.Getenv(childEnv)))
	}
	os.Exit(m.Run())
}

// child confines itself, then checks what is refused and what still works,
// one line per failure on stdout; then it says "ready" and waits for stdin
// to close, so the parent can look at it from outside.
func child(sock string) int {
	// Before: what a worker sets up (a file it keeps, a listener).
	keep, err := os.Open("/proc/self/status")
	if err != nil {
		fmt.Println("FAIL open before:", err)
		return 1
	}
	tcp, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Println("FAIL listen before:", err)
		return 1
	}
	if err := Worker(); err != nil {
		fmt.Println("FAIL Worker:", err)
		return 1
	}
	var fails []string
	fail := func(format string, a ...any) { fails = append(fails, fmt.Sprintf(format, a...)) }
	refused := func(what string, err error, want syscall.Errno) {
		if !errors.Is(err, want) {
			fail("%s: %v, want %v", what, err, want)
		}
	}
	ppid := os.Getppid()

	// Refused.
	_, err = os.Open("/etc/passwd")
	refused("open", err, unix.EPERM)
	_, err = os.Create(filepath.Join(filepath.Dir(sock), "new"))
	refused("create", err, unix.EPERM)
	refused("unlink", unix.Unlink(sock), unix.EPERM)
	refused("mkdir", unix.Mkdir(sock+".d", 0o700), unix.EPERM)
	refused("chmod", unix.Chmod(sock, 0o777), unix.EPERM)
	refused("rename", unix.Rename(sock, sock+".x"), unix.EPERM)
	refused("exec", exec.Command("/bin/true").Run(), unix.EPERM)
	refused("kill parent", unix.Kill(ppid, 0), unix.EPERM)
	refused("kill group", unix.Kill(0, 0), unix.EPERM)
	refused("kill init", unix.Kill(1, 0), unix.EPERM)
	refused("tgkill parent", unix.Tgkill(ppid, ppid, 0), unix.EPERM)
	refused("ptrace", unix.PtraceAttach(ppid), unix.EPERM)
	buf := make([]byte, 8)
	local := []unix.Iovec{{Base: &buf[0], Len: 8}}
	remote := []unix.RemoteIovec{{Base: uintptr(unsafe.Pointer(&buf[0])), Len: 8}}
	_, err = unix.ProcessVMReadv(ppid, local, remote, 0)
	refused("process_vm_readv", err, unix.EPERM)
	_, err = unix.PidfdOpen(ppid, 0)
	refused("pidfd_open", err, unix.EPERM)
	refused("unshare", unix.Unshare(unix.CLONE_NEWNET), unix.EPERM)
	_, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
	refused("packet socket", err, unix.EPERM)
	_, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_ICMP)
	refused("raw socket", err, unix.EPERM)
	_, err = net.Listen("tcp", "127.0.0.1:0")
	refused("a new listener", err, unix.EPERM)
	_, err = net.Listen("unix", sock+".new")
	refused("a socket file", err, unix.EPERM)
	refused("setuid", unix.Setresuid(-1, 65534, -1), unix.EPERM)
	if fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0); err != nil {
		fail("udp socket: %v", err)
	} else {
		_, err := unix.IoctlGetInt(fd, unix.SIOCGIFINDEX) // any request not on the list
		refused("ioctl SIOCGIFINDEX", err, unix.EPERM)
		if _, err := unix.IoctlGetInt(fd, ioFIONREAD); err != nil {
			fail("ioctl FIONREAD: %v", err)
		}
		unix.Close(fd)
	}
	_, _, e := unix.RawSyscall(unix.SYS_CLONE3, 0, 0, 0)
	refused("clone3", e, unix.ENOSYS)
	if d, err := unix.PrctlRetInt(unix.PR_GET_DUMPABLE, 0, 0, 0, 0); err != nil || d != 0 {
		fail("dumpable %d, %v; want 0", d, err)
	}

	// Still works: signals to itself, I/O on descriptors it holds, sockets
	// (connect by path included), memory, new threads, preemption, GC.
	if err := unix.Kill(os.Getpid(), 0); err != nil {
		fail("kill self: %v", err)
	}
	if _, err := keep.Seek(0, io.SeekStart); err != nil {
		fail("seek a kept file: %v", err)
	} else if _, err := keep.Read(buf); err != nil {
		fail("read a kept file: %v", err)
	}
	if c, err := net.Dial("unix", sock); err != nil {
		fail("connect by path: %v", err)
	} else {
		if _, err := c.Write([]byte("hello\n")); err != nil {
			fail("write to the parent: %v", err)
		}
		c.Close()
	}
	go func() {
		if c, err := tcp.Accept(); err == nil {
			io.Copy(c, c)
			c.Close()
		}
	}()
	if c, err := net.Dial("tcp", tcp.Addr().String()); err != nil {
		fail("tcp dial: %v", err)
	} else {
		c.Write([]byte("ping"))
		got := make([]byte, 4)
		if _, err := io.ReadFull(c, got); err != nil || string(got) != "ping" {
			fail("tcp echo %q, %v", got, err)
		}
		c.Close()
	}
	if m, err := unix.Mmap(-1, 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE); err != nil {
		fail("mmap: %v", err)
	} else {
		m[1<<19] = 1
		unix.Munmap(m)
	}
	// Threads: goroutines locked to their threads force the runtime to
	// create new ones; tight loops need asynchronous preemption (tgkill
	// to itself) for the GC to finish.
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 2 * runtime.GOMAXPROCS(0) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread()
			for n := 0; ; n++ {
				if n%(1<<20) == 0 {
					select {
					case <-stop:
						return
					default:
					}
				}
			}
		}()
	}
	gc := make(chan struct{})
	go func() { runtime.GC(); close(gc) }()
	select {
	case <-gc:
	case <-time.After(20 * time.Second):
		fail("GC did not finish beside tight loops within 20 s (preemption refused?)")
	}
	close(stop)
	wg.Wait()

	for _, f := range fails {
		fmt.Println("FAIL", f)
	}
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin)
	if len(fails) > 0 {
		return 1
	}
	return 0
}

// The confined child: what must be refused is, what a worker needs still
// works, and the kernel reports the filter and no_new_privs.
func TestWorker(t *testing.T) {
	if auditArch == 0 {
		t.Skipf("no filter for %s: add sandbox_%s.go", runtime.GOARCH, runtime.GOARCH)
	}
	dir := t.TempDir()
	sock := filepath.Join(dir, "parent.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	hello := make(chan string, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			hello <- err.Error()
			return
		}
		line, _ := bufio.NewReader(c).ReadString('\n')
		hello <- line
		c.Close()
	}()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+sock)
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	sc := bufio.NewScanner(stdout)
	var out []string
	for sc.Scan() && sc.Text() != "ready" {
		out = append(out, sc.Text())
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"NoNewPrivs:\t1", "Seccomp:\t2", "Seccomp_filters:\t1"} {
		if !strings.Contains(string(status), want+"\n") {
			t.Errorf("child's /proc status lacks %q", want)
		}
	}
	if os.Getuid() != 0 { // a non-dumpable process's /proc files belong to root
		var st unix.Stat_t
		if err := unix.Stat(fmt.Sprintf("/proc/%d/mem", cmd.Process.Pid), &st); err == nil && st.Uid != 0 {
			t.Errorf("child's /proc/PID/mem belongs to uid %d: still dumpable", st.Uid)
		}
	}
	stdin.Close()
	err = cmd.Wait()
	for _, l := range out {
		t.Error(l)
	}
	if err != nil {
		t.Errorf("child: %v", err)
	}
	select {
	case h := <-hello:
		if h != "hello\n" {
			t.Errorf("the child's connect by path brought %q", h)
		}
	case <-time.After(5 * time.Second):
		t.Error("the child never connected by path")
	}
}

// runBPF interprets the subset of classic BPF that Filter emits over one
// struct seccomp_data, so the program's logic is checked call by call
// without the kernel (and on any architecture).
func runBPF(t *testing.T, prog []unix.SockFilter, data []byte) uint32 {
	t.Helper()
	var a uint32
	for pc := 0; pc < len(prog); pc++ {
		in := prog[pc]
		switch in.Code {
		case unix.BPF_LD | unix.BPF_W | unix.BPF_ABS:
			if int(in.K)+4 > len(data) {
				t.Fatalf("pc %d: load at %d past seccomp_data", pc, in.K)
			}
			a = binary.LittleEndian.Uint32(data[in.K:])
		case unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K:
			pc += int(map[bool]uint8{true: in.Jt, false: in.Jf}[a == in.K])
		case unix.BPF_JMP | unix.BPF_JGE | unix.BPF_K:
			pc += int(map[bool]uint8{true: in.Jt, false: in.Jf}[a >= in.K])
		case unix.BPF_JMP | unix.BPF_JSET | unix.BPF_K:
			pc += int(map[bool]uint8{true: in.Jt, false: in.Jf}[a&in.K != 0])
		case unix.BPF_ALU | unix.BPF_AND | unix.BPF_K:
			a &= in.K
		case unix.BPF_RET | unix.BPF_K:
			return in.K
		default:
			t.Fatalf("pc %d: opcode %#x not interpreted", pc, in.Code)
		}
	}
	t.Fatal("the program ran off its end")
	return 0
}

func seccompData(nr int, arch uint32, args ...uint64) []byte {
	b := make([]byte, 64)
	binary.LittleEndian.PutUint32(b[0:], uint32(nr))
	binary.LittleEndian.PutUint32(b[4:], arch)
	for i, a := range args {
		binary.LittleEndian.PutUint64(b[16+8*i:], a)
	}
	return b
}

func TestFilterProgram(t *testing.T) {
	if auditArch == 0 {
		t.Skipf("no filter for %s", runtime.GOARCH)
	}
	const self = 4242
	prog := filter(self)
	if len(prog) > 4096 { // BPF_MAXINSNS
		t.Fatalf("%d instructions: over the kernel's limit", len(prog))
	}
	const (
		allow = unix.SECCOMP_RET_ALLOW
		eperm = unix.SECCOMP_RET_ERRNO | uint32(unix.EPERM)
		nosys = unix.SECCOMP_RET_ERRNO | uint32(unix.ENOSYS)
		kill  = unix.SECCOMP_RET_KILL_PROCESS
	)
	type tc struct {
		name string
		nr   int
		arch uint32
		arg0 uint64
		want uint32
		arg1 uint64
	}
	cases := []tc{
		{"read", unix.SYS_READ, auditArch, 0, allow, 0},
		{"connect", unix.SYS_CONNECT, auditArch, 0, allow, 0},
		{"mmap", unix.SYS_MMAP, auditArch, 0, allow, 0},
		{"close", unix.SYS_CLOSE, auditArch, 0, allow, 0},
		{"clone a thread", unix.SYS_CLONE, auditArch, unix.CLONE_VM | unix.CLONE_THREAD | unix.CLONE_SIGHAND, allow, 0},
		{"clone a process", unix.SYS_CLONE, auditArch, unix.CLONE_VM | unix.CLONE_VFORK | uint64(unix.SIGCHLD), eperm, 0},
		{"clone3", unix.SYS_CLONE3, auditArch, 0, nosys, 0},
		{"kill self", unix.SYS_KILL, auditArch, self, allow, 0},
		{"kill other", unix.SYS_KILL, auditArch, 1, eperm, 0},
		{"kill group", unix.SYS_KILL, auditArch, 0, eperm, 0},
		{"kill all", unix.SYS_KILL, auditArch, uint64(0xffffffff), eperm, 0},
		{"tgkill self", unix.SYS_TGKILL, auditArch, self, allow, 0},
		{"tgkill other", unix.SYS_TGKILL, auditArch, self + 1, eperm, 0},
		{"other architecture", unix.SYS_READ, 0x40000003 /* i386 */, 0, kill, 0},
		{"unix socket", unix.SYS_SOCKET, auditArch, unix.AF_UNIX, allow, unix.SOCK_STREAM | unix.SOCK_CLOEXEC},
		{"tcp socket", unix.SYS_SOCKET, auditArch, unix.AF_INET, allow, unix.SOCK_STREAM | unix.SOCK_NONBLOCK | unix.SOCK_CLOEXEC},
		{"udp6 socket", unix.SYS_SOCKET, auditArch, unix.AF_INET6, allow, unix.SOCK_DGRAM},
		{"raw ip socket", unix.SYS_SOCKET, auditArch, unix.AF_INET, eperm, unix.SOCK_RAW | unix.SOCK_CLOEXEC},
		{"packet-type ip socket", unix.SYS_SOCKET, auditArch, unix.AF_INET, eperm, unix.SOCK_PACKET},
		{"packet socket", unix.SYS_SOCKET, auditArch, unix.AF_PACKET, eperm, unix.SOCK_DGRAM},
		{"netlink socket", unix.SYS_SOCKET, auditArch, unix.AF_NETLINK, eperm, unix.SOCK_RAW},
		{"ioctl SIOCSIFFLAGS", unix.SYS_IOCTL, auditArch, 3, eperm, unix.SIOCSIFFLAGS},
		{"ioctl TIOCSTI", unix.SYS_IOCTL, auditArch, 2, eperm, unix.TIOCSTI},
	}
	for _, req := range ioctlAllowed {
		cases = append(cases, tc{fmt.Sprintf("ioctl %#x", req), unix.SYS_IOCTL, auditArch, 1, allow, uint64(req)})
	}
	if x32Bit != 0 {
		cases = append(cases, tc{"x32 read", x32Bit | unix.SYS_READ, auditArch, 0, kill, 0})
	}
	for _, nr := range denied {
		cases = append(cases, tc{fmt.Sprintf("denied %d", nr), int(nr), auditArch, 0, eperm, 0})
	}
	for _, c := range cases {
		if got := runBPF(t, prog, seccompData(c.nr, c.arch, c.arg0, c.arg1)); got != c.want {
			t.Errorf("%s: %#x, want %#x", c.name, got, c.want)
		}
	}
	// No call outside the lists is refused: sweep every number below 512.
	special := map[int]bool{unix.SYS_CLONE: true, unix.SYS_CLONE3: true, unix.SYS_KILL: true, unix.SYS_TGKILL: true,
		unix.SYS_SOCKET: true, unix.SYS_IOCTL: true}
	for _, nr := range denied {
		special[int(nr)] = true
	}
	for nr := range 512 {
		if !special[nr] {
			if got := runBPF(t, prog, seccompData(nr, auditArch, 0)); got != allow {
				t.Errorf("call %d: %#x, want allowed", nr, got)
			}
		}
	}
}
