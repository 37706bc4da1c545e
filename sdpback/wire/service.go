package wire

import "fmt"

// ServiceID is a 64-bit IB CM service ID. The RDMA CM builds it as
// (port space << 16) + port (ref §3.1, §10.2).
type ServiceID uint64

// PortSpace is an RDMA CM port space: the service ID bits above the port.
type PortSpace uint16

// The two port spaces SDP connections use.
const (
	// PortSpaceSDP (RDMA_PS_SDP = 0x0001) yields the SDP service IDs
	// 0x10000|port that legacy SDP stacks listen on (IB_SDP_SERVICE_ID).
	PortSpaceSDP PortSpace = 0x0001
	// PortSpaceTCP (RDMA_PS_TCP = 0x0106) yields 0x01060000|port, the
	// only one of the two a user-space RDMA CM listener may bind on a
	// mainline kernel (ref §10.2).
	PortSpaceTCP PortSpace = 0x0106
)

// SDPServiceMask selects the non-port bits of an SDP service ID; the SDP
// range is 0x10000–0x1FFFF (ref §3.1).
const SDPServiceMask ServiceID = 0xFFFF_FFFF_FFFF_0000

// ServiceID returns the service ID for port in this port space.
func (ps PortSpace) ServiceID(port uint16) ServiceID {
	return ServiceID(uint64(ps)<<16 | uint64(port))
}

// HelloForm says how a Hello travels in the CM REQ of this port space:
// full at offset 0 for SDP, compact after the RDMA CM's 36-byte header for
// TCP (ARCHITECTURE §5).
func (ps PortSpace) HelloForm() HelloForm {
	if ps == PortSpaceTCP {
		return HelloCompact
	}
	return HelloFull
}

func (ps PortSpace) String() string {
	switch ps {
	case PortSpaceSDP:
		return "SDP"
	case PortSpaceTCP:
		return "TCP"
	}
	return fmt.Sprintf("PortSpace(%#04x)", uint16(ps))
}

// SDPServiceID returns the SDP service ID 0x10000|port.
func SDPServiceID(port uint16) ServiceID { return PortSpaceSDP.ServiceID(port) }

// TCPServiceID returns the RDMA_PS_TCP service ID 0x01060000|port.
func TCPServiceID(port uint16) ServiceID { return PortSpaceTCP.ServiceID(port) }

// Split returns the port space and port of an SDP or RDMA_PS_TCP service
// ID. Any other ID (bits above the 16-bit port space set, or another port
// space) yields an ErrField error.
func (id ServiceID) Split() (PortSpace, uint16, error) {
	ps := PortSpace(id >> 16)
	if uint64(id)>>32 != 0 || (ps != PortSpaceSDP && ps != PortSpaceTCP) {
		return 0, 0, fail(ErrField, 0, "serviceid", uint64(id), "neither an SDP nor an RDMA_PS_TCP service ID")
	}
	return ps, uint16(id), nil
}

// String renders an SDP or TCP service ID as "SDP:port"/"TCP:port", any
// other as hex.
func (id ServiceID) String() string {
	if ps, port, err := id.Split(); err == nil {
		return fmt.Sprintf("%v:%d", ps, port)
	}
	return fmt.Sprintf("%#x", uint64(id))
}

// HelloForm is the encoding of the Hello in a CM REQ.
type HelloForm uint8

// Hello forms.
const (
	// HelloFull is the 92-byte Hello filling the whole REQ private data
	// (SDP service ID: verbs/soft, and native-IB active connects).
	HelloFull HelloForm = iota
	// HelloCompact is the 32-byte compact Hello in the 56 bytes the
	// RDMA CM leaves after its header (RDMA_PS_TCP: verbs/ibv listens).
	HelloCompact
)

// CM private-data sizes (ref §2.3, §2.4, §10.2).
const (
	REQPrivateDataSize = 92  // IB CM REQ private data
	REPPrivateDataSize = 196 // IB CM REP private data
	CMAHeaderSize      = 36  // RDMA CM header before REQ user data in IP port spaces
)

// Size is the encoded size of a Hello in this form.
func (f HelloForm) Size() int {
	if f == HelloCompact {
		return CompactHelloSize
	}
	return HelloSize
}

// Space is the REQ private data left to the Hello: 92 bytes, or 56 after
// the RDMA CM header.
func (f HelloForm) Space() int {
	if f == HelloCompact {
		return REQPrivateDataSize - CMAHeaderSize
	}
	return REQPrivateDataSize
}

func (f HelloForm) String() string {
	switch f {
	case HelloFull:
		return "full"
	case HelloCompact:
		return "compact"
	}
	return fmt.Sprintf("HelloForm(%d)", uint8(f))
}
