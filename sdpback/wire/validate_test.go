package wire_test

import (
	"bytes"
	"encoding/hex"
	"errors"
	"io"
	"math"
	"net/netip"
	"strings"
	"testing"

	"github.com/vsdp/vsdp/sdpback/wire"
)

// hdr returns a hand-assembled BSDH in hex: mid, flags and len as given,
// bufs 1, mseq 2, mseq_ack 3 (ref §1 offsets: 0 mid, 1 flags, 2 bufs,
// 4 len, 8 mseq, 12 mseq_ack).
func hdr(mid, flags string, length string) string {
	return mid + flags + "0001" + length + "00000002" + "00000003"
}

// patch returns the bytes of literal s with the bytes at off replaced by
// the hex string v.
func patch(t testing.TB, s string, off int, v string) []byte {
	t.Helper()
	b := unhex(t, s)
	copy(b[off:], unhex(t, v))
	return b
}

// wantErr checks that err wraps sentinel and names field.
func wantErr(t *testing.T, err, sentinel error, field string) {
	t.Helper()
	if err == nil {
		t.Fatalf("accepted; want %v on %s", sentinel, field)
	}
	if !errors.Is(err, sentinel) {
		t.Fatalf("error %v does not wrap %v", err, sentinel)
	}
	var we *wire.Error
	if !errors.As(err, &we) {
		t.Fatalf("error %T is not *wire.Error", err)
	}
	if we.Field != field {
		t.Errorf("Field = %q, want %q (%v)", we.Field, field, err)
	}
	if !strings.Contains(err.Error(), field) {
		t.Errorf("message %q does not name %q", err.Error(), field)
	}
}

