package sdp_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/vsdp/vsdp/sdpback/internal/refpeer"
	"github.com/vsdp/vsdp/sdpback/sdp"
	"github.com/vsdp/vsdp/verbs"
)

// rawPeer is a peer built on bare verbs that speaks SDP through the
// independent refpeer codec: it behaves like the last shipped ib_sdp
// (version 2.2, MaxAdverts 1, 32 KiB buffers, the two-credit reserve) or,
// in the fuzz target, like a hostile one.
type rawPeer struct {
	t        testing.TB
	dev      verbs.Device
	pd       verbs.PD
	cq       verbs.CQ
	cm       verbs.Conn
	rx, tx   *verbs.DMA
	rxMR     verbs.MR
	txMR     verbs.MR
	bufs     int
	size     int
	mseq     uint32 // next mseq to send
	lastRecv uint32
	credits  int
	txSlot   int
}

const peerBufs, peerBufSize = 16, 32<<10 + 16

func dialRaw(t testing.TB, dev verbs.Device, dst netip.AddrPort) (*rawPeer, error) {
	p := &rawPeer{t: t, dev: dev, bufs: peerBufs, size: peerBufSize, mseq: 1}
	var err error
	if p.pd, err = dev.AllocPD(); err != nil {
		return nil, err
	}
	if p.cq, err = dev.CreateCQ(verbs.CQOptions{Entries: 64}); err != nil {
		return nil, err
	}
	if p.rx, err = verbs.AllocDMA(peerBufs * peerBufSize); err != nil {
		return nil, err
	}
	if p.tx, err = verbs.AllocDMA(4 * peerBufSize); err != nil {
		return nil, err
	}
	if p.rxMR, err = p.pd.RegMR(p.rx.Bytes(), verbs.AccessLocalWrite); err != nil {
		return nil, err
	}
	if p.txMR, err = p.pd.RegMR(p.tx.Bytes(), 0); err != nil {
		return nil, err
	}
	hh := refpeer.HH{BSDH: refpeer.BSDH{Bufs: peerBufs}, MajMin: 0x22, IPVCap: 0x40, MaxAdverts: 1,
		DesRemRcvSz: peerBufSize, LocalRcvSz: peerBufSize, SrcPort: 40000}
	src, d := addrA.As4(), dst.Addr().As4()
	copy(hh.SrcAddr[12:], src[:])
	copy(hh.DstAddr[12:], d[:])
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var rep []byte
	p.cm, rep, err = verbs.Dial(ctx, dev, verbs.DialConfig{
		Resolve: verbs.ResolveOptions{Addr: dst.Addr(), ServiceID: verbs.SDPServiceID(dst.Port())},
		PD:      p.pd,
		QP:      verbs.QPOptions{SendCQ: p.cq, RecvCQ: p.cq, MaxSendWR: 16, MaxRecvWR: peerBufs},
		Param:   verbs.ConnParam{PrivateData: refpeer.MarshalHello(hh)},
		Prepare: func(qp verbs.QP) error {
			for i := 0; i < peerBufs; i++ {
				if err := p.post(qp, i); err != nil {
					return err
				}
			}
			return nil
		},
	})
	if err != nil {
		p.close()
		return nil, err
	}
	hah, err := refpeer.ParseHelloAck(rep)
	if err != nil {
		p.close()
		return nil, fmt.Errorf("HelloAck: %w", err)
	}
	p.credits = int(hah.Bufs)
	return p, nil
}

func (p *rawPeer) post(qp verbs.QP, slot int) error {
	return qp.PostRecv([]verbs.RecvWR{{ID: uint64(slot), SGL: []verbs.SGE{{
		Addr: p.rxMR.Addr() + uint64(slot*p.size), Length: uint32(p.size), LKey: p.rxMR.LKey()}}}})
}

func (p *rawPeer) close() {
	if p.cm != nil {
		p.cm.Disconnect()
		if qp := p.cm.QP(); qp != nil {
			qp.Close()
		}
		p.cm.Close()
	}
	for _, c := range []interface{ Close() error }{p.rxMR, p.txMR, p.cq, p.pd} {
		if c != nil {
			c.Close()
		}
	}
	if p.rx != nil {
		p.rx.Close()
	}
	if p.tx != nil {
		p.tx.Close()
	}
}

// sendRaw posts b as one SEND, stamping nothing.
func (p *rawPeer) sendRaw(b []byte) error {
	slot := p.txSlot % 4
	p.txSlot++
	copy(p.tx.Bytes()[slot*p.size:], b)
	return p.cm.QP().PostSend([]verbs.SendWR{{ID: 1 << 32, Op: verbs.OpSend, Flags: verbs.SendSignaled,
		SGL: []verbs.SGE{{Addr: p.txMR.Addr() + uint64(slot*p.size), Length: uint32(len(b)), LKey: p.txMR.LKey()}}}})
}

