package wire

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// Hello, compact Hello and HelloAck sizes.
const (
	HelloSize        = BSDHSize + HHSize  // 92: the whole CM REQ private data
	HelloAckSize     = BSDHSize + HAHSize // 196: the whole CM REP private data
	CompactHelloSize = 32                 // our format, after the RDMA CM header
)

// Offsets from the start of the private data (ref §2.3, §2.4). The compact
// Hello shares offsets 0–29 with the full Hello.
const (
	hhVersion     = 16 // u8  MajV:MinV
	hhIPV         = 17 // u8  IP version in the high nibble
	hhForm        = 18 // u8  reserved; compact Hello: format number
	hhMaxAdverts  = 19 // u8
	hhDesRemRcvSz = 20 // u32
	hhLocalRcvSz  = 24 // u32, BSDH included
	hhSrcPort     = 28 // u16
	hhMagic       = 30 // u16 reserved; compact Hello: magic
	hhSrcIP       = 32 // 16 bytes, IPv4 in the last 4
	hhDstIP       = 48 // 16 bytes, IPv4 in the last 4
	// 64–91 reserved

	hahVersion    = 16 // u8 MajV:MinV
	hahMaxAdverts = 19 // u8
	hahActRcvSz   = 20 // u32, BSDH included
	// 17, 18 and 24–195 reserved
)

// IPV values: the high nibble of Hello byte 17.
const (
	ipv4 = 0x40
	ipv6 = 0x60
)

// Compact-Hello identification (bytes 18 and 30–31, reserved in the full
// Hello).
const (
	// CompactForm is the compact-Hello format number this package
	// writes and accepts.
	CompactForm = 1
	// compactMagic is "vS", marking our format.
	compactMagic = 0x7653
)

// Version is the MajV:MinV byte: major version in the high nibble.
type Version uint8

// Version22 is the protocol version the last shipped implementations
// (OFED ib_sdp) announce, and the one vsdp announces.
const Version22 Version = 0x22

// supportedMajor is the only major version accepted: the Linux RDMA CM
// rejects a Hello/HelloAck with any other (ref §2.3).
const supportedMajor = 2

// Major is the major version.
func (v Version) Major() uint8 { return uint8(v) >> 4 }

// Minor is the minor version.
func (v Version) Minor() uint8 { return uint8(v) & 0x0F }

func (v Version) String() string { return fmt.Sprintf("%d.%d", v.Major(), v.Minor()) }

// Hello is the connection request (ref §2.3), in either form. Its BSDH is
// fixed: mid 0, flags 0, len 92 (32 compact), mseq 0, mseq_ack 0.
type Hello struct {
	Bufs        uint16  // receives the initiator has posted: the acceptor's initial credits
	Version     Version // Version22
	MaxAdverts  uint8   // outstanding ZCopy advertisements the initiator handles, > 0
	DesRemRcvSz uint32  // receive-buffer size asked of the acceptor (advisory)
	LocalRcvSz  uint32  // the initiator's receive-buffer size, BSDH included
	SrcPort     uint16  // the initiator's TCP-style source port
	// SrcIP and DstIP are the initiator's and the acceptor's addresses;
	// both IPv4 (IPV 0x40) or both IPv6 (IPV 0x60). An IPv4-mapped
	// IPv6 address counts as IPv6: unmap it to send IPv4.
	SrcIP netip.Addr
	DstIP netip.Addr
}

// HelloAck is the connection reply (ref §2.4). Its BSDH is fixed: mid 1,
// flags 0, len 196, mseq 0, mseq_ack 0.
type HelloAck struct {
	Bufs       uint16  // receives the acceptor has posted
	Version    Version // Version22
	MaxAdverts uint8   // > 0
	ActRcvSz   uint32  // the acceptor's receive-buffer size, BSDH included
}

// DecodeHello parses and validates the 92-byte CM REQ private data of a
// full Hello. Reserved bytes, the IPV low nibble and the 12 leading bytes
// of an IPv4 address field are ignored.
func DecodeHello(b []byte) (Hello, error) {
	if err := checkPrivBSDH(b, MIDHello, HelloSize); err != nil {
		return Hello{}, err
	}
	h := helloCommon(b)
	ipv := b[hhIPV] & 0xF0
	switch ipv {
	case ipv4:
		h.SrcIP = netip.AddrFrom4([4]byte(b[hhSrcIP+12 : hhSrcIP+16]))
		h.DstIP = netip.AddrFrom4([4]byte(b[hhDstIP+12 : hhDstIP+16]))
	case ipv6:
		h.SrcIP = netip.AddrFrom16([16]byte(b[hhSrcIP : hhSrcIP+16]))
		h.DstIP = netip.AddrFrom16([16]byte(b[hhDstIP : hhDstIP+16]))
	default:
		return Hello{}, fail(ErrField, MIDHello, "hh.ipv", uint64(b[hhIPV]), "IP version nibble is neither 4 nor 6")
	}
	if err := h.checkParams(); err != nil {
		return Hello{}, err
	}
	return h, nil
}

