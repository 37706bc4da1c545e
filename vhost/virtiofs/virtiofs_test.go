package virtiofs_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/vsdp/vsdp/vhost"
	"github.com/vsdp/vsdp/vhost/guestmem"
	"github.com/vsdp/vsdp/vhost/vhosttest"
	"github.com/vsdp/vsdp/vhost/virtiofs"
	"github.com/vsdp/vsdp/vhost/virtiofs/virtiofstest"
)

const hello = "hello, virtiofs\n"

// rig is one device served over the fake front-end, with a client.
type rig struct {
	t    testing.TB
	mem  *virtiofstest.MemFS
	dev  *virtiofs.Device
	fe   *vhosttest.Frontend
	fd   *vhosttest.Device
	c    *virtiofstest.Client
	done <-chan error
	once sync.Once
}

func newRig(t testing.TB, m *virtiofstest.MemFS, o virtiofs.Options, co virtiofstest.Options) *rig {
	t.Helper()
	r := &rig{t: t, mem: m}
	raw := m.RawFS()
	devs := make(chan *virtiofs.Device, 1)
	srv := &vhost.Server{NewDevice: func() (vhost.Device, error) {
		d, err := virtiofs.New(raw, o)
		if err == nil {
			devs <- d
		}
		return d, err
	}}
	fe, done, err := vhosttest.Pair(srv)
	if err != nil {
		t.Fatal(err)
	}
	r.fe, r.done = fe, done
	fd, err := fe.Init(vhosttest.DeviceOptions{MemSize: 64 << 20, QueueSize: 1024, EventIdx: true, Indirect: true})
	if err != nil {
		t.Fatal(err)
	}
	r.fd = fd
	select {
	case r.dev = <-devs: // made when the session started, before Init's first reply
	case <-time.After(5 * time.Second):
		t.Fatal("no device was made")
	}
	if err := fd.Start(); err != nil {
		t.Fatal(err)
	}
	co.Indirect = true
	if r.c, err = virtiofstest.New(fd, co); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.close(); srv.Close() })
	return r
}

// close disconnects the front-end and waits until the session freed
// everything (the device's Close included).
func (r *rig) close() {
	r.once.Do(func() {
		r.c.Close()
		r.fe.Close()
		select {
		case <-r.done:
		case <-time.After(20 * time.Second):
			r.t.Error("session did not end")
		}
		r.fd.Close()
	})
}

func (r *rig) init() {
	r.t.Helper()
	out, err := r.c.Init()
	if err != nil {
		r.t.Fatal(err)
	}
	if out.Major != 7 || out.MaxWrite < 1<<20 && out.MaxWrite != uint32(r.dev.MaxRequest()-68<<10) {
		r.t.Fatalf("INIT reply %+v", out)
	}
}

func (r *rig) lookup(parent uint64, name string) uint64 {
	r.t.Helper()
	e, err := r.c.Lookup(parent, name)
	if err != nil {
		r.t.Fatalf("lookup %q: %v", name, err)
	}
	if e.NodeId == 0 {
		r.t.Fatalf("lookup %q: node 0", name)
	}
	return e.NodeId
}

func files() map[string][]byte {
	return map[string][]byte{"hello": []byte(hello), "data": nil}
}

