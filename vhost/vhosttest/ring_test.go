package vhosttest_test

import (
	"errors"
	"testing"

	"github.com/vsdp/vsdp/vhost/guestmem"
	"github.com/vsdp/vsdp/vhost/vhosttest"
	"github.com/vsdp/vsdp/vhost/virtq"
)

// TestChainLength: Add and AddIndirect build chains of up to the ring's
// size and refuse longer ones (a driver must not build them); a head
// whose chain the device rejects stays in flight, so no later Add reuses
// it; UsedAppend hands back the written bytes in the caller's buffer.
func TestChainLength(t *testing.T) {
	const n = 8
	gm, err := vhosttest.NewGuestMemory(1 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer gm.Close()
	mem := guestmem.NewMemory(0)
	defer mem.Close()
	if err := mem.SetTable([]guestmem.RegionSpec{gm.Spec()}, []int{gm.Fd()}); err != nil {
		t.Fatal(err)
	}
	r, err := vhosttest.NewRing(gm, n, vhosttest.RingOptions{Indirect: true})
	if err != nil {
		t.Fatal(err)
	}
	d, a, u := r.UVAs()
	q, err := virtq.New(mem, virtq.Config{Size: n, Desc: d, Avail: a, Used: u, Indirect: true})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	sizes := func(k int) []int {
		s := make([]int, k)
		for i := range s {
			s[i] = 1
		}
		return s
	}
	for _, tc := range []struct {
		name    string
		add     func([][]byte, []int) (uint16, error)
		k       int
		tooLong bool
	}{
		{"direct, ring size", r.Add, n, false},
		{"indirect, ring size", r.AddIndirect, n, false},
		{"direct, one more", r.Add, n + 1, true},
		{"indirect, one more", r.AddIndirect, n + 1, true},
		{"indirect, 65537", r.AddIndirect, 65537, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			free := r.FreeDescs()
			head, err := tc.add(nil, sizes(tc.k))
			if tc.tooLong {
				if !errors.Is(err, vhosttest.ErrChainTooLong) || r.FreeDescs() != free {
					t.Fatalf("add of %d buffers: %v, %d free of %d", tc.k, err, r.FreeDescs(), free)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			c, err := q.Pop()
			if err != nil || c == nil || c.Head != head || c.WritableLen() != tc.k {
				t.Fatalf("Pop = %v, %v", c, err)
			}
			w := c.Writer()
			w.Write([]byte("abcdefgh")[:tc.k])
			q.Push(c, w.Written())
			q.Flush()
			scratch := make([]byte, 0, 64)
			e, ok, err := r.UsedAppend(scratch)
			if err != nil || !ok || e.Head != head || string(e.Data) != "abcdefgh"[:tc.k] || &e.Data[0] != &scratch[:1][0] {
				t.Fatalf("UsedAppend = %+v, %v, %v", e, ok, err)
			}
		})
	}
	// A raw chain the device rejects keeps its head.
	buf, _ := r.Buffer(64)
	table := make([]vhosttest.RawDesc, n+1)
	for i := range table {
		table[i] = vhosttest.RawDesc{Addr: buf, Len: 1, Flags: virtq.DescWrite | virtq.DescNext, Next: uint16(i + 1)}
	}
	table[n].Flags = virtq.DescWrite
	bad, err := r.AddRawIndirect(table)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := q.Pop(); !errors.Is(err, virtq.ErrBroken) {
		t.Fatalf("Pop of %d buffers on a ring of %d: %v", n+1, n, err)
	}
	for r.FreeDescs() > 0 {
		h, err := r.Add(nil, []int{1})
		if err != nil {
			t.Fatal(err)
		}
		if h == bad {
			t.Fatalf("Add reused head %d, still in flight", bad)
		}
	}
	if r.Outstanding() != n {
		t.Fatalf("%d chains outstanding, want %d", r.Outstanding(), n)
	}
}
