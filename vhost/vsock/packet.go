package vsock

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Packet header (virtio 1.2 §5.10.6, struct virtio_vsock_hdr), 44 bytes,
// little-endian, packed:
//
//	 0 le64 src_cid     8 le64 dst_cid
//	16 le32 src_port   20 le32 dst_port
//	24 le32 len        28 le16 type     30 le16 op
//	32 le32 flags      36 le32 buf_alloc 40 le32 fwd_cnt
const HeaderSize = 44

// HostCID is the well-known address of the host (VMADDR_CID_HOST).
const HostCID = 2

// MaxPayload is the largest payload the guest driver sends or accepts in
// one packet (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
const MaxPayload = 64 << 10

// Type is the socket type of a packet.
type Type uint16

// Socket types.
const (
	TypeStream    Type = 1 // VIRTIO_VSOCK_TYPE_STREAM
	TypeSeqpacket Type = 2 // VIRTIO_VSOCK_TYPE_SEQPACKET
)

// Op is a packet operation.
type Op uint16

// Operations (VIRTIO_VSOCK_OP_*).
const (
	OpInvalid       Op = 0
	OpRequest       Op = 1
	OpResponse      Op = 2
	OpRST           Op = 3
	OpShutdown      Op = 4
	OpRW            Op = 5
	OpCreditUpdate  Op = 6
	OpCreditRequest Op = 7
)

var opNames = [...]string{"INVALID", "REQUEST", "RESPONSE", "RST", "SHUTDOWN", "RW", "CREDIT_UPDATE", "CREDIT_REQUEST"}

func (o Op) String() string {
	if int(o) < len(opNames) {
		return opNames[o]
	}
	return fmt.Sprintf("OP(%d)", uint16(o))
}

// Shutdown flags (VIRTIO_VSOCK_SHUTDOWN_*): what the sender will no longer do.
const (
	ShutdownRcv  = 1 // the sender will receive no more data
	ShutdownSend = 2 // the sender will send no more data
)

// Header is a decoded packet header.
type Header struct {
	SrcCID   uint64
	DstCID   uint64
	SrcPort  uint32
	DstPort  uint32
	Len      uint32
	Type     Type
	Op       Op
	Flags    uint32
	BufAlloc uint32
	FwdCnt   uint32
}

func (h Header) String() string {
	return fmt.Sprintf("%s %d:%d->%d:%d len=%d type=%d flags=%#x buf=%d fwd=%d",
		h.Op, h.SrcCID, h.SrcPort, h.DstCID, h.DstPort, h.Len, h.Type, h.Flags, h.BufAlloc, h.FwdCnt)
}

// ErrShortHeader: fewer than HeaderSize bytes.
var ErrShortHeader = errors.New("vsock: packet shorter than its header")

// Decode fills h from the first HeaderSize bytes of b.
func (h *Header) Decode(b []byte) error {
	if len(b) < HeaderSize {
		return ErrShortHeader
	}
	le := binary.LittleEndian
	*h = Header{
		SrcCID:   le.Uint64(b[0:]),
		DstCID:   le.Uint64(b[8:]),
		SrcPort:  le.Uint32(b[16:]),
		DstPort:  le.Uint32(b[20:]),
		Len:      le.Uint32(b[24:]),
		Type:     Type(le.Uint16(b[28:])),
		Op:       Op(le.Uint16(b[30:])),
		Flags:    le.Uint32(b[32:]),
		BufAlloc: le.Uint32(b[36:]),
		FwdCnt:   le.Uint32(b[40:]),
	}
	return nil
}

// Encode writes h into the first HeaderSize bytes of b.
func (h *Header) Encode(b []byte) {
	_ = b[HeaderSize-1]
	le := binary.LittleEndian
	le.PutUint64(b[0:], h.SrcCID)
	le.PutUint64(b[8:], h.DstCID)
	le.PutUint32(b[16:], h.SrcPort)
	le.PutUint32(b[20:], h.DstPort)
	le.PutUint32(b[24:], h.Len)
	le.PutUint16(b[28:], uint16(h.Type))
	le.PutUint16(b[30:], uint16(h.Op))
	le.PutUint32(b[32:], h.Flags)
	le.PutUint32(b[36:], h.BufAlloc)
	le.PutUint32(b[40:], h.FwdCnt)
}
