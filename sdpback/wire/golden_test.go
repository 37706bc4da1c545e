package wire_test

// Golden vectors. Every hex literal below was typed by hand from the offset
// tables in ref/sdp-protocol.md §1–§2 (and, for the compact Hello, the
// layout in doc.go), one line per field: offset, name, value. None was
// produced by running this codec. Values are chosen with distinct bytes
// (0x0102, 0x01020304, ...) so a swapped or misplaced field shows.

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/vsdp/vsdp/sdpback/wire"
)

// unhex decodes a hand-written hex literal.
func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatalf("bad hex literal: %v", err)
	}
	return b
}

type goldenMsg struct {
	name string
	hex  string
	size int // total bytes, counted by hand
	want wire.Message
}

var goldenMsgs = []goldenMsg{
	{
		name: "Data/hello",
		hex: "" +
			"ff" + //       0 mid       0xFF Data
			"00" + //       1 flags     0
			"0020" + //     2 bufs      32
			"00000015" + // 4 len       21 = 16 + 5
			"00000001" + // 8 mseq      1 (first message after the handshake)
			"00000000" + // 12 mseq_ack 0
			"68656c6c6f", // 16 payload "hello"
		size: 21,
		want: wire.Message{MID: wire.MIDData, Bufs: 32, MSeq: 1, Payload: []byte("hello")},
	},
	{
		name: "Data/credit-update",
		hex: "" +
			"ff" + //       0 mid       Data
			"00" + //       1 flags     0
			"0040" + //     2 bufs      64
			"00000010" + // 4 len       16: no payload = pure credit update
			"0000002a" + // 8 mseq      42
			"00000017", // 12 mseq_ack  23
		size: 16,
		want: wire.Message{MID: wire.MIDData, Bufs: 64, MSeq: 42, MSeqAck: 23},
	},
	{
		name: "Data/urgent",
		hex: "" +
			"ff" + //       0 mid       Data
			"03" + //       1 flags     OOB_PRES|OOB_PEND
			"0102" + //     2 bufs      258
			"00000013" + // 4 len       19 = 16 + 3
			"01020304" + // 8 mseq      0x01020304
			"0a0b0c0d" + // 12 mseq_ack 0x0a0b0c0d
			"616221", //    16 payload  "ab!" ('!' is the urgent byte)
		size: 19,
		want: wire.Message{MID: wire.MIDData, Flags: wire.FlagOOBPres | wire.FlagOOBPend, Bufs: 0x0102,
			MSeq: 0x01020304, MSeqAck: 0x0a0b0c0d, Payload: []byte("ab!")},
	},
	{
		name: "DisConn",
		hex: "" +
			"02" + //       0 mid       0x02 DisConn
			"00" + //       1 flags
			"0005" + //     2 bufs      5
			"00000010" + // 4 len       16
			"00000063" + // 8 mseq      99
			"00000062", // 12 mseq_ack  98
		size: 16,
		want: wire.Message{MID: wire.MIDDisConn, Bufs: 5, MSeq: 99, MSeqAck: 98},
	},
	{
		name: "AbortConn",
		hex: "" +
			"03" + //       0 mid       0x03 AbortConn
			"00" + //       1 flags
			"0000" + //     2 bufs      0
			"00000010" + // 4 len       16
			"00000064" + // 8 mseq      100
			"00000063", // 12 mseq_ack  99
		size: 16,
		want: wire.Message{MID: wire.MIDAbortConn, MSeq: 100, MSeqAck: 99},
	},
	{
		name: "SendSM",
		hex: "" +
			"04" + //       0 mid       0x04 SendSM
			"00" + //       1 flags
			"0003" + //     2 bufs      3
			"00000010" + // 4 len       16
			"00000011" + // 8 mseq      17
			"00000010", // 12 mseq_ack  16 (the SrcAvail it answers)
		size: 16,
		want: wire.Message{MID: wire.MIDSendSM, Bufs: 3, MSeq: 17, MSeqAck: 16},
	},
	{
		name: "RdmaWrCompl",
		hex: "" +
			"05" + //       0 mid       0x05 RdmaWrCompl
			"00" + //       1 flags
			"0004" + //     2 bufs      4
			"00000014" + // 4 len       20 = 16 + RWCH 4
			"00000020" + // 8 mseq      32
			"0000001f" + // 12 mseq_ack 31
			"00001000", //  16 RWCH     4096 bytes written
		size: 20,
		want: wire.Message{MID: wire.MIDRdmaWrCompl, Bufs: 4, MSeq: 32, MSeqAck: 31, Bytes: 4096},
	},
	{
		name: "RdmaRdCompl/req-pipe",
		hex: "" +
			"06" + //       0 mid       0x06 RdmaRdCompl
			"04" + //       1 flags     REQ_PIPE (gen1 sets it here)
			"0008" + //     2 bufs      8
			"00000014" + // 4 len       20 = 16 + RRCH 4
			"00000011" + // 8 mseq      17
			"00000010" + // 12 mseq_ack 16
			"0000fff8", //  16 RRCH     65528 = 65536 - 8 inline bytes (never counted)
		size: 20,
		want: wire.Message{MID: wire.MIDRdmaRdCompl, Flags: wire.FlagReqPipe, Bufs: 8, MSeq: 17, MSeqAck: 16, Bytes: 65528},
	},
	{
		name: "ModeChange/PIPE_SEND",
		hex: "" +
			"07" + //       0 mid       0x07 ModeChange
			"00" + //       1 flags
			"0002" + //     2 bufs      2
			"00000014" + // 4 len       20 = 16 + MCH 4
			"00000007" + // 8 mseq      7
			"00000006" + // 12 mseq_ack 6
			"a0" + //       16 MCH mode 0xA0 PIPE_SEND (bit 7 send, bits 4-6 = 2)
			"000000", //    17 MCH      reserved
		size: 20,
		want: wire.Message{MID: wire.MIDModeChange, Bufs: 2, MSeq: 7, MSeqAck: 6, Mode: wire.ModePipeSend},
	},
	{
		name: "SrcAvailCancel",
		hex: "" +
			"08" + //       0 mid       0x08 SrcAvailCancel
			"00" + //       1 flags
			"0001" + //     2 bufs      1
			"00000010" + // 4 len       16
			"00000012" + // 8 mseq      18
			"00000010", // 12 mseq_ack  16
		size: 16,
		want: wire.Message{MID: wire.MIDSrcAvailCancel, Bufs: 1, MSeq: 18, MSeqAck: 16},
	},
	{
		name: "SinkAvailCancel",
		hex: "" +
			"09" + //       0 mid       0x09 SinkAvailCancel
			"00" + //       1 flags
			"0006" + //     2 bufs      6
			"00000010" + // 4 len       16
			"00000041" + // 8 mseq      65
			"00000040", // 12 mseq_ack  64
		size: 16,
		want: wire.Message{MID: wire.MIDSinkAvailCancel, Bufs: 6, MSeq: 65, MSeqAck: 64},
	},
	{
		name: "SinkCancelAck",
		hex: "" +
			"0a" + //       0 mid       0x0A SinkCancelAck
			"00" + //       1 flags
			"0007" + //     2 bufs      7
			"00000010" + // 4 len       16
			"00000042" + // 8 mseq      66
			"00000041", // 12 mseq_ack  65
		size: 16,
		want: wire.Message{MID: wire.MIDSinkCancelAck, Bufs: 7, MSeq: 66, MSeqAck: 65},
	},
	{
		name: "ChRcvBuf",
		hex: "" +
			"0b" + //       0 mid       0x0B ChRcvBuf
			"00" + //       1 flags
			"0010" + //     2 bufs      16
			"00000014" + // 4 len       20 = 16 + CRBH 4
			"00000030" + // 8 mseq      48
			"0000002f" + // 12 mseq_ack 47
			"00008000", //  16 CRBH     32768 requested (BSDH excluded)
		size: 20,
		want: wire.Message{MID: wire.MIDChRcvBuf, Bufs: 16, MSeq: 48, MSeqAck: 47, BufSize: 32768},
	},
	{
		name: "ChRcvBufAck",
		hex: "" +
			"0c" + //       0 mid       0x0C ChRcvBufAck
			"00" + //       1 flags
			"000f" + //     2 bufs      15
			"00000014" + // 4 len       20 = 16 + CRBAH 4
			"00000105" + // 8 mseq      261
			"000000fa" + // 12 mseq_ack 250
			"00008000", //  16 CRBAH    32768: new size WITHOUT the BSDH (§10.1), not 32784
		size: 20,
		want: wire.Message{MID: wire.MIDChRcvBufAck, Bufs: 15, MSeq: 261, MSeqAck: 250, BufSize: 32768},
	},
	{
		name: "SuspComm",
		hex: "" +
			"0d" + //       0 mid       0x0D SuspComm
			"00" + //       1 flags
			"0000" + //     2 bufs      0
			"00000018" + // 4 len       24 = 16 + SCH 8
			"00000200" + // 8 mseq      512
			"000001ff" + // 12 mseq_ack 511
			"0000000000011388", // 16 SCH service ID 0x11388 = 0x10000|5000
		size: 24,
		want: wire.Message{MID: wire.MIDSuspComm, MSeq: 512, MSeqAck: 511, ServiceID: 0x11388},
	},
	{
		name: "SuspCommAck",
		hex: "" +
			"0e" + //       0 mid       0x0E SuspCommAck
			"00" + //       1 flags
			"0009" + //     2 bufs      9
			"00000010" + // 4 len       16
			"00000201" + // 8 mseq      513
			"00000200", // 12 mseq_ack  512
		size: 16,
		want: wire.Message{MID: wire.MIDSuspCommAck, Bufs: 9, MSeq: 513, MSeqAck: 512},
	},
	{
		name: "SinkAvail/with-payload",
		hex: "" +
			"fd" + //       0 mid       0xFD SinkAvail
			"00" + //       1 flags
			"0006" + //     2 bufs      6
			"00000026" + // 4 len       38 = 16 + SinkAH 20 + 2
			"00000040" + // 8 mseq      64
			"0000003f" + // 12 mseq_ack 63
			"00004000" + // 16 len      16384 bytes advertised
			"cafebabe" + // 20 rkey     0xCAFEBABE
			"00007f0012340000" + // 24 vaddr 0x7F0012340000
			"00000003" + // 32 non_disc 3 data messages received
			"7879", //      36 payload  "xy" (opposite direction)
		size: 38,
		want: wire.Message{MID: wire.MIDSinkAvail, Bufs: 6, MSeq: 64, MSeqAck: 63,
			Advert:  wire.Advert{Len: 16384, RKey: 0xcafebabe, VAddr: 0x7f0012340000, NonDisc: 3},
			Payload: []byte("xy")},
	},
	{
		name: "SrcAvail/inline",
		hex: "" +
			"fe" + //       0 mid       0xFE SrcAvail
			"00" + //       1 flags
			"000a" + //     2 bufs      10
			"00000028" + // 4 len       40 = 16 + SrcAH 16 + 8 inline
			"00000010" + // 8 mseq      16
			"0000000f" + // 12 mseq_ack 15
			"00010000" + // 16 len      65536: the whole buffer, the 8 inline bytes included (§10.7)
			"12345678" + // 20 rkey     0x12345678
			"0000000000000ff8" + // 24 vaddr 0xFF8: page offset (FMR at I/O address 0), 8 bytes to the page end
			"4142434445464748", // 32 inline "ABCDEFGH" = first 8 bytes of the buffer
		size: 40,
		want: wire.Message{MID: wire.MIDSrcAvail, Bufs: 10, MSeq: 16, MSeqAck: 15,
			Advert:  wire.Advert{Len: 65536, RKey: 0x12345678, VAddr: 0xff8},
			Payload: []byte("ABCDEFGH")},
	},
}

