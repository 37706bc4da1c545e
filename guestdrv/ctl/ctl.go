package ctl

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
)

// Version is the protocol version in every frame.
const Version = 1

// HeaderSize is the frame header size; MaxBody bounds a frame body.
const (
	HeaderSize = 8
	MaxBody    = 240
)

// DefaultPort is the host vsock port of the control service.
const DefaultPort = 1022

// Type is a message type. Guest-to-host types have the high bit clear,
// host-to-guest types have it set.
type Type uint8

// Message types.
const (
	TypeHello    Type = 0x01 // g→h {u32 pid, u32 version}
	TypeDial     Type = 0x02 // g→h id=request {Addr dst, u32 flags}
	TypeListen   Type = 0x03 // g→h id=request {Addr bind, u32 backlog, u32 vsock port}
	TypeUnlisten Type = 0x04 // g→h {u32 vsock port}
	TypeWho      Type = 0x05 // g→h id=request {u32 guest port, u32 host port}
	TypeAbort    Type = 0x06 // g→h {u32 guest port, u32 host port}
	TypeSetOpt   Type = 0x07 // g→h {u32 guest port, u32 host port, i32 level, i32 name, i32 value}

	TypeHelloOK  Type = 0x81 // h→g {u32 version, u32 guest cid}
	TypeTicket   Type = 0x82 // h→g id=request {u32 vsock port, u32 timeout ms}
	TypeLocal    Type = 0x83 // h→g id=request: use the guest's own TCP stack
	TypeDeny     Type = 0x84 // h→g id=request {i32 errno}
	TypeResult   Type = 0x85 // h→g id=ticket port {i32 errno, Addr local, Addr remote}
	TypeListenOK Type = 0x86 // h→g id=request {Addr bound}
	TypePeer     Type = 0x87 // h→g id=host port {u32 guest vsock port, Addr remote, Addr local}
	TypeWhoOK    Type = 0x88 // h→g id=request {Addr local, Addr remote}
	TypeReset    Type = 0x89 // h→g {u32 guest port, u32 host port, i32 errno}
)

var typeNames = map[Type]string{
	TypeHello: "HELLO", TypeDial: "DIAL", TypeListen: "LISTEN", TypeUnlisten: "UNLISTEN",
	TypeWho: "WHO", TypeAbort: "ABORT", TypeSetOpt: "SETOPT",
	TypeHelloOK: "HELLO_OK", TypeTicket: "TICKET", TypeLocal: "LOCAL", TypeDeny: "DENY",
	TypeResult: "RESULT", TypeListenOK: "LISTEN_OK", TypePeer: "PEER", TypeWhoOK: "WHO_OK",
	TypeReset: "RESET",
}

func (t Type) String() string {
	if n, ok := typeNames[t]; ok {
		return n
	}
	return fmt.Sprintf("TYPE(%#x)", uint8(t))
}

// FromGuest reports whether the guest sends this type.
func (t Type) FromGuest() bool { return t&0x80 == 0 }

// Dial flags.
const (
	DialNoDelay   = 1 << 0 // TCP_NODELAY was set before connect
	DialKeepAlive = 1 << 1 // SO_KEEPALIVE was set before connect
)

// Address families on the wire (Linux values).
const (
	FamilyInet  = 2  // AF_INET
	FamilyInet6 = 10 // AF_INET6
)

// AddrSize is the size of an encoded address: {u8 family, u8 zero, u16 port,
// [16]byte address in network order; IPv4 in the first 4 bytes}.
const AddrSize = 20

// Errors.
var (
	// ErrFrame: the frame is malformed (version, length, unknown type,
	// body size for its type, bad address). The connection carrying it is
	// closed: a peer that breaks framing cannot be resynchronised.
	ErrFrame = errors.New("ctl: malformed frame")
)

