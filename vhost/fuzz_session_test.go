package vhost_test

import (
	"errors"
	"os"
	"testing"
	"time"

	"github.com/vsdp/vsdp/vhost"
	"github.com/vsdp/vsdp/vhost/echo"
	"github.com/vsdp/vsdp/vhost/guestmem"
	"github.com/vsdp/vsdp/vhost/vhosttest"
)

// Operations of the session fuzzer; each reads its arguments from the input.
const (
	opRaw       = iota // req, flags, size, payload[size], nfds
	opFeatures         // u64 (masked to what is offered unless bit 7 of the first byte)
	opProtocol         // u64
	opMemTable         // -
	opAddMem           // -
	opRemMem           // -
	opVringNum         // idx, log2 size
	opVringAddr        // idx, mode (0: the real ring, else u16 offsets)
	opVringBase        // idx, u16
	opKick             // idx, fd mode (0 eventfd, 1 none, 2 memfd)
	opCall             // idx, fd mode
	opErr              // idx, fd mode
	opEnable           // idx, on
	opGetBase          // idx
	opGuestKick        // idx
	opScribble         // u16 offset, n, bytes[n]: overwrite guest memory (rings, tables)
	opTraffic          // n: post n TX messages and n RX buffers
	opMisc             // which: reset device, reset owner, set owner, get config, get queue num…
	opSettle           // what: wait (bounded by fuzzSession.settle) until an echo reached RX's used ring (even) or a ring broke (odd)
	numOps
)

// fuzzSession is one run: a server with an echo device, a fake front-end
// that sends without waiting (a goroutine drains replies), guest memory with
// two rings, and eventfds.
type fuzzSession struct {
	t      *testing.T
	srv    *vhost.Server
	f      *vhosttest.Frontend
	mem    *vhosttest.GuestMemory
	rings  [2]*vhosttest.Ring
	kick   [2]*os.File
	call   [2]*os.File
	errf   [2]*os.File
	data   []byte
	offset int
	// settle bounds opSettle: short while fuzzing, generous in the seed
	// test, whose assertions depend on the echo having happened.
	settle time.Duration
}

func (s *fuzzSession) byte() byte {
	if s.offset >= len(s.data) {
		return 0
	}
	b := s.data[s.offset]
	s.offset++
	return b
}

func (s *fuzzSession) bytes(n int) []byte {
	n = min(n, len(s.data)-s.offset)
	b := s.data[s.offset : s.offset+n]
	s.offset += n
	return b
}

func (s *fuzzSession) u16() uint16 { return uint16(s.byte()) | uint16(s.byte())<<8 }

func (s *fuzzSession) u64() uint64 {
	var v uint64
	for i := range 8 {
		v |= uint64(s.byte()) << (8 * i)
	}
	return v
}

func rawFD(f *os.File) int {
	var n int
	rc, _ := f.SyscallConn()
	_ = rc.Control(func(x uintptr) { n = int(x) })
	return n
}

func (s *fuzzSession) send(req vhost.Request, p vhost.Payload, fds ...int) {
	var b []byte
	if p != nil {
		b = p.Append(nil)
	}
	// A failed send means the back-end closed the connection: the rest of
	// the run just fails the same way.
	_ = s.f.Send(req, vhost.FlagVersion|vhost.FlagNeedReply, b, fds...)
}

func (s *fuzzSession) fdFor(mode byte, f *os.File) (vhost.U64, []int) {
	switch mode % 3 {
	case 1:
		return vhost.VringNoFD, nil
	case 2:
		return 0, []int{s.mem.Fd()}
	}
	return 0, []int{rawFD(f)}
}

