package wire_test

import (
	"errors"
	"go/build"
	"strings"
	"testing"

	"github.com/vsdp/vsdp/sdpback/wire"
)

// The MID table, typed from ref §2.1 (MID, name, extended-header bytes,
// payload allowed).
var midTable = []struct {
	mid     uint8
	name    string
	ext     int
	payload bool
}{
	{0x00, "Hello", 76, false},
	{0x01, "HelloAck", 180, false},
	{0x02, "DisConn", 0, false},
	{0x03, "AbortConn", 0, false},
	{0x04, "SendSM", 0, false},
	{0x05, "RdmaWrCompl", 4, false},
	{0x06, "RdmaRdCompl", 4, false},
	{0x07, "ModeChange", 4, false},
	{0x08, "SrcAvailCancel", 0, false},
	{0x09, "SinkAvailCancel", 0, false},
	{0x0A, "SinkCancelAck", 0, false},
	{0x0B, "ChRcvBuf", 4, false},
	{0x0C, "ChRcvBufAck", 4, false},
	{0x0D, "SuspComm", 8, false},
	{0x0E, "SuspCommAck", 0, false},
	{0xFD, "SinkAvail", 20, true},
	{0xFE, "SrcAvail", 16, true},
	{0xFF, "Data", 0, true},
}

func TestMIDTable(t *testing.T) {
	known := map[uint8]bool{}
	for _, r := range midTable {
		known[r.mid] = true
		m := wire.MID(r.mid)
		if m.String() != r.name || !m.Known() || m.ExtLen() != r.ext || m.HeaderLen() != 16+r.ext || m.HasPayload() != r.payload {
			t.Errorf("%#02x: String %q Known %v ExtLen %d HeaderLen %d HasPayload %v; want %q %d %v",
				r.mid, m, m.Known(), m.ExtLen(), m.HeaderLen(), m.HasPayload(), r.name, r.ext, r.payload)
		}
		if m.InStream() != (r.mid > 0x01) {
			t.Errorf("%v: InStream = %v", m, m.InStream())
		}
	}
	for i := 0; i < 256; i++ {
		if m := wire.MID(i); !known[uint8(i)] {
			if m.Known() || m.InStream() || m.ExtLen() != 0 || m.HasPayload() || !strings.HasPrefix(m.String(), "MID(0x") {
				t.Errorf("reserved %#02x reads as %q known=%v", i, m, m.Known())
			}
		}
	}
	if wire.HelloSize != 92 || wire.HelloAckSize != 196 || wire.MaxHeaderLen != 36 {
		t.Errorf("sizes %d %d %d", wire.HelloSize, wire.HelloAckSize, wire.MaxHeaderLen)
	}
}

func TestFlagsString(t *testing.T) {
	for f, want := range map[wire.Flags]string{
		0:    "0",
		0x01: "OOB_PRES",
		0x02: "OOB_PEND",
		0x04: "REQ_PIPE",
		0x03: "OOB_PRES|OOB_PEND",
		0x81: "OOB_PRES|0x80",
	} {
		if f.String() != want {
			t.Errorf("Flags(%#x) = %q, want %q", uint8(f), f, want)
		}
	}
}

func TestModes(t *testing.T) {
	// ref §2.2: the six wire values.
	table := []struct {
		v    uint8
		name string
		flow wire.Flow
		send bool
	}{
		{0x00, "BUFF_RECV", wire.Buffered, false},
		{0x10, "COMB_RECV", wire.Combined, false},
		{0x20, "PIPE_RECV", wire.Pipelined, false},
		{0x80, "BUFF_SEND", wire.Buffered, true},
		{0x90, "COMB_SEND", wire.Combined, true},
		{0xA0, "PIPE_SEND", wire.Pipelined, true},
	}
	valid := map[uint8]bool{}
	for _, r := range table {
		m := wire.Mode(r.v)
		valid[r.v] = true
		if !m.Valid() || m.String() != r.name || m.Flow() != r.flow || m.Send() != r.send || wire.MakeMode(r.flow, r.send) != m {
			t.Errorf("%#02x: %v valid=%v flow=%v send=%v", r.v, m, m.Valid(), m.Flow(), m.Send())
		}
	}
	for i := 0; i < 256; i++ {
		if m := wire.Mode(i); m.Valid() != valid[uint8(i)] {
			t.Errorf("Mode(%#02x).Valid() = %v", i, m.Valid())
		}
	}
	if wire.Mode(0x30).String() != "Mode(0x30)" || wire.Flow(3).String() != "Flow(3)" || wire.Pipelined.String() != "Pipelined" {
		t.Errorf("strings: %v %v %v", wire.Mode(0x30), wire.Flow(3), wire.Pipelined)
	}
}

