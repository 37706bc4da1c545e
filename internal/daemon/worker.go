package daemon

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
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vsdp/vsdp/internal/sandbox"
	"github.com/vsdp/vsdp/sdpback"
	"github.com/vsdp/vsdp/verbs/soft"
)

// workerConfig is what the supervisor hands a worker over its pipe (never
// argv or the environment: the policy is the VM's, and ps shows argv).
type workerConfig struct {
	Provider string `json:"provider"`
	// Sandbox: confine the worker once its sockets exist (Config.Sandbox).
	Sandbox bool     `json:"sandbox"`
	VM      VMConfig `json:"vm"`
	// Listen is the worker's own soft transport endpoint.
	Listen string `json:"listen"`
	// Table maps every fabric address the worker may reach (the host's,
	// every VM's, the configured peers') to its endpoint.
	Table    map[string]string `json:"table"`
	LogLevel string            `json:"log_level"`
	Stats    time.Duration     `json:"stats"`
	// Handed names the listeners the supervisor created for the worker,
	// each an inherited descriptor: "socket" and "fs_socket" (the VM's
	// vhost-user sockets, for a worker with a uid of its own), "listen"
	// (its fabric endpoint, when there is a worker group).
	Handed map[string]int `json:"handed,omitempty"`
}

// firstHandedFD is the first handed listener's descriptor (the
// supervisor's pipe is 3).
const firstHandedFD = 4

// workerReply is the worker's one answer on the pipe: ready (its sockets
// exist) or why it could not start.
type workerReply struct {
	Ready bool   `json:"ready"`
	PID   int    `json:"pid,omitempty"`
	Error string `json:"error,omitempty"`
}

// After the ready answer the pipe carries updates, one JSON object per
// line (supervisor → worker), and the worker's answers to stats requests
// (worker → supervisor).
type workerUpdate struct {
	// Table replaces the worker's whole fabric table (the sync after
	// ready: changes made while the worker started).
	Table map[string]string `json:"table,omitempty"`
	// Set adds or changes addresses (a VM added at run time).
	Set map[string]string `json:"set,omitempty"`
	// Delete removes addresses (a VM removed).
	Delete []string `json:"delete,omitempty"`
	// Stats, when non-zero, asks for the VM's counters; the answer
	// echoes it.
	Stats uint64 `json:"stats,omitempty"`
}

// statsReply is a worker's answer to a stats request.
type statsReply struct {
	Seq      uint64          `json:"seq"`
	Counters sdpback.VMStats `json:"counters"`
}

const (
	// maxWorkerLine bounds a line on the worker pipe either way (a
	// table of some ten thousand addresses).
	maxWorkerLine = 1 << 20
	// updateTimeout bounds a write of one update to a worker's pipe.
	updateTimeout = 2 * time.Second
)

// writeUpdate writes u as one line.
func writeUpdate(w io.Writer, u any) error {
	b, err := json.Marshal(u)
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// ErrSupervisorGone is RunWorker's answer when its supervisor closed the
// pipe (the supervisor exited or died).
var ErrSupervisorGone = errors.New("daemon: supervisor closed the worker pipe")

// RunWorker is a worker process's main loop (vsdpd -worker): it reads its
// configuration from pipe (the supervisor's end is fd 3), serves the one VM
// it names on a soft device and SDP stack of its own, answers "ready" once
// the VM's vhost-user sockets exist, and runs until stop delivers a signal
// (nil: a clean stop) or the supervisor closes the pipe
// (ErrSupervisorGone). It logs with logrus to stderr, every line with a vm
// field.
func RunWorker(pipe io.ReadWriter, stop <-chan os.Signal, stderr io.Writer) error {
	br := bufio.NewReaderSize(pipe, maxWorkerLine)
	line, err := br.ReadBytes('\n')
	if err != nil {
		return fmt.Errorf("worker configuration: %w", err)
	}
	var wc workerConfig
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&wc); err != nil {
		return fmt.Errorf("worker configuration: %w", err)
	}
	log := logrus.New()
	log.SetOutput(stderr)
	if wc.LogLevel != "" {
		lv, err := logrus.ParseLevel(wc.LogLevel)
		if err != nil {
			return err
		}
		log.SetLevel(lv)
	}
	wlog := log.WithField("vm", wc.VM.Name)
	d, table, err := startWorker(&wc, log)
	if err == nil && wc.Sandbox {
		if err = confine(wlog); err != nil {
			d.Close()
		}
	}
	reply := workerReply{Ready: err == nil, PID: os.Getpid()}
	if err != nil {
		reply.Error = err.Error()
	}
	b, _ := json.Marshal(reply)
	if _, werr := pipe.Write(append(b, '\n')); werr != nil && err == nil {
		d.Close()
		return fmt.Errorf("worker: answer the supervisor: %w", werr)
	}
	if err != nil {
		return err
	}
	defer d.Close()
	wlog.WithField("pid", os.Getpid()).Info("worker ready")
	gone := make(chan struct{})
	go func() {
		defer close(gone) // any end of the pipe means the supervisor is gone
		ft := fabricTable{t: table, known: map[netip.Addr]bool{}}
		for a := range wc.Table {
			if pa, err := netip.ParseAddr(a); err == nil {
				ft.known[pa] = true
			}
		}
		readUpdates(br, pipe, &ft, d, wlog)
	}()
	var tick <-chan time.Time
	if wc.Stats > 0 {
		t := time.NewTicker(wc.Stats)
		defer t.Stop()
		tick = t.C
	}
	for {
		select {
		case s := <-stop:
			wlog.WithField("signal", s).Info("worker stopping")
			return nil
		case <-gone:
			wlog.Warn("supervisor gone; worker stopping")
			return ErrSupervisorGone
		case <-tick:
			for _, v := range d.VMs() {
				logStats(log, v)
			}
		}
	}
}

