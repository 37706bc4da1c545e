package daemon_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vsdp/vsdp/internal/daemon"
	"golang.org/x/sys/unix"
)

// Workers under uids of their own (VMConfig.UID, worker_group): each runs
// as its VM's uid in the worker group; the supervisor owns the sockets and
// hands them over, so neither worker can connect to the other's vhost-user
// sockets or to the control socket, while the fabric between them works;
// a worker killed is restarted under its uid.
func TestWorkerUIDs(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("starting workers under other uids needs root: run the tests as root (CI does)")
	}
	const group, uidA, uidB = 64500, 64501, 64502
	bin := buildVsdpd(t)
	dir := t.TempDir()
	// The workers exec the binary and reach the fabric endpoints by path:
	// the directories on the way must let them through.
	for _, d := range []string{filepath.Dir(bin), filepath.Dir(filepath.Dir(bin)), dir, filepath.Dir(dir)} {
		if err := os.Chmod(d, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	target, sum := serveBlob(t, 1<<20)
	cfg := daemon.Config{
		Fabric:      daemon.Fabric{Addr: "10.62.0.1"},
		Exports:     []daemon.ExportConfig{{Port: 8080, Target: target}},
		WorkerGroup: strconv.Itoa(group),
		VMs: []daemon.VMConfig{
			{Name: "a", Socket: filepath.Join(dir, "a.sock"), CID: 30, Addr: "10.62.0.30", UID: uidA,
				Policy: []string{"sdp 10.62.0.1:8080"}},
			{Name: "b", Socket: filepath.Join(dir, "b.sock"), FSSocket: filepath.Join(dir, "b-fs.sock"), CID: 31, Addr: "10.62.0.31", UID: uidB,
				Policy: []string{"sdp 10.62.0.1:8080", "sdp 10.62.0.32:9000"}},
			// c keeps vsdpd's uid; its fabric endpoint is the group's too.
			{Name: "c", Socket: filepath.Join(dir, "c.sock"), CID: 32, Addr: "10.62.0.32"},
		},
	}
	run := runVsdpd(t, bin, dir, cfg)
	pidA := waitPID(t, filepath.Join(dir, "a.pid"), 0)
	pidB := waitPID(t, filepath.Join(dir, "b.pid"), 0)
	pidC := waitPID(t, filepath.Join(dir, "c.pid"), 0)
	run.pids = append(run.pids, pidA, pidB, pidC)
	checkIDs(t, pidA, uidA, group)
	checkIDs(t, pidB, uidB, group)
	checkIDs(t, pidC, 0, 0)
	checkConfined(t, pidA, true)

	// The sockets are vsdpd's (root's), the fabric endpoints the group's.
	for _, f := range []struct {
		name string
		gid  int
		mode os.FileMode
	}{{"a.sock", 0, 0o600}, {"b.sock", 0, 0o600}, {"b-fs.sock", 0, 0o600}, {"vsdpd.ctl", 0, 0o600},
		{"c.sock", 0, 0o600}, {"a.fabric", group, 0o660}, {"b.fabric", group, 0o660}, {"c.fabric", group, 0o660},
		{"vsdpd.fabric", group, 0o660}} {
		var st unix.Stat_t
		if err := unix.Stat(filepath.Join(dir, f.name), &st); err != nil {
			t.Fatal(err)
		}
		if st.Uid != 0 || int(st.Gid) != f.gid || os.FileMode(st.Mode)&0o777 != f.mode {
			t.Errorf("%s: owner %d:%d mode %o, want 0:%d %o", f.name, st.Uid, st.Gid, st.Mode&0o777, f.gid, f.mode)
		}
	}
	// What b's uid may reach: the fabric, not a's devices or the control.
	for _, c := range []struct {
		name string
		want error
	}{{"a.sock", unix.EACCES}, {"c.sock", unix.EACCES}, {"vsdpd.ctl", unix.EACCES}, {"a.fabric", nil},
		{"c.fabric", nil}, {"vsdpd.fabric", nil}} {
		if err := connectAs(uidB, group, filepath.Join(dir, c.name)); !errors.Is(err, c.want) && err != c.want {
			t.Errorf("connect to %s as b's uid: %v, want %v", c.name, err, c.want)
		}
	}

	ga := attachGuest(t, cfg.VMs[0].Socket, 30)
	gb := attachGuest(t, cfg.VMs[1].Socket, 31)
	ga.fetch(t, 1, "10.62.0.1:8080", sum)
	gb.fetch(t, 1, "10.62.0.1:8080", sum)
	// From a worker under a uid to one under vsdpd's, over the fabric.
	gc := attachGuest(t, cfg.VMs[2].Socket, 32)
	streamAcross(t, gb, gc, 2, "10.62.0.31", "10.62.0.32", 9000, 7777)

	// A killed worker comes back under its uid, with fresh sockets.
	if err := syscall.Kill(pidA, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	newA := waitPID(t, filepath.Join(dir, "a.pid"), pidA)
	run.pids = append(run.pids, newA)
	checkIDs(t, newA, uidA, group)
	ga2 := attachGuest(t, cfg.VMs[0].Socket, 30)
	ga2.fetch(t, 1, "10.62.0.1:8080", sum)

	if err := run.stop(10 * time.Second); err != nil {
		t.Fatalf("vsdpd on SIGTERM: %v", err)
	}
	for _, f := range []string{"a.sock", "b.sock", "b-fs.sock", "c.sock", "a.fabric", "b.fabric", "c.fabric", "vsdpd.fabric", "vsdpd.ctl"} {
		if _, err := os.Stat(filepath.Join(dir, f)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind (%v)", f, err)
		}
	}
}

// checkIDs fails the test unless the kernel reports pid running as uid
// (all four ids) and gid, with no supplementary groups.
func checkIDs(t *testing.T, pid, uid, gid int) {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	u, g := strconv.Itoa(uid), strconv.Itoa(gid)
	for _, want := range []string{"Uid:\t" + strings.Repeat(u+"\t", 3) + u + "\n", "Gid:\t" + strings.Repeat(g+"\t", 3) + g + "\n"} {
		if !bytes.Contains(b, []byte(want)) {
			t.Errorf("worker %d: status lacks %q", pid, strings.TrimSpace(want))
		}
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "Groups:"); ok && strings.TrimSpace(rest) != "" {
			t.Errorf("worker %d: supplementary groups %q", pid, strings.TrimSpace(rest))
		}
	}
}

// connectAs connects to a unix socket path with the effective uid and gid
// given (on one OS thread of this process, which ends with the call), and
// returns connect's error.
func connectAs(uid, gid int, path string) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: this thread's ids change
		if _, _, e := syscall.RawSyscall(syscall.SYS_SETRESGID, ^uintptr(0), uintptr(gid), ^uintptr(0)); e != 0 {
			errc <- e
			return
		}
		if _, _, e := syscall.RawSyscall(syscall.SYS_SETRESUID, ^uintptr(0), uintptr(uid), ^uintptr(0)); e != 0 {
			errc <- e
			return
		}
		fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			errc <- err
			return
		}
		err = unix.Connect(fd, &unix.SockaddrUnix{Name: path})
		unix.Close(fd)
		errc <- err
	}()
	return <-errc
}

// One process has one uid: the one-process daemon refuses a VM's uid.
func TestStartRefusesUID(t *testing.T) {
	dir := t.TempDir()
	cfg := daemon.Config{Fabric: daemon.Fabric{Addr: "10.62.1.1"}, WorkerGroup: "64500",
		VMs: []daemon.VMConfig{{Name: "u", Socket: filepath.Join(dir, "u.sock"), CID: 40, Addr: "10.62.1.40", UID: 64540}}}
	d, err := daemon.Start(&cfg, quietLog())
	if err == nil {
		d.Close()
		t.Fatal("Start accepted a VM with a uid")
	}
	if !strings.Contains(err.Error(), "worker mode") {
		t.Fatalf("error %q does not say uid needs worker mode", err)
	}
	if _, err := os.Stat(cfg.VMs[0].Socket); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket created anyway (%v)", err)
	}
}
