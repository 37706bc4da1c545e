package verbs

import (
	"fmt"
	"math/bits"
	"strings"
	"time"
)

// Access is a set of memory access rights, as in enum ibv_access_flags. The
// values equal the libibverbs ones so the cgo provider converts by cast.
type Access uint32

// Access rights for memory regions and memory windows.
const (
	AccessLocalWrite   Access = 1 << 0 // IBV_ACCESS_LOCAL_WRITE
	AccessRemoteWrite  Access = 1 << 1 // IBV_ACCESS_REMOTE_WRITE
	AccessRemoteRead   Access = 1 << 2 // IBV_ACCESS_REMOTE_READ
	AccessRemoteAtomic Access = 1 << 3 // IBV_ACCESS_REMOTE_ATOMIC
	AccessMWBind       Access = 1 << 4 // IBV_ACCESS_MW_BIND

	accessAll = AccessLocalWrite | AccessRemoteWrite | AccessRemoteRead | AccessRemoteAtomic | AccessMWBind
)

var accessNames = []string{"LOCAL_WRITE", "REMOTE_WRITE", "REMOTE_READ", "REMOTE_ATOMIC", "MW_BIND"}

// String returns the wire names joined by "|", or "0" for no rights.
func (a Access) String() string {
	if a == 0 {
		return "0"
	}
	var parts []string
	for i, n := range accessNames {
		if a&(1<<i) != 0 {
			parts = append(parts, n)
		}
	}
	if rest := a &^ accessAll; rest != 0 {
		parts = append(parts, fmt.Sprintf("%#x", uint32(rest)))
	}
	return strings.Join(parts, "|")
}

// ValidateMR checks a as the access of a memory region: no unknown bits, and
// remote write or remote atomic only together with local write (the rule
// ibv_reg_mr enforces with EINVAL).
func (a Access) ValidateMR() error {
	if a&^accessAll != 0 {
		return fmt.Errorf("%w: unknown access bits %#x", ErrInvalid, uint32(a&^accessAll))
	}
	if a&(AccessRemoteWrite|AccessRemoteAtomic) != 0 && a&AccessLocalWrite == 0 {
		return fmt.Errorf("%w: access %v: remote write or atomic needs LOCAL_WRITE", ErrInvalid, a)
	}
	return nil
}

// ValidateMW checks a as the access of a memory window bound over a region
// with access of mr: only remote rights, at least one of them, remote write
// only over a region with local write, and the region must allow binding.
func (a Access) ValidateMW(mr Access) error {
	if a&^(AccessRemoteRead|AccessRemoteWrite|AccessRemoteAtomic) != 0 {
		return fmt.Errorf("%w: window access %v: only remote rights", ErrInvalid, a)
	}
	if a == 0 {
		return fmt.Errorf("%w: window access is empty", ErrInvalid)
	}
	if mr&AccessMWBind == 0 {
		return fmt.Errorf("%w: region access %v lacks MW_BIND", ErrInvalid, mr)
	}
	if a&(AccessRemoteWrite|AccessRemoteAtomic) != 0 && mr&AccessLocalWrite == 0 {
		return fmt.Errorf("%w: window access %v over a region without LOCAL_WRITE", ErrInvalid, a)
	}
	return nil
}

// Opcode is a send work request's operation (enum ibv_wr_opcode). The zero
// value is invalid, so a forgotten opcode is caught at post time.
type Opcode uint8

// Send work request opcodes.
const (
	OpSend     Opcode = iota + 1 // IBV_WR_SEND
	OpSendImm                    // IBV_WR_SEND_WITH_IMM
	OpSendInv                    // IBV_WR_SEND_WITH_INV: send and invalidate the peer's RKey
	OpWrite                      // IBV_WR_RDMA_WRITE
	OpWriteImm                   // IBV_WR_RDMA_WRITE_WITH_IMM
	OpRead                       // IBV_WR_RDMA_READ
	OpBindMW                     // IBV_WR_BIND_MW (type-2 window)
	OpLocalInv                   // IBV_WR_LOCAL_INV
)

