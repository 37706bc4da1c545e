package wire

import (
	"fmt"
	"strings"
)

// Sizes of the fixed parts of SDP messages, in bytes (ref §1, §2.2–§2.4).
const (
	BSDHSize = 16 // Base Sockets Direct Header

	SrcAHSize  = 16 // SrcAvail extended header: len, rkey, vaddr
	SinkAHSize = 20 // SinkAvail extended header: len, rkey, vaddr, non_disc
	RWCHSize   = 4  // RdmaWrCompl: bytes written
	RRCHSize   = 4  // RdmaRdCompl: bytes read
	MCHSize    = 4  // ModeChange: mode byte + 3 reserved
	CRBHSize   = 4  // ChRcvBuf: requested size
	CRBAHSize  = 4  // ChRcvBufAck: new size
	SCHSize    = 8  // SuspComm: new service ID
	HHSize     = 76 // Hello extended header
	HAHSize    = 180

	// MaxHeaderLen is the longest BSDH plus extended header of any
	// message carried in an IB SEND (SinkAvail's).
	MaxHeaderLen = BSDHSize + SinkAHSize

	// MinRcvSize is the smallest receive-buffer size (BSDH included) a
	// Hello or HelloAck may advertise: a buffer that cannot hold every
	// header-only message could stall the peer, so smaller values are
	// rejected as garbage. Real peers advertise 2 KiB to 32 KiB.
	MinRcvSize = MaxHeaderLen
)

// MID is the message identifier in byte 0 of the BSDH (ref §2.1).
type MID uint8

// Message identifiers. Hello and HelloAck travel only in CM private data;
// every other MID is carried by one IB SEND.
const (
	MIDHello           MID = 0x00 // Hello (CM REQ private data)
	MIDHelloAck        MID = 0x01 // HelloAck (CM REP private data)
	MIDDisConn         MID = 0x02 // DisConn: in-band FIN
	MIDAbortConn       MID = 0x03 // AbortConn
	MIDSendSM          MID = 0x04 // SendSM: "send smaller", fall back to BCopy
	MIDRdmaWrCompl     MID = 0x05 // RdmaWrCompl (RWCH)
	MIDRdmaRdCompl     MID = 0x06 // RdmaRdCompl (RRCH)
	MIDModeChange      MID = 0x07 // ModeChange (MCH)
	MIDSrcAvailCancel  MID = 0x08 // SrcAvailCancel
	MIDSinkAvailCancel MID = 0x09 // SinkAvailCancel ("SnkCancel")
	MIDSinkCancelAck   MID = 0x0A // SinkCancelAck
	MIDChRcvBuf        MID = 0x0B // ChRcvBuf (CRBH)
	MIDChRcvBufAck     MID = 0x0C // ChRcvBufAck (CRBAH)
	MIDSuspComm        MID = 0x0D // SuspComm (SCH)
	MIDSuspCommAck     MID = 0x0E // SuspCommAck
	MIDSinkAvail       MID = 0xFD // SinkAvail (SinkAH), optional payload
	MIDSrcAvail        MID = 0xFE // SrcAvail (SrcAH), optional inline payload
	MIDData            MID = 0xFF // Data, optional payload (none = credit update)
)

// midInfo is one row of the MID table (ref §2.1).
type midInfo struct {
	name    string
	ext     int  // extended header size
	payload bool // may carry payload after the extended header
	known   bool
}

// midTable is indexed by MID; rows of reserved MIDs are zero.
var midTable = [256]midInfo{
	MIDHello:           {"Hello", HHSize, false, true},
	MIDHelloAck:        {"HelloAck", HAHSize, false, true},
	MIDDisConn:         {"DisConn", 0, false, true},
	MIDAbortConn:       {"AbortConn", 0, false, true},
	MIDSendSM:          {"SendSM", 0, false, true},
	MIDRdmaWrCompl:     {"RdmaWrCompl", RWCHSize, false, true},
	MIDRdmaRdCompl:     {"RdmaRdCompl", RRCHSize, false, true},
	MIDModeChange:      {"ModeChange", MCHSize, false, true},
	MIDSrcAvailCancel:  {"SrcAvailCancel", 0, false, true},
	MIDSinkAvailCancel: {"SinkAvailCancel", 0, false, true},
	MIDSinkCancelAck:   {"SinkCancelAck", 0, false, true},
	MIDChRcvBuf:        {"ChRcvBuf", CRBHSize, false, true},
	MIDChRcvBufAck:     {"ChRcvBufAck", CRBAHSize, false, true},
	MIDSuspComm:        {"SuspComm", SCHSize, false, true},
	MIDSuspCommAck:     {"SuspCommAck", 0, false, true},
	MIDSinkAvail:       {"SinkAvail", SinkAHSize, true, true},
	MIDSrcAvail:        {"SrcAvail", SrcAHSize, true, true},
	MIDData:            {"Data", 0, true, true},
}

