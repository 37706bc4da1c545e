package daemon

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
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
	// (vsdpd.fabric, NAME.fabric), each worker's PID file (NAME.pid,
	// written once the worker is ready, removed when it exits) and the
	// control socket. Default: the directory of the first VM's socket.
	RunDir string
	// Control is the control socket's path (default RUNDIR/vsdpd.ctl;
	// "none": no control socket). See control.go for its protocol.
	Control string
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
// exports, and one worker process per VM, restarted when it dies. VMs may
// be added and removed while it runs (Add, Remove, or the control socket).
type Supervisor struct {
	log      *logrus.Logger
	opts     SupervisorOptions
	cfg      Config // provider and fabric; the VMs live in workers
	hostAddr netip.Addr
	hostEP   string // the supervisor's own soft endpoint
	dev      *soft.Device
	table    *soft.Table // the supervisor's device's table
	host     *sdp.Stack
	exporter *sdpback.Exporter
	files    []string // the supervisor's own files, removed at Close
	ctl      *controlServer
	// fabricGID is WorkerGroup's gid (-1 without one): the fabric's unix
	// endpoints are 0660 for it, and workers with a uid run in it.
	fabricGID int

	opMu    sync.Mutex // serializes Add and Remove; taken before mu
	mu      sync.Mutex // guards workers and tab; taken before worker.mu
	workers []*worker
	tab     map[string]string // every fabric address → endpoint (what workers get)

	spawn     chan spawnReq
	spawnDone chan struct{}
	done      chan struct{}
	closeOnce sync.Once
	wg        sync.WaitGroup // worker goroutines (supervise, pipe readers)
}

// Worker states, as List reports them.
const (
	StateStarting   = "starting"   // its process is starting, not ready yet
	StateRunning    = "running"    // ready: its sockets exist
	StateRestarting = "restarting" // its process exited; a new one comes after a backoff
	StateStopping   = "stopping"   // being removed
)

// worker is one VM's process slot.
type worker struct {
	s       *Supervisor
	vm      VMConfig
	listen  string // its soft endpoint
	pidFile string
	stop    chan struct{} // closed by Remove: no more restarts
	exited  chan struct{} // closed when its supervise goroutine returns

	mu       sync.Mutex // guards the fields below
	proc     *os.Process
	pipe     net.Conn // the current process's pipe, once it is ready and synced
	state    string
	restarts int
	stats    chan statsReply // answers to stats requests (one slot)
	seq      uint64          // the last stats request's sequence number
}

// spawnReq asks the spawner thread to start a command.
type spawnReq struct {
	cmd *exec.Cmd
	err chan error
}

// Worker mode's errors.
var (
	ErrWorker  = errors.New("daemon: worker failed")     // a worker could not start
	ErrClosed  = errors.New("daemon: supervisor closed") // the supervisor is stopping
	ErrNoVM    = errors.New("daemon: no such VM")        // Remove names no VM
	ErrInvalid = errors.New("daemon: invalid VM")        // Add's VM fails validation
)