// diffMessage names every field in which got and want differ.
func diffMessage(got, want wire.Message) []string {
	var d []string
	f := func(name string, g, w any) {
		if g != w {
			d = append(d, fmt.Sprintf("%s: got %v, want %v", name, g, w))
		}
	}
	f("MID", got.MID, want.MID)
	f("Flags", got.Flags, want.Flags)
	f("Bufs", got.Bufs, want.Bufs)
	f("MSeq", got.MSeq, want.MSeq)
	f("MSeqAck", got.MSeqAck, want.MSeqAck)
	f("Advert.Len", got.Advert.Len, want.Advert.Len)
	f("Advert.RKey", got.Advert.RKey, want.Advert.RKey)
	f("Advert.VAddr", got.Advert.VAddr, want.Advert.VAddr)
	f("Advert.NonDisc", got.Advert.NonDisc, want.Advert.NonDisc)
	f("Bytes", got.Bytes, want.Bytes)
	f("BufSize", got.BufSize, want.BufSize)
	f("Mode", got.Mode, want.Mode)
	f("ServiceID", got.ServiceID, want.ServiceID)
	if !bytes.Equal(got.Payload, want.Payload) {
		d = append(d, fmt.Sprintf("Payload: got %q, want %q", got.Payload, want.Payload))
	}
	return d
}

