package refpeer

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Message IDs, as ib_sdp's SDP_MID_* (ref §2.1, gen2 column).
const (
	MidHello          = 0x00
	MidHelloAck       = 0x01
	MidDisconn        = 0x02
	MidAbort          = 0x03
	MidSendSM         = 0x04
	MidRdmaRdCompl    = 0x06
	MidSrcAvailCancel = 0x08
	MidChRcvBuf       = 0x0B
	MidChRcvBufAck    = 0x0C
	MidSinkAvail      = 0xFD
	MidSrcAvail       = 0xFE
	MidData           = 0xFF
)

// BSDH flag bits ib_sdp uses (SDP_OOB_PRES, SDP_OOB_PEND).
const (
	OOBPres = 1
	OOBPend = 2
)

// Protocol constants ib_sdp announces.
const (
	MajMin     = 0x22 // SDP_MAJV_MINV
	MaxAdverts = 1
	HeadSize   = 16 // SDP_HEAD_SIZE, sizeof(struct sdp_bsdh)
)

// Absolute byte offsets. struct sdp_bsdh:
const (
	offMid     = 0
	offFlags   = 1
	offBufs    = 2
	offLen     = 4
	offMseq    = 8
	offMseqAck = 12
)

// struct sdp_srcah follows the BSDH of a SrcAvail; struct sdp_sinkah a
// SinkAvail's.
const (
	offAhLen      = 16
	offAhRkey     = 20
	offAhVaddr    = 24
	offSinkNonDsc = 32
	srcAvailHead  = 32 // BSDH + sdp_srcah
	sinkAvailHead = 36 // BSDH + sdp_sinkah
)

// struct sdp_rrch (RdmaRdCompl) and struct sdp_chrecvbuf (ChRcvBuf/Ack):
// one u32 after the BSDH.
const (
	offWord  = 16
	wordHead = 20
)

// struct sdp_hh (Hello, CM REQ private data).
const (
	offHHMajMin      = 16
	offHHIPVCap      = 17
	offHHMaxAdverts  = 19
	offHHDesRemRcvSz = 20
	offHHLocalRcvSz  = 24
	offHHSrcPort     = 28
	offHHSrcAddr     = 32
	offHHDstAddr     = 48
	HelloLen         = 92
)

// struct sdp_hah (HelloAck, CM REP private data).
const (
	offHAHMajMin     = 16
	offHAHMaxAdverts = 19
	offHAHActRcvSz   = 20
	HelloAckLen      = 196
)

// Errors.
var (
	ErrShort      = errors.New("refpeer: message shorter than its headers")
	ErrLen        = errors.New("refpeer: bsdh len does not match the bytes received")
	ErrUnknownMID = errors.New("refpeer: MID ib_sdp does not handle")
	ErrPayload    = errors.New("refpeer: payload on a MID that carries none")
	ErrHello      = errors.New("refpeer: Hello/HelloAck rejected")
)

// BSDH mirrors struct sdp_bsdh, host byte order.
type BSDH struct {
	Mid     uint8
	Flags   uint8
	Bufs    uint16
	Len     uint32
	Mseq    uint32
	MseqAck uint32
}

// SrcAH mirrors struct sdp_srcah.
type SrcAH struct {
	Len   uint32 // whole advertised buffer, inline bytes included
	Rkey  uint32
	Vaddr uint64
}

// SinkAH mirrors the SinkAvail extended header (ib_sdp only recognises it).
type SinkAH struct {
	Len     uint32
	Rkey    uint32
	Vaddr   uint64
	NonDisc uint32
}

// Packet is one message of an IB SEND.
type Packet struct {
	BSDH
	SrcAH   *SrcAH  // MidSrcAvail
	SinkAH  *SinkAH // MidSinkAvail
	RRCHLen uint32  // MidRdmaRdCompl: bytes RDMA-read
	CRBSize uint32  // MidChRcvBuf/MidChRcvBufAck: buffer size without the BSDH
	Data    []byte  // payload (Data, SrcAvail inline, SinkAvail)
}