func TestDecodeRules(t *testing.T) {
	cases := []struct {
		name  string
		hex   string
		err   error // nil: must be accepted
		field string
	}{
		// Length of the buffer and the BSDH len field (§1).
		{"empty", "", wire.ErrTruncated, "bsdh"},
		{"15 bytes", strings.Repeat("ff", 15), wire.ErrTruncated, "bsdh"},
		{"len > received", hdr("ff", "00", "00000011"), wire.ErrLength, "bsdh.len"},
		{"len < received", hdr("ff", "00", "00000010") + "41", wire.ErrLength, "bsdh.len"},
		{"len 0", hdr("ff", "00", "00000000"), wire.ErrLength, "bsdh.len"},
		{"len huge", hdr("ff", "00", "ffffffff"), wire.ErrLength, "bsdh.len"},
		// MID (§2.1).
		{"reserved MID 0x0F", hdr("0f", "00", "00000010"), wire.ErrMID, "bsdh.mid"},
		{"reserved MID 0x42", hdr("42", "00", "00000010"), wire.ErrMID, "bsdh.mid"},
		{"reserved MID 0xFC", hdr("fc", "00", "00000010"), wire.ErrMID, "bsdh.mid"},
		{"Hello in a SEND", hdr("00", "00", "00000010"), wire.ErrMID, "bsdh.mid"},
		{"HelloAck in a SEND", hdr("01", "00", "00000010"), wire.ErrMID, "bsdh.mid"},
		// Extended header present (§2.2).
		{"RdmaRdCompl without RRCH", hdr("06", "00", "00000010"), wire.ErrTruncated, "bsdh.len"},
		{"RdmaWrCompl short RWCH", hdr("05", "00", "00000013") + "000010", wire.ErrTruncated, "bsdh.len"},
		{"SrcAvail short SrcAH", hdr("fe", "00", "0000001c") + "000100000000000100000000", wire.ErrTruncated, "bsdh.len"},
		{"SinkAvail short SinkAH", hdr("fd", "00", "00000020") + "00001000000000010000000000001000", wire.ErrTruncated, "bsdh.len"},
		{"SuspComm short SCH", hdr("0d", "00", "00000014") + "00000000", wire.ErrTruncated, "bsdh.len"},
		// Payload only where allowed.
		{"DisConn with payload", hdr("02", "00", "00000011") + "41", wire.ErrLength, "payload"},
		{"SendSM with payload", hdr("04", "00", "00000011") + "41", wire.ErrLength, "payload"},
		{"RdmaRdCompl with payload", hdr("06", "00", "00000015") + "0000100041", wire.ErrLength, "payload"},
		{"ChRcvBufAck with payload", hdr("0c", "00", "00000018") + "0000800000000000", wire.ErrLength, "payload"},
		// Flags (§1).
		{"flag bit 3", hdr("ff", "08", "00000011") + "41", wire.ErrField, "bsdh.flags"},
		{"flag bit 7", hdr("ff", "80", "00000011") + "41", wire.ErrField, "bsdh.flags"},
		{"OOB_PRES without payload", hdr("ff", "01", "00000010"), wire.ErrField, "bsdh.flags"},
		{"OOB_PRES on DisConn", hdr("02", "01", "00000010"), wire.ErrField, "bsdh.flags"},
		{"OOB_PRES with payload", hdr("ff", "01", "00000011") + "21", nil, ""},
		{"OOB_PEND on credit update", hdr("ff", "02", "00000010"), nil, ""},
		{"REQ_PIPE on RdmaRdCompl", hdr("06", "04", "00000014") + "00000010", nil, ""},
		// SrcAvail (§2.2, §10.7): len counts the inline bytes and must exceed them.
		{"SrcAvail len = inline", hdr("fe", "00", "00000022") + "00000002" + "00000001" + "0000000000001000" + "4142", wire.ErrField, "srcah.len"},
		{"SrcAvail len < inline", hdr("fe", "00", "00000022") + "00000001" + "00000001" + "0000000000001000" + "4142", wire.ErrField, "srcah.len"},
		{"SrcAvail len 0 no inline", hdr("fe", "00", "00000020") + "00000000" + "00000001" + "0000000000001000", wire.ErrField, "srcah.len"},
		{"SrcAvail len = inline+1", hdr("fe", "00", "00000022") + "00000003" + "00000001" + "0000000000001000" + "4142", nil, ""},
		{"SrcAvail no inline (Pipelined)", hdr("fe", "00", "00000020") + "00000001" + "00000001" + "0000000000000000", nil, ""},
		{"SrcAvail vaddr wraps", hdr("fe", "00", "00000020") + "00000010" + "00000001" + "fffffffffffffff0", wire.ErrField, "srcah.vaddr"},
		{"SrcAvail vaddr ends at 2^64-1", hdr("fe", "00", "00000020") + "00000010" + "00000001" + "ffffffffffffffef", nil, ""},
		// SinkAvail (§2.2).
		{"SinkAvail len 0", hdr("fd", "00", "00000024") + "00000000" + "00000001" + "0000000000001000" + "00000000", wire.ErrField, "sinkah.len"},
		{"SinkAvail vaddr wraps", hdr("fd", "00", "00000024") + "00000002" + "00000001" + "ffffffffffffffff" + "00000000", wire.ErrField, "sinkah.vaddr"},
		{"SinkAvail no payload", hdr("fd", "00", "00000024") + "00000002" + "00000001" + "0000000000001000" + "00000009", nil, ""},
		// ModeChange (§2.2).
		{"mode 0x30", hdr("07", "00", "00000014") + "30000000", wire.ErrField, "mch.mode"},
		{"mode 0xB0", hdr("07", "00", "00000014") + "b0000000", wire.ErrField, "mch.mode"},
		{"mode low nibble", hdr("07", "00", "00000014") + "11000000", wire.ErrField, "mch.mode"},
		{"mode reserved bytes", hdr("07", "00", "00000014") + "10000001", wire.ErrField, "mch.reserved"},
		{"mode BUFF_RECV", hdr("07", "00", "00000014") + "00000000", nil, ""},
		{"mode COMB_SEND", hdr("07", "00", "00000014") + "90000000", nil, ""},
		// ChRcvBuf / ChRcvBufAck (§2.2, §10.1).
		{"ChRcvBuf size 0", hdr("0b", "00", "00000014") + "00000000", wire.ErrField, "crbh.size"},
		{"ChRcvBufAck size 0", hdr("0c", "00", "00000014") + "00000000", wire.ErrField, "crbah.size"},
		// Values the codec leaves to the engine.
		{"RdmaRdCompl 0 bytes", hdr("06", "00", "00000014") + "00000000", nil, ""},
		{"SuspComm any service ID", hdr("0d", "00", "00000018") + "ffffffffffffffff", nil, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := unhex(t, c.hex)
			m, err := wire.Decode(b)
			if c.err == nil {
				if err != nil {
					t.Fatalf("rejected: %v", err)
				}
				enc, err := m.Append(nil)
				if err != nil || !bytes.Equal(enc, b) {
					t.Fatalf("re-encode: %v\n got %x\nwant %x", err, enc, b)
				}
				return
			}
			wantErr(t, err, c.err, c.field)
			if m.MID != 0 || m.Payload != nil {
				t.Errorf("rejected Decode returned a non-zero Message: %v", &m)
			}
		})
	}
}