func TestGoldenMessages(t *testing.T) {
	seen := map[wire.MID]bool{}
	for _, g := range goldenMsgs {
		t.Run(g.name, func(t *testing.T) {
			b := unhex(t, g.hex)
			if len(b) != g.size {
				t.Fatalf("literal is %d bytes, hand count says %d", len(b), g.size)
			}
			got, err := wire.Decode(b)
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			for _, d := range diffMessage(got, g.want) {
				t.Error(d)
			}
			// The BSDH view reads the same fields in place.
			h := wire.BSDH(b)
			if h.MID() != g.want.MID || h.Flags() != g.want.Flags || h.Bufs() != g.want.Bufs ||
				h.Len() != uint32(g.size) || h.MSeq() != g.want.MSeq || h.MSeqAck() != g.want.MSeqAck {
				t.Errorf("BSDH view: mid=%v flags=%v bufs=%d len=%d mseq=%d ack=%d", h.MID(), h.Flags(), h.Bufs(), h.Len(), h.MSeq(), h.MSeqAck())
			}
			if got.Len() != g.size {
				t.Errorf("Len() = %d, want %d", got.Len(), g.size)
			}

			enc, err := g.want.Append(nil)
			if err != nil {
				t.Fatalf("Append: %v", err)
			}
			if !bytes.Equal(enc, b) {
				t.Errorf("Append:\n got %x\nwant %x", enc, b)
			}

			// Header-only encoding plus the payload gathered separately.
			hdr := make([]byte, wire.MaxHeaderLen)
			n, err := g.want.PutHeader(hdr, len(g.want.Payload))
			if err != nil {
				t.Fatalf("PutHeader: %v", err)
			}
			if gathered := append(hdr[:n:n], g.want.Payload...); !bytes.Equal(gathered, b) {
				t.Errorf("PutHeader+payload:\n got %x\nwant %x", gathered, b)
			}
			seen[g.want.MID] = true
		})
	}
	// Every stream MID has a golden vector.
	for m := 0; m < 256; m++ {
		if mid := wire.MID(m); mid.InStream() && !seen[mid] {
			t.Errorf("no golden vector for %v", mid)
		}
	}
}