// headLen returns the header size of mid and whether it may carry payload;
// ok is false for a MID ib_sdp does not handle.
func headLen(mid uint8) (n int, payload, ok bool) {
	switch mid {
	case MidData:
		return HeadSize, true, true
	case MidSrcAvail:
		return srcAvailHead, true, true
	case MidSinkAvail:
		return sinkAvailHead, true, true
	case MidRdmaRdCompl, MidChRcvBuf, MidChRcvBufAck:
		return wordHead, false, true
	case MidDisconn, MidAbort, MidSendSM, MidSrcAvailCancel:
		return HeadSize, false, true
	}
	return 0, false, false
}

// ParseBSDH reads the BSDH at the start of b.
func ParseBSDH(b []byte) (BSDH, error) {
	if len(b) < HeadSize {
		return BSDH{}, ErrShort
	}
	return BSDH{
		Mid:     b[offMid],
		Flags:   b[offFlags],
		Bufs:    binary.BigEndian.Uint16(b[offBufs : offBufs+2]),
		Len:     binary.BigEndian.Uint32(b[offLen : offLen+4]),
		Mseq:    binary.BigEndian.Uint32(b[offMseq : offMseq+4]),
		MseqAck: binary.BigEndian.Uint32(b[offMseqAck : offMseqAck+4]),
	}, nil
}

func putBSDH(b []byte, h BSDH) {
	b[offMid] = h.Mid
	b[offFlags] = h.Flags
	binary.BigEndian.PutUint16(b[offBufs:offBufs+2], h.Bufs)
	binary.BigEndian.PutUint32(b[offLen:offLen+4], h.Len)
	binary.BigEndian.PutUint32(b[offMseq:offMseq+4], h.Mseq)
	binary.BigEndian.PutUint32(b[offMseqAck:offMseqAck+4], h.MseqAck)
}

// Unmarshal parses one received message (b is the completion's bytes).
// For a MID ib_sdp does not handle it returns the parsed BSDH and
// ErrUnknownMID. Data aliases b.
func Unmarshal(b []byte) (Packet, error) {
	h, err := ParseBSDH(b)
	if err != nil {
		return Packet{}, err
	}
	if int64(h.Len) != int64(len(b)) {
		return Packet{BSDH: h}, fmt.Errorf("%w: len %d, received %d", ErrLen, h.Len, len(b))
	}
	head, payload, ok := headLen(h.Mid)
	if !ok {
		return Packet{BSDH: h}, fmt.Errorf("%w: %#x", ErrUnknownMID, h.Mid)
	}
	if len(b) < head {
		return Packet{BSDH: h}, fmt.Errorf("%w: mid %#x needs %d bytes, have %d", ErrShort, h.Mid, head, len(b))
	}
	if !payload && len(b) > head {
		return Packet{BSDH: h}, fmt.Errorf("%w: mid %#x with %d extra bytes", ErrPayload, h.Mid, len(b)-head)
	}
	p := Packet{BSDH: h}
	switch h.Mid {
	case MidSrcAvail:
		p.SrcAH = &SrcAH{
			Len:   binary.BigEndian.Uint32(b[offAhLen : offAhLen+4]),
			Rkey:  binary.BigEndian.Uint32(b[offAhRkey : offAhRkey+4]),
			Vaddr: binary.BigEndian.Uint64(b[offAhVaddr : offAhVaddr+8]),
		}
	case MidSinkAvail:
		p.SinkAH = &SinkAH{
			Len:     binary.BigEndian.Uint32(b[offAhLen : offAhLen+4]),
			Rkey:    binary.BigEndian.Uint32(b[offAhRkey : offAhRkey+4]),
			Vaddr:   binary.BigEndian.Uint64(b[offAhVaddr : offAhVaddr+8]),
			NonDisc: binary.BigEndian.Uint32(b[offSinkNonDsc : offSinkNonDsc+4]),
		}
	case MidRdmaRdCompl:
		p.RRCHLen = binary.BigEndian.Uint32(b[offWord : offWord+4])
	case MidChRcvBuf, MidChRcvBufAck:
		p.CRBSize = binary.BigEndian.Uint32(b[offWord : offWord+4])
	}
	if len(b) > head {
		p.Data = b[head:]
	}
	return p, nil
}

