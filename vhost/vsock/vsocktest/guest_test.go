package vsocktest_test

import (
	"crypto/sha256"
	"io"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/vsdp/vsdp/vhost/vhosttest"
	"github.com/vsdp/vsdp/vhost/vsock"
	"github.com/vsdp/vsdp/vhost/vsock/vsocktest"
)

// source is a stream that sends data to the guest and hashes what the
// guest sends.
type source struct {
	mu   sync.Mutex
	data vsocktest.Queue // left to send to the guest
	got  []byte
	eof  bool
	c    *vsock.Conn
	conn chan *vsock.Conn
}

func (s *source) Connect(r *vsock.Request) {
	c, err := r.Accept(s)
	if err == nil {
		s.conn <- c
	}
}

func (s *source) Deliver(p *vsock.Payload) {
	s.mu.Lock()
	for _, seg := range p.Segs {
		s.got = append(s.got, seg...)
	}
	s.mu.Unlock()
	p.Release()
}

func (s *source) Pull(dst [][]byte) (int, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := s.data.Fill(dst)
	return n, s.data.Len() == 0 && s.eof
}

func (s *source) Shutdown(bool, bool, bool) {}
func (s *source) Reset(error)               {}

// TestStreamWakeups streams 8 MiB each way through the device and the fake
// driver, checks both by sha256, and checks how the driver's rx loop woke:
// every rx publication must come with an interrupt (the driver asks for one
// at every entry), so no rx packet may be found only by the loop's poll
// after the grace period (Missed). (Poll timeouts are not asserted: the rx
// loop idles while the guest only sends, and a loaded host delays wakeups.)
func TestStreamWakeups(t *testing.T) {
	vhosttest.CheckLeaks(t)
	const size = 8 << 20
	rng := rand.New(rand.NewPCG(1, 2))
	down, up := make([]byte, size), make([]byte, size)
	for i := range down {
		down[i], up[i] = byte(rng.Uint32()), byte(rng.Uint32())
	}
	s := &source{eof: true, conn: make(chan *vsock.Conn, 1)}
	s.data.Append(down)
	g, done := setupBackend(t, s)
	defer done()
	c, err := g.Dial(9, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	hc := <-s.conn
	before := g.Stats()
	hc.Notify()
	wrote := make(chan error, 1)
	go func() {
		_, err := c.Write(up)
		if err == nil {
			err = c.CloseWrite()
		}
		wrote <- err
	}()
	h := sha256.New()
	n, err := io.Copy(h, io.LimitReader(c, size+1))
	if err != nil || n != size {
		t.Fatalf("guest read %d bytes, %v; want %d", n, err, size)
	}
	if got, want := h.Sum(nil), sha256.Sum256(down); string(got) != string(want[:]) {
		t.Fatalf("host-to-guest sha256 %x, want %x", got, want)
	}
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		s.mu.Lock()
		got := len(s.got)
		s.mu.Unlock()
		if got >= size || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	s.mu.Lock()
	sum := sha256.Sum256(s.got)
	s.mu.Unlock()
	if sum != sha256.Sum256(up) {
		t.Fatalf("guest-to-host sha256 %x differs", sum)
	}
	st := g.Stats()
	d := struct{ irqs, timeouts, missed, packets, batches uint64 }{
		st.Interrupts - before.Interrupts, st.Timeouts - before.Timeouts, st.Missed - before.Missed,
		st.Packets - before.Packets, st.Batches - before.Batches}
	t.Logf("rx wakeups: %+v", d)
	if d.missed != 0 {
		t.Errorf("%d rx publications came without an interrupt", d.missed)
	}
	// About 2250 packets of 3732 bytes: they arrive in batches (one per
	// credit window or rx refill), each announced by an interrupt.
	if d.packets < size/vsock.MaxPayload || d.batches == 0 || d.irqs == 0 {
		t.Errorf("stream not carried by interrupts: %+v", d)
	}
}