// Hello, 92 bytes: the whole IB CM REQ private data (ref §2.3).
const goldenHello4 = "" +
	"00" + //       0 mid         0x00 Hello
	"00" + //       1 flags       0
	"0040" + //     2 bufs        64 receives posted
	"0000005c" + // 4 len         92
	"00000000" + // 8 mseq        0
	"00000000" + // 12 mseq_ack   0
	"22" + //       16 MajV:MinV  2.2
	"40" + //       17 IPV        0x40 IPv4
	"00" + //       18 reserved
	"01" + //       19 MaxAdverts 1
	"00008010" + // 20 DesRemRcvSz 32784
	"00008010" + // 24 LocalRcvSz  32784 = 8*4096 + 16 (BSDH included)
	"c350" + //     28 SrcPort    50000
	"0000" + //     30 reserved
	"000000000000000000000000" + // 32 SrcIP, first 12 bytes zero
	"0a010007" + // 44 SrcIP      10.1.0.7
	"000000000000000000000000" + // 48 DstIP, first 12 bytes zero
	"0a010008" + // 60 DstIP      10.1.0.8
	"00000000000000000000000000000000" + // 64..79 reserved
	"000000000000000000000000" //          80..91 reserved

const goldenHello6 = "" +
	"00" + //       0 mid         Hello
	"00" + //       1 flags
	"0010" + //     2 bufs        16
	"0000005c" + // 4 len         92
	"00000000" + // 8 mseq
	"00000000" + // 12 mseq_ack
	"22" + //       16 MajV:MinV  2.2
	"60" + //       17 IPV        0x60 IPv6
	"00" + //       18 reserved
	"ff" + //       19 MaxAdverts 255
	"00000810" + // 20 DesRemRcvSz 2064
	"00000810" + // 24 LocalRcvSz  2064 = 2048 + 16
	"1388" + //     28 SrcPort    5000
	"0000" + //     30 reserved
	"fd000000000000000000000000010007" + // 32 SrcIP fd00::1:7
	"20010db8000000000000000000000008" + // 48 DstIP 2001:db8::8
	"00000000000000000000000000000000" + // 64..79 reserved
	"000000000000000000000000" //          80..91 reserved