// DecodeCompactHello parses and validates a compact Hello (the RDMA_PS_TCP
// REQ user data: at least 32 bytes; the CM pads it to 56 and the bytes
// after 32 are ignored) and completes it with the addresses the RDMA CM
// header carried: src is the initiator's, dst the acceptor's.
func DecodeCompactHello(b []byte, src, dst netip.Addr) (Hello, error) {
	if len(b) < CompactHelloSize {
		return Hello{}, fail(ErrTruncated, MIDHello, "privdata", uint64(len(b)), "shorter than the 32-byte compact Hello")
	}
	if m := binary.BigEndian.Uint16(b[hhMagic:]); m != compactMagic {
		return Hello{}, fail(ErrField, MIDHello, "compact.magic", uint64(m), "not a vsdp compact Hello")
	}
	if f := b[hhForm]; f != CompactForm {
		return Hello{}, fail(ErrVersion, MIDHello, "compact.form", uint64(f), "unknown compact-Hello format")
	}
	if err := checkPrivBSDH(b[:CompactHelloSize], MIDHello, CompactHelloSize); err != nil {
		return Hello{}, err
	}
	h := helloCommon(b)
	var want uint8
	switch ipv := b[hhIPV]; ipv {
	case ipv4:
		want = 4
	case ipv6:
		want = 6
	default:
		return Hello{}, fail(ErrField, MIDHello, "compact.ipv", uint64(ipv), "must be 0x40 or 0x60")
	}
	h.SrcIP, h.DstIP = src.WithZone(""), dst.WithZone("")
	fam, err := h.family()
	if err != nil {
		return Hello{}, err
	}
	if fam != want {
		return Hello{}, fail(ErrField, MIDHello, "compact.ipv", uint64(b[hhIPV]),
			fmt.Sprintf("the CM addresses are IPv%d", fam))
	}
	if err := h.checkParams(); err != nil {
		return Hello{}, err
	}
	return h, nil
}

// helloCommon reads the fields the full and compact Hello share.
func helloCommon(b []byte) Hello {
	return Hello{
		Bufs:        BSDH(b).Bufs(),
		Version:     Version(b[hhVersion]),
		MaxAdverts:  b[hhMaxAdverts],
		DesRemRcvSz: binary.BigEndian.Uint32(b[hhDesRemRcvSz:]),
		LocalRcvSz:  binary.BigEndian.Uint32(b[hhLocalRcvSz:]),
		SrcPort:     binary.BigEndian.Uint16(b[hhSrcPort:]),
	}
}

// Append validates h and appends the 92-byte full Hello to dst.
func (h *Hello) Append(dst []byte) ([]byte, error) {
	fam, err := h.check()
	if err != nil {
		return dst, err
	}
	dst = grow(dst, HelloSize)
	b := dst[len(dst)-HelloSize:]
	clear(b)
	h.putCommon(b, HelloSize)
	if fam == 4 {
		b[hhIPV] = ipv4
		s, d := h.SrcIP.As4(), h.DstIP.As4()
		copy(b[hhSrcIP+12:], s[:])
		copy(b[hhDstIP+12:], d[:])
	} else {
		b[hhIPV] = ipv6
		s, d := h.SrcIP.As16(), h.DstIP.As16()
		copy(b[hhSrcIP:], s[:])
		copy(b[hhDstIP:], d[:])
	}
	return dst, nil
}

// AppendCompact validates h and appends the 32-byte compact Hello to dst.
// The addresses are not encoded (the RDMA CM header carries them); their
// family sets the IPV byte.
func (h *Hello) AppendCompact(dst []byte) ([]byte, error) {
	fam, err := h.check()
	if err != nil {
		return dst, err
	}
	dst = grow(dst, CompactHelloSize)
	b := dst[len(dst)-CompactHelloSize:]
	clear(b)
	h.putCommon(b, CompactHelloSize)
	b[hhIPV] = ipv4
	if fam == 6 {
		b[hhIPV] = ipv6
	}
	b[hhForm] = CompactForm
	binary.BigEndian.PutUint16(b[hhMagic:], compactMagic)
	return dst, nil
}

// putCommon writes the BSDH and bytes 16–29 except IPV (17) and form (18).
func (h *Hello) putCommon(b []byte, length int) {
	BSDH(b).put(MIDHello, 0, h.Bufs, uint32(length), 0, 0)
	b[hhVersion] = byte(h.Version)
	b[hhMaxAdverts] = h.MaxAdverts
	binary.BigEndian.PutUint32(b[hhDesRemRcvSz:], h.DesRemRcvSz)
	binary.BigEndian.PutUint32(b[hhLocalRcvSz:], h.LocalRcvSz)
	binary.BigEndian.PutUint16(b[hhSrcPort:], h.SrcPort)
}