func (s *fuzzSession) step() {
	const ringArea = 64 << 10
	idx := func() int { return int(s.byte() % 3) } // 2 is out of range
	ring := func(i int) *vhosttest.Ring { return s.rings[i%2] }
	switch op := s.byte() % numOps; op {
	case opRaw:
		req := vhost.Request(s.byte())
		flags := uint32(s.byte())
		if flags&0x80 == 0 {
			flags = vhost.FlagVersion | flags&vhost.FlagNeedReply
		}
		payload := s.bytes(int(s.byte() % 64))
		var fds []int
		for i := range int(s.byte() % 3) {
			fds = append(fds, rawFD(s.call[i%2]))
		}
		_ = s.f.Send(req, flags, payload, fds...)
	case opFeatures:
		v := s.u64()
		if v&0x80 == 0 {
			v &= vhost.FeatureVersion1 | vhost.FeatureIndirectDesc | vhost.FeatureEventIdx | vhost.FeatureProtocolFeatures
		}
		s.send(vhost.ReqSetFeatures, vhost.U64(v))
	case opProtocol:
		v := s.u64()
		if v&0x80 == 0 {
			v &= vhost.ProtocolMQ | vhost.ProtocolReplyAck | vhost.ProtocolConfig | vhost.ProtocolConfigureMemSlots | vhost.ProtocolResetDevice
		}
		s.send(vhost.ReqSetProtocolFeatures, vhost.U64(v))
	case opMemTable:
		s.send(vhost.ReqSetMemTable, vhost.MemTable{Regions: []guestmem.RegionSpec{s.mem.Spec()}}, s.mem.Fd())
	case opAddMem:
		s.send(vhost.ReqAddMemReg, vhost.MemRegion{Region: s.mem.Spec()}, s.mem.Fd())
	case opRemMem:
		s.send(vhost.ReqRemMemReg, vhost.MemRegion{Region: s.mem.Spec()})
	case opVringNum:
		i := idx()
		s.send(vhost.ReqSetVringNum, vhost.VringState{Index: uint32(i), Num: 1 << (s.byte() % 6)})
	case opVringAddr:
		i := idx()
		desc, avail, used := ring(i).UVAs()
		if s.byte()%2 == 1 {
			base := s.mem.UVA(0)
			desc = base + guestmem.UVA(s.u16())&^15
			avail = base + guestmem.UVA(s.u16())&^1
			used = base + guestmem.UVA(s.u16())&^3
		}
		s.send(vhost.ReqSetVringAddr, vhost.VringAddr{Index: uint32(i), Desc: desc, Avail: avail, Used: used})
	case opVringBase:
		i := idx()
		s.send(vhost.ReqSetVringBase, vhost.VringState{Index: uint32(i), Num: uint32(s.u16())})
	case opKick, opCall, opErr:
		i := idx()
		files := map[int][2]*os.File{opKick: s.kick, opCall: s.call, opErr: s.errf}[int(op)]
		flag, fds := s.fdFor(s.byte(), files[i%2])
		req := map[int]vhost.Request{opKick: vhost.ReqSetVringKick, opCall: vhost.ReqSetVringCall, opErr: vhost.ReqSetVringErr}[int(op)]
		s.send(req, vhost.U64(i)|flag, fds...)
	case opEnable:
		i := idx()
		s.send(vhost.ReqSetVringEnable, vhost.VringState{Index: uint32(i), Num: uint32(s.byte() % 2)})
	case opGetBase:
		s.send(vhost.ReqGetVringBase, vhost.VringState{Index: uint32(idx())})
	case opGuestKick:
		var one = []byte{1, 0, 0, 0, 0, 0, 0, 0}
		_, _ = s.kick[s.byte()%2].Write(one)
	case opScribble:
		off := guestmem.GPA(s.u16())
		b := s.bytes(int(s.byte() % 32))
		if uint64(off)+uint64(len(b)) <= ringArea {
			copy(s.mem.Bytes(off, uint64(len(b))), b)
		}
	case opTraffic:
		for range int(s.byte() % 8) {
			_, _ = s.rings[echo.TX].Add([][]byte{[]byte("fuzz message")}, nil)
			_, _ = s.rings[echo.RX].Add(nil, []int{64})
		}
	case opSettle:
		done := func() bool { return s.rings[echo.RX].UsedIdx() != 0 }
		if s.byte()%2 == 1 {
			done = func() bool { return s.srv.Stats().RingsBroken != 0 }
		}
		for end := time.Now().Add(s.settle); !done() && time.Now().Before(end); {
			time.Sleep(time.Millisecond)
		}
	case opMisc:
		switch s.byte() % 6 {
		case 0:
			s.send(vhost.ReqResetDevice, nil)
		case 1:
			s.send(vhost.ReqResetOwner, nil)
		case 2:
			s.send(vhost.ReqSetOwner, nil)
		case 3:
			s.send(vhost.ReqGetConfig, vhost.Config{Offset: uint32(s.byte() % 16), Data: make([]byte, 1+s.byte()%16)})
		case 4:
			s.send(vhost.ReqGetQueueNum, nil)
		case 5:
			s.send(vhost.ReqGetMaxMemSlots, nil)
		}
	}
}

// runFuzzSession runs one input and returns the server's and the device's
// counters.
func runFuzzSession(t *testing.T, data []byte, settle time.Duration) (vhost.Stats, echo.Stats) {
	var dev *echo.Device
	srv := &vhost.Server{NewDevice: echo.Factory(echo.Options{Config: make([]byte, 8), Budget: 4}, func(d *echo.Device) { dev = d })}
	defer srv.Close()
	f, done, err := vhosttest.Pair(srv)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s := &fuzzSession{t: t, f: f, data: data, settle: settle, srv: srv}
	if s.mem, err = vhosttest.NewGuestMemory(256 << 10); err != nil {
		t.Fatal(err)
	}
	defer s.mem.Close()
	for i := range 2 {
		if s.rings[i], err = vhosttest.NewRing(s.mem, 8, vhosttest.RingOptions{}); err != nil {
			t.Fatal(err)
		}
		for _, p := range []**os.File{&s.kick[i], &s.call[i], &s.errf[i]} {
			if *p, err = vhosttest.NewEventFD(); err != nil {
				t.Fatal(err)
			}
			defer (*p).Close()
		}
	}
	drained := make(chan struct{})
	barrier := make(chan struct{}, 1)
	go func() {
		defer close(drained)
		for {
			h, _, err := f.ReadReply()
			if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
				return
			}
			if err == nil && h.Request == vhost.ReqGetFeatures {
				select {
				case barrier <- struct{}{}:
				default:
				}
			}
		}
	}()
	for n := 0; n < 64 && s.offset < len(data); n++ {
		s.step()
	}
	// Wait until the back-end has handled everything (a GET_FEATURES round
	// trip), let the ring goroutines chew on it, then disconnect.
	if err := f.Send(vhost.ReqGetFeatures, vhost.FlagVersion, nil); err == nil {
		select {
		case <-barrier:
		case <-time.After(time.Second):
		}
	}
	time.Sleep(time.Millisecond)
	f.Close()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("session did not end within 5 s of the disconnect")
	}
	<-drained
	return srv.Stats(), dev.Stats()
}

