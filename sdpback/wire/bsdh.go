package wire

import "encoding/binary"

// BSDH offsets (ref §1). All fields are big-endian.
const (
	bsdhMID     = 0 // u8  mid
	bsdhFlags   = 1 // u8  flags
	bsdhBufs    = 2 // u16 bufs: receives the sender has posted
	bsdhLen     = 4 // u32 len: whole message, BSDH included
	bsdhMSeq    = 8 // u32 mseq
	bsdhMSeqAck = 12
)

// BSDH is a view of the Base Sockets Direct Header at the start of a
// message buffer. It does no validation: the slice must hold at least
// BSDHSize bytes, which Decode guarantees for a received message and the
// engine guarantees for its own send buffers. Use it to read a header in
// place, or to stamp bufs/mseq/mseq_ack into an encoded header just before
// the SEND is posted.
type BSDH []byte

// MID returns the message identifier.
func (b BSDH) MID() MID { return MID(b[bsdhMID]) }

// Flags returns the flags byte.
func (b BSDH) Flags() Flags { return Flags(b[bsdhFlags]) }

// Bufs returns the credit advertisement: receives posted by the sender.
func (b BSDH) Bufs() uint16 { return binary.BigEndian.Uint16(b[bsdhBufs:]) }

// Len returns the total message length, BSDH included.
func (b BSDH) Len() uint32 { return binary.BigEndian.Uint32(b[bsdhLen:]) }

// MSeq returns the message's sequence number.
func (b BSDH) MSeq() uint32 { return binary.BigEndian.Uint32(b[bsdhMSeq:]) }

// MSeqAck returns the mseq of the last message the sender received.
func (b BSDH) MSeqAck() uint32 { return binary.BigEndian.Uint32(b[bsdhMSeqAck:]) }

// SetMID sets the message identifier.
func (b BSDH) SetMID(m MID) { b[bsdhMID] = byte(m) }

// SetFlags sets the flags byte.
func (b BSDH) SetFlags(f Flags) { b[bsdhFlags] = byte(f) }

// SetBufs sets the credit advertisement.
func (b BSDH) SetBufs(n uint16) { binary.BigEndian.PutUint16(b[bsdhBufs:], n) }

// SetLen sets the total message length.
func (b BSDH) SetLen(n uint32) { binary.BigEndian.PutUint32(b[bsdhLen:], n) }

// SetMSeq sets the sequence number.
func (b BSDH) SetMSeq(n uint32) { binary.BigEndian.PutUint32(b[bsdhMSeq:], n) }

// SetMSeqAck sets the acknowledged sequence number.
func (b BSDH) SetMSeqAck(n uint32) { binary.BigEndian.PutUint32(b[bsdhMSeqAck:], n) }

// put writes every BSDH field.
func (b BSDH) put(mid MID, f Flags, bufs uint16, length, mseq, mseqAck uint32) {
	b.SetMID(mid)
	b.SetFlags(f)
	b.SetBufs(bufs)
	b.SetLen(length)
	b.SetMSeq(mseq)
	b.SetMSeqAck(mseqAck)
}
