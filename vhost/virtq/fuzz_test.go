package virtq_test

import (
	"encoding/binary"
	"errors"
	"io"
	"testing"

	"github.com/vsdp/vsdp/vhost/guestmem"
	"github.com/vsdp/vsdp/vhost/vhosttest"
	"github.com/vsdp/vsdp/vhost/virtq"
)

// FuzzPop decodes the input into a descriptor table, an avail ring and free
// guest memory (where indirect tables may point), then pops until the ring
// is empty or broken. Pop must never panic or loop, and every chain it
// returns must read back exactly its advertised length.
//
// Input layout: byte 0 = log2(size) (mod 5) | 0x10 indirect | 0x20 event idx,
// byte 1..2 = avail idx, then 2*size bytes of avail ring, then descriptors
// (16*size bytes), then bytes copied into guest memory at GPA 0x1000.
func FuzzPop(f *testing.F) {
	f.Add([]byte{0x12, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x10, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0})
	f.Add(seedChain(2, []vhosttest.RawDesc{{Addr: 0x1000, Len: 64, Flags: virtq.DescNext, Next: 1}, {Addr: 0x2000, Len: 32, Flags: virtq.DescWrite}}))
	f.Add(seedChain(0x13, []vhosttest.RawDesc{{Addr: 0x1000, Len: 32, Flags: virtq.DescIndirect}}))
	f.Add(seedChain(2, []vhosttest.RawDesc{{Addr: 0x1000, Len: 8, Flags: virtq.DescNext, Next: 0}}))
	// An indirect table of 5 chained one-byte buffers on a ring of 4: a
	// well-formed chain longer than the queue.
	f.Add(append(seedChain(0x12, []vhosttest.RawDesc{{Addr: 0x1000, Len: 5 * 16, Flags: virtq.DescIndirect}}),
		seedTable(5, 0x2000)...))
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) < 3 {
			return
		}
		n := uint16(1) << (in[0] & 0x7 % 5)
		o := vhosttest.RingOptions{Indirect: in[0]&0x10 != 0, EventIdx: in[0]&0x20 != 0}
		gm, err := vhosttest.NewGuestMemory(1 << 16)
		if err != nil {
			t.Fatal(err)
		}
		defer gm.Close()
		mem := guestmem.NewMemory(0)
		defer mem.Close()
		if err := mem.SetTable([]guestmem.RegionSpec{gm.Spec()}, []int{gm.Fd()}); err != nil {
			t.Fatal(err)
		}
		// Free memory for indirect tables and buffers first, so the ring
		// itself lands after it.
		scratch, _ := gm.Alloc(0x4000, 4096)
		r, err := vhosttest.NewRing(gm, n, o)
		if err != nil {
			t.Fatal(err)
		}
		rest := in[3:]
		heads := make([]uint16, 0, n)
		for i := 0; i < int(n) && len(rest) >= 2; i++ {
			heads = append(heads, binary.LittleEndian.Uint16(rest))
			rest = rest[2:]
		}
		for i := 0; i < int(n) && len(rest) >= 16; i++ {
			r.SetDesc(uint16(i), vhosttest.RawDesc{
				Addr:  guestmem.GPA(binary.LittleEndian.Uint64(rest)),
				Len:   binary.LittleEndian.Uint32(rest[8:]),
				Flags: binary.LittleEndian.Uint16(rest[12:]),
				Next:  binary.LittleEndian.Uint16(rest[14:]),
			})
			rest = rest[16:]
		}
		copy(gm.Bytes(scratch, 0x4000), rest)
		r.PutAvail(heads...)
		r.SetAvailIdx(binary.LittleEndian.Uint16(in[1:]))
		d, a, u := r.UVAs()
		q, err := virtq.New(mem, virtq.Config{Size: n, Desc: d, Avail: a, Used: u, EventIdx: o.EventIdx, Indirect: o.Indirect})
		if err != nil {
			t.Fatal(err)
		}
		defer q.Close()
		for i := 0; i <= int(n); i++ {
			c, err := q.Pop()
			if err != nil {
				if !errors.Is(err, virtq.ErrBroken) {
					t.Fatalf("error %v does not wrap ErrBroken", err)
				}
				return
			}
			if c == nil {
				return
			}
			got, _ := io.Copy(io.Discard, ptr(c.Reader()))
			if int(got) != c.ReadableLen() {
				t.Fatalf("read %d of %d readable bytes", got, c.ReadableLen())
			}
			w := c.Writer()
			if k, _ := w.Write(make([]byte, min(c.WritableLen(), 1<<16))); k != min(c.WritableLen(), 1<<16) {
				t.Fatalf("wrote %d", k)
			}
			q.Push(c, w.Written())
		}
		q.Flush()
	})
}

// seedTable encodes k one-byte writable descriptors at a, a+1, …, chained.
func seedTable(k int, a uint64) []byte {
	var b []byte
	for i := 0; i < k; i++ {
		flags := uint16(virtq.DescWrite | virtq.DescNext)
		if i == k-1 {
			flags = virtq.DescWrite
		}
		b = binary.LittleEndian.AppendUint64(b, a+uint64(i))
		b = binary.LittleEndian.AppendUint32(b, 1)
		b = binary.LittleEndian.AppendUint16(b, flags)
		b = binary.LittleEndian.AppendUint16(b, uint16(i+1))
	}
	return b
}

func seedChain(opts byte, descs []vhosttest.RawDesc) []byte {
	n := 1 << (opts & 0x7 % 5)
	b := []byte{opts, 1, 0}
	b = binary.LittleEndian.AppendUint16(b, 0)
	for i := 1; i < n; i++ {
		b = binary.LittleEndian.AppendUint16(b, 0)
	}
	for i := 0; i < n; i++ {
		var d vhosttest.RawDesc
		if i < len(descs) {
			d = descs[i]
		}
		b = binary.LittleEndian.AppendUint64(b, uint64(d.Addr))
		b = binary.LittleEndian.AppendUint32(b, d.Len)
		b = binary.LittleEndian.AppendUint16(b, d.Flags)
		b = binary.LittleEndian.AppendUint16(b, d.Next)
	}
	return b
}
