package vhost

import (
	"fmt"

	"github.com/vsdp/vsdp/vhost/virtq"
)

// fdRule says how many file descriptors a request carries.
type fdRule uint8

const (
	fdNone      fdRule = iota
	fdOne              // exactly one (ADD_MEM_REG)
	fdOptional         // zero or one, closed unused (REM_MEM_REG: the spec says close it)
	fdPerRegion        // one per region (SET_MEM_TABLE)
	fdVring            // one unless the payload's NOFD bit is set (SET_VRING_KICK/CALL/ERR)
)

// rule is one row of the validation table.
type rule struct {
	impl   bool   // the core handles it
	reply  bool   // the request has its own reply
	gate   uint64 // protocol feature that must have been acked (0: none)
	virtio uint64 // virtio feature that must have been acked (0: none)
	fds    fdRule
	// check validates values that need no session state beyond negotiation.
	check func(p Payload, n *negotiation) error
}

// negotiation is what validation needs to know about a session.
type negotiation struct {
	features      uint64 // virtio features offered
	protocol      uint64 // protocol features offered
	acked         uint64 // virtio features acked by SET_FEATURES
	ackedProtocol uint64 // protocol features acked by SET_PROTOCOL_FEATURES
	queues        int    // rings the device serves
	maxQueueSize  uint32 // largest SET_VRING_NUM
}

// rules is the validation table, indexed by request code. Rows absent here
// are unknown requests.
var rules = [maxRequest + 1]rule{
	ReqGetFeatures:         {impl: true, reply: true},
	ReqSetFeatures:         {impl: true, check: checkFeatures},
	ReqSetOwner:            {impl: true},
	ReqResetOwner:          {impl: true},
	ReqSetMemTable:         {impl: true, fds: fdPerRegion},
	ReqSetLogBase:          {reply: true, gate: ProtocolLogShmfd},
	ReqSetLogFD:            {fds: fdOne},
	ReqSetVringNum:         {impl: true, check: checkVringNum},
	ReqSetVringAddr:        {impl: true, check: checkVringAddr},
	ReqSetVringBase:        {impl: true, check: checkVringBase},
	ReqGetVringBase:        {impl: true, reply: true, check: checkVringIndex},
	ReqSetVringKick:        {impl: true, fds: fdVring, check: checkVringFD},
	ReqSetVringCall:        {impl: true, fds: fdVring, check: checkVringFD},
	ReqSetVringErr:         {impl: true, fds: fdVring, check: checkVringFD},
	ReqGetProtocolFeatures: {impl: true, reply: true},
	ReqSetProtocolFeatures: {impl: true, check: checkProtocol},
	ReqGetQueueNum:         {impl: true, reply: true, gate: ProtocolMQ},
	ReqSetVringEnable:      {impl: true, virtio: FeatureProtocolFeatures, check: checkVringEnable},
	ReqSendRARP:            {gate: ProtocolRARP},
	ReqNetSetMTU:           {gate: ProtocolMTU},
	ReqSetBackendReqFD:     {gate: ProtocolBackendReq, fds: fdOne},
	ReqIOTLBMsg:            {reply: true},
	ReqSetVringEndian:      {gate: ProtocolCrossEndian},
	ReqGetConfig:           {impl: true, reply: true, gate: ProtocolConfig, check: checkConfig},
	ReqSetConfig:           {impl: true, gate: ProtocolConfig, check: checkConfig},
	ReqCreateCryptoSession: {reply: true, gate: ProtocolCryptoSession},
	ReqCloseCryptoSession:  {gate: ProtocolCryptoSession},
	ReqPostcopyAdvise:      {reply: true, gate: ProtocolPagefault},
	ReqPostcopyListen:      {gate: ProtocolPagefault},
	ReqPostcopyEnd:         {reply: true, gate: ProtocolPagefault},
	ReqGetInflightFD:       {reply: true, gate: ProtocolInflightShmfd},
	ReqSetInflightFD:       {gate: ProtocolInflightShmfd, fds: fdOne},
	ReqGPUSetSocket:        {fds: fdOne},
	ReqResetDevice:         {impl: true, gate: ProtocolResetDevice},
	ReqVringKick:           {gate: ProtocolInbandNotifications},
	ReqGetMaxMemSlots:      {impl: true, reply: true, gate: ProtocolConfigureMemSlots},
	ReqAddMemReg:           {impl: true, gate: ProtocolConfigureMemSlots, fds: fdOne},
	ReqRemMemReg:           {impl: true, gate: ProtocolConfigureMemSlots, fds: fdOptional},
	ReqSetStatus:           {gate: ProtocolStatus},
	ReqGetStatus:           {reply: true, gate: ProtocolStatus},
	ReqGetSharedObject:     {reply: true, gate: ProtocolSharedObject},
	ReqSetDeviceStateFD:    {reply: true, gate: ProtocolDeviceState, fds: fdOne},
	ReqCheckDeviceState:    {reply: true, gate: ProtocolDeviceState},
}

// HasReply reports whether the request has its own reply. A back-end
// answers a failed one with an empty reply (no payload) rather than a
// REPLY_ACK status.
func (r Request) HasReply() bool { return r <= maxRequest && rules[r].reply }