// Supervise starts worker mode: the host stack and exports in this
// process, then one worker per VM, then the control socket. It returns
// once every worker is ready (its vhost-user sockets exist), so QEMU may
// be started right after.
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
	if opts.Control == "" {
		opts.Control = filepath.Join(opts.RunDir, "vsdpd.ctl")
	}
	if err := os.MkdirAll(opts.RunDir, 0o750); err != nil {
		return nil, fmt.Errorf("run directory: %w", err)
	}
	s := &Supervisor{log: log, opts: opts, spawn: make(chan spawnReq), spawnDone: make(chan struct{}), done: make(chan struct{}),
		cfg: Config{Provider: cfg.Provider, Fabric: cfg.Fabric, Sandbox: cfg.Sandbox, WorkerGroup: cfg.WorkerGroup}, tab: map[string]string{}, table: soft.NewTable()}
	s.hostAddr = netip.MustParseAddr(cfg.Fabric.Addr) // checkConfig parsed it
	s.fabricGID, _ = socketGroup(cfg.WorkerGroup)     // checkConfig resolved it
	go s.spawner()
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	// The table every process shares: the host's address, each VM's
	// (its worker's endpoint), the other hosts'.
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
	for _, v := range cfg.VMs {
		listen, err := s.listenOf(v)
		if err != nil {
			return nil, fmt.Errorf("vm %q: %w", v.Name, err)
		}
		s.workers = append(s.workers, s.newWorker(v, listen))
		s.tab[v.Addr] = listen
	}
	for a, e := range cfg.Fabric.Peers {
		s.tab[a] = e
	}
	for a, e := range s.tab {
		pe, err := soft.ParseEndpoint(e)
		if err != nil {
			return nil, err
		}
		if err := s.table.Set(netip.MustParseAddr(a), pe); err != nil {
			return nil, err
		}
	}
	if s.dev, err = soft.Open(soft.Options{Name: "soft0", Addrs: []netip.Addr{s.hostAddr}, Table: s.table, Listen: ep}); err != nil {
		return nil, err
	}
	if ep.Net == "unix" {
		if err := s.shareEndpoint(ep.Addr); err != nil {
			return nil, err
		}
	}
	s.hostEP = s.dev.Endpoint().String()
	if err := s.table.Set(s.hostAddr, s.dev.Endpoint()); err != nil {
		return nil, err
	}
	s.tab[cfg.Fabric.Addr] = s.hostEP
	if s.host, err = sdp.New(sdp.Config{Device: s.dev, Addr: s.hostAddr}); err != nil {
		return nil, err
	}
	s.exporter = sdpback.NewExporter(s.host)
	for _, x := range cfg.Exports {
		if err := s.exporter.Add(sdpback.Export{Port: x.Port, Target: x.Target}); err != nil {
			return nil, fmt.Errorf("export %d: %w", x.Port, err)
		}
		log.WithFields(logrus.Fields{"port": x.Port, "target": x.Target, "addr": s.hostAddr}).Info("export")
	}
	for _, w := range s.workers {
		s.wg.Add(1)
		cmd, conn, err := w.start()
		if err != nil {
			s.wg.Done()
			close(w.exited)
			return nil, fmt.Errorf("vm %q: %w", w.vm.Name, err)
		}
		go w.supervise(cmd, conn)
	}
	if opts.Control != "none" {
		if s.ctl, err = listenControl(s, opts.Control); err != nil {
			return nil, fmt.Errorf("control socket: %w", err)
		}
		s.files = append(s.files, opts.Control)
	}
	return s, nil
}

// newWorker makes a VM's process slot (not started).
func (s *Supervisor) newWorker(v VMConfig, listen string) *worker {
	return &worker{s: s, vm: v, listen: listen, pidFile: filepath.Join(s.opts.RunDir, v.Name+".pid"),
		stop: make(chan struct{}), exited: make(chan struct{}), state: StateStarting, stats: make(chan statsReply, 1)}
}

// listenOf returns a VM's worker endpoint: its listen, or
// unix:RUNDIR/NAME.fabric.
func (s *Supervisor) listenOf(v VMConfig) (string, error) {
	if v.Listen != "" {
		return v.Listen, nil
	}
	p := filepath.Join(s.opts.RunDir, v.Name+".fabric")
	if err := checkSocketPath(p); err != nil {
		return "", err
	}
	return "unix:" + p, nil
}

