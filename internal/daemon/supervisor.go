package daemon

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vsdp/vsdp/sdpback"
	"github.com/vsdp/vsdp/sdpback/sdp"
	"github.com/vsdp/vsdp/verbs/soft"
)

// SupervisorOptions configure worker mode. The zero value re-executes the
// running binary with -worker and keeps its files next to the first VM's
// socket.
type SupervisorOptions struct {
	// RunDir holds the supervisor's and workers' soft endpoints
	// (vsdpd.fabric, NAME.fabric) and each worker's PID file (NAME.pid,
	// written once the worker is ready, removed when it exits). Default:
	// the directory of the first VM's socket.
	RunDir string
	// Exe and Args start a worker; default /proc/self/exe -worker.
	Exe  string
	Args []string
	// LogLevel is the workers' log level; default the supervisor's.
	LogLevel string
	// Stats makes each worker log its VM's counters this often.
	Stats time.Duration
	// ReadyTimeout bounds a worker's start (default 10 s); StopTimeout is
	// how long Close waits after SIGTERM before SIGKILL (default 5 s).
	ReadyTimeout, StopTimeout time.Duration
	// MinBackoff and MaxBackoff bound the delay before a restart (default
	// 200 ms and 30 s); it doubles while workers keep dying within a
	// minute of their start.
	MinBackoff, MaxBackoff time.Duration
}

// Supervisor is vsdpd in worker mode: it owns the host's SDP stack and the
// exports, and one worker process per VM, restarted when it dies.
type Supervisor struct {
	log      *logrus.Logger
	opts     SupervisorOptions
	dev      *soft.Device
	host     *sdp.Stack
	exporter *sdpback.Exporter
	workers  []*worker
	files    []string // endpoint files to remove at Close

	spawn     chan spawnReq
	spawnDone chan struct{}
	done      chan struct{}
	closeOnce sync.Once
	wg        sync.WaitGroup
}

// worker is one VM's process slot.
type worker struct {
	s       *Supervisor
	name    string
	conf    []byte // the JSON line handed over the pipe
	pidFile string

	mu   sync.Mutex // guards proc
	proc *os.Process
}

// spawnReq asks the spawner thread to start a command.
type spawnReq struct {
	cmd *exec.Cmd
	err chan error
}

// Worker mode's errors.
var (
	ErrWorker = errors.New("daemon: worker failed")     // a worker could not start
	ErrClosed = errors.New("daemon: supervisor closed") // the supervisor is stopping
)