// confine loads what the worker would otherwise open lazily later (the
// local time zone, for log lines), then confines the process
// (internal/sandbox). On an architecture without a filter the worker runs
// unconfined and says so; any other failure is the worker's failure.
func confine(log *logrus.Entry) error {
	time.Now().Zone()
	err := sandbox.Worker()
	switch {
	case errors.Is(err, sandbox.ErrUnsupported):
		log.WithError(err).Warn("worker runs unconfined")
		return nil
	case err != nil:
		return fmt.Errorf("%w (set \"sandbox\": \"off\" to run workers unconfined)", err)
	}
	return nil
}

// readUpdates applies the supervisor's updates to the worker's fabric
// table and answers its stats requests, until the pipe ends. The
// supervisor is trusted; still, a line it cannot parse is logged and
// skipped, never fatal.
func readUpdates(br *bufio.Reader, pipe io.Writer, ft *fabricTable, d *Daemon, log *logrus.Entry) {
	for {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			for errors.Is(err, bufio.ErrBufferFull) {
				_, err = br.ReadSlice('\n')
			}
			log.Error("supervisor update longer than the line limit; skipped")
			continue
		}
		if err != nil {
			return
		}
		var u workerUpdate
		dec := json.NewDecoder(bytes.NewReader(line))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&u); err != nil {
			log.WithError(err).Error("supervisor update")
			continue
		}
		if err := ft.apply(u); err != nil {
			log.WithError(err).Error("supervisor update")
		}
		if u.Stats != 0 && len(d.VMs()) > 0 {
			if err := writeUpdate(pipe, statsReply{Seq: u.Stats, Counters: d.VMs()[0].Back.Stats()}); err != nil {
				return
			}
		}
	}
}

// fabricTable is a worker's soft address table with the set of addresses
// it holds (a Table cannot list itself), so a full sync can drop what
// went away.
type fabricTable struct {
	t     *soft.Table
	known map[netip.Addr]bool
}

// apply applies an update: Table (a full replacement), then Set, then
// Delete. Entries that do not parse are skipped and reported; the others
// still apply.
func (f *fabricTable) apply(u workerUpdate) error {
	var errs []error
	set := func(m map[string]string) map[netip.Addr]bool {
		seen := map[netip.Addr]bool{}
		for a, e := range m {
			pa, err := netip.ParseAddr(a)
			if err != nil {
				errs = append(errs, fmt.Errorf("fabric table: %w", err))
				continue
			}
			ep, err := soft.ParseEndpoint(e)
			if err == nil {
				err = f.t.Set(pa, ep)
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("fabric table %v: %w", pa, err))
				continue
			}
			f.known[pa.Unmap()] = true
			seen[pa.Unmap()] = true
		}
		return seen
	}
	if u.Table != nil {
		seen := set(u.Table)
		for a := range f.known {
			if !seen[a] {
				f.t.Delete(a)
				delete(f.known, a)
			}
		}
	}
	set(u.Set)
	for _, a := range u.Delete {
		pa, err := netip.ParseAddr(a)
		if err != nil {
			errs = append(errs, fmt.Errorf("fabric table: %w", err))
			continue
		}
		f.t.Delete(pa)
		delete(f.known, pa.Unmap())
	}
	return errors.Join(errs...)
}