// files returns the files a worker leaves behind: its endpoint, its
// sockets (a killed worker cannot remove them) and its PID file.
func (w *worker) files() []string {
	var fs []string
	if p, ok := unixPath(w.listen); ok {
		fs = append(fs, p)
	}
	fs = append(fs, w.vm.Socket, w.pidFile)
	if w.vm.FSSocket != "" {
		fs = append(fs, w.vm.FSSocket)
	}
	return fs
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
	switch cfg.Sandbox {
	case "", "on", "off":
	default:
		return fmt.Errorf("sandbox %q: want on or off", cfg.Sandbox)
	}
	if _, err := socketGroup(cfg.WorkerGroup); err != nil {
		return fmt.Errorf("worker_group: %w", err)
	}
	uids := map[int]string{}
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
	paths := map[string]string{} // socket paths and unix endpoints, to the VM using them
	usePath := func(vm, what, p string) error {
		p = filepath.Clean(p)
		if other, ok := paths[p]; ok {
			return fmt.Errorf("vm %q %s %s: also %s", vm, what, p, other)
		}
		paths[p] = "vm " + vm
		return nil
	}
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
		if !a.Is4() {
			return fmt.Errorf("vm %q addr %v: not an IPv4 fabric address", v.Name, a)
		}
		if other, ok := addrs[a]; ok {
			return fmt.Errorf("vm %q addr %v: also %s", v.Name, a, other)
		}
		addrs[a] = "vm " + v.Name
		if v.Socket == "" {
			return fmt.Errorf("vm %q: no socket", v.Name)
		}
		if err := usePath(v.Name, "socket", v.Socket); err != nil {
			return err
		}
		if v.FSSocket != "" {
			if err := usePath(v.Name, "fs_socket", v.FSSocket); err != nil {
				return err
			}
		}
		for _, r := range v.Policy {
			if _, err := sdpback.ParseRule(r); err != nil {
				return fmt.Errorf("vm %q: %w", v.Name, err)
			}
		}
		if err := checkUID(cfg, v, uids); err != nil {
			return err
		}
		if v.Listen != "" {
			e, err := soft.ParseEndpoint(v.Listen)
			if err != nil {
				return fmt.Errorf("vm %q listen: %w", v.Name, err)
			}
			if _, port, _ := net.SplitHostPort(e.Addr); e.Net != "unix" && (e.Net != "tcp" || port == "0") {
				return fmt.Errorf("vm %q listen %v: want unix:PATH or tcp:HOST:PORT with a fixed port (the table names it)", v.Name, e)
			}
			if e.Net == "unix" {
				if err := usePath(v.Name, "listen", e.Addr); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// checkUID checks a VM's uid: none, or a uid of its own (not root, not
// vsdpd's, no other VM's) with a worker_group, under a vsdpd running as
// root (only root can start a process as another user).
func checkUID(cfg *Config, v VMConfig, uids map[int]string) error {
	switch {
	case v.UID == 0:
		return nil
	case v.UID < 0 || v.UID > 1<<31-2:
		return fmt.Errorf("vm %q: uid %d", v.Name, v.UID)
	case v.UID == os.Geteuid():
		return fmt.Errorf("vm %q: uid %d is vsdpd's own", v.Name, v.UID)
	case cfg.WorkerGroup == "":
		return fmt.Errorf("vm %q: uid needs a worker_group", v.Name)
	case os.Geteuid() != 0:
		return fmt.Errorf("vm %q: uid needs vsdpd to run as root", v.Name)
	}
	if other, ok := uids[v.UID]; ok {
		return fmt.Errorf("vm %q: uid %d is also vm %s's", v.Name, v.UID, other)
	}
	uids[v.UID] = v.Name
	return nil
}

// shareEndpoint gives a fabric endpoint the supervisor or a worker serves
// its mode: 0600, or 0660 for the worker group.
func (s *Supervisor) shareEndpoint(path string) error {
	if s.fabricGID < 0 {
		return os.Chmod(path, 0o600)
	}
	if err := os.Chown(path, -1, s.fabricGID); err != nil {
		return err
	}
	return os.Chmod(path, 0o660)
}

// handOver creates a worker's listeners as files to pass to it, with the
// names the worker config gives them: its vhost-user sockets when it runs
// under a uid of its own (they stay vsdpd's), and its unix fabric endpoint
// when there is a worker group (0660 for the group, so workers under other
// uids reach it). The caller closes the files once the worker started.
func (s *Supervisor) handOver(w *worker) (files []*os.File, names map[string]int, err error) {
	names = map[string]int{}
	defer func() {
		if err != nil {
			closeFiles(files)
			files = nil
		}
	}()
	add := func(name string, ln net.Listener) error {
		ul, ok := ln.(*net.UnixListener)
		if !ok {
			ln.Close()
			return fmt.Errorf("%s: not a unix listener", name)
		}
		ul.SetUnlinkOnClose(false) // the path stays for the worker's copy
		f, err := ul.File()
		ul.Close()
		if err != nil {
			return err
		}
		names[name] = firstHandedFD + len(files)
		files = append(files, f)
		return nil
	}
	gid, err := socketGroup(w.vm.SocketGroup)
	if err != nil {
		return nil, nil, err
	}
	for _, p := range []struct{ name, path string }{{"socket", w.vm.Socket}, {"fs_socket", w.vm.FSSocket}} {
		if p.path == "" || w.vm.UID == 0 {
			continue
		}
		ln, err := listenUnix(p.path, gid)
		if err != nil {
			return nil, nil, err
		}
		if err := add(p.name, ln); err != nil {
			return nil, nil, err
		}
	}
	if p, ok := unixPath(w.listen); ok && s.fabricGID >= 0 {
		os.Remove(p)
		ln, err := net.Listen("unix", p)
		if err != nil {
			return nil, nil, err
		}
		if err := s.shareEndpoint(p); err != nil {
			ln.Close()
			return nil, nil, err
		}
		if err := add("listen", ln); err != nil {
			return nil, nil, err
		}
	}
	return files, names, nil
}

func closeFiles(fs []*os.File) {
	for _, f := range fs {
		f.Close()
	}
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

// stopping reports whether the worker must not run again: the supervisor
// is closing or Remove took the VM away.
func (w *worker) stopping() bool {
	select {
	case <-w.s.done:
		return true
	case <-w.stop:
		return true
	default:
		return false
	}
}

// start starts the worker, hands it its configuration, waits for its
// answer and then syncs its fabric table (updates may have come while it
// started). On success the caller owns cmd (it must Wait) and conn
// (closing it tells the worker its supervisor is gone). The caller holds
// a count on s.wg: start adds one for the pipe's reader.
func (w *worker) start() (*exec.Cmd, net.Conn, error) {
	s := w.s
	s.mu.Lock()
	wc := workerConfig{Provider: s.cfg.Provider, Sandbox: s.cfg.Sandbox != "off", VM: w.vm, Listen: w.listen, Table: maps.Clone(s.tab), LogLevel: s.opts.LogLevel, Stats: s.opts.Stats}
	s.mu.Unlock()
	var handed []*os.File
	if w.vm.UID != 0 || s.fabricGID >= 0 {
		var err error
		if handed, wc.Handed, err = s.handOver(w); err != nil {
			return nil, nil, fmt.Errorf("%w: sockets: %w", ErrWorker, err)
		}
		defer closeFiles(handed) // the worker has its copies once started
	}
	conf, err := json.Marshal(wc)
	if err != nil {
		return nil, nil, err
	}
	conf = append(conf, '\n')
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
	cmd.ExtraFiles = append([]*os.File{theirs}, handed...) // fd 3, then firstHandedFD…
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if w.vm.UID != 0 {
		// Go sets the parent-death signal after the switch of user, which
		// would otherwise clear it.
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: uint32(w.vm.UID), Gid: uint32(s.fabricGID), Groups: []uint32{}}
	}
	r := spawnReq{cmd: cmd, err: make(chan error, 1)}
	select {
	case s.spawn <- r:
	case <-s.done:
		conn.Close()
		return nil, nil, ErrClosed
	case <-w.stop:
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
	if w.state != StateStopping {
		w.state = StateStarting
	}
	w.mu.Unlock()
	fail := func(err error) (*exec.Cmd, net.Conn, error) {
		conn.Close()
		cmd.Process.Kill()
		cmd.Wait()
		w.mu.Lock()
		w.proc, w.pipe = nil, nil
		w.mu.Unlock()
		return nil, nil, err
	}
	if w.stopping() { // Close or Remove may have looked before proc was set
		return fail(ErrClosed)
	}
	conn.SetDeadline(time.Now().Add(s.opts.ReadyTimeout))
	if _, err := conn.Write(conf); err != nil {
		return fail(fmt.Errorf("%w: hand over the configuration: %w", ErrWorker, err))
	}
	br := bufio.NewReaderSize(conn, maxWorkerLine)
	line, err := br.ReadSlice('\n')
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
	// From here on every table change reaches this worker: the sync below
	// and the registered pipe happen under s.mu, as broadcasts do.
	s.mu.Lock()
	w.mu.Lock()
	conn.SetDeadline(time.Now().Add(updateTimeout))
	err = writeUpdate(conn, workerUpdate{Table: s.tab})
	conn.SetDeadline(time.Time{})
	if err == nil {
		w.pipe = conn
		if w.state != StateStopping {
			w.state = StateRunning
		}
	}
	w.mu.Unlock()
	s.mu.Unlock()
	if err != nil {
		return fail(fmt.Errorf("%w: sync the fabric table: %w", ErrWorker, err))
	}
	pid := cmd.Process.Pid
	tmp := w.pidFile + ".tmp"
	if err := os.WriteFile(tmp, []byte(strconv.Itoa(pid)+"\n"), 0o644); err == nil {
		os.Rename(tmp, w.pidFile)
	}
	s.wg.Add(1)
	go w.read(br)
	s.log.WithFields(logrus.Fields{"vm": w.vm.Name, "pid": pid}).Info("worker started")
	return cmd, conn, nil
}

// read takes the worker's answers to stats requests off its pipe until the
// pipe closes. A worker is not trusted: lines are bounded, anything but a
// well-formed answer is dropped.
func (w *worker) read(br *bufio.Reader) {
	defer w.s.wg.Done()
	for {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			for errors.Is(err, bufio.ErrBufferFull) { // skip the rest of an oversized line
				_, err = br.ReadSlice('\n')
			}
			continue
		}
		if err != nil {
			return
		}
		var r statsReply
		if json.Unmarshal(line, &r) != nil || r.Seq == 0 {
			continue
		}
		select {
		case w.stats <- r:
		default: // nobody asked for this one
		}
	}
}

// send writes an update to the worker's pipe, if it has one. The caller
// holds s.mu. A worker that does not read its pipe within updateTimeout
// misses the update (it hurts only its own VM) and is logged.
func (w *worker) send(u workerUpdate) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.pipe == nil {
		return // not ready yet: start syncs its whole table
	}
	w.pipe.SetWriteDeadline(time.Now().Add(updateTimeout))
	err := writeUpdate(w.pipe, u)
	w.pipe.SetWriteDeadline(time.Time{})
	if err != nil {
		w.s.log.WithField("vm", w.vm.Name).WithError(err).Error("fabric table update not delivered to the worker")
	}
}

// broadcast sends an update to every worker but skip. The caller holds
// s.mu.
func (s *Supervisor) broadcast(u workerUpdate, skip *worker) {
	for _, w := range s.workers {
		if w != skip {
			w.send(u)
		}
	}
}

// supervise waits for the worker to exit and restarts it with backoff
// until the supervisor closes or the VM is removed.
func (w *worker) supervise(cmd *exec.Cmd, conn net.Conn) {
	defer w.s.wg.Done()
	defer close(w.exited)
	s := w.s
	backoff := s.opts.MinBackoff
	for {
		began := time.Now()
		err := cmd.Wait()
		conn.Close()
		os.Remove(w.pidFile)
		w.mu.Lock()
		w.proc, w.pipe = nil, nil
		if w.state != StateStopping {
			w.state = StateRestarting
		}
		w.mu.Unlock()
		if w.stopping() {
			s.log.WithFields(logrus.Fields{"vm": w.vm.Name, "pid": cmd.Process.Pid, "status": cmd.ProcessState.String()}).Info("worker stopped")
			return
		}
		if time.Since(began) > time.Minute {
			backoff = s.opts.MinBackoff
		}
		l := s.log.WithFields(logrus.Fields{"vm": w.vm.Name, "pid": cmd.Process.Pid, "status": cmd.ProcessState.String(), "restart_in": backoff})
		if err != nil {
			l = l.WithError(err)
		}
		l.Error("worker exited; the VM's current QEMU devices are dead, a restarted worker serves a new QEMU")
		for {
			select {
			case <-s.done:
				return
			case <-w.stop:
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, s.opts.MaxBackoff)
			cmd, conn, err = w.start()
			if err == nil {
				w.mu.Lock()
				w.restarts++
				w.mu.Unlock()
				break
			}
			if errors.Is(err, ErrClosed) {
				return
			}
			s.log.WithFields(logrus.Fields{"vm": w.vm.Name, "restart_in": backoff}).WithError(err).Error("worker restart failed")
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

// pid returns the worker's current process ID (0 while it has none).
func (w *worker) pid() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.proc == nil {
		return 0
	}
	return w.proc.Pid
}

// isWorkerPID says whether pid is one of the workers' current processes.
func (s *Supervisor) isWorkerPID(pid int) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, w := range s.workers {
		if w.pid() == pid {
			return true
		}
	}
	return false
}

// PIDs returns each VM's current worker process ID (0 while it has none).
func (s *Supervisor) PIDs() map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := map[string]int{}
	for _, w := range s.workers {
		m[w.vm.Name] = w.pid()
	}
	return m
}

// HostStack returns the SDP stack on the host's own fabric address.
func (s *Supervisor) HostStack() *sdp.Stack { return s.host }

// Exporter returns the exports server.
func (s *Supervisor) Exporter() *sdpback.Exporter { return s.exporter }

// Close stops the control socket and the workers (SIGTERM, then SIGKILL
// after StopTimeout), waits for them, then closes the exports and the host
// stack. It is idempotent.
func (s *Supervisor) Close() {
	s.closeOnce.Do(func() {
		close(s.done)
		if s.ctl != nil {
			s.ctl.close() // no new requests; running ones see done
		}
		s.mu.Lock()
		workers := slices.Clone(s.workers)
		s.mu.Unlock()
		for _, w := range workers {
			w.signal(syscall.SIGTERM)
		}
		stopped := make(chan struct{})
		go func() { s.wg.Wait(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(s.opts.StopTimeout):
			for _, w := range workers {
				if pid := w.pid(); pid != 0 {
					s.log.WithFields(logrus.Fields{"vm": w.vm.Name, "pid": pid}).Warn("worker ignored SIGTERM; killing it")
				}
				w.signal(syscall.SIGKILL)
			}
			<-stopped
		}
		if s.ctl != nil {
			s.ctl.wait() // an Add in flight has failed by now
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
		s.mu.Lock()
		for _, w := range s.workers {
			for _, f := range w.files() {
				os.Remove(f)
			}
		}
		s.mu.Unlock()
	})
}
