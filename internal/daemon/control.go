package daemon

// The control socket: a cloud host agent adds, removes and lists VMs at
// run time (worker mode only).
//
// Protocol: a Unix stream socket (mode 0600, in the run directory); the
// client writes one JSON request per line and reads one JSON reply per
// line, in order:
//
//	{"op":"list"}                      → {"ok":true,"vms":[VMStatus...]}
//	{"op":"add","vm":{VMConfig}}       → {"ok":true} once its sockets exist
//	{"op":"remove","name":"web1"}      → {"ok":true} once its worker is gone
//	{"op":"stats"}                     → {"ok":true,"stats":[VMCounters...]}
//	anything refused                   → {"ok":false,"error":"..."}
//
// Whoever can connect administers every VM (adds a VM with any policy,
// removes any VM): the socket's mode and directory are the access
// control. The client is still not allowed to crash or wedge the
// supervisor: lines are bounded (maxControlLine; a longer one is answered
// with an error and the connection closed), requests are rate-limited per
// connection, connections are limited in number, unknown fields and
// operations are errors, and an added VM is validated by the same rules
// as the configuration file's entries.

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vsdp/vsdp/sdpback"
	"github.com/vsdp/vsdp/verbs/soft"
)

// Control socket limits.
const (
	maxControlLine  = 64 << 10 // bytes in one request line
	maxControlConns = 16       // connections served at once
	controlBurst    = 20       // requests a connection may send at once,
	controlRate     = 20       // and per second after that
	controlWrite    = 5 * time.Second
	statsTimeout    = time.Second // a worker's answer to a stats request
)

// ErrRequest is the error for a control request that cannot be decoded
// or does not make sense.
var ErrRequest = errors.New("daemon: bad control request")

// ControlRequest is one control socket request.
type ControlRequest struct {
	// Op is "list", "add", "remove" or "stats".
	Op   string    `json:"op"`
	VM   *VMConfig `json:"vm,omitempty"`   // add
	Name string    `json:"name,omitempty"` // remove
}

// ControlReply is the answer to one request.
type ControlReply struct {
	OK    bool         `json:"ok"`
	Error string       `json:"error,omitempty"`
	VMs   []VMStatus   `json:"vms,omitempty"`   // list
	Stats []VMCounters `json:"stats,omitempty"` // stats
}

// VMStatus is one VM as List reports it.
type VMStatus struct {
	Name     string `json:"name"`
	CID      uint64 `json:"cid"`
	Addr     string `json:"addr"`
	Socket   string `json:"socket"`
	FSSocket string `json:"fs_socket,omitempty"`
	Listen   string `json:"listen"` // its worker's fabric endpoint
	PID      int    `json:"pid"`    // 0 while it has no process
	Restarts int    `json:"restarts"`
	State    string `json:"state"` // StateStarting, StateRunning, ...
}

// VMCounters are one VM's counters, as its worker reported them.
type VMCounters struct {
	Name     string          `json:"name"`
	Counters sdpback.VMStats `json:"counters"`
	Error    string          `json:"error,omitempty"` // the worker did not answer
}

// parseRequest decodes and checks one request line: exactly one JSON
// object, no unknown fields, the arguments its operation takes.
func parseRequest(line []byte) (ControlRequest, error) {
	var r ControlRequest
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		return ControlRequest{}, fmt.Errorf("%w: %w", ErrRequest, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return ControlRequest{}, fmt.Errorf("%w: data after the request", ErrRequest)
	}
	switch r.Op {
	case "list", "stats":
		if r.VM != nil || r.Name != "" {
			return ControlRequest{}, fmt.Errorf("%w: %s takes no vm or name", ErrRequest, r.Op)
		}
	case "add":
		if r.VM == nil || r.Name != "" {
			return ControlRequest{}, fmt.Errorf("%w: add takes a vm, and no name", ErrRequest)
		}
	case "remove":
		if r.VM != nil || !validName(r.Name) {
			return ControlRequest{}, fmt.Errorf("%w: remove takes a VM name, and no vm", ErrRequest)
		}
	default:
		return ControlRequest{}, fmt.Errorf("%w: unknown op %q (want list, add, remove or stats)", ErrRequest, r.Op)
	}
	return r, nil
}