// Compact Hello, 32 bytes, after the RDMA CM header (layout in doc.go).
const goldenCompact = "" +
	"00" + //       0 mid         Hello
	"00" + //       1 flags
	"0040" + //     2 bufs        64
	"00000020" + // 4 len         32
	"00000000" + // 8 mseq
	"00000000" + // 12 mseq_ack
	"22" + //       16 MajV:MinV  2.2
	"40" + //       17 IPV        0x40 (CM addresses are IPv4)
	"01" + //       18 form       1
	"01" + //       19 MaxAdverts 1
	"00008010" + // 20 DesRemRcvSz 32784
	"00008010" + // 24 LocalRcvSz  32784
	"c350" + //     28 SrcPort    50000
	"7653" //       30 magic      "vS"

// HelloAck, 196 bytes: the whole IB CM REP private data (ref §2.4).
var goldenHelloAck = "" +
	"01" + //       0 mid         0x01 HelloAck
	"00" + //       1 flags
	"0040" + //     2 bufs        64
	"000000c4" + // 4 len         196
	"00000000" + // 8 mseq        0
	"00000000" + // 12 mseq_ack   0
	"22" + //       16 MajV:MinV  2.2
	"00" + //       17 reserved   (gen2 ipv_cap, left 0)
	"00" + //       18 reserved
	"01" + //       19 MaxAdverts 1
	"00008010" + // 20 ActRcvSz   32784 (BSDH included)
	strings.Repeat("00", 172) //  24..195 reserved, 172 bytes

func TestGoldenHello(t *testing.T) {
	cases := []struct {
		name string
		hex  string
		want wire.Hello
	}{
		{"ipv4", goldenHello4, wire.Hello{Bufs: 64, Version: 0x22, MaxAdverts: 1, DesRemRcvSz: 32784, LocalRcvSz: 32784,
			SrcPort: 50000, SrcIP: netip.MustParseAddr("10.1.0.7"), DstIP: netip.MustParseAddr("10.1.0.8")}},
		{"ipv6", goldenHello6, wire.Hello{Bufs: 16, Version: 0x22, MaxAdverts: 255, DesRemRcvSz: 2064, LocalRcvSz: 2064,
			SrcPort: 5000, SrcIP: netip.MustParseAddr("fd00::1:7"), DstIP: netip.MustParseAddr("2001:db8::8")}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := unhex(t, c.hex)
			if len(b) != 92 {
				t.Fatalf("literal is %d bytes, want 92", len(b))
			}
			got, err := wire.DecodeHello(b)
			if err != nil {
				t.Fatalf("DecodeHello: %v", err)
			}
			checkHello(t, got, c.want)
			enc, err := c.want.Append(nil)
			if err != nil {
				t.Fatalf("Append: %v", err)
			}
			if !bytes.Equal(enc, b) {
				t.Errorf("Append:\n got %x\nwant %x", enc, b)
			}
		})
	}
}