func TestEncodeRules(t *testing.T) {
	cases := []struct {
		name  string
		m     wire.Message
		err   error
		field string
	}{
		{"reserved MID", wire.Message{MID: 0x42}, wire.ErrMID, "bsdh.mid"},
		{"Hello as a message", wire.Message{MID: wire.MIDHello}, wire.ErrMID, "bsdh.mid"},
		{"HelloAck as a message", wire.Message{MID: wire.MIDHelloAck}, wire.ErrMID, "bsdh.mid"},
		{"reserved flag", wire.Message{MID: wire.MIDData, Flags: 0x10, Payload: []byte("x")}, wire.ErrField, "bsdh.flags"},
		{"OOB_PRES no payload", wire.Message{MID: wire.MIDData, Flags: wire.FlagOOBPres}, wire.ErrField, "bsdh.flags"},
		{"payload on DisConn", wire.Message{MID: wire.MIDDisConn, Payload: []byte("x")}, wire.ErrLength, "payload"},
		{"advert on Data", wire.Message{MID: wire.MIDData, Advert: wire.Advert{RKey: 1}}, wire.ErrField, "advert"},
		{"non_disc on SrcAvail", wire.Message{MID: wire.MIDSrcAvail, Advert: wire.Advert{Len: 9, NonDisc: 1}}, wire.ErrField, "advert.nondisc"},
		{"bytes on SendSM", wire.Message{MID: wire.MIDSendSM, Bytes: 1}, wire.ErrField, "bytes"},
		{"bufsize on RdmaRdCompl", wire.Message{MID: wire.MIDRdmaRdCompl, BufSize: 1}, wire.ErrField, "bufsize"},
		{"mode on Data", wire.Message{MID: wire.MIDData, Mode: wire.ModeCombSend}, wire.ErrField, "mode"},
		{"service on DisConn", wire.Message{MID: wire.MIDDisConn, ServiceID: 1}, wire.ErrField, "serviceid"},
		{"SrcAvail len = inline", wire.Message{MID: wire.MIDSrcAvail, Advert: wire.Advert{Len: 3}, Payload: []byte("abc")}, wire.ErrField, "srcah.len"},
		{"SinkAvail empty", wire.Message{MID: wire.MIDSinkAvail}, wire.ErrField, "sinkah.len"},
		{"invalid mode", wire.Message{MID: wire.MIDModeChange, Mode: 0x40}, wire.ErrField, "mch.mode"},
		{"ChRcvBuf 0", wire.Message{MID: wire.MIDChRcvBuf}, wire.ErrField, "crbh.size"},
		{"ChRcvBufAck 0", wire.Message{MID: wire.MIDChRcvBufAck}, wire.ErrField, "crbah.size"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dst := []byte("keep")
			out, err := c.m.Append(dst)
			wantErr(t, err, c.err, c.field)
			if string(out) != "keep" {
				t.Errorf("failed Append changed dst to %q", out)
			}
			_, err = c.m.PutHeader(make([]byte, wire.MaxHeaderLen), len(c.m.Payload))
			wantErr(t, err, c.err, c.field)
		})
	}
}

