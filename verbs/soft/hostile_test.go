package soft

import (
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/vsdp/vsdp/verbs"
)

// rawPeer speaks the soft wire format by hand, so a test can send what no
// honest peer would.
type rawPeer struct {
	t  testing.TB
	nc net.Conn
}

func (r *rawPeer) write(h header, payload []byte) {
	r.t.Helper()
	b := enc(h)
	r.nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := r.nc.Write(append(b, payload...)); err != nil {
		r.t.Fatalf("raw write %v: %v", h.typ, err)
	}
}

func (r *rawPeer) writeBytes(b []byte) error {
	r.nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_, err := r.nc.Write(b)
	return err
}

// read returns the next frame, or an error (EOF once soft closed the link).
func (r *rawPeer) read() (header, []byte, error) {
	r.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	hb := make([]byte, headerLen)
	if _, err := io.ReadFull(r.nc, hb); err != nil {
		return header{}, nil, err
	}
	h, err := decodeHeader(hb, maxMaxMsgSize)
	if err != nil {
		return header{}, nil, err
	}
	p := make([]byte, h.length)
	_, err = io.ReadFull(r.nc, p)
	return h, p, err
}

// readType reads frames until one of type typ.
func (r *rawPeer) readType(typ frameType) (header, []byte) {
	r.t.Helper()
	for {
		h, p, err := r.read()
		if err != nil {
			r.t.Fatalf("waiting for %v: %v", typ, err)
		}
		if h.typ == typ {
			return h, p
		}
	}
}

// expectClosed reads until soft closes the link.
func (r *rawPeer) expectClosed() {
	r.t.Helper()
	for i := 0; i < 1<<16; i++ {
		if _, _, err := r.read(); err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				r.t.Fatal("soft did not close the link")
			}
			return
		}
	}
	r.t.Fatal("soft kept sending")
}

const (
	rigPage  = 4096
	rigDepth = 8
)

// rig is a soft device with one accepted connection whose peer is a
// rawPeer. Its memory region is the middle page of three; the outer pages
// are guards that nothing may touch.
type rig struct {
	t        testing.TB
	dev      *Device
	ln       verbs.Listener
	pd       verbs.PD
	cq       verbs.CQ
	dma      *verbs.DMA
	mr       verbs.MR
	conn     verbs.Conn
	qp       verbs.QP
	raw      *rawPeer
	guardSum [32]byte
	ctx      context.Context
}

func (g *rig) guards() []byte {
	b := g.dma.Bytes()
	return append(append([]byte(nil), b[:rigPage]...), b[2*rigPage:]...)
}

