package vsdpnet_test

import (
	"io"
	"net"
	"os"
	"testing"

	"github.com/vsdp/vsdp/guestdrv"
	"github.com/vsdp/vsdp/guestdrv/vsdpnet"
)

// BenchmarkWrite measures streaming through a vsdpnet Conn (an *os.File on
// the test transport's socket, through the netpoller) against a plain
// net.UnixConn to the same kind of sink: the cost of the wrapper, not of a
// device.
func BenchmarkWrite(b *testing.B) {
	for _, size := range []int{4 << 10, 64 << 10} {
		name := map[int]string{4 << 10: "4KiB", 64 << 10: "64KiB"}[size]
		buf := make([]byte, size)
		b.Run(name+"/vsdpnet", func(b *testing.B) {
			d, err := os.MkdirTemp("", "vsdp")
			if err != nil {
				b.Fatal(err)
			}
			defer os.RemoveAll(d)
			h, err := guestdrv.NewFakeHost(guestdrv.HostOptions{Dir: d})
			if err != nil {
				b.Fatal(err)
			}
			defer h.Close()
			h.SetDial(func(guestdrv.Dial) guestdrv.Plan {
				return guestdrv.Plan{Kind: guestdrv.PlanTicket, Serve: func(s *guestdrv.Stream) {
					io.Copy(io.Discard, s)
					s.Close()
				}}
			})
			cl := vsdpnet.New(vsdpnet.Options{NoEnv: true, UnixDir: d})
			defer cl.Close()
			c, err := cl.Dial("tcp", "10.1.0.7:9")
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			b.SetBytes(int64(size))
			b.ResetTimer()
			for range b.N {
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(name+"/baseline-unix", func(b *testing.B) {
			d, err := os.MkdirTemp("", "vsdp")
			if err != nil {
				b.Fatal(err)
			}
			defer os.RemoveAll(d)
			ln, err := net.Listen("unix", d+"/s")
			if err != nil {
				b.Fatal(err)
			}
			defer ln.Close()
			go func() {
				if s, err := ln.Accept(); err == nil {
					io.Copy(io.Discard, s)
					s.Close()
				}
			}()
			c, err := net.Dial("unix", d+"/s")
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			b.SetBytes(int64(size))
			b.ResetTimer()
			for range b.N {
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
