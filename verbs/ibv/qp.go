//go:build linux && cgo

package ibv

/*
#include "shim.h"
*/
import "C"

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/vsdp/vsdp/verbs"
)

// qp is a reliable-connected queue pair of a connection. The provider
// creates it (ibv_create_qp) and moves it through INIT, RTR and RTS itself
// with the attributes the connection manager computes (rdma_init_qp_attr),
// overriding the ones that belong to this side: the RNR NAK timer it
// advertises and its retry counts. The identifier does not own it, so
// librdmacm never transitions it behind the provider's back.
type qp struct {
	dev      *Device
	c        *conn
	pd       *pd
	scq, rcq *cq
	qp       *C.struct_ibv_qp
	num      uint32
	caps     verbs.QPCaps
	minRNR   time.Duration

	// mu is held shared by posts, Modify and State, exclusively by Close.
	mu      sync.RWMutex
	closing atomic.Bool
	// maybeErr: the queue pair may be in the error state (it was moved
	// there, or one of its completions failed). See flushRecv.
	maybeErr atomic.Bool

	sendMu sync.Mutex // the send scratch arrays
	swr    []C.struct_vsdp_swr
	ssge   []C.struct_ibv_sge
	recvMu sync.Mutex // the receive scratch arrays
	rwr    []C.struct_vsdp_rwr
	rsge   []C.struct_ibv_sge

	closeMu sync.Mutex
	closed  bool // guarded by dev.mu
}

var _ verbs.QP = (*qp)(nil)

func (q *qp) Num() uint32        { return q.num }
func (q *qp) Caps() verbs.QPCaps { return q.caps }

// State queries the device. A closed queue pair reports QPReset; one the
// device cannot query reports QPError.
func (q *qp) State() verbs.QPState {
	q.mu.RLock()
	defer q.mu.RUnlock()
	if q.closing.Load() {
		return verbs.QPReset
	}
	s, err := q.state()
	if err != nil {
		return verbs.QPError
	}
	return s
}

// state queries the device; the caller holds q.mu shared.
func (q *qp) state() (verbs.QPState, error) {
	var s C.int
	if rc := C.vsdp_query_qp_state(q.qp, &s); rc != 0 {
		return 0, rcErr("ibv_query_qp", int(rc))
	}
	return verbs.QPState(s), nil
}

// Modify moves the queue pair to a state a consumer may ask for.
func (q *qp) Modify(to verbs.QPState) error {
	q.mu.RLock()
	defer q.mu.RUnlock()
	if q.closing.Load() {
		return verbs.ErrClosed
	}
	cur, err := q.state()
	if err != nil {
		return err
	}
	if !cur.CanTransition(to) {
		return fmt.Errorf("%w: %v to %v", verbs.ErrQPState, cur, to)
	}
	if to == verbs.QPError {
		q.maybeErr.Store(true)
	}
	if rc := C.vsdp_modify_qp_state(q.qp, C.int(to)); rc != 0 {
		return rcErr("ibv_modify_qp", int(rc))
	}
	return nil
}

// toError moves the queue pair to the error state (a disconnect); errors are
// ignored, as the pair may be in error already or closing.
func (q *qp) toError() {
	q.mu.RLock()
	defer q.mu.RUnlock()
	if !q.closing.Load() {
		q.maybeErr.Store(true)
		C.vsdp_modify_qp_state(q.qp, C.IBV_QPS_ERR)
	}
}

// flushRecv works around soft-RoCE leaving receives posted in the error
// state unflushed (IBA 10.3.1: work requests posted to a QP in the error
// state complete with WR_FLUSH_ERR): librxe writes receives into the
// user-mapped queue without entering the kernel, so nothing runs the rxe
// responder, which is what flushes. After a post on an rxe queue pair that
// may be in the error state, a state query and, if it is, a modify to ERR
// (which runs the responder) flush them. The caller holds q.mu shared.
func (q *qp) flushRecv() {
	if !q.dev.rxe || !q.maybeErr.Load() {
		return
	}
	if s, err := q.state(); err == nil && s == verbs.QPError {
		C.vsdp_modify_qp_state(q.qp, C.IBV_QPS_ERR)
	}
}