func TestPutHeaderLimits(t *testing.T) {
	data := wire.Message{MID: wire.MIDData}
	if _, err := data.PutHeader(make([]byte, 16), -1); !errors.Is(err, wire.ErrLength) {
		t.Errorf("negative payload: %v", err)
	}
	if math.MaxInt > math.MaxUint32 {
		// The largest payload whose len still fits in 32 bits, and one more.
		if _, err := data.PutHeader(make([]byte, 16), math.MaxUint32-16); err != nil {
			t.Errorf("len 2^32-1: %v", err)
		}
		_, err := data.PutHeader(make([]byte, 16), math.MaxUint32-15)
		wantErr(t, err, wire.ErrLength, "bsdh.len")
	}
	sa := wire.Message{MID: wire.MIDSrcAvail, Advert: wire.Advert{Len: 100}}
	_, err := sa.PutHeader(make([]byte, 31), 0)
	if !errors.Is(err, io.ErrShortBuffer) {
		t.Errorf("31-byte buffer for SrcAvail: %v", err)
	}
	// Inline bytes counted against len without a Payload slice.
	_, err = sa.PutHeader(make([]byte, 32), 100)
	wantErr(t, err, wire.ErrField, "srcah.len")
	n, err := sa.PutHeader(make([]byte, 32), 99)
	if err != nil || n != 32 {
		t.Errorf("PutHeader(99 inline) = %d, %v", n, err)
	}
}

func TestBSDHSetters(t *testing.T) {
	want := unhex(t, ""+
		"06"+ //       0 mid      RdmaRdCompl
		"05"+ //       1 flags    OOB_PRES|REQ_PIPE
		"a1b2"+ //     2 bufs
		"c1c2c3c4"+ // 4 len
		"d1d2d3d4"+ // 8 mseq
		"e1e2e3e4") // 12 mseq_ack
	b := make(wire.BSDH, 16)
	b.SetMID(wire.MIDRdmaRdCompl)
	b.SetFlags(wire.FlagOOBPres | wire.FlagReqPipe)
	b.SetBufs(0xa1b2)
	b.SetLen(0xc1c2c3c4)
	b.SetMSeq(0xd1d2d3d4)
	b.SetMSeqAck(0xe1e2e3e4)
	if !bytes.Equal(b, want) {
		t.Errorf("setters wrote %x, want %x", []byte(b), want)
	}
}

