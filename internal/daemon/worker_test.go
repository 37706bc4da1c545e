package daemon_test

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vsdp/vsdp/guestdrv/ctl"
	"github.com/vsdp/vsdp/internal/daemon"
	"github.com/vsdp/vsdp/verbs/soft"
	"github.com/vsdp/vsdp/vhost/vhosttest"
	"github.com/vsdp/vsdp/vhost/vsock/vsocktest"
)

// buildVsdpd builds cmd/vsdpd into a temporary directory.
func buildVsdpd(t *testing.T) string {
	t.Helper()
	gobin, err := exec.LookPath("go")
	if err != nil {
		gobin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	bin := filepath.Join(t.TempDir(), "vsdpd")
	out, err := exec.Command(gobin, "build", "-o", bin, "github.com/vsdp/vsdp/cmd/vsdpd").CombinedOutput()
	if err != nil {
		t.Fatalf("go build vsdpd: %v\n%s", err, out)
	}
	return bin
}

// startVsdpd writes cfg to dir/vsdpd.json and starts the vsdpd binary on it
// with dir as its run directory and args after; its log goes to the file
// whose path it returns. The caller ends it.
func startVsdpd(t *testing.T, bin, dir string, cfg daemon.Config, args ...string) (*exec.Cmd, string) {
	t.Helper()
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(dir, "vsdpd.json")
	if err := os.WriteFile(cfgPath, b, 0o600); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "vsdpd.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close() // the child has its own descriptor
	cmd := exec.Command(bin, append([]string{"-config", cfgPath, "-run-dir", dir}, args...)...)
	cmd.Stderr = logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return cmd, logf.Name()
}

// vsdpdRun is a vsdpd started by runVsdpd.
type vsdpdRun struct {
	cmd     *exec.Cmd
	log     string
	pids    []int // worker PIDs the test saw, killed at the end if alive
	stopped bool
}

// runVsdpd starts vsdpd (startVsdpd) and, when the test ends, kills it
// unless stop ran, kills every worker in pids still alive, and prints its
// log if the test failed.
func runVsdpd(t *testing.T, bin, dir string, cfg daemon.Config, args ...string) *vsdpdRun {
	t.Helper()
	r := &vsdpdRun{}
	r.cmd, r.log = startVsdpd(t, bin, dir, cfg, args...)
	t.Cleanup(func() {
		if !r.stopped {
			r.cmd.Process.Kill()
			r.cmd.Wait()
		}
		for _, pid := range r.pids {
			if !gone(pid) {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		if t.Failed() {
			out, _ := os.ReadFile(r.log)
			t.Logf("vsdpd log:\n%s", out)
		}
	})
	return r
}

// stop stops vsdpd (stopVsdpd).
func (r *vsdpdRun) stop(d time.Duration) error {
	r.stopped = true
	return stopVsdpd(r.cmd, d)
}

// stopVsdpd sends the vsdpd command SIGTERM and waits up to d for it to
// exit, killing it if it does not; it returns how it exited.
func stopVsdpd(cmd *exec.Cmd, d time.Duration) error {
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		return err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	select {
	case err := <-exited:
		return err
	case <-time.After(d):
		cmd.Process.Kill()
		<-exited
		return fmt.Errorf("vsdpd did not exit within %v of SIGTERM", d)
	}
}

// simGuest is a simulated guest on one VM socket (fake front-end + vsock
// driver) with its control connection.
type simGuest struct {
	g  *vsocktest.Guest
	gc *guestCtl
}

func attachGuest(t *testing.T, socket string, cid uint64) *simGuest {
	t.Helper()
	dev := frontEnd(t, socket, vhosttest.DeviceOptions{MemSize: 16 << 20, EventIdx: true, Indirect: true, ConfigSize: 8})
	g, err := vsocktest.New(dev, cid)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	cc, err := g.Dial(ctl.DefaultPort, 5*time.Second)
	if err != nil {
		t.Fatalf("control connection on %s: %v", socket, err)
	}
	t.Cleanup(func() { cc.Close() })
	return &simGuest{g: g, gc: &guestCtl{t: t, c: cc}}
}

// dial asks the host for a stream to dst and opens it.
func (s *simGuest) dial(t *testing.T, id uint32, dst string) *vsocktest.Conn {
	t.Helper()
	s.gc.send(ctl.Msg{Type: ctl.TypeDial, ID: id, Remote: netip.MustParseAddrPort(dst)})
	tk := s.gc.recv()
	if tk.Type != ctl.TypeTicket {
		t.Fatalf("DIAL %s: want TICKET, got %+v", dst, tk)
	}
	c, err := s.g.Dial(tk.Port, 10*time.Second)
	if err != nil {
		t.Fatalf("vsock connect to ticket %d: %v", tk.Port, err)
	}
	if res := s.gc.recv(); res.Type != ctl.TypeResult || res.Errno != 0 || res.ID != tk.Port {
		t.Fatalf("RESULT %+v", res)
	}
	return c
}

// fetch reads the export at dst to its end and checks its hash.
func (s *simGuest) fetch(t *testing.T, id uint32, dst string, want [32]byte) {
	t.Helper()
	c := s.dial(t, id, dst)
	defer c.Close()
	h := sha256.New()
	if _, err := io.Copy(h, c); err != nil {
		t.Fatal(err)
	}
	if [32]byte(h.Sum(nil)) != want {
		t.Fatalf("fetch %s: content differs", dst)
	}
}

// waitPID waits for a worker's PID file to name a process other than old.
func waitPID(t *testing.T, path string, old int) int {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if b, err := os.ReadFile(path); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid != old {
				return pid
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("%s: no new worker PID (old %d)", path, old)
	return 0
}

func gone(pid int) bool { return errors.Is(syscall.Kill(pid, 0), syscall.ESRCH) }

// TestWorkerProcesses runs the vsdpd command in worker mode with two VMs
// and an export: both VMs fetch the export through their own worker
// processes, a guest on one VM reaches a listener on the other across the
// processes' soft fabric, a killed worker leaves the other VM working and
// comes back for a new front-end, and SIGTERM stops every process.
func TestWorkerProcesses(t *testing.T) {
	bin := buildVsdpd(t)
	target, sum := serveBlob(t, 1<<20)
	dir := t.TempDir()
	cfg := daemon.Config{
		Fabric:  daemon.Fabric{Addr: "10.60.0.1"},
		Exports: []daemon.ExportConfig{{Port: 8080, Target: target}},
		VMs: []daemon.VMConfig{
			{Name: "a", Socket: filepath.Join(dir, "a.sock"), CID: 20, Addr: "10.60.0.20",
				Policy: []string{"sdp 10.60.0.1:8080", "sdp 10.60.0.21:9000"}},
			{Name: "b", Socket: filepath.Join(dir, "b.sock"), FSSocket: filepath.Join(dir, "b-fs.sock"), CID: 21, Addr: "10.60.0.21",
				Policy: []string{"sdp 10.60.0.1:8080"}},
		},
	}
	cmd, logPath := startVsdpd(t, bin, dir, cfg, "-stats", "100ms")
	var pids []int
	waited := false
	t.Cleanup(func() {
		if !waited {
			cmd.Process.Kill()
			cmd.Wait()
		}
		for _, pid := range pids {
			if !gone(pid) {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		if t.Failed() || testing.Verbose() {
			out, _ := os.ReadFile(logPath)
			t.Logf("vsdpd log:\n%s", out)
		}
	})
	pidA := waitPID(t, filepath.Join(dir, "a.pid"), 0)
	pidB := waitPID(t, filepath.Join(dir, "b.pid"), 0)
	pids = append(pids, pidA, pidB)
	for _, f := range []string{"a.sock", "b.sock", "b-fs.sock"} { // ready means the sockets exist
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Fatalf("worker ready without its socket: %v", err)
		}
	}
	if pidA == pidB || pidA == cmd.Process.Pid {
		t.Fatalf("worker PIDs a=%d b=%d supervisor=%d", pidA, pidB, cmd.Process.Pid)
	}
	// The workers confined themselves before answering ready (the default
	// sandbox); everything below runs through confined workers.
	for _, pid := range []int{pidA, pidB} {
		checkConfined(t, pid, true)
	}

	ga := attachGuest(t, cfg.VMs[0].Socket, 20)
	gb := attachGuest(t, cfg.VMs[1].Socket, 21)
	// A second front-end on a served VM's socket is refused (after the
	// daemon's wait for the first to end), and the first keeps its device.
	intruder, err := vhosttest.Dial(cfg.VMs[1].Socket)
	if err != nil {
		t.Fatal(err)
	}
	intruder.Timeout = 30 * time.Second // beyond the daemon's wait
	if _, err := intruder.GetFeatures(); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("a second front-end beside the VM's: %v, want it refused (closed)", err)
	}
	intruder.Close()
	ga.fetch(t, 1, "10.60.0.1:8080", sum)
	gb.fetch(t, 1, "10.60.0.1:8080", sum)

	// Guest to guest: b listens on fabric port 9000, a dials it.
	streamAcross(t, ga, gb, 2, "10.60.0.20", "10.60.0.21", 9000, 7777)

	// A dead worker takes only its VM's devices.
	if err := syscall.Kill(pidA, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	gb.fetch(t, 3, "10.60.0.1:8080", sum)
	newA := waitPID(t, filepath.Join(dir, "a.pid"), pidA)
	pids = append(pids, newA)
	ga2 := attachGuest(t, cfg.VMs[0].Socket, 20)
	ga2.fetch(t, 1, "10.60.0.1:8080", sum)

	// SIGTERM stops the supervisor and every worker.
	waited = true
	if err := stopVsdpd(cmd, 10*time.Second); err != nil {
		t.Fatalf("vsdpd on SIGTERM: %v", err)
	}
	for _, pid := range pids {
		if !gone(pid) {
			t.Errorf("worker %d still running after the supervisor exited", pid)
		}
	}
	for _, f := range []string{"a.pid", "b.pid", "a.sock", "b.sock", "b-fs.sock", "a.fabric", "b.fabric", "vsdpd.fabric"} {
		if _, err := os.Stat(filepath.Join(dir, f)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind (%v)", f, err)
		}
	}
	out, _ := os.ReadFile(logPath)
	for _, want := range []string{"worker started", "worker exited", "vm=a", "worker stopped", "msg=stats"} {
		if !bytes.Contains(out, []byte(want)) {
			t.Errorf("log lacks %q", want)
		}
	}
}

// TestWorkersExitWithSupervisor kills the supervisor outright: its
// workers stop by themselves (parent-death signal, end of the pipe).
func TestWorkersExitWithSupervisor(t *testing.T) {
	bin := buildVsdpd(t)
	dir := t.TempDir()
	cfg := daemon.Config{
		Fabric:  daemon.Fabric{Addr: "10.61.0.1"},
		VMs:     []daemon.VMConfig{{Name: "c", Socket: filepath.Join(dir, "c.sock"), CID: 5, Addr: "10.61.0.5"}},
		Sandbox: "off",
	}
	cmd, _ := startVsdpd(t, bin, dir, cfg, "-log-level", "warn")
	pid := 0
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if pid != 0 && !gone(pid) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	pid = waitPID(t, filepath.Join(dir, "c.pid"), 0)
	checkConfined(t, pid, false) // "sandbox": "off"
	cmd.Process.Kill()
	cmd.Wait()
	// The orphan is reparented (to init or a subreaper) and reaped there;
	// until then it is a zombie, which counts as gone once it has exited.
	deadline := time.Now().Add(5 * time.Second)
	for !gone(pid) && !zombie(pid) {
		if time.Now().After(deadline) {
			t.Fatalf("worker %d still running 5 s after its supervisor died", pid)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// checkConfined fails the test unless the kernel reports pid as confined
// by internal/sandbox (a seccomp filter and no_new_privs), or as not
// confined at all.
func checkConfined(t *testing.T, pid int, want bool) {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range []string{"NoNewPrivs:\t1\n", "Seccomp:\t2\n"} {
		if got := bytes.Contains(b, []byte(line)); got != want {
			t.Errorf("worker %d: %q in its status is %v, want %v", pid, strings.TrimSpace(line), got, want)
		}
	}
}

// zombie reports whether pid has exited but not been reaped.
func zombie(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	_, rest, ok := bytes.Cut(b, []byte(") "))
	return ok && len(rest) > 0 && rest[0] == 'Z'
}

// TestSuperviseReportsWorkerFailure: a worker that cannot serve its VM
// (its socket's directory does not exist) fails Supervise with its reason,
// and leaves no process behind.
func TestSuperviseReportsWorkerFailure(t *testing.T) {
	bin := buildVsdpd(t)
	dir := t.TempDir()
	cfg := &daemon.Config{
		Fabric: daemon.Fabric{Addr: "10.62.0.1"},
		VMs:    []daemon.VMConfig{{Name: "d", Socket: filepath.Join(dir, "missing", "d.sock"), CID: 5, Addr: "10.62.0.5"}},
	}
	log := logrus.New()
	log.SetOutput(io.Discard)
	noLeaks(t)
	s, err := daemon.Supervise(cfg, daemon.SupervisorOptions{RunDir: dir, Exe: bin}, log)
	if err == nil {
		s.Close()
		t.Fatal("Supervise succeeded with an unservable socket path")
	}
	if !errors.Is(err, daemon.ErrWorker) || !strings.Contains(err.Error(), "d.sock") {
		t.Fatalf("error %v: want ErrWorker naming the socket", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "d.pid")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("PID file of a failed worker: %v", err)
	}
}

// TestSuperviseValidatesConfig: each rule worker mode checks before it
// forks anything.
func TestSuperviseValidatesConfig(t *testing.T) {
	dir := t.TempDir()
	vm := func(f func(*daemon.VMConfig)) daemon.Config {
		v := daemon.VMConfig{Name: "v", Socket: filepath.Join(dir, "v.sock"), CID: 3, Addr: "10.63.0.3"}
		f(&v)
		return daemon.Config{Fabric: daemon.Fabric{Addr: "10.63.0.1"}, VMs: []daemon.VMConfig{v}}
	}
	two := func(f func(a, b *daemon.VMConfig)) daemon.Config {
		c := vm(func(*daemon.VMConfig) {})
		w := c.VMs[0]
		w.Name, w.CID, w.Addr, w.Socket = "w", 4, "10.63.0.4", filepath.Join(dir, "w.sock")
		c.VMs = append(c.VMs, w)
		f(&c.VMs[0], &c.VMs[1])
		return c
	}
	cases := []struct {
		name string
		cfg  daemon.Config
		want string
	}{
		{"provider", daemon.Config{Provider: "ibv", Fabric: daemon.Fabric{Addr: "10.63.0.1"}}, "provider"},
		{"sandbox", daemon.Config{Sandbox: "maybe", Fabric: daemon.Fabric{Addr: "10.63.0.1"}}, "sandbox"},
		{"worker group", daemon.Config{WorkerGroup: "no-such-group-vsdp", Fabric: daemon.Fabric{Addr: "10.63.0.1"}}, "worker_group"},
		{"uid without a group", vm(func(v *daemon.VMConfig) { v.UID = 64510 }), "worker_group"},
		{"negative uid", vm(func(v *daemon.VMConfig) { v.UID = -5 }), "uid -5"},
		{"duplicate uid", withGroup(two(func(a, b *daemon.VMConfig) { a.UID, b.UID = 64510, 64510 })), "also vm"},
		{"fabric addr", daemon.Config{Fabric: daemon.Fabric{Addr: "nowhere"}}, "fabric.addr"},
		{"touch", daemon.Config{Fabric: daemon.Fabric{Addr: "10.63.0.1"}, Touch: func(soft.Touch) {}}, "Touch"},
		{"peer addr", daemon.Config{Fabric: daemon.Fabric{Addr: "10.63.0.1", Peers: map[string]string{"x": "tcp:127.0.0.1:1"}}}, "fabric.peers"},
		{"peer endpoint", daemon.Config{Fabric: daemon.Fabric{Addr: "10.63.0.1", Peers: map[string]string{"10.63.1.1": "udp:1"}}}, "fabric.peers"},
		{"empty name", vm(func(v *daemon.VMConfig) { v.Name = "" }), "vm name"},
		{"name with slash", vm(func(v *daemon.VMConfig) { v.Name = "../x" }), "vm name"},
		{"dot name", vm(func(v *daemon.VMConfig) { v.Name = ".x" }), "vm name"},
		{"long name", vm(func(v *daemon.VMConfig) { v.Name = strings.Repeat("n", 65) }), "vm name"},
		{"reserved cid", vm(func(v *daemon.VMConfig) { v.CID = 2 }), "reserved"},
		{"vm addr", vm(func(v *daemon.VMConfig) { v.Addr = "10.63.0" }), "addr"},
		{"vm addr is the host's", vm(func(v *daemon.VMConfig) { v.Addr = "10.63.0.1" }), "fabric.addr"},
		{"no socket", vm(func(v *daemon.VMConfig) { v.Socket = "" }), "no socket"},
		{"policy", vm(func(v *daemon.VMConfig) { v.Policy = []string{"maybe 10.0.0.1:1"} }), "maybe"},
		{"listen", vm(func(v *daemon.VMConfig) { v.Listen = "carrier-pigeon" }), "listen"},
		{"listen port 0", vm(func(v *daemon.VMConfig) { v.Listen = "tcp:127.0.0.1:0" }), "fixed port"},
		{"listen inproc", vm(func(v *daemon.VMConfig) { v.Listen = "inproc:x" }), "fixed port"},
		{"duplicate name", two(func(a, b *daemon.VMConfig) { b.Name = a.Name }), "duplicate name"},
		{"duplicate cid", two(func(a, b *daemon.VMConfig) { b.CID = a.CID }), "duplicate cid"},
		{"duplicate addr", two(func(a, b *daemon.VMConfig) { b.Addr = a.Addr }), "also vm v"},
		{"run dir path too long", vm(func(v *daemon.VMConfig) { v.Name = strings.Repeat("n", 64) }), "longer than 107"},
	}
	if os.Geteuid() != 0 { // as root, uid 0 means "vsdpd's", and root may
		cases = append(cases, []struct {
			name string
			cfg  daemon.Config
			want string
		}{
			{"uid without root", withGroup(vm(func(v *daemon.VMConfig) { v.UID = 64510 })), "root"},
			{"vsdpd's own uid", withGroup(vm(func(v *daemon.VMConfig) { v.UID = os.Geteuid() })), "own"},
		}...)
	}
	log := logrus.New()
	log.SetOutput(io.Discard)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			runDir := dir
			if c.name == "run dir path too long" {
				runDir = filepath.Join(dir, strings.Repeat("r", 60))
			}
			s, err := daemon.Supervise(&c.cfg, daemon.SupervisorOptions{RunDir: runDir, Exe: "/nonexistent/vsdpd"}, log)
			if err == nil {
				s.Close()
				t.Fatal("accepted")
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %q lacks %q", err, c.want)
			}
		})
	}
}

// withGroup sets a worker_group on c.
func withGroup(c daemon.Config) daemon.Config {
	c.WorkerGroup = "64500"
	return c
}

// TestRunWorker drives a worker in this process over a pipe: it answers
// ready once its socket exists, stops when the supervisor's end closes,
// and refuses a configuration it cannot decode.
func TestRunWorker(t *testing.T) {
	dir := t.TempDir()
	noLeaks(t)
	sock := filepath.Join(dir, "e.sock")
	conf := `{"vm":{"name":"e","socket":"` + sock + `","cid":9,"addr":"10.64.0.9","policy":["sdp 10.64.0.1:*"]},` +
		`"listen":"unix:` + filepath.Join(dir, "e.fabric") + `","table":{"10.64.0.1":"unix:` + filepath.Join(dir, "host.fabric") + `"}}` + "\n"
	sup, wk := net.Pipe()
	errc := make(chan error, 1)
	go func() { errc <- daemon.RunWorker(wk, nil, io.Discard) }()
	go sup.Write([]byte(conf))
	line, err := bufio.NewReader(sup).ReadString('\n')
	if err != nil || !strings.Contains(line, `"ready":true`) {
		t.Fatalf("worker answered %q, %v", line, err)
	}
	if _, err := os.Stat(sock); err != nil {
		t.Fatalf("ready without its socket: %v", err)
	}
	sup.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, daemon.ErrSupervisorGone) {
			t.Fatalf("RunWorker: %v, want ErrSupervisorGone", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("worker did not stop when its pipe closed")
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket left behind: %v", err)
	}

	vmConf := `{"vm":{"name":"e","socket":"` + sock + `","cid":9,"addr":"10.64.0.9"},"listen":"unix:` + filepath.Join(dir, "e.fabric") + `"`
	for _, bad := range []string{"{\"vm\":{}, \"bogus\":1}\n", "not json\n", `{"vm":{"name":"e","socket":"` + sock + `","cid":9,"addr":"10.64.0.9"},"listen":"udp:x"}` + "\n",
		// Handed listeners: an unknown name, the pipe's descriptor, a
		// socket the VM does not have, a descriptor that is not open.
		vmConf + `,"handed":{"bogus":5}}` + "\n",
		vmConf + `,"handed":{"socket":3}}` + "\n",
		vmConf + `,"handed":{"fs_socket":5}}` + "\n",
		vmConf + `,"handed":{"socket":999}}` + "\n",
	} {
		sup, wk := net.Pipe()
		go func() { errc <- daemon.RunWorker(wk, nil, io.Discard) }()
		go func() { sup.Write([]byte(bad)); io.Copy(io.Discard, sup) }()
		select {
		case err := <-errc:
			if err == nil {
				t.Fatalf("worker accepted %q", bad)
			}
			if strings.Contains(bad, `"handed"`) && !strings.Contains(err.Error(), "handed") {
				t.Fatalf("worker refused %q for another reason: %v", bad, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("worker hung on %q", bad)
		}
		sup.Close()
	}
}

// noLeaks fails the test if, once it ends, this process has more
// goroutines or open fds than when noLeaks was called (settling for up to
// five seconds).
func noLeaks(t *testing.T) {
	t.Helper()
	fds := func() int { e, _ := os.ReadDir("/proc/self/fd"); return len(e) }
	g0, f0 := runtime.NumGoroutine(), fds()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for {
			g, f := runtime.NumGoroutine(), fds()
			if g <= g0 && f <= f0 {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("leak: %d goroutines (was %d), %d fds (was %d)", g, g0, f, f0)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}
