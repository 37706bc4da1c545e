//go:build linux && cgo

package ibv

/*
#include <sys/socket.h>
#include "shim.h"
*/
import "C"

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/vsdp/vsdp/verbs"
)

// connState is where a connection manager identifier is.
type connState uint8

const (
	stateIdle          connState = iota // active: created, resolving
	stateAddrResolved                   // ADDR_RESOLVED
	stateRouteResolved                  // ROUTE_RESOLVED: ready for CreateQP and Connect
	stateRequested                      // passive: REQ received, not yet answered
	stateConnecting                     // active: REQ sent
	stateAccepting                      // passive: REP sent
	stateEstablished                    // ESTABLISHED
	stateRejected                       // passive: REJ sent
	stateDisconnected                   // DISCONNECTED
	stateFailed                         // resolution or connection failed; see err
)

// conn is an rdma_cm_id with its queue pair. It implements verbs.Conn.
type conn struct {
	dev     *Device
	handle  uintptr
	passive bool
	sid     verbs.ServiceID
	events  chan verbs.Event

	closeMu sync.Mutex // serialises Close

	// mu guards the fields below. It is taken after qp.mu (QP.Close) and
	// before dev.mu; no qp lock is taken while it is held.
	mu        sync.Mutex
	id        *C.struct_rdma_cm_id // nil once destroyed
	state     connState
	err       error         // why the state is stateFailed or stateRejected
	changed   chan struct{} // closed and replaced on every change
	pdata     []byte
	req       reqParam
	q         *qp
	delivered [16]bool
	closed    bool
	// disconnecting: a DREQ was sent, or the peer's answered.
	disconnecting bool
	// established stays true once the connection was established, so a
	// waiter that wakes after a quick DISCONNECTED still sees success.
	established bool
	// answering: Accept or Reject is under way (passive).
	answering bool
	param     verbs.ConnParam // Connect's, for the RTR and RTS of the REP
	resp      int             // Connect's RDMA READ depths
	init      int
	local     netip.Addr
	remote    netip.Addr
	ln        *listener // passive, until Listener.Accept hands it out
}

var _ verbs.Conn = (*conn)(nil)

func newConn(d *Device, sid verbs.ServiceID, passive bool) *conn {
	return &conn{
		dev:     d,
		sid:     sid,
		passive: passive,
		events:  make(chan verbs.Event, verbs.EventQueueLen),
		changed: make(chan struct{}),
	}
}

// setLocked changes the state and wakes waiters; the caller holds c.mu.
func (c *conn) setLocked(s connState, err error) {
	c.state = s
	if err != nil {
		c.err = err
	}
	close(c.changed)
	c.changed = make(chan struct{})
}

