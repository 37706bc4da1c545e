package vhost_test

import (
	"errors"
	"math/rand/v2"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vsdp/vsdp/vhost"
	"github.com/vsdp/vsdp/vhost/echo"
	"github.com/vsdp/vsdp/vhost/guestmem"
	"github.com/vsdp/vsdp/vhost/vhosttest"
	"github.com/vsdp/vsdp/vhost/virtq"
)

// QEMU 7.2's message order for vhost-user-vsock (ref/vm-recipes.md), with
// CONFIG and CONFIGURE_MEM_SLOTS offered, recorded through the Record hook.
func TestQEMU72Sequence(t *testing.T) {
	vhosttest.CheckLeaks(t)
	var got []vhost.Request
	var mu = make(chan struct{}, 1)
	srv := &vhost.Server{
		NewDevice: echo.Factory(echo.Options{Config: []byte{3, 0, 0, 0, 0, 0, 0, 0}}, nil),
		Record: func(m vhost.Message) {
			mu <- struct{}{}
			got = append(got, m.Header.Request)
			<-mu
		},
	}
	defer srv.Close()
	f, done, err := vhosttest.Pair(srv)
	if err != nil {
		t.Fatal(err)
	}
	d, err := f.Init(vhosttest.DeviceOptions{ConfigSize: 8})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := d.Start(); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Stop(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := waitDone(t, done); err != nil {
		t.Fatalf("session: %v", err)
	}
	R := func(r ...vhost.Request) []vhost.Request { return r }
	want := R(vhost.ReqGetFeatures, vhost.ReqGetProtocolFeatures, vhost.ReqSetProtocolFeatures,
		vhost.ReqGetQueueNum, vhost.ReqGetMaxMemSlots, vhost.ReqSetOwner, vhost.ReqGetFeatures,
		vhost.ReqSetVringCall, vhost.ReqSetVringErr, vhost.ReqSetVringCall, vhost.ReqSetVringErr,
		vhost.ReqGetConfig,
		vhost.ReqSetFeatures, vhost.ReqAddMemReg)
	for range 2 {
		want = append(want, vhost.ReqSetVringNum, vhost.ReqSetVringBase, vhost.ReqSetVringAddr, vhost.ReqSetVringKick)
	}
	want = append(want, vhost.ReqSetVringEnable, vhost.ReqSetVringEnable, vhost.ReqSetVringCall, vhost.ReqSetVringCall,
		vhost.ReqSetVringEnable, vhost.ReqSetVringEnable, vhost.ReqGetVringBase, vhost.ReqGetVringBase)
	if !slices.Equal(got, want) {
		t.Fatalf("recorded\n%v\nwant\n%v", got, want)
	}
	st := srv.Stats()
	if st.Total() != uint64(len(want)) || st.Rejected != 0 || st.Connections != 1 || st.Disconnects != 1 {
		t.Fatalf("stats %+v", st)
	}
	if d.Protocol != vhost.ProtocolMQ|vhost.ProtocolReplyAck|vhost.ProtocolConfig|vhost.ProtocolConfigureMemSlots|vhost.ProtocolResetDevice {
		t.Fatalf("protocol features offered %#x", d.Protocol)
	}
	if want := vhost.FeatureVersion1 | vhost.FeatureIndirectDesc | vhost.FeatureEventIdx | vhost.FeatureProtocolFeatures; d.Offered != want {
		t.Fatalf("features offered %#x, want %#x", d.Offered, want)
	}
}

// Malformed and out-of-range messages: each is rejected with the error for
// its fault, its fds are closed, and the session goes on.
func TestRejectedMessages(t *testing.T) {
	vhosttest.CheckLeaks(t)
	e := newEnv(t, echo.Options{})
	d, done := e.device(t, vhosttest.DeviceOptions{}, false)
	f := d.F
	ev := func() *os.File {
		file, err := vhosttest.NewEventFD()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { file.Close() })
		return file
	}
	fd := func(f *os.File) int {
		var n int
		rc, _ := f.SyscallConn()
		rc.Control(func(x uintptr) { n = int(x) })
		return n
	}
	pipeR, pipeW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pipeR.Close()
	defer pipeW.Close()
	small, err := vhosttest.NewGuestMemory(1 << 16)
	if err != nil {
		t.Fatal(err)
	}
	defer small.Close()
	u64 := func(v uint64) []byte { return vhost.U64(v).Append(nil) }
	vs := func(i, n uint32) []byte { return vhost.VringState{Index: i, Num: n}.Append(nil) }
	bigRegion := small.Spec()
	bigRegion.Size = 1 << 20 // larger than the memfd
	var many []int
	for range vhost.MaxFDs + 1 {
		many = append(many, fd(ev()))
	}
	const ok = vhost.FlagVersion | vhost.FlagNeedReply
	cases := []struct {
		name  string
		req   vhost.Request
		flags uint32
		p     []byte
		fds   []int
		want  error
	}{
		{"kick without fd", vhost.ReqSetVringKick, ok, u64(0), nil, vhost.ErrProtocol},
		{"kick with two fds", vhost.ReqSetVringKick, ok, u64(0), []int{fd(ev()), fd(ev())}, vhost.ErrProtocol},
		{"get features with an fd", vhost.ReqGetFeatures, vhost.FlagVersion, nil, []int{fd(ev())}, vhost.ErrProtocol},
		{"mem table with an extra fd", vhost.ReqSetMemTable, ok, vhost.MemTable{Regions: []guestmem.RegionSpec{small.Spec()}}.Append(nil), []int{small.Fd(), fd(ev())}, vhost.ErrProtocol},
		{"add region without fd", vhost.ReqAddMemReg, ok, vhost.MemRegion{Region: small.Spec()}.Append(nil), nil, vhost.ErrProtocol},
		{"more fds than allowed", vhost.ReqSetVringCall, ok, u64(0), many, vhost.ErrProtocol},
		{"undersized payload", vhost.ReqSetVringNum, ok, make([]byte, 4), nil, vhost.ErrProtocol},
		{"oversized payload", vhost.ReqSetFeatures, ok, make([]byte, 16), nil, vhost.ErrProtocol},
		{"version 2", vhost.ReqSetOwner, 2 | vhost.FlagNeedReply, nil, nil, vhost.ErrProtocol},
		{"reply flag", vhost.ReqSetOwner, ok | vhost.FlagReply, nil, nil, vhost.ErrProtocol},
		{"unknown flag", vhost.ReqSetOwner, ok | 0x10, nil, nil, vhost.ErrProtocol},
		{"unknown request", 99, ok, nil, []int{fd(ev())}, vhost.ErrUnsupported},
		{"log fd unsupported", vhost.ReqSetLogFD, ok, nil, []int{fd(ev())}, vhost.ErrUnsupported},
		{"inflight not negotiated", vhost.ReqGetInflightFD, vhost.FlagVersion, make([]byte, 24), nil, vhost.ErrUnsupported},
		{"polling kick", vhost.ReqSetVringKick, ok, u64(vhost.VringNoFD), nil, vhost.ErrUnsupported},
		{"queue index out of range", vhost.ReqSetVringNum, ok, vs(2, 128), nil, vhost.ErrInvalid},
		{"kick index out of range", vhost.ReqSetVringKick, ok, u64(7), []int{fd(ev())}, vhost.ErrInvalid},
		{"get base index out of range", vhost.ReqGetVringBase, vhost.FlagVersion, vs(200, 0), nil, vhost.ErrInvalid},
		{"ring size 3", vhost.ReqSetVringNum, ok, vs(0, 3), nil, vhost.ErrInvalid},
		{"ring size 65536", vhost.ReqSetVringNum, ok, vs(0, 65536), nil, vhost.ErrInvalid},
		{"base beyond 16 bits", vhost.ReqSetVringBase, ok, vs(0, 70000), nil, vhost.ErrInvalid},
		{"feature never offered", vhost.ReqSetFeatures, ok, u64(vhost.FeatureVersion1 | 1<<50), nil, vhost.ErrInvalid},
		{"protocol feature never offered", vhost.ReqSetProtocolFeatures, ok, u64(vhost.ProtocolMQ | vhost.ProtocolLogShmfd), nil, vhost.ErrInvalid},
		{"kick fd is a pipe", vhost.ReqSetVringKick, ok, u64(0), []int{fd(pipeR)}, vhost.ErrInvalid},
		{"call fd is a memfd", vhost.ReqSetVringCall, ok, u64(0), []int{small.Fd()}, vhost.ErrInvalid},
		{"region beyond its file", vhost.ReqAddMemReg, ok, vhost.MemRegion{Region: bigRegion}.Append(nil), []int{small.Fd()}, vhost.ErrInvalid},
		{"remove unknown region", vhost.ReqRemMemReg, ok, vhost.MemRegion{Region: small.Spec()}.Append(nil), []int{fd(ev())}, vhost.ErrInvalid},
		{"second owner", vhost.ReqSetOwner, ok, nil, nil, vhost.ErrState},
		{"kick before ring is configured", vhost.ReqSetVringKick, ok, u64(1), []int{fd(ev())}, nil},
	}
	for i, c := range cases {
		if err := f.Send(c.req, c.flags, c.p, c.fds...); err != nil {
			t.Fatalf("%s: send: %v", c.name, err)
		}
		if c.req.HasReply() || c.flags&vhost.FlagNeedReply != 0 {
			h, p, err := f.ReadReply()
			if err != nil {
				t.Fatalf("%s: reply: %v", c.name, err)
			}
			if h.Request != c.req {
				t.Fatalf("%s: reply to %s", c.name, h.Request)
			}
			switch {
			case c.req.HasReply() && len(p) != 0:
				t.Fatalf("%s: reply payload %x, want empty (rejected)", c.name, p)
			case !c.req.HasReply() && c.want != nil && (len(p) != 8 || p[0] == 0):
				t.Fatalf("%s: status %x, want non-zero", c.name, p)
			case !c.req.HasReply() && c.want == nil && (len(p) != 8 || p[0] != 0):
				t.Fatalf("%s: status %x, want 0", c.name, p)
			}
		}
		ev, found := e.rec.last(isMessage(c.req))
		if !found {
			t.Fatalf("%s: no trace event", c.name)
		}
		if c.want == nil && ev.Err != nil || c.want != nil && !errors.Is(ev.Err, c.want) {
			t.Fatalf("%s: error %v, want %v", c.name, ev.Err, c.want)
		}
		if c.want != nil {
			var me *vhost.MessageError
			if !errors.As(ev.Err, &me) || me.Request != c.req {
				t.Fatalf("%s: %v is not a *MessageError for %s", c.name, ev.Err, c.req)
			}
		}
		// The session is still fine.
		if _, err := f.GetFeatures(); err != nil {
			t.Fatalf("after %s (%d): %v", c.name, i, err)
		}
	}
	// Only the last case (a kick on an unconfigured, disabled ring) was accepted.
	if got, want := e.srv.Stats().Rejected, uint64(len(cases)-1); got != want {
		t.Fatalf("rejected %d, want %d", got, want)
	}
	f.Close()
	if err := waitDone(t, done); err != nil {
		t.Fatalf("session ended with %v", err)
	}
}

