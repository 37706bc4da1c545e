// Command vsdpd is the vsdp host daemon: a vhost-user back-end serving each
// configured VM a virtio-vsock device, carrying the VMs' streams over SDP.
//
//	vsdpd -config /etc/vsdp/vsdpd.json [-log-level info] [-stats 30s]
//	      [-workers=true] [-run-dir DIR]
//
// The configuration file is JSON (see README.md, "Configuration").
// By default vsdpd is a supervisor: it serves the host's exports itself
// and runs each VM in a worker process of its own (this binary, re-executed
// with -worker, its configuration handed over a pipe on fd 3), restarting a
// worker that dies. -workers=false serves everything in one process.
// SIGTERM or SIGINT shuts down cleanly (workers included).
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vsdp/vsdp/internal/daemon"
)

func main() {
	cfgPath := flag.String("config", "/etc/vsdp/vsdpd.json", "configuration file")
	level := flag.String("log-level", "info", "log level: debug, info, warn, error")
	statsEvery := flag.Duration("stats", 0, "log per-VM counters this often (0: never)")
	workers := flag.Bool("workers", true, "run each VM in its own worker process (false: one process)")
	runDir := flag.String("run-dir", "", "worker mode: directory for the fabric endpoints and worker PID files (default: the first VM socket's directory)")
	worker := flag.Bool("worker", false, "internal: run as a worker (configuration on fd 3)")
	flag.Parse()
	if *worker {
		os.Exit(runWorker())
	}
	log := logrus.New()
	lv, err := logrus.ParseLevel(*level)
	if err != nil {
		fmt.Fprintln(os.Stderr, "vsdpd:", err)
		os.Exit(2)
	}
	log.SetLevel(lv)
	cfg, err := daemon.LoadConfig(*cfgPath)
	if err != nil {
		log.WithError(err).Fatal("configuration")
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	if *workers {
		s, err := daemon.Supervise(cfg, daemon.SupervisorOptions{RunDir: *runDir, Stats: *statsEvery}, log)
		if err != nil {
			log.WithError(err).Fatal("start")
		}
		log.WithFields(logrus.Fields{"vms": len(cfg.VMs), "workers": s.PIDs()}).Info("vsdpd running")
		s2 := <-sig
		log.WithField("signal", s2).Info("shutting down")
		s.Close()
		return
	}
	d, err := daemon.Start(cfg, log)
	if err != nil {
		log.WithError(err).Fatal("start")
	}
	log.WithField("vms", len(d.VMs())).Info("vsdpd running")
	var tick <-chan time.Time
	if *statsEvery > 0 {
		t := time.NewTicker(*statsEvery)
		defer t.Stop()
		tick = t.C
	}
	for {
		select {
		case s := <-sig:
			log.WithField("signal", s).Info("shutting down")
			d.Close()
			return
		case <-tick:
			for _, v := range d.VMs() {
				st := v.Back.Stats()
				log.WithFields(logrus.Fields{"vm": v.Name, "streams": st.Streams, "dials": st.Dials,
					"denied": st.Denied, "from_guest": st.FromGuest, "to_guest": st.ToGuest}).Info("stats")
			}
		}
	}
}

// runWorker serves one VM for the supervisor that started this process.
// SIGINT is ignored (a terminal's ^C reaches the whole process group; the
// supervisor decides), SIGTERM stops the worker cleanly.
func runWorker() int {
	signal.Ignore(syscall.SIGINT)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM)
	pipe := os.NewFile(3, "supervisor")
	if pipe == nil {
		fmt.Fprintln(os.Stderr, "vsdpd -worker: no supervisor pipe on fd 3")
		return 2
	}
	err := daemon.RunWorker(pipe, sig, os.Stderr)
	switch {
	case err == nil:
		return 0
	case errors.Is(err, daemon.ErrSupervisorGone):
		return 0
	default:
		fmt.Fprintln(os.Stderr, "vsdpd -worker:", err)
		return 1
	}
}