// send encodes a packet with the peer's sequence numbers and credits.
func (p *rawPeer) send(pk refpeer.Packet) error {
	pk.Bufs, pk.Mseq, pk.MseqAck = peerBufs, p.mseq, p.lastRecv
	b, err := refpeer.Marshal(pk)
	if err != nil {
		return err
	}
	p.mseq++
	p.credits--
	return p.sendRaw(b)
}

// recv waits for the next message, reposting its buffer.
func (p *rawPeer) recv(d time.Duration) (refpeer.Packet, error) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	wc := make([]verbs.Completion, 1)
	for {
		n, err := verbs.PollWait(ctx, p.cq, wc)
		if err != nil {
			return refpeer.Packet{}, err
		}
		if n == 0 {
			continue
		}
		w := wc[0]
		if w.Status != verbs.StatusSuccess {
			return refpeer.Packet{}, w.Err()
		}
		if w.Op != verbs.CompRecv {
			continue
		}
		slot := int(w.ID)
		raw := append([]byte(nil), p.rx.Bytes()[slot*p.size:slot*p.size+int(w.ByteLen)]...)
		if err := p.post(p.cm.QP(), slot); err != nil {
			return refpeer.Packet{}, err
		}
		pk, err := refpeer.Unmarshal(raw)
		if err != nil {
			return refpeer.Packet{}, err
		}
		p.lastRecv = pk.Mseq
		p.credits = int(int32(pk.MseqAck-p.mseq+1)) + int(pk.Bufs)
		return pk, nil
	}
}

// TestReferencePeerInterop: an ib_sdp-like peer connects to the engine,
// sends data within its credits keeping the two-credit reserve, reads the
// engine's echo, and closes with DisConn; the engine answers DisConn.
func TestReferencePeerInterop(t *testing.T) {
	f := newFabric(t, "inproc", sdp.Config{})
	l, err := f.b.Listen(5555, 4)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.AcceptSDP(context.Background())
		if err != nil {
			return
		}
		io.Copy(c, c) // echo until the peer's DisConn
		c.Close()
	}()
	p, err := dialRaw(t, f.da, netip.AddrPortFrom(addrB, 5555))
	if err != nil {
		t.Fatal(err)
	}
	defer p.close()
	want := bytes.Repeat([]byte("0123456789abcdef"), 8192) // 128 KiB
	var got []byte
	sent := 0
	for len(got) < len(want) {
		for sent < len(want) && p.credits > 2 { // ib_sdp sends data only above the reserve
			k := min(len(want)-sent, 32<<10)
			if err := p.send(refpeer.Packet{BSDH: refpeer.BSDH{Mid: refpeer.MidData}, Data: want[sent : sent+k]}); err != nil {
				t.Fatal(err)
			}
			sent += k
		}
		pk, err := p.recv(5 * time.Second)
		if err != nil {
			t.Fatalf("after %d of %d bytes: %v", len(got), len(want), err)
		}
		if pk.Mid != refpeer.MidData {
			t.Fatalf("unexpected MID %#x", pk.Mid)
		}
		got = append(got, pk.Data...)
		if p.credits < 1 {
			t.Fatal("the engine left the peer without credits")
		}
	}
	if !bytes.Equal(got, want) {
		t.Fatal("echo differs")
	}
	if err := p.send(refpeer.Packet{BSDH: refpeer.BSDH{Mid: refpeer.MidDisconn}}); err != nil {
		t.Fatal(err)
	}
	for {
		pk, err := p.recv(5 * time.Second)
		if err != nil {
			t.Fatalf("waiting for DisConn: %v", err)
		}
		if pk.Mid == refpeer.MidDisconn {
			break
		}
	}
}

