package verbs

import (
	"fmt"
	"net/netip"
)

// ServiceID is an IB connection manager service ID (64 bits).
type ServiceID uint64

// Service ID layouts (ref/sdp-protocol.md §3.1, §10).
const (
	sdpServiceBase ServiceID = 0x10000    // IB_SDP_SERVICE_ID; RDMA_PS_SDP << 16
	tcpServiceBase ServiceID = 0x01060000 // RDMA_PS_TCP << 16
	portSpaceMask  ServiceID = ^ServiceID(0xffff)
)

// SDPServiceID returns the SDP service ID of a TCP port: 0x10000 | port.
func SDPServiceID(port uint16) ServiceID { return sdpServiceBase | ServiceID(port) }

// TCPServiceID returns the RDMA CM RDMA_PS_TCP service ID of a port:
// 0x01060000 | port. The RDMA CM puts its 36-byte header in front of the REQ
// private data on this port space.
func TCPServiceID(port uint16) ServiceID { return tcpServiceBase | ServiceID(port) }

// Port returns the low 16 bits: the TCP port in the SDP and RDMA CM layouts.
func (s ServiceID) Port() uint16 { return uint16(s) }

// IsSDP reports whether s is in the SDP range 0x10000–0x1FFFF.
func (s ServiceID) IsSDP() bool { return s&portSpaceMask == sdpServiceBase }

// IsTCP reports whether s is in the RDMA CM TCP port space.
func (s ServiceID) IsTCP() bool { return s&portSpaceMask == tcpServiceBase }

func (s ServiceID) String() string {
	switch {
	case s.IsSDP():
		return fmt.Sprintf("sdp:%d", s.Port())
	case s.IsTCP():
		return fmt.Sprintf("rdma-tcp:%d", s.Port())
	}
	return fmt.Sprintf("%#x", uint64(s))
}

// IB CM private data sizes (IBA 12.6): what the fixed-size MADs carry.
const (
	IBReqPrivateData = 92
	IBRepPrivateData = 196
	IBRejPrivateData = 148
	// RDMACMHeaderLen is the header the RDMA CM prepends to REQ private data
	// with IP addressing (RDMA_PS_TCP), leaving 92-36 = 56 bytes.
	RDMACMHeaderLen = 36
)

// PrivateDataLimits are the private data sizes a connection can carry in
// each CM message, in bytes, for a given provider and service ID. A provider
// may deliver private data zero-padded up to the limit (the IB CM does).
type PrivateDataLimits struct {
	Req int // CM REQ (Connect)
	Rep int // CM REP (Accept)
	Rej int // CM REJ (Reject)
}

// Check returns a *PrivateDataError when n bytes exceed the limit of msg.
func (l PrivateDataLimits) Check(msg string, n int) error {
	var limit int
	switch msg {
	case "REQ":
		limit = l.Req
	case "REP":
		limit = l.Rep
	case "REJ":
		limit = l.Rej
	default:
		return fmt.Errorf("%w: unknown CM message %q", ErrInvalid, msg)
	}
	if n > limit {
		return &PrivateDataError{Msg: msg, Len: n, Limit: limit}
	}
	return nil
}

// ConnParam are the parameters of Conn.Connect and Conn.Accept
// (struct rdma_conn_param). They apply to the local queue pair.
type ConnParam struct {
	PrivateData []byte
	// RNRRetry is how often this side's QP retries a send the peer could not
	// take for want of a posted receive: 0 fails at once (what the last
	// shipped SDP used), 7 retries forever.
	RNRRetry uint8
	// RetryCount bounds transport retries (0–7); providers without
	// retransmission ignore it.
	RetryCount uint8
	// ResponderResources and InitiatorDepth bound outstanding RDMA READs;
	// zero takes the provider default.
	ResponderResources uint8
	InitiatorDepth     uint8
}

// Validate checks the retry counts.
func (p *ConnParam) Validate() error {
	if p.RNRRetry > 7 || p.RetryCount > 7 {
		return fmt.Errorf("%w: retry counts %d/%d above 7", ErrInvalid, p.RetryCount, p.RNRRetry)
	}
	return nil
}

// ListenOptions configure Device.Listen.
type ListenOptions struct {
	// Addr is the local fabric address to listen on; the zero Addr listens
	// on every address of the device.
	Addr      netip.Addr
	ServiceID ServiceID
	// Backlog bounds connection requests not yet accepted; beyond it
	// requests are rejected (RejectNoResources). Zero takes a default.
	Backlog int
}

// ResolveOptions configure Device.Resolve, the active side's address and
// route resolution (rdma_resolve_addr + rdma_resolve_route).
type ResolveOptions struct {
	Addr      netip.Addr // the peer's fabric address
	ServiceID ServiceID
	Src       netip.Addr // optional local address
}

// RejectReason is an IB CM REJ reason (IBA table 112).
type RejectReason uint16

// Reject reasons used by this package.
const (
	RejectNoQP             RejectReason = 1
	RejectNoResources      RejectReason = 3  // listener backlog full, or resources exhausted
	RejectTimeout          RejectReason = 4  // the passive side gave up
	RejectUnsupported      RejectReason = 5  // unsupported request
	RejectInvalidServiceID RejectReason = 8  // no listener for the service ID
	RejectStaleConn        RejectReason = 10 // stale connection
	RejectConsumer         RejectReason = 28 // rejected by the consumer, with private data
)

func (r RejectReason) String() string {
	switch r {
	case RejectNoQP:
		return "NO_QP"
	case RejectNoResources:
		return "NO_RESOURCES"
	case RejectTimeout:
		return "TIMEOUT"
	case RejectUnsupported:
		return "UNSUPPORTED_REQ"
	case RejectInvalidServiceID:
		return "INVALID_SERVICE_ID"
	case RejectStaleConn:
		return "STALE_CONN"
	case RejectConsumer:
		return "CONSUMER_DEFINED"
	}
	return fmt.Sprintf("RejectReason(%d)", uint16(r))
}