// Supervise starts worker mode: the host stack and exports in this
// process, then one worker per VM. It returns once every worker is ready
// (its vhost-user sockets exist), so QEMU may be started right after.
func Supervise(cfg *Config, opts SupervisorOptions, log *logrus.Logger) (_ *Supervisor, err error) {
	if opts.Exe == "" {
		opts.Exe = "/proc/self/exe"
	}
	if opts.Args == nil {
		opts.Args = []string{"-worker"}
	}
	if opts.LogLevel == "" {
		opts.LogLevel = log.GetLevel().String()
	}
	setDur(&opts.ReadyTimeout, 10*time.Second)
	setDur(&opts.StopTimeout, 5*time.Second)
	setDur(&opts.MinBackoff, 200*time.Millisecond)
	setDur(&opts.MaxBackoff, 30*time.Second)
	if err := checkConfig(cfg); err != nil {
		return nil, err
	}
	if opts.RunDir == "" {
		if len(cfg.VMs) == 0 {
			return nil, errors.New("run directory: no -run-dir and no VM socket to put it beside")
		}
		opts.RunDir = filepath.Dir(cfg.VMs[0].Socket)
	}
	if err := os.MkdirAll(opts.RunDir, 0o750); err != nil {
		return nil, fmt.Errorf("run directory: %w", err)
	}
	s := &Supervisor{log: log, opts: opts, spawn: make(chan spawnReq), spawnDone: make(chan struct{}), done: make(chan struct{})}
	go s.spawner()
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	hostAddr := netip.MustParseAddr(cfg.Fabric.Addr) // checkConfig parsed it
	// The table every process shares: the host's address, each VM's
	// (its worker's endpoint), the other hosts'.
	tab := map[string]string{}
	self := cfg.Fabric.Listen
	if self == "" {
		self = "unix:" + filepath.Join(opts.RunDir, "vsdpd.fabric")
	}
	ep, err := soft.ParseEndpoint(self)
	if err != nil {
		return nil, err
	}
	if ep.Net == "unix" {
		if err := checkSocketPath(ep.Addr); err != nil {
			return nil, err
		}
		os.Remove(ep.Addr)
		s.files = append(s.files, ep.Addr)
	}
	listen := make([]string, len(cfg.VMs))
	for i, v := range cfg.VMs {
		listen[i] = v.Listen
		if listen[i] == "" {
			p := filepath.Join(opts.RunDir, v.Name+".fabric")
			if err := checkSocketPath(p); err != nil {
				return nil, fmt.Errorf("vm %q: %w", v.Name, err)
			}
			listen[i] = "unix:" + p
		}
		tab[v.Addr] = listen[i]
	}
	for a, e := range cfg.Fabric.Peers {
		tab[a] = e
	}
	table := soft.NewTable()
	for a, e := range tab {
		pe, err := soft.ParseEndpoint(e)
		if err != nil {
			return nil, err
		}
		if err := table.Set(netip.MustParseAddr(a), pe); err != nil {
			return nil, err
		}
	}
	if s.dev, err = soft.Open(soft.Options{Name: "soft0", Addrs: []netip.Addr{hostAddr}, Table: table, Listen: ep}); err != nil {
		return nil, err
	}
	if ep.Net == "unix" {
		if err := os.Chmod(ep.Addr, 0o600); err != nil {
			return nil, err
		}
	}
	hostEP := s.dev.Endpoint().String()
	if err := table.Set(hostAddr, s.dev.Endpoint()); err != nil {
		return nil, err
	}
	tab[cfg.Fabric.Addr] = hostEP
	if s.host, err = sdp.New(sdp.Config{Device: s.dev, Addr: hostAddr}); err != nil {
		return nil, err
	}
	s.exporter = sdpback.NewExporter(s.host)
	for _, x := range cfg.Exports {
		if err := s.exporter.Add(sdpback.Export{Port: x.Port, Target: x.Target}); err != nil {
			return nil, fmt.Errorf("export %d: %w", x.Port, err)
		}
		log.WithFields(logrus.Fields{"port": x.Port, "target": x.Target, "addr": hostAddr}).Info("export")
	}
	for i, v := range cfg.VMs {
		wc := workerConfig{Provider: cfg.Provider, VM: v, Listen: listen[i], Table: tab, LogLevel: opts.LogLevel, Stats: opts.Stats}
		b, err := json.Marshal(wc)
		if err != nil {
			return nil, err
		}
		w := &worker{s: s, name: v.Name, conf: append(b, '\n'), pidFile: filepath.Join(opts.RunDir, v.Name+".pid")}
		s.workers = append(s.workers, w)
		if p, ok := unixPath(listen[i]); ok {
			s.files = append(s.files, p)
		}
		s.files = append(s.files, v.Socket) // left behind by a killed worker
		if v.FSSocket != "" {
			s.files = append(s.files, v.FSSocket)
		}
		cmd, conn, err := w.start()
		if err != nil {
			return nil, fmt.Errorf("vm %q: %w", v.Name, err)
		}
		s.wg.Add(1)
		go w.supervise(cmd, conn)
	}
	return s, nil
}

// unixPath returns the path of a unix endpoint.
func unixPath(e string) (string, bool) {
	ep, err := soft.ParseEndpoint(e)
	if err != nil || ep.Net != "unix" {
		return "", false
	}
	return ep.Addr, true
}

func setDur(p *time.Duration, v time.Duration) {
	if *p <= 0 {
		*p = v
	}
}

// checkSocketPath refuses a Unix socket path the kernel cannot bind
// (sun_path holds 107 bytes and a NUL).
func checkSocketPath(p string) error {
	if len(p) > 107 {
		return fmt.Errorf("socket path %q is longer than 107 bytes", p)
	}
	return nil
}