// Marshal encodes p into a new buffer. It sets the BSDH len from the MID's
// header size and len(p.Data), ignoring p.Len; everything else is written
// as given. SrcAvail needs p.SrcAH and SinkAvail p.SinkAH.
func Marshal(p Packet) ([]byte, error) {
	head, payload, ok := headLen(p.Mid)
	if !ok {
		return nil, fmt.Errorf("%w: %#x", ErrUnknownMID, p.Mid)
	}
	if !payload && len(p.Data) > 0 {
		return nil, fmt.Errorf("%w: mid %#x", ErrPayload, p.Mid)
	}
	b := make([]byte, head+len(p.Data))
	h := p.BSDH
	h.Len = uint32(len(b))
	putBSDH(b, h)
	switch p.Mid {
	case MidSrcAvail:
		if p.SrcAH == nil {
			return nil, errors.New("refpeer: SrcAvail without SrcAH")
		}
		binary.BigEndian.PutUint32(b[offAhLen:offAhLen+4], p.SrcAH.Len)
		binary.BigEndian.PutUint32(b[offAhRkey:offAhRkey+4], p.SrcAH.Rkey)
		binary.BigEndian.PutUint64(b[offAhVaddr:offAhVaddr+8], p.SrcAH.Vaddr)
	case MidSinkAvail:
		if p.SinkAH == nil {
			return nil, errors.New("refpeer: SinkAvail without SinkAH")
		}
		binary.BigEndian.PutUint32(b[offAhLen:offAhLen+4], p.SinkAH.Len)
		binary.BigEndian.PutUint32(b[offAhRkey:offAhRkey+4], p.SinkAH.Rkey)
		binary.BigEndian.PutUint64(b[offAhVaddr:offAhVaddr+8], p.SinkAH.Vaddr)
		binary.BigEndian.PutUint32(b[offSinkNonDsc:offSinkNonDsc+4], p.SinkAH.NonDisc)
	case MidRdmaRdCompl:
		binary.BigEndian.PutUint32(b[offWord:offWord+4], p.RRCHLen)
	case MidChRcvBuf, MidChRcvBufAck:
		binary.BigEndian.PutUint32(b[offWord:offWord+4], p.CRBSize)
	}
	copy(b[head:], p.Data)
	return b, nil
}

// HH mirrors struct sdp_hh: the BSDH plus the Hello header.
type HH struct {
	BSDH
	MajMin      uint8
	IPVCap      uint8 // IP version in the high nibble: 0x40 or 0x60
	MaxAdverts  uint8
	DesRemRcvSz uint32
	LocalRcvSz  uint32 // BSDH included
	SrcPort     uint16
	SrcAddr     [16]byte // IPv4 in the last 4 bytes
	DstAddr     [16]byte
}

// HAH mirrors struct sdp_hah: the BSDH plus the HelloAck header.
type HAH struct {
	BSDH
	MajMin     uint8
	MaxAdverts uint8
	ActRcvSz   uint32 // BSDH included
}

// MarshalHello returns the 92-byte REQ private data for hh. Mid and Len
// are forced to Hello and 92; other BSDH fields are written as given.
func MarshalHello(hh HH) []byte {
	b := make([]byte, HelloLen)
	h := hh.BSDH
	h.Mid, h.Len = MidHello, HelloLen
	putBSDH(b, h)
	b[offHHMajMin] = hh.MajMin
	b[offHHIPVCap] = hh.IPVCap
	b[offHHMaxAdverts] = hh.MaxAdverts
	binary.BigEndian.PutUint32(b[offHHDesRemRcvSz:offHHDesRemRcvSz+4], hh.DesRemRcvSz)
	binary.BigEndian.PutUint32(b[offHHLocalRcvSz:offHHLocalRcvSz+4], hh.LocalRcvSz)
	binary.BigEndian.PutUint16(b[offHHSrcPort:offHHSrcPort+2], hh.SrcPort)
	copy(b[offHHSrcAddr:offHHSrcAddr+16], hh.SrcAddr[:])
	copy(b[offHHDstAddr:offHHDstAddr+16], hh.DstAddr[:])
	return b
}

