package soft

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/vsdp/vsdp/verbs"
)

// streamOps turns fuzz bytes into a stream of frames from a hostile peer.
// Addresses are relative to the registered region (base), so the fuzzer
// reaches valid, misaligned and out-of-range accesses alike; keys are the
// region's or arbitrary ones.
func streamOps(data []byte, base uint64, rkey uint32) []byte {
	var out []byte
	psn := uint32(0)
	for len(data) >= 12 {
		op, sel := data[0], data[1]
		n := uint32(binary.BigEndian.Uint16(data[2:4]))
		off := int64(int32(binary.BigEndian.Uint32(data[4:8])))
		arb := binary.BigEndian.Uint32(data[8:12])
		data = data[12:]
		key := rkey
		if sel&1 != 0 {
			key = arb
		}
		p := psn
		if sel&2 != 0 {
			p += uint32(sel >> 4) // out of sequence
		}
		addr := uint64(int64(base) + off)
		var h header
		switch op % 9 {
		case 0:
			h = header{typ: frameSend, psn: p, length: n % 300, flags: sel >> 2 & 5}
			if h.flags&flagImm != 0 {
				h.imm = arb
			}
		case 1:
			h = header{typ: frameWrite, psn: p, length: n % 5000, addr: addr, rkey: key}
		case 2:
			h = header{typ: frameReadReq, psn: p, addr: addr, rkey: key, dmaLen: n % 5000}
		case 3:
			h = header{typ: frameSend, psn: p, flags: flagInv, imm: key}
		case 4:
			h = header{typ: []frameType{frameAck, frameNak, frameReadResp}[sel%3], psn: arb}
			if h.typ == frameNak {
				h.code = nakAccess
			}
		case 5:
			h = header{typ: frameType(sel%6 + 1), dmaLen: 1}
			if h.typ == frameRTU || h.typ == frameDREQ || h.typ == frameDREP || h.typ == frameREJ {
				h.dmaLen = 0
			}
		case 6: // a raw header made of fuzz bytes
			if len(data) >= headerLen {
				out = append(out, data[:headerLen]...)
				data = data[headerLen:]
			}
			continue
		case 7: // a write of the region's own memory through a wrapping address
			h = header{typ: frameWrite, psn: p, length: n % 64, addr: ^uint64(0) - uint64(arb%64), rkey: key}
		case 8:
			h = header{typ: frameWrite, flags: flagImm, psn: p, imm: arb, length: n % 64, addr: addr, rkey: key}
		}
		if h.typ.isRequest() {
			psn++
		}
		out = append(out, enc(h)...)
		out = append(out, make([]byte, h.length)...)
	}
	return out
}

