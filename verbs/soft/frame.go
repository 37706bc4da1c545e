package soft

// Wire format of the soft transport.
//
// Every frame is a fixed 32-byte header followed by Length payload bytes. All
// fields are big-endian:
//
//	0  u8  version (1)
//	1  u8  type
//	2  u8  flags (Imm, Inv, Solicited)
//	3  u8  code (NAK syndrome)
//	4  u32 length of the payload
//	8  u32 PSN
//	12 u32 immediate data / key to invalidate / REJ reason / REQ source address
//	16 u64 remote virtual address / REQ service ID
//	24 u32 rkey / REQ destination address
//	28 u32 DMA length (READ request) / RNR timer in µs (RNR NAK) / queue depth (REQ, REP)
//
// The connection manager messages (REQ, REP, REJ, RTU, DREQ, DREP) travel on
// the same link before and after the data phase; their payload is private
// data. Requests (SEND, WRITE, READ request) carry consecutive PSNs; the
// responder answers each in order with ACK (coalesced), NAK or READ response.
// decodeHeader checks every field against its type, so the engine only sees
// headers whose fields are in range for their type.

import (
	"encoding/binary"
	"fmt"

	"github.com/vsdp/vsdp/verbs"
)

const (
	headerLen    = 32
	frameVersion = 1

	// maxQueueDepth bounds the queue depth a peer may declare, which sizes
	// what this side accepts from it.
	maxQueueDepth = 1 << 14
	// maxRNRTimerMicros bounds the RNR timer a peer may ask for (IB's
	// largest encoded value is 655.36 ms).
	maxRNRTimerMicros = 1 << 20
)

type frameType uint8

const (
	frameREQ      frameType = 1
	frameREP      frameType = 2
	frameREJ      frameType = 3
	frameRTU      frameType = 4
	frameDREQ     frameType = 5
	frameDREP     frameType = 6
	frameSend     frameType = 16
	frameWrite    frameType = 17
	frameReadReq  frameType = 18
	frameAck      frameType = 32
	frameNak      frameType = 33
	frameReadResp frameType = 34
)

func (t frameType) String() string {
	switch t {
	case frameREQ:
		return "REQ"
	case frameREP:
		return "REP"
	case frameREJ:
		return "REJ"
	case frameRTU:
		return "RTU"
	case frameDREQ:
		return "DREQ"
	case frameDREP:
		return "DREP"
	case frameSend:
		return "SEND"
	case frameWrite:
		return "WRITE"
	case frameReadReq:
		return "READ_REQ"
	case frameAck:
		return "ACK"
	case frameNak:
		return "NAK"
	case frameReadResp:
		return "READ_RESP"
	}
	return fmt.Sprintf("frame(%d)", uint8(t))
}

// isRequest reports whether t is a request that consumes a PSN.
func (t frameType) isRequest() bool { return t == frameSend || t == frameWrite || t == frameReadReq }

// isResponse reports whether t answers a request.
func (t frameType) isResponse() bool { return t == frameAck || t == frameNak || t == frameReadResp }

// Frame flags.
const (
	flagImm       = 1 << 0 // imm carries immediate data
	flagInv       = 1 << 1 // SEND with invalidate: imm carries the rkey
	flagSolicited = 1 << 2 // solicited event
)

// NAK syndromes.
const (
	nakRNR        = 1 // no receive posted: retry after the timer
	nakInvalidReq = 2 // the request could not be taken (too long, bad opcode)
	nakAccess     = 3 // rkey, rights or bounds failed
	nakRemoteOp   = 4 // the responder failed locally
)

type header struct {
	typ    frameType
	flags  uint8
	code   uint8
	length uint32
	psn    uint32
	imm    uint32
	addr   uint64
	rkey   uint32
	dmaLen uint32
}

func (h *header) put(b []byte) {
	_ = b[headerLen-1]
	b[0] = frameVersion
	b[1] = byte(h.typ)
	b[2] = h.flags
	b[3] = h.code
	binary.BigEndian.PutUint32(b[4:], h.length)
	binary.BigEndian.PutUint32(b[8:], h.psn)
	binary.BigEndian.PutUint32(b[12:], h.imm)
	binary.BigEndian.PutUint64(b[16:], h.addr)
	binary.BigEndian.PutUint32(b[24:], h.rkey)
	binary.BigEndian.PutUint32(b[28:], h.dmaLen)
}

// FrameError is a frame the peer should never have sent. The connection that
// carried it is reset.
type FrameError struct {
	Type   uint8
	Reason string
}

func (e *FrameError) Error() string {
	return fmt.Sprintf("soft: bad %v frame: %s", frameType(e.Type), e.Reason)
}

// Unwrap returns verbs.ErrProtocol.
func (e *FrameError) Unwrap() error { return verbs.ErrProtocol }

func frameErr(t frameType, format string, args ...any) error {
	return &FrameError{Type: uint8(t), Reason: fmt.Sprintf(format, args...)}
}

