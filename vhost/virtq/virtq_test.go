package virtq_test

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/vsdp/vsdp/vhost/guestmem"
	"github.com/vsdp/vsdp/vhost/vhosttest"
	"github.com/vsdp/vsdp/vhost/virtq"
	"golang.org/x/sys/unix"
)

// fixture is guest memory, the back-end's view of it, and one ring.
type fixture struct {
	gm   *vhosttest.GuestMemory
	mem  *guestmem.Memory
	ring *vhosttest.Ring
	q    *virtq.Queue
}

func newFixture(t testing.TB, n uint16, o vhosttest.RingOptions) *fixture {
	t.Helper()
	gm, err := vhosttest.NewGuestMemory(8 << 20)
	if err != nil {
		t.Fatal(err)
	}
	mem := guestmem.NewMemory(0)
	if err := mem.SetTable([]guestmem.RegionSpec{gm.Spec()}, []int{gm.Fd()}); err != nil {
		t.Fatal(err)
	}
	r, err := vhosttest.NewRing(gm, n, o)
	if err != nil {
		t.Fatal(err)
	}
	d, a, u := r.UVAs()
	q, err := virtq.New(mem, virtq.Config{Size: n, Desc: d, Avail: a, Used: u, EventIdx: o.EventIdx, Indirect: o.Indirect})
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{gm: gm, mem: mem, ring: r, q: q}
	t.Cleanup(func() { q.Close(); mem.Close(); gm.Close() })
	return f
}

func (f *fixture) pop(t *testing.T) *virtq.Chain {
	t.Helper()
	c, err := f.q.Pop()
	if err != nil {
		t.Fatalf("Pop: %v", err)
	}
	if c == nil {
		t.Fatal("Pop: ring empty")
	}
	return c
}

func TestConfigValidate(t *testing.T) {
	ok := virtq.Config{Size: 256, Desc: 0x1000, Avail: 0x2000, Used: 0x3000}
	if err := ok.Validate(); err != nil {
		t.Fatalf("valid config rejected: %v", err)
	}
	for _, tc := range []struct {
		name string
		mod  func(*virtq.Config)
		want string
	}{
		{"size zero", func(c *virtq.Config) { c.Size = 0 }, "power of two"},
		{"size not power of two", func(c *virtq.Config) { c.Size = 100 }, "power of two"},
		{"size too large", func(c *virtq.Config) { c.Size = 65535 }, "power of two"},
		{"desc misaligned", func(c *virtq.Config) { c.Desc = 0x1008 }, "16-byte"},
		{"avail misaligned", func(c *virtq.Config) { c.Avail = 0x2001 }, "2-byte"},
		{"used misaligned", func(c *virtq.Config) { c.Used = 0x3002 }, "4-byte"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := ok
			tc.mod(&c)
			err := c.Validate()
			if !errors.Is(err, virtq.ErrConfig) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want ErrConfig mentioning %q", err, tc.want)
			}
		})
	}
	if err := (virtq.Config{Size: 32768}).Validate(); err != nil {
		t.Fatalf("size 32768 rejected: %v", err)
	}
}

func TestNewRejectsUnmappedRings(t *testing.T) {
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
	end := gm.UVA(guestmem.GPA(gm.Size()))
	for _, tc := range []struct {
		name string
		cfg  virtq.Config
	}{
		{"desc outside", virtq.Config{Size: 16, Desc: end, Avail: vhosttest.UVABase, Used: vhosttest.UVABase}},
		{"avail straddles end", virtq.Config{Size: 16, Desc: vhosttest.UVABase, Avail: end - 8, Used: vhosttest.UVABase}},
		{"used straddles end", virtq.Config{Size: 16, Desc: vhosttest.UVABase, Avail: vhosttest.UVABase, Used: end - 100}},
		{"gpa given instead of uva", virtq.Config{Size: 16, Desc: 0x1000, Avail: 0x2000, Used: 0x3000}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q, err := virtq.New(mem, tc.cfg)
			if err == nil {
				q.Close()
				t.Fatal("ring outside memory accepted")
			}
			if !errors.Is(err, virtq.ErrConfig) || !errors.Is(err, guestmem.ErrOutOfBounds) {
				t.Fatalf("got %v, want ErrConfig wrapping ErrOutOfBounds", err)
			}
		})
	}
}