// wait waits until done reports true or an error, the context ends, or the
// connection closes; done runs with c.mu held.
func (c *conn) wait(ctx context.Context, done func() (bool, error)) error {
	for {
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return verbs.ErrClosed
		}
		ok, err := done()
		ch := c.changed
		c.mu.Unlock()
		if ok || err != nil {
			return err
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// deliver queues an event for Events; each type once per connection (SQ
// drained once per drain, when there is room). The channel never blocks the
// provider.
func (c *conn) deliver(e verbs.Event) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.deliverLocked(e)
}

func (c *conn) deliverLocked(e verbs.Event) {
	if c.closed || int(e.Type) >= len(c.delivered) {
		return
	}
	if e.Type != verbs.EventSQDrained && c.delivered[e.Type] {
		return
	}
	select {
	case c.events <- e:
		c.delivered[e.Type] = true
	default:
	}
}

// cmEvent handles the connection manager events of this identifier; it runs
// on the device's event goroutine.
func (c *conn) cmEvent(ev *cmEvent) {
	switch ev.typ {
	case C.RDMA_CM_EVENT_DISCONNECTED, C.RDMA_CM_EVENT_DEVICE_REMOVAL,
		C.RDMA_CM_EVENT_REJECTED, C.RDMA_CM_EVENT_UNREACHABLE, C.RDMA_CM_EVENT_CONNECT_ERROR:
		// The queue pair is in the error state (what it had posted
		// flushes) before anyone hears of the disconnection or the
		// failure, as librdmacm does for the queue pairs it owns.
		c.mu.Lock()
		q := c.q
		c.mu.Unlock()
		if q != nil {
			q.toError()
		}
	}
	c.mu.Lock()
	q := c.q
	var rep bool
	switch ev.typ {
	case C.RDMA_CM_EVENT_ADDR_RESOLVED:
		if c.state == stateIdle {
			c.setLocked(stateAddrResolved, nil)
		}
	case C.RDMA_CM_EVENT_ROUTE_RESOLVED:
		if c.state == stateAddrResolved {
			c.setLocked(stateRouteResolved, nil)
		}
	case C.RDMA_CM_EVENT_ADDR_ERROR, C.RDMA_CM_EVENT_ROUTE_ERROR:
		op := "rdma_resolve_addr"
		if ev.typ == C.RDMA_CM_EVENT_ROUTE_ERROR {
			op = "rdma_resolve_route"
		}
		err := statusErr(op, ev.status)
		c.setLocked(stateFailed, &verbs.AddrError{Addr: c.remote, Err: fmt.Errorf("%w: %w", verbs.ErrUnreachable, err)})
	case C.RDMA_CM_EVENT_CONNECT_RESPONSE:
		if c.state == stateConnecting && q != nil {
			c.pdata = ev.pdata
			rep = true
		}
	case C.RDMA_CM_EVENT_ESTABLISHED:
		if c.state == stateConnecting || c.state == stateAccepting {
			if !c.passive {
				c.pdata = ev.pdata
			}
			c.establishedLocked(q)
		}
	case C.RDMA_CM_EVENT_REJECTED:
		r := &verbs.RejectError{PrivateData: ev.pdata}
		if ev.status > 0 && ev.status <= 0xffff {
			r.Reason = verbs.RejectReason(ev.status)
		}
		c.setLocked(stateFailed, r)
	case C.RDMA_CM_EVENT_UNREACHABLE:
		err := statusErr("rdma_connect", ev.status)
		if errors.Is(err, verbs.ErrTimeout) {
			err = fmt.Errorf("%w: no answer to the connection request: %w", verbs.ErrTimeout, err)
		} else {
			err = &verbs.AddrError{Addr: c.remote, Err: fmt.Errorf("%w: %w", verbs.ErrUnreachable, err)}
		}
		c.setLocked(stateFailed, err)
	case C.RDMA_CM_EVENT_CONNECT_ERROR:
		err := statusErr("connection establishment", ev.status)
		if !errors.Is(err, verbs.ErrTimeout) {
			err = fmt.Errorf("%w: %w", verbs.ErrProtocol, err)
		}
		c.setLocked(stateFailed, err)
	case C.RDMA_CM_EVENT_DISCONNECTED:
		if c.state != stateDisconnected {
			c.setLocked(stateDisconnected, verbs.ErrDisconnected)
			c.deliverLocked(verbs.Event{Type: verbs.EventDisconnected, QPN: qpNum(q)})
		}
		if !c.disconnecting && !c.closed && c.id != nil {
			// The peer's DREQ: answer with the DREP (rdma_disconnect),
			// or the peer waits for its DREQ to time out.
			c.disconnecting = true
			C.rdma_disconnect(c.id)
		}
	case C.RDMA_CM_EVENT_DEVICE_REMOVAL:
		err := fmt.Errorf("%w: device removed", verbs.ErrDisconnected)
		c.setLocked(stateFailed, err)
		c.deliverLocked(verbs.Event{Type: verbs.EventDisconnected, QPN: qpNum(q), Err: err})
	}
	id, p, resp, init := c.id, c.param, c.resp, c.init
	c.mu.Unlock()
	switch {
	case rep:
		c.repReceived(q, id, &p, resp, init)
	}
}

// establishedLocked records the connection as established; the caller holds
// c.mu.
func (c *conn) establishedLocked(q *qp) {
	c.established = true
	c.setLocked(stateEstablished, nil)
	c.deliverLocked(verbs.Event{Type: verbs.EventEstablished, QPN: qpNum(q)})
}

// repReceived completes the active side's handshake after the REP: the queue
// pair goes to RTR and RTS with this side's overrides, then rdma_establish
// sends the RTU. A failure rejects the REP.
func (c *conn) repReceived(q *qp, id *C.struct_rdma_cm_id, p *verbs.ConnParam, resp, init int) {
	over := q.overrides(p, resp, init)
	over.max_rd_atomic = -1 // the REP's answer stands
	over.max_dest_rd_atomic = -1
	err := q.transition(id, verbs.QPRTR, over)
	if err == nil {
		err = q.transition(id, verbs.QPRTS, over)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || c.state != stateConnecting {
		return
	}
	if err == nil {
		if rc, cerr := C.rdma_establish(c.id); rc != 0 {
			err = callErr("rdma_establish", cerr)
		}
	}
	if err != nil {
		C.rdma_reject(c.id, nil, 0)
		c.setLocked(stateFailed, fmt.Errorf("%w: completing the connection after the REP: %w", verbs.ErrProtocol, err))
		return
	}
	c.establishedLocked(q)
}

func qpNum(q *qp) uint32 {
	if q == nil {
		return 0
	}
	return q.num
}

// commEstablished passes IBV_EVENT_COMM_EST to the CM (a message arrived
// before the RTU), which then reports ESTABLISHED.
func (c *conn) commEstablished() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.closed && c.id != nil && c.state == stateAccepting {
		C.rdma_notify(c.id, C.IBV_EVENT_COMM_EST)
	}
}

// CreateQP creates the connection's queue pair and brings it to INIT with
// the CM's attributes, so receives may be posted at once.
func (c *conn) CreateQP(p verbs.PD, o verbs.QPOptions) (verbs.QP, error) {
	pp, ok := p.(*pd)
	if !ok || pp.dev != c.dev {
		return nil, fmt.Errorf("%w: PD %T is not of this device", verbs.ErrInvalid, p)
	}
	scq, ok1 := o.SendCQ.(*cq)
	rcq, ok2 := o.RecvCQ.(*cq)
	if !ok1 || !ok2 || scq.dev != c.dev || rcq.dev != c.dev {
		return nil, fmt.Errorf("%w: send and receive CQs of this device are required", verbs.ErrInvalid)
	}
	if o.MaxSendWR < 0 || o.MaxRecvWR < 0 || o.MaxSendSGE < 0 || o.MaxRecvSGE < 0 || o.MaxInline < 0 || o.MinRNRTimer < 0 {
		return nil, fmt.Errorf("%w: negative queue pair option", verbs.ErrInvalid)
	}
	caps := C.struct_ibv_qp_cap{
		max_send_wr:     C.uint32_t(orDefault(o.MaxSendWR, defaultQPWR)),
		max_recv_wr:     C.uint32_t(orDefault(o.MaxRecvWR, defaultQPWR)),
		max_send_sge:    C.uint32_t(orDefault(o.MaxSendSGE, defaultSGE)),
		max_recv_sge:    C.uint32_t(orDefault(o.MaxRecvSGE, defaultSGE)),
		max_inline_data: C.uint32_t(orDefault(o.MaxInline, min(defaultInline, c.dev.info.Attr.MaxInline))),
	}
	sigAll := C.int(0)
	if o.SignalAll {
		sigAll = 1
	}

	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.closed:
		return nil, verbs.ErrClosed
	case c.q != nil:
		return nil, fmt.Errorf("%w: the connection has a queue pair", verbs.ErrBusy)
	case c.passive && c.state != stateRequested, !c.passive && c.state != stateRouteResolved:
		return nil, fmt.Errorf("%w: no queue pair after the connection request was answered", verbs.ErrQPState)
	}
	d := c.dev
	d.mu.Lock()
	if err := pp.open(); err != nil {
		d.mu.Unlock()
		return nil, err
	}
	if scq.closed || rcq.closed {
		d.mu.Unlock()
		return nil, fmt.Errorf("%w: completion queue", verbs.ErrClosed)
	}
	pp.children++
	scq.qps++
	rcq.qps++
	d.res.QPs++
	d.mu.Unlock()

	cqp, err := C.vsdp_create_qp(c.id, pp.pd, scq.cq, rcq.cq, &caps, sigAll)
	if cqp == nil {
		d.mu.Lock()
		pp.children--
		scq.qps--
		rcq.qps--
		d.res.QPs--
		d.mu.Unlock()
		return nil, callErr("ibv_create_qp", err)
	}
	q := &qp{
		dev:    d,
		c:      c,
		pd:     pp,
		scq:    scq,
		rcq:    rcq,
		qp:     cqp,
		num:    uint32(cqp.qp_num),
		minRNR: o.MinRNRTimer,
		caps: verbs.QPCaps{
			MaxSendWR:  int(caps.max_send_wr),
			MaxRecvWR:  int(caps.max_recv_wr),
			MaxSendSGE: int(caps.max_send_sge),
			MaxRecvSGE: int(caps.max_recv_sge),
			MaxInline:  int(caps.max_inline_data),
		},
	}
	d.hub.addQP(q)
	c.q = q
	return q, nil
}