// ParseHello parses REQ private data with the checks ib_sdp's passive side
// and the RDMA CM make: 92 bytes, mid Hello, major version 2, IP version
// 4 or 6, MaxAdverts > 0.
func ParseHello(b []byte) (HH, error) {
	if len(b) != HelloLen {
		return HH{}, fmt.Errorf("%w: %d bytes", ErrHello, len(b))
	}
	h, _ := ParseBSDH(b)
	hh := HH{
		BSDH:        h,
		MajMin:      b[offHHMajMin],
		IPVCap:      b[offHHIPVCap],
		MaxAdverts:  b[offHHMaxAdverts],
		DesRemRcvSz: binary.BigEndian.Uint32(b[offHHDesRemRcvSz : offHHDesRemRcvSz+4]),
		LocalRcvSz:  binary.BigEndian.Uint32(b[offHHLocalRcvSz : offHHLocalRcvSz+4]),
		SrcPort:     binary.BigEndian.Uint16(b[offHHSrcPort : offHHSrcPort+2]),
	}
	copy(hh.SrcAddr[:], b[offHHSrcAddr:offHHSrcAddr+16])
	copy(hh.DstAddr[:], b[offHHDstAddr:offHHDstAddr+16])
	switch {
	case h.Mid != MidHello:
		return hh, fmt.Errorf("%w: mid %#x", ErrHello, h.Mid)
	case hh.MajMin>>4 != MajMin>>4:
		return hh, fmt.Errorf("%w: version %#x", ErrHello, hh.MajMin)
	case hh.IPVCap>>4 != 4 && hh.IPVCap>>4 != 6:
		return hh, fmt.Errorf("%w: ipv_cap %#x", ErrHello, hh.IPVCap)
	case hh.MaxAdverts == 0:
		return hh, fmt.Errorf("%w: max_adverts 0", ErrHello)
	}
	return hh, nil
}

// MarshalHelloAck returns the 196-byte REP private data for hah. Mid and
// Len are forced to HelloAck and 196.
func MarshalHelloAck(hah HAH) []byte {
	b := make([]byte, HelloAckLen)
	h := hah.BSDH
	h.Mid, h.Len = MidHelloAck, HelloAckLen
	putBSDH(b, h)
	b[offHAHMajMin] = hah.MajMin
	b[offHAHMaxAdverts] = hah.MaxAdverts
	binary.BigEndian.PutUint32(b[offHAHActRcvSz:offHAHActRcvSz+4], hah.ActRcvSz)
	return b
}

// ParseHelloAck parses REP private data with the checks ib_sdp's active
// side and the RDMA CM make: 196 bytes, mid HelloAck, major version 2.
func ParseHelloAck(b []byte) (HAH, error) {
	if len(b) != HelloAckLen {
		return HAH{}, fmt.Errorf("%w: %d bytes", ErrHello, len(b))
	}
	h, _ := ParseBSDH(b)
	hah := HAH{
		BSDH:       h,
		MajMin:     b[offHAHMajMin],
		MaxAdverts: b[offHAHMaxAdverts],
		ActRcvSz:   binary.BigEndian.Uint32(b[offHAHActRcvSz : offHAHActRcvSz+4]),
	}
	switch {
	case h.Mid != MidHelloAck:
		return hah, fmt.Errorf("%w: mid %#x", ErrHello, h.Mid)
	case hah.MajMin>>4 != MajMin>>4:
		return hah, fmt.Errorf("%w: version %#x", ErrHello, hah.MajMin)
	}
	return hah, nil
}