func checkHello(t *testing.T, got, want wire.Hello) {
	t.Helper()
	if got.Bufs != want.Bufs {
		t.Errorf("Bufs = %d, want %d", got.Bufs, want.Bufs)
	}
	if got.Version != want.Version || got.Version.Major() != 2 || got.Version.Minor() != 2 || got.Version.String() != "2.2" {
		t.Errorf("Version = %v, want %v", got.Version, want.Version)
	}
	if got.MaxAdverts != want.MaxAdverts {
		t.Errorf("MaxAdverts = %d, want %d", got.MaxAdverts, want.MaxAdverts)
	}
	if got.DesRemRcvSz != want.DesRemRcvSz {
		t.Errorf("DesRemRcvSz = %d, want %d", got.DesRemRcvSz, want.DesRemRcvSz)
	}
	if got.LocalRcvSz != want.LocalRcvSz {
		t.Errorf("LocalRcvSz = %d, want %d", got.LocalRcvSz, want.LocalRcvSz)
	}
	if got.SrcPort != want.SrcPort {
		t.Errorf("SrcPort = %d, want %d", got.SrcPort, want.SrcPort)
	}
	if got.SrcIP != want.SrcIP {
		t.Errorf("SrcIP = %v, want %v", got.SrcIP, want.SrcIP)
	}
	if got.DstIP != want.DstIP {
		t.Errorf("DstIP = %v, want %v", got.DstIP, want.DstIP)
	}
}

func TestGoldenCompactHello(t *testing.T) {
	b := unhex(t, goldenCompact)
	if len(b) != 32 {
		t.Fatalf("literal is %d bytes, want 32", len(b))
	}
	src, dst := netip.MustParseAddr("10.1.0.7"), netip.MustParseAddr("10.1.0.8")
	want := wire.Hello{Bufs: 64, Version: 0x22, MaxAdverts: 1, DesRemRcvSz: 32784, LocalRcvSz: 32784,
		SrcPort: 50000, SrcIP: src, DstIP: dst}

	// As the CM delivers it: 56 bytes of user data, zero-padded.
	padded := append(bytes.Clone(b), make([]byte, 56-32)...)
	for _, in := range [][]byte{b, padded} {
		got, err := wire.DecodeCompactHello(in, src, dst)
		if err != nil {
			t.Fatalf("DecodeCompactHello(%d bytes): %v", len(in), err)
		}
		checkHello(t, got, want)
	}
	enc, err := want.AppendCompact(nil)
	if err != nil {
		t.Fatalf("AppendCompact: %v", err)
	}
	if !bytes.Equal(enc, b) {
		t.Errorf("AppendCompact:\n got %x\nwant %x", enc, b)
	}
	// The compact Hello fits the REQ space the RDMA CM leaves (92-36).
	if f := wire.PortSpaceTCP.HelloForm(); f != wire.HelloCompact || f.Size() != 32 || f.Space() != 56 {
		t.Errorf("TCP form = %v size %d space %d", f, f.Size(), f.Space())
	}

	// The full Hello's first 30 bytes are the compact Hello's, except
	// len (4..7) and the form byte (18): the layouts share offsets.
	full := unhex(t, goldenHello4)
	for i := 0; i < 30; i++ {
		if i >= 4 && i < 8 || i == 18 {
			continue
		}
		if full[i] != b[i] {
			t.Errorf("byte %d: full %#02x, compact %#02x", i, full[i], b[i])
		}
	}
}

func TestGoldenHelloAck(t *testing.T) {
	b := unhex(t, goldenHelloAck)
	if len(b) != 196 {
		t.Fatalf("literal is %d bytes, want 196", len(b))
	}
	got, err := wire.DecodeHelloAck(b)
	if err != nil {
		t.Fatalf("DecodeHelloAck: %v", err)
	}
	want := wire.HelloAck{Bufs: 64, Version: 0x22, MaxAdverts: 1, ActRcvSz: 32784}
	if got != want {
		t.Errorf("DecodeHelloAck = %+v, want %+v", got, want)
	}
	enc, err := want.Append(nil)
	if err != nil {
		t.Fatalf("Append: %v", err)
	}
	if !bytes.Equal(enc, b) {
		t.Errorf("Append:\n got %x\nwant %x", enc, b)
	}
}
