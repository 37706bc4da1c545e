package sdp

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/vsdp/vsdp/verbs"
	"github.com/vsdp/vsdp/verbs/soft"
)

// waitFor polls cond every millisecond until it holds or d passes.
func waitFor(d time.Duration, cond func() bool) bool {
	for deadline := time.Now().Add(d); !cond(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			return false
		}
	}
	return true
}

func softDev(c *Conn) *soft.Device { return c.s.cfg.Device.(*soft.Device) }

// checkGoroutines fails the test if the goroutine count has not returned
// to n within a few seconds (the connections' loops must all exit).
func checkGoroutines(t *testing.T, n int) {
	t.Helper()
	if !waitFor(5*time.Second, func() bool { return runtime.NumGoroutine() <= n }) {
		buf := make([]byte, 1<<16)
		t.Fatalf("%d goroutines, want at most %d:\n%s", runtime.NumGoroutine(), n, buf[:runtime.Stack(buf, true)])
	}
}

// TestRNRRetried: the receiver withholds its receive buffers, so the
// sender's SENDs meet RNR NAKs. With RNR retry 7 (retry forever) the
// sender's hardware keeps retrying; once the receives come back the stream
// completes intact, in both directions at once.
func TestRNRRetried(t *testing.T) {
	a, b := clockPair(t, Config{RNRRetry: 7, RecvBufs: 4, RecvBufSize: 1024 + 16, SendBufs: 2})
	defer a.Close()
	defer b.Close()
	inj, err := soft.Inject(b.cm)
	if err != nil {
		t.Fatal(err)
	}
	inj.WithholdReceives(true)
	const n = 256 << 10
	rng := rand.New(rand.NewPCG(1, 2))
	mk := func() []byte {
		p := make([]byte, n)
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
		return p
	}
	ab, ba := mk(), mk()
	send := func(c *Conn, p []byte, seed uint64) chan error {
		rng := rand.New(rand.NewPCG(seed, seed))
		errc := make(chan error, 1)
		go func() {
			for len(p) > 0 {
				k := min(len(p), 1+rng.IntN(7000))
				if _, err := c.Write(p[:k]); err != nil {
					errc <- err
					return
				}
				p = p[k:]
			}
			errc <- c.CloseWrite()
		}()
		return errc
	}
	wa := send(a, ab, 5)
	recvB := recvHash(b)
	if !waitFor(5*time.Second, func() bool { return softDev(a).Stats().RNRNaksReceived > 0 }) {
		t.Fatal("no RNR NAK reached the sender while receives were withheld")
	}
	time.Sleep(20 * time.Millisecond) // several more RNR rounds
	if s := a.State(); s != "ESTABLISHED" && s != "FIN_WAIT1" {
		t.Fatalf("sender in %s while retrying RNR, want it alive", s)
	}
	inj.WithholdReceives(false)
	wb := send(b, ba, 6)
	recvA := recvHash(a)
	for _, r := range []struct {
		name string
		got  chan hashResult
		want []byte
		werr chan error
	}{{"A->B", recvB, ab, wa}, {"B->A", recvA, ba, wb}} {
		g := <-r.got
		if g.err != nil {
			t.Fatalf("%s read: %v after %d bytes", r.name, g.err, g.n)
		}
		if err := <-r.werr; err != nil {
			t.Fatalf("%s write: %v", r.name, err)
		}
		if g.n != int64(len(r.want)) || !bytes.Equal(g.sum, sha256Of(r.want)) {
			t.Fatalf("%s: read %d bytes, want %d; content differs", r.name, g.n, len(r.want))
		}
	}
	if st := softDev(a).Stats(); st.RNRNaksReceived == 0 || softDev(b).Stats().RNRNaksSent == 0 {
		t.Fatalf("RNR NAKs: sender received %d, receiver sent %d", st.RNRNaksReceived, softDev(b).Stats().RNRNaksSent)
	}
}

type hashResult struct {
	n   int64
	sum []byte
	err error
}

func recvHash(c *Conn) chan hashResult {
	ch := make(chan hashResult, 1)
	go func() {
		c.SetReadDeadline(time.Now().Add(20 * time.Second))
		h := sha256.New()
		n, err := io.Copy(h, c)
		ch <- hashResult{n, h.Sum(nil), err}
	}()
	return ch
}

func sha256Of(p []byte) []byte { s := sha256.Sum256(p); return s[:] }

// TestRNRExhausted: the receiver never gives its buffers back. With RNR
// retry 0 (the default, gen2's) the first RNR NAK fails the send; with 3 the
// fourth does. Either way the sender resets with a clear error naming the
// RNR failure, the receiver sees the reset, both release everything, and
// nothing hangs.
func TestRNRExhausted(t *testing.T) {
	for _, retry := range []uint8{0, 3} {
		g0 := runtime.NumGoroutine()
		a, b := clockPair(t, Config{RNRRetry: retry})
		inj, err := soft.Inject(b.cm)
		if err != nil {
			t.Fatal(err)
		}
		inj.WithholdReceives(true)
		a.SetNoDelay(true)
		if _, err := a.Write([]byte("into a peer with no receives")); err != nil {
			t.Fatalf("retry %d: write %v (it only queues)", retry, err)
		}
		err = readErr(a, 5*time.Second)
		var ce *verbs.CompletionError
		if !errors.Is(err, syscall.ECONNRESET) || !errors.As(err, &ce) || ce.Completion.Status != verbs.StatusRNRRetryExceeded {
			t.Fatalf("retry %d: sender read %v, want ECONNRESET from an RNR_RETRY_EXC_ERR completion", retry, err)
		}
		if _, err := a.Write([]byte("x")); !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("retry %d: write after the reset: %v, want ECONNRESET", retry, err)
		}
		if err := readErr(b, 5*time.Second); !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("retry %d: receiver read %v, want ECONNRESET", retry, err)
		}
		if naks := softDev(a).Stats().RNRNaksReceived; naks < uint64(retry)+1 {
			t.Fatalf("retry %d: %d RNR NAKs received, want at least %d", retry, naks, retry+1)
		}
		for _, c := range []*Conn{a, b} {
			select {
			case <-c.Done():
			case <-time.After(5 * time.Second):
				t.Fatalf("retry %d: connection not released (state %s)", retry, c.State())
			}
			if s := c.State(); s != "RESET" {
				t.Fatalf("retry %d: state %s, want RESET", retry, s)
			}
			c.Close()
		}
		for _, c := range []*Conn{a, b} {
			c.s.Close()
			if r := softDev(c).Resources(); !r.Zero() {
				t.Fatalf("retry %d: device leaked %v", retry, r)
			}
			softDev(c).Close() // its goroutines too (Cleanup closes it again)
		}
		checkGoroutines(t, g0)
	}
}