// check validates h for encoding and returns its IP family (4 or 6).
func (h *Hello) check() (uint8, error) {
	if h.SrcIP.Zone() != "" || h.DstIP.Zone() != "" {
		return 0, fail(ErrField, MIDHello, "hh.srcip", 0, "an IPv6 zone cannot be encoded")
	}
	fam, err := h.family()
	if err != nil {
		return 0, err
	}
	return fam, h.checkParams()
}

// family returns 4 or 6 when both addresses are valid and of one family.
func (h *Hello) family() (uint8, error) {
	fam := func(a netip.Addr) uint8 {
		switch {
		case a.Is4():
			return 4
		case a.Is6():
			return 6
		}
		return 0
	}
	s, d := fam(h.SrcIP), fam(h.DstIP)
	if s == 0 {
		return 0, fail(ErrField, MIDHello, "hh.srcip", 0, "no source address")
	}
	if d != s {
		return 0, fail(ErrField, MIDHello, "hh.dstip", uint64(d), fmt.Sprintf("destination is not IPv%d like the source", s))
	}
	return s, nil
}

// checkParams applies the rules on the fields both forms carry.
func (h *Hello) checkParams() error {
	return checkParams(MIDHello, "hh", h.Version, h.MaxAdverts, "localrcvsz", h.LocalRcvSz)
}

// DecodeHelloAck parses and validates the 196-byte CM REP private data of
// a HelloAck. Reserved bytes (17, 18, 24–195) are ignored.
func DecodeHelloAck(b []byte) (HelloAck, error) {
	if err := checkPrivBSDH(b, MIDHelloAck, HelloAckSize); err != nil {
		return HelloAck{}, err
	}
	a := HelloAck{
		Bufs:       BSDH(b).Bufs(),
		Version:    Version(b[hahVersion]),
		MaxAdverts: b[hahMaxAdverts],
		ActRcvSz:   binary.BigEndian.Uint32(b[hahActRcvSz:]),
	}
	if err := a.check(); err != nil {
		return HelloAck{}, err
	}
	return a, nil
}

// Append validates a and appends the 196-byte HelloAck to dst.
func (a *HelloAck) Append(dst []byte) ([]byte, error) {
	if err := a.check(); err != nil {
		return dst, err
	}
	dst = grow(dst, HelloAckSize)
	b := dst[len(dst)-HelloAckSize:]
	clear(b)
	BSDH(b).put(MIDHelloAck, 0, a.Bufs, HelloAckSize, 0, 0)
	b[hahVersion] = byte(a.Version)
	b[hahMaxAdverts] = a.MaxAdverts
	binary.BigEndian.PutUint32(b[hahActRcvSz:], a.ActRcvSz)
	return dst, nil
}

func (a *HelloAck) check() error {
	return checkParams(MIDHelloAck, "hah", a.Version, a.MaxAdverts, "actrcvsz", a.ActRcvSz)
}

func checkParams(mid MID, hdr string, v Version, maxAdverts uint8, sizeName string, size uint32) error {
	if v.Major() != supportedMajor {
		return fail(ErrVersion, mid, hdr+".version", uint64(v), "major version must be 2")
	}
	if maxAdverts == 0 {
		return fail(ErrField, mid, hdr+".maxadverts", 0, "must be > 0")
	}
	if size < MinRcvSize {
		return fail(ErrField, mid, hdr+"."+sizeName, uint64(size),
			fmt.Sprintf("below the %d-byte minimum receive buffer", MinRcvSize))
	}
	return nil
}

// checkPrivBSDH checks a Hello/HelloAck private-data buffer's size and its
// fixed BSDH: the MID, flags 0, len, mseq 0 and mseq_ack 0 (ref §1, §2.3).
func checkPrivBSDH(b []byte, mid MID, size int) error {
	if len(b) < size {
		return fail(ErrTruncated, mid, "privdata", uint64(len(b)), fmt.Sprintf("%v needs %d bytes", mid, size))
	}
	if len(b) > size {
		return fail(ErrLength, mid, "privdata", uint64(len(b)), fmt.Sprintf("%v is %d bytes", mid, size))
	}
	h := BSDH(b)
	switch {
	case h.MID() != mid:
		return fail(ErrMID, h.MID(), "bsdh.mid", uint64(h.MID()), fmt.Sprintf("expected %v", mid))
	case h.Flags() != 0:
		return fail(ErrField, mid, "bsdh.flags", uint64(h.Flags()), "must be 0")
	case h.Len() != uint32(size):
		return fail(ErrLength, mid, "bsdh.len", uint64(h.Len()), fmt.Sprintf("must be %d", size))
	case h.MSeq() != 0:
		return fail(ErrField, mid, "bsdh.mseq", uint64(h.MSeq()), "must be 0")
	case h.MSeqAck() != 0:
		return fail(ErrField, mid, "bsdh.mseq_ack", uint64(h.MSeqAck()), "must be 0")
	}
	return nil
}
