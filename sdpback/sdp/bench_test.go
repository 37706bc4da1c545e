package sdp_test

import (
	"context"
	"io"
	"net"
	"net/netip"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/vsdp/vsdp/sdpback/sdp"
)

// tcpPair returns a connected kernel TCP loopback pair: the baseline.
func tcpPair(b *testing.B) (net.Conn, net.Conn) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	ch := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		ch <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	return c, <-ch
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

// benchStream writes size-byte writes from a to b for b.N iterations.
func benchStream(b *testing.B, w, r net.Conn, size int) {
	buf := make([]byte, size)
	done := make(chan int64)
	go func() {
		n, _ := io.CopyBuffer(io.Discard, r, make([]byte, 256<<10))
		done <- n
	}()
	b.SetBytes(int64(size))
	b.ResetTimer()
	cpu0 := cpuSeconds()
	for i := 0; i < b.N; i++ {
		if _, err := w.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	if cw, ok := w.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	n := <-done
	b.StopTimer()
	if n != int64(b.N)*int64(size) {
		b.Fatalf("received %d of %d bytes", n, int64(b.N)*int64(size))
	}
	b.ReportMetric((cpuSeconds()-cpu0)/(float64(n)/1e9), "cpu-s/GB")
	if sw, ok := w.(*sdp.Conn); ok {
		// Host copies per payload byte: into the send buffers and out of
		// the receive buffers (BenchmarkCopies has the gather path).
		sr := r.(*sdp.Conn)
		b.ReportMetric(float64(sw.Stats().CopiedBytes+sr.Stats().ReadCopiedBytes)/float64(n), "copies/B")
	}
}

// BenchmarkStream compares SDP BCopy on the soft provider with kernel TCP
// on loopback, in the same run.
func BenchmarkStream(b *testing.B) {
	for _, sz := range []struct {
		name string
		n    int
	}{{"4KiB", 4 << 10}, {"64KiB", 64 << 10}, {"1MiB", 1 << 20}} {
		b.Run(sz.name+"/sdp-soft-inproc", func(b *testing.B) {
			f := newFabric(b, "inproc", sdp.Config{})
			x, y := f.pair(b, 100)
			defer x.Close()
			defer y.Close()
			benchStream(b, x, y, sz.n)
		})
		b.Run(sz.name+"/sdp-soft-tcp", func(b *testing.B) {
			f := newFabric(b, "tcp", sdp.Config{})
			x, y := f.pair(b, 101)
			defer x.Close()
			defer y.Close()
			benchStream(b, x, y, sz.n)
		})
		b.Run(sz.name+"/baseline-tcp-loopback", func(b *testing.B) {
			x, y := tcpPair(b)
			defer x.Close()
			defer y.Close()
			benchStream(b, x, y, sz.n)
		})
	}
}

func pingPong(b *testing.B, x, y net.Conn) {
	go func() {
		buf := make([]byte, 64)
		for {
			if _, err := io.ReadFull(y, buf); err != nil {
				return
			}
			if _, err := y.Write(buf); err != nil {
				return
			}
		}
	}()
	buf := make([]byte, 64)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		x.Write(buf)
		if _, err := io.ReadFull(x, buf); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkPingPong64 is a 64-byte round trip (NODELAY on both).
func BenchmarkPingPong64(b *testing.B) {
	b.Run("64B/sdp-soft-inproc", func(b *testing.B) {
		f := newFabric(b, "inproc", sdp.Config{})
		x, y := f.pair(b, 102)
		x.SetNoDelay(true)
		y.SetNoDelay(true)
		defer x.Close()
		defer y.Close()
		pingPong(b, x, y)
	})
	b.Run("64B/baseline-tcp-loopback", func(b *testing.B) {
		x, y := tcpPair(b)
		defer x.Close()
		defer y.Close()
		pingPong(b, x, y)
	})
}

// BenchmarkConnect measures connection set-up (dial to accepted, then
// close) and reports the memory an idle connection pins.
func BenchmarkConnect(b *testing.B) {
	b.Run("setup/sdp-soft-inproc", func(b *testing.B) {
		f := newFabric(b, "inproc", sdp.Config{})
		l, err := f.b.Listen(103, 64)
		if err != nil {
			b.Fatal(err)
		}
		defer l.Close()
		go func() {
			for {
				c, err := l.AcceptSDP(context.Background())
				if err != nil {
					return
				}
				c.Close()
			}
		}()
		var m0, m1 runtime.MemStats
		runtime.ReadMemStats(&m0)
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			c, err := f.a.Dial(ctx, netip.AddrPortFrom(addrB, 103))
			cancel()
			if err != nil {
				b.Fatal(err)
			}
			c.Close()
			<-c.Done()
		}
		b.StopTimer()
		runtime.ReadMemStats(&m1)
		// DMA buffers live outside the Go heap: the engine's receive,
		// send and control buffers per connection with the defaults.
		b.ReportMetric(float64(sdp.DefaultRecvBufs*sdp.DefaultRecvBufSize+sdp.DefaultSendBufs*sdp.DefaultRecvBufSize), "dma-B/conn")
	})
	b.Run("setup/baseline-tcp-loopback", func(b *testing.B) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		defer ln.Close()
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Close()
			}
		}()
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				b.Fatal(err)
			}
			c.Close()
		}
	})
}

// BenchmarkSetup measures connection set-up as the ULP comparison's
// set-up figure does, plus the first byte: dial until the accepting side's
// first byte is read. Closing is not timed. The SDP case also reports the
// dialling side's phases (µs per connection, from the previous phase's
// end; "connected" is the CM REQ → REP, which includes the accepting
// side's work).
func BenchmarkSetup(b *testing.B) {
	serve := func(accept func() (net.Conn, error)) {
		for {
			c, err := accept()
			if err != nil {
				return
			}
			c.Write([]byte{1})
			c.Close()
		}
	}
	first := func(b *testing.B, c net.Conn) {
		var one [1]byte
		if _, err := io.ReadFull(c, one[:]); err != nil || one[0] != 1 {
			b.Fatalf("first byte: %v %v", one, err)
		}
	}
	// sdp-soft-inproc keeps registered buffer sets (the default);
	// sdp-soft-inproc-unpooled allocates and registers per connection.
	for _, impl := range []struct {
		name string
		sets int
	}{{"sdp-soft-inproc", 0}, {"sdp-soft-inproc-unpooled", -1}} {
		b.Run("first-byte/"+impl.name, func(b *testing.B) {
			f := newFabric(b, "inproc", sdp.Config{BufferSets: impl.sets})
			tr := tracePhases(f.a)
			l, err := f.b.Listen(104, 64)
			if err != nil {
				b.Fatal(err)
			}
			defer l.Close()
			go serve(l.Accept)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				c, err := f.a.Dial(ctx, netip.AddrPortFrom(addrB, 104))
				cancel()
				if err != nil {
					b.Fatal(err)
				}
				first(b, c)
				b.StopTimer()
				c.Close()
				<-c.Done()
				b.StartTimer()
			}
			b.StopTimer()
			sum, order, n := tr.sums()
			for _, ph := range order {
				b.ReportMetric(float64(sum[ph].Microseconds())/float64(n), ph+"-µs")
			}
		})
	}
	b.Run("first-byte/baseline-tcp-loopback", func(b *testing.B) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		defer ln.Close()
		go serve(ln.Accept)
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				b.Fatal(err)
			}
			first(b, c)
			b.StopTimer()
			c.Close()
			b.StartTimer()
		}
	})
}