// transition moves the queue pair to RTR or RTS with the connection
// manager's attributes for id, overriding the ones in over. The caller must
// not hold c.mu; holding q.mu shared keeps id alive (Conn.Close waits for
// the QP to be closed, and QP.Close for q.mu).
func (q *qp) transition(id *C.struct_rdma_cm_id, state verbs.QPState, over *C.struct_vsdp_qp_over) error {
	q.mu.RLock()
	defer q.mu.RUnlock()
	if q.closing.Load() {
		return verbs.ErrClosed
	}
	if rc, err := C.vsdp_qp_transition(id, q.qp, C.int(state), over); rc != 0 {
		return fmt.Errorf("ibv: queue pair to %v: %w", state, callErr("ibv_modify_qp", err))
	}
	return nil
}

// overrides are the attributes a transition takes from this side's
// ConnParam and QPOptions rather than from the CM: the RNR NAK timer this
// side advertises (RTR), its transport and RNR retry counts (RTS), and, where
// given, its RDMA READ depths.
func (q *qp) overrides(p *verbs.ConnParam, resp, init int) *C.struct_vsdp_qp_over {
	o := &C.struct_vsdp_qp_over{
		max_dest_rd_atomic: C.int32_t(resp),
		min_rnr_timer:      -1,
		max_rd_atomic:      C.int32_t(init),
		retry_cnt:          C.int32_t(p.RetryCount),
		rnr_retry:          C.int32_t(p.RNRRetry),
	}
	if code, ok := rnrTimerCode(q.minRNR); ok {
		o.min_rnr_timer = C.int32_t(code)
	}
	return o
}

// RetryAttrs are the transport retry attributes the connection manager gave
// a queue pair, as the device reports them.
type RetryAttrs struct {
	RetryCount    int
	RNRRetry      int
	MinRNRTimer   time.Duration
	MinRNRTimerIB int // the encoded value (IBA table 45)
	// AckTimeout is the local ACK timeout: how long the requester waits
	// for an acknowledgement before it retransmits (4.096 µs ×
	// 2^AckTimeoutIB; 0 when AckTimeoutIB is 0, which waits forever).
	AckTimeout   time.Duration
	AckTimeoutIB int // the encoded value
}

// QueryRetry reports the retry attributes of an ibv queue pair.
func QueryRetry(v verbs.QP) (RetryAttrs, error) {
	q, ok := v.(*qp)
	if !ok {
		return RetryAttrs{}, fmt.Errorf("%w: %T is not an ibv queue pair", verbs.ErrInvalid, v)
	}
	q.mu.RLock()
	defer q.mu.RUnlock()
	if q.closing.Load() {
		return RetryAttrs{}, verbs.ErrClosed
	}
	var retry, rnr, timer, timeout C.int
	if rc := C.vsdp_query_qp_retry(q.qp, &retry, &rnr, &timer, &timeout); rc != 0 {
		return RetryAttrs{}, rcErr("ibv_query_qp", int(rc))
	}
	return RetryAttrs{
		RetryCount:    int(retry),
		RNRRetry:      int(rnr),
		MinRNRTimer:   rnrTimerDuration(uint8(timer)),
		MinRNRTimerIB: int(timer),
		AckTimeout:    ackTimeoutDuration(int(timeout)),
		AckTimeoutIB:  int(timeout),
	}, nil
}

// postErr builds the *PostError of a failed post. EINVAL in a state that
// does not take work requests becomes ErrQPState; ENOMEM is a full queue.
func (q *qp) postErr(op string, at, rc int, send bool) error {
	err := rcErr(op, rc)
	if e, ok := err.(*Error); ok && e.Err == verbs.ErrInvalid {
		if s, serr := q.state(); serr == nil && (s == verbs.QPReset || (send && s < verbs.QPRTS)) {
			err = fmt.Errorf("%w: posting in %v: %w", verbs.ErrQPState, s, err)
		}
	}
	return &verbs.PostError{Index: at, Err: err}
}