// Without REPLY_ACK negotiated, NEED_REPLY is ignored: no status comes, so
// the next reply read is GET_FEATURES'.
func TestNeedReplyWithoutReplyAck(t *testing.T) {
	vhosttest.CheckLeaks(t)
	e := newEnv(t, echo.Options{})
	d, _ := e.device(t, vhosttest.DeviceOptions{Protocol: vhost.ProtocolMQ}, false)
	f := d.F
	if err := f.Send(vhost.ReqSetVringNum, vhost.FlagVersion|vhost.FlagNeedReply, vhost.VringState{Index: 0, Num: 3}.Append(nil)); err != nil {
		t.Fatal(err)
	}
	if err := f.Send(vhost.ReqGetFeatures, vhost.FlagVersion, nil); err != nil {
		t.Fatal(err)
	}
	h, p, err := f.ReadReply()
	if err != nil || h.Request != vhost.ReqGetFeatures || len(p) != 8 {
		t.Fatalf("got %v %x %v, want the GET_FEATURES reply", h, p, err)
	}
	if e.srv.Stats().Rejected != 1 {
		t.Fatal("bad ring size was not rejected")
	}
}

// A header announcing more than MaxPayload makes the stream unparsable:
// the connection is closed and the session says why.
func TestOversizedHeaderClosesConnection(t *testing.T) {
	vhosttest.CheckLeaks(t)
	e := newEnv(t, echo.Options{})
	for _, c := range []struct {
		name string
		raw  []byte
		eof  bool // then the front-end closes its side
	}{
		{"size 4097", vhost.Header{Request: vhost.ReqSetMemTable, Flags: 1, Size: vhost.MaxPayload + 1}.Append(nil), false},
		{"size 4 GiB", vhost.Header{Request: vhost.ReqGetFeatures, Flags: 1, Size: 0xffffffff}.Append(nil), false},
		{"header cut short", []byte{1, 0, 0, 0, 1, 0}, true},
		{"payload cut short", append(vhost.Header{Request: vhost.ReqSetFeatures, Flags: 1, Size: 8}.Append(nil), 1, 2, 3), true},
	} {
		t.Run(c.name, func(t *testing.T) {
			f, done := e.pair(t)
			ev, err := vhosttest.NewEventFD()
			if err != nil {
				t.Fatal(err)
			}
			defer ev.Close()
			rc, _ := ev.SyscallConn()
			var efd int
			rc.Control(func(x uintptr) { efd = int(x) })
			if err := f.SendRaw(c.raw, efd); err != nil {
				t.Fatal(err)
			}
			if c.eof {
				f.Conn().CloseWrite()
			}
			err = waitDone(t, done)
			if !errors.Is(err, vhost.ErrProtocol) {
				t.Fatalf("session ended with %v, want ErrProtocol", err)
			}
			if _, _, err := f.ReadReply(); err == nil {
				t.Fatal("connection still open")
			}
		})
	}
}