var opcodeNames = [...]string{"", "SEND", "SEND_WITH_IMM", "SEND_WITH_INV", "RDMA_WRITE", "RDMA_WRITE_WITH_IMM", "RDMA_READ", "BIND_MW", "LOCAL_INV"}

func (o Opcode) String() string {
	if o > 0 && int(o) < len(opcodeNames) {
		return opcodeNames[o]
	}
	return fmt.Sprintf("Opcode(%d)", uint8(o))
}

// Valid reports whether o is a defined opcode.
func (o Opcode) Valid() bool { return o >= OpSend && o <= OpLocalInv }

// Remote reports whether o addresses the peer's memory (RDMA WRITE or READ).
func (o Opcode) Remote() bool { return o == OpWrite || o == OpWriteImm || o == OpRead }

// Local reports whether o is a local memory operation that sends nothing.
func (o Opcode) Local() bool { return o == OpBindMW || o == OpLocalInv }

// SendFlags modify a send work request (enum ibv_send_flags; same values).
type SendFlags uint8

// Send flags.
const (
	SendFence     SendFlags = 1 << 0 // IBV_SEND_FENCE: wait for earlier RDMA READs first
	SendSignaled  SendFlags = 1 << 1 // IBV_SEND_SIGNALED: generate a completion on success
	SendSolicited SendFlags = 1 << 2 // IBV_SEND_SOLICITED: set the solicited event bit
	SendInline    SendFlags = 1 << 3 // IBV_SEND_INLINE: copy the data at post time

	sendFlagsAll = SendFence | SendSignaled | SendSolicited | SendInline
)

var sendFlagNames = []string{"FENCE", "SIGNALED", "SOLICITED", "INLINE"}

func (f SendFlags) String() string {
	if f == 0 {
		return "0"
	}
	var parts []string
	for i, n := range sendFlagNames {
		if f&(1<<i) != 0 {
			parts = append(parts, n)
		}
	}
	if rest := f &^ sendFlagsAll; rest != 0 {
		parts = append(parts, fmt.Sprintf("%#x", uint8(rest)))
	}
	return strings.Join(parts, "|")
}

// SGE is one scatter/gather element (struct ibv_sge): Length bytes at virtual
// address Addr inside the memory region whose local key is LKey. A guest
// buffer is described in place, without copying it.
type SGE struct {
	Addr   uint64
	Length uint32
	LKey   uint32
}

// Bind describes a type-2 memory window bind (struct ibv_mw_bind_info plus
// the new rkey): after it completes, RKey gives the peer access rights Access
// to [Addr, Addr+Length) of MR through the queue pair that bound it, and to
// nothing else.
type Bind struct {
	MW     MW
	RKey   uint32 // the window's new key: its current key with a new low byte (see IncRKey)
	MR     MR
	Addr   uint64
	Length uint64
	Access Access
}

// IncRKey returns key with its low 8 bits (the consumer-owned tag) advanced,
// as ibv_inc_rkey does. Rebinding a window with a new tag makes old copies of
// its key useless.
func IncRKey(key uint32) uint32 { return key&^0xff | (key+1)&0xff }

// SendWR is a send queue work request (struct ibv_send_wr without the list
// link: lists are slices).
type SendWR struct {
	ID    uint64
	Op    Opcode
	Flags SendFlags
	SGL   []SGE
	// Imm is the immediate data of OpSendImm and OpWriteImm, in host order;
	// providers put it on the wire big-endian.
	Imm uint32
	// RemoteAddr and RKey name the peer's memory for OpWrite, OpWriteImm and
	// OpRead.
	RemoteAddr uint64
	RKey       uint32
	// InvRKey is the key invalidated by OpSendInv (at the peer) and
	// OpLocalInv (here).
	InvRKey uint32
	// Bind describes OpBindMW.
	Bind Bind
}

// Len returns the total length of the SGEs, saturating at 1<<63.
func (w *SendWR) Len() uint64 { return sgeLen(w.SGL) }

// RecvWR is a receive queue work request (struct ibv_recv_wr).
type RecvWR struct {
	ID  uint64
	SGL []SGE
}