// decodeHeader parses and validates one header. maxMsg bounds message and
// READ lengths. Every rule here is a table row in frame_test.go.
func decodeHeader(b []byte, maxMsg uint64) (header, error) {
	if len(b) != headerLen {
		return header{}, frameErr(0, "header of %d bytes", len(b))
	}
	h := header{
		typ:    frameType(b[1]),
		flags:  b[2],
		code:   b[3],
		length: binary.BigEndian.Uint32(b[4:]),
		psn:    binary.BigEndian.Uint32(b[8:]),
		imm:    binary.BigEndian.Uint32(b[12:]),
		addr:   binary.BigEndian.Uint64(b[16:]),
		rkey:   binary.BigEndian.Uint32(b[24:]),
		dmaLen: binary.BigEndian.Uint32(b[28:]),
	}
	if b[0] != frameVersion {
		return header{}, frameErr(h.typ, "version %d", b[0])
	}
	// zero lists the fields a type leaves unused; they must be zero.
	type fields uint8
	const (
		fFlags fields = 1 << iota
		fCode
		fLength
		fPSN
		fImm
		fAddr
		fRKey
		fDMALen
	)
	var unused fields
	switch h.typ {
	case frameREQ:
		if h.length > verbs.IBReqPrivateData {
			return header{}, frameErr(h.typ, "%d bytes of private data", h.length)
		}
		if h.dmaLen == 0 || h.dmaLen > maxQueueDepth {
			return header{}, frameErr(h.typ, "queue depth %d", h.dmaLen)
		}
		unused = fFlags | fCode
	case frameREP:
		if h.length > verbs.IBRepPrivateData {
			return header{}, frameErr(h.typ, "%d bytes of private data", h.length)
		}
		if h.dmaLen == 0 || h.dmaLen > maxQueueDepth {
			return header{}, frameErr(h.typ, "queue depth %d", h.dmaLen)
		}
		unused = fFlags | fCode | fImm | fAddr | fRKey
	case frameREJ:
		if h.length > verbs.IBRejPrivateData {
			return header{}, frameErr(h.typ, "%d bytes of private data", h.length)
		}
		if h.imm > 0xffff {
			return header{}, frameErr(h.typ, "reason %d", h.imm)
		}
		unused = fFlags | fCode | fPSN | fAddr | fRKey | fDMALen
	case frameRTU, frameDREQ, frameDREP:
		unused = fFlags | fCode | fLength | fPSN | fImm | fAddr | fRKey | fDMALen
	case frameSend:
		if uint64(h.length) > maxMsg {
			return header{}, frameErr(h.typ, "length %d above %d", h.length, maxMsg)
		}
		if h.flags&^(flagImm|flagInv|flagSolicited) != 0 || h.flags&(flagImm|flagInv) == flagImm|flagInv {
			return header{}, frameErr(h.typ, "flags %#x", h.flags)
		}
		if h.flags&(flagImm|flagInv) == 0 {
			unused |= fImm
		}
		unused |= fCode | fAddr | fRKey | fDMALen
	case frameWrite:
		if uint64(h.length) > maxMsg {
			return header{}, frameErr(h.typ, "length %d above %d", h.length, maxMsg)
		}
		if h.flags&^(flagImm|flagSolicited) != 0 {
			return header{}, frameErr(h.typ, "flags %#x", h.flags)
		}
		if h.flags&flagImm == 0 {
			unused |= fImm
		}
		unused |= fCode | fDMALen
	case frameReadReq:
		if uint64(h.dmaLen) > maxMsg {
			return header{}, frameErr(h.typ, "length %d above %d", h.dmaLen, maxMsg)
		}
		unused = fFlags | fCode | fLength | fImm
	case frameAck:
		unused = fFlags | fCode | fLength | fImm | fAddr | fRKey | fDMALen
	case frameNak:
		switch h.code {
		case nakRNR:
			if h.dmaLen > maxRNRTimerMicros {
				return header{}, frameErr(h.typ, "RNR timer %d µs", h.dmaLen)
			}
		case nakInvalidReq, nakAccess, nakRemoteOp:
			unused = fDMALen
		default:
			return header{}, frameErr(h.typ, "syndrome %d", h.code)
		}
		unused |= fFlags | fLength | fImm | fAddr | fRKey
	case frameReadResp:
		if uint64(h.length) > maxMsg {
			return header{}, frameErr(h.typ, "length %d above %d", h.length, maxMsg)
		}
		unused = fFlags | fCode | fImm | fAddr | fRKey | fDMALen
	default:
		return header{}, frameErr(h.typ, "unknown type")
	}
	for _, f := range []struct {
		bit  fields
		zero bool
		name string
	}{
		{fFlags, h.flags == 0, "flags"},
		{fCode, h.code == 0, "code"},
		{fLength, h.length == 0, "length"},
		{fPSN, h.psn == 0, "psn"},
		{fImm, h.imm == 0, "imm"},
		{fAddr, h.addr == 0, "addr"},
		{fRKey, h.rkey == 0, "rkey"},
		{fDMALen, h.dmaLen == 0, "dma length"},
	} {
		if unused&f.bit != 0 && !f.zero {
			return header{}, frameErr(h.typ, "unused field %s is not zero", f.name)
		}
	}
	return h, nil
}
