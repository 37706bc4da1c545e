package virtq_test

import (
	"io"
	"testing"

	"github.com/vsdp/vsdp/vhost/vhosttest"
)

// BenchmarkRing moves one buffer per op through a ring in shared memory:
// the driver adds it, the device pops it, copies its bytes out through the
// Reader, pushes and flushes, and the driver reaps the used entry. The
// baseline copies the same bytes with copy() alone: the ring's overhead is
// the gap between the two.
func BenchmarkRing(b *testing.B) {
	for _, size := range []struct {
		name string
		n    int
	}{{"4KiB", 4 << 10}, {"64KiB", 64 << 10}} {
		src := make([]byte, size.n)
		dst := make([]byte, size.n)
		b.Run(size.name+"/virtq", func(b *testing.B) {
			f := newFixture(b, 256, vhosttest.RingOptions{EventIdx: true})
			b.SetBytes(int64(size.n))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := f.ring.Add([][]byte{src}, nil); err != nil {
					b.Fatal(err)
				}
				c, err := f.q.Pop()
				if err != nil || c == nil {
					b.Fatal(c, err)
				}
				r := c.Reader()
				if _, err := io.ReadFull(&r, dst); err != nil {
					b.Fatal(err)
				}
				f.q.Push(c, 0)
				f.q.Flush()
				if _, ok, err := f.ring.Used(); !ok || err != nil {
					b.Fatal(ok, err)
				}
			}
		})
		b.Run(size.name+"/baseline-copy", func(b *testing.B) {
			b.SetBytes(int64(size.n))
			for b.Loop() {
				copy(dst, src)
			}
		})
	}
}
