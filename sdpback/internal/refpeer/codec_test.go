package refpeer

import (
	"bytes"
	"errors"
	"go/build"
	"strings"
	"testing"
)

// Vectors written as byte arrays straight from ref §1–§2.3 (a second hand
// transcription, independent of package wire's golden tests).

func TestHelloVector(t *testing.T) {
	// What ib_sdp 2.2 puts in a REQ from 192.168.7.1:40000 to 192.168.7.2.
	want := make([]byte, 92)
	copy(want[0:], []byte{0x00, 0x00, 0x00, 0x3e}) // mid Hello, flags 0, bufs 62
	copy(want[4:], []byte{0x00, 0x00, 0x00, 0x5c}) // len 92
	// 8..15 mseq, mseq_ack: 0
	want[16] = 0x22                                 // version 2.2
	want[17] = 0x40                                 // IPv4
	want[19] = 0x01                                 // MaxAdverts 1
	copy(want[20:], []byte{0x00, 0x00, 0x80, 0x10}) // DesRemRcvSz 32784
	copy(want[24:], []byte{0x00, 0x00, 0x80, 0x10}) // LocalRcvSz 32784
	copy(want[28:], []byte{0x9c, 0x40})             // SrcPort 40000
	copy(want[44:], []byte{0xc0, 0xa8, 0x07, 0x01}) // SrcIP 192.168.7.1
	copy(want[60:], []byte{0xc0, 0xa8, 0x07, 0x02}) // DstIP 192.168.7.2
	hh := HH{BSDH: BSDH{Bufs: 62}, MajMin: MajMin, IPVCap: 0x40, MaxAdverts: MaxAdverts,
		DesRemRcvSz: 32784, LocalRcvSz: 32784, SrcPort: 40000}
	copy(hh.SrcAddr[12:], []byte{192, 168, 7, 1})
	copy(hh.DstAddr[12:], []byte{192, 168, 7, 2})
	got := MarshalHello(hh)
	if !bytes.Equal(got, want) {
		t.Fatalf("MarshalHello:\n got %x\nwant %x", got, want)
	}
	back, err := ParseHello(want)
	if err != nil {
		t.Fatal(err)
	}
	hh.Mid, hh.Len = MidHello, 92
	if back != hh {
		t.Errorf("ParseHello = %+v, want %+v", back, hh)
	}
}

func TestHelloAckVector(t *testing.T) {
	want := make([]byte, 196)
	copy(want, []byte{0x01, 0x00, 0x00, 0x3e, 0x00, 0x00, 0x00, 0xc4}) // HelloAck, bufs 62, len 196
	want[16], want[19] = 0x22, 0x01                                    // 2.2, MaxAdverts 1
	copy(want[20:], []byte{0x00, 0x00, 0x80, 0x10})                    // ActRcvSz 32784
	got := MarshalHelloAck(HAH{BSDH: BSDH{Bufs: 62}, MajMin: 0x22, MaxAdverts: 1, ActRcvSz: 32784})
	if !bytes.Equal(got, want) {
		t.Fatalf("MarshalHelloAck:\n got %x\nwant %x", got, want)
	}
	hah, err := ParseHelloAck(want)
	if err != nil || hah.Bufs != 62 || hah.ActRcvSz != 32784 || hah.Len != 196 {
		t.Errorf("ParseHelloAck = %+v, %v", hah, err)
	}
}

func TestMessageVectors(t *testing.T) {
	cases := []struct {
		name string
		b    []byte
		p    Packet
	}{
		{"SrcAvail", []byte{
			0xfe, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x24, // SrcAvail, bufs 2, len 36
			0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x05, // mseq 7, mseq_ack 5
			0x00, 0x02, 0x00, 0x00, 0x0b, 0xad, 0xf0, 0x0d, // srcah len 131072, rkey 0x0badf00d
			0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, // vaddr 0x100
			'w', 'x', 'y', 'z', //                             4 inline bytes
		}, Packet{BSDH: BSDH{Mid: MidSrcAvail, Bufs: 2, Len: 36, Mseq: 7, MseqAck: 5},
			SrcAH: &SrcAH{Len: 131072, Rkey: 0x0badf00d, Vaddr: 0x100}, Data: []byte("wxyz")}},
		{"RdmaRdCompl", []byte{
			0x06, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x14, // RdmaRdCompl, bufs 3, len 20
			0x00, 0x00, 0x00, 0x06, 0x00, 0x00, 0x00, 0x07, // mseq 6, mseq_ack 7
			0x00, 0x01, 0xff, 0xfc, //                         rrch 131068 = 131072 - 4 inline
		}, Packet{BSDH: BSDH{Mid: MidRdmaRdCompl, Bufs: 3, Len: 20, Mseq: 6, MseqAck: 7}, RRCHLen: 131068}},
		{"ChRcvBufAck", []byte{
			0x0c, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x14,
			0x00, 0x00, 0x00, 0x09, 0x00, 0x00, 0x00, 0x08,
			0x00, 0x00, 0x80, 0x00, // 32768, no BSDH (§10.1)
		}, Packet{BSDH: BSDH{Mid: MidChRcvBufAck, Bufs: 1, Len: 20, Mseq: 9, MseqAck: 8}, CRBSize: 32768}},
		{"Data OOB", []byte{
			0xff, 0x03, 0x00, 0x10, 0x00, 0x00, 0x00, 0x11,
			0x00, 0x00, 0x00, 0x0a, 0x00, 0x00, 0x00, 0x09,
			'!',
		}, Packet{BSDH: BSDH{Mid: MidData, Flags: OOBPres | OOBPend, Bufs: 16, Len: 17, Mseq: 10, MseqAck: 9}, Data: []byte("!")}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := Marshal(c.p)
			if err != nil || !bytes.Equal(got, c.b) {
				t.Fatalf("Marshal = %x, %v; want %x", got, err, c.b)
			}
			p, err := Unmarshal(c.b)
			if err != nil {
				t.Fatal(err)
			}
			if p.BSDH != c.p.BSDH || p.RRCHLen != c.p.RRCHLen || p.CRBSize != c.p.CRBSize ||
				!bytes.Equal(p.Data, c.p.Data) || (p.SrcAH == nil) != (c.p.SrcAH == nil) ||
				(p.SrcAH != nil && *p.SrcAH != *c.p.SrcAH) {
				t.Errorf("Unmarshal = %+v, want %+v", p, c.p)
			}
		})
	}
}