func TestRingStateRules(t *testing.T) {
	vhosttest.CheckLeaks(t)
	e := newEnv(t, echo.Options{})
	d, _ := e.device(t, vhosttest.DeviceOptions{}, true)
	f := d.F
	if err := f.SetVringNum(0, 64); !errors.Is(err, vhosttest.ErrNack) {
		t.Fatalf("SET_VRING_NUM on a running ring: %v", err)
	}
	if ev, _ := e.rec.last(isMessage(vhost.ReqSetVringNum)); !errors.Is(ev.Err, vhost.ErrState) {
		t.Fatalf("error %v, want ErrState", ev.Err)
	}
	if err := f.SetVringAddr(1, 0x1000, 0x2000, 0x3000); !errors.Is(err, vhosttest.ErrNack) {
		t.Fatalf("SET_VRING_ADDR on a running ring: %v", err)
	}
	if err := f.SetFeatures(vhost.FeatureVersion1 | vhost.FeatureProtocolFeatures | vhost.FeatureEventIdx); !errors.Is(err, vhosttest.ErrNack) {
		t.Fatalf("feature change while running: %v", err)
	}
	if err := f.SetFeatures(d.Features); err != nil {
		t.Fatalf("same features again: %v", err)
	}
	// Enabling a ring whose areas are not mapped fails and leaves it stopped.
	if _, err := d.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := f.SetVringAddr(0, 0x1000, 0x2000, 0x3000); err != nil {
		t.Fatal(err)
	}
	if err := f.SetVringKick(0, d.Queues[0].Kick); err != nil {
		t.Fatal(err)
	}
	if err := f.SetVringEnable(0, true); !errors.Is(err, vhosttest.ErrNack) {
		t.Fatalf("enable with unmapped ring areas: %v", err)
	}
	if ev, _ := e.rec.last(isMessage(vhost.ReqSetVringEnable)); !errors.Is(ev.Err, vhost.ErrInvalid) || !errors.Is(ev.Err, virtq.ErrConfig) {
		t.Fatalf("error %v, want ErrInvalid wrapping virtq.ErrConfig", ev.Err)
	}
	if st := e.srv.Stats(); st.RingsStarted != 2 || st.RingsStopped != 2 {
		t.Fatalf("stats %+v", st)
	}
}