func TestHelloRules(t *testing.T) {
	cases := []struct {
		name  string
		b     []byte
		err   error
		field string
	}{
		{"91 bytes", unhex(t, goldenHello4)[:91], wire.ErrTruncated, "privdata"},
		{"93 bytes", append(unhex(t, goldenHello4), 0), wire.ErrLength, "privdata"},
		{"mid HelloAck", patch(t, goldenHello4, 0, "01"), wire.ErrMID, "bsdh.mid"},
		{"mid Data", patch(t, goldenHello4, 0, "ff"), wire.ErrMID, "bsdh.mid"},
		{"flags", patch(t, goldenHello4, 1, "02"), wire.ErrField, "bsdh.flags"},
		{"len 91", patch(t, goldenHello4, 4, "0000005b"), wire.ErrLength, "bsdh.len"},
		{"len 32", patch(t, goldenHello4, 4, "00000020"), wire.ErrLength, "bsdh.len"},
		{"mseq 1", patch(t, goldenHello4, 8, "00000001"), wire.ErrField, "bsdh.mseq"},
		{"mseq_ack 1", patch(t, goldenHello4, 12, "00000001"), wire.ErrField, "bsdh.mseq_ack"},
		{"version 1.1 (gen1)", patch(t, goldenHello4, 16, "11"), wire.ErrVersion, "hh.version"},
		{"version 3.2", patch(t, goldenHello4, 16, "32"), wire.ErrVersion, "hh.version"},
		{"IPV 0", patch(t, goldenHello4, 17, "00"), wire.ErrField, "hh.ipv"},
		{"IPV 5", patch(t, goldenHello4, 17, "50"), wire.ErrField, "hh.ipv"},
		{"IPV in the low nibble (old MS bug)", patch(t, goldenHello4, 17, "04"), wire.ErrField, "hh.ipv"},
		{"MaxAdverts 0", patch(t, goldenHello4, 19, "00"), wire.ErrField, "hh.maxadverts"},
		{"LocalRcvSz 35", patch(t, goldenHello4, 24, "00000023"), wire.ErrField, "hh.localrcvsz"},
		{"LocalRcvSz 0", patch(t, goldenHello4, 24, "00000000"), wire.ErrField, "hh.localrcvsz"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := wire.DecodeHello(c.b)
			wantErr(t, err, c.err, c.field)
		})
	}

	// Ignored on receipt: reserved bytes, the IPV low nibble, the IPv4
	// padding. The decoded Hello is the golden one.
	golden, err := wire.DecodeHello(unhex(t, goldenHello4))
	if err != nil {
		t.Fatal(err)
	}
	lenient := map[string][]byte{
		"reserved 18":     patch(t, goldenHello4, 18, "ff"),
		"reserved 30":     patch(t, goldenHello4, 30, "ffff"),
		"reserved tail":   patch(t, goldenHello4, 64, strings.Repeat("5a", 28)),
		"IPV low nibble":  patch(t, goldenHello4, 17, "4f"),
		"IPv4 src pad":    patch(t, goldenHello4, 32, "00000000000000000000ffff"),
		"IPv4 dst pad":    patch(t, goldenHello4, 48, "0102030405060708090a0b0c"),
		"DesRemRcvSz 0":   patch(t, goldenHello4, 20, "00000000"),
		"LocalRcvSz 36":   patch(t, goldenHello4, 24, "00000024"),
		"version 2.0":     patch(t, goldenHello4, 16, "20"),
		"MaxAdverts 0xFF": patch(t, goldenHello4, 19, "ff"),
	}
	for name, b := range lenient {
		got, err := wire.DecodeHello(b)
		if err != nil {
			t.Errorf("%s: rejected: %v", name, err)
			continue
		}
		got.DesRemRcvSz, got.LocalRcvSz, got.Version, got.MaxAdverts =
			golden.DesRemRcvSz, golden.LocalRcvSz, golden.Version, golden.MaxAdverts
		if got != golden {
			t.Errorf("%s: decoded %+v, want %+v", name, got, golden)
		}
	}
}

func TestHelloEncodeRules(t *testing.T) {
	ok := wire.Hello{Bufs: 1, Version: wire.Version22, MaxAdverts: 1, LocalRcvSz: 4096,
		SrcIP: netip.MustParseAddr("10.0.0.1"), DstIP: netip.MustParseAddr("10.0.0.2")}
	cases := []struct {
		name  string
		edit  func(*wire.Hello)
		err   error
		field string
	}{
		{"no addresses", func(h *wire.Hello) { h.SrcIP, h.DstIP = netip.Addr{}, netip.Addr{} }, wire.ErrField, "hh.srcip"},
		{"no destination", func(h *wire.Hello) { h.DstIP = netip.Addr{} }, wire.ErrField, "hh.dstip"},
		{"mixed families", func(h *wire.Hello) { h.DstIP = netip.MustParseAddr("fd00::2") }, wire.ErrField, "hh.dstip"},
		{"zone", func(h *wire.Hello) {
			h.SrcIP, h.DstIP = netip.MustParseAddr("fe80::1%eth0"), netip.MustParseAddr("fe80::2")
		}, wire.ErrField, "hh.srcip"},
		{"version 1.1", func(h *wire.Hello) { h.Version = 0x11 }, wire.ErrVersion, "hh.version"},
		{"zero version", func(h *wire.Hello) { h.Version = 0 }, wire.ErrVersion, "hh.version"},
		{"MaxAdverts 0", func(h *wire.Hello) { h.MaxAdverts = 0 }, wire.ErrField, "hh.maxadverts"},
		{"LocalRcvSz 16", func(h *wire.Hello) { h.LocalRcvSz = 16 }, wire.ErrField, "hh.localrcvsz"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h := ok
			c.edit(&h)
			_, err := h.Append(nil)
			wantErr(t, err, c.err, c.field)
			_, err = h.AppendCompact(nil)
			wantErr(t, err, c.err, c.field)
		})
	}
	// An IPv4-mapped IPv6 address is IPv6 on the wire: IPV 0x60 and the
	// ::ffff:a.b.c.d form in all 16 bytes.
	h := ok
	h.SrcIP, h.DstIP = netip.MustParseAddr("::ffff:10.0.0.1"), netip.MustParseAddr("::ffff:10.0.0.2")
	b, err := h.Append(nil)
	if err != nil {
		t.Fatal(err)
	}
	if b[17] != 0x60 || hex.EncodeToString(b[32:48]) != "00000000000000000000ffff0a000001" {
		t.Errorf("4in6: IPV %#x src %x", b[17], b[32:48])
	}
	if got, err := wire.DecodeHello(b); err != nil || got != h {
		t.Errorf("4in6 round trip: %+v, %v", got, err)
	}
}