func TestUnmarshalErrors(t *testing.T) {
	h := func(mid byte, length byte) []byte {
		return []byte{mid, 0, 0, 1, 0, 0, 0, length, 0, 0, 0, 1, 0, 0, 0, 0}
	}
	cases := []struct {
		name string
		b    []byte
		err  error
	}{
		{"short", []byte{0xff, 0, 0}, ErrShort},
		{"len mismatch", h(MidData, 17), ErrLen},
		{"RdmaRdCompl no rrch", h(MidRdmaRdCompl, 16), ErrShort},
		{"DisConn payload", append(h(MidDisconn, 17), 'x'), ErrPayload},
		{"ModeChange (gen1 only)", append(h(0x07, 20), 0x10, 0, 0, 0), ErrUnknownMID},
		{"RdmaWrCompl (gen1 only)", append(h(0x05, 20), 0, 0, 0, 1), ErrUnknownMID},
		{"Hello in a SEND", h(MidHello, 16), ErrUnknownMID},
	}
	for _, c := range cases {
		p, err := Unmarshal(c.b)
		if !errors.Is(err, c.err) {
			t.Errorf("%s: %v, want %v", c.name, err, c.err)
		}
		// ib_sdp refreshes credits from any message with a readable BSDH.
		if len(c.b) >= HeadSize && p.Bufs != 1 && c.err != ErrShort {
			t.Errorf("%s: BSDH not returned: %+v", c.name, p.BSDH)
		}
	}
	if _, err := Marshal(Packet{BSDH: BSDH{Mid: 0x07}}); !errors.Is(err, ErrUnknownMID) {
		t.Errorf("Marshal ModeChange: %v", err)
	}
	if _, err := Marshal(Packet{BSDH: BSDH{Mid: MidSrcAvail}}); err == nil {
		t.Error("Marshal SrcAvail without SrcAH accepted")
	}
	if _, err := Marshal(Packet{BSDH: BSDH{Mid: MidSendSM}, Data: []byte("x")}); !errors.Is(err, ErrPayload) {
		t.Errorf("Marshal SendSM with payload: %v", err)
	}

	good := MarshalHello(HH{MajMin: 0x22, IPVCap: 0x60, MaxAdverts: 1})
	for name, mut := range map[string]func([]byte) []byte{
		"short":        func(b []byte) []byte { return b[:91] },
		"mid":          func(b []byte) []byte { b[0] = 1; return b },
		"version 1.1":  func(b []byte) []byte { b[16] = 0x11; return b },
		"ipv 5":        func(b []byte) []byte { b[17] = 0x50; return b },
		"maxadverts 0": func(b []byte) []byte { b[19] = 0; return b },
	} {
		if _, err := ParseHello(mut(bytes.Clone(good))); !errors.Is(err, ErrHello) {
			t.Errorf("ParseHello %s: %v", name, err)
		}
	}
	if _, err := ParseHello(good); err != nil {
		t.Errorf("ParseHello good: %v", err)
	}
	ack := MarshalHelloAck(HAH{MajMin: 0x22, MaxAdverts: 1})
	for name, b := range map[string][]byte{
		"short":   ack[:195],
		"mid":     append([]byte{0}, ack[1:]...),
		"version": append(append(bytes.Clone(ack[:16]), 0x12), ack[17:]...),
	} {
		if _, err := ParseHelloAck(b); !errors.Is(err, ErrHello) {
			t.Errorf("ParseHelloAck %s: %v", name, err)
		}
	}
}

// TestIndependent keeps the reference codec apart from package wire: a
// shared misreading could otherwise pass the cross-tests.
func TestIndependent(t *testing.T) {
	pkg, err := build.ImportDir(".", 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(pkg.Imports) == 0 {
		t.Fatal("no imports found")
	}
	for _, imp := range pkg.Imports {
		if strings.Contains(imp, "vsdp/") {
			t.Errorf("refpeer imports %q", imp)
		}
	}
}