func (m MID) info() (midInfo, bool) {
	i := midTable[m]
	return i, i.known
}

// String returns the message name as the reference spells it, or
// "MID(0xNN)" for a reserved value.
func (m MID) String() string {
	if i, ok := m.info(); ok {
		return i.name
	}
	return fmt.Sprintf("MID(%#02x)", uint8(m))
}

// Known reports whether m is a defined MID.
func (m MID) Known() bool {
	_, ok := m.info()
	return ok
}

// InStream reports whether m is carried by an IB SEND (every defined MID
// except Hello and HelloAck, which are CM private data).
func (m MID) InStream() bool {
	return m.Known() && m != MIDHello && m != MIDHelloAck
}

// ExtLen is the size of m's extended header (0 for none or an unknown MID).
func (m MID) ExtLen() int {
	i, _ := m.info()
	return i.ext
}

// HeaderLen is BSDHSize plus m's extended header: the smallest valid
// message with this MID.
func (m MID) HeaderLen() int { return BSDHSize + m.ExtLen() }

// HasPayload reports whether m may carry payload bytes after its headers
// (Data, SrcAvail, SinkAvail).
func (m MID) HasPayload() bool {
	i, _ := m.info()
	return i.payload
}

// Flags is the BSDH flags byte (ref §1).
type Flags uint8

// BSDH flags. Bits 3–7 are reserved.
const (
	FlagOOBPres Flags = 1 << 0 // OOB_PRES: the last payload byte is the urgent byte
	FlagOOBPend Flags = 1 << 1 // OOB_PEND: urgent data is pending
	FlagReqPipe Flags = 1 << 2 // REQ_PIPE: sink asks for Pipelined mode (gen1)

	flagsDefined = FlagOOBPres | FlagOOBPend | FlagReqPipe
)

// String lists the set flags by their wire names, e.g. "OOB_PRES|OOB_PEND".
func (f Flags) String() string {
	if f == 0 {
		return "0"
	}
	var parts []string
	for _, x := range []struct {
		bit  Flags
		name string
	}{{FlagOOBPres, "OOB_PRES"}, {FlagOOBPend, "OOB_PEND"}, {FlagReqPipe, "REQ_PIPE"}} {
		if f&x.bit != 0 {
			parts = append(parts, x.name)
		}
	}
	if r := f &^ flagsDefined; r != 0 {
		parts = append(parts, fmt.Sprintf("%#02x", uint8(r)))
	}
	return strings.Join(parts, "|")
}

// Flow is a per-direction flow-control mode (ref §5.4).
type Flow uint8

// Flow-control modes as numbered in the MCH mode field.
const (
	Buffered  Flow = 0
	Combined  Flow = 1
	Pipelined Flow = 2
)

func (f Flow) String() string {
	switch f {
	case Buffered:
		return "Buffered"
	case Combined:
		return "Combined"
	case Pipelined:
		return "Pipelined"
	}
	return fmt.Sprintf("Flow(%d)", uint8(f))
}

// Mode is byte 0 of the ModeChange extended header: bits 4–6 hold the
// Flow, bit 7 is set when the change applies to the recipient's send
// direction (ref §2.2). Bits 0–3 are reserved.
type Mode uint8

// The six defined ModeChange values.
const (
	ModeBuffRecv Mode = 0x00 // BUFF_RECV
	ModeCombRecv Mode = 0x10 // COMB_RECV
	ModePipeRecv Mode = 0x20 // PIPE_RECV
	ModeBuffSend Mode = 0x80 // BUFF_SEND
	ModeCombSend Mode = 0x90 // COMB_SEND
	ModePipeSend Mode = 0xA0 // PIPE_SEND
)

// MakeMode builds the Mode for flow f in the recipient's send (send=true)
// or receive direction.
func MakeMode(f Flow, send bool) Mode {
	m := Mode(f&7) << 4
	if send {
		m |= 0x80
	}
	return m
}

// Flow is the mode's flow-control mode.
func (m Mode) Flow() Flow { return Flow(m >> 4 & 7) }

// Send reports whether the change applies to the recipient's send direction.
func (m Mode) Send() bool { return m&0x80 != 0 }

// Valid reports whether m is one of the six defined values.
func (m Mode) Valid() bool { return m&0x0F == 0 && m.Flow() <= Pipelined }

func (m Mode) String() string {
	if !m.Valid() {
		return fmt.Sprintf("Mode(%#02x)", uint8(m))
	}
	dir := "RECV"
	if m.Send() {
		dir = "SEND"
	}
	return [...]string{"BUFF_", "COMB_", "PIPE_"}[m.Flow()] + dir
}