// checkAdd validates a VM to add to those running, by the configuration
// file's rules (checkConfig, the new VM last, so its errors name it).
func checkAdd(cfg Config, vms []VMConfig, v VMConfig) error {
	c := cfg
	c.VMs = append(slices.Clone(vms), v)
	if err := checkConfig(&c); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	return nil
}

// List returns the VMs, in the order they were configured or added.
func (s *Supervisor) List() []VMStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]VMStatus, 0, len(s.workers))
	for _, w := range s.workers {
		w.mu.Lock()
		st := VMStatus{Name: w.vm.Name, CID: w.vm.CID, Addr: w.vm.Addr, Socket: w.vm.Socket, FSSocket: w.vm.FSSocket,
			Listen: w.listen, Restarts: w.restarts, State: w.state}
		if w.proc != nil {
			st.PID = w.proc.Pid
		}
		w.mu.Unlock()
		out = append(out, st)
	}
	return out
}

// lockOpen takes s.mu unless the supervisor is closing; it reports
// whether it did.
func (s *Supervisor) lockOpen() bool {
	s.mu.Lock()
	select {
	case <-s.done:
		s.mu.Unlock()
		return false
	default:
		return true
	}
}

// Add validates a VM and starts its worker; it returns once the worker is
// ready (its sockets exist) or failed (then nothing of it is left). The
// supervisor, every other worker, and the new one learn its fabric
// address before it starts.
func (s *Supervisor) Add(v VMConfig) error {
	s.opMu.Lock()
	defer s.opMu.Unlock()
	if !s.lockOpen() {
		return ErrClosed
	}
	vms := make([]VMConfig, 0, len(s.workers))
	used := map[string]bool{}
	for _, f := range s.files {
		used[filepath.Clean(f)] = true
	}
	for _, w := range s.workers {
		vms = append(vms, w.vm)
		for _, f := range w.files() {
			used[filepath.Clean(f)] = true
		}
	}
	if err := checkAdd(s.cfg, vms, v); err != nil {
		s.mu.Unlock()
		return err
	}
	listen, err := s.listenOf(v)
	var ep soft.Endpoint
	if err == nil {
		ep, err = soft.ParseEndpoint(listen)
	}
	if err != nil {
		s.mu.Unlock()
		return fmt.Errorf("%w: vm %q: %w", ErrInvalid, v.Name, err)
	}
	w := s.newWorker(v, listen)
	for _, f := range w.files() {
		if used[filepath.Clean(f)] {
			s.mu.Unlock()
			return fmt.Errorf("%w: vm %q: path %s is in use", ErrInvalid, v.Name, f)
		}
	}
	addr := netip.MustParseAddr(v.Addr) // checkConfig parsed it
	if err := s.table.Set(addr, ep); err != nil {
		s.mu.Unlock()
		return fmt.Errorf("%w: vm %q: %w", ErrInvalid, v.Name, err)
	}
	s.workers = append(s.workers, w)
	s.tab[v.Addr] = listen
	s.broadcast(workerUpdate{Set: map[string]string{v.Addr: listen}}, w)
	s.wg.Add(1) // before Close can wait: done was open under s.mu
	s.mu.Unlock()

	cmd, conn, err := w.start()
	if err != nil {
		s.wg.Done()
		close(w.exited)
		s.mu.Lock()
		s.forget(w)
		s.mu.Unlock()
		for _, f := range w.files() {
			os.Remove(f)
		}
		return fmt.Errorf("vm %q: %w", v.Name, err)
	}
	go w.supervise(cmd, conn)
	s.log.WithField("vm", v.Name).WithField("pid", cmd.Process.Pid).Info("vm added")
	return nil
}

// forget drops a worker and its address from the supervisor and tells
// the other workers. The caller holds s.mu.
func (s *Supervisor) forget(w *worker) {
	s.workers = slices.DeleteFunc(s.workers, func(x *worker) bool { return x == w })
	if s.tab[w.vm.Addr] == w.listen {
		delete(s.tab, w.vm.Addr)
		s.table.Delete(netip.MustParseAddr(w.vm.Addr))
		s.broadcast(workerUpdate{Delete: []string{w.vm.Addr}}, w)
	}
}

