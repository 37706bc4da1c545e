package wire

import (
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
)

// Extended-header field offsets, relative to the end of the BSDH (ref §2.2).
const (
	ahLen     = 0  // SrcAH/SinkAH u32 len
	ahRKey    = 4  // u32 rkey
	ahVAddr   = 8  // u64 vaddr
	ahNonDisc = 16 // SinkAH only: u32 non_disc
)

// Advert is a zero-copy advertisement: the SrcAH of a SrcAvail or the
// SinkAH of a SinkAvail (ref §2.2).
type Advert struct {
	// Len is the number of bytes advertised. For SrcAvail it counts the
	// whole buffer including the bytes also carried inline (ref §10.7).
	Len     uint32
	RKey    uint32 // remote key of the registration
	VAddr   uint64 // remote address of the first byte
	NonDisc uint32 // SinkAvail only: data messages the sink had received
}

// Message is one SDP message carried by an IB SEND: the BSDH fields, the
// MID's extended-header fields and the payload. Fields a MID does not use
// are zero after Decode and must be zero for Append/PutHeader. The BSDH len
// field is not stored: it is always BSDHSize + ExtLen + len(Payload).
type Message struct {
	MID     MID
	Flags   Flags
	Bufs    uint16 // receives posted by the sender (credit advertisement)
	MSeq    uint32
	MSeqAck uint32

	Advert    Advert    // SrcAvail (SrcAH), SinkAvail (SinkAH)
	Bytes     uint32    // RdmaRdCompl (RRCH), RdmaWrCompl (RWCH): bytes transferred
	BufSize   uint32    // ChRcvBuf (CRBH), ChRcvBufAck (CRBAH): buffer size, BSDH excluded (ref §10.1)
	Mode      Mode      // ModeChange (MCH byte 0)
	ServiceID ServiceID // SuspComm (SCH)

	// Payload follows the headers (Data, SrcAvail inline bytes,
	// SinkAvail). After Decode it aliases the decoded buffer.
	Payload []byte
}

// HeaderLen is the size of m's BSDH and extended header.
func (m *Message) HeaderLen() int { return m.MID.HeaderLen() }

// Len is the encoded size of m: the value of its BSDH len field.
func (m *Message) Len() int { return m.HeaderLen() + len(m.Payload) }

// Decode parses and validates one message as received by an IB SEND: b
// must be exactly the completion's byte count. The returned Payload
// aliases b. Any error is an *Error; the connection that produced it
// should be reset.
func Decode(b []byte) (Message, error) {
	if len(b) < BSDHSize {
		return Message{}, fail(ErrTruncated, 0, "bsdh", uint64(len(b)), "shorter than the 16-byte BSDH")
	}
	h := BSDH(b)
	mid := h.MID()
	if err := checkMID(mid); err != nil {
		return Message{}, err
	}
	if uint64(h.Len()) != uint64(len(b)) {
		return Message{}, fail(ErrLength, mid, "bsdh.len", uint64(h.Len()),
			fmt.Sprintf("differs from the %d bytes received", len(b)))
	}
	hl := mid.HeaderLen()
	if len(b) < hl {
		return Message{}, fail(ErrTruncated, mid, "bsdh.len", uint64(len(b)),
			fmt.Sprintf("%v needs %d header bytes", mid, hl))
	}
	m := Message{
		MID:     mid,
		Flags:   h.Flags(),
		Bufs:    h.Bufs(),
		MSeq:    h.MSeq(),
		MSeqAck: h.MSeqAck(),
	}
	ext := b[BSDHSize:hl]
	switch mid {
	case MIDSrcAvail, MIDSinkAvail:
		m.Advert.Len = binary.BigEndian.Uint32(ext[ahLen:])
		m.Advert.RKey = binary.BigEndian.Uint32(ext[ahRKey:])
		m.Advert.VAddr = binary.BigEndian.Uint64(ext[ahVAddr:])
		if mid == MIDSinkAvail {
			m.Advert.NonDisc = binary.BigEndian.Uint32(ext[ahNonDisc:])
		}
	case MIDRdmaRdCompl, MIDRdmaWrCompl:
		m.Bytes = binary.BigEndian.Uint32(ext)
	case MIDChRcvBuf, MIDChRcvBufAck:
		m.BufSize = binary.BigEndian.Uint32(ext)
	case MIDModeChange:
		if r := binary.BigEndian.Uint32(ext) & 0x00FFFFFF; r != 0 {
			return Message{}, fail(ErrField, mid, "mch.reserved", uint64(r), "bytes 1-3 are reserved")
		}
		m.Mode = Mode(ext[0])
	case MIDSuspComm:
		m.ServiceID = ServiceID(binary.BigEndian.Uint64(ext))
	}
	if len(b) > hl {
		m.Payload = b[hl:]
	}
	if err := m.check(len(b) - hl); err != nil {
		return Message{}, err
	}
	return m, nil
}