// checkConfig validates what worker mode needs before any process starts:
// the one-process daemon finds the same errors as it builds, a supervisor
// must find them before it forks.
func checkConfig(cfg *Config) error {
	switch cfg.Provider {
	case "", "auto", "soft":
	default:
		return fmt.Errorf("provider %q: this build supports auto and soft", cfg.Provider)
	}
	host, err := netip.ParseAddr(cfg.Fabric.Addr)
	if err != nil {
		return fmt.Errorf("fabric.addr: %w", err)
	}
	if cfg.Touch != nil {
		return errors.New("config: Touch records cannot cross processes; use the one-process daemon")
	}
	addrs := map[netip.Addr]string{host: "fabric.addr"}
	for a, e := range cfg.Fabric.Peers {
		pa, err := netip.ParseAddr(a)
		if err != nil {
			return fmt.Errorf("fabric.peers: %w", err)
		}
		if _, err := soft.ParseEndpoint(e); err != nil {
			return fmt.Errorf("fabric.peers %s: %w", a, err)
		}
		addrs[pa] = "fabric.peers"
	}
	names := map[string]bool{}
	cids := map[uint64]bool{}
	for _, v := range cfg.VMs {
		if !validName(v.Name) {
			return fmt.Errorf("vm name %q: want 1-64 of [A-Za-z0-9._-], not starting with a dot", v.Name)
		}
		if names[v.Name] {
			return fmt.Errorf("vm %q: duplicate name", v.Name)
		}
		names[v.Name] = true
		if v.CID < 3 {
			return fmt.Errorf("vm %q: cid %d is reserved", v.Name, v.CID)
		}
		if cids[v.CID] {
			return fmt.Errorf("vm %q: duplicate cid %d", v.Name, v.CID)
		}
		cids[v.CID] = true
		a, err := netip.ParseAddr(v.Addr)
		if err != nil {
			return fmt.Errorf("vm %q addr: %w", v.Name, err)
		}
		if other, ok := addrs[a]; ok {
			return fmt.Errorf("vm %q addr %v: also %s", v.Name, a, other)
		}
		addrs[a] = "vm " + v.Name
		if v.Socket == "" {
			return fmt.Errorf("vm %q: no socket", v.Name)
		}
		for _, r := range v.Policy {
			if _, err := sdpback.ParseRule(r); err != nil {
				return fmt.Errorf("vm %q: %w", v.Name, err)
			}
		}
		if v.Listen != "" {
			e, err := soft.ParseEndpoint(v.Listen)
			if err != nil {
				return fmt.Errorf("vm %q listen: %w", v.Name, err)
			}
			if _, port, _ := net.SplitHostPort(e.Addr); e.Net != "unix" && (e.Net != "tcp" || port == "0") {
				return fmt.Errorf("vm %q listen %v: want unix:PATH or tcp:HOST:PORT with a fixed port (the table names it)", v.Name, e)
			}
		}
	}
	return nil
}