func orDefault(v, def int) int {
	if v == 0 {
		return def
	}
	return v
}

// qpClosed forgets the queue pair; QP.Close calls it holding q.mu.
func (c *conn) qpClosed(q *qp) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.q == q {
		c.q = nil
	}
}

// QP returns the queue pair, or nil.
func (c *conn) QP() verbs.QP {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.q == nil {
		return nil
	}
	return c.q
}

// rdAtoms returns the RDMA READ depths to offer: what the caller asked for,
// else the request's values (passive) or the default, within the device's
// limits.
func (c *conn) rdAtoms(p *verbs.ConnParam) (resp, init int) {
	resp, init = defaultRDAtom, defaultRDAtom
	if c.passive {
		resp, init = int(c.req.responderResources), int(c.req.initiatorDepth)
	}
	if p.ResponderResources != 0 {
		resp = int(p.ResponderResources)
	}
	if p.InitiatorDepth != 0 {
		init = int(p.InitiatorDepth)
	}
	return min(resp, c.dev.lim.maxRDAtom), min(init, c.dev.lim.maxInitRDAtom)
}

func pdataPtr(b []byte) *C.uint8_t {
	if len(b) == 0 {
		return nil
	}
	return (*C.uint8_t)(unsafe.Pointer(&b[0]))
}