// GET_VRING_BASE stops a running ring at once: it never waits for a kick.
func TestStopNeverWaitsForKick(t *testing.T) {
	vhosttest.CheckLeaks(t)
	e := newEnv(t, echo.Options{})
	d, _ := e.device(t, vhosttest.DeviceOptions{Legacy: true, Queues: 2}, true)
	t0 := time.Now()
	for i := range 2 {
		if _, err := d.F.GetVringBase(i); err != nil {
			t.Fatal(err)
		}
	}
	if el := time.Since(t0); el > time.Second {
		t.Fatalf("stopping idle rings took %v", el)
	}
	if st := e.srv.Stats(); st.RingsStopped != 2 {
		t.Fatalf("stats %+v", st)
	}
}

// RESET_DEVICE stops everything and forgets ring set-up; the front-end then
// starts again.
func TestResetDevice(t *testing.T) {
	vhosttest.CheckLeaks(t)
	e := newEnv(t, echo.Options{})
	d, _ := e.device(t, vhosttest.DeviceOptions{}, true)
	if err := d.F.ResetDevice(); err != nil {
		t.Fatal(err)
	}
	if st := e.srv.Stats(); st.RingsStopped != 2 {
		t.Fatalf("reset left rings running: %+v", st)
	}
	// Ring configuration is gone: a kick on an enabled ring cannot start it.
	if err := d.F.SetFeatures(d.Features); err != nil {
		t.Fatal(err)
	}
	if err := d.F.SetVringEnable(0, true); err != nil {
		t.Fatal(err)
	}
	if err := d.F.SetVringKick(0, d.Queues[0].Kick); !errors.Is(err, vhosttest.ErrNack) {
		t.Fatalf("kick after reset without set-up: %v", err)
	}
	if ev, _ := e.rec.last(isMessage(vhost.ReqSetVringKick)); !errors.Is(ev.Err, vhost.ErrState) {
		t.Fatalf("error %v, want ErrState", ev.Err)
	}
	if err := d.Start(); err != nil {
		t.Fatal(err)
	}
	msgs := vhosttest.RandomMessages(rand.New(rand.NewPCG(7, 7)), 20, 1, 4000)
	recv, err := loopback(d, 4096).Run(msgs)
	if err != nil {
		t.Fatal(err)
	}
	checkEcho(t, msgs, recv)
}

