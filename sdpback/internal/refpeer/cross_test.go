package refpeer_test

// Cross-tests: every message one codec encodes must decode identically in
// the other, byte for byte and field for field. The two codecs were written
// separately from the reference's tables, so agreement here means two
// readings of the spec agree, not one reading with itself.

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"

	"github.com/vsdp/vsdp/sdpback/internal/refpeer"
	"github.com/vsdp/vsdp/sdpback/wire"
)

// The MIDs ib_sdp handles, as wire names them.
var gen2MIDs = []wire.MID{
	wire.MIDData, wire.MIDSrcAvail, wire.MIDSinkAvail, wire.MIDDisConn, wire.MIDAbortConn,
	wire.MIDSendSM, wire.MIDRdmaRdCompl, wire.MIDSrcAvailCancel, wire.MIDChRcvBuf, wire.MIDChRcvBufAck,
}

// The stream MIDs only gen1 knows.
var gen1OnlyMIDs = []wire.MID{
	wire.MIDRdmaWrCompl, wire.MIDModeChange, wire.MIDSinkAvailCancel,
	wire.MIDSinkCancelAck, wire.MIDSuspComm, wire.MIDSuspCommAck,
}

// sameMessage reports the fields in which a wire.Message and a
// refpeer.Packet disagree.
func sameMessage(m wire.Message, p refpeer.Packet) error {
	var d []string
	f := func(name string, w, r any) {
		if fmt.Sprint(w) != fmt.Sprint(r) {
			d = append(d, fmt.Sprintf("%s: wire %v, refpeer %v", name, w, r))
		}
	}
	f("mid", uint8(m.MID), p.Mid)
	f("flags", uint8(m.Flags), p.Flags)
	f("bufs", m.Bufs, p.Bufs)
	f("len", m.Len(), p.Len)
	f("mseq", m.MSeq, p.Mseq)
	f("mseq_ack", m.MSeqAck, p.MseqAck)
	switch m.MID {
	case wire.MIDSrcAvail:
		if p.SrcAH == nil {
			d = append(d, "refpeer has no SrcAH")
			break
		}
		f("srcah.len", m.Advert.Len, p.SrcAH.Len)
		f("srcah.rkey", m.Advert.RKey, p.SrcAH.Rkey)
		f("srcah.vaddr", m.Advert.VAddr, p.SrcAH.Vaddr)
	case wire.MIDSinkAvail:
		if p.SinkAH == nil {
			d = append(d, "refpeer has no SinkAH")
			break
		}
		f("sinkah.len", m.Advert.Len, p.SinkAH.Len)
		f("sinkah.rkey", m.Advert.RKey, p.SinkAH.Rkey)
		f("sinkah.vaddr", m.Advert.VAddr, p.SinkAH.Vaddr)
		f("sinkah.non_disc", m.Advert.NonDisc, p.SinkAH.NonDisc)
	case wire.MIDRdmaRdCompl:
		f("rrch", m.Bytes, p.RRCHLen)
	case wire.MIDChRcvBuf, wire.MIDChRcvBufAck:
		f("crb.size", m.BufSize, p.CRBSize)
	}
	if !bytes.Equal(m.Payload, p.Data) {
		d = append(d, fmt.Sprintf("payload: wire %q, refpeer %q", m.Payload, p.Data))
	}
	if d != nil {
		return fmt.Errorf("%v", d)
	}
	return nil
}