func TestOps(t *testing.T) {
	vhosttest.CheckLeaks(t)
	r := newRig(t, virtiofstest.NewMemFS(files(), nil), virtiofs.Options{}, virtiofstest.Options{Uid: 1000, Gid: 1000, Pid: 42})
	r.init()
	c := r.c
	node := r.lookup(fuse.FUSE_ROOT_ID, "hello")
	if _, err := c.Lookup(fuse.FUSE_ROOT_ID, "absent"); !errors.Is(err, syscall.ENOENT) {
		t.Errorf("lookup of a missing name: %v, want ENOENT", err)
	}
	a, err := c.GetAttr(node)
	if err != nil {
		t.Fatal(err)
	}
	if a.Size != uint64(len(hello)) || a.Mode&syscall.S_IFMT != syscall.S_IFREG {
		t.Errorf("getattr: size %d mode %o", a.Size, a.Mode)
	}
	oo, err := c.Open(node, syscall.O_RDONLY)
	if err != nil {
		t.Fatal(err)
	}
	if oo.OpenFlags&fuse.FOPEN_DIRECT_IO == 0 {
		t.Errorf("open flags %#x, want DIRECT_IO", oo.OpenFlags)
	}
	got, err := c.Read(node, oo.Fh, 0, 4096)
	if err != nil || string(got) != hello {
		t.Errorf("read %q, %v", got, err)
	}
	if got, err := c.Read(node, oo.Fh, 7, 4); err != nil || string(got) != hello[7:11] {
		t.Errorf("read at 7: %q, %v", got, err)
	}
	if err := c.Release(node, oo.Fh); err != nil {
		t.Error(err)
	}

	co, err := c.Create(fuse.FUSE_ROOT_ID, "new", syscall.O_RDWR|syscall.O_CREAT, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if n, err := c.Write(co.NodeId, co.Fh, 0, []byte("created")); err != nil || n != 7 {
		t.Errorf("write: %d, %v", n, err)
	}
	if got := r.mem.File("new"); got == nil || string(got.Bytes()) != "created" {
		t.Errorf("created file holds %v", got)
	}
	if _, err := c.Create(fuse.FUSE_ROOT_ID, "new", syscall.O_RDWR|syscall.O_CREAT|syscall.O_EXCL, 0o644); !errors.Is(err, syscall.EEXIST) {
		t.Errorf("second create: %v, want EEXIST", err)
	}
	if _, err := c.Mkdir(fuse.FUSE_ROOT_ID, "dir", 0o755); err != nil {
		t.Fatal(err)
	}
	ents, err := c.ReadDir(fuse.FUSE_ROOT_ID)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name)
	}
	sort.Strings(names)
	want := []string{".", "..", "data", "dir", "hello", "new", "sub"}
	if !equal(names, want) {
		// go-fuse may leave out "." and ".."
		if !equal(names, want[2:]) {
			t.Errorf("readdir: %q, want %q", names, want)
		}
	}
	if err := c.Forget(node, 1); err != nil {
		t.Error(err)
	}
	s := r.dev.Stats()
	if s.Hiprio != 1 || s.BadChains != 0 || s.Requests < 10 || s.Replies != s.Requests+s.Hiprio {
		t.Errorf("stats %+v", s)
	}
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestLargeIO writes and reads 1 MiB through one request each way, with
// the payload in one descriptor, in 4 KiB pages, and in odd pieces; the
// content is checked by sha256 on the host and back in the guest.
func TestLargeIO(t *testing.T) {
	vhosttest.CheckLeaks(t)
	// 1100-byte pieces: 955 descriptors for 1 MiB, within the 1024-entry
	// ring (a driver must not build a longer chain, even indirect).
	for _, seg := range []int{0, 4096, 1100} {
		t.Run(map[int]string{0: "one-descriptor", 4096: "4KiB-descriptors", 1100: "1100B-descriptors"}[seg], func(t *testing.T) {
			r := newRig(t, virtiofstest.NewMemFS(files(), nil), virtiofs.Options{}, virtiofstest.Options{Seg: seg})
			r.init()
			node := r.lookup(fuse.FUSE_ROOT_ID, "data")
			oo, err := r.c.Open(node, syscall.O_RDWR)
			if err != nil {
				t.Fatal(err)
			}
			src := make([]byte, 1<<20)
			rng := rand.New(rand.NewPCG(uint64(seg), 7))
			for i := range src {
				src[i] = byte(rng.Uint32())
			}
			want := sha256.Sum256(src)
			n, err := r.c.Write(node, oo.Fh, 0, src)
			if err != nil || n != len(src) {
				t.Fatalf("write: %d, %v", n, err)
			}
			if got := sha256.Sum256(r.mem.File("data").Bytes()); got != want {
				t.Fatalf("file content sha256 %x, want %x", got, want)
			}
			back, err := r.c.Read(node, oo.Fh, 0, len(src))
			if err != nil {
				t.Fatal(err)
			}
			if got := sha256.Sum256(back); got != want || len(back) != len(src) {
				t.Fatalf("read back %d bytes, sha256 %x, want %x", len(back), got, want)
			}
			// A read at an offset that is not page aligned, into many
			// descriptors, ending short at EOF.
			back, err = r.c.Read(node, oo.Fh, 12345, 64<<10)
			if err != nil || !bytes.Equal(back, src[12345:12345+64<<10]) {
				t.Fatalf("offset read: %d bytes, %v", len(back), err)
			}
			back, err = r.c.Read(node, oo.Fh, int64(len(src)-100), 4096)
			if err != nil || !bytes.Equal(back, src[len(src)-100:]) {
				t.Fatalf("read at EOF: %d bytes, %v", len(back), err)
			}
		})
	}
}