func validName(n string) bool {
	if n == "" || len(n) > 64 || n[0] == '.' {
		return false
	}
	for _, c := range n {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// spawner starts every worker from one OS thread that lives as long as the
// supervisor: the kernel sends a child its parent-death signal when the
// thread that forked it exits, not only the process.
func (s *Supervisor) spawner() {
	runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
	defer close(s.spawnDone)
	for r := range s.spawn {
		r.err <- r.cmd.Start()
	}
}

// start starts the worker, hands it its configuration and waits for its
// answer. On success the caller owns cmd (it must Wait) and conn (closing
// it tells the worker its supervisor is gone).
func (w *worker) start() (*exec.Cmd, net.Conn, error) {
	s := w.s
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	ours, theirs := os.NewFile(uintptr(fds[0]), "worker-pipe"), os.NewFile(uintptr(fds[1]), "supervisor-pipe")
	defer theirs.Close()
	conn, err := net.FileConn(ours)
	ours.Close()
	if err != nil {
		return nil, nil, err
	}
	cmd := exec.Command(s.opts.Exe, s.opts.Args...)
	cmd.ExtraFiles = []*os.File{theirs} // fd 3
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	r := spawnReq{cmd: cmd, err: make(chan error, 1)}
	select {
	case s.spawn <- r:
	case <-s.done:
		conn.Close()
		return nil, nil, ErrClosed
	}
	if err := <-r.err; err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("%w: start: %w", ErrWorker, err)
	}
	theirs.Close()
	w.mu.Lock()
	w.proc = cmd.Process
	w.mu.Unlock()
	fail := func(err error) (*exec.Cmd, net.Conn, error) {
		conn.Close()
		cmd.Process.Kill()
		cmd.Wait()
		w.mu.Lock()
		w.proc = nil
		w.mu.Unlock()
		return nil, nil, err
	}
	select {
	case <-s.done: // Close may have looked before proc was set
		return fail(ErrClosed)
	default:
	}
	conn.SetDeadline(time.Now().Add(s.opts.ReadyTimeout))
	if _, err := conn.Write(w.conf); err != nil {
		return fail(fmt.Errorf("%w: hand over the configuration: %w", ErrWorker, err))
	}
	line, err := bufio.NewReader(conn).ReadBytes('\n')
	if err != nil {
		return fail(fmt.Errorf("%w: no ready answer: %w", ErrWorker, err))
	}
	var rep workerReply
	if err := json.Unmarshal(line, &rep); err != nil {
		return fail(fmt.Errorf("%w: answer %q: %w", ErrWorker, line, err))
	}
	if !rep.Ready {
		return fail(fmt.Errorf("%w: %s", ErrWorker, rep.Error))
	}
	conn.SetDeadline(time.Time{})
	pid := cmd.Process.Pid
	tmp := w.pidFile + ".tmp"
	if err := os.WriteFile(tmp, []byte(strconv.Itoa(pid)+"\n"), 0o644); err == nil {
		os.Rename(tmp, w.pidFile)
	}
	s.log.WithFields(logrus.Fields{"vm": w.name, "pid": pid}).Info("worker started")
	return cmd, conn, nil
}

// supervise waits for the worker to exit and restarts it with backoff
// until the supervisor closes.
func (w *worker) supervise(cmd *exec.Cmd, conn net.Conn) {
	defer w.s.wg.Done()
	s := w.s
	backoff := s.opts.MinBackoff
	for {
		began := time.Now()
		err := cmd.Wait()
		conn.Close()
		os.Remove(w.pidFile)
		w.mu.Lock()
		w.proc = nil
		w.mu.Unlock()
		select {
		case <-s.done:
			s.log.WithFields(logrus.Fields{"vm": w.name, "pid": cmd.Process.Pid, "status": cmd.ProcessState.String()}).Info("worker stopped")
			return
		default:
		}
		if time.Since(began) > time.Minute {
			backoff = s.opts.MinBackoff
		}
		l := s.log.WithFields(logrus.Fields{"vm": w.name, "pid": cmd.Process.Pid, "status": cmd.ProcessState.String(), "restart_in": backoff})
		if err != nil {
			l = l.WithError(err)
		}
		l.Error("worker exited; the VM's current QEMU devices are dead, a restarted worker serves a new QEMU")
		for {
			select {
			case <-s.done:
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, s.opts.MaxBackoff)
			cmd, conn, err = w.start()
			if err == nil {
				break
			}
			if errors.Is(err, ErrClosed) {
				return
			}
			s.log.WithFields(logrus.Fields{"vm": w.name, "restart_in": backoff}).WithError(err).Error("worker restart failed")
		}
	}
}

// signal sends sig to the worker's current process, if any.
func (w *worker) signal(sig os.Signal) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.proc != nil {
		w.proc.Signal(sig)
	}
}

// PIDs returns each VM's current worker process ID (0 while it has none).
func (s *Supervisor) PIDs() map[string]int {
	m := map[string]int{}
	for _, w := range s.workers {
		w.mu.Lock()
		if w.proc != nil {
			m[w.name] = w.proc.Pid
		} else {
			m[w.name] = 0
		}
		w.mu.Unlock()
	}
	return m
}

// HostStack returns the SDP stack on the host's own fabric address.
func (s *Supervisor) HostStack() *sdp.Stack { return s.host }

// Exporter returns the exports server.
func (s *Supervisor) Exporter() *sdpback.Exporter { return s.exporter }

// Close stops the workers (SIGTERM, then SIGKILL after StopTimeout), waits
// for them, then closes the exports and the host stack. It is idempotent.
func (s *Supervisor) Close() {
	s.closeOnce.Do(func() {
		close(s.done)
		for _, w := range s.workers {
			w.signal(syscall.SIGTERM)
		}
		stopped := make(chan struct{})
		go func() { s.wg.Wait(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(s.opts.StopTimeout):
			for _, w := range s.workers {
				w.mu.Lock()
				if w.proc != nil {
					s.log.WithFields(logrus.Fields{"vm": w.name, "pid": w.proc.Pid}).Warn("worker ignored SIGTERM; killing it")
				}
				w.mu.Unlock()
				w.signal(syscall.SIGKILL)
			}
			<-stopped
		}
		close(s.spawn)
		<-s.spawnDone
		if s.exporter != nil {
			s.exporter.Close()
		}
		if s.host != nil {
			s.host.Close()
		}
		if s.dev != nil {
			s.dev.Close()
		}
		for _, f := range s.files {
			os.Remove(f)
		}
	})
}