// qemuLikeStart is a fuzz input that negotiates, maps memory and starts
// both rings the way QEMU does.
func qemuLikeStart() []byte {
	var b []byte
	b = append(b, opProtocol, 0x7f, 0xff, 0, 0, 0, 0, 0, 0) // masked to offered
	b = append(b, opFeatures, 0, 0, 0, 0x60, 1, 0, 0, 0)    // VERSION_1|EVENT_IDX|PROTOCOL_FEATURES
	b = append(b, opMemTable)
	for i := byte(0); i < 2; i++ {
		b = append(b, opVringNum, i, 3, opVringBase, i, 0, 0, opVringAddr, i, 0, opKick, i, 0, opCall, i, 0, opErr, i, 0)
	}
	return append(b, opEnable, 0, 1, opEnable, 1, 1, opTraffic, 7, opGuestKick, 1, opGuestKick, 0)
}

// The fuzzer's encoding reaches the deep states: the QEMU-like seed starts
// both rings and moves traffic, and a scribbled descriptor table breaks a
// ring. (Otherwise the fuzzer would only ever test validation.)
func TestFuzzSessionSeedsReachRings(t *testing.T) {
	// opSettle: the kicks are handled by the ring goroutines while
	// GET_VRING_BASE arrives on the socket; without a wait the rings can be
	// stopped before they have seen the kick.
	st, es := runFuzzSession(t, append(qemuLikeStart(), opSettle, 0, opGetBase, 0, opGetBase, 1), 10*time.Second)
	if st.RingsStarted != 2 || st.RingsStopped != 2 || st.Rejected != 0 {
		t.Fatalf("stats %+v", st)
	}
	if es.Messages == 0 {
		t.Fatalf("no traffic: %+v", es)
	}
	// TX's avail.idx lives at GPA 0x1162 (rings are laid out from 0x1000:
	// RX desc, avail, used, then TX desc at 0x10e0 and avail at 0x1160).
	st, _ = runFuzzSession(t, append(qemuLikeStart(), opScribble, 0x62, 0x11, 2, 200, 0, opGuestKick, 1, opSettle, 1), 10*time.Second)
	if st.RingsBroken == 0 {
		t.Fatalf("scribbled ring not broken: %+v", st)
	}
}

// FuzzSession feeds sequences of well-formed, malformed and hostile
// messages (plus guest kicks, ring scribbles and traffic) into a session
// over a socketpair. Whatever happens, the session must end promptly at
// disconnect and leave no fd, goroutine or mapping behind.
func FuzzSession(f *testing.F) {
	// A QEMU-like start, traffic, and stop.
	start := qemuLikeStart()
	f.Add(append(append([]byte(nil), start...), opSettle, 0, opEnable, 0, 0, opGetBase, 0, opGetBase, 1))
	// The same, then the guest scribbles over TX's avail index and its
	// descriptor table.
	f.Add(append(append([]byte(nil), start...), opScribble, 0x62, 0x11, 2, 200, 0, opGuestKick, 1))
	f.Add(append(append([]byte(nil), start...), opTraffic, 1, opScribble, 0x50, 0x11, 16, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0xff, 0xff, 1, 0, 5, 0, opGuestKick, 1))
	// Memory removed under running rings, then reset.
	f.Add(append(append([]byte(nil), start...), opRemMem, opTraffic, 3, opGuestKick, 1, opMisc, 0))
	// Raw junk and wrong fds.
	f.Add([]byte{opRaw, 5, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8, 2, opKick, 2, 2, opRaw, 99, 0x81, 0, 1})
	f.Add([]byte{opMisc, 3, opMisc, 1, opMisc, 2, opMisc, 2, opCall, 0, 2})
	f.Fuzz(func(t *testing.T, data []byte) {
		snap := vhosttest.TakeLeakSnapshot()
		runFuzzSession(t, data, 20*time.Millisecond)
		if err := snap.Check(5 * time.Second); err != nil {
			t.Fatal(err)
		}
	})
}