// Len returns the total length of the SGEs.
func (w *RecvWR) Len() uint64 { return sgeLen(w.SGL) }

func sgeLen(sgl []SGE) uint64 {
	var n uint64
	for _, s := range sgl {
		var c uint64
		n, c = bits.Add64(n, uint64(s.Length), 0)
		if c != 0 || n > 1<<63 {
			return 1 << 63
		}
	}
	return n
}

// CompletionOp says what a completion completed (enum ibv_wc_opcode). For a
// completion with an error status only ID, Status, QPN and VendorErr are
// defined, as in libibverbs.
type CompletionOp uint8

// Completion opcodes.
const (
	CompSend         CompletionOp = iota + 1 // IBV_WC_SEND
	CompWrite                                // IBV_WC_RDMA_WRITE
	CompRead                                 // IBV_WC_RDMA_READ
	CompBindMW                               // IBV_WC_BIND_MW
	CompLocalInv                             // IBV_WC_LOCAL_INV
	CompRecv                                 // IBV_WC_RECV
	CompRecvWriteImm                         // IBV_WC_RECV_RDMA_WITH_IMM
)

var compOpNames = [...]string{"", "SEND", "RDMA_WRITE", "RDMA_READ", "BIND_MW", "LOCAL_INV", "RECV", "RECV_RDMA_WITH_IMM"}

func (o CompletionOp) String() string {
	if o > 0 && int(o) < len(compOpNames) {
		return compOpNames[o]
	}
	return fmt.Sprintf("CompletionOp(%d)", uint8(o))
}

// CompletionFlags qualify a receive completion (enum ibv_wc_flags subset).
type CompletionFlags uint8

// Completion flags.
const (
	WithImm CompletionFlags = 1 << 0 // IBV_WC_WITH_IMM: Imm is valid
	WithInv CompletionFlags = 1 << 1 // IBV_WC_WITH_INV: InvalidatedRKey is valid
)

func (f CompletionFlags) String() string {
	switch f {
	case 0:
		return "0"
	case WithImm:
		return "WITH_IMM"
	case WithInv:
		return "WITH_INV"
	case WithImm | WithInv:
		return "WITH_IMM|WITH_INV"
	}
	return fmt.Sprintf("CompletionFlags(%#x)", uint8(f))
}

// Completion is one work completion (struct ibv_wc).
type Completion struct {
	ID              uint64
	Status          Status
	Op              CompletionOp
	Flags           CompletionFlags
	ByteLen         uint32 // bytes received (receive completions) or read (RDMA READ)
	Imm             uint32 // immediate data, host order, when Flags has WithImm
	InvalidatedRKey uint32 // when Flags has WithInv
	QPN             uint32
	VendorErr       uint32
}

// Err returns nil for a successful completion and a *CompletionError
// otherwise.
func (c Completion) Err() error {
	if c.Status == StatusSuccess {
		return nil
	}
	return &CompletionError{Completion: c}
}

// Status is a completion status (enum ibv_wc_status; same values).
type Status uint8