func payload(r *rand.Rand, n int) []byte {
	if n == 0 {
		return nil
	}
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// randMessage returns a valid wire.Message with the given MID.
func randMessage(r *rand.Rand, mid wire.MID) wire.Message {
	m := wire.Message{MID: mid, Bufs: uint16(r.Uint32()), MSeq: r.Uint32(), MSeqAck: r.Uint32()}
	if r.IntN(4) == 0 {
		m.Flags |= wire.FlagOOBPend
	}
	switch mid {
	case wire.MIDData:
		m.Payload = payload(r, r.IntN(64))
	case wire.MIDSinkAvail:
		m.Payload = payload(r, r.IntN(8))
		m.Advert = wire.Advert{Len: 1 + r.Uint32N(1<<30), RKey: r.Uint32(), VAddr: r.Uint64() >> 1, NonDisc: r.Uint32()}
	case wire.MIDSrcAvail:
		m.Payload = payload(r, r.IntN(64))
		m.Advert = wire.Advert{Len: uint32(len(m.Payload)) + 1 + r.Uint32N(1<<30), RKey: r.Uint32(), VAddr: r.Uint64() >> 1}
	case wire.MIDRdmaRdCompl, wire.MIDRdmaWrCompl:
		m.Bytes = r.Uint32()
	case wire.MIDChRcvBuf, wire.MIDChRcvBufAck:
		m.BufSize = 1 + r.Uint32N(1<<20)
	case wire.MIDModeChange:
		m.Mode = []wire.Mode{wire.ModeBuffRecv, wire.ModeCombRecv, wire.ModePipeSend}[r.IntN(3)]
	case wire.MIDSuspComm:
		m.ServiceID = wire.SDPServiceID(uint16(r.Uint32()))
	}
	if len(m.Payload) > 0 && r.IntN(4) == 0 {
		m.Flags |= wire.FlagOOBPres
	}
	return m
}

func TestCrossWireToRefpeer(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 3000; i++ {
		m := randMessage(r, gen2MIDs[i%len(gen2MIDs)])
		b, err := m.Append(nil)
		if err != nil {
			t.Fatalf("wire Append %v: %v", &m, err)
		}
		p, err := refpeer.Unmarshal(b)
		if err != nil {
			t.Fatalf("refpeer rejects %v (%x): %v", &m, b, err)
		}
		if err := sameMessage(m, p); err != nil {
			t.Fatalf("%v: %v", &m, err)
		}
		// refpeer re-encodes its reading to the same bytes.
		rb, err := refpeer.Marshal(p)
		if err != nil || !bytes.Equal(rb, b) {
			t.Fatalf("refpeer Marshal: %v\n got %x\nwant %x", err, rb, b)
		}
	}
}

func TestCrossRefpeerToWire(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for i := 0; i < 3000; i++ {
		// Build with refpeer from random fields (chosen to be valid for
		// wire too), then decode with wire.
		mid := uint8(gen2MIDs[i%len(gen2MIDs)])
		p := refpeer.Packet{BSDH: refpeer.BSDH{Mid: mid, Bufs: uint16(r.Uint32()), Mseq: r.Uint32(), MseqAck: r.Uint32()}}
		if r.IntN(3) == 0 {
			p.Flags = refpeer.OOBPend
		}
		switch mid {
		case refpeer.MidData:
			p.Data = payload(r, r.IntN(100))
		case refpeer.MidSrcAvail:
			p.Data = payload(r, r.IntN(100))
			p.SrcAH = &refpeer.SrcAH{Len: uint32(len(p.Data)) + 1 + r.Uint32N(1<<24), Rkey: r.Uint32(), Vaddr: r.Uint64N(1 << 48)}
		case refpeer.MidSinkAvail:
			p.SinkAH = &refpeer.SinkAH{Len: 1 + r.Uint32N(1<<24), Rkey: r.Uint32(), Vaddr: r.Uint64N(1 << 48), NonDisc: r.Uint32()}
		case refpeer.MidRdmaRdCompl:
			p.RRCHLen = r.Uint32()
		case refpeer.MidChRcvBuf, refpeer.MidChRcvBufAck:
			p.CRBSize = 1 + r.Uint32N(1<<20)
		}
		if len(p.Data) > 0 && r.IntN(2) == 0 {
			p.Flags |= refpeer.OOBPres
		}
		b, err := refpeer.Marshal(p)
		if err != nil {
			t.Fatal(err)
		}
		p, err = refpeer.Unmarshal(b) // fills Len
		if err != nil {
			t.Fatal(err)
		}
		m, err := wire.Decode(b)
		if err != nil {
			t.Fatalf("wire rejects %+v (%x): %v", p, b, err)
		}
		if err := sameMessage(m, p); err != nil {
			t.Fatalf("%x: %v", b, err)
		}
		wb, err := m.Append(nil)
		if err != nil || !bytes.Equal(wb, b) {
			t.Fatalf("wire Append: %v\n got %x\nwant %x", err, wb, b)
		}
	}
}

// Messages ib_sdp does not handle still carry a BSDH it reads (for
// credits), then it discards them.
func TestCrossGen1Only(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	for _, mid := range gen1OnlyMIDs {
		m := randMessage(r, mid)
		b, err := m.Append(nil)
		if err != nil {
			t.Fatal(err)
		}
		p, err := refpeer.Unmarshal(b)
		if !errors.Is(err, refpeer.ErrUnknownMID) {
			t.Errorf("%v: refpeer says %v", mid, err)
		}
		if p.Mid != uint8(mid) || p.Bufs != m.Bufs || p.Len != uint32(m.Len()) || p.Mseq != m.MSeq || p.MseqAck != m.MSeqAck {
			t.Errorf("%v: BSDH %+v", mid, p.BSDH)
		}
	}
	// Header sizes agree for every MID both know.
	for _, mid := range gen2MIDs {
		p := refpeer.Packet{BSDH: refpeer.BSDH{Mid: uint8(mid)}, SrcAH: &refpeer.SrcAH{}, SinkAH: &refpeer.SinkAH{}}
		b, err := refpeer.Marshal(p)
		if err != nil || len(b) != mid.HeaderLen() {
			t.Errorf("%v: refpeer header %d bytes, wire %d (%v)", mid, len(b), mid.HeaderLen(), err)
		}
	}
}

func addrBytes(a netip.Addr) [16]byte {
	if a.Is4() {
		var b [16]byte
		v := a.As4()
		copy(b[12:], v[:])
		return b
	}
	return a.As16()
}

func randAddr(r *rand.Rand, v6 bool) netip.Addr {
	if v6 {
		var b [16]byte
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		return netip.AddrFrom16(b)
	}
	return netip.AddrFrom4([4]byte{byte(r.Uint32()), byte(r.Uint32()), byte(r.Uint32()), byte(r.Uint32())})
}

func sameHello(h wire.Hello, hh refpeer.HH) error {
	ipv := uint8(0x40)
	if h.SrcIP.Is6() {
		ipv = 0x60
	}
	if hh.Mid != 0 || hh.Len != 92 || hh.Flags != 0 || hh.Mseq != 0 || hh.MseqAck != 0 ||
		hh.Bufs != h.Bufs || hh.MajMin != uint8(h.Version) || hh.IPVCap>>4 != ipv>>4 ||
		hh.MaxAdverts != h.MaxAdverts || hh.DesRemRcvSz != h.DesRemRcvSz ||
		hh.LocalRcvSz != h.LocalRcvSz || hh.SrcPort != h.SrcPort ||
		hh.SrcAddr != addrBytes(h.SrcIP) || hh.DstAddr != addrBytes(h.DstIP) {
		return fmt.Errorf("wire %+v, refpeer %+v", h, hh)
	}
	return nil
}

func TestCrossHello(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	for i := 0; i < 1000; i++ {
		v6 := i%2 == 1
		h := wire.Hello{
			Bufs: uint16(r.Uint32()), Version: wire.Version(0x20 | r.IntN(16)), MaxAdverts: uint8(1 + r.IntN(255)),
			DesRemRcvSz: r.Uint32(), LocalRcvSz: wire.MinRcvSize + r.Uint32N(1<<20), SrcPort: uint16(r.Uint32()),
			SrcIP: randAddr(r, v6), DstIP: randAddr(r, v6),
		}
		b, err := h.Append(nil)
		if err != nil {
			t.Fatal(err)
		}
		hh, err := refpeer.ParseHello(b)
		if err != nil {
			t.Fatalf("refpeer rejects %+v: %v", h, err)
		}
		if err := sameHello(h, hh); err != nil {
			t.Fatal(err)
		}
		if rb := refpeer.MarshalHello(hh); !bytes.Equal(rb, b) {
			t.Fatalf("refpeer re-encode:\n got %x\nwant %x", rb, b)
		}
		// And the other way: refpeer's Hello, wire's reading.
		back, err := wire.DecodeHello(refpeer.MarshalHello(hh))
		if err != nil || back != h {
			t.Fatalf("wire reads refpeer Hello as %+v, %v; want %+v", back, err, h)
		}
	}
}

func TestCrossHelloAck(t *testing.T) {
	r := rand.New(rand.NewPCG(9, 10))
	for i := 0; i < 1000; i++ {
		a := wire.HelloAck{Bufs: uint16(r.Uint32()), Version: wire.Version(0x20 | r.IntN(16)),
			MaxAdverts: uint8(1 + r.IntN(255)), ActRcvSz: wire.MinRcvSize + r.Uint32N(1<<20)}
		b, err := a.Append(nil)
		if err != nil {
			t.Fatal(err)
		}
		hah, err := refpeer.ParseHelloAck(b)
		if err != nil {
			t.Fatal(err)
		}
		if hah.Mid != 1 || hah.Len != 196 || hah.Bufs != a.Bufs || hah.MajMin != uint8(a.Version) ||
			hah.MaxAdverts != a.MaxAdverts || hah.ActRcvSz != a.ActRcvSz {
			t.Fatalf("wire %+v, refpeer %+v", a, hah)
		}
		if rb := refpeer.MarshalHelloAck(hah); !bytes.Equal(rb, b) {
			t.Fatalf("refpeer re-encode:\n got %x\nwant %x", rb, b)
		}
		if back, err := wire.DecodeHelloAck(b); err != nil || back != a {
			t.Fatalf("wire round trip %+v, %v", back, err)
		}
	}
}

// FuzzCross: on any bytes, whatever both codecs accept they read the same
// way, and whatever wire accepts from ib_sdp's repertoire refpeer accepts
// too (wire is the stricter of the two).
func FuzzCross(f *testing.F) {
	r := rand.New(rand.NewPCG(11, 12))
	for _, mid := range append(append([]wire.MID{}, gen2MIDs...), gen1OnlyMIDs...) {
		m := randMessage(r, mid)
		b, _ := m.Append(nil)
		f.Add(b)
	}
	h := wire.Hello{Bufs: 8, Version: wire.Version22, MaxAdverts: 1, LocalRcvSz: 4096,
		SrcIP: netip.MustParseAddr("10.0.0.1"), DstIP: netip.MustParseAddr("10.0.0.2")}
	hb, _ := h.Append(nil)
	f.Add(hb)
	ab, _ := (&wire.HelloAck{Bufs: 8, Version: wire.Version22, MaxAdverts: 1, ActRcvSz: 4096}).Append(nil)
	f.Add(ab)
	f.Fuzz(func(t *testing.T, b []byte) {
		p, perr := refpeer.Unmarshal(b)
		m, werr := wire.Decode(b)
		if werr == nil {
			gen2 := false
			for _, x := range gen2MIDs {
				gen2 = gen2 || x == m.MID
			}
			switch {
			case gen2 && perr != nil:
				t.Fatalf("wire accepts %v, refpeer rejects: %v", &m, perr)
			case !gen2 && !errors.Is(perr, refpeer.ErrUnknownMID):
				t.Fatalf("gen1-only %v: refpeer says %v", m.MID, perr)
			case gen2:
				if err := sameMessage(m, p); err != nil {
					t.Fatal(err)
				}
			}
		}
		if wh, err := wire.DecodeHello(b); err == nil {
			hh, err := refpeer.ParseHello(b)
			if err != nil {
				t.Fatalf("wire accepts Hello, refpeer: %v", err)
			}
			// wire ignores the IPv4 padding; compare what it decoded.
			if wh.SrcIP.Is4() {
				hh.SrcAddr, hh.DstAddr = addrBytes(wh.SrcIP), addrBytes(wh.DstIP)
			}
			if err := sameHello(wh, hh); err != nil {
				t.Fatal(err)
			}
		}
		if wa, err := wire.DecodeHelloAck(b); err == nil {
			hah, err := refpeer.ParseHelloAck(b)
			if err != nil || hah.Bufs != wa.Bufs || hah.MajMin != uint8(wa.Version) ||
				hah.MaxAdverts != wa.MaxAdverts || hah.ActRcvSz != wa.ActRcvSz {
				t.Fatalf("HelloAck: wire %+v, refpeer %+v, %v", wa, hah, err)
			}
		}
	})
}

// Benchmarks: wire's validating codec against refpeer's plain one.
func BenchmarkDecode(b *testing.B) {
	for _, size := range []int{0, 4096} {
		m := wire.Message{MID: wire.MIDData, Bufs: 10, MSeq: 5, MSeqAck: 4, Payload: make([]byte, size)}
		buf, _ := m.Append(nil)
		name := fmt.Sprintf("data-%dB", size)
		b.Run(name+"/wire", func(b *testing.B) {
			b.SetBytes(int64(len(buf)))
			for b.Loop() {
				if _, err := wire.Decode(buf); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(name+"/baseline-refpeer", func(b *testing.B) {
			b.SetBytes(int64(len(buf)))
			for b.Loop() {
				if _, err := refpeer.Unmarshal(buf); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkEncodeHeader(b *testing.B) {
	m := wire.Message{MID: wire.MIDSrcAvail, Bufs: 10, MSeq: 5, MSeqAck: 4,
		Advert: wire.Advert{Len: 1 << 20, RKey: 7, VAddr: 0x1000}}
	p := refpeer.Packet{BSDH: refpeer.BSDH{Mid: refpeer.MidSrcAvail, Bufs: 10, Mseq: 5, MseqAck: 4},
		SrcAH: &refpeer.SrcAH{Len: 1 << 20, Rkey: 7, Vaddr: 0x1000}}
	b.Run("srcavail/wire", func(b *testing.B) {
		hdr := make([]byte, wire.MaxHeaderLen)
		b.SetBytes(32)
		for b.Loop() {
			if _, err := m.PutHeader(hdr, 0); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("srcavail/baseline-refpeer", func(b *testing.B) {
		b.SetBytes(32)
		for b.Loop() {
			if _, err := refpeer.Marshal(p); err != nil {
				b.Fatal(err)
			}
		}
	})
}