// Hostile rings: each corruption breaks the ring it is on, with a
// virtq.ErrBroken error naming the fault, one err eventfd signal and one
// count; the connection and the other ring go on.
func TestHostileRings(t *testing.T) {
	const size = 16
	const memSize = 4 << 20
	type build func(t *testing.T, q *vhosttest.Queue) // corrupts TX
	buf := func(t *testing.T, q *vhosttest.Queue) guestmem.GPA {
		a, err := q.Buffer(256)
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	raw := func(a guestmem.GPA, n uint32, flags, next uint16) vhosttest.RawDesc {
		return vhosttest.RawDesc{Addr: a, Len: n, Flags: flags, Next: next}
	}
	const next, write, indirect = virtq.DescNext, virtq.DescWrite, virtq.DescIndirect
	cases := []struct {
		name     string
		indirect bool
		want     string
		build    build
	}{
		{"descriptor cycle", false, "loop", func(t *testing.T, q *vhosttest.Queue) { q.PostLoop(0, 3, buf(t, q)) }},
		{"chain longer than the queue", false, "loop", func(t *testing.T, q *vhosttest.Queue) { q.PostLoop(0, size, buf(t, q)) }},
		{"head out of range", false, "head index", func(t *testing.T, q *vhosttest.Queue) { q.PutAvail(size + 3) }},
		{"next out of range", false, "next index", func(t *testing.T, q *vhosttest.Queue) {
			q.PostChain(0, raw(buf(t, q), 64, next, size))
		}},
		{"address outside memory", false, "not mapped", func(t *testing.T, q *vhosttest.Queue) {
			q.PostChain(0, raw(memSize+4096, 64, 0, 0))
		}},
		{"straddling the region end", false, "not mapped", func(t *testing.T, q *vhosttest.Queue) {
			q.PostChain(0, raw(memSize-10, 100, 0, 0))
		}},
		{"address overflow", false, "not mapped", func(t *testing.T, q *vhosttest.Queue) {
			q.PostChain(0, raw(0xffff_ffff_ffff_fff0, 64, 0, 0))
		}},
		{"huge length", false, "not mapped", func(t *testing.T, q *vhosttest.Queue) {
			q.PostChain(0, raw(buf(t, q), 0xffff_ffff, 0, 0))
		}},
		{"readable after writable", false, "readable descriptor", func(t *testing.T, q *vhosttest.Queue) {
			b := buf(t, q)
			q.PostChain(0, raw(b, 64, write|next, 1), raw(b+64, 64, 0, 0))
		}},
		{"avail index jumps beyond the queue", false, "beyond queue size", func(t *testing.T, q *vhosttest.Queue) {
			q.SetAvailIdx(size + 1)
		}},
		{"indirect not negotiated", false, "not negotiated", func(t *testing.T, q *vhosttest.Queue) {
			if err := q.PostIndirect(0, 0, []vhosttest.RawDesc{raw(buf(t, q), 64, 0, 0)}); err != nil {
				t.Fatal(err)
			}
		}},
		{"indirect inside indirect", true, "inside an indirect", func(t *testing.T, q *vhosttest.Queue) {
			inner, err := q.WriteTable([]vhosttest.RawDesc{raw(buf(t, q), 64, 0, 0)})
			if err != nil {
				t.Fatal(err)
			}
			if err := q.PostIndirect(0, 0, []vhosttest.RawDesc{raw(inner, 16, indirect, 0)}); err != nil {
				t.Fatal(err)
			}
		}},
		{"indirect with next", true, "both INDIRECT and NEXT", func(t *testing.T, q *vhosttest.Queue) {
			if err := q.PostIndirect(0, next, []vhosttest.RawDesc{raw(buf(t, q), 64, 0, 0)}); err != nil {
				t.Fatal(err)
			}
		}},
		{"indirect table of 24 bytes", true, "multiple of 16", func(t *testing.T, q *vhosttest.Queue) {
			tbl, err := q.WriteTable([]vhosttest.RawDesc{raw(buf(t, q), 64, 0, 0), raw(buf(t, q), 64, 0, 0)})
			if err != nil {
				t.Fatal(err)
			}
			q.PostChain(0, raw(tbl, 24, indirect, 0))
		}},
		{"indirect table outside memory", true, "indirect table", func(t *testing.T, q *vhosttest.Queue) {
			q.PostChain(0, raw(memSize-16, 64, indirect, 0))
		}},
		{"cycle inside an indirect table", true, "loop", func(t *testing.T, q *vhosttest.Queue) {
			b := buf(t, q)
			if err := q.PostIndirect(0, 0, []vhosttest.RawDesc{raw(b, 64, next, 1), raw(b, 64, next, 0)}); err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			vhosttest.CheckLeaks(t)
			e := newEnv(t, echo.Options{})
			d, done := e.device(t, vhosttest.DeviceOptions{MemSize: memSize, QueueSize: size, Indirect: c.indirect, EventIdx: true}, true)
			tx := d.Queues[echo.TX]
			c.build(t, tx)
			if err := tx.Notify(true); err != nil {
				t.Fatal(err)
			}
			if ok, err := tx.WaitErr(5 * time.Second); !ok {
				t.Fatalf("err eventfd not signalled (%v); events %v", err, e.rec.all())
			}
			ev := e.rec.wait(t, "ring-broken", isBroken(echo.TX))
			var re *vhost.RingError
			if !errors.As(ev.Err, &re) || re.Queue != echo.TX || !errors.Is(ev.Err, virtq.ErrBroken) || !strings.Contains(ev.Err.Error(), c.want) {
				t.Fatalf("broken with %v, want a *RingError wrapping virtq.ErrBroken containing %q", ev.Err, c.want)
			}
			// More kicks on the dead ring change nothing.
			for range 10 {
				tx.Notify(true)
			}
			time.Sleep(20 * time.Millisecond)
			if st := e.srv.Stats(); st.RingsBroken != 1 {
				t.Fatalf("stats %+v, want exactly one broken ring", st)
			}
			if ok, _ := tx.WaitErr(10 * time.Millisecond); ok {
				t.Fatal("err eventfd signalled twice")
			}
			// The connection still answers; the broken ring stops where it broke.
			base, err := d.F.GetVringBase(echo.TX)
			if err != nil || base != 0 {
				t.Fatalf("GET_VRING_BASE: %d, %v", base, err)
			}
			if _, err := d.F.GetVringBase(echo.RX); err != nil {
				t.Fatal(err)
			}
			if st := e.srv.Stats(); st.RingsStopped != 2 || st.Rejected != 0 {
				t.Fatalf("stats %+v", st)
			}
			d.F.Close()
			if err := waitDone(t, done); err != nil {
				t.Fatalf("session ended with %v", err)
			}
		})
	}
}

// Corruption of RX found while serving a TX kick breaks both rings (the
// device cannot go on), each signalled once.
func TestCorruptionFoundFromOtherRing(t *testing.T) {
	vhosttest.CheckLeaks(t)
	e := newEnv(t, echo.Options{})
	d, _ := e.device(t, vhosttest.DeviceOptions{QueueSize: 16}, true)
	rx, tx := d.Queues[echo.RX], d.Queues[echo.TX]
	rx.PutAvail(40) // head out of range, not kicked
	if _, err := tx.Add([][]byte{[]byte("hello")}, nil); err != nil {
		t.Fatal(err)
	}
	tx.Notify(true)
	for _, q := range []*vhosttest.Queue{rx, tx} {
		if ok, _ := q.WaitErr(5 * time.Second); !ok {
			t.Fatalf("queue %d: err eventfd not signalled", q.Index)
		}
	}
	ev := e.rec.wait(t, "ring-broken", isBroken(echo.RX))
	if !errors.Is(ev.Err, virtq.ErrBroken) || !strings.Contains(ev.Err.Error(), "head index") {
		t.Fatalf("rx broken with %v", ev.Err)
	}
	e.rec.wait(t, "ring-broken", isBroken(echo.TX))
	if st := e.srv.Stats(); st.RingsBroken != 2 {
		t.Fatalf("stats %+v", st)
	}
}

// Descriptors may span GPA-adjacent regions: the chain is split across the
// two mappings and the data arrives intact.
func TestBufferSpanningAdjacentRegions(t *testing.T) {
	vhosttest.CheckLeaks(t)
	e := newEnv(t, echo.Options{})
	d, _ := e.device(t, vhosttest.DeviceOptions{MemSize: 1 << 20, Protocol: vhost.ProtocolMQ | vhost.ProtocolReplyAck}, false)
	hi, err := vhosttest.NewGuestMemoryOpts(1<<20, vhosttest.GuestMemoryOptions{Base: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer hi.Close()
	f := d.F
	d.Features = vhost.FeatureVersion1 | vhost.FeatureProtocolFeatures
	if err := f.SetFeatures(d.Features); err != nil {
		t.Fatal(err)
	}
	if err := f.SetMemTable(d.Mem, hi); err != nil {
		t.Fatal(err)
	}
	for _, q := range d.Queues {
		if err := d.SetupQueue(q, 0); err != nil {
			t.Fatal(err)
		}
		if err := f.SetVringEnable(q.Index, true); err != nil {
			t.Fatal(err)
		}
	}
	// TX: 300 bytes from 100 below the boundary; RX: 300 bytes the same way
	// from 1000 below it.
	msg := make([]byte, 300)
	for i := range msg {
		msg[i] = byte(i * 7)
	}
	copy(d.Mem.Bytes(1<<20-100, 100), msg[:100])
	copy(hi.Bytes(1<<20, 200), msg[100:])
	rx, tx := d.Queues[echo.RX], d.Queues[echo.TX]
	rx.PostChain(0, vhosttest.RawDesc{Addr: 1<<20 - 1000 + 800, Len: 300, Flags: virtq.DescWrite})
	tx.PostChain(0, vhosttest.RawDesc{Addr: 1<<20 - 100, Len: 300})
	rx.Notify(true)
	tx.Notify(true)
	deadline := time.Now().Add(5 * time.Second)
	// The device pushes the rx chain before it gives the tx chain back:
	// wait for both.
	for (rx.UsedIdx() != 1 || tx.UsedIdx() != 1) && time.Now().Before(deadline) {
		vhosttest.WaitCalls(100*time.Millisecond, rx, tx)
	}
	if rx.UsedIdx() != 1 || tx.UsedIdx() != 1 {
		t.Fatalf("used idx rx %d tx %d; events %v", rx.UsedIdx(), tx.UsedIdx(), e.rec.all())
	}
	got := append(append([]byte(nil), d.Mem.Bytes(1<<20-200, 200)...), hi.Bytes(1<<20, 100)...)
	if vhosttest.Digest(got) != vhosttest.Digest(msg) {
		t.Fatal("data across the region boundary differs")
	}
}

// SET_MEM_TABLE again and again while traffic flows: queues keep their
// mappings and pick up the new table; no byte is lost.
func TestSetMemTableWhileTrafficFlows(t *testing.T) {
	vhosttest.CheckLeaks(t)
	e := newEnv(t, echo.Options{})
	d, _ := e.device(t, vhosttest.DeviceOptions{MemSize: 32 << 20, Protocol: vhost.ProtocolMQ | vhost.ProtocolReplyAck, EventIdx: true}, true)
	msgs := vhosttest.RandomMessages(rand.New(rand.NewPCG(8, 8)), 300, 1, 16<<10)
	type result struct {
		recv [][]byte
		err  error
	}
	res := make(chan result, 1)
	go func() {
		recv, err := loopback(d, 16<<10).Run(msgs)
		res <- result{recv, err}
	}()
	tables := 0
	for {
		select {
		case r := <-res:
			if r.err != nil {
				t.Fatal(r.err)
			}
			checkEcho(t, msgs, r.recv)
			if tables == 0 {
				t.Fatal("traffic finished before any SET_MEM_TABLE")
			}
			if st := e.srv.Stats(); st.Messages[vhost.ReqSetMemTable] != uint64(tables+1) || st.Rejected != 0 || st.RingsBroken != 0 {
				t.Fatalf("stats %+v after %d tables", st, tables)
			}
			return
		default:
		}
		if err := d.F.SetMemTable(d.Mem); err != nil {
			t.Fatal(err)
		}
		tables++
		time.Sleep(time.Millisecond)
	}
}

// REM_MEM_REG of the region the rings live in, while traffic flows: the
// ring areas stay mapped (the queues hold them), buffers in the removed
// region break the ring, and nothing crashes or leaks.
func TestRemoveRegionInUse(t *testing.T) {
	vhosttest.CheckLeaks(t)
	e := newEnv(t, echo.Options{})
	d, done := e.device(t, vhosttest.DeviceOptions{MemSize: 16 << 20}, true)
	msgs := endless(vhosttest.RandomMessages(rand.New(rand.NewPCG(9, 9)), 100, 1, 4096))
	abort := make(chan struct{})
	lb := loopback(d, 4096)
	lb.Abort = abort
	lb.Stall = 200 * time.Millisecond
	res := make(chan error, 1)
	go func() { _, err := lb.Run(msgs); res <- err }()
	time.Sleep(20 * time.Millisecond)
	if err := d.F.RemMemReg(d.Mem.Spec()); err != nil {
		t.Fatalf("REM_MEM_REG: %v", err)
	}
	ev := e.rec.wait(t, "ring-broken", func(e vhost.Event) bool { return e.Kind == vhost.EventRingBroken })
	if !errors.Is(ev.Err, virtq.ErrBroken) || !strings.Contains(ev.Err.Error(), "not mapped") {
		t.Fatalf("ring broken with %v", ev.Err)
	}
	close(abort)
	if err := <-res; err == nil {
		t.Fatal("traffic completed although the memory went away")
	}
	if _, err := d.F.GetFeatures(); err != nil {
		t.Fatal(err)
	}
	d.F.Close()
	if err := waitDone(t, done); err != nil {
		t.Fatalf("session ended with %v", err)
	}
}

// A kick storm while traffic flows: kicks coalesce, the data is intact, and
// the ring goroutine's work stays proportional to the kicks it saw.
func TestKickStorm(t *testing.T) {
	vhosttest.CheckLeaks(t)
	e := newEnv(t, echo.Options{})
	d, _ := e.device(t, vhosttest.DeviceOptions{EventIdx: true}, true)
	stop := make(chan struct{})
	stormDone := make(chan int)
	go func() {
		n := 0
		defer func() { stormDone <- n }()
		for {
			select {
			case <-stop:
				return
			default:
			}
			for _, q := range d.Queues {
				if err := q.Notify(true); err != nil {
					return
				}
				n++
			}
		}
	}()
	msgs := vhosttest.RandomMessages(rand.New(rand.NewPCG(10, 10)), 300, 1, 8<<10)
	recv, err := loopback(d, 8<<10).Run(msgs)
	close(stop)
	writes := <-stormDone
	if err != nil {
		t.Fatal(err)
	}
	checkEcho(t, msgs, recv)
	st := e.srv.Stats()
	if writes < 100 || st.Kicks == 0 || st.Kicks > uint64(writes)+uint64(len(msgs))*2 {
		t.Fatalf("%d kick writes, %d kicks seen", writes, st.Kicks)
	}
	if _, err := d.F.GetFeatures(); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d kick writes coalesced into %d wake-ups", writes, st.Kicks)
}

// The front-end disconnects mid-traffic: the session frees everything
// (rings, goroutines, fds, mappings) at once.
func TestDisconnectMidTraffic(t *testing.T) {
	vhosttest.CheckLeaks(t)
	e := newEnv(t, echo.Options{})
	d, done := e.device(t, vhosttest.DeviceOptions{MemSize: 32 << 20}, true)
	msgs := endless(vhosttest.RandomMessages(rand.New(rand.NewPCG(11, 11)), 100, 1, 16<<10))
	lb := loopback(d, 16<<10)
	lb.Stall = 200 * time.Millisecond
	res := make(chan error, 1)
	go func() { _, err := lb.Run(msgs); res <- err }()
	// Disconnect once the device has answered some traffic (the rx used
	// index moved), however slow the machine.
	for deadline := time.Now().Add(10 * time.Second); d.Queues[0].UsedIdx() == 0; {
		if time.Now().After(deadline) {
			t.Fatal("no traffic within 10 s")
		}
		time.Sleep(time.Millisecond)
	}
	d.F.Close()
	if err := waitDone(t, done); err != nil {
		t.Fatalf("session ended with %v", err)
	}
	if err := <-res; err == nil {
		t.Fatal("traffic completed after the disconnect")
	}
	if lb.Completed == 0 {
		t.Fatal("no traffic before the disconnect")
	}
	st := e.srv.Stats()
	if st.RingsStopped != st.RingsStarted || st.Disconnects != 1 || len(e.srv.Sessions()) != 0 {
		t.Fatalf("stats %+v, sessions %d", st, len(e.srv.Sessions()))
	}
}

// Two front-ends at once on a listening socket: both get their own device;
// one breaks its ring, the other's traffic is unaffected; closing the server
// disconnects the rest.
func TestTwoFrontendsOnSocket(t *testing.T) {
	vhosttest.CheckLeaks(t)
	e := newEnv(t, echo.Options{})
	path := t.TempDir() + "/vhost.sock"
	served := make(chan error, 1)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	go func() { served <- e.srv.Serve(l) }()
	connect := func() *vhosttest.Device {
		f, err := vhosttest.Dial(path)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		d, err := f.Init(vhosttest.DeviceOptions{MemSize: 32 << 20, EventIdx: true, Indirect: true})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(d.Close)
		if err := d.Start(); err != nil {
			t.Fatal(err)
		}
		return d
	}
	good, bad := connect(), connect()
	if n := len(e.srv.Sessions()); n != 2 {
		t.Fatalf("%d sessions", n)
	}
	msgs := vhosttest.RandomMessages(rand.New(rand.NewPCG(12, 12)), 200, 1, 64<<10)
	res := make(chan error, 1)
	var recv [][]byte
	go func() {
		var err error
		recv, err = loopback(good, 64<<10).Run(msgs)
		res <- err
	}()
	bad.Queues[echo.TX].PostLoop(0, 4, 0x1000)
	bad.Queues[echo.TX].Notify(true)
	if ok, _ := bad.Queues[echo.TX].WaitErr(5 * time.Second); !ok {
		t.Fatal("hostile front-end's ring not broken")
	}
	if err := <-res; err != nil {
		t.Fatalf("the other front-end's traffic: %v", err)
	}
	checkEcho(t, msgs, recv)
	if st := e.srv.Stats(); st.RingsBroken != 1 || st.Connections != 2 {
		t.Fatalf("stats %+v", st)
	}
	e.srv.Close()
	if err := <-served; !errors.Is(err, vhost.ErrClosed) {
		t.Fatalf("Serve returned %v, want ErrClosed", err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("socket left behind: %v", err)
	}
	if _, err := good.F.GetFeatures(); err == nil {
		t.Fatal("front-end still served after Close")
	}
	e.srv.Close() // idempotent
	a, b, err := vhosttest.SocketPair()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if err := e.srv.ServeConn(b); !errors.Is(err, vhost.ErrClosed) {
		t.Fatalf("ServeConn after Close: %v", err)
	}
}

func TestListenAndServe(t *testing.T) {
	vhosttest.CheckLeaks(t)
	e := newEnv(t, echo.Options{})
	path := t.TempDir() + "/l.sock"
	served := make(chan error, 1)
	go func() { served <- e.srv.ListenAndServe(path) }()
	var f *vhosttest.Frontend
	for deadline := time.Now().Add(5 * time.Second); ; {
		var err error
		if f, err = vhosttest.Dial(path); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	defer f.Close()
	if _, err := f.GetFeatures(); err != nil {
		t.Fatal(err)
	}
	// A second server on the same path fails rather than stealing it.
	other := &vhost.Server{NewDevice: echo.Factory(echo.Options{}, nil)}
	if err := other.ListenAndServe(path); err == nil {
		t.Fatal("second listener on the same path")
	}
	e.srv.Close()
	if err := <-served; !errors.Is(err, vhost.ErrClosed) {
		t.Fatalf("ListenAndServe returned %v", err)
	}
}

// A device factory that fails ends the session at once, with its error.
func TestFactoryError(t *testing.T) {
	vhosttest.CheckLeaks(t)
	boom := errors.New("no device for you")
	srv := &vhost.Server{NewDevice: func() (vhost.Device, error) { return nil, boom }}
	defer srv.Close()
	f, done, err := vhosttest.Pair(srv)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := waitDone(t, done); !errors.Is(err, boom) {
		t.Fatalf("got %v", err)
	}
}

// endless repeats a pool of messages far beyond what a test runs before it
// interrupts the traffic.
func endless(pool [][]byte) [][]byte {
	out := make([][]byte, 0, 1000*len(pool))
	for range 1000 {
		out = append(out, pool...)
	}
	return out
}

// A front-end that saturates its call and err eventfds (counter at
// 0xfffffffffffffffe, so no signal fits) cannot wedge the back-end: ring
// goroutines parked on a signal are woken when the ring stops, a break is
// still reported by counters, and the session ends cleanly.
func TestSaturatedEventFDs(t *testing.T) {
	vhosttest.CheckLeaks(t)
	e := newEnv(t, echo.Options{})
	d, done := e.device(t, vhosttest.DeviceOptions{QueueSize: 16}, true)
	saturate := func(f *os.File) {
		b := vhost.U64(0xfffffffffffffffe).Append(nil)
		if _, err := f.Write(b); err != nil {
			t.Fatal(err)
		}
	}
	rx, tx := d.Queues[echo.RX], d.Queues[echo.TX]
	for _, q := range d.Queues {
		saturate(q.Call)
		saturate(q.Err)
	}
	if _, err := rx.Add(nil, []int{64}); err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Add([][]byte{[]byte("ping")}, nil); err != nil {
		t.Fatal(err)
	}
	tx.Notify(true)
	deadline := time.Now().Add(5 * time.Second)
	for rx.UsedIdx() != 1 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if rx.UsedIdx() != 1 {
		t.Fatal("message not echoed")
	}
	time.Sleep(10 * time.Millisecond) // the interrupt is now parked
	t0 := time.Now()
	if _, err := d.Stop(); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(t0); el > time.Second {
		t.Fatalf("stopping rings with a parked interrupt took %v", el)
	}
	// Restart and break TX: the err signal cannot be delivered, but the
	// break is counted and nothing waits for it.
	if err := d.Start(); err != nil {
		t.Fatal(err)
	}
	tx.PutAvail(99)
	tx.Notify(true)
	e.rec.wait(t, "ring-broken", isBroken(echo.TX))
	d.F.Close()
	if err := waitDone(t, done); err != nil {
		t.Fatalf("session ended with %v", err)
	}
	if st := e.srv.Stats(); st.RingsBroken != 1 || st.RingsStopped != st.RingsStarted {
		t.Fatalf("stats %+v", st)
	}
}

// An Exclusive server serves one front-end at a time: a second one, while
// the first is served, waits its bound and is refused (closed, counted,
// traced) without disturbing the first; a front-end that connects right
// after the first hung up waits for that session's end and is served.
func TestExclusive(t *testing.T) {
	vhosttest.CheckLeaks(t)
	var mu sync.Mutex
	var refused int
	srv := &vhost.Server{NewDevice: echo.Factory(echo.Options{}, nil), Exclusive: 300 * time.Millisecond,
		Trace: func(e vhost.Event) {
			if e.Kind == vhost.EventRefused {
				mu.Lock()
				refused++
				mu.Unlock()
			}
		}}
	path := t.TempDir() + "/x.sock"
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	first, err := vhosttest.Dial(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := first.GetFeatures(); err != nil {
		t.Fatal(err)
	}
	second, err := vhosttest.Dial(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := second.GetFeatures(); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("a second front-end beside the first: %v, want it refused (closed)", err)
	}
	second.Close()
	if _, err := first.GetFeatures(); err != nil {
		t.Fatalf("the first front-end after the refusal: %v", err)
	}
	mu.Lock()
	n := refused
	mu.Unlock()
	if st := srv.Stats(); st.Refused != 1 || n != 1 || st.Connections != 1 {
		t.Fatalf("stats %+v, refused events %d; want one refusal, one connection", st, n)
	}
	// The first hangs up; the next connects at once and is served.
	first.Close()
	third, err := vhosttest.Dial(path)
	if err != nil {
		t.Fatal(err)
	}
	defer third.Close()
	if _, err := third.GetFeatures(); err != nil {
		t.Fatalf("the front-end after the first hung up: %v", err)
	}
	if st := srv.Stats(); st.Refused != 1 || st.Connections != 2 {
		t.Fatalf("stats %+v; want the third served", st)
	}
	srv.Close()
	if err := <-served; !errors.Is(err, vhost.ErrClosed) {
		t.Fatalf("Serve returned %v", err)
	}
}
