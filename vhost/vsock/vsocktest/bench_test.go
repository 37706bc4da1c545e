package vsocktest_test

import (
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/vsdp/vsdp/vhost"
	"github.com/vsdp/vsdp/vhost/vhosttest"
	"github.com/vsdp/vsdp/vhost/vsock"
	"github.com/vsdp/vsdp/vhost/vsock/vsocktest"
)

// sink accepts port 9 and discards (and counts) what the guest sends; it
// sends back what is asked of it through want.
type sink struct {
	mu   sync.Mutex
	got  int
	send int
	c    *vsock.Conn
}

func (s *sink) Connect(r *vsock.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, err := r.Accept(s)
	if err == nil {
		s.c = c
	}
}

func (s *sink) Deliver(p *vsock.Payload) {
	s.mu.Lock()
	s.got += p.Len
	s.mu.Unlock()
	p.Release()
}

func (s *sink) Pull(dst [][]byte) (int, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, d := range dst {
		k := min(len(d), s.send)
		s.send -= k
		n += k
	}
	return n, false
}

func (s *sink) Shutdown(bool, bool, bool) {}
func (s *sink) Reset(error)               {}

func setup(b testing.TB) (*vsocktest.Guest, *sink, func()) {
	s := &sink{}
	g, done := setupBackend(b, s)
	return g, s, done
}

// setupBackend serves a vsock device for CID 3 with backend be over a
// vhost-user socket and starts the fake guest driver on it.
func setupBackend(b testing.TB, be vsock.Backend) (*vsocktest.Guest, func()) {
	srv := &vhost.Server{NewDevice: func() (vhost.Device, error) { return vsock.New(vsock.Config{CID: 3}, be) }}
	sock := filepath.Join(b.TempDir(), "v.sock")
	go srv.ListenAndServe(sock)
	var f *vhosttest.Frontend
	var err error
	for i := 0; i < 100; i++ {
		if f, err = vhosttest.Dial(sock); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		b.Fatal(err)
	}
	dev, err := f.Init(vhosttest.DeviceOptions{MemSize: 64 << 20, EventIdx: true, Indirect: true, ConfigSize: 8})
	if err != nil {
		b.Fatal(err)
	}
	if err := dev.Start(); err != nil {
		b.Fatal(err)
	}
	g, err := vsocktest.New(dev, 3)
	if err != nil {
		b.Fatal(err)
	}
	return g, func() { g.Close(); dev.Close(); f.Close(); srv.Close() }
}

// BenchmarkVsockPath measures the vsock device's data path alone through
// the fake front-end (rings in shared memory, eventfd kicks and calls, no
// VM), guest to host and host to guest, beside copy() of the same sizes.
// Each case also reports its cost per core (vhosttest.ReportCPU): cores
// busy and MB moved per CPU-second of the whole process, which here
// includes the simulated guest driver's side of every ring.
func BenchmarkVsockPath(b *testing.B) {
	for _, sz := range []struct {
		name string
		n    int
	}{{"4KiB", 4 << 10}, {"64KiB", 64 << 10}} {
		buf := make([]byte, sz.n)
		b.Run(sz.name+"/guest-to-host", func(b *testing.B) {
			g, s, done := setup(b)
			defer done()
			c, err := g.Dial(9, 5*time.Second)
			if err != nil {
				b.Fatal(err)
			}
			b.SetBytes(int64(sz.n))
			b.ResetTimer()
			m := vhosttest.StartCPU()
			for i := 0; i < b.N; i++ {
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
			for {
				s.mu.Lock()
				got := s.got
				s.mu.Unlock()
				if got >= b.N*sz.n {
					break
				}
				time.Sleep(100 * time.Microsecond)
			}
			wall, cpu := m.Stop()
			b.StopTimer()
			vhosttest.ReportCPU(b, int64(b.N)*int64(sz.n), wall, cpu)
		})
		b.Run(sz.name+"/host-to-guest", func(b *testing.B) {
			g, s, done := setup(b)
			defer done()
			c, err := g.Dial(9, 5*time.Second)
			if err != nil {
				b.Fatal(err)
			}
			b.SetBytes(int64(sz.n))
			b.ResetTimer()
			m := vhosttest.StartCPU()
			s.mu.Lock()
			s.send = b.N * sz.n
			conn := s.c
			s.mu.Unlock()
			conn.Notify()
			st0 := g.Stats()
			for left := b.N * sz.n; left > 0; {
				k, err := c.Read(buf[:min(len(buf), left)])
				if err != nil {
					b.Fatal(err)
				}
				left -= k
			}
			wall, cpu := m.Stop()
			b.StopTimer()
			st := g.Stats()
			// Wakeups of the guest's rx loop: interrupts, and polls that
			// found no interrupt (a slow host) or a missed one (a bug).
			b.ReportMetric(float64(st.Interrupts-st0.Interrupts), "irqs")
			b.ReportMetric(float64(st.Timeouts-st0.Timeouts), "timeouts")
			b.ReportMetric(float64(st.Missed-st0.Missed), "missed")
			vhosttest.ReportCPU(b, int64(b.N)*int64(sz.n), wall, cpu)
		})
		b.Run(sz.name+"/baseline-memcpy", func(b *testing.B) {
			dst := make([]byte, sz.n)
			b.SetBytes(int64(sz.n))
			b.ResetTimer()
			m := vhosttest.StartCPU()
			for i := 0; i < b.N; i++ {
				copy(dst, buf)
			}
			wall, cpu := m.Stop()
			b.StopTimer()
			vhosttest.ReportCPU(b, int64(b.N)*int64(sz.n), wall, cpu)
		})
	}
}
