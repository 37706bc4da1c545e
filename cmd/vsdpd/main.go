package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
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
	control := flag.String("control", "", "worker mode: control socket path (default RUN-DIR/vsdpd.ctl; none: no control socket)")
	ctlPath := flag.String("ctl", "", "client: send list, stats, add VM.json or remove NAME to the control socket at this path")
	worker := flag.Bool("worker", false, "internal: run as a worker (configuration on fd 3)")
	flag.Parse()
	if *worker {
		os.Exit(runWorker())
	}
	if *ctlPath != "" {
		os.Exit(runClient(*ctlPath, flag.Args(), os.Stdin, os.Stdout, os.Stderr))
	}
	if !*workers && *control != "" {
		fmt.Fprintln(os.Stderr, "vsdpd: -control needs worker mode (-workers=true)")
		os.Exit(2)
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
		s, err := daemon.Supervise(cfg, daemon.SupervisorOptions{RunDir: *runDir, Control: *control, Stats: *statsEvery}, log)
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

// runClient sends one control request and prints the reply.
func runClient(path string, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	usage := func() int {
		fmt.Fprintln(stderr, "usage: vsdpd -ctl PATH list|stats|add VM.json|remove NAME")
		return 2
	}
	if len(args) == 0 {
		return usage()
	}
	var req struct {
		Op   string          `json:"op"`
		VM   json.RawMessage `json:"vm,omitempty"`
		Name string          `json:"name,omitempty"`
	}
	req.Op = args[0]
	switch {
	case (args[0] == "list" || args[0] == "stats") && len(args) == 1:
	case args[0] == "remove" && len(args) == 2:
		req.Name = args[1]
	case args[0] == "add" && len(args) == 2:
		var b []byte
		var err error
		if args[1] == "-" {
			b, err = io.ReadAll(io.LimitReader(stdin, 1<<20))
		} else {
			b, err = os.ReadFile(args[1])
		}
		if err != nil {
			fmt.Fprintln(stderr, "vsdpd -ctl:", err)
			return 2
		}
		if !json.Valid(b) {
			fmt.Fprintf(stderr, "vsdpd -ctl: %s is not JSON\n", args[1])
			return 2
		}
		req.VM = b // the supervisor decodes it, unknown fields refused
	default:
		return usage()
	}
	b, err := json.Marshal(req) // compacts the VM entry onto one line
	if err != nil {
		fmt.Fprintln(stderr, "vsdpd -ctl:", err)
		return 2
	}
	rep, err := daemon.ControlCallRaw(path, b, 30*time.Second)
	if err != nil {
		fmt.Fprintln(stderr, "vsdpd -ctl:", err)
		return 2
	}
	out, _ := json.MarshalIndent(rep, "", "  ")
	fmt.Fprintf(stdout, "%s\n", out)
	if !rep.OK {
		return 1
	}
	return 0
}