// Connect sends the REQ and waits for the REP (ESTABLISHED, after the CM
// moved the queue pair to RTS and sent the RTU) or a refusal.
func (c *conn) Connect(ctx context.Context, p verbs.ConnParam) ([]byte, error) {
	if c.passive {
		return nil, fmt.Errorf("%w: Connect on a passive connection", verbs.ErrInvalid)
	}
	if err := p.Validate(); err != nil {
		return nil, err
	}
	lim, err := c.dev.PrivateDataLimits(c.sid)
	if err != nil {
		return nil, err
	}
	if err := lim.Check("REQ", len(p.PrivateData)); err != nil {
		return nil, err
	}
	resp, init := c.rdAtoms(&p)
	c.mu.Lock()
	switch {
	case c.closed:
		c.mu.Unlock()
		return nil, verbs.ErrClosed
	case c.state != stateRouteResolved:
		c.mu.Unlock()
		return nil, fmt.Errorf("%w: Connect twice, or after a failure", verbs.ErrInvalid)
	case c.q == nil:
		c.mu.Unlock()
		return nil, fmt.Errorf("%w: Connect before CreateQP", verbs.ErrQPState)
	}
	rc, cerr := C.vsdp_connect(c.id, C.uint32_t(c.q.num), pdataPtr(p.PrivateData), C.int(len(p.PrivateData)),
		C.int(resp), C.int(init), C.int(p.RetryCount), C.int(p.RNRRetry))
	if rc != 0 {
		c.mu.Unlock()
		return nil, callErr("rdma_connect", cerr)
	}
	c.param, c.resp, c.init = p, resp, init
	c.setLocked(stateConnecting, nil)
	c.mu.Unlock()

	err = c.wait(ctx, c.connected)
	if err != nil {
		return nil, c.abandon(err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]byte(nil), c.pdata...), nil
}

// connected is the wait condition of Connect and Accept; the caller holds
// c.mu.
func (c *conn) connected() (bool, error) {
	switch {
	case c.established:
		return true, nil
	case c.state == stateFailed, c.state == stateDisconnected:
		return false, c.err
	}
	return false, nil
}

// abandon turns a context's end into ErrTimeout and leaves the identifier
// failed, so a late REP is not mistaken for success.
func (c *conn) abandon(err error) error {
	if !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled) {
		return err
	}
	err = fmt.Errorf("%w: %w", verbs.ErrTimeout, err)
	c.mu.Lock()
	if !c.closed && !c.established {
		c.setLocked(stateFailed, err)
	}
	c.mu.Unlock()
	return err
}

// Accept sends the REP and waits until the connection is established.
func (c *conn) Accept(ctx context.Context, p verbs.ConnParam) error {
	if !c.passive {
		return fmt.Errorf("%w: Accept on an active connection", verbs.ErrInvalid)
	}
	if err := p.Validate(); err != nil {
		return err
	}
	lim, err := c.dev.PrivateDataLimits(c.sid)
	if err != nil {
		return err
	}
	if err := lim.Check("REP", len(p.PrivateData)); err != nil {
		return err
	}
	resp, init := c.rdAtoms(&p)
	c.mu.Lock()
	switch {
	case c.closed:
		c.mu.Unlock()
		return verbs.ErrClosed
	case c.state != stateRequested || c.answering:
		c.mu.Unlock()
		return fmt.Errorf("%w: the request was already answered", verbs.ErrInvalid)
	case c.q == nil:
		c.mu.Unlock()
		return fmt.Errorf("%w: Accept before CreateQP", verbs.ErrQPState)
	}
	c.answering = true
	q, id := c.q, c.id
	c.mu.Unlock()

	// RTR and RTS before the REP, as librdmacm does for the queue pairs it
	// owns: the peer may send as soon as it has the REP.
	over := q.overrides(&p, resp, init)
	err = q.transition(id, verbs.QPRTR, over)
	if err == nil {
		err = q.transition(id, verbs.QPRTS, over)
	}
	c.mu.Lock()
	c.answering = false
	switch {
	case err != nil:
	case c.closed:
		err = verbs.ErrClosed
	case c.state != stateRequested:
		err = fmt.Errorf("%w: the request was answered meanwhile", verbs.ErrInvalid)
	default:
		if rc, cerr := C.vsdp_accept(c.id, C.uint32_t(q.num), pdataPtr(p.PrivateData), C.int(len(p.PrivateData)),
			C.int(resp), C.int(init), C.int(p.RNRRetry)); rc != 0 {
			err = callErr("rdma_accept", cerr)
		}
	}
	if err != nil {
		c.mu.Unlock()
		return err
	}
	c.setLocked(stateAccepting, nil)
	c.mu.Unlock()
	return c.abandon(c.wait(ctx, c.connected))
}