// read runs a Read in the background.
func readAsync(c *virtiofstest.Client, node, fh uint64) <-chan error {
	ch := make(chan error, 1)
	go func() {
		b, err := c.Read(node, fh, 0, 4096)
		if err == nil && string(b) != "parked" {
			err = errors.New("parked read returned " + string(b))
		}
		ch <- err
	}()
	return ch
}

// TestParkedRead: a read parked in the filesystem does not starve other
// requests; released, it completes.
func TestParkedRead(t *testing.T) {
	vhosttest.CheckLeaks(t)
	gate := virtiofstest.NewGate()
	r := newRig(t, virtiofstest.NewMemFS(map[string][]byte{"hello": []byte(hello), "park": []byte("parked")}, gate, "park"),
		virtiofs.Options{}, virtiofstest.Options{})
	r.init()
	pn := r.lookup(fuse.FUSE_ROOT_ID, "park")
	po, err := r.c.Open(pn, syscall.O_RDONLY)
	if err != nil {
		t.Fatal(err)
	}
	parked := readAsync(r.c, pn, po.Fh)
	if !gate.WaitParked(1, 5*time.Second) {
		t.Fatal("the read never parked")
	}
	for i := range 20 {
		hn := r.lookup(fuse.FUSE_ROOT_ID, "hello")
		ho, err := r.c.Open(hn, syscall.O_RDONLY)
		if err != nil {
			t.Fatal(err)
		}
		if b, err := r.c.Read(hn, ho.Fh, 0, 100); err != nil || string(b) != hello {
			t.Fatalf("round %d: read %q, %v while another read is parked", i, b, err)
		}
		r.c.Release(hn, ho.Fh)
	}
	select {
	case err := <-parked:
		t.Fatalf("parked read finished before release: %v", err)
	default:
	}
	gate.Release(1)
	select {
	case err := <-parked:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("released read did not complete")
	}
}

// TestWorkerBound: with two workers, a third parked read waits in the ring
// and starts once a worker is free.
func TestWorkerBound(t *testing.T) {
	vhosttest.CheckLeaks(t)
	gate := virtiofstest.NewGate()
	r := newRig(t, virtiofstest.NewMemFS(map[string][]byte{"park": []byte("parked")}, gate, "park"),
		virtiofs.Options{Workers: 2}, virtiofstest.Options{})
	r.init()
	pn := r.lookup(fuse.FUSE_ROOT_ID, "park")
	po, err := r.c.Open(pn, syscall.O_RDONLY)
	if err != nil {
		t.Fatal(err)
	}
	var reads []<-chan error
	for range 3 {
		reads = append(reads, readAsync(r.c, pn, po.Fh))
	}
	if !gate.WaitParked(2, 5*time.Second) {
		t.Fatalf("%d reads parked, want 2", gate.Parked())
	}
	time.Sleep(100 * time.Millisecond) // the third would have parked by now
	if p := gate.Parked(); p != 2 {
		t.Fatalf("%d reads parked with 2 workers", p)
	}
	if s := r.dev.Stats(); s.InFlight != 2 || s.Stalls == 0 || s.MaxInFlight != 2 {
		t.Fatalf("stats %+v: want 2 in flight and a stall", s)
	}
	gate.Release(1)
	// One read completes; the waiting one takes its worker and parks.
	if !waitDone(reads, 1, 5*time.Second) {
		t.Fatal("no read completed after a release")
	}
	if !gate.WaitParked(2, 5*time.Second) {
		t.Fatalf("%d parked after a release, want 2 (the third started)", gate.Parked())
	}
	gate.Release(2)
	if !waitDone(reads, 3, 5*time.Second) {
		t.Fatal("reads did not all complete")
	}
	for _, ch := range reads {
		if err := <-ch; err != nil {
			t.Error(err)
		}
	}
	if s := r.dev.Stats(); s.MaxInFlight != 2 || s.InFlight != 0 {
		t.Errorf("stats %+v", s)
	}
}