func TestHelloAckRules(t *testing.T) {
	cases := []struct {
		name  string
		b     []byte
		err   error
		field string
	}{
		{"195 bytes", unhex(t, goldenHelloAck)[:195], wire.ErrTruncated, "privdata"},
		{"197 bytes", append(unhex(t, goldenHelloAck), 0), wire.ErrLength, "privdata"},
		{"92 bytes (a Hello's size)", unhex(t, goldenHelloAck)[:92], wire.ErrTruncated, "privdata"},
		{"mid Hello", patch(t, goldenHelloAck, 0, "00"), wire.ErrMID, "bsdh.mid"},
		{"flags", patch(t, goldenHelloAck, 1, "01"), wire.ErrField, "bsdh.flags"},
		{"len 92", patch(t, goldenHelloAck, 4, "0000005c"), wire.ErrLength, "bsdh.len"},
		{"len 180 (v1.1 spec text)", patch(t, goldenHelloAck, 4, "000000b4"), wire.ErrLength, "bsdh.len"},
		{"mseq 1", patch(t, goldenHelloAck, 8, "00000001"), wire.ErrField, "bsdh.mseq"},
		{"mseq_ack 1", patch(t, goldenHelloAck, 12, "00000001"), wire.ErrField, "bsdh.mseq_ack"},
		{"version 1.1", patch(t, goldenHelloAck, 16, "11"), wire.ErrVersion, "hah.version"},
		{"MaxAdverts 0", patch(t, goldenHelloAck, 19, "00"), wire.ErrField, "hah.maxadverts"},
		{"ActRcvSz 0", patch(t, goldenHelloAck, 20, "00000000"), wire.ErrField, "hah.actrcvsz"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := wire.DecodeHelloAck(c.b)
			wantErr(t, err, c.err, c.field)
		})
	}
	want := wire.HelloAck{Bufs: 64, Version: 0x22, MaxAdverts: 1, ActRcvSz: 32784}
	for name, b := range map[string][]byte{
		"ipv_cap set":   patch(t, goldenHelloAck, 17, "40"),
		"reserved 18":   patch(t, goldenHelloAck, 18, "01"),
		"reserved tail": patch(t, goldenHelloAck, 24, strings.Repeat("a5", 172)),
	} {
		if got, err := wire.DecodeHelloAck(b); err != nil || got != want {
			t.Errorf("%s: %+v, %v", name, got, err)
		}
	}
	for _, bad := range []wire.HelloAck{
		{Version: 0x12, MaxAdverts: 1, ActRcvSz: 4096},
		{Version: 0x22, MaxAdverts: 0, ActRcvSz: 4096},
		{Version: 0x22, MaxAdverts: 1, ActRcvSz: 35},
	} {
		if out, err := bad.Append([]byte("x")); err == nil || string(out) != "x" {
			t.Errorf("Append(%+v) = %x, %v", bad, out, err)
		}
	}
}