// Msg is one control message. Fields are used per type as documented on
// the type constants; unused fields are zero.
type Msg struct {
	Type  Type
	ID    uint32
	PID   uint32 // HELLO
	Ver   uint32 // HELLO, HELLO_OK
	CID   uint32 // HELLO_OK
	Flags uint32 // DIAL
	// Port is a vsock port: TICKET's port, LISTEN's and UNLISTEN's guest
	// listening port, PEER's guest listening port.
	Port      uint32
	Timeout   uint32 // TICKET, milliseconds
	Backlog   uint32 // LISTEN
	GuestPort uint32 // WHO, ABORT, SETOPT, RESET
	HostPort  uint32 // WHO, ABORT, SETOPT, RESET
	Errno     int32  // DENY, RESULT, RESET
	Level     int32  // SETOPT
	Name      int32  // SETOPT
	Value     int32  // SETOPT
	// Addresses. DIAL: Remote is the destination. LISTEN: Local is the bind
	// address. LISTEN_OK: Local is the bound address. RESULT, PEER, WHO_OK:
	// both.
	Local, Remote netip.AddrPort
}

// bodyLayout lists, per type, the body fields in order.
type field uint8

const (
	fID field = iota // not in the body: the header's id
	fPID
	fVer
	fCID
	fFlags
	fPort
	fTimeout
	fBacklog
	fGuestPort
	fHostPort
	fErrno
	fLevel
	fName
	fValue
	fLocal
	fRemote
)

var layouts = map[Type][]field{
	TypeHello:    {fPID, fVer},
	TypeDial:     {fRemote, fFlags},
	TypeListen:   {fLocal, fBacklog, fPort},
	TypeUnlisten: {fPort},
	TypeWho:      {fGuestPort, fHostPort},
	TypeAbort:    {fGuestPort, fHostPort},
	TypeSetOpt:   {fGuestPort, fHostPort, fLevel, fName, fValue},
	TypeHelloOK:  {fVer, fCID},
	TypeTicket:   {fPort, fTimeout},
	TypeLocal:    {},
	TypeDeny:     {fErrno},
	TypeResult:   {fErrno, fLocal, fRemote},
	TypeListenOK: {fLocal},
	TypePeer:     {fPort, fRemote, fLocal},
	TypeWhoOK:    {fLocal, fRemote},
	TypeReset:    {fGuestPort, fHostPort, fErrno},
}

func fieldSize(f field) int {
	if f == fLocal || f == fRemote {
		return AddrSize
	}
	return 4
}

// BodySize returns the body size of a type, or -1 for an unknown type.
func BodySize(t Type) int {
	l, ok := layouts[t]
	if !ok {
		return -1
	}
	n := 0
	for _, f := range l {
		n += fieldSize(f)
	}
	return n
}

func (m *Msg) u32(f field) *uint32 {
	switch f {
	case fPID:
		return &m.PID
	case fVer:
		return &m.Ver
	case fCID:
		return &m.CID
	case fFlags:
		return &m.Flags
	case fPort:
		return &m.Port
	case fTimeout:
		return &m.Timeout
	case fBacklog:
		return &m.Backlog
	case fGuestPort:
		return &m.GuestPort
	case fHostPort:
		return &m.HostPort
	}
	return nil
}

func (m *Msg) i32(f field) *int32 {
	switch f {
	case fErrno:
		return &m.Errno
	case fLevel:
		return &m.Level
	case fName:
		return &m.Name
	case fValue:
		return &m.Value
	}
	return nil
}

// Append encodes m after b.
func (m *Msg) Append(b []byte) ([]byte, error) {
	l, ok := layouts[m.Type]
	if !ok {
		return b, fmt.Errorf("%w: unknown type %v", ErrFrame, m.Type)
	}
	le := binary.LittleEndian
	b = append(b, Version, byte(m.Type))
	b = le.AppendUint16(b, uint16(BodySize(m.Type)))
	b = le.AppendUint32(b, m.ID)
	for _, f := range l {
		switch {
		case f == fLocal || f == fRemote:
			a := m.Local
			if f == fRemote {
				a = m.Remote
			}
			var err error
			if b, err = appendAddr(b, a); err != nil {
				return b, err
			}
		case m.u32(f) != nil:
			b = le.AppendUint32(b, *m.u32(f))
		default:
			b = le.AppendUint32(b, uint32(*m.i32(f)))
		}
	}
	return b, nil
}