// waitDone waits until at least n of the channels have a value ready
// (without taking it).
func waitDone(chs []<-chan error, n int, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		k := 0
		for _, ch := range chs {
			if len(ch) > 0 {
				k++
			}
		}
		if k >= n {
			return true
		}
		time.Sleep(5 * time.Millisecond)
	}
	return false
}

// TestStopParked: a disconnect while a read is parked hangs it up, through
// the cancelled context or the OnStop hook, and nothing leaks.
func TestStopParked(t *testing.T) {
	for _, tc := range []struct {
		name   string
		ignore bool // the filesystem ignores cancellation: OnStop frees it
	}{{"interrupt", false}, {"on-stop", true}} {
		t.Run(tc.name, func(t *testing.T) {
			vhosttest.CheckLeaks(t)
			gate := virtiofstest.NewGate()
			gate.IgnoreCancel = tc.ignore
			var stops sync.WaitGroup
			o := virtiofs.Options{StopTimeout: 10 * time.Second}
			if tc.ignore {
				stops.Add(1)
				var once sync.Once
				o.OnStop = func() { gate.HangUp(); once.Do(stops.Done) }
			}
			r := newRig(t, virtiofstest.NewMemFS(map[string][]byte{"park": []byte("parked")}, gate, "park"), o, virtiofstest.Options{})
			r.init()
			pn := r.lookup(fuse.FUSE_ROOT_ID, "park")
			po, err := r.c.Open(pn, syscall.O_RDONLY)
			if err != nil {
				t.Fatal(err)
			}
			_ = readAsync(r.c, pn, po.Fh)
			if !gate.WaitParked(1, 5*time.Second) {
				t.Fatal("the read never parked")
			}
			start := time.Now()
			r.close()
			if el := time.Since(start); el > 5*time.Second {
				t.Errorf("disconnect took %v with a parked read", el)
			}
			stops.Wait()
			if s := r.dev.Stats(); s.Dropped != 1 || s.InFlight != 0 {
				t.Errorf("stats %+v: want the parked request dropped", s)
			}
		})
	}
}

// raw encodes a fuse_in_header (length as given) and args.
func raw(length, op uint32, unique, node uint64, args ...[]byte) []byte {
	b := make([]byte, virtiofs.InHeaderSize)
	binary.LittleEndian.PutUint32(b[0:], length)
	binary.LittleEndian.PutUint32(b[4:], op)
	binary.LittleEndian.PutUint64(b[8:], unique)
	binary.LittleEndian.PutUint64(b[16:], node)
	for _, a := range args {
		b = append(b, a...)
	}
	return b
}

// sized encodes a request whose header length is right.
func sized(op uint32, unique, node uint64, args ...[]byte) []byte {
	b := raw(0, op, unique, node, args...)
	binary.LittleEndian.PutUint32(b, uint32(len(b)))
	return b
}

func le32s(v ...uint32) []byte {
	var b []byte
	for _, x := range v {
		b = binary.LittleEndian.AppendUint32(b, x)
	}
	return b
}