// PostSend posts the list with one call into C. Requests this package can
// check without the device (opcode, flags, a window or region of another
// provider) stop the list at that request, after posting the ones before it.
func (q *qp) PostSend(wrs []verbs.SendWR) error {
	if len(wrs) == 0 {
		return nil
	}
	q.mu.RLock()
	defer q.mu.RUnlock()
	if q.closing.Load() {
		return &verbs.PostError{Index: 0, Err: verbs.ErrClosed}
	}
	q.sendMu.Lock()
	defer q.sendMu.Unlock()
	swr, sge := q.swr[:0], q.ssge[:0]
	var bad error
	n := 0
	for i := range wrs {
		w := &wrs[i]
		op, ok := wrOpcode(w.Op)
		if !ok {
			bad = fmt.Errorf("%w: opcode %v", verbs.ErrInvalid, w.Op)
			break
		}
		if w.Flags&^(verbs.SendFence|verbs.SendSignaled|verbs.SendSolicited|verbs.SendInline) != 0 {
			bad = fmt.Errorf("%w: send flags %v", verbs.ErrInvalid, w.Flags)
			break
		}
		c := C.struct_vsdp_swr{
			wr_id:     C.uint64_t(w.ID),
			opcode:    C.uint32_t(op),
			flags:     C.uint32_t(w.Flags),
			first_sge: C.uint32_t(len(sge)),
			num_sge:   C.uint32_t(len(w.SGL)),
		}
		switch w.Op {
		case verbs.OpSendImm, verbs.OpWriteImm:
			c.imm = C.uint32_t(w.Imm)
		case verbs.OpSendInv, verbs.OpLocalInv:
			c.imm = C.uint32_t(w.InvRKey)
		}
		switch w.Op {
		case verbs.OpWrite, verbs.OpWriteImm, verbs.OpRead:
			c.remote_addr = C.uint64_t(w.RemoteAddr)
			c.rkey = C.uint32_t(w.RKey)
		case verbs.OpBindMW:
			win, ok1 := w.Bind.MW.(*mw)
			reg, ok2 := w.Bind.MR.(*mr)
			if !ok1 || !ok2 || win.dev != q.dev || reg.dev != q.dev {
				bad = fmt.Errorf("%w: bind of a window or region of another device", verbs.ErrInvalid)
				break
			}
			// Everything else about the bind is the device's to judge: a
			// bind it refuses completes with MW_BIND_ERR.
			c.mw = C.uintptr_t(uintptr(unsafe.Pointer(win.mw)))
			c.mr = C.uintptr_t(uintptr(unsafe.Pointer(reg.mr)))
			c.rkey = C.uint32_t(w.Bind.RKey)
			c.remote_addr = C.uint64_t(w.Bind.Addr)
			c.length = C.uint64_t(w.Bind.Length)
			c.access = C.uint32_t(w.Bind.Access)
		}
		if bad != nil {
			break
		}
		for _, s := range w.SGL {
			sge = append(sge, C.struct_ibv_sge{addr: C.uint64_t(s.Addr), length: C.uint32_t(s.Length), lkey: C.uint32_t(s.LKey)})
		}
		swr = append(swr, c)
		n++
	}
	q.swr, q.ssge = swr, sge
	if n > 0 {
		var sp *C.struct_ibv_sge
		if len(sge) > 0 {
			sp = &sge[0]
		}
		var at C.int
		if rc := C.vsdp_post_send(q.qp, &swr[0], C.int(n), sp, &at); rc != 0 {
			at = max(at, 0)
			q.posted(wrs[:at])
			return q.postErr("ibv_post_send", int(at), int(rc), true)
		}
		q.posted(wrs[:n])
	}
	if bad != nil {
		return &verbs.PostError{Index: n, Err: bad}
	}
	return nil
}

// posted records the window binds and local invalidations of posted
// requests.
func (q *qp) posted(wrs []verbs.SendWR) {
	var d *Device
	for i := range wrs {
		w := &wrs[i]
		if w.Op != verbs.OpBindMW && w.Op != verbs.OpLocalInv {
			continue
		}
		if d == nil {
			d = q.dev
			d.mu.Lock()
			defer d.mu.Unlock()
		}
		switch w.Op {
		case verbs.OpBindMW:
			win, reg := w.Bind.MW.(*mw), w.Bind.MR.(*mr)
			if bindOK(q, win, reg, &w.Bind) {
				win.bind(q, reg, w.Bind.RKey)
				// For type 2 the consumer owns struct ibv_mw's rkey: the
				// next bind names the window by its current key (rxe
				// checks it against the kernel's).
				win.mw.rkey = C.uint32_t(w.Bind.RKey)
			}
		case verbs.OpLocalInv:
			if win := d.windows[w.InvRKey]; win != nil {
				win.unbind()
			}
		}
	}
}