// Reject sends a REJ (consumer-defined reason) with private data.
func (c *conn) Reject(privateData []byte) error {
	if !c.passive {
		return fmt.Errorf("%w: Reject on an active connection", verbs.ErrInvalid)
	}
	lim, err := c.dev.PrivateDataLimits(c.sid)
	if err != nil {
		return err
	}
	if err := lim.Check("REJ", len(privateData)); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.closed:
		return verbs.ErrClosed
	case c.state != stateRequested || c.answering:
		return fmt.Errorf("%w: the request was already answered", verbs.ErrInvalid)
	}
	rc, cerr := C.vsdp_reject(c.id, pdataPtr(privateData), C.int(len(privateData)))
	if rc != 0 {
		return callErr("rdma_reject", cerr)
	}
	c.setLocked(stateRejected, fmt.Errorf("%w: rejected here", verbs.ErrRefused))
	return nil
}

// PrivateData returns the REQ's private data (passive) or the REP's (active,
// once connected), zero-padded to the CM message's size as the IB CM
// delivers it.
func (c *conn) PrivateData() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]byte(nil), c.pdata...)
}

func (c *conn) LocalAddr() netip.Addr {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.local
}

func (c *conn) RemoteAddr() netip.Addr {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.remote
}

func (c *conn) ServiceID() verbs.ServiceID { return c.sid }
func (c *conn) Events() <-chan verbs.Event { return c.events }

// Disconnect moves the queue pair to the error state (everything
// outstanding flushes) and sends a DREQ. DISCONNECTED follows on both sides.
// Idempotent.
func (c *conn) Disconnect() error {
	c.mu.Lock()
	switch {
	case c.closed, c.disconnecting:
		c.mu.Unlock()
		return nil
	case c.state == stateConnecting, c.state == stateAccepting, c.state == stateEstablished:
	default:
		c.mu.Unlock()
		return nil
	}
	c.disconnecting = true
	q := c.q
	c.mu.Unlock()
	if q != nil {
		q.toError()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil
	}
	if rc, err := C.rdma_disconnect(c.id); rc != 0 {
		// EINVAL: the CM is no longer connected (a DREQ crossed ours).
		if !errors.Is(err, syscall.EINVAL) {
			return callErr("rdma_disconnect", err)
		}
	}
	return nil
}

// Close destroys the identifier; it fails with ErrBusy while the queue pair
// is open. A request not yet answered is rejected. Idempotent.
func (c *conn) Close() error {
	c.closeMu.Lock()
	defer c.closeMu.Unlock()
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	if c.q != nil {
		c.mu.Unlock()
		return &verbs.BusyError{Object: "conn", Children: "a queue pair"}
	}
	c.closed = true
	unanswered := c.passive && c.state == stateRequested
	id := c.id
	c.id = nil
	ln := c.ln
	c.ln = nil
	close(c.events)
	c.setLocked(stateFailed, verbs.ErrClosed)
	c.mu.Unlock()

	if ln != nil {
		ln.forget(c)
	}
	if id != nil {
		if unanswered {
			C.rdma_reject(id, nil, 0)
		}
		C.rdma_destroy_id(id)
	}
	d := c.dev
	d.unregister(c.handle)
	d.mu.Lock()
	d.res.Conns--
	d.mu.Unlock()
	return nil
}

// readAddrsLocked reads the identifier's addresses; the caller holds c.mu.
func (c *conn) readAddrsLocked() {
	var a C.struct_vsdp_addrs
	C.vsdp_id_addrs(c.id, &a)
	if ip, ok := ipOf(int(a.src_family), a.src[:]); ok {
		c.local = ip
	}
	if ip, ok := ipOf(int(a.dst_family), a.dst[:]); ok {
		c.remote = ip
	}
}

func ipOf(family int, b []C.uint8_t) (netip.Addr, bool) {
	raw := unsafe.Slice((*byte)(unsafe.Pointer(&b[0])), len(b))
	switch family {
	case C.AF_INET:
		return netip.AddrFrom4([4]byte(raw[:4])), true
	case C.AF_INET6:
		return netip.AddrFrom16([16]byte(raw[:16])).Unmap(), true
	}
	return netip.Addr{}, false
}

// ipArgs returns the family and the 16-byte network-order form of a.
func ipArgs(a netip.Addr) (C.int, [16]byte) {
	var b [16]byte
	if a.Is4() {
		v := a.As4()
		copy(b[:], v[:])
		return C.AF_INET, b
	}
	return C.AF_INET6, a.As16()
}