func TestPopPushRoundTrip(t *testing.T) {
	for _, o := range []vhosttest.RingOptions{{}, {EventIdx: true}, {Indirect: true}, {AvailOdd: true, EventIdx: true}} {
		f := newFixture(t, 64, o)
		rng := rand.New(rand.NewPCG(1, 2))
		for round := 0; round < 200; round++ {
			// A request split into 1..4 readable pieces, and 1..3 writable buffers.
			var out [][]byte
			for range 1 + rng.IntN(4) {
				b := make([]byte, rng.IntN(3000))
				for i := range b {
					b[i] = byte(rng.Uint32())
				}
				out = append(out, b)
			}
			in := []int{1 + rng.IntN(2000), rng.IntN(2000), 1 + rng.IntN(100)}[:1+rng.IntN(3)]
			add := f.ring.Add
			if o.Indirect && round%2 == 0 {
				add = f.ring.AddIndirect
			}
			head, err := add(out, in)
			if err != nil {
				t.Fatal(err)
			}
			c := f.pop(t)
			if c.Head != head {
				t.Fatalf("head %d, want %d", c.Head, head)
			}
			want := bytes.Join(out, nil)
			got, err := io.ReadAll(ptr(c.Reader()))
			if err != nil {
				t.Fatal(err)
			}
			if sha256.Sum256(got) != sha256.Sum256(want) || c.ReadableLen() != len(want) {
				t.Fatalf("round %d: readable bytes differ (%d vs %d)", round, len(got), len(want))
			}
			wsum := 0
			for _, n := range in {
				wsum += n
			}
			if c.WritableLen() != wsum {
				t.Fatalf("writable %d, want %d", c.WritableLen(), wsum)
			}
			// Answer with a digest-derived pattern, possibly short.
			reply := bytes.Repeat([]byte{byte(round)}, rng.IntN(wsum+1))
			w := c.Writer()
			if _, err := w.Write(reply); err != nil {
				t.Fatal(err)
			}
			if err := f.q.Push(c, w.Written()); err != nil {
				t.Fatal(err)
			}
			if err := f.q.Flush(); err != nil {
				t.Fatal(err)
			}
			u, ok, err := f.ring.Used()
			if err != nil || !ok {
				t.Fatalf("Used: ok=%v err=%v", ok, err)
			}
			if u.Head != head || !bytes.Equal(u.Data, reply) {
				t.Fatalf("used head %d len %d, want head %d len %d", u.Head, u.Len, head, len(reply))
			}
		}
		if c, err := f.q.Pop(); c != nil || err != nil {
			t.Fatalf("empty ring popped %v, %v", c, err)
		}
		if s := f.q.Stats(); s.Popped != 200 || s.Pushed != 200 {
			t.Fatalf("stats %+v", s)
		}
	}
}

func ptr[T any](v T) *T { return &v }

func TestWriterShortWrite(t *testing.T) {
	f := newFixture(t, 8, vhosttest.RingOptions{})
	if _, err := f.ring.Add(nil, []int{10, 5}); err != nil {
		t.Fatal(err)
	}
	c := f.pop(t)
	w := c.Writer()
	n, err := w.Write(make([]byte, 20))
	if n != 15 || !errors.Is(err, io.ErrShortWrite) {
		t.Fatalf("wrote %d, %v; want 15, ErrShortWrite", n, err)
	}
	// Pushing more than the writable size is clamped, never overstated.
	if err := f.q.Push(c, 1<<20); err != nil {
		t.Fatal(err)
	}
	f.q.Flush()
	u, _, err := f.ring.Used()
	if err != nil || u.Len != 15 {
		t.Fatalf("used len %d (%v), want 15", u.Len, err)
	}
}