// Completion statuses.
const (
	StatusSuccess            Status = 0  // IBV_WC_SUCCESS
	StatusLocalLength        Status = 1  // IBV_WC_LOC_LEN_ERR: a message did not fit the receive SGEs
	StatusLocalQPOp          Status = 2  // IBV_WC_LOC_QP_OP_ERR
	StatusLocalEECOp         Status = 3  // IBV_WC_LOC_EEC_OP_ERR
	StatusLocalProtection    Status = 4  // IBV_WC_LOC_PROT_ERR: bad lkey, bounds or local access rights
	StatusFlushed            Status = 5  // IBV_WC_WR_FLUSH_ERR: the QP entered the error state
	StatusMWBind             Status = 6  // IBV_WC_MW_BIND_ERR
	StatusBadResponse        Status = 7  // IBV_WC_BAD_RESP_ERR: the peer answered outside the protocol
	StatusLocalAccess        Status = 8  // IBV_WC_LOC_ACCESS_ERR
	StatusRemoteInvalidReq   Status = 9  // IBV_WC_REM_INV_REQ_ERR: the peer could not take the request
	StatusRemoteAccess       Status = 10 // IBV_WC_REM_ACCESS_ERR: rkey, rights or bounds failed at the peer
	StatusRemoteOp           Status = 11 // IBV_WC_REM_OP_ERR: the peer failed to carry out the request
	StatusRetryExceeded      Status = 12 // IBV_WC_RETRY_EXC_ERR: no answer (link lost)
	StatusRNRRetryExceeded   Status = 13 // IBV_WC_RNR_RETRY_EXC_ERR: the peer had no receive posted
	StatusLocalRDDViolation  Status = 14 // IBV_WC_LOC_RDD_VIOL_ERR
	StatusRemoteInvalidRdReq Status = 15 // IBV_WC_REM_INV_RD_REQ_ERR
	StatusRemoteAbort        Status = 16 // IBV_WC_REM_ABORT_ERR
	StatusInvalidEECN        Status = 17 // IBV_WC_INV_EECN_ERR
	StatusInvalidEECState    Status = 18 // IBV_WC_INV_EEC_STATE_ERR
	StatusFatal              Status = 19 // IBV_WC_FATAL_ERR
	StatusResponseTimeout    Status = 20 // IBV_WC_RESP_TIMEOUT_ERR
	StatusGeneral            Status = 21 // IBV_WC_GENERAL_ERR
)

var statusNames = [...]string{
	"SUCCESS", "LOC_LEN_ERR", "LOC_QP_OP_ERR", "LOC_EEC_OP_ERR", "LOC_PROT_ERR",
	"WR_FLUSH_ERR", "MW_BIND_ERR", "BAD_RESP_ERR", "LOC_ACCESS_ERR", "REM_INV_REQ_ERR",
	"REM_ACCESS_ERR", "REM_OP_ERR", "RETRY_EXC_ERR", "RNR_RETRY_EXC_ERR", "LOC_RDD_VIOL_ERR",
	"REM_INV_RD_REQ_ERR", "REM_ABORT_ERR", "INV_EECN_ERR", "INV_EEC_STATE_ERR", "FATAL_ERR",
	"RESP_TIMEOUT_ERR", "GENERAL_ERR",
}

func (s Status) String() string {
	if int(s) < len(statusNames) {
		return statusNames[s]
	}
	return fmt.Sprintf("Status(%d)", uint8(s))
}

// QPState is a queue pair state (enum ibv_qp_state; same values).
type QPState uint8

// Queue pair states.
const (
	QPReset QPState = iota // IBV_QPS_RESET
	QPInit                 // IBV_QPS_INIT: receives may be posted
	QPRTR                  // IBV_QPS_RTR: ready to receive
	QPRTS                  // IBV_QPS_RTS: ready to send
	QPSQD                  // IBV_QPS_SQD: send queue drained, new sends held
	QPSQE                  // IBV_QPS_SQE: send queue error (not reached by RC)
	QPError                // IBV_QPS_ERR: everything flushes
)

var qpStateNames = [...]string{"RESET", "INIT", "RTR", "RTS", "SQD", "SQE", "ERR"}

func (s QPState) String() string {
	if int(s) < len(qpStateNames) {
		return qpStateNames[s]
	}
	return fmt.Sprintf("QPState(%d)", uint8(s))
}

// CanTransition reports whether the RC state machine (IBA 10.3.1) allows a
// consumer to move a queue pair from s to to. INIT and RTR are entered only by
// the connection manager, and SQE only by the provider.
func (s QPState) CanTransition(to QPState) bool {
	switch to {
	case QPReset, QPError:
		return s <= QPError
	case QPRTS:
		return s == QPSQD || s == QPSQE || s == QPRTS
	case QPSQD:
		return s == QPRTS || s == QPSQD
	}
	return false
}

// EventType is an asynchronous event on a connection: connection manager
// events (enum rdma_cm_event_type) and QP- or CQ-affiliated verbs events
// (enum ibv_event_type).
type EventType uint8