// newRig connects a rawPeer (the active side) to a soft passive side.
func newRig(t *testing.T, o Options) *rig {
	t.Helper()
	done := checkLeaks(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	o.Name = "rig"
	o.Addrs = []netip.Addr{netip.MustParseAddr("10.9.0.1")}
	o.Listen = Endpoint{Net: "tcp", Addr: "127.0.0.4:0"}
	o.Table = NewTable()
	if o.MaxMsgSize == 0 {
		o.MaxMsgSize = 1 << 20
	}
	dev, err := Open(o)
	if err != nil {
		t.Fatal(err)
	}
	g := &rig{t: t, dev: dev, ctx: ctx}
	t.Cleanup(func() {
		g.close()
		done()
	})
	if g.ln, err = dev.Listen(verbs.ListenOptions{ServiceID: verbs.SDPServiceID(7)}); err != nil {
		t.Fatal(err)
	}
	g.pd, _ = dev.AllocPD()
	if g.cq, err = dev.CreateCQ(verbs.CQOptions{Entries: 64}); err != nil {
		t.Fatal(err)
	}
	if g.dma, err = verbs.AllocDMA(3 * rigPage); err != nil {
		t.Fatal(err)
	}
	copy(g.dma.Bytes(), pattern(99, 3*rigPage))
	g.guardSum = sha256.Sum256(g.guards())
	if g.mr, err = g.pd.RegMR(g.dma.Bytes()[rigPage:2*rigPage], verbs.AccessLocalWrite|verbs.AccessRemoteWrite|verbs.AccessRemoteRead); err != nil {
		t.Fatal(err)
	}
	nc, err := net.Dial("tcp", dev.Endpoint().Addr)
	if err != nil {
		t.Fatal(err)
	}
	g.raw = &rawPeer{t: t, nc: nc}
	g.raw.write(header{typ: frameREQ, length: 5, addr: uint64(verbs.SDPServiceID(7)), imm: ipv4(netip.MustParseAddr("10.9.0.2")),
		rkey: ipv4(o.Addrs[0]), psn: 0x77, dmaLen: rigDepth}, []byte("hello"))
	if g.conn, err = g.ln.Accept(ctx); err != nil {
		t.Fatal(err)
	}
	if got := string(g.conn.PrivateData()); got != "hello" {
		t.Fatalf("REQ private data %q", got)
	}
	if g.qp, err = g.conn.CreateQP(g.pd, verbs.QPOptions{SendCQ: g.cq, RecvCQ: g.cq, MaxSendWR: rigDepth, MaxRecvWR: rigDepth}); err != nil {
		t.Fatal(err)
	}
	if err := g.qp.PostRecv([]verbs.RecvWR{
		{ID: 1, SGL: []verbs.SGE{{Addr: g.mr.Addr(), Length: 64, LKey: g.mr.LKey()}}},
		{ID: 2, SGL: []verbs.SGE{{Addr: g.mr.Addr() + 64, Length: 64, LKey: g.mr.LKey()}}},
	}); err != nil {
		t.Fatal(err)
	}
	accepted := make(chan error, 1)
	go func() { accepted <- g.conn.Accept(ctx, verbs.ConnParam{PrivateData: []byte("welcome")}) }()
	h, p := g.raw.readType(frameREP)
	if string(p) != "welcome" || h.dmaLen != rigDepth {
		t.Fatalf("REP %+v %q", h, p)
	}
	g.raw.write(header{typ: frameRTU}, nil)
	if err := <-accepted; err != nil {
		t.Fatal(err)
	}
	return g
}

func (g *rig) close() {
	if g.raw != nil {
		g.raw.nc.Close()
	}
	var errs []error
	for _, c := range []interface{ Close() error }{g.qp, g.conn, g.ln, g.mr, g.cq, g.pd} {
		if c != nil {
			errs = append(errs, c.Close())
		}
	}
	if g.dma != nil {
		errs = append(errs, g.dma.Close())
	}
	errs = append(errs, g.dev.Close())
	if err := errors.Join(errs...); err != nil {
		g.t.Error(err)
	}
}

// waitEvent waits for an event of type want and returns it.
func (g *rig) waitEvent(want verbs.EventType) verbs.Event {
	g.t.Helper()
	for {
		select {
		case ev := <-g.conn.Events():
			if ev.Type == want {
				return ev
			}
		case <-g.ctx.Done():
			g.t.Fatalf("no %v event", want)
		}
	}
}

// checkFlushed checks the QP is in the error state with both receives
// flushed, and that the guard pages are untouched.
func (g *rig) checkBroken() {
	g.t.Helper()
	if s := g.qp.State(); s != verbs.QPError {
		g.t.Errorf("QP in %v, want ERR", s)
	}
	wc := make([]verbs.Completion, 4)
	n, err := verbs.PollWait(g.ctx, g.cq, wc)
	for n < 2 && err == nil {
		var k int
		k, err = verbs.PollWait(g.ctx, g.cq, wc[n:])
		n += k
	}
	if err != nil || n != 2 || wc[0].ID != 1 || wc[1].ID != 2 || wc[0].Status != verbs.StatusFlushed || wc[1].Status != verbs.StatusFlushed {
		g.t.Errorf("receives: %+v %v, want both flushed", wc[:n], err)
	}
	if sha256.Sum256(g.guards()) != g.guardSum {
		g.t.Error("memory outside the registered region changed")
	}
}

// protocolBreak checks that the peer's frames were refused as a protocol
// violation: request-error event with a FrameError, disconnect, link closed.
func (g *rig) protocolBreak() {
	g.t.Helper()
	ev := g.waitEvent(verbs.EventQPRequestError)
	if !errors.Is(ev.Err, verbs.ErrProtocol) {
		g.t.Errorf("request error cause %v, want ErrProtocol", ev.Err)
	}
	g.waitEvent(verbs.EventDisconnected)
	g.checkBroken()
	g.raw.expectClosed()
	if g.dev.Stats().ProtocolErrors == 0 {
		g.t.Error("protocol error not counted")
	}
}

// accessRefused checks a refused remote access: NAK, access event, error
// state, no protocol error.
func (g *rig) accessRefused(psn uint32) {
	g.t.Helper()
	h, _ := g.raw.readType(frameNak)
	if h.code != nakAccess || h.psn != psn {
		g.t.Errorf("NAK %+v, want access NAK for psn %d", h, psn)
	}
	g.waitEvent(verbs.EventQPAccessError)
	g.checkBroken()
	if g.dev.Stats().ProtocolErrors != 0 {
		g.t.Error("an access violation was counted as a protocol error")
	}
}

func TestHostileRequester(t *testing.T) {
	for _, tc := range []struct {
		name string
		run  func(g *rig)
	}{
		{"bad version", func(g *rig) {
			b := enc(header{typ: frameAck})
			b[0] = 7
			g.raw.writeBytes(b)
			g.protocolBreak()
		}},
		{"length above the maximum", func(g *rig) {
			g.raw.writeBytes(enc(header{typ: frameSend, length: 1<<20 + 1}))
			g.protocolBreak()
		}},
		{"unknown frame type", func(g *rig) {
			g.raw.writeBytes(enc(header{typ: 200}))
			g.protocolBreak()
		}},
		{"psn jump", func(g *rig) {
			g.raw.write(header{typ: frameSend, psn: 5, length: 4}, []byte("abcd"))
			g.protocolBreak()
		}},
		{"ack with nothing outstanding", func(g *rig) {
			g.raw.write(header{typ: frameAck, psn: 0}, nil)
			g.protocolBreak()
		}},
		{"second RTU", func(g *rig) {
			g.raw.write(header{typ: frameRTU}, nil)
			g.protocolBreak()
		}},
		{"REQ after connect", func(g *rig) {
			g.raw.write(header{typ: frameREQ, dmaLen: 1}, nil)
			g.protocolBreak()
		}},
		{"unknown rkey", func(g *rig) {
			g.raw.write(header{typ: frameWrite, length: 8, addr: g.mr.Addr(), rkey: g.mr.RKey() ^ 0x00ffff00}, []byte("12345678"))
			g.accessRefused(0)
		}},
		{"write below the region", func(g *rig) {
			g.raw.write(header{typ: frameWrite, length: 32, addr: g.mr.Addr() - 16, rkey: g.mr.RKey()}, make([]byte, 32))
			g.accessRefused(0)
		}},
		{"write past the region", func(g *rig) {
			g.raw.write(header{typ: frameWrite, length: 32, addr: g.mr.Addr() + rigPage - 16, rkey: g.mr.RKey()}, make([]byte, 32))
			g.accessRefused(0)
		}},
		{"write with wrapping address", func(g *rig) {
			g.raw.write(header{typ: frameWrite, length: 32, addr: ^uint64(0) - 8, rkey: g.mr.RKey()}, make([]byte, 32))
			g.accessRefused(0)
		}},
		{"read past the region", func(g *rig) {
			g.raw.write(header{typ: frameReadReq, addr: g.mr.Addr() + 8, rkey: g.mr.RKey(), dmaLen: rigPage}, nil)
			g.accessRefused(0)
		}},
		{"send longer than the receive", func(g *rig) {
			g.raw.write(header{typ: frameSend, length: 100}, make([]byte, 100))
			h, _ := g.raw.readType(frameNak)
			if h.code != nakInvalidReq {
				g.t.Errorf("NAK %+v, want invalid request", h)
			}
			wc := make([]verbs.Completion, 2)
			n, err := verbs.PollWait(g.ctx, g.cq, wc)
			if err != nil || n < 1 || wc[0].Status != verbs.StatusLocalLength {
				g.t.Errorf("receive completion %+v %v, want LOC_LEN_ERR", wc[:n], err)
			}
		}},
		{"truncated payload", func(g *rig) {
			g.raw.writeBytes(append(enc(header{typ: frameWrite, length: 64, addr: g.mr.Addr(), rkey: g.mr.RKey()}), 1, 2, 3))
			g.raw.nc.(*net.TCPConn).CloseWrite()
			ev := g.waitEvent(verbs.EventDisconnected)
			if !errors.Is(ev.Err, verbs.ErrDisconnected) {
				g.t.Errorf("disconnect cause %v", ev.Err)
			}
			g.checkBroken()
		}},
		{"read flood without reading answers", func(g *rig) {
			// Requests whose answers the peer never reads: once the socket
			// buffers fill, unanswered requests pile up to the bound and
			// the link is reset; memory stays bounded.
			var err error
			for psn := uint32(0); psn < 1<<16 && err == nil; psn++ {
				err = g.raw.writeBytes(enc(header{typ: frameReadReq, psn: psn, addr: g.mr.Addr(), rkey: g.mr.RKey(), dmaLen: rigPage}))
			}
			g.waitEvent(verbs.EventDisconnected)
			if g.dev.Stats().ProtocolErrors == 0 {
				g.t.Error("flood not refused as a protocol error")
			}
			if s := g.qp.State(); s != verbs.QPError {
				g.t.Errorf("QP in %v after a flood", s)
			}
		}},
		{"frames after DREQ", func(g *rig) {
			g.raw.write(header{typ: frameDREQ}, nil)
			g.raw.readType(frameDREP)
			// Soft closes the link after its DREP; later frames go nowhere.
			for i := 0; i < 100; i++ {
				if g.raw.writeBytes(enc(header{typ: frameSend, psn: uint32(i)})) != nil {
					break
				}
			}
			ev := g.waitEvent(verbs.EventDisconnected)
			if ev.Err != nil {
				g.t.Errorf("graceful disconnect carries %v", ev.Err)
			}
			g.checkBroken()
			g.raw.expectClosed()
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.run(newRig(t, Options{}))
		})
	}
}

// TestHostileHandshake covers links that never become connections.
func TestHostileHandshake(t *testing.T) {
	defer checkLeaks(t)()
	tab := NewTable()
	d, err := Open(Options{Name: "hs", Addrs: []netip.Addr{netip.MustParseAddr("10.9.1.1")}, Table: tab,
		Listen: Endpoint{Net: "tcp", Addr: "127.0.0.5:0"}, HandshakeTimeout: 200 * time.Millisecond, MaxHandshakes: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	ln, err := d.Listen(verbs.ListenOptions{ServiceID: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dial := func(t *testing.T) *rawPeer {
		nc, err := net.Dial("tcp", d.Endpoint().Addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { nc.Close() })
		return &rawPeer{t: t, nc: nc}
	}
	dropped := func(t *testing.T, before uint64) {
		t.Helper()
		for i := 0; i < 200 && d.Stats().HandshakesDropped == before; i++ {
			time.Sleep(5 * time.Millisecond)
		}
		if d.Stats().HandshakesDropped == before {
			t.Error("dropped handshake not counted")
		}
	}
	for _, tc := range []struct {
		name string
		send func(r *rawPeer)
	}{
		{"silent", func(*rawPeer) {}},
		{"half a header", func(r *rawPeer) { r.writeBytes(make([]byte, 10)) }},
		{"data first", func(r *rawPeer) { r.write(header{typ: frameSend, length: 1}, []byte{1}) }},
		{"REQ with too much private data", func(r *rawPeer) { r.writeBytes(enc(header{typ: frameREQ, length: 93, dmaLen: 1})) }},
		{"REQ cut short", func(r *rawPeer) {
			r.writeBytes(append(enc(header{typ: frameREQ, length: 50, dmaLen: 1}), 1, 2))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := d.Stats().HandshakesDropped
			r := dial(t)
			tc.send(r)
			r.expectClosed()
			dropped(t, before)
		})
	}
	t.Run("no listener", func(t *testing.T) {
		r := dial(t)
		r.write(header{typ: frameREQ, addr: 99, rkey: ipv4(netip.MustParseAddr("10.9.1.1")), dmaLen: 1}, nil)
		h, _ := r.readType(frameREJ)
		if verbs.RejectReason(h.imm) != verbs.RejectInvalidServiceID {
			t.Errorf("REJ reason %v", verbs.RejectReason(h.imm))
		}
		r.expectClosed()
	})
	t.Run("wrong destination address", func(t *testing.T) {
		r := dial(t)
		r.write(header{typ: frameREQ, addr: 1, rkey: ipv4(netip.MustParseAddr("10.9.1.2")), dmaLen: 1}, nil)
		h, _ := r.readType(frameREJ)
		if verbs.RejectReason(h.imm) != verbs.RejectInvalidServiceID {
			t.Errorf("REJ reason %v", verbs.RejectReason(h.imm))
		}
	})
	t.Run("handshake slots bounded", func(t *testing.T) {
		// Two silent links fill the slots; a third is closed at once.
		before := d.Stats().HandshakesDropped
		a, b := dial(t), dial(t)
		for i := 0; i < 200 && d.handshakeCount() < 2; i++ {
			time.Sleep(5 * time.Millisecond)
		}
		if n := d.handshakeCount(); n != 2 {
			t.Fatalf("%d links in their handshake, want 2", n)
		}
		// The third is reset at once (possibly before its dial returns).
		if nc, err := net.Dial("tcp", d.Endpoint().Addr); err == nil {
			(&rawPeer{t: t, nc: nc}).expectClosed()
			nc.Close()
		}
		dropped(t, before)
		if n := d.handshakeCount(); n != 2 {
			t.Errorf("%d links in their handshake after the third was refused, want 2", n)
		}
		a.expectClosed()
		b.expectClosed()
	})
}

// hostileResponder connects a soft active side to a rawPeer passive side.
func hostileResponder(t *testing.T, o Options) (*rawPeer, verbs.Conn, verbs.QP, verbs.CQ, verbs.MR, func()) {
	t.Helper()
	done := checkLeaks(t)
	ln, err := net.Listen("tcp", "127.0.0.6:0")
	if err != nil {
		t.Fatal(err)
	}
	peer := netip.MustParseAddr("10.9.2.2")
	tab := NewTable()
	tab.Set(peer, Endpoint{Net: "tcp", Addr: ln.Addr().String()})
	o.Name, o.Addrs, o.Table = "active", []netip.Addr{netip.MustParseAddr("10.9.2.1")}, tab
	d, err := Open(o)
	if err != nil {
		t.Fatal(err)
	}
	pd, _ := d.AllocPD()
	cq, _ := d.CreateCQ(verbs.CQOptions{Entries: 64})
	dma, _ := verbs.AllocDMA(rigPage)
	mr, err := pd.RegMR(dma.Bytes(), verbs.AccessLocalWrite)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	raw := make(chan *rawPeer, 1)
	go func() {
		nc, err := ln.Accept()
		if err != nil {
			raw <- nil
			return
		}
		r := &rawPeer{t: t, nc: nc}
		if h, _, err := r.read(); err != nil || h.typ != frameREQ {
			raw <- nil
			return
		}
		r.nc.Write(enc(header{typ: frameREP, psn: 0x99, dmaLen: rigDepth}))
		raw <- r
	}()
	c, _, err := verbs.Dial(ctx, d, verbs.DialConfig{Resolve: verbs.ResolveOptions{Addr: peer, ServiceID: 1}, PD: pd,
		QP: verbs.QPOptions{SendCQ: cq, RecvCQ: cq}, Param: verbs.ConnParam{}})
	if err != nil {
		t.Fatal(err)
	}
	r := <-raw
	if r == nil {
		t.Fatal("raw peer handshake failed")
	}
	r.readType(frameRTU)
	cleanup := func() {
		r.nc.Close()
		ln.Close()
		err := errors.Join(c.QP().Close(), c.Close(), mr.Close(), dma.Close(), cq.Close(), pd.Close(), d.Close())
		if err != nil {
			t.Error(err)
		}
		done()
	}
	return r, c, c.QP(), cq, mr, cleanup
}

func TestHostileResponder(t *testing.T) {
	for _, tc := range []struct {
		name   string
		answer func(r *rawPeer, req header)
		want   verbs.Status
	}{
		{"ack from the future", func(r *rawPeer, req header) { r.write(header{typ: frameAck, psn: req.psn + 5}, nil) }, verbs.StatusBadResponse},
		{"read response of the wrong length", func(r *rawPeer, req header) {
			r.write(header{typ: frameReadResp, psn: req.psn, length: 4}, []byte("abcd"))
		}, verbs.StatusBadResponse},
		{"ack passing a read", func(r *rawPeer, req header) { r.write(header{typ: frameAck, psn: req.psn}, nil) }, verbs.StatusBadResponse},
		{"unknown NAK syndrome", func(r *rawPeer, req header) { r.writeBytes(enc(header{typ: frameNak, psn: req.psn, code: 42})) }, verbs.StatusBadResponse},
		{"remote operational error", func(r *rawPeer, req header) { r.write(header{typ: frameNak, psn: req.psn, code: nakRemoteOp}, nil) }, verbs.StatusRemoteOp},
		{"silence", func(*rawPeer, header) {}, verbs.StatusRetryExceeded},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, c, qp, cq, mr, cleanup := hostileResponder(t, Options{AckTimeout: 300 * time.Millisecond})
			defer cleanup()
			err := qp.PostSend([]verbs.SendWR{
				{ID: 1, Op: verbs.OpRead, Flags: verbs.SendSignaled, SGL: []verbs.SGE{{Addr: mr.Addr(), Length: 64, LKey: mr.LKey()}}, RemoteAddr: 0x1000, RKey: 0x100},
				{ID: 2, Op: verbs.OpWrite, Flags: verbs.SendSignaled},
			})
			if err != nil {
				t.Fatal(err)
			}
			req, _ := r.readType(frameReadReq)
			tc.answer(r, req)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			wc := make([]verbs.Completion, 2)
			n := 0
			for n < 2 {
				k, err := verbs.PollWait(ctx, cq, wc[n:])
				if err != nil {
					t.Fatal(err)
				}
				n += k
			}
			if wc[0].ID != 1 || wc[0].Status != tc.want || wc[1].Status != verbs.StatusFlushed {
				t.Fatalf("completions %+v, want %v then a flush", wc, tc.want)
			}
			if s := qp.State(); s != verbs.QPError {
				t.Errorf("QP in %v", s)
			}
			_ = c
		})
	}
}

func (d *Device) handshakeCount() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.handshakes)
}