// TestReferencePeerSrcAvail: a gen2 source offers Read-ZCopy (SrcAvail with
// inline bytes); the engine keeps the inline bytes and answers SendSM, and
// the source sends the rest as Data.
func TestReferencePeerSrcAvail(t *testing.T) {
	f := newFabric(t, "inproc", sdp.Config{})
	l, err := f.b.Listen(5556, 4)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	done := make(chan []byte, 1)
	go func() {
		c, err := l.AcceptSDP(context.Background())
		if err != nil {
			return
		}
		b, _ := io.ReadAll(c)
		done <- b
		c.Close()
	}()
	p, err := dialRaw(t, f.da, netip.AddrPortFrom(addrB, 5556))
	if err != nil {
		t.Fatal(err)
	}
	defer p.close()
	inline, rest := []byte("inline-"), []byte("then-bcopy")
	if err := p.send(refpeer.Packet{BSDH: refpeer.BSDH{Mid: refpeer.MidSrcAvail},
		SrcAH: &refpeer.SrcAH{Len: uint32(len(inline) + len(rest)), Rkey: 0x1234, Vaddr: 0x1000}, Data: inline}); err != nil {
		t.Fatal(err)
	}
	pk, err := p.recv(5 * time.Second)
	if err != nil || pk.Mid != refpeer.MidSendSM {
		t.Fatalf("want SendSM, got %#x (%v)", pk.Mid, err)
	}
	p.send(refpeer.Packet{BSDH: refpeer.BSDH{Mid: refpeer.MidData}, Data: rest})
	p.send(refpeer.Packet{BSDH: refpeer.BSDH{Mid: refpeer.MidDisconn}})
	select {
	case b := <-done:
		if string(b) != "inline-then-bcopy" {
			t.Fatalf("stream %q", b)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no EOF")
	}
}

// TestHostilePeerMessages: a peer breaking the protocol resets only its
// connection, with ErrProtocol (and ECONNRESET) at the engine's reader.
func TestHostilePeerMessages(t *testing.T) {
	bsdh := func(mid uint8, flags uint8, bufs uint16, n, mseq, ack uint32) []byte {
		b := make([]byte, 16)
		b[0], b[1] = mid, flags
		binary.BigEndian.PutUint16(b[2:], bufs)
		binary.BigEndian.PutUint32(b[4:], n)
		binary.BigEndian.PutUint32(b[8:], mseq)
		binary.BigEndian.PutUint32(b[12:], ack)
		return b
	}
	for _, tc := range []struct {
		name string
		msg  []byte
	}{
		{"len differs from bytes received", bsdh(0xff, 0, 16, 99, 1, 0)},
		{"mseq skips", bsdh(0xff, 0, 16, 16, 5, 0)},
		{"mseq_ack of unsent messages", bsdh(0xff, 0, 16, 16, 1, 7)},
		{"unknown MID", bsdh(0x42, 0, 16, 16, 1, 0)},
		{"SinkAvail (gen2 resets)", append(bsdh(0xfd, 0, 16, 36, 1, 0), make([]byte, 20)...)},
		{"RdmaRdCompl never solicited", append(bsdh(0x06, 0, 16, 20, 1, 0), 0, 0, 0, 1)},
		{"reserved flag bits", bsdh(0xff, 0x80, 16, 16, 1, 0)},
		{"Hello in the stream", append(bsdh(0x00, 0, 16, 92, 1, 0), make([]byte, 76)...)},
		{"short message", []byte{0xff, 0, 0}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFabric(t, "inproc", sdp.Config{})
			l, err := f.b.Listen(6000, 4)
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			errc := make(chan error, 1)
			go func() {
				c, err := l.AcceptSDP(context.Background())
				if err != nil {
					errc <- err
					return
				}
				defer c.Close()
				_, err = c.Read(make([]byte, 100))
				errc <- err
			}()
			p, err := dialRaw(t, f.da, netip.AddrPortFrom(addrB, 6000))
			if err != nil {
				t.Fatal(err)
			}
			defer p.close()
			if err := p.sendRaw(tc.msg); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-errc:
				if !errors.Is(err, syscall.ECONNRESET) {
					t.Fatalf("reader got %v, want ECONNRESET", err)
				}
				if tc.name != "SinkAvail (gen2 resets)" && tc.name != "RdmaRdCompl never solicited" && !errors.Is(err, sdp.ErrProtocol) {
					t.Fatalf("reader got %v, want ErrProtocol", err)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("hostile message did not reset the connection")
			}
		})
	}
}

// FuzzPeerMessages feeds arbitrary messages from a raw peer into an engine
// connection: the engine must never panic or hang, and the connection ends
// either healthy or reset, releasing its resources (checked at cleanup).
func FuzzPeerMessages(f *testing.F) {
	data := func(mseq uint32, payload string) []byte {
		b, _ := refpeer.Marshal(refpeer.Packet{BSDH: refpeer.BSDH{Mid: refpeer.MidData, Bufs: 16, Mseq: mseq}, Data: []byte(payload)})
		return b
	}
	f.Add(data(1, "hello"), data(2, "world"))
	f.Add(data(1, ""), []byte{0x02, 0, 0, 16, 0, 0, 0, 16, 0, 0, 0, 2, 0, 0, 0, 0})
	f.Add([]byte{0xff, 0, 0xff, 0xff, 0, 0, 0, 16, 0, 0, 0, 1, 0, 0, 0, 0}, data(2, "x"))
	f.Fuzz(func(t *testing.T, m1, m2 []byte) {
		if len(m1) > 1024 || len(m2) > 1024 {
			return
		}
		fb := newFabric(t, "inproc", sdp.Config{RecvBufSize: 2048})
		l, err := fb.b.Listen(6001, 4)
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		accepted := make(chan *sdp.Conn, 1)
		go func() {
			c, err := l.AcceptSDP(context.Background())
			if err == nil {
				accepted <- c
			}
		}()
		p, err := dialRaw(t, fb.da, netip.AddrPortFrom(addrB, 6001))
		if err != nil {
			t.Fatal(err)
		}
		defer p.close()
		c := <-accepted
		defer c.Close()
		for _, m := range [][]byte{m1, m2} {
			if len(m) == 0 {
				continue
			}
			p.sendRaw(m)
		}
		c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		io.Copy(io.Discard, c)
	})
}