// bindOK predicts whether the device carries out a bind, with the checks of
// IBA 10.6.7.2.2 for type-2 windows: window and region of the queue pair's
// PD and open, the window not bound, the new key keeping the window's index
// (only its low 8 bits are the consumer's), rights the region allows, and the
// range inside the region. The caller holds dev.mu.
func bindOK(q *qp, w *mw, m *mr, b *verbs.Bind) bool {
	if w.closed || w.bound || m.closed || w.pd != q.pd || m.pd != q.pd || b.RKey>>8 != w.key>>8 {
		return false
	}
	if b.Access.ValidateMW(m.access) != nil {
		return false
	}
	return b.Addr >= m.addr && b.Addr-m.addr <= uint64(len(m.buf)) && b.Length <= uint64(len(m.buf))-(b.Addr-m.addr)
}

// PostRecv posts the list with one call into C.
func (q *qp) PostRecv(wrs []verbs.RecvWR) error {
	if len(wrs) == 0 {
		return nil
	}
	q.mu.RLock()
	defer q.mu.RUnlock()
	if q.closing.Load() {
		return &verbs.PostError{Index: 0, Err: verbs.ErrClosed}
	}
	q.recvMu.Lock()
	defer q.recvMu.Unlock()
	rwr, sge := q.rwr[:0], q.rsge[:0]
	for i := range wrs {
		w := &wrs[i]
		rwr = append(rwr, C.struct_vsdp_rwr{
			wr_id:     C.uint64_t(w.ID),
			first_sge: C.uint32_t(len(sge)),
			num_sge:   C.uint32_t(len(w.SGL)),
		})
		for _, s := range w.SGL {
			sge = append(sge, C.struct_ibv_sge{addr: C.uint64_t(s.Addr), length: C.uint32_t(s.Length), lkey: C.uint32_t(s.LKey)})
		}
	}
	q.rwr, q.rsge = rwr, sge
	var sp *C.struct_ibv_sge
	if len(sge) > 0 {
		sp = &sge[0]
	}
	var at C.int
	if rc := C.vsdp_post_recv(q.qp, &rwr[0], C.int(len(rwr)), sp, &at); rc != 0 {
		return q.postErr("ibv_post_recv", max(int(at), 0), int(rc), false)
	}
	q.flushRecv()
	return nil
}

// asyncEvent delivers a QP- or CQ-affiliated event to the connection.
func (q *qp) asyncEvent(t C.int32_t) {
	if t == C.IBV_EVENT_COMM_EST {
		// The first message arrived before the RTU: tell the CM, which
		// then reports ESTABLISHED (rdma_notify).
		q.c.commEstablished()
		return
	}
	typ, ok := asyncEvent(int32(t))
	if !ok {
		return
	}
	if typ != verbs.EventSQDrained {
		q.maybeErr.Store(true)
	}
	var err error
	switch typ {
	case verbs.EventQPFatal:
		err = fmt.Errorf("%w: the device reported a fatal queue pair error", verbs.ErrDisconnected)
	case verbs.EventQPRequestError, verbs.EventQPAccessError:
		err = fmt.Errorf("%w: %v", verbs.ErrProtocol, typ)
	case verbs.EventCQError:
		err = verbs.ErrCQOverflow
	}
	q.c.deliver(verbs.Event{Type: typ, QPN: q.num, Err: err})
}

// Close destroys the queue pair (rdma_destroy_qp) without generating
// completions, and forgets the windows bound through it. Idempotent.
func (q *qp) Close() error {
	q.closeMu.Lock()
	defer q.closeMu.Unlock()
	d := q.dev
	d.mu.Lock()
	if q.closed {
		d.mu.Unlock()
		return nil
	}
	q.closed = true
	d.mu.Unlock()

	q.closing.Store(true)
	q.mu.Lock() // no post is inside C any more
	d.hub.removeQP(q)
	rc := C.ibv_destroy_qp(q.qp)
	q.c.qpClosed(q)
	q.mu.Unlock()

	d.mu.Lock()
	defer d.mu.Unlock()
	for _, w := range d.windows {
		if w.q == q {
			w.unbind()
		}
	}
	q.pd.children--
	q.scq.qps--
	q.rcq.qps--
	d.res.QPs--
	if rc != 0 {
		return rcErr("ibv_destroy_qp", int(rc))
	}
	return nil
}
