package guestdrv

import (
	"io"
	"strconv"
	"testing"
	"time"

	"github.com/vsdp/vsdp/guestdrv/vsdpnet"
)

// TestInterop: a C program (through libvsdp.so) dials a Go program's
// vsdpnet listener; the fake host joins the two streams. Both speak the
// same protocol, so the C side's DIAL meets the Go side's LISTEN.
func TestInterop(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.String(), func(t *testing.T) {
			h := newHost(t, tr)
			o := vsdpnet.Options{NoEnv: true, UnixDir: h.opt.Dir, TCPPort: h.TCPPort()}
			cl := vsdpnet.New(o)
			defer cl.Close()
			ln, err := cl.Listen("tcp", ":7000")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			l, err := h.WaitListener(0, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			h.SetDial(func(d Dial) Plan {
				return Plan{Kind: PlanTicket, Serve: func(s *Stream) {
					peer, err := h.Call(l, s.Local, true)
					if err != nil {
						s.Close()
						return
					}
					Pipe(s, peer)
				}}
			})
			served := make(chan error, 1)
			go func() {
				c, err := ln.Accept()
				if err != nil {
					served <- err
					return
				}
				defer c.Close()
				// read it all, then answer: the C side writes everything
				// before it reads, and an echo that answered as it read
				// would fill every buffer on the way and stall
				b, err := io.ReadAll(c)
				if err == nil {
					_, err = c.Write(b)
				}
				if err == nil {
					err = c.(*vsdpnet.Conn).CloseWrite()
				}
				served <- err
			}()
			in, sum := randomFile(t, 1<<20, 9)
			out := in + ".out"
			r := runProg(t, h, writeConf(t, confAllDevice), "echo", "10.9.0.2", "7000", in, out)
			r.want(t, "received", strconv.Itoa(1<<20))
			if err := <-served; err != nil {
				t.Fatalf("Go side: %v", err)
			}
			if got := fileSum(t, out); got != sum {
				t.Errorf("C -> Go -> C: sha256 %s, want %s", short(got), short(sum))
			}
		})
	}
}