// Remove stops a VM's worker (SIGTERM, SIGKILL after StopTimeout) for
// good and removes its sockets and files. Every other process forgets its
// fabric address first.
func (s *Supervisor) Remove(name string) error {
	s.opMu.Lock()
	defer s.opMu.Unlock()
	if !s.lockOpen() {
		return ErrClosed
	}
	i := slices.IndexFunc(s.workers, func(w *worker) bool { return w.vm.Name == name })
	if i < 0 {
		s.mu.Unlock()
		return fmt.Errorf("%w: %q", ErrNoVM, name)
	}
	w := s.workers[i]
	if s.tab[w.vm.Addr] == w.listen {
		delete(s.tab, w.vm.Addr)
		s.table.Delete(netip.MustParseAddr(w.vm.Addr))
		s.broadcast(workerUpdate{Delete: []string{w.vm.Addr}}, w)
	}
	w.mu.Lock()
	w.state = StateStopping
	w.mu.Unlock()
	s.mu.Unlock()

	close(w.stop)
	pid := w.pid()
	w.signal(syscall.SIGTERM)
	select {
	case <-w.exited:
	case <-time.After(s.opts.StopTimeout):
		s.log.WithFields(logrus.Fields{"vm": name, "pid": w.pid()}).Warn("worker ignored SIGTERM; killing it")
		w.signal(syscall.SIGKILL)
		<-w.exited
	}
	s.mu.Lock()
	s.workers = slices.DeleteFunc(s.workers, func(x *worker) bool { return x == w })
	s.mu.Unlock()
	for _, f := range w.files() {
		os.Remove(f)
	}
	s.log.WithFields(logrus.Fields{"vm": name, "pid": pid}).Info("vm removed")
	return nil
}

// Stats asks every ready worker for its VM's counters (statsTimeout for
// all of them together); a worker that does not answer gets an Error.
func (s *Supervisor) Stats() []VMCounters {
	s.mu.Lock()
	workers := slices.Clone(s.workers)
	s.mu.Unlock()
	seqs := make([]uint64, len(workers))
	out := make([]VMCounters, len(workers))
	for i, w := range workers {
		out[i].Name = w.vm.Name
		w.mu.Lock()
		if w.pipe == nil {
			out[i].Error = "no ready worker"
			w.mu.Unlock()
			continue
		}
		w.seq++
		seqs[i] = w.seq
		select {
		case <-w.stats: // a late answer to an earlier request
		default:
		}
		w.pipe.SetWriteDeadline(time.Now().Add(updateTimeout))
		err := writeUpdate(w.pipe, workerUpdate{Stats: w.seq})
		w.pipe.SetWriteDeadline(time.Time{})
		w.mu.Unlock()
		if err != nil {
			out[i].Error = err.Error()
			seqs[i] = 0
		}
	}
	deadline := time.NewTimer(statsTimeout)
	defer deadline.Stop()
	for i, w := range workers {
		for seqs[i] != 0 {
			select {
			case r := <-w.stats:
				if r.Seq == seqs[i] {
					out[i].Counters = r.Counters
					seqs[i] = 0
				}
			case <-deadline.C:
				for j := i; j < len(workers); j++ {
					if seqs[j] != 0 {
						out[j].Error = "no answer from the worker"
						seqs[j] = 0
					}
				}
			}
		}
	}
	return out
}

// controlServer serves the control socket.
type controlServer struct {
	s  *Supervisor
	ln net.Listener

	mu     sync.Mutex // guards conns and closed
	conns  map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup // the accept loop and the connections
}

// listenControl creates the control socket (mode 0600) and serves it. A
// stale socket is replaced; a live one (another vsdpd) or a file that is
// no socket is an error.
func listenControl(s *Supervisor, path string) (*controlServer, error) {
	if err := checkSocketPath(path); err != nil {
		return nil, err
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("%s: another process serves it", path)
		}
	}
	ln, err := listenUnix(path, -1)
	if err != nil {
		return nil, err
	}
	cs := &controlServer{s: s, ln: ln, conns: map[net.Conn]struct{}{}}
	cs.wg.Add(1)
	go cs.serve()
	return cs, nil
}