func TestReaderSlicesAndSkip(t *testing.T) {
	f := newFixture(t, 8, vhosttest.RingOptions{})
	if _, err := f.ring.Add([][]byte{[]byte("abc"), []byte("defgh"), []byte("ij")}, nil); err != nil {
		t.Fatal(err)
	}
	c := f.pop(t)
	r := c.Reader()
	if r.Skip(2) != 2 {
		t.Fatal("skip")
	}
	segs := r.Slices(nil, 4)
	if got := string(bytes.Join(segs, nil)); got != "cdef" || len(segs) != 2 {
		t.Fatalf("slices %q in %d segments", got, len(segs))
	}
	rest, _ := io.ReadAll(&r)
	if string(rest) != "ghij" || r.Consumed() != 10 || r.Remaining() != 0 {
		t.Fatalf("rest %q consumed %d", rest, r.Consumed())
	}
	if r.Skip(5) != 0 {
		t.Fatal("skip past end")
	}
	f.q.Push(c, 0)
}

// TestHostileChains covers every chain-walk rule; each must break the queue
// with a ChainError or RingError and never hang, panic or touch memory
// outside the region.
func TestHostileChains(t *testing.T) {
	const n = 16
	type setup func(f *fixture) // writes descriptors and publishes heads
	buf := func(f *fixture) guestmem.GPA {
		a, err := f.gm.Alloc(4096, 64)
		if err != nil {
			panic(err)
		}
		return a
	}
	for _, tc := range []struct {
		name     string
		indirect bool
		setup    setup
		want     string
	}{
		{"head out of range", false, func(f *fixture) { f.ring.PutAvail(n) }, "head index 16 out of range"},
		{"next out of range", false, func(f *fixture) {
			f.ring.SetDesc(0, vhosttest.RawDesc{Addr: buf(f), Len: 8, Flags: virtq.DescNext, Next: n + 3})
			f.ring.PutAvail(0)
		}, "next index 19 out of range"},
		{"self loop", false, func(f *fixture) {
			f.ring.SetDesc(0, vhosttest.RawDesc{Addr: buf(f), Len: 8, Flags: virtq.DescNext, Next: 0})
			f.ring.PutAvail(0)
		}, "descriptor loop"},
		{"two-descriptor cycle", false, func(f *fixture) {
			a := buf(f)
			f.ring.SetDesc(3, vhosttest.RawDesc{Addr: a, Len: 8, Flags: virtq.DescNext, Next: 7})
			f.ring.SetDesc(7, vhosttest.RawDesc{Addr: a, Len: 8, Flags: virtq.DescNext, Next: 3})
			f.ring.PutAvail(3)
		}, "descriptor loop"},
		{"chain longer than queue via full table", false, func(f *fixture) {
			a := buf(f)
			for i := uint16(0); i < n; i++ {
				f.ring.SetDesc(i, vhosttest.RawDesc{Addr: a, Len: 1, Flags: virtq.DescNext, Next: (i + 1) % n})
			}
			f.ring.PutAvail(0)
		}, "descriptor loop"},
		{"address outside memory", false, func(f *fixture) {
			f.ring.SetDesc(0, vhosttest.RawDesc{Addr: guestmem.GPA(f.gm.Size()), Len: 8})
			f.ring.PutAvail(0)
		}, "not mapped"},
		{"address straddles end", false, func(f *fixture) {
			f.ring.SetDesc(0, vhosttest.RawDesc{Addr: guestmem.GPA(f.gm.Size() - 4), Len: 8})
			f.ring.PutAvail(0)
		}, "not mapped"},
		{"address wraps 2^64", false, func(f *fixture) {
			f.ring.SetDesc(0, vhosttest.RawDesc{Addr: ^guestmem.GPA(0) - 3, Len: 8})
			f.ring.PutAvail(0)
		}, "not mapped"},
		{"readable after writable", false, func(f *fixture) {
			a := buf(f)
			f.ring.SetDesc(0, vhosttest.RawDesc{Addr: a, Len: 8, Flags: virtq.DescWrite | virtq.DescNext, Next: 1})
			f.ring.SetDesc(1, vhosttest.RawDesc{Addr: a, Len: 8})
			f.ring.PutAvail(0)
		}, "readable descriptor 1 after a writable"},
		{"indirect not negotiated", false, func(f *fixture) {
			tb, _ := f.ring.WriteTable([]vhosttest.RawDesc{{Addr: buf(f), Len: 8}})
			f.ring.SetDesc(0, vhosttest.RawDesc{Addr: tb, Len: 16, Flags: virtq.DescIndirect})
			f.ring.PutAvail(0)
		}, "INDIRECT_DESC not negotiated"},
		{"indirect inside indirect", true, func(f *fixture) {
			inner, _ := f.ring.WriteTable([]vhosttest.RawDesc{{Addr: buf(f), Len: 8}})
			outer, _ := f.ring.WriteTable([]vhosttest.RawDesc{{Addr: inner, Len: 16, Flags: virtq.DescIndirect}})
			f.ring.SetDesc(0, vhosttest.RawDesc{Addr: outer, Len: 16, Flags: virtq.DescIndirect})
			f.ring.PutAvail(0)
		}, "indirect descriptor inside an indirect table"},
		{"indirect with next", true, func(f *fixture) {
			tb, _ := f.ring.WriteTable([]vhosttest.RawDesc{{Addr: buf(f), Len: 8}})
			f.ring.SetDesc(0, vhosttest.RawDesc{Addr: tb, Len: 16, Flags: virtq.DescIndirect | virtq.DescNext, Next: 1})
			f.ring.PutAvail(0)
		}, "both INDIRECT and NEXT"},
		{"indirect length not multiple of 16", true, func(f *fixture) {
			tb, _ := f.ring.WriteTable([]vhosttest.RawDesc{{Addr: buf(f), Len: 8}})
			f.ring.SetDesc(0, vhosttest.RawDesc{Addr: tb, Len: 20, Flags: virtq.DescIndirect})
			f.ring.PutAvail(0)
		}, "multiple of 16"},
		{"indirect length zero", true, func(f *fixture) {
			f.ring.SetDesc(0, vhosttest.RawDesc{Addr: buf(f), Len: 0, Flags: virtq.DescIndirect})
			f.ring.PutAvail(0)
		}, "multiple of 16"},
		{"indirect table too large", true, func(f *fixture) {
			f.ring.SetDesc(0, vhosttest.RawDesc{Addr: 0, Len: 16 * 65536, Flags: virtq.DescIndirect})
			f.ring.PutAvail(0)
		}, "indirect table of 65536 entries after 0 descriptors exceeds the queue size 16"},
		{"indirect chain longer than the queue", true, func(f *fixture) {
			// A well-formed chain of n+1 one-byte writable buffers: only
			// its length is wrong.
			f.ring.PostIndirect(0, 0, chainTable(buf(f), n+1))
		}, "indirect table of 17 entries after 0 descriptors exceeds the queue size 16"},
		{"indirect chain of 65535 one-byte buffers", true, func(f *fixture) {
			f.ring.PostIndirect(0, 0, chainTable(buf(f), 65535))
		}, "indirect table of 65535 entries"},
		{"direct descriptors plus indirect table longer than the queue", true, func(f *fixture) {
			tb, _ := f.ring.WriteTable(chainTable(buf(f), n))
			f.ring.SetDesc(0, vhosttest.RawDesc{Addr: buf(f), Len: 8, Flags: virtq.DescNext, Next: 1})
			f.ring.SetDesc(1, vhosttest.RawDesc{Addr: tb, Len: 16 * n, Flags: virtq.DescIndirect})
			f.ring.PutAvail(0)
		}, "indirect table of 16 entries after 1 descriptors exceeds the queue size 16"},
		{"indirect table outside memory", true, func(f *fixture) {
			f.ring.SetDesc(0, vhosttest.RawDesc{Addr: guestmem.GPA(f.gm.Size() - 16), Len: 32, Flags: virtq.DescIndirect})
			f.ring.PutAvail(0)
		}, "indirect table"},
		{"indirect loop", true, func(f *fixture) {
			a := buf(f)
			tb, _ := f.ring.WriteTable([]vhosttest.RawDesc{
				{Addr: a, Len: 8, Flags: virtq.DescNext, Next: 1},
				{Addr: a, Len: 8, Flags: virtq.DescNext, Next: 0},
			})
			f.ring.SetDesc(0, vhosttest.RawDesc{Addr: tb, Len: 32, Flags: virtq.DescIndirect})
			f.ring.PutAvail(0)
		}, "descriptor loop"},
		{"indirect next beyond table", true, func(f *fixture) {
			tb, _ := f.ring.WriteTable([]vhosttest.RawDesc{{Addr: buf(f), Len: 8, Flags: virtq.DescNext, Next: 1}})
			f.ring.SetDesc(0, vhosttest.RawDesc{Addr: tb, Len: 16, Flags: virtq.DescIndirect})
			f.ring.PutAvail(0)
		}, "next index 1 out of range (table of 1)"},
		{"avail index jumps beyond queue size", false, func(f *fixture) { f.ring.SetAvailIdx(n + 1) }, "beyond queue size"},
		{"avail index runs backwards", false, func(f *fixture) { f.ring.SetAvailIdx(0xffff) }, "beyond queue size"},
		{"writable bytes exceed 2^32", false, func(f *fixture) {
			// Two 3 GiB descriptors: the region check would fail first, so
			// this is caught by translation — still an error, never a wrap.
			f.ring.SetDesc(0, vhosttest.RawDesc{Addr: 0, Len: 3 << 30, Flags: virtq.DescWrite | virtq.DescNext, Next: 1})
			f.ring.SetDesc(1, vhosttest.RawDesc{Addr: 0, Len: 3 << 30, Flags: virtq.DescWrite})
			f.ring.PutAvail(0)
		}, "queue 0 chain 0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, n, vhosttest.RingOptions{Indirect: tc.indirect})
			tc.setup(f)
			c, err := f.q.Pop()
			if c != nil || !errors.Is(err, virtq.ErrBroken) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Pop = %v, %v; want ErrBroken mentioning %q", c, err, tc.want)
			}
			// The queue stays broken and says why.
			if _, err2 := f.q.Pop(); !errors.Is(err2, virtq.ErrBroken) {
				t.Fatalf("second Pop: %v", err2)
			}
			if f.q.Flush() == nil || f.q.Err() == nil {
				t.Fatal("broken queue still flushes")
			}
		})
	}
}