// TestHostileChains: every malformed chain gets an error reply where the
// chain has room for one, or comes back empty; the device stays healthy.
func TestHostileChains(t *testing.T) {
	vhosttest.CheckLeaks(t)
	const maxWrite = 64 << 10
	r := newRig(t, virtiofstest.NewMemFS(files(), nil), virtiofs.Options{Mount: &fuse.MountOptions{MaxWrite: maxWrite}},
		virtiofstest.Options{})
	r.init()
	node := r.lookup(fuse.FUSE_ROOT_ID, "hello")
	oo, err := r.c.Open(node, syscall.O_RDWR)
	if err != nil {
		t.Fatal(err)
	}
	readIn := func(size uint32) []byte { // fuse_read_in
		b := binary.LittleEndian.AppendUint64(nil, oo.Fh)
		b = binary.LittleEndian.AppendUint64(b, 0)
		return append(b, le32s(size, 0, 0, 0, 0, 0)...)
	}
	writeIn := func(size uint32) []byte { // fuse_write_in
		b := binary.LittleEndian.AppendUint64(nil, oo.Fh)
		b = binary.LittleEndian.AppendUint64(b, 0)
		b = append(b, le32s(size, 0)...)
		b = binary.LittleEndian.AppendUint64(b, 0)
		return append(b, le32s(0, 0)...)
	}
	getattrIn := make([]byte, 16)
	big := make([]byte, r.dev.MaxRequest()+1)
	copy(big, sized(virtiofs.OpWrite, 9, node, writeIn(uint32(len(big)-80))))
	binary.LittleEndian.PutUint32(big, uint32(len(big)))
	for _, tc := range []struct {
		name     string
		q        int
		readable [][]byte
		writable []int
		errno    syscall.Errno // 0: no reply expected (used length 0)
		bad      bool          // counted as a bad chain
	}{
		{"no writable part", 1, [][]byte{sized(virtiofs.OpGetAttr, 2, node, getattrIn)}, nil, 0, true},
		{"writable shorter than a reply header", 1, [][]byte{sized(virtiofs.OpGetAttr, 4, node, getattrIn)}, []int{8}, 0, true},
		{"no readable part", 1, nil, []int{64}, syscall.EINVAL, true},
		{"header cut short", 1, [][]byte{raw(40, virtiofs.OpGetAttr, 6, node)[:20]}, []int{64}, syscall.EINVAL, true},
		{"header length too long", 1, [][]byte{raw(200, virtiofs.OpGetAttr, 8, node, getattrIn)}, []int{128}, syscall.EINVAL, true},
		{"header length too short", 1, [][]byte{raw(40, virtiofs.OpGetAttr, 10, node, getattrIn)}, []int{128}, syscall.EINVAL, true},
		{"header length huge", 1, [][]byte{raw(0xffffffff, virtiofs.OpGetAttr, 12, node, getattrIn)}, []int{128}, syscall.EINVAL, true},
		{"oversized request", 1, virtiofstestSplit(big, 4096), []int{64}, syscall.E2BIG, true},
		{"READ args missing", 1, [][]byte{sized(virtiofs.OpRead, 14, node)}, []int{4096}, syscall.EINVAL, true},
		{"WRITE size beyond payload", 1, [][]byte{sized(virtiofs.OpWrite, 16, node, writeIn(100), []byte("abc"))}, []int{64}, syscall.EINVAL, true},
		{"WRITE size short of payload", 1, [][]byte{sized(virtiofs.OpWrite, 18, node, writeIn(1), []byte("abc"))}, []int{64}, syscall.EINVAL, true},
		{"READ larger than its room", 1, [][]byte{sized(virtiofs.OpRead, 20, node, readIn(1<<20))}, []int{16, 4096}, syscall.EIO, false},
		{"INIT of another major", 1, [][]byte{sized(virtiofs.OpInit, 22, 0, le32s(8, 31, 0, 0))}, []int{128}, syscall.EPROTO, true},
		{"INIT too old", 1, [][]byte{sized(virtiofs.OpInit, 24, 0, le32s(7, 5, 0, 0))}, []int{128}, syscall.EPROTO, true},
		{"INIT cut short", 1, [][]byte{sized(virtiofs.OpInit, 26, 0, le32s(7))}, []int{128}, syscall.EINVAL, true},
		{"unknown opcode", 1, [][]byte{sized(99, 28, node)}, []int{64}, syscall.ENOSYS, false},
		{"opcode with no handler", 1, [][]byte{sized(7, 30, node)}, []int{64}, syscall.ENOSYS, false},
		{"opcode 0", 1, [][]byte{sized(0, 32, node)}, []int{64}, syscall.ENOSYS, false},
		{"INTERRUPT on a request ring", 1, [][]byte{sized(virtiofs.OpInterrupt, 34, 0, make([]byte, 8))}, []int{64}, syscall.EINVAL, true},
		{"GETATTR on hiprio", 0, [][]byte{sized(virtiofs.OpGetAttr, 36, node, getattrIn)}, []int{128}, syscall.EINVAL, true},
		{"READ on hiprio", 0, [][]byte{sized(virtiofs.OpRead, 38, node, readIn(10))}, []int{16, 4096}, syscall.EINVAL, true},
		{"node never issued", 1, [][]byte{sized(virtiofs.OpGetAttr, 40, 0xdeadbeef, getattrIn)}, []int{128}, syscall.EIO, false},
		{"FORGET of a node never issued", 0, [][]byte{sized(virtiofs.OpForget, 42, 0xdeadbeef, make([]byte, 8))}, nil, 0, false},
		{"BATCH_FORGET count beyond entries", 0, [][]byte{sized(virtiofs.OpBatchForget, 44, 0, le32s(1000, 0), make([]byte, 16))}, nil, 0, false},
		{"INTERRUPT of nothing", 0, [][]byte{sized(virtiofs.OpInterrupt, 46, 0, make([]byte, 8))}, nil, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := r.dev.Stats()
			u, err := r.c.Raw(tc.q, tc.readable, tc.writable)
			if err != nil {
				t.Fatal(err)
			}
			after := r.dev.Stats()
			if tc.errno == 0 {
				if u.Len != 0 {
					t.Errorf("used length %d, want 0", u.Len)
				}
			} else {
				if u.Len != virtiofs.OutHeaderSize || len(u.Data) != virtiofs.OutHeaderSize {
					t.Fatalf("used length %d (%d bytes), want an error reply", u.Len, len(u.Data))
				}
				if got := -int32(binary.LittleEndian.Uint32(u.Data[4:])); syscall.Errno(got) != tc.errno && tc.name != "node never issued" {
					t.Errorf("errno %v, want %v", syscall.Errno(got), tc.errno)
				} else if got == 0 {
					t.Error("no error in the reply")
				}
				if binary.LittleEndian.Uint32(u.Data) != virtiofs.OutHeaderSize {
					t.Errorf("reply header length %d", binary.LittleEndian.Uint32(u.Data))
				}
			}
			if d := after.BadChains - before.BadChains; (d == 1) != tc.bad {
				t.Errorf("bad chains grew by %d, want bad=%v", d, tc.bad)
			}
		})
	}
	// Still healthy.
	if b, err := r.c.Read(node, oo.Fh, 0, 100); err != nil || string(b) != hello {
		t.Fatalf("read after hostile chains: %q, %v", b, err)
	}
}

