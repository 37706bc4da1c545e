package soft

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/vsdp/vsdp/verbs"
)

// BenchmarkVerbs measures the soft provider over both transports beside a
// plain TCP loopback socket in the same run:
//
//	BenchmarkVerbs/<op>-<size>/{inproc,tcp,baseline-tcp-loopback}
//
// Bandwidth cases keep benchWindow requests in flight; sendlat-64B is a
// ping-pong of 64-byte SENDs (one op is one round trip). Completions are
// awaited through the CQ's eventfd (PollWait), not by spinning.
func BenchmarkVerbs(b *testing.B) {
	for _, c := range []struct {
		op   string
		size int
	}{
		{"send", 4 << 10}, {"send", 64 << 10},
		{"write", 4 << 10}, {"write", 64 << 10},
		{"read", 4 << 10}, {"read", 64 << 10},
		{"sendlat", 64},
	} {
		name := fmt.Sprintf("%s-%s", c.op, sizeName(c.size))
		b.Run(name, func(b *testing.B) {
			for _, tr := range transports {
				b.Run(tr, func(b *testing.B) { benchSoft(b, tr, c.op, c.size) })
			}
			b.Run("baseline-tcp-loopback", func(b *testing.B) { benchTCP(b, c.op, c.size) })
		})
	}
}

func sizeName(n int) string {
	if n >= 1024 {
		return fmt.Sprintf("%dKiB", n/1024)
	}
	return fmt.Sprintf("%dB", n)
}

const (
	benchWindow = 32
	benchRecvs  = 4 * benchWindow // receives the sink keeps posted
)

func benchSoft(b *testing.B, tr, op string, size int) {
	a, p := benchPair(b, tr)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	b.SetBytes(int64(size))
	if op == "sendlat" {
		benchLatency(b, ctx, a, p, size)
		return
	}
	var done chan error
	if op == "send" {
		done = make(chan error, 1)
		go func() { done <- sink(ctx, p, b.N, size) }()
	}
	wr := verbs.SendWR{Flags: verbs.SendSignaled}
	switch op {
	case "send":
		wr.Op = verbs.OpSend
	case "write":
		wr.Op, wr.RemoteAddr, wr.RKey = verbs.OpWrite, p.mr.Addr(), p.mr.RKey()
	case "read":
		wr.Op, wr.RemoteAddr, wr.RKey = verbs.OpRead, p.mr.Addr(), p.mr.RKey()
	}
	wc := make([]verbs.Completion, benchWindow)
	b.ResetTimer()
	inflight := 0
	for i := 0; i < b.N; i++ {
		for inflight == benchWindow {
			n, err := verbs.PollWait(ctx, a.cq, wc)
			if err != nil {
				b.Fatal(err)
			}
			for _, c := range wc[:n] {
				if c.Status != verbs.StatusSuccess {
					b.Fatalf("completion %+v", c)
				}
			}
			inflight -= n
		}
		slot := i % benchWindow
		wr.ID = uint64(i)
		wr.SGL = []verbs.SGE{a.sge(slot*size%(len(a.dma.Bytes())-size+1), size)}
		if err := a.qp.PostSend([]verbs.SendWR{wr}); err != nil {
			b.Fatal(err)
		}
		inflight++
	}
	for inflight > 0 {
		n, err := verbs.PollWait(ctx, a.cq, wc)
		if err != nil {
			b.Fatal(err)
		}
		inflight -= n
	}
	if done != nil {
		if err := <-done; err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(p.dev.Stats().RNRNaksSent)/float64(b.N), "rnr/op")
}

// sink receives n messages on p, reposting each receive.
func sink(ctx context.Context, p *end, n, size int) error {
	wc := make([]verbs.Completion, benchWindow)
	for got := 0; got < n; {
		k, err := verbs.PollWait(ctx, p.cq, wc)
		if err != nil {
			return err
		}
		for _, c := range wc[:k] {
			if c.Status != verbs.StatusSuccess {
				return fmt.Errorf("receive %+v", c)
			}
			slot := int(c.ID) % benchRecvs
			if err := p.qp.PostRecv([]verbs.RecvWR{{ID: c.ID, SGL: []verbs.SGE{p.sge(slot*size%(len(p.dma.Bytes())-size+1), size)}}}); err != nil {
				return err
			}
		}
		got += k
	}
	return nil
}