// resolveTimeout is the per-step timeout in milliseconds: the default, or
// less when the context ends sooner.
func resolveTimeout(ctx context.Context) C.int {
	ms := resolveTimeoutMS
	if dl, ok := ctx.Deadline(); ok {
		left := time.Until(dl).Milliseconds()
		if left < int64(ms) {
			ms = int(max(left, 1))
		}
	}
	return C.int(ms)
}

// Resolve resolves a peer's address and the route to it. With an RDMA_PS_TCP
// service ID the identifier uses IP addressing. With an SDP service ID it
// first resolves the IP address to the peer's GID, then resolves again with
// native IB addressing (AF_IB) and the explicit service ID, so the REQ
// carries 92 bytes of private data at offset 0.
func (d *Device) Resolve(ctx context.Context, o verbs.ResolveOptions) (verbs.Conn, error) {
	dst := o.Addr.Unmap()
	src := o.Src.Unmap()
	if !dst.IsValid() || dst.IsUnspecified() {
		return nil, fmt.Errorf("%w: peer address %v", verbs.ErrInvalid, o.Addr)
	}
	if src.IsValid() && src.Is4() != dst.Is4() {
		return nil, fmt.Errorf("%w: source %v and peer %v of different families", verbs.ErrInvalid, src, dst)
	}
	switch {
	case o.ServiceID.IsTCP():
		return d.resolveIP(ctx, o.ServiceID, src, dst)
	case o.ServiceID.IsSDP():
		return d.resolveIB(ctx, o.ServiceID, src, dst)
	}
	return nil, fmt.Errorf("%w: service ID %v is neither RDMA_PS_TCP nor SDP", verbs.ErrNotSupported, o.ServiceID)
}

// newActive creates an active identifier in port space ps.
func (d *Device) newActive(sid verbs.ServiceID, ps C.int, dst netip.Addr) (*conn, error) {
	c := newConn(d, sid, false)
	c.remote = dst
	h, err := d.register(c)
	if err != nil {
		return nil, err
	}
	c.handle = h
	var id *C.struct_rdma_cm_id
	if rc, err := C.vsdp_create_id(d.ch, &id, C.uintptr_t(h), ps); rc != 0 {
		d.unregister(h)
		return nil, callErr("rdma_create_id", err)
	}
	c.id = id
	d.mu.Lock()
	d.res.Conns++
	d.mu.Unlock()
	return c, nil
}

// resolveSteps waits for ADDR_RESOLVED, checks the device, resolves the route
// and waits for ROUTE_RESOLVED. It closes c on failure.
func (d *Device) resolveSteps(ctx context.Context, c *conn, dst netip.Addr) error {
	fail := func(err error) error {
		c.Close()
		if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
			return fmt.Errorf("%w: resolving %v: %w", verbs.ErrTimeout, dst, err)
		}
		return err
	}
	waitFor := func(s connState) error {
		return c.wait(ctx, func() (bool, error) {
			if c.state == stateFailed {
				return false, c.err
			}
			return c.state >= s, nil
		})
	}
	if err := waitFor(stateAddrResolved); err != nil {
		return fail(err)
	}
	c.mu.Lock()
	other := c.id.verbs != d.ctx
	c.mu.Unlock()
	if other {
		return fail(&verbs.AddrError{Addr: dst, Err: fmt.Errorf("%w: the route leaves through another RDMA device than %s", verbs.ErrUnreachable, d.info.Name)})
	}
	c.mu.Lock()
	rc, err := C.rdma_resolve_route(c.id, resolveTimeout(ctx))
	c.mu.Unlock()
	if rc != 0 {
		return fail(&verbs.AddrError{Addr: dst, Err: fmt.Errorf("%w: %w", verbs.ErrUnreachable, callErr("rdma_resolve_route", err))})
	}
	if err := waitFor(stateRouteResolved); err != nil {
		return fail(err)
	}
	return nil
}

func (d *Device) resolveIP(ctx context.Context, sid verbs.ServiceID, src, dst netip.Addr) (*conn, error) {
	c, err := d.newActive(sid, C.RDMA_PS_TCP, dst)
	if err != nil {
		return nil, err
	}
	fam, db := ipArgs(dst)
	_, sb := ipArgs(src)
	hasSrc := C.int(0)
	if src.IsValid() {
		hasSrc = 1
	}
	c.mu.Lock()
	rc, cerr := C.vsdp_resolve_ip(c.id, fam, hasSrc, (*C.uint8_t)(&sb[0]), (*C.uint8_t)(&db[0]), C.uint16_t(sid.Port()), resolveTimeout(ctx))
	c.mu.Unlock()
	if rc != 0 {
		c.Close()
		return nil, &verbs.AddrError{Addr: dst, Err: fmt.Errorf("%w: %w", verbs.ErrUnreachable, callErr("rdma_resolve_addr", cerr))}
	}
	if err := d.resolveSteps(ctx, c, dst); err != nil {
		return nil, err
	}
	c.mu.Lock()
	c.readAddrsLocked()
	c.mu.Unlock()
	return c, nil
}

