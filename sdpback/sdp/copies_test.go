package sdp_test

import (
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/vsdp/vsdp/sdpback/sdp"
	"github.com/vsdp/vsdp/verbs"
)

// gatherSource sends from memory registered with the sending stack's PD,
// as a device sends guest memory: a ring of MaxPayload-sized chunks, each
// reused only after the send that named it completed.
type gatherSource struct {
	c      *sdp.Conn
	dma    *verbs.DMA
	mr     verbs.MR
	chunk  int
	tokens chan struct{} // one per chunk not in flight
	wr     chan struct{} // OnWritable
	errc   chan error    // first failed completion
	next   int
}

func newGatherSource(tb testing.TB, s *sdp.Stack, c *sdp.Conn, chunks int) *gatherSource {
	tb.Helper()
	g := &gatherSource{c: c, chunk: c.MaxPayload(), tokens: make(chan struct{}, chunks),
		wr: make(chan struct{}, 1), errc: make(chan error, 1)}
	var err error
	if g.dma, err = verbs.AllocDMA(chunks * g.chunk); err != nil {
		tb.Fatal(err)
	}
	if g.mr, err = s.PD().RegMR(g.dma.Bytes(), 0); err != nil {
		g.dma.Close()
		tb.Fatal(err)
	}
	for range chunks {
		g.tokens <- struct{}{}
	}
	c.SetCallbacks(nil, func() {
		select {
		case g.wr <- struct{}{}:
		default:
		}
	})
	return g
}

// send sends p (at most one chunk): it copies p into the registered ring
// first when fill is set (a test filling "guest memory"), then gathers it.
func (g *gatherSource) send(p []byte, fill bool) error {
	select {
	case <-g.tokens:
	case err := <-g.errc:
		return err
	case <-time.After(10 * time.Second):
		return errors.New("gather: no send completed in 10s")
	}
	off := (g.next % cap(g.tokens)) * g.chunk
	g.next++
	if fill {
		copy(g.dma.Bytes()[off:], p)
	}
	sge := verbs.SGE{Addr: g.mr.Addr() + uint64(off), Length: uint32(len(p)), LKey: g.mr.LKey()}
	done := func(err error) {
		if err != nil {
			select {
			case g.errc <- err:
			default:
			}
		}
		g.tokens <- struct{}{}
	}
	for deadline := time.Now().Add(10 * time.Second); ; {
		err := g.c.SendGather([]verbs.SGE{sge}, done)
		if !errors.Is(err, sdp.ErrWouldBlock) {
			return err
		}
		select {
		case <-g.wr:
		case <-time.After(time.Until(deadline)):
			return errors.New("gather: would block for 10s")
		}
	}
}

// wait returns once every chunk is back (all sends completed).
func (g *gatherSource) wait() error {
	for range cap(g.tokens) {
		select {
		case <-g.tokens:
		case err := <-g.errc:
			return err
		case <-time.After(10 * time.Second):
			return errors.New("gather: sends still in flight after 10s")
		}
	}
	return nil
}

func (g *gatherSource) close() {
	g.c.SetCallbacks(nil, nil)
	g.mr.Close()
	g.dma.Close()
}

// TestSendGatherIntegrity sends random-sized messages from registered
// memory with SendGather, mixed with Write, and checks the stream by hash
// and the copy counters: gathered bytes are never copied on the send side.
func TestSendGatherIntegrity(t *testing.T) {
	f := newFabric(t, "inproc", sdp.Config{RecvBufs: 8, RecvBufSize: 4096 + 16, SendBufs: 4})
	a, b := f.pair(t, 7300)
	defer b.Close()
	g := newGatherSource(t, f.a, a, 4)
	defer g.close()
	rng := rand.New(rand.NewPCG(7, 8))
	want := sha256.New()
	var gathered, written int
	got := make(chan [32]byte, 1)
	go func() {
		h := sha256.New()
		b.SetReadDeadline(time.Now().Add(20 * time.Second))
		io.Copy(h, b)
		got <- [32]byte(h.Sum(nil))
	}()
	for i := range 300 {
		p := make([]byte, 1+rng.IntN(a.MaxPayload()))
		for j := range p {
			p[j] = byte(rng.Uint32())
		}
		want.Write(p)
		if i%5 == 4 {
			if _, err := a.Write(p); err != nil {
				t.Fatal(err)
			}
			written += len(p)
			continue
		}
		if err := g.send(p, true); err != nil {
			t.Fatalf("gather %d: %v", i, err)
		}
		gathered += len(p)
	}
	if err := g.wait(); err != nil {
		t.Fatal(err)
	}
	st := a.Stats()
	a.Close()
	if h := <-got; h != [32]byte(want.Sum(nil)) {
		t.Fatal("stream differs from what was sent")
	}
	if st.GatherBytes != uint64(gathered) || st.CopiedBytes != uint64(written) {
		t.Fatalf("stats %+v: want GatherBytes %d, CopiedBytes %d", st, gathered, written)
	}
	if rs := b.Stats(); rs.ReadCopiedBytes != uint64(gathered+written) {
		t.Fatalf("reader copied %d bytes, want %d", rs.ReadCopiedBytes, gathered+written)
	}
}

// BenchmarkCopies reports host copies per payload byte on each side of a
// BCopy stream: Write from a plain []byte (one copy into the send buffers)
// beside SendGather from registered caller memory (no copy on send). The
// receive side copies once per byte out of the receive buffers in both.
func BenchmarkCopies(b *testing.B) {
	for _, sz := range []struct {
		name string
		n    int
	}{{"4KiB", 4 << 10}, {"32KiB", 32 << 10}} {
		b.Run(sz.name+"/sdp-gather-registered", func(b *testing.B) { benchCopies(b, sz.n, true) })
		b.Run(sz.name+"/baseline-sdp-write", func(b *testing.B) { benchCopies(b, sz.n, false) })
	}
}

func benchCopies(b *testing.B, size int, gather bool) {
	f := newFabric(b, "inproc", sdp.Config{})
	x, y := f.pair(b, 104)
	defer y.Close()
	size = min(size, x.MaxPayload())
	var g *gatherSource
	if gather {
		g = newGatherSource(b, f.a, x, 8)
		defer g.close()
	}
	buf := make([]byte, size)
	done := make(chan int64, 1)
	go func() {
		n, _ := io.CopyBuffer(io.Discard, y, make([]byte, 256<<10))
		done <- n
	}()
	b.SetBytes(int64(size))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		var err error
		if gather {
			err = g.send(buf, false)
		} else {
			_, err = x.Write(buf)
		}
		if err != nil {
			b.Fatal(err)
		}
	}
	if gather {
		if err := g.wait(); err != nil {
			b.Fatal(err)
		}
	}
	x.CloseWrite()
	n := <-done
	b.StopTimer()
	total := float64(b.N) * float64(size)
	if n != int64(total) {
		b.Fatalf("received %d of %.0f bytes", n, total)
	}
	sx, sy := x.Stats(), y.Stats()
	b.ReportMetric(float64(sx.CopiedBytes)/total, "send-copies/B")
	b.ReportMetric(float64(sy.ReadCopiedBytes)/total, "recv-copies/B")
	b.ReportMetric(float64(sx.GatherBytes)/total, "gathered/B")
	x.Close()
	if gather && sx.CopiedBytes != 0 {
		b.Fatalf("gather path copied %d bytes on send", sx.CopiedBytes)
	}
}