// Append validates m and appends its encoding (headers and payload) to dst.
func (m *Message) Append(dst []byte) ([]byte, error) {
	if err := m.check(len(m.Payload)); err != nil {
		return dst, err
	}
	n := m.Len()
	dst = grow(dst, n)
	b := dst[len(dst)-n:]
	m.putHeader(b, uint32(n))
	copy(b[m.HeaderLen():], m.Payload)
	return dst, nil
}

// PutHeader validates m as if it carried payloadLen payload bytes and writes
// its BSDH and extended header into b, returning the bytes written. It
// ignores m.Payload: it serves SENDs that gather the payload from other
// memory (a second scatter/gather entry). b must hold HeaderLen bytes.
func (m *Message) PutHeader(b []byte, payloadLen int) (int, error) {
	if payloadLen < 0 {
		return 0, fail(ErrLength, m.MID, "payload", 0, "negative payload length")
	}
	if err := m.check(payloadLen); err != nil {
		return 0, err
	}
	hl := m.HeaderLen()
	if len(b) < hl {
		return 0, &Error{MID: m.MID, Field: "buffer", Value: uint64(len(b)),
			Reason: fmt.Sprintf("need %d bytes", hl), Err: io.ErrShortBuffer}
	}
	m.putHeader(b, uint32(hl+payloadLen))
	return hl, nil
}

// putHeader writes the BSDH (with the given len) and the extended header.
// m has been checked.
func (m *Message) putHeader(b []byte, length uint32) {
	BSDH(b).put(m.MID, m.Flags, m.Bufs, length, m.MSeq, m.MSeqAck)
	ext := b[BSDHSize:m.HeaderLen()]
	switch m.MID {
	case MIDSrcAvail, MIDSinkAvail:
		binary.BigEndian.PutUint32(ext[ahLen:], m.Advert.Len)
		binary.BigEndian.PutUint32(ext[ahRKey:], m.Advert.RKey)
		binary.BigEndian.PutUint64(ext[ahVAddr:], m.Advert.VAddr)
		if m.MID == MIDSinkAvail {
			binary.BigEndian.PutUint32(ext[ahNonDisc:], m.Advert.NonDisc)
		}
	case MIDRdmaRdCompl, MIDRdmaWrCompl:
		binary.BigEndian.PutUint32(ext, m.Bytes)
	case MIDChRcvBuf, MIDChRcvBufAck:
		binary.BigEndian.PutUint32(ext, m.BufSize)
	case MIDModeChange:
		binary.BigEndian.PutUint32(ext, uint32(m.Mode)<<24)
	case MIDSuspComm:
		binary.BigEndian.PutUint64(ext, uint64(m.ServiceID))
	}
}

// checkMID accepts exactly the MIDs an IB SEND may carry.
func checkMID(mid MID) error {
	if !mid.Known() {
		return fail(ErrMID, mid, "bsdh.mid", uint64(mid), "reserved MID")
	}
	if !mid.InStream() {
		return fail(ErrMID, mid, "bsdh.mid", uint64(mid), "Hello/HelloAck travel only in CM private data")
	}
	return nil
}