// resolveIB resolves with native IB addressing: the IP address gives the
// GIDs and P_Key (as IPoIB neighbour resolution does), then an RDMA_PS_IB
// identifier resolves the AF_IB address with the explicit service ID.
func (d *Device) resolveIB(ctx context.Context, sid verbs.ServiceID, src, dst netip.Addr) (*conn, error) {
	tmp, err := d.resolveIPAddrOnly(ctx, src, dst)
	if err != nil {
		return nil, err
	}
	var a C.struct_vsdp_addrs
	tmp.mu.Lock()
	C.vsdp_id_addrs(tmp.id, &a)
	local := tmp.local
	tmp.mu.Unlock()
	tmp.Close()

	c, err := d.newActive(sid, C.RDMA_PS_IB, dst)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	rc, cerr := C.vsdp_resolve_ib(c.id, &a.sgid[0], &a.dgid[0], C.uint16_t(beToHost16(uint16(a.pkey))), C.uint64_t(sid), resolveTimeout(ctx))
	c.mu.Unlock()
	if rc != 0 {
		c.Close()
		return nil, fmt.Errorf("%w: native IB addressing (AF_IB) on %s: %w", verbs.ErrNotSupported, d.info.Name, callErr("rdma_resolve_addr", cerr))
	}
	if err := d.resolveSteps(ctx, c, dst); err != nil {
		if !errors.Is(err, verbs.ErrTimeout) {
			err = fmt.Errorf("%w: native IB addressing (AF_IB) on %s: %w", verbs.ErrNotSupported, d.info.Name, err)
		}
		return nil, err
	}
	c.mu.Lock()
	c.local, c.remote = local, dst
	c.mu.Unlock()
	return c, nil
}

// resolveIPAddrOnly resolves an IP address (not the route) on a throwaway
// RDMA_PS_TCP identifier.
func (d *Device) resolveIPAddrOnly(ctx context.Context, src, dst netip.Addr) (*conn, error) {
	c, err := d.newActive(verbs.TCPServiceID(0), C.RDMA_PS_TCP, dst)
	if err != nil {
		return nil, err
	}
	fam, db := ipArgs(dst)
	_, sb := ipArgs(src)
	hasSrc := C.int(0)
	if src.IsValid() {
		hasSrc = 1
	}
	c.mu.Lock()
	rc, cerr := C.vsdp_resolve_ip(c.id, fam, hasSrc, (*C.uint8_t)(&sb[0]), (*C.uint8_t)(&db[0]), 0, resolveTimeout(ctx))
	c.mu.Unlock()
	if rc != 0 {
		c.Close()
		return nil, &verbs.AddrError{Addr: dst, Err: fmt.Errorf("%w: %w", verbs.ErrUnreachable, callErr("rdma_resolve_addr", cerr))}
	}
	err = c.wait(ctx, func() (bool, error) {
		if c.state == stateFailed {
			return false, c.err
		}
		return c.state >= stateAddrResolved, nil
	})
	if err != nil {
		c.Close()
		if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
			err = fmt.Errorf("%w: resolving %v: %w", verbs.ErrTimeout, dst, err)
		}
		return nil, err
	}
	c.mu.Lock()
	c.readAddrsLocked()
	c.mu.Unlock()
	return c, nil
}

func beToHost16(v uint16) uint16 { return v>>8 | v<<8 }

// listener is a listening rdma_cm_id. It implements verbs.Listener.
type listener struct {
	dev     *Device
	id      *C.struct_rdma_cm_id
	handle  uintptr
	addr    netip.Addr
	sid     verbs.ServiceID
	backlog int

	closeMu sync.Mutex
	mu      sync.Mutex // taken before conn.mu and dev.mu
	queue   []*conn
	changed chan struct{}
	closed  bool
}

var _ verbs.Listener = (*listener)(nil)