// logStats logs a VM's counters.
func logStats(log *logrus.Logger, v *VM) {
	st := v.Back.Stats()
	log.WithFields(logrus.Fields{"vm": v.Name, "streams": st.Streams, "dials": st.Dials,
		"denied": st.Denied, "from_guest": st.FromGuest, "to_guest": st.ToGuest}).Info("stats")
}

// startWorker opens the worker's soft device (the VM's fabric address, its
// own endpoint, the table from the supervisor) and serves the VM on it. The
// result is a Daemon with no host stack and one VM.
func startWorker(wc *workerConfig, log *logrus.Logger) (d *Daemon, table *soft.Table, err error) {
	switch wc.Provider {
	case "", "auto", "soft":
	default:
		return nil, nil, fmt.Errorf("provider %q: this build supports auto and soft", wc.Provider)
	}
	addr, err := netip.ParseAddr(wc.VM.Addr)
	if err != nil {
		return nil, nil, fmt.Errorf("vm %q addr: %w", wc.VM.Name, err)
	}
	table = soft.NewTable()
	for a, e := range wc.Table {
		pa, err := netip.ParseAddr(a)
		if err != nil {
			return nil, nil, fmt.Errorf("fabric table: %w", err)
		}
		ep, err := soft.ParseEndpoint(e)
		if err != nil {
			return nil, nil, err
		}
		if err := table.Set(pa, ep); err != nil {
			return nil, nil, err
		}
	}
	ep, err := soft.ParseEndpoint(wc.Listen)
	if err != nil {
		return nil, nil, err
	}
	handed, err := takeHanded(wc)
	if err != nil {
		return nil, nil, err
	}
	defer func() {
		if err != nil {
			for _, ln := range handed {
				ln.Close()
			}
		}
	}()
	opts := soft.Options{Name: "soft-" + wc.VM.Name, Addrs: []netip.Addr{addr}, Table: table, Listen: ep}
	if ln, ok := handed["listen"]; ok {
		opts.Listen, opts.Listener = soft.Endpoint{}, ln
		delete(handed, "listen")
	} else if ep.Net == "unix" {
		os.Remove(ep.Addr) // a dead predecessor's endpoint
	}
	dev, err := soft.Open(opts)
	if err != nil {
		if opts.Listener != nil {
			opts.Listener.Close()
		}
		return nil, nil, err
	}
	if ep.Net == "unix" && opts.Listener == nil {
		if err := os.Chmod(ep.Addr, 0o600); err != nil {
			dev.Close()
			return nil, nil, err
		}
	}
	d = &Daemon{log: log, dev: dev, soft: dev, handed: map[string]net.Listener{}}
	for name, path := range map[string]string{"socket": wc.VM.Socket, "fs_socket": wc.VM.FSSocket} {
		if ln, ok := handed[name]; ok {
			d.handed[path] = ln
			delete(handed, name)
		}
	}
	v, err := d.startVM(wc.VM, addr)
	if err != nil {
		d.Close()
		return nil, nil, fmt.Errorf("vm %q: %w", wc.VM.Name, err)
	}
	d.vms = []*VM{v}
	return d, table, nil
}

// takeHanded turns the descriptors named in wc.Handed into listeners. Only
// the names the supervisor uses are accepted, each descriptor once, none
// below firstHandedFD, and a name whose path the VM does not have is an
// error; a failure closes what was taken.
func takeHanded(wc *workerConfig) (_ map[string]net.Listener, err error) {
	out := map[string]net.Listener{}
	defer func() {
		if err != nil {
			for _, ln := range out {
				ln.Close()
			}
		}
	}()
	seen := map[int]bool{}
	for name, fd := range wc.Handed {
		switch {
		case name == "socket", name == "listen", name == "fs_socket" && wc.VM.FSSocket != "":
		default:
			return nil, fmt.Errorf("worker configuration: handed listener %q", name)
		}
		if fd < firstHandedFD || seen[fd] {
			return nil, fmt.Errorf("worker configuration: handed %s on descriptor %d", name, fd)
		}
		seen[fd] = true
		f := os.NewFile(uintptr(fd), name)
		if f == nil {
			return nil, fmt.Errorf("worker configuration: handed %s: no descriptor %d", name, fd)
		}
		ln, err := net.FileListener(f)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("worker configuration: handed %s: %w", name, err)
		}
		out[name] = ln
	}
	return out, nil
}