func TestCompactHelloRules(t *testing.T) {
	v4a, v4b := netip.MustParseAddr("10.1.0.7"), netip.MustParseAddr("10.1.0.8")
	v6a, v6b := netip.MustParseAddr("fd00::7"), netip.MustParseAddr("fd00::8")
	cases := []struct {
		name     string
		b        []byte
		src, dst netip.Addr
		err      error
		field    string
	}{
		{"31 bytes", unhex(t, goldenCompact)[:31], v4a, v4b, wire.ErrTruncated, "privdata"},
		{"zero bytes (no private data)", make([]byte, 56), v4a, v4b, wire.ErrField, "compact.magic"},
		{"a full Hello", unhex(t, goldenHello4), v4a, v4b, wire.ErrField, "compact.magic"},
		{"magic", patch(t, goldenCompact, 30, "7654"), v4a, v4b, wire.ErrField, "compact.magic"},
		{"form 0", patch(t, goldenCompact, 18, "00"), v4a, v4b, wire.ErrVersion, "compact.form"},
		{"form 2", patch(t, goldenCompact, 18, "02"), v4a, v4b, wire.ErrVersion, "compact.form"},
		{"mid HelloAck", patch(t, goldenCompact, 0, "01"), v4a, v4b, wire.ErrMID, "bsdh.mid"},
		{"flags", patch(t, goldenCompact, 1, "01"), v4a, v4b, wire.ErrField, "bsdh.flags"},
		{"len 92", patch(t, goldenCompact, 4, "0000005c"), v4a, v4b, wire.ErrLength, "bsdh.len"},
		{"len 56", patch(t, goldenCompact, 4, "00000038"), v4a, v4b, wire.ErrLength, "bsdh.len"},
		{"mseq", patch(t, goldenCompact, 8, "00000001"), v4a, v4b, wire.ErrField, "bsdh.mseq"},
		{"mseq_ack", patch(t, goldenCompact, 12, "00000001"), v4a, v4b, wire.ErrField, "bsdh.mseq_ack"},
		{"version 1.1", patch(t, goldenCompact, 16, "11"), v4a, v4b, wire.ErrVersion, "hh.version"},
		{"IPV low nibble", patch(t, goldenCompact, 17, "41"), v4a, v4b, wire.ErrField, "compact.ipv"},
		{"IPV 0", patch(t, goldenCompact, 17, "00"), v4a, v4b, wire.ErrField, "compact.ipv"},
		{"IPV 6, CM says IPv4", patch(t, goldenCompact, 17, "60"), v4a, v4b, wire.ErrField, "compact.ipv"},
		{"IPV 4, CM says IPv6", unhex(t, goldenCompact), v6a, v6b, wire.ErrField, "compact.ipv"},
		{"CM addresses mixed", unhex(t, goldenCompact), v4a, v6b, wire.ErrField, "hh.dstip"},
		{"CM source missing", unhex(t, goldenCompact), netip.Addr{}, v4b, wire.ErrField, "hh.srcip"},
		{"MaxAdverts 0", patch(t, goldenCompact, 19, "00"), v4a, v4b, wire.ErrField, "hh.maxadverts"},
		{"LocalRcvSz 20", patch(t, goldenCompact, 24, "00000014"), v4a, v4b, wire.ErrField, "hh.localrcvsz"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := wire.DecodeCompactHello(c.b, c.src, c.dst)
			wantErr(t, err, c.err, c.field)
		})
	}
	// IPv6 with zoned CM addresses: accepted, zone dropped; trailing CM
	// padding is not ours and is ignored.
	b := append(patch(t, goldenCompact, 17, "60"), bytes.Repeat([]byte{0xEE}, 24)...)
	h, err := wire.DecodeCompactHello(b, netip.MustParseAddr("fe80::7%ib0"), netip.MustParseAddr("fe80::8%ib0"))
	if err != nil {
		t.Fatal(err)
	}
	if h.SrcIP != netip.MustParseAddr("fe80::7") || h.DstIP != netip.MustParseAddr("fe80::8") {
		t.Errorf("addresses %v %v", h.SrcIP, h.DstIP)
	}
	if out, err := h.AppendCompact(nil); err != nil || !bytes.Equal(out, b[:32]) {
		t.Errorf("re-encode: %x, %v", out, err)
	}
}