// Listen binds a listener with IP addressing in RDMA_PS_TCP. An SDP service
// ID fails with ErrNotSupported: mainline kernels let no user-space listener
// bind the SDP range (ref/sdp-protocol.md §10 item 2).
func (d *Device) Listen(o verbs.ListenOptions) (verbs.Listener, error) {
	switch {
	case o.ServiceID.IsSDP():
		return nil, fmt.Errorf("%w: listening on SDP service ID %v: the kernel's RDMA CM binds no user-space listener in the SDP range; listen on %v instead",
			verbs.ErrNotSupported, o.ServiceID, verbs.TCPServiceID(o.ServiceID.Port()))
	case !o.ServiceID.IsTCP():
		return nil, fmt.Errorf("%w: service ID %v is not in RDMA_PS_TCP", verbs.ErrNotSupported, o.ServiceID)
	}
	backlog := o.Backlog
	if backlog == 0 {
		backlog = defaultBacklog
	}
	if backlog < 0 || backlog > maxBacklog {
		return nil, fmt.Errorf("%w: backlog %d outside [1, %d]", verbs.ErrInvalid, o.Backlog, maxBacklog)
	}
	addr := o.Addr.Unmap()
	bind := addr
	if !bind.IsValid() {
		bind = netip.IPv4Unspecified()
	}
	l := &listener{dev: d, addr: addr, sid: o.ServiceID, backlog: backlog, changed: make(chan struct{})}
	h, err := d.register(l)
	if err != nil {
		return nil, err
	}
	l.handle = h
	var id *C.struct_rdma_cm_id
	if rc, err := C.vsdp_create_id(d.ch, &id, C.uintptr_t(h), C.RDMA_PS_TCP); rc != 0 {
		d.unregister(h)
		return nil, callErr("rdma_create_id", err)
	}
	fail := func(err error) (verbs.Listener, error) {
		C.rdma_destroy_id(id)
		d.unregister(h)
		return nil, err
	}
	fam, b := ipArgs(bind)
	if rc, err := C.vsdp_bind_ip(id, fam, (*C.uint8_t)(&b[0]), C.uint16_t(o.ServiceID.Port())); rc != 0 {
		return fail(fmt.Errorf("ibv: listen on %v port %d: %w", bind, o.ServiceID.Port(), callErr("rdma_bind_addr", err)))
	}
	if id.verbs != nil && id.verbs != d.ctx {
		return fail(fmt.Errorf("%w: address %v belongs to another RDMA device than %s", verbs.ErrInvalid, addr, d.info.Name))
	}
	if rc, err := C.rdma_listen(id, C.int(backlog)); rc != 0 {
		return fail(callErr("rdma_listen", err))
	}
	l.id = id
	d.mu.Lock()
	d.res.Listeners++
	d.mu.Unlock()
	return l, nil
}

// cmEvent handles a connection request: a passive Conn is queued for Accept,
// or rejected when the backlog is full, the listener closed, or the request
// arrived on another device.
func (l *listener) cmEvent(ev *cmEvent) {
	if ev.typ != C.RDMA_CM_EVENT_CONNECT_REQUEST || ev.id == nil {
		return
	}
	d := l.dev
	refuse := func() {
		C.rdma_reject(ev.id, nil, 0)
		C.rdma_destroy_id(ev.id)
	}
	if ev.id.verbs != d.ctx {
		refuse()
		return
	}
	c := newConn(d, l.sid, true)
	h, err := d.register(c)
	if err != nil {
		refuse()
		return
	}
	c.handle = h
	C.vsdp_set_context(ev.id, C.uintptr_t(h))
	c.id = ev.id
	c.pdata = ev.pdata
	c.req = ev.param
	c.state = stateRequested
	c.readAddrsLocked() // not yet shared
	c.ln = l

	l.mu.Lock()
	if l.closed || len(l.queue) >= l.backlog {
		l.mu.Unlock()
		d.unregister(h)
		refuse()
		return
	}
	d.mu.Lock()
	d.res.Conns++
	d.mu.Unlock()
	l.queue = append(l.queue, c)
	close(l.changed)
	l.changed = make(chan struct{})
	l.mu.Unlock()
}

// Accept returns the next connection request.
func (l *listener) Accept(ctx context.Context) (verbs.Conn, error) {
	for {
		l.mu.Lock()
		if l.closed {
			l.mu.Unlock()
			return nil, verbs.ErrClosed
		}
		if len(l.queue) > 0 {
			c := l.queue[0]
			l.queue[0] = nil
			l.queue = l.queue[1:]
			l.mu.Unlock()
			c.mu.Lock()
			c.ln = nil
			c.mu.Unlock()
			return c, nil
		}
		ch := l.changed
		l.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// forget drops a queued request that was closed before Accept took it.
func (l *listener) forget(c *conn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i, x := range l.queue {
		if x == c {
			l.queue = append(l.queue[:i], l.queue[i+1:]...)
			return
		}
	}
}

func (l *listener) Addr() netip.Addr           { return l.addr }
func (l *listener) ServiceID() verbs.ServiceID { return l.sid }

// Close stops listening and rejects the requests not yet accepted.
// Idempotent.
func (l *listener) Close() error {
	l.closeMu.Lock()
	defer l.closeMu.Unlock()
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	pending := l.queue
	l.queue = nil
	close(l.changed)
	l.changed = make(chan struct{})
	l.mu.Unlock()

	d := l.dev
	C.rdma_destroy_id(l.id)
	d.unregister(l.handle)
	for _, c := range pending {
		c.Close() //nolint:errcheck // no queue pair yet: cannot be busy
	}
	d.mu.Lock()
	d.res.Listeners--
	d.mu.Unlock()
	return nil
}
