package ibsdp_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/vsdp/vsdp/sdpback/internal/refpeer"
	"github.com/vsdp/vsdp/sdpback/internal/refpeer/ibsdp"
	"github.com/vsdp/vsdp/verbs"
	"github.com/vsdp/vsdp/verbs/soft"
)

var (
	addrA = netip.MustParseAddr("10.8.0.1")
	addrB = netip.MustParseAddr("10.8.0.2")
)

// devices returns two soft devices joined in process; at cleanup they must
// hold no resources.
func devices(t *testing.T) (*soft.Device, *soft.Device) {
	t.Helper()
	table, nw := soft.NewTable(), soft.NewNetwork()
	open := func(name string, a netip.Addr) *soft.Device {
		d, err := soft.Open(soft.Options{Name: name, Addrs: []netip.Addr{a}, Table: table, Network: nw})
		if err != nil {
			t.Fatal(err)
		}
		table.Set(a, d.Endpoint())
		t.Cleanup(func() {
			if r := d.Resources(); !r.Zero() {
				t.Errorf("device %s leaked %v", name, r)
			}
			d.Close()
		})
		return d
	}
	return open("a", addrA), open("b", addrB)
}

// pair connects a dialing Peer on A to an accepting Peer on B.
func pair(t *testing.T, oa, ob ibsdp.Options) (*ibsdp.Conn, *ibsdp.Conn) {
	t.Helper()
	da, db := devices(t)
	oa.Device, oa.Addr, ob.Device, ob.Addr = da, addrA, db, addrB
	l, err := ibsdp.Listen(ob, 20)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	type res struct {
		p   *ibsdp.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() { p, err := l.Accept(ctx); ch <- res{p, err} }()
	a, err := ibsdp.Dial(ctx, oa, netip.AddrPortFrom(addrB, 20))
	if err != nil {
		t.Fatal(err)
	}
	r := <-ch
	if r.err != nil {
		a.Close()
		t.Fatal(r.err)
	}
	t.Cleanup(func() { a.Close(); r.p.Close() })
	return a, r.p
}

func noViolations(t *testing.T, ps ...*ibsdp.Conn) {
	t.Helper()
	for _, p := range ps {
		if v := p.Violations(); len(v) > 0 {
			t.Fatalf("violations: %q", v)
		}
	}
}

// TestPeerHello: a Peer's Hello is gen2's: version 2.2, MaxAdverts 1,
// 32 KiB buffers plus the BSDH, its receive count as bufs.
func TestPeerHello(t *testing.T) {
	da, db := devices(t)
	pd, err := db.AllocPD()
	if err != nil {
		t.Fatal(err)
	}
	defer pd.Close()
	l, err := db.Listen(verbs.ListenOptions{Addr: addrB, ServiceID: verbs.SDPServiceID(21)})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	errc := make(chan error, 1)
	go func() {
		_, err := ibsdp.Dial(ctx, ibsdp.Options{Device: da, Addr: addrA}, netip.AddrPortFrom(addrB, 21))
		errc <- err
	}()
	req, err := l.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	hh, err := refpeer.ParseHello(req.PrivateData())
	req.Reject(nil)
	req.Close()
	if err != nil {
		t.Fatal(err)
	}
	if hh.MajMin != 0x22 || hh.MaxAdverts != 1 || hh.LocalRcvSz != 32784 || hh.DesRemRcvSz != 32784 ||
		hh.Bufs != ibsdp.DefaultBufs || hh.IPVCap != 0x40 || !bytes.Equal(hh.DstAddr[12:], addrB.AsSlice()) {
		t.Fatalf("Hello %+v", hh)
	}
	if err := <-errc; !errors.Is(err, verbs.ErrRefused) {
		t.Fatalf("dial after the REJ: %v, want ErrRefused", err)
	}
}

// TestPeerHelloAck: a Listener answers a valid Hello with gen2's HelloAck
// (version 2.2, MaxAdverts 1, ActRcvSz 32 KiB plus the BSDH, its receives
// as bufs) and rejects a Hello gen2 would refuse.
func TestPeerHelloAck(t *testing.T) {
	da, db := devices(t)
	l, err := ibsdp.Listen(ibsdp.Options{Device: db, Addr: addrB}, 22)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	accepted := make(chan []*ibsdp.Conn, 1)
	go func() {
		var ps []*ibsdp.Conn
		for ctx.Err() == nil {
			if p, err := l.Accept(ctx); err == nil {
				ps = append(ps, p)
			}
		}
		accepted <- ps
	}()
	defer func() {
		cancel()
		for _, p := range <-accepted {
			p.Close()
		}
	}()
	pd, err := da.AllocPD()
	if err != nil {
		t.Fatal(err)
	}
	defer pd.Close()
	cq, err := da.CreateCQ(verbs.CQOptions{Entries: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer cq.Close()
	dial := func(hh refpeer.HH) ([]byte, error) {
		b := addrB.As4()
		copy(hh.DstAddr[12:], b[:])
		cm, rep, err := verbs.Dial(ctx, da, verbs.DialConfig{
			Resolve: verbs.ResolveOptions{Addr: addrB, ServiceID: verbs.SDPServiceID(22)},
			PD:      pd, QP: verbs.QPOptions{SendCQ: cq, RecvCQ: cq, MaxSendWR: 1, MaxRecvWR: 1},
			Param: verbs.ConnParam{PrivateData: refpeer.MarshalHello(hh)},
		})
		if err == nil {
			cm.Disconnect()
			cm.QP().Close()
			cm.Close()
		}
		return rep, err
	}
	good := refpeer.HH{BSDH: refpeer.BSDH{Bufs: 4}, MajMin: 0x22, IPVCap: 0x40, MaxAdverts: 1, LocalRcvSz: 4096}
	rep, err := dial(good)
	if err != nil {
		t.Fatal(err)
	}
	hah, err := refpeer.ParseHelloAck(rep)
	if err != nil || hah.MajMin != 0x22 || hah.MaxAdverts != 1 || hah.ActRcvSz != 32784 || hah.Bufs != ibsdp.DefaultBufs || hah.Mseq != 0 {
		t.Fatalf("HelloAck %+v, %v", hah, err)
	}
	for name, hh := range map[string]refpeer.HH{
		"version 1.1":   {MajMin: 0x11, IPVCap: 0x40, MaxAdverts: 1, LocalRcvSz: 4096},
		"MaxAdverts 0":  {MajMin: 0x22, IPVCap: 0x40, LocalRcvSz: 4096},
		"IP version 5":  {MajMin: 0x22, IPVCap: 0x50, MaxAdverts: 1, LocalRcvSz: 4096},
		"LocalRcvSz 16": {MajMin: 0x22, IPVCap: 0x40, MaxAdverts: 1, LocalRcvSz: 16},
	} {
		if _, err := dial(hh); !errors.Is(err, verbs.ErrRefused) {
			t.Errorf("%s: %v, want a refusal", name, err)
		}
	}
}

// TestPeerStream: two Peers move data both ways and close gracefully
// (first closer disconnects the CM), each checking the other's rules.
func TestPeerStream(t *testing.T) {
	a, b := pair(t, ibsdp.Options{Bufs: 4, BufSize: 1024 + 16}, ibsdp.Options{})
	if a.MaxPayload() != 32768 || b.MaxPayload() != 1024 {
		t.Fatalf("payload limits %d, %d: want the peer's buffer size less the BSDH", a.MaxPayload(), b.MaxPayload())
	}
	msg := bytes.Repeat([]byte("stream"), 20000)
	if err := a.Write(msg, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := a.CloseWrite(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	got, err := b.ReadAll(5 * time.Second)
	if err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("read %d bytes (%v), want %d", len(got), err, len(msg))
	}
	if b.State() != "CLOSE_WAIT" {
		t.Fatalf("reader in %s after DisConn, want CLOSE_WAIT", b.State())
	}
	// The reverse direction still works: a's buffers are only 1 KiB, so
	// this is many messages through its four receives, with a reading
	// concurrently (each Peer is used by one goroutine).
	errc := make(chan error, 1)
	go func() {
		err := b.Write(msg[:50000], 5*time.Second)
		if err == nil {
			err = b.CloseWrite(5 * time.Second)
		}
		errc <- err
	}()
	got, err = a.ReadAll(5 * time.Second)
	if err != nil || !bytes.Equal(got, msg[:50000]) {
		t.Fatalf("reverse read %d bytes (%v)", len(got), err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if err := a.WaitState("TIME_WAIT", 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := b.WaitState("TIME_WAIT", 5*time.Second); err != nil {
		t.Fatalf("b: %v (the first closer's CM disconnect ends LAST_ACK)", err)
	}
	noViolations(t, a, b)
	if a.MinCredits() < 1 || b.MinCredits() < 1 {
		t.Fatalf("min credits %d, %d", a.MinCredits(), b.MinCredits())
	}
}

// TestPeerSecondSrcAvail: a SrcAvail arriving while one is being processed
// is taken as Data header and all (ref §10.5) and answered with SendSM;
// the first is answered with SendSM once its inline bytes were read.
func TestPeerSecondSrcAvail(t *testing.T) {
	a, b := pair(t, ibsdp.Options{}, ibsdp.Options{})
	sa := func(inline string, vaddr uint64) refpeer.Packet {
		return refpeer.Packet{BSDH: refpeer.BSDH{Mid: refpeer.MidSrcAvail},
			SrcAH: &refpeer.SrcAH{Len: 4096, Rkey: 0x51, Vaddr: vaddr}, Data: []byte(inline)}
	}
	if err := a.Send(sa("first", 0x1000), time.Second); err != nil {
		t.Fatal(err)
	}
	if err := a.Send(sa("second", 0x2000), time.Second); err != nil {
		t.Fatal(err)
	}
	// Both arrive before the reader takes anything: the first is still
	// being processed when the second lands.
	if err := b.WaitMessages(2, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 100)
	var got []byte
	for len(got) < 5+16+6 {
		n, err := b.Read(buf, 5*time.Second)
		if err != nil {
			t.Fatalf("after %q: %v", got, err)
		}
		got = append(got, buf[:n]...)
	}
	hdr := make([]byte, 16)
	binary.BigEndian.PutUint32(hdr[0:], 4096)
	binary.BigEndian.PutUint32(hdr[4:], 0x51)
	binary.BigEndian.PutUint64(hdr[8:], 0x2000)
	if want := append(append([]byte("first"), hdr...), "second"...); !bytes.Equal(got, want) {
		t.Fatalf("stream %x, want %x", got, want)
	}
	if b.SrcAvailsAsData() != 1 {
		t.Fatalf("%d SrcAvails taken as Data", b.SrcAvailsAsData())
	}
	// Two SendSMs reach the source: one for each SrcAvail.
	sendSMs := 0
	a.Poll(100 * time.Millisecond)
	for _, pk := range a.Log() {
		if pk.Mid == refpeer.MidSendSM {
			sendSMs++
		}
	}
	if sendSMs != 2 {
		t.Fatalf("%d SendSMs, want 2 (log %+v)", sendSMs, a.Log())
	}
}

// TestPeerResets: SinkAvail and AbortConn reset the connection (gen2), and
// the sender sees the CM disconnect as a reset.
func TestPeerResets(t *testing.T) {
	for _, pk := range []refpeer.Packet{
		{BSDH: refpeer.BSDH{Mid: refpeer.MidSinkAvail}, SinkAH: &refpeer.SinkAH{Len: 65536, Rkey: 1, Vaddr: 0x1000}},
		{BSDH: refpeer.BSDH{Mid: refpeer.MidAbort}},
	} {
		a, b := pair(t, ibsdp.Options{}, ibsdp.Options{})
		if err := a.Send(pk, time.Second); err != nil {
			t.Fatal(err)
		}
		if _, err := b.Read(make([]byte, 1), 5*time.Second); !errors.Is(err, ibsdp.ErrReset) {
			t.Fatalf("MID %#x: reader %v, want ErrReset", pk.Mid, err)
		}
		if _, err := a.Read(make([]byte, 1), 5*time.Second); !errors.Is(err, ibsdp.ErrReset) || !strings.Contains(err.Error(), "disconnected") {
			t.Fatalf("MID %#x: sender %v, want a reset by the disconnect", pk.Mid, err)
		}
	}
}

// TestPeerChecksReserve: the Peer notices a sender that breaks the
// two-credit reserve or sends data after its DisConn (so interop tests
// that find no violations mean something).
func TestPeerChecksReserve(t *testing.T) {
	a, b := pair(t, ibsdp.Options{}, ibsdp.Options{Bufs: 4})
	type res struct {
		got []byte
		err error
	}
	ch := make(chan res, 1)
	go func() { got, err := b.ReadAll(5 * time.Second); ch <- res{got, err} }()
	for i := range 4 { // credits 4, 3, 2, 1: the last two break the reserve
		if err := a.Send(refpeer.Packet{BSDH: refpeer.BSDH{Mid: refpeer.MidData}, Data: []byte{byte(i)}}, time.Second); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.CloseWrite(5 * time.Second); err != nil { // waits for credits, as gen2 does
		t.Fatal(err)
	}
	r := <-ch
	if r.err != nil || !bytes.Equal(r.got, []byte{0, 1, 2, 3}) {
		t.Fatalf("read %v, %v", r.got, r.err)
	}
	v := b.Violations()
	if len(v) != 2 || !strings.Contains(v[0], "with 2 credits") || !strings.Contains(v[1], "with 1 credits") {
		t.Fatalf("violations %q, want the two messages sent inside the reserve", v)
	}
	if err := a.Send(refpeer.Packet{BSDH: refpeer.BSDH{Mid: refpeer.MidData}, Data: []byte("late")}, time.Second); err != nil {
		t.Fatal(err)
	}
	b.WaitMessages(len(b.Log())+1, 5*time.Second)
	// (The raw send may also break the reserve, depending on how many
	// credits a had back by then.)
	if v := b.Violations(); len(v) < 3 || !strings.Contains(v[len(v)-1], "after DisConn") {
		t.Fatalf("violations %q, want data after DisConn", v)
	}
}