func TestServiceIDs(t *testing.T) {
	// ref §3.1: SDP = 0x10000|port; §10.2: RDMA_PS_TCP = 0x01060000|port.
	if id := wire.SDPServiceID(5000); id != 0x11388 || id&wire.SDPServiceMask != 0x10000 || id.String() != "SDP:5000" {
		t.Errorf("SDP 5000 = %#x %v", uint64(id), id)
	}
	if id := wire.TCPServiceID(5000); id != 0x01061388 || id.String() != "TCP:5000" {
		t.Errorf("TCP 5000 = %#x %v", uint64(id), id)
	}
	if id := wire.SDPServiceID(0xFFFF); id != 0x1FFFF {
		t.Errorf("SDP 65535 = %#x", uint64(id))
	}
	for _, c := range []struct {
		id   wire.ServiceID
		ps   wire.PortSpace
		port uint16
	}{{0x10000, wire.PortSpaceSDP, 0}, {0x1ffff, wire.PortSpaceSDP, 65535}, {0x01060050, wire.PortSpaceTCP, 80}} {
		ps, port, err := c.id.Split()
		if err != nil || ps != c.ps || port != c.port {
			t.Errorf("Split(%#x) = %v %d %v", uint64(c.id), ps, port, err)
		}
	}
	for _, bad := range []wire.ServiceID{0, 0x1388, 0x21388, 0x01111388, 1<<32 | 0x11388, 0x0000_0001_0106_0050} {
		if _, _, err := bad.Split(); !errors.Is(err, wire.ErrField) {
			t.Errorf("Split(%#x) accepted", uint64(bad))
		}
		if !strings.HasPrefix(bad.String(), "0x") && bad != 0 {
			t.Errorf("String(%#x) = %q", uint64(bad), bad)
		}
	}
	if wire.PortSpaceSDP.HelloForm() != wire.HelloFull || wire.HelloFull.Size() != 92 || wire.HelloFull.Space() != 92 {
		t.Errorf("SDP port space: %v", wire.PortSpaceSDP.HelloForm())
	}
	if wire.PortSpaceSDP.String() != "SDP" || wire.PortSpace(7).String() != "PortSpace(0x0007)" || wire.HelloCompact.String() != "compact" {
		t.Errorf("strings: %v %v %v", wire.PortSpaceSDP, wire.PortSpace(7), wire.HelloCompact)
	}
}

func TestMessageString(t *testing.T) {
	m, err := wire.Decode(unhex(t, goldenMsgs[len(goldenMsgs)-1].hex))
	if err != nil {
		t.Fatal(err)
	}
	want := "SrcAvail flags=0 bufs=10 mseq=16 mseq_ack=15 len=65536 rkey=0x12345678 vaddr=0xff8 payload=8"
	if s := m.String(); s != want {
		t.Errorf("String() = %q, want %q", s, want)
	}
}

// TestPure keeps the package free of imports outside the standard library
// (STYLE: sdpback/wire must not import anything else).
func TestPure(t *testing.T) {
	pkg, err := build.ImportDir(".", 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(pkg.Imports) == 0 {
		t.Fatal("no imports found: the check is not looking at the package")
	}
	for _, imp := range pkg.Imports {
		if first, _, _ := strings.Cut(imp, "/"); strings.Contains(first, ".") {
			t.Errorf("non-standard import %q", imp)
		}
	}
}