func benchLatency(b *testing.B, ctx context.Context, a, p *end, size int) {
	echo := make(chan error, 1)
	go func() {
		wc := make([]verbs.Completion, 4)
		for i := 0; i < b.N; i++ {
			for got := false; !got; {
				n, err := verbs.PollWait(ctx, p.cq, wc)
				if err != nil {
					echo <- err
					return
				}
				for _, c := range wc[:n] {
					if c.Op == verbs.CompRecv {
						got = true
						if err := p.qp.PostRecv([]verbs.RecvWR{{ID: c.ID, SGL: []verbs.SGE{p.sge(0, size)}}}); err != nil {
							echo <- err
							return
						}
					}
				}
			}
			if err := p.qp.PostSend([]verbs.SendWR{{Op: verbs.OpSend, SGL: []verbs.SGE{p.sge(size, size)}}}); err != nil {
				echo <- err
				return
			}
		}
		echo <- nil
	}()
	wc := make([]verbs.Completion, 4)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := a.qp.PostSend([]verbs.SendWR{{Op: verbs.OpSend, SGL: []verbs.SGE{a.sge(size, size)}}}); err != nil {
			b.Fatal(err)
		}
		for got := false; !got; {
			n, err := verbs.PollWait(ctx, a.cq, wc)
			if err != nil {
				b.Fatal(err)
			}
			for _, c := range wc[:n] {
				if c.Op == verbs.CompRecv {
					got = true
					if err := a.qp.PostRecv([]verbs.RecvWR{{ID: c.ID, SGL: []verbs.SGE{a.sge(0, size)}}}); err != nil {
						b.Fatal(err)
					}
				}
			}
		}
	}
	b.StopTimer()
	if err := <-echo; err != nil {
		b.Fatal(err)
	}
}

// benchPair connects two soft devices with room for a window of 64 KiB
// messages; the passive side has a window of receives posted, the active
// side one receive (for the latency echo).
func benchPair(b *testing.B, tr string) (a, p *end) {
	a, p = connectPairSized(b, tr, Options{}, verbs.ConnParam{RNRRetry: 7}, verbs.ConnParam{RNRRetry: 7}, 0, 4<<20)
	for i := 0; i < benchRecvs; i++ {
		if err := p.qp.PostRecv([]verbs.RecvWR{{ID: uint64(i), SGL: []verbs.SGE{p.sge(i*(64<<10)%(len(p.dma.Bytes())-(64<<10)+1), 64<<10)}}}); err != nil {
			b.Fatal(err)
		}
	}
	if err := a.qp.PostRecv([]verbs.RecvWR{{ID: 1, SGL: []verbs.SGE{a.sge(0, 64<<10)}}}); err != nil {
		b.Fatal(err)
	}
	return a, p
}

// baseline: the same traffic over a TCP loopback socket.
func benchTCP(b *testing.B, op string, size int) {
	ln, err := net.Listen("tcp", "127.0.0.8:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	srvc := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			srvc <- nil
			return
		}
		srvc <- c
	}()
	cli, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer cli.Close()
	srv := <-srvc
	if srv == nil {
		b.Fatal("accept failed")
	}
	defer srv.Close()
	b.SetBytes(int64(size))
	buf := make([]byte, size)
	done := make(chan error, 1)
	b.ResetTimer()
	switch op {
	case "send", "write":
		go func() {
			rb := make([]byte, size)
			for i := 0; i < b.N; i++ {
				if _, err := io.ReadFull(srv, rb); err != nil {
					done <- err
					return
				}
			}
			done <- nil
		}()
		for i := 0; i < b.N; i++ {
			if _, err := cli.Write(buf); err != nil {
				b.Fatal(err)
			}
		}
	case "read":
		// Request/response: an 8-byte request, size bytes back, a window
		// of requests in flight.
		go func() {
			req := make([]byte, 8)
			for i := 0; i < b.N; i++ {
				if _, err := io.ReadFull(srv, req); err != nil {
					done <- err
					return
				}
				if _, err := srv.Write(buf[:binary.BigEndian.Uint64(req)]); err != nil {
					done <- err
					return
				}
			}
			done <- nil
		}()
		req := make([]byte, 8)
		binary.BigEndian.PutUint64(req, uint64(size))
		rb := make([]byte, size)
		sent := 0
		for got := 0; got < b.N; got++ {
			for sent < b.N && sent-got < benchWindow {
				if _, err := cli.Write(req); err != nil {
					b.Fatal(err)
				}
				sent++
			}
			if _, err := io.ReadFull(cli, rb); err != nil {
				b.Fatal(err)
			}
		}
	case "sendlat":
		go func() {
			rb := make([]byte, size)
			for i := 0; i < b.N; i++ {
				if _, err := io.ReadFull(srv, rb); err != nil {
					done <- err
					return
				}
				if _, err := srv.Write(rb); err != nil {
					done <- err
					return
				}
			}
			done <- nil
		}()
		rb := make([]byte, size)
		for i := 0; i < b.N; i++ {
			if _, err := cli.Write(buf); err != nil {
				b.Fatal(err)
			}
			if _, err := io.ReadFull(cli, rb); err != nil {
				b.Fatal(err)
			}
		}
	}
	if err := <-done; err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
}