func virtiofstestSplit(b []byte, n int) [][]byte {
	var r [][]byte
	for len(b) > n {
		r = append(r, b[:n])
		b = b[n:]
	}
	return append(r, b)
}

// TestOptions: invalid options are refused; zero values take defaults.
func TestOptions(t *testing.T) {
	raw := virtiofstest.NewMemFS(nil, nil).RawFS()
	for _, o := range []virtiofs.Options{{RequestQueues: -1}, {RequestQueues: virtiofs.MaxRequestQueues + 1}, {Workers: -1}, {StopTimeout: -1}} {
		if _, err := virtiofs.New(raw, o); !errors.Is(err, virtiofs.ErrInvalid) {
			t.Errorf("New(%+v): %v, want ErrInvalid", o, err)
		}
	}
	if _, err := virtiofs.New(nil, virtiofs.Options{}); !errors.Is(err, virtiofs.ErrInvalid) {
		t.Errorf("New(nil fs): %v", err)
	}
	d, err := virtiofs.New(raw, virtiofs.Options{RequestQueues: 3})
	if err != nil {
		t.Fatal(err)
	}
	info := d.Info()
	if info.Queues != 4 || info.Type != 26 || info.Config || info.Features != 0 || info.MaxQueueSize != 1024 {
		t.Errorf("info %+v", info)
	}
	if d.MaxRequest() != virtiofs.DefaultMaxWrite+68<<10 {
		t.Errorf("max request %d", d.MaxRequest())
	}
	if err := d.QueueStart(4, nil); !errors.Is(err, virtiofs.ErrNoQueue) {
		t.Errorf("QueueStart(4): %v", err)
	}
	if _, err := d.Kick(9); !errors.Is(err, virtiofs.ErrNoQueue) {
		t.Errorf("Kick(9): %v", err)
	}
	if err := d.GetConfig(0, make([]byte, 4)); err == nil {
		t.Error("GetConfig succeeded on a device without config space")
	}
	d.Close()
	d.Close()
}

