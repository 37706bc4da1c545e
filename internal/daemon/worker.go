package daemon

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vsdp/vsdp/verbs/soft"
)

// workerConfig is what the supervisor hands a worker over its pipe (never
// argv or the environment: the policy is the VM's, and ps shows argv).
type workerConfig struct {
	Provider string   `json:"provider"`
	VM       VMConfig `json:"vm"`
	// Listen is the worker's own soft transport endpoint.
	Listen string `json:"listen"`
	// Table maps every fabric address the worker may reach (the host's,
	// every VM's, the configured peers') to its endpoint.
	Table    map[string]string `json:"table"`
	LogLevel string            `json:"log_level"`
	Stats    time.Duration     `json:"stats"`
}

// workerReply is the worker's one answer on the pipe: ready (its sockets
// exist) or why it could not start.
type workerReply struct {
	Ready bool   `json:"ready"`
	PID   int    `json:"pid,omitempty"`
	Error string `json:"error,omitempty"`
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
	br := bufio.NewReader(pipe)
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
	d, err := startWorker(&wc, log)
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
		io.Copy(io.Discard, br) //nolint:errcheck // any end of the pipe means the supervisor is gone
		close(gone)
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

// logStats logs a VM's counters.
func logStats(log *logrus.Logger, v *VM) {
	st := v.Back.Stats()
	log.WithFields(logrus.Fields{"vm": v.Name, "streams": st.Streams, "dials": st.Dials,
		"denied": st.Denied, "from_guest": st.FromGuest, "to_guest": st.ToGuest}).Info("stats")
}

// startWorker opens the worker's soft device (the VM's fabric address, its
// own endpoint, the table from the supervisor) and serves the VM on it. The
// result is a Daemon with no host stack and one VM.
func startWorker(wc *workerConfig, log *logrus.Logger) (d *Daemon, err error) {
	switch wc.Provider {
	case "", "auto", "soft":
	default:
		return nil, fmt.Errorf("provider %q: this build supports auto and soft", wc.Provider)
	}
	addr, err := netip.ParseAddr(wc.VM.Addr)
	if err != nil {
		return nil, fmt.Errorf("vm %q addr: %w", wc.VM.Name, err)
	}
	table := soft.NewTable()
	for a, e := range wc.Table {
		pa, err := netip.ParseAddr(a)
		if err != nil {
			return nil, fmt.Errorf("fabric table: %w", err)
		}
		ep, err := soft.ParseEndpoint(e)
		if err != nil {
			return nil, err
		}
		if err := table.Set(pa, ep); err != nil {
			return nil, err
		}
	}
	ep, err := soft.ParseEndpoint(wc.Listen)
	if err != nil {
		return nil, err
	}
	if ep.Net == "unix" {
		os.Remove(ep.Addr) // a dead predecessor's endpoint
	}
	dev, err := soft.Open(soft.Options{Name: "soft-" + wc.VM.Name, Addrs: []netip.Addr{addr}, Table: table, Listen: ep})
	if err != nil {
		return nil, err
	}
	if ep.Net == "unix" {
		if err := os.Chmod(ep.Addr, 0o600); err != nil {
			dev.Close()
			return nil, err
		}
	}
	d = &Daemon{log: log, dev: dev, soft: dev}
	v, err := d.startVM(wc.VM, addr)
	if err != nil {
		d.Close()
		return nil, fmt.Errorf("vm %q: %w", wc.VM.Name, err)
	}
	d.vms = []*VM{v}
	return d, nil
}
