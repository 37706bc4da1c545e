// Command vsdpd is the vsdp host daemon: a vhost-user back-end serving each
// configured VM a virtio-vsock device, carrying the VMs' streams over SDP.
//
//	vsdpd -config /etc/vsdp/vsdpd.json [-log-level info] [-stats 30s]
//
// The configuration file is JSON (see README.md, "Configuration").
// SIGTERM or SIGINT shuts down cleanly.
package main

import (
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
	flag.Parse()
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
	d, err := daemon.Start(cfg, log)
	if err != nil {
		log.WithError(err).Fatal("start")
	}
	log.WithField("vms", len(d.VMs())).Info("vsdpd running")
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
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