func (cs *controlServer) serve() {
	defer cs.wg.Done()
	for {
		c, err := cs.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			time.Sleep(10 * time.Millisecond) // EMFILE and friends: do not spin
			continue
		}
		// The socket's mode keeps other users out, not the workers (same
		// uid). A confined worker cannot create a process to connect from,
		// so its PID is the peer's.
		if pid := peerPID(c); pid != 0 && cs.s.isWorkerPID(pid) {
			cs.s.log.WithField("pid", pid).Warn("control socket: a VM worker connected; refused")
			c.SetWriteDeadline(time.Now().Add(controlWrite))
			writeUpdate(c, ControlReply{Error: "control socket: refused to VM workers"})
			c.Close()
			continue
		}
		cs.mu.Lock()
		if cs.closed || len(cs.conns) >= maxControlConns {
			closed := cs.closed
			cs.mu.Unlock()
			if !closed {
				c.SetWriteDeadline(time.Now().Add(controlWrite))
				writeUpdate(c, ControlReply{Error: fmt.Sprintf("too many control connections (at most %d)", maxControlConns)})
			}
			c.Close()
			continue
		}
		cs.conns[c] = struct{}{}
		cs.wg.Add(1)
		cs.mu.Unlock()
		go cs.handle(c)
	}
}

// peerPID returns the PID of the process that connected c (SO_PEERCRED),
// or 0 if the kernel does not say.
func peerPID(c net.Conn) int {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return 0
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		return 0
	}
	var pid int
	rc.Control(func(fd uintptr) {
		if cred, err := syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED); err == nil {
			pid = int(cred.Pid)
		}
	})
	return pid
}

// handle serves one connection: a request per line, a reply per line.
func (cs *controlServer) handle(c net.Conn) {
	defer cs.wg.Done()
	defer func() {
		cs.mu.Lock()
		delete(cs.conns, c)
		cs.mu.Unlock()
		c.Close()
	}()
	br := bufio.NewReaderSize(c, maxControlLine)
	lim := newLimiter(controlBurst, time.Second/controlRate)
	reply := func(r ControlReply) bool {
		c.SetWriteDeadline(time.Now().Add(controlWrite))
		return writeUpdate(c, r) == nil
	}
	for {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			reply(ControlReply{Error: fmt.Sprintf("%v: request longer than %d bytes", ErrRequest, maxControlLine)})
			return
		}
		if err != nil {
			return // the client went away (a last line without its newline is not a request)
		}
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		var r ControlReply
		if !lim.allow() {
			r.Error = fmt.Sprintf("rate limit: at most %d requests a second on a connection", controlRate)
		} else {
			r = cs.do(line)
		}
		if !reply(r) {
			return
		}
	}
}

// do runs one request.
func (cs *controlServer) do(line []byte) ControlReply {
	req, err := parseRequest(line)
	if err != nil {
		return ControlReply{Error: err.Error()}
	}
	s := cs.s
	switch req.Op {
	case "list":
		return ControlReply{OK: true, VMs: s.List()}
	case "stats":
		return ControlReply{OK: true, Stats: s.Stats()}
	case "add":
		err = s.Add(*req.VM)
	case "remove":
		err = s.Remove(req.Name)
	}
	if err != nil {
		return ControlReply{Error: err.Error()}
	}
	return ControlReply{OK: true}
}

// close stops accepting and ends every connection (a request in flight
// finishes first; its reply is lost).
func (cs *controlServer) close() {
	cs.mu.Lock()
	cs.closed = true
	for c := range cs.conns {
		c.SetReadDeadline(time.Now()) // a handler in a request still replies, then stops
	}
	cs.mu.Unlock()
	cs.ln.Close()
}

// wait waits for the accept loop and every connection to end.
func (cs *controlServer) wait() { cs.wg.Wait() }

// ControlCall sends one request to a control socket and returns its reply
// (whose OK says whether the supervisor did it). timeout bounds the whole
// exchange; an add waits for the worker to start, so give it seconds.
func ControlCall(path string, req ControlRequest, timeout time.Duration) (*ControlReply, error) {
	b, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	return ControlCallRaw(path, b, timeout)
}

// ControlCallRaw is ControlCall with the request already encoded (one
// line of JSON, without its newline).
func ControlCallRaw(path string, req []byte, timeout time.Duration) (*ControlReply, error) {
	if bytes.IndexByte(req, '\n') >= 0 {
		return nil, fmt.Errorf("%w: a request is one line", ErrRequest)
	}
	c, err := net.DialTimeout("unix", path, timeout)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write(append(req, '\n')); err != nil {
		return nil, err
	}
	line, err := bufio.NewReader(c).ReadBytes('\n')
	if err != nil {
		return nil, fmt.Errorf("control reply: %w", err)
	}
	var r ControlReply
	if err := json.Unmarshal(line, &r); err != nil {
		return nil, fmt.Errorf("control reply %q: %w", line, err)
	}
	return &r, nil
}
