package echo_test

import (
	"encoding/binary"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vsdp/vsdp/vhost"
	"github.com/vsdp/vsdp/vhost/echo"
	"github.com/vsdp/vsdp/vhost/guestmem"
	"github.com/vsdp/vsdp/vhost/vhosttest"
)

// benchQueue is QEMU's vsock ring size.
const benchQueue = 128

// BenchmarkEcho pushes buffers through the echo device from the fake
// front-end (vhost: rings in memfd memory, eventfd kicks and interrupts,
// one guest-to-guest copy by the device), beside copy() of the same sizes
// over the same working set of 128 buffer pairs (baseline-copy): the
// physical limit of a path that copies each byte once.
func BenchmarkEcho(b *testing.B) {
	for _, size := range []int{4 << 10, 64 << 10} {
		name := fmt.Sprintf("%dKiB", size>>10)
		b.Run(name+"/vhost", func(b *testing.B) { benchVhost(b, size) })
		b.Run(name+"/baseline-copy", func(b *testing.B) { benchCopy(b, size) })
	}
}

// report adds buffers/s to vhosttest's per-core metrics (cores,
// MB/cpu-s) for b.N buffers of size bytes moved in wall and cpu time.
func report(b *testing.B, size int, wall, cpu time.Duration) {
	b.ReportMetric(float64(b.N)/wall.Seconds(), "buffers/s")
	vhosttest.ReportCPU(b, int64(b.N)*int64(size), wall, cpu)
}

func benchCopy(b *testing.B, size int) {
	src := make([][]byte, benchQueue)
	dst := make([][]byte, benchQueue)
	for i := range src {
		src[i] = make([]byte, size)
		dst[i] = make([]byte, size)
		for j := range src[i] {
			src[i][j] = byte(i + j)
		}
	}
	b.SetBytes(int64(size))
	b.ResetTimer()
	m := vhosttest.StartCPU()
	for i := range b.N {
		copy(dst[i%benchQueue], src[i%benchQueue])
	}
	wall, cpu := m.Stop()
	b.StopTimer()
	report(b, size, wall, cpu)
}

// rawDriver is a lean guest driver for one ring: fixed descriptors, each
// pointing at its own buffer, made available and reaped by index, with no
// copying on the guest side.
type rawDriver struct {
	q     *vhosttest.Queue
	used  []byte
	last  uint16
	free  []uint16
	fence atomic.Uint64
}

func newRawDriver(b *testing.B, q *vhosttest.Queue, mem *vhosttest.GuestMemory, size int, write bool, fill byte) *rawDriver {
	_, _, used := q.Addrs()
	d := &rawDriver{q: q, used: mem.Bytes(used, 6+8*uint64(q.Size()))}
	for i := range q.Size() {
		a, err := mem.Alloc(uint64(size), 64)
		if err != nil {
			b.Fatal(err)
		}
		buf := mem.Bytes(a, uint64(size))
		for j := range buf {
			buf[j] = fill + byte(j)
		}
		var flags uint16
		if write {
			flags = 2
		}
		q.SetDesc(i, vhosttest.RawDesc{Addr: a, Len: uint32(size), Flags: flags})
		d.free = append(d.free, i)
	}
	return d
}

// post makes up to n free descriptors available and kicks if asked to.
func (d *rawDriver) post(n int) int {
	n = min(n, len(d.free))
	if n == 0 {
		return 0
	}
	d.q.PutAvail(d.free[:n]...)
	d.free = d.free[n:]
	if d.q.NeedKick() {
		var one [8]byte
		one[0] = 1
		_, _ = d.q.Kick.Write(one[:])
	}
	return n
}

// reap takes used entries back and asks for an interrupt at the next one.
func (d *rawDriver) reap() int {
	n := 0
	for idx := d.q.UsedIdx(); d.last != idx; n++ {
		slot := int(d.last % d.q.Size())
		d.free = append(d.free, uint16(binary.LittleEndian.Uint32(d.used[4+8*slot:])))
		d.last++
	}
	d.q.SetUsedEvent(d.last)
	d.fence.Add(1) // full barrier: used_event is visible before used.idx is read again
	return n
}

func benchVhost(b *testing.B, size int) {
	srv := &vhost.Server{NewDevice: echo.Factory(echo.Options{}, nil)}
	defer srv.Close()
	f, _, err := vhosttest.Pair(srv)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	d, err := f.Init(vhosttest.DeviceOptions{MemSize: uint64(2*benchQueue*size) + 1<<20, QueueSize: benchQueue, EventIdx: true})
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	if err := d.Start(); err != nil {
		b.Fatal(err)
	}
	rx := newRawDriver(b, d.Queues[echo.RX], d.Mem, size, true, 0)
	tx := newRawDriver(b, d.Queues[echo.TX], d.Mem, size, false, 7)
	b.SetBytes(int64(size))
	b.ResetTimer()
	m := vhosttest.StartCPU()
	sent, echoed := 0, 0
	for echoed < b.N {
		rx.post(len(rx.free))
		sent += tx.post(b.N - sent)
		k := tx.reap()
		n := rx.reap()
		echoed += n
		if n+k == 0 {
			ok, err := vhosttest.WaitCalls(5*time.Second, d.Queues[echo.RX], d.Queues[echo.TX])
			if err != nil || !ok {
				b.Fatalf("stalled after %d of %d buffers: %v", echoed, b.N, err)
			}
		}
	}
	wall, cpu := m.Stop()
	b.StopTimer()
	if echoed > b.N {
		b.Fatalf("%d buffers came back for %d sent", echoed, b.N)
	}
	// The last buffer used holds the TX pattern.
	last := binary.LittleEndian.Uint32(rx.used[4+8*int((rx.last-1)%benchQueue):])
	desc, _, _ := d.Queues[echo.RX].Addrs()
	addr := guestmem.GPA(binary.LittleEndian.Uint64(d.Mem.Bytes(desc+guestmem.GPA(16*last), 8)))
	got := d.Mem.Bytes(addr, uint64(size))
	for j := range got {
		if got[j] != 7+byte(j) {
			b.Fatalf("echoed buffer differs at byte %d", j)
		}
	}
	report(b, size, wall, cpu)
}