// chainTable returns an indirect table of k one-byte device-writable
// buffers at a, linked in order.
func chainTable(a guestmem.GPA, k int) []vhosttest.RawDesc {
	t := make([]vhosttest.RawDesc, k)
	for i := range t {
		t[i] = vhosttest.RawDesc{Addr: a + guestmem.GPA(i%64), Len: 1, Flags: virtq.DescWrite | virtq.DescNext, Next: uint16(i + 1)}
	}
	t[k-1].Flags &^= virtq.DescNext
	return t
}

// TestChainAtQueueSize: chains of exactly Queue Size buffers, in an
// indirect table alone or after direct descriptors, are served whole, and
// the next chain still pops with its own head.
func TestChainAtQueueSize(t *testing.T) {
	const n = 16
	f := newFixture(t, n, vhosttest.RingOptions{Indirect: true})
	a, err := f.gm.Alloc(4096, 64)
	if err != nil {
		t.Fatal(err)
	}
	tb, err := f.ring.WriteTable(chainTable(a, n-1))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.ring.PostIndirect(3, 0, chainTable(a, n)); err != nil {
		t.Fatal(err)
	}
	f.ring.SetDesc(5, vhosttest.RawDesc{Addr: a, Len: 8, Flags: virtq.DescNext, Next: 6})
	f.ring.SetDesc(6, vhosttest.RawDesc{Addr: tb, Len: 16 * (n - 1), Flags: virtq.DescIndirect})
	f.ring.PutAvail(5)
	for _, want := range []struct {
		head       uint16
		rlen, wlen int
	}{{3, 0, n}, {5, 8, n - 1}} {
		c, err := f.q.Pop()
		if err != nil || c == nil {
			t.Fatalf("Pop = %v, %v", c, err)
		}
		if c.Head != want.head || c.ReadableLen() != want.rlen || c.WritableLen() != want.wlen {
			t.Fatalf("chain %d: %d readable, %d writable; want head %d, %d, %d", c.Head, c.ReadableLen(), c.WritableLen(), want.head, want.rlen, want.wlen)
		}
		f.q.Push(c, 0)
	}
	if c, err := f.q.Pop(); c != nil || err != nil {
		t.Fatalf("third Pop = %v, %v", c, err)
	}
}