// TestOverlongIndirectChain: a READ whose reply room is more one-byte
// buffers than the ring has entries (through an indirect table, which
// virtio 1.2 §2.7.5.3.1 forbids a driver) breaks the request ring with a
// ChainError: the err eventfd fires (the client fails with ErrRingBroken),
// the READ is never answered, a RELEASE posted after it is not served on
// the broken ring (so no reply can carry the READ's unique), and the hiprio
// ring keeps working.
func TestOverlongIndirectChain(t *testing.T) {
	vhosttest.CheckLeaks(t)
	for _, n := range []int{1025, 65000} {
		t.Run(fmt.Sprintf("%d-buffers", n), func(t *testing.T) {
			r := newRig(t, virtiofstest.NewMemFS(files(), nil), virtiofs.Options{}, virtiofstest.Options{})
			r.init()
			node := r.lookup(fuse.FUSE_ROOT_ID, "hello")
			oo, err := r.c.Open(node, syscall.O_RDWR)
			if err != nil {
				t.Fatal(err)
			}
			q := r.fd.Queues[1]
			readIn := binary.LittleEndian.AppendUint64(nil, oo.Fh)
			readIn = binary.LittleEndian.AppendUint64(readIn, 0)
			req := sized(virtiofs.OpRead, 1000, node, append(readIn, le32s(uint32(n), 0, 0, 0, 0, 0)...))
			in, err := q.Buffer(uint64(len(req)))
			if err != nil {
				t.Fatal(err)
			}
			copy(r.fd.Mem.Bytes(in, uint64(len(req))), req)
			room, err := q.Buffer(64)
			if err != nil {
				t.Fatal(err)
			}
			table := []vhosttest.RawDesc{{Addr: in, Len: uint32(len(req)), Flags: 1, Next: 1}}
			for i := range n {
				table = append(table, vhosttest.RawDesc{Addr: room + guestmem.GPA(i%64), Len: 1, Flags: 1 | 2, Next: uint16(i + 2)})
			}
			table[n].Flags = 2
			before, used := r.dev.Stats(), q.UsedIdx()
			if _, err := q.AddRawIndirect(table); err != nil {
				t.Fatal(err)
			}
			if err := q.Notify(true); err != nil {
				t.Fatal(err)
			}
			// A RELEASE after it: the broken ring serves nothing, and the
			// client hears of the break through the err eventfd at once
			// rather than timing out.
			rel := sized(virtiofs.OpRelease, 1002, node, binary.LittleEndian.AppendUint64(make([]byte, 0, 24), oo.Fh), make([]byte, 16))
			start := time.Now()
			if u, err := r.c.Raw(1, [][]byte{rel}, []int{64}); !errors.Is(err, virtiofstest.ErrRingBroken) {
				t.Fatalf("RELEASE after the break: %+v, %v; want ErrRingBroken", u, err)
			}
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("the break took %v to be noticed", d)
			}
			if q.UsedIdx() != used {
				t.Fatalf("used index moved %d→%d on a broken ring", used, q.UsedIdx())
			}
			if after := r.dev.Stats(); after.Requests != before.Requests || after.Replies != before.Replies {
				t.Fatalf("requests %d→%d, replies %d→%d on a broken ring", before.Requests, after.Requests, before.Replies, after.Replies)
			}
			// The hiprio ring still answers (an INTERRUPT of nothing comes
			// back empty).
			u, err := r.c.Raw(0, [][]byte{sized(virtiofs.OpInterrupt, 1004, 0, make([]byte, 8))}, nil)
			if err != nil || u.Len != 0 {
				t.Fatalf("hiprio after the break: %+v, %v", u, err)
			}
		})
	}
}