// Event types.
const (
	EventEstablished    EventType = iota + 1 // RDMA_CM_EVENT_ESTABLISHED
	EventDisconnected                        // RDMA_CM_EVENT_DISCONNECTED: DREQ, DREP, timeout or link loss
	EventQPFatal                             // IBV_EVENT_QP_FATAL
	EventQPRequestError                      // IBV_EVENT_QP_REQ_ERR: the peer broke the transport protocol
	EventQPAccessError                       // IBV_EVENT_QP_ACCESS_ERR: a remote access was refused here
	EventSQDrained                           // IBV_EVENT_SQ_DRAINED
	EventCQError                             // IBV_EVENT_CQ_ERR: a CQ this QP uses overflowed

	eventTypeCount = iota
)

var eventNames = [...]string{"", "ESTABLISHED", "DISCONNECTED", "QP_FATAL", "QP_REQ_ERR", "QP_ACCESS_ERR", "SQ_DRAINED", "CQ_ERR"}

func (e EventType) String() string {
	if e > 0 && int(e) < len(eventNames) {
		return eventNames[e]
	}
	return fmt.Sprintf("EventType(%d)", uint8(e))
}

// EventQueueLen is the capacity of Conn.Events. Each event type is delivered
// at most once per connection (EventSQDrained once per drain, when there is
// room), so the channel never blocks the provider.
const EventQueueLen = eventTypeCount + 1

// Event is one asynchronous event.
type Event struct {
	Type EventType
	QPN  uint32
	Err  error // the cause, where there is one (link loss, protocol violation)
}

func (e Event) String() string {
	if e.Err != nil {
		return fmt.Sprintf("%v qp %d: %v", e.Type, e.QPN, e.Err)
	}
	return fmt.Sprintf("%v qp %d", e.Type, e.QPN)
}

// QPOptions configure a queue pair. Zero fields take provider defaults;
// SendCQ and RecvCQ are required (they may be the same CQ).
type QPOptions struct {
	SendCQ, RecvCQ CQ
	MaxSendWR      int
	MaxRecvWR      int
	MaxSendSGE     int
	MaxRecvSGE     int
	MaxInline      int
	SignalAll      bool // every send WR completes as if SendSignaled (sq_sig_all)
	// MinRNRTimer is how long the peer waits before retrying a send this
	// QP could not take for want of a posted receive (min_rnr_timer).
	MinRNRTimer time.Duration
}

// QPCaps are the limits a created queue pair really has (at least those
// asked for).
type QPCaps struct {
	MaxSendWR, MaxRecvWR   int
	MaxSendSGE, MaxRecvSGE int
	MaxInline              int
}

// CQOptions configure a completion queue. Entries zero takes the provider
// default; the provider may round it up (see CQ.Cap).
type CQOptions struct {
	Entries int
}

// DeviceAttr are a device's limits (a subset of struct ibv_device_attr).
type DeviceAttr struct {
	MaxQP      int
	MaxQPWR    int
	MaxSGE     int
	MaxCQ      int
	MaxCQE     int
	MaxMR      int
	MaxMW      int
	MaxPD      int
	MaxInline  int
	MaxMsgSize uint64
}

// DeviceInfo describes a device found by Provider.Devices.
type DeviceInfo struct {
	Name     string
	Provider string // "soft", "ibv"
	GUID     uint64
	// Transport names the link: "soft-inproc", "soft-stream", "ib", "roce", "iwarp".
	Transport string
	Attr      DeviceAttr
}

// Resources counts a device's live objects. A test fails when a case leaves
// any behind.
type Resources struct {
	PDs, MRs, MWs, CQs, QPs, Conns, Listeners int
}

// Zero reports whether r counts no object.
func (r Resources) Zero() bool { return r == Resources{} }

func (r Resources) String() string {
	return fmt.Sprintf("pd=%d mr=%d mw=%d cq=%d qp=%d conn=%d listener=%d",
		r.PDs, r.MRs, r.MWs, r.CQs, r.QPs, r.Conns, r.Listeners)
}