// FuzzStream feeds a connected soft responder a hostile byte stream. It must
// never panic, never touch memory outside the registered region, and end the
// connection (the link closes after the stream).
func FuzzStream(f *testing.F) {
	op := func(op, sel byte, n uint16, off int32, arb uint32) []byte {
		b := []byte{op, sel, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
		binary.BigEndian.PutUint16(b[2:], n)
		binary.BigEndian.PutUint32(b[4:], uint32(off))
		binary.BigEndian.PutUint32(b[8:], arb)
		return b
	}
	cat := func(ops ...[]byte) []byte {
		var b []byte
		for _, o := range ops {
			b = append(b, o...)
		}
		return b
	}
	f.Add(cat(op(0, 0, 10, 0, 0), op(1, 0, 100, 0, 0), op(2, 0, 64, 128, 0)))
	f.Add(cat(op(1, 0, 64, -32, 0), op(1, 0, 64, 4090, 0)))
	f.Add(cat(op(1, 1, 64, 0, 0xdeadbeef)))
	f.Add(cat(op(0, 2|0x30, 5, 0, 0)))
	f.Add(cat(op(4, 0, 0, 0, 7), op(5, 3, 0, 0, 0)))
	f.Add(cat(op(8, 0, 16, 0, 5), op(8, 0, 16, 0, 6), op(0, 4, 8, 0, 9)))
	f.Add(cat(op(7, 0, 63, 0, 3)))
	f.Add(cat(op(3, 0, 0, 0, 0)))
	f.Add(append(op(6, 0, 0, 0, 0), enc(header{typ: frameSend, length: 0xffffffff})...))
	f.Fuzz(func(t *testing.T, data []byte) {
		fuzzStream(t, data)
	})
}

func fuzzStream(t *testing.T, data []byte) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	d, err := Open(Options{Name: "fz", Addrs: []netip.Addr{netip.MustParseAddr("10.3.0.1")}, MaxMsgSize: 1 << 16})
	if err != nil {
		t.Fatal(err)
	}
	ln, _ := d.Listen(verbs.ListenOptions{ServiceID: 1})
	pd, _ := d.AllocPD()
	cq, _ := d.CreateCQ(verbs.CQOptions{Entries: 64})
	dma, err := verbs.AllocDMA(3 * rigPage)
	if err != nil {
		t.Fatal(err)
	}
	copy(dma.Bytes(), pattern(5, 3*rigPage))
	guards := func() [32]byte {
		b := dma.Bytes()
		return sha256.Sum256(append(append([]byte(nil), b[:rigPage]...), b[2*rigPage:]...))
	}
	before := guards()
	mr, err := pd.RegMR(dma.Bytes()[rigPage:2*rigPage], verbs.AccessLocalWrite|verbs.AccessRemoteWrite|verbs.AccessRemoteRead)
	if err != nil {
		t.Fatal(err)
	}
	mw, _ := pd.AllocMW()

	cli, srv := net.Pipe()
	if !d.incoming(newStreamLink(srv, d.attr.MaxMsgSize, &d.stats)) {
		t.Fatal("incoming refused")
	}
	gotREP := make(chan struct{})
	drained := make(chan struct{})
	go func() { // read and drop whatever soft sends
		defer close(drained)
		hb := make([]byte, headerLen)
		for {
			if _, err := io.ReadFull(cli, hb); err != nil {
				return
			}
			h, err := decodeHeader(hb, maxMaxMsgSize)
			if err != nil {
				return
			}
			if _, err := io.CopyN(io.Discard, cli, int64(h.length)); err != nil {
				return
			}
			if h.typ == frameREP {
				close(gotREP)
			}
		}
	}()
	cli.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := cli.Write(enc(header{typ: frameREQ, addr: 1, rkey: ipv4(netip.MustParseAddr("10.3.0.1")), dmaLen: 4})); err != nil {
		t.Fatal(err)
	}
	c, err := ln.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	qp, err := c.CreateQP(pd, verbs.QPOptions{SendCQ: cq, RecvCQ: cq, MaxSendWR: 4, MaxRecvWR: 4})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 4; i++ {
		qp.PostRecv([]verbs.RecvWR{{ID: uint64(i), SGL: []verbs.SGE{{Addr: mr.Addr() + uint64(i)*256, Length: 256, LKey: mr.LKey()}}}})
	}
	accepted := make(chan error, 1)
	go func() { accepted <- c.Accept(ctx, verbs.ConnParam{}) }()
	<-gotREP
	cli.Write(enc(header{typ: frameRTU}))
	if err := <-accepted; err != nil {
		t.Fatal(err)
	}
	// Bind the window so SEND_WITH_INV and window keys have a target.
	qp.PostSend([]verbs.SendWR{{ID: 9, Op: verbs.OpBindMW, Bind: verbs.Bind{MW: mw, RKey: verbs.IncRKey(mw.RKey()), MR: mr, Addr: mr.Addr() + 1024, Length: 512, Access: verbs.AccessRemoteRead | verbs.AccessRemoteWrite}}})

	stream := streamOps(data, mr.Addr(), mr.RKey())
	go func() {
		cli.Write(stream) // fails once soft resets the link
		cli.Close()
	}()
	for done := false; !done; {
		select {
		case ev := <-c.Events():
			done = ev.Type == verbs.EventDisconnected
		case <-ctx.Done():
			t.Fatal("connection did not end after the stream")
		}
	}
	<-drained
	if guards() != before {
		t.Fatal("memory outside the registered region changed")
	}
	if s := qp.State(); s != verbs.QPError {
		t.Fatalf("QP in %v after the link closed", s)
	}
	wc := make([]verbs.Completion, 128)
	n, _ := cq.Poll(wc)
	for _, x := range wc[:n] {
		switch x.Status {
		case verbs.StatusSuccess, verbs.StatusFlushed, verbs.StatusLocalLength, verbs.StatusLocalProtection, verbs.StatusLocalAccess, verbs.StatusMWBind:
		default:
			t.Fatalf("unexpected completion %+v", x)
		}
	}
	if err := errors.Join(qp.Close(), c.Close(), ln.Close(), mw.Close(), mr.Close(), dma.Close(), cq.Close(), pd.Close(), d.Close()); err != nil {
		t.Fatal(err)
	}
}

func TestFuzzStreamLeaks(t *testing.T) {
	defer checkLeaks(t)()
	fuzzStream(t, append([]byte{1, 0, 0, 100, 0, 0, 0, 0, 0, 0, 0, 0}, 2, 0, 0, 64, 0, 0, 0, 128, 0, 0, 0, 0))
}