// check applies every rule that does not depend on the raw bytes, for a
// message with n payload bytes. Decode and the encoders share it, so what
// one accepts the other produces.
func (m *Message) check(n int) error {
	mid := m.MID
	if err := checkMID(mid); err != nil {
		return err
	}
	if r := m.Flags &^ flagsDefined; r != 0 {
		return fail(ErrField, mid, "bsdh.flags", uint64(m.Flags), "reserved flag bits 3-7 set")
	}
	if n > 0 && !mid.HasPayload() {
		return fail(ErrLength, mid, "payload", uint64(n), "MID carries no payload")
	}
	if uint64(mid.HeaderLen())+uint64(n) > math.MaxUint32 {
		return fail(ErrLength, mid, "bsdh.len", uint64(mid.HeaderLen())+uint64(n), "exceeds 2^32-1")
	}
	if m.Flags&FlagOOBPres != 0 && n == 0 {
		return fail(ErrField, mid, "bsdh.flags", uint64(m.Flags), "OOB_PRES needs a payload byte to mark")
	}
	if err := m.checkUnused(); err != nil {
		return err
	}
	switch mid {
	case MIDSrcAvail:
		// len counts the inline bytes too (ref §2.2, §10.7), and an
		// advertisement with nothing left to read is meaningless.
		if uint64(m.Advert.Len) <= uint64(n) {
			return fail(ErrField, mid, "srcah.len", uint64(m.Advert.Len),
				fmt.Sprintf("must exceed the %d inline bytes it includes", n))
		}
		if m.Advert.VAddr > math.MaxUint64-uint64(m.Advert.Len) {
			return fail(ErrField, mid, "srcah.vaddr", m.Advert.VAddr, "vaddr+len wraps")
		}
	case MIDSinkAvail:
		if m.Advert.Len == 0 {
			return fail(ErrField, mid, "sinkah.len", 0, "empty advertisement")
		}
		if m.Advert.VAddr > math.MaxUint64-uint64(m.Advert.Len) {
			return fail(ErrField, mid, "sinkah.vaddr", m.Advert.VAddr, "vaddr+len wraps")
		}
	case MIDModeChange:
		if !m.Mode.Valid() {
			return fail(ErrField, mid, "mch.mode", uint64(m.Mode), "not one of the six defined mode values")
		}
	case MIDChRcvBuf:
		if m.BufSize == 0 {
			return fail(ErrField, mid, "crbh.size", 0, "zero buffer size")
		}
	case MIDChRcvBufAck:
		if m.BufSize == 0 {
			return fail(ErrField, mid, "crbah.size", 0, "zero buffer size")
		}
	}
	return nil
}

// checkUnused rejects extended-header fields set on a MID that has no
// such field: they would be silently dropped by the encoder.
func (m *Message) checkUnused() error {
	mid := m.MID
	var zero Advert
	switch {
	case mid == MIDSrcAvail && m.Advert.NonDisc != 0:
		return fail(ErrField, mid, "advert.nondisc", uint64(m.Advert.NonDisc), "SrcAH has no non_disc field")
	case mid != MIDSrcAvail && mid != MIDSinkAvail && m.Advert != zero:
		return fail(ErrField, mid, "advert", uint64(m.Advert.Len), "only SrcAvail/SinkAvail carry an advertisement")
	case mid != MIDRdmaRdCompl && mid != MIDRdmaWrCompl && m.Bytes != 0:
		return fail(ErrField, mid, "bytes", uint64(m.Bytes), "only RdmaRdCompl/RdmaWrCompl carry a byte count")
	case mid != MIDChRcvBuf && mid != MIDChRcvBufAck && m.BufSize != 0:
		return fail(ErrField, mid, "bufsize", uint64(m.BufSize), "only ChRcvBuf/ChRcvBufAck carry a buffer size")
	case mid != MIDModeChange && m.Mode != 0:
		return fail(ErrField, mid, "mode", uint64(m.Mode), "only ModeChange carries a mode")
	case mid != MIDSuspComm && m.ServiceID != 0:
		return fail(ErrField, mid, "serviceid", uint64(m.ServiceID), "only SuspComm carries a service ID")
	}
	return nil
}

// String renders m for debug logs: the MID name, the BSDH fields, the
// extended-header fields and the payload length (never the payload).
func (m *Message) String() string {
	var s strings.Builder
	fmt.Fprintf(&s, "%v flags=%v bufs=%d mseq=%d mseq_ack=%d", m.MID, m.Flags, m.Bufs, m.MSeq, m.MSeqAck)
	switch m.MID {
	case MIDSrcAvail:
		fmt.Fprintf(&s, " len=%d rkey=%#x vaddr=%#x", m.Advert.Len, m.Advert.RKey, m.Advert.VAddr)
	case MIDSinkAvail:
		fmt.Fprintf(&s, " len=%d rkey=%#x vaddr=%#x non_disc=%d", m.Advert.Len, m.Advert.RKey, m.Advert.VAddr, m.Advert.NonDisc)
	case MIDRdmaRdCompl, MIDRdmaWrCompl:
		fmt.Fprintf(&s, " bytes=%d", m.Bytes)
	case MIDChRcvBuf, MIDChRcvBufAck:
		fmt.Fprintf(&s, " size=%d", m.BufSize)
	case MIDModeChange:
		fmt.Fprintf(&s, " mode=%v", m.Mode)
	case MIDSuspComm:
		fmt.Fprintf(&s, " service=%v", m.ServiceID)
	}
	if len(m.Payload) > 0 {
		fmt.Fprintf(&s, " payload=%d", len(m.Payload))
	}
	return s.String()
}

// grow extends b by n bytes whose contents the caller must overwrite.
func grow(b []byte, n int) []byte { return slices.Grow(b, n)[:len(b)+n] }