func TestZeroLengthAndSplitRegions(t *testing.T) {
	// Two GPA-adjacent regions from two memfds: a buffer crossing the
	// boundary is split into two segments and read back whole.
	gm1, err := vhosttest.NewGuestMemory(1 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer gm1.Close()
	gm2, err := vhosttest.NewGuestMemoryOpts(1<<20, vhosttest.GuestMemoryOptions{Base: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer gm2.Close()
	mem := guestmem.NewMemory(0)
	defer mem.Close()
	if err := mem.SetTable([]guestmem.RegionSpec{gm1.Spec(), gm2.Spec()}, []int{gm1.Fd(), gm2.Fd()}); err != nil {
		t.Fatal(err)
	}
	r, err := vhosttest.NewRing(gm1, 8, vhosttest.RingOptions{})
	if err != nil {
		t.Fatal(err)
	}
	d, a, u := r.UVAs()
	q, err := virtq.New(mem, virtq.Config{Size: 8, Desc: d, Avail: a, Used: u})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	copy(gm1.Bytes(1<<20-3, 3), "abc")
	copy(gm2.Bytes(1<<20, 4), "defg")
	r.SetDesc(0, vhosttest.RawDesc{Addr: 0x2000, Len: 0, Flags: virtq.DescNext, Next: 1})
	r.SetDesc(1, vhosttest.RawDesc{Addr: 1<<20 - 3, Len: 7})
	r.PutAvail(0)
	c, err := q.Pop()
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Readable()) != 2 {
		t.Fatalf("%d segments, want 2", len(c.Readable()))
	}
	got, _ := io.ReadAll(ptr(c.Reader()))
	if string(got) != "abcdefg" {
		t.Fatalf("read %q", got)
	}
	q.Push(c, 0)
}

func TestEventIdxNotification(t *testing.T) {
	f := newFixture(t, 16, vhosttest.RingOptions{EventIdx: true})
	call, err := vhosttest.NewEventFD()
	if err != nil {
		t.Fatal(err)
	}
	defer call.Close()
	f.q.SetCall(call)
	count := func() uint64 {
		var b [8]byte
		n, err := unix.Read(int(call.Fd()), b[:])
		if err != nil || n != 8 {
			return 0
		}
		return uint64(b[0])
	}
	// The driver asks for an interrupt only when used idx passes 2.
	f.ring.SetUsedEvent(2)
	for i := 0; i < 4; i++ {
		if _, err := f.ring.Add(nil, []int{8}); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 4; i++ {
		c := f.pop(t)
		f.q.Push(c, 0)
		f.q.Flush()
		got := count()
		want := uint64(0)
		if i == 2 { // used idx moved 2 -> 3, crossing used_event 2
			want = 1
		}
		if got != want {
			t.Fatalf("after used idx %d: %d interrupts, want %d", i+1, got, want)
		}
	}
	// Kick suppression: EnableNotify publishes avail_event = last avail.
	if f.q.EnableNotify() {
		t.Fatal("EnableNotify reports pending work on an empty ring")
	}
	if _, err := f.ring.Add(nil, []int{8}); err != nil {
		t.Fatal(err)
	}
	if !f.ring.NeedKick() {
		t.Fatal("driver was not asked to kick after EnableNotify")
	}
	if !f.q.EnableNotify() {
		t.Fatal("EnableNotify missed an available chain")
	}
}

func TestNoInterruptFlag(t *testing.T) {
	f := newFixture(t, 8, vhosttest.RingOptions{})
	call, _ := vhosttest.NewEventFD()
	defer call.Close()
	f.q.SetCall(call)
	f.ring.SetNoInterrupt(true)
	f.ring.Add(nil, []int{1})
	f.q.Push(f.pop(t), 0)
	f.q.Flush()
	var b [8]byte
	if _, err := unix.Read(int(call.Fd()), b[:]); err == nil {
		t.Fatal("interrupt despite NO_INTERRUPT")
	}
	f.ring.SetNoInterrupt(false)
	f.ring.Add(nil, []int{1})
	f.q.Push(f.pop(t), 0)
	f.q.Flush()
	if _, err := unix.Read(int(call.Fd()), b[:]); err != nil {
		t.Fatal("no interrupt without NO_INTERRUPT")
	}
	// Kick suppression without EVENT_IDX uses used.flags.
	f.q.DisableNotify()
	f.ring.Add(nil, []int{1})
	if f.ring.NeedKick() {
		t.Fatal("driver kicks despite NO_NOTIFY")
	}
	if !f.q.EnableNotify() {
		t.Fatal("pending chain not reported")
	}
	f.ring.Add(nil, []int{1})
	if !f.ring.NeedKick() {
		t.Fatal("driver not asked to kick after EnableNotify")
	}
}

func TestStopAndBatching(t *testing.T) {
	f := newFixture(t, 8, vhosttest.RingOptions{})
	for i := 0; i < 3; i++ {
		f.ring.Add([][]byte{{byte(i)}}, []int{4})
	}
	a, b := f.pop(t), f.pop(t)
	f.q.Push(a, 1)
	f.q.Push(b, 2)
	if f.ring.UsedIdx() != 0 {
		t.Fatal("used entries visible before Flush")
	}
	if got := f.q.Stop(); got != 2 {
		t.Fatalf("Stop returned last avail %d, want 2", got)
	}
	if f.ring.UsedIdx() != 2 {
		t.Fatalf("Stop did not publish pending entries (used idx %d)", f.ring.UsedIdx())
	}
	if _, err := f.q.Pop(); !errors.Is(err, virtq.ErrStopped) {
		t.Fatalf("Pop after Stop: %v", err)
	}
	if f.q.Stop() != 2 || f.q.LastAvail() != 2 {
		t.Fatal("Stop not idempotent")
	}
	// Restart where the old queue stopped, as SET_VRING_BASE would.
	d, av, u := f.ring.UVAs()
	q2, err := virtq.New(f.mem, virtq.Config{Size: 8, Desc: d, Avail: av, Used: u, LastAvail: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer q2.Close()
	c, err := q2.Pop()
	if err != nil || c == nil {
		t.Fatalf("restarted queue: %v %v", c, err)
	}
	got, _ := io.ReadAll(ptr(c.Reader()))
	if !bytes.Equal(got, []byte{2}) {
		t.Fatalf("restarted queue read %v, want chain 2", got)
	}
	q2.Push(c, 0)
	q2.Flush()
	if f.ring.UsedIdx() != 3 {
		t.Fatalf("used idx %d, want 3 (continued from ring)", f.ring.UsedIdx())
	}
}

// TestRegionRemovedWhileChainHeld checks that a chain's memory stays mapped
// after its region is removed, until the chain is pushed.
func TestRegionRemovedWhileChainHeld(t *testing.T) {
	f := newFixture(t, 8, vhosttest.RingOptions{})
	f.ring.Add([][]byte{[]byte("still here")}, nil)
	c := f.pop(t)
	if err := f.mem.Remove(f.gm.Spec()); err != nil {
		t.Fatal(err)
	}
	if f.mem.Slots() != 0 {
		t.Fatal("region not removed from the table")
	}
	got, _ := io.ReadAll(ptr(c.Reader())) // would fault if unmapped
	if string(got) != "still here" {
		t.Fatalf("read %q", got)
	}
	f.q.Push(c, 0)
	f.q.Flush() // the ring areas are retained by the queue itself
	f.ring.Add([][]byte{[]byte("x")}, nil)
	if _, err := f.q.Pop(); !errors.Is(err, virtq.ErrBroken) {
		t.Fatalf("pop of a chain in removed memory: %v", err)
	}
}
