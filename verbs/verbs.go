package verbs

import (
	"context"
	"net/netip"
)

// Provider finds and opens devices: verbs/soft (pure Go) and verbs/ibv
// (rdma-core).
type Provider interface {
	Name() string
	// Devices lists the devices; zero devices is not an error.
	Devices() ([]DeviceInfo, error)
	Open(name string) (Device, error)
}

// Device is an opened RDMA device with its connection manager. It is the
// parent of protection domains, completion queues, listeners and
// connections, and refuses to close while any is open.
type Device interface {
	Info() DeviceInfo
	AllocPD() (PD, error)
	CreateCQ(CQOptions) (CQ, error)
	// Listen binds a listener to a service ID. A provider that cannot bind
	// the service ID returns an error wrapping ErrNotSupported.
	Listen(ListenOptions) (Listener, error)
	// Resolve resolves the peer's fabric address and the route to it and
	// returns an active Conn, ready for CreateQP and Connect. An address
	// with no route fails with ErrUnreachable.
	Resolve(ctx context.Context, o ResolveOptions) (Conn, error)
	// PrivateDataLimits returns the CM private data sizes for a service ID,
	// or an error wrapping ErrNotSupported where the provider cannot use it.
	PrivateDataLimits(ServiceID) (PrivateDataLimits, error)
	// Resources counts the live objects this device owns.
	Resources() Resources
	// Close releases the device; it fails with ErrBusy while children are
	// open. Idempotent.
	Close() error
}

// PD is a protection domain: the parent of memory regions, memory windows
// and queue pairs, which only meet objects of the same PD.
type PD interface {
	// RegMR registers buf. buf must not be Go heap memory that may move or
	// be freed: use guest memory mapped by the caller or AllocDMA. The
	// caller keeps buf mapped until the MR is closed.
	RegMR(buf []byte, access Access) (MR, error)
	// AllocMW allocates a type-2 memory window (bound with OpBindMW).
	AllocMW() (MW, error)
	Close() error
}

// MR is a registered memory region.
type MR interface {
	LKey() uint32
	RKey() uint32
	Addr() uint64 // virtual address of the first byte
	Len() int
	Access() Access
	Bytes() []byte // the registered memory
	// Close deregisters the region; it fails with ErrBusy while windows are
	// bound to it. After Close returns the provider no longer touches the
	// memory.
	Close() error
}

// MW is a type-2 memory window: an rkey that exposes exactly one range of one
// region to one queue pair's peer, until invalidated.
type MW interface {
	// RKey is the window's current key (it changes with each bind).
	RKey() uint32
	// Bound reports whether a bind is in force.
	Bound() bool
	// Close deallocates the window, invalidating any bind.
	Close() error
}

// CQ is a completion queue. Poll and the notification calls may run
// concurrently with posting; Wait admits one waiter at a time.
type CQ interface {
	// Poll moves up to len(wc) completions into wc. Once the queue has
	// overflowed, Poll returns the stored completions together with an
	// error wrapping ErrCQOverflow.
	Poll(wc []Completion) (int, error)
	// Notify arms the queue (ibv_req_notify_cq): the next completion added
	// after this call, or with solicitedOnly the next solicited or
	// unsuccessful one, wakes Wait once. Completions already queued do not:
	// poll after arming.
	Notify(solicitedOnly bool) error
	// Wait blocks until an armed notification fires, the context ends, or
	// the CQ closes. It waits on a file descriptor through Go's netpoller.
	Wait(ctx context.Context) error
	// Cap is the number of completions the queue holds.
	Cap() int
	// Close fails with ErrBusy while queue pairs use the CQ. Idempotent.
	Close() error
}

// QP is a reliable-connected queue pair, created by Conn.CreateQP.
type QP interface {
	Num() uint32
	State() QPState
	Caps() QPCaps
	// Modify moves the queue pair to state to, as far as QPState.CanTransition
	// allows a consumer: to QPError (everything outstanding flushes), QPReset
	// (everything is discarded), QPSQD and back to QPRTS.
	Modify(to QPState) error
	// PostSend posts a list of send work requests. On failure it returns a
	// *PostError; the requests before PostError.Index were posted. In the
	// error state requests are accepted and complete with StatusFlushed.
	PostSend(wrs []SendWR) error
	// PostRecv posts a list of receive work requests, likewise.
	PostRecv(wrs []RecvWR) error
	// Close destroys the queue pair without generating completions.
	Close() error
}

// Conn is a connection manager identifier with its queue pair (an
// rdma_cm_id). Active side: Device.Resolve, CreateQP, post receives, Connect.
// Passive side: Listener.Accept, inspect PrivateData, then CreateQP, post
// receives and Accept, or Reject.
type Conn interface {
	// CreateQP creates this connection's queue pair in the INIT state, so
	// receives can be posted before the peer may send.
	CreateQP(pd PD, o QPOptions) (QP, error)
	// QP returns the queue pair, or nil before CreateQP and after its Close.
	QP() QP
	// Connect sends the REQ with p.PrivateData and waits for the REP or REJ.
	// It returns the REP's private data. Refusals wrap ErrRefused (with a
	// *RejectError), no answer before the context ends wraps ErrTimeout.
	Connect(ctx context.Context, p ConnParam) ([]byte, error)
	// Accept sends the REP with p.PrivateData and returns once the
	// connection is established. Passive side only.
	Accept(ctx context.Context, p ConnParam) error
	// Reject sends a REJ (RejectConsumer) with private data. Passive side
	// only, before Accept.
	Reject(privateData []byte) error
	// PrivateData returns the peer's private data: the REQ's on the passive
	// side, the REP's on the active side once connected.
	PrivateData() []byte
	LocalAddr() netip.Addr
	RemoteAddr() netip.Addr
	ServiceID() ServiceID
	// Events delivers connection and queue pair events. It has capacity
	// EventQueueLen and is closed by Close.
	Events() <-chan Event
	// Disconnect sends a DREQ and moves the queue pair to the error state;
	// EventDisconnected follows on both sides. Idempotent.
	Disconnect() error
	// Close destroys the identifier; it fails with ErrBusy while the queue
	// pair is open. Idempotent.
	Close() error
}

// Listener receives connection requests for one service ID.
type Listener interface {
	// Accept returns the next connection request, a passive Conn that the
	// caller must accept or reject, and Close.
	Accept(ctx context.Context) (Conn, error)
	Addr() netip.Addr
	ServiceID() ServiceID
	// Close stops listening and rejects requests not yet accepted.
	Close() error
}