func appendAddr(b []byte, a netip.AddrPort) ([]byte, error) {
	ip := a.Addr()
	var raw [16]byte
	fam := byte(0)
	switch {
	case !ip.IsValid():
		// the zero address: family 0, "no address"
	case ip.Is4():
		fam = FamilyInet
		v := ip.As4()
		copy(raw[:], v[:])
	default:
		fam = FamilyInet6
		raw = ip.As16()
		if ip.Zone() != "" {
			return b, fmt.Errorf("%w: zoned address %v", ErrFrame, ip)
		}
	}
	b = append(b, fam, 0)
	b = binary.LittleEndian.AppendUint16(b, a.Port())
	return append(b, raw[:]...), nil
}

func decodeAddr(b []byte) (netip.AddrPort, error) {
	port := binary.LittleEndian.Uint16(b[2:])
	if b[1] != 0 {
		return netip.AddrPort{}, fmt.Errorf("%w: address reserved byte %#x", ErrFrame, b[1])
	}
	switch b[0] {
	case 0:
		for _, x := range b[2:] {
			if x != 0 {
				return netip.AddrPort{}, fmt.Errorf("%w: empty address with content", ErrFrame)
			}
		}
		return netip.AddrPort{}, nil
	case FamilyInet:
		for _, x := range b[8:] {
			if x != 0 {
				return netip.AddrPort{}, fmt.Errorf("%w: IPv4 address with trailing bytes", ErrFrame)
			}
		}
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[4:8])), port), nil
	case FamilyInet6:
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[4:20])), port), nil
	}
	return netip.AddrPort{}, fmt.Errorf("%w: address family %d", ErrFrame, b[0])
}

// Decode decodes one frame from the start of b and returns its length.
// It returns io.ErrUnexpectedEOF when b holds only part of a frame.
func Decode(b []byte) (Msg, int, error) {
	if len(b) < HeaderSize {
		return Msg{}, 0, io.ErrUnexpectedEOF
	}
	le := binary.LittleEndian
	if b[0] != Version {
		return Msg{}, 0, fmt.Errorf("%w: version %d", ErrFrame, b[0])
	}
	m := Msg{Type: Type(b[1]), ID: le.Uint32(b[4:])}
	n := int(le.Uint16(b[2:]))
	want := BodySize(m.Type)
	if want < 0 {
		return Msg{}, 0, fmt.Errorf("%w: unknown type %v", ErrFrame, m.Type)
	}
	if n != want {
		return Msg{}, 0, fmt.Errorf("%w: %v body of %d bytes, want %d", ErrFrame, m.Type, n, want)
	}
	if len(b) < HeaderSize+n {
		return Msg{}, 0, io.ErrUnexpectedEOF
	}
	body := b[HeaderSize : HeaderSize+n]
	for _, f := range layouts[m.Type] {
		switch {
		case f == fLocal || f == fRemote:
			a, err := decodeAddr(body[:AddrSize])
			if err != nil {
				return Msg{}, 0, err
			}
			if f == fLocal {
				m.Local = a
			} else {
				m.Remote = a
			}
			body = body[AddrSize:]
		case m.u32(f) != nil:
			*m.u32(f) = le.Uint32(body)
			body = body[4:]
		default:
			*m.i32(f) = int32(le.Uint32(body))
			body = body[4:]
		}
	}
	return m, HeaderSize + n, nil
}

// Reader reads frames from a stream.
type Reader struct {
	r   io.Reader
	buf []byte
}

// NewReader returns a frame reader.
func NewReader(r io.Reader) *Reader { return &Reader{r: r, buf: make([]byte, 0, 512)} }

// Read returns the next message. A malformed frame returns an error wrapping
// ErrFrame; the stream is then unusable.
func (r *Reader) Read() (Msg, error) {
	for {
		m, n, err := Decode(r.buf)
		if err == nil {
			r.buf = r.buf[:copy(r.buf, r.buf[n:])]
			return m, nil
		}
		if err != io.ErrUnexpectedEOF {
			return Msg{}, err
		}
		if len(r.buf) == cap(r.buf) {
			return Msg{}, fmt.Errorf("%w: frame larger than its buffer", ErrFrame)
		}
		k, err := r.r.Read(r.buf[len(r.buf):cap(r.buf)])
		r.buf = r.buf[:len(r.buf)+k]
		if err != nil {
			if err == io.EOF && len(r.buf) > 0 {
				return Msg{}, io.ErrUnexpectedEOF
			}
			if k == 0 {
				return Msg{}, err
			}
		}
	}
}