// validate checks a received message against the table before any handler
// runs: flags and version, known and negotiated request, exact payload
// layout, fd count, and every value that needs no session state. It returns
// the decoded payload.
func validate(h Header, p []byte, nfds int, n *negotiation) (Payload, error) {
	req := h.Request
	switch {
	case h.Flags&versionMask != FlagVersion:
		return nil, msgErr(req, ErrProtocol, "version %d, want 1", h.Flags&versionMask)
	case h.Flags&FlagReply != 0:
		return nil, msgErr(req, ErrProtocol, "REPLY flag set by the front-end")
	case h.Flags&^knownFlags != 0:
		return nil, msgErr(req, ErrProtocol, "unknown flag bits %#x", h.Flags&^knownFlags)
	case int(h.Size) != len(p):
		return nil, msgErr(req, ErrProtocol, "header size %d but %d payload bytes", h.Size, len(p))
	case nfds > MaxFDs:
		return nil, msgErr(req, ErrProtocol, "%d fds, at most %d", nfds, MaxFDs)
	}
	if req == 0 || req > maxRequest {
		return nil, msgErr(req, ErrUnsupported, "unknown request")
	}
	r := &rules[req]
	if r.gate != 0 && n.ackedProtocol&r.gate == 0 {
		return nil, msgErr(req, ErrUnsupported, "protocol feature %s not negotiated", protocolName(r.gate))
	}
	if r.virtio != 0 && n.acked&r.virtio == 0 {
		return nil, msgErr(req, ErrUnsupported, "feature bit %#x not negotiated", r.virtio)
	}
	if !r.impl {
		return nil, msgErr(req, ErrUnsupported, "not implemented")
	}
	pl, err := Decode(req, p)
	if err != nil {
		return nil, &MessageError{Request: req, Err: err}
	}
	want := 0
	switch r.fds {
	case fdOne:
		want = 1
	case fdOptional:
		want = min(nfds, 1)
	case fdPerRegion:
		want = len(pl.(MemTable).Regions)
	case fdVring:
		if uint64(pl.(U64))&VringNoFD == 0 {
			want = 1
		}
	}
	if nfds != want {
		return nil, msgErr(req, ErrProtocol, "%d fds, want %d", nfds, want)
	}
	if r.check != nil {
		if err := r.check(pl, n); err != nil {
			return nil, &MessageError{Request: req, Err: err}
		}
	}
	return pl, nil
}

func checkFeatures(p Payload, n *negotiation) error {
	if v := uint64(p.(U64)); v&^n.features != 0 {
		return fmt.Errorf("%w: feature bits %#x never offered (offered %#x)", ErrInvalid, v&^n.features, n.features)
	}
	return nil
}

func checkProtocol(p Payload, n *negotiation) error {
	if v := uint64(p.(U64)); v&^n.protocol != 0 {
		return fmt.Errorf("%w: protocol feature bits %#x never offered (offered %#x)", ErrInvalid, v&^n.protocol, n.protocol)
	}
	return nil
}

func (n *negotiation) queue(i uint32) error {
	if i >= uint32(n.queues) {
		return fmt.Errorf("%w: queue %d out of range (device serves %d)", ErrInvalid, i, n.queues)
	}
	return nil
}

func checkVringIndex(p Payload, n *negotiation) error { return n.queue(p.(VringState).Index) }

func checkVringNum(p Payload, n *negotiation) error {
	s := p.(VringState)
	if err := n.queue(s.Index); err != nil {
		return err
	}
	if s.Num == 0 || s.Num > n.maxQueueSize || s.Num&(s.Num-1) != 0 {
		return fmt.Errorf("%w: queue %d size %d is not a power of two in 1..%d", ErrInvalid, s.Index, s.Num, n.maxQueueSize)
	}
	return nil
}

func checkVringBase(p Payload, n *negotiation) error {
	s := p.(VringState)
	if err := n.queue(s.Index); err != nil {
		return err
	}
	if s.Num > 0xffff {
		return fmt.Errorf("%w: queue %d base %d does not fit a split ring's 16-bit index", ErrInvalid, s.Index, s.Num)
	}
	return nil
}

func checkVringEnable(p Payload, n *negotiation) error {
	s := p.(VringState)
	if err := n.queue(s.Index); err != nil {
		return err
	}
	if s.Num > 1 {
		return fmt.Errorf("%w: queue %d enable value %d, want 0 or 1", ErrInvalid, s.Index, s.Num)
	}
	return nil
}

func checkVringAddr(p Payload, n *negotiation) error {
	a := p.(VringAddr)
	if err := n.queue(a.Index); err != nil {
		return err
	}
	if a.Flags != 0 {
		// VHOST_VRING_F_LOG needs dirty logging, which is never offered.
		return fmt.Errorf("%w: queue %d address flags %#x (logging is not supported)", ErrInvalid, a.Index, a.Flags)
	}
	// Alignment per virtio 1.2 §2.7; sizes are checked when the ring starts.
	c := virtq.Config{Index: int(a.Index), Size: 1, Desc: a.Desc, Avail: a.Avail, Used: a.Used}
	if err := c.Validate(); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	return nil
}

func checkVringFD(p Payload, n *negotiation) error {
	v := uint64(p.(U64))
	if v&vringFDInvalid != 0 {
		return fmt.Errorf("%w: ring fd payload %#x has unknown bits", ErrInvalid, v)
	}
	if err := n.queue(uint32(v & VringIndexMask)); err != nil {
		return err
	}
	return nil
}

func checkConfig(p Payload, n *negotiation) error {
	c := p.(Config)
	if c.Flags != ConfigWritable && c.Flags != ConfigMigration {
		return fmt.Errorf("%w: config flags %#x", ErrInvalid, c.Flags)
	}
	if uint64(c.Offset)+uint64(len(c.Data)) > MaxConfigSize {
		return fmt.Errorf("%w: config access [%d, +%d) beyond %d bytes", ErrInvalid, c.Offset, len(c.Data), MaxConfigSize)
	}
	return nil
}
