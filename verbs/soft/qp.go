package soft

// The RC engine.
//
// Requester: posted send WRs wait in a ring. The writer transmits them in
// order (local operations — bind, local invalidate — take effect when they
// reach the transmit point), giving each request the next PSN, up to a window
// of min(own send depth, peer's send depth) unanswered requests. ACKs
// complete requests up to a PSN; a READ completes with its READ response.
// Completions are generated in posting order from the ring's head (IBA
// 10.8.3: a send queue completes in order). An RNR NAK sends the requester
// back to the NAKed request after the responder's RNR timer (go-back-N, as
// the transport is in order); RNR retry 0 fails at once, 7 retries forever.
// Any error completion moves the QP to the error state, and everything after
// it completes with WR_FLUSH_ERR.
//
// Responder: requests must arrive with the expected PSN. After an RNR NAK
// for PSN P the responder drops requests after P until P is sent again. A
// SEND takes the oldest posted receive (receives are consumed in order); a
// WRITE or READ is checked against the rkey (a region or a type-2 window
// bound through this QP), the access right and the bounds. A failed remote
// access NAKs the requester (REM_ACCESS_ERR there), moves this QP to the
// error state — its receives flush — and raises EventQPAccessError; the
// responder gets no completion for it (IBA 9.9.2, 10.7.3.1). A zero-length
// RDMA access checks no rkey (IBA C9-88).

import (
	"fmt"
	"io"
	"time"

	"github.com/vsdp/vsdp/verbs"
)

const sendFlagsAll = verbs.SendFence | verbs.SendSignaled | verbs.SendSolicited | verbs.SendInline

type swqe struct {
	id       uint64
	op       verbs.Opcode
	flags    verbs.SendFlags
	signaled bool
	sgl      []verbs.SGE // capacity MaxSendSGE, reused
	inline   []byte      // capacity MaxInline, reused
	rsegs    []segment   // READ: the resolved local SGEs, capacity MaxSendSGE
	length   uint64
	imm      uint32
	raddr    uint64
	rkey     uint32
	invRKey  uint32
	bind     verbs.Bind
	prefail  verbs.Status // an inline gather that failed at post time
	psn      uint32
	tx       bool // transmitted at least once
	done     bool
	status   verbs.Status
	rnrTries uint8
}

type rwqe struct {
	id  uint64
	sgl []verbs.SGE // capacity MaxRecvSGE, reused
}

type resp struct {
	typ   frameType
	psn   uint32
	code  uint8
	timer uint32
	seg   segment
}

// qp is a soft RC queue pair. Everything after the immutable block is
// guarded by c.mu.
type qp struct {
	c        *conn
	dev      *Device
	pd       *pd
	num      uint32
	scq, rcq *cq
	caps     verbs.QPCaps
	sigAll   bool
	minRNR   time.Duration

	state    verbs.QPState
	closed   bool
	rnrRetry uint8

	// Send queue: ring indexes are monotonic; [head, tail) are posted and
	// not yet completed, sent is the next to transmit, acked the first
	// transmitted request not yet answered.
	sq                      []swqe
	head, tail, sent, acked uint64
	txPSN                   uint32
	inflight                int
	window                  int
	rnrWait                 bool
	rnrGen                  uint64
	rnrTimer                Timer
	ackTimer                Timer
	ackGen                  uint64
	lastProgress            time.Time
	draining                bool
	cqLost                  bool

	rq             []rwqe
	rqHead, rqTail uint64
	withhold       bool

	epsn     uint32
	rnrDrop  bool
	resps    []resp
	maxResps int
}

var _ verbs.QP = (*qp)(nil)

func (c *conn) createQP(pdI verbs.PD, o verbs.QPOptions) (verbs.QP, error) {
	d := c.dev
	p, ok := pdI.(*pd)
	if !ok || p.dev != d {
		return nil, fmt.Errorf("%w: protection domain %T is not from this device", verbs.ErrInvalid, pdI)
	}
	scq, ok1 := o.SendCQ.(*cq)
	rcq, ok2 := o.RecvCQ.(*cq)
	if !ok1 || !ok2 || scq.dev != d || rcq.dev != d {
		return nil, fmt.Errorf("%w: send and receive CQs must be CQs of this device", verbs.ErrInvalid)
	}
	caps := verbs.QPCaps{MaxSendWR: o.MaxSendWR, MaxRecvWR: o.MaxRecvWR, MaxSendSGE: o.MaxSendSGE, MaxRecvSGE: o.MaxRecvSGE, MaxInline: o.MaxInline}
	for _, f := range []struct {
		v        *int
		def, max int
		name     string
	}{
		{&caps.MaxSendWR, defaultQPWR, d.attr.MaxQPWR, "MaxSendWR"},
		{&caps.MaxRecvWR, defaultQPWR, d.attr.MaxQPWR, "MaxRecvWR"},
		{&caps.MaxSendSGE, defaultSGE, d.attr.MaxSGE, "MaxSendSGE"},
		{&caps.MaxRecvSGE, defaultSGE, d.attr.MaxSGE, "MaxRecvSGE"},
		{&caps.MaxInline, defaultInline, d.attr.MaxInline, "MaxInline"},
	} {
		if *f.v == 0 {
			*f.v = f.def
		}
		if *f.v < 0 || *f.v > f.max {
			return nil, fmt.Errorf("%w: %s %d (limit %d)", verbs.ErrInvalid, f.name, *f.v, f.max)
		}
	}
	minRNR := o.MinRNRTimer
	if minRNR == 0 {
		minRNR = defaultMinRNRTimer
	}
	if minRNR < 0 || minRNR > maxRNRTimerMicros*time.Microsecond {
		return nil, fmt.Errorf("%w: MinRNRTimer %v", verbs.ErrInvalid, o.MinRNRTimer)
	}
	q := &qp{c: c, dev: d, pd: p, scq: scq, rcq: rcq, caps: caps, sigAll: o.SignalAll, minRNR: minRNR}
	q.sq = make([]swqe, caps.MaxSendWR)
	sgls := make([]verbs.SGE, caps.MaxSendWR*caps.MaxSendSGE)
	rsegs := make([]segment, caps.MaxSendWR*caps.MaxSendSGE)
	inl := make([]byte, caps.MaxSendWR*caps.MaxInline)
	for i := range q.sq {
		a, b := i*caps.MaxSendSGE, (i+1)*caps.MaxSendSGE
		q.sq[i].sgl = sgls[a:a:b]
		q.sq[i].rsegs = rsegs[a:a:b]
		a, b = i*caps.MaxInline, (i+1)*caps.MaxInline
		q.sq[i].inline = inl[a:a:b]
	}
	q.rq = make([]rwqe, caps.MaxRecvWR)
	rsgls := make([]verbs.SGE, caps.MaxRecvWR*caps.MaxRecvSGE)
	for i := range q.rq {
		a, b := i*caps.MaxRecvSGE, (i+1)*caps.MaxRecvSGE
		q.rq[i].sgl = rsgls[a:a:b]
	}

	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.closed:
		return nil, verbs.ErrClosed
	case c.qpCreated:
		return nil, fmt.Errorf("%w: the connection already has a queue pair", verbs.ErrBusy)
	case c.state != csIdle && c.state != csRequested:
		return nil, fmt.Errorf("%w: CreateQP after Connect or Accept", verbs.ErrInvalid)
	}
	if err := scq.attach(); err != nil {
		return nil, err
	}
	if err := rcq.attach(); err != nil {
		scq.detach()
		return nil, err
	}
	d.mu.Lock()
	if p.closed || d.closed || d.res.QPs >= d.attr.MaxQP {
		d.mu.Unlock()
		scq.detach()
		rcq.detach()
		if p.closed || d.closed {
			return nil, verbs.ErrClosed
		}
		return nil, fmt.Errorf("%w: %d queue pairs", verbs.ErrQueueFull, d.attr.MaxQP)
	}
	d.qpn++
	q.num = d.qpn
	p.qps++
	d.res.QPs++
	d.mu.Unlock()
	q.state = verbs.QPInit
	c.qp = q
	c.qpCreated = true
	return q, nil
}

func (c *cq) attach() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return verbs.ErrClosed
	}
	c.qps++
	return nil
}

func (c *cq) detach() {
	c.mu.Lock()
	c.qps--
	c.mu.Unlock()
}

func (q *qp) Num() uint32        { return q.num }
func (q *qp) Caps() verbs.QPCaps { return q.caps }

func (q *qp) State() verbs.QPState {
	q.c.mu.Lock()
	defer q.c.mu.Unlock()
	return q.state
}

// connected moves a new queue pair to RTS once the peer's depth is known
// (the active side on the REP, the passive side on Accept, which the RDMA CM
// also moves to RTS before sending the REP). The caller holds c.mu.
func (q *qp) connected(peerDepth int) {
	if q.state == verbs.QPInit {
		q.state = verbs.QPRTS
	}
	q.window = min(q.caps.MaxSendWR, peerDepth)
	q.maxResps = 2*peerDepth + 8
	q.c.kickWriter()
}

func (q *qp) Modify(to verbs.QPState) error {
	q.c.mu.Lock()
	defer q.c.mu.Unlock()
	if q.closed {
		return verbs.ErrClosed
	}
	if !q.state.CanTransition(to) {
		return fmt.Errorf("%w: %v -> %v", verbs.ErrQPState, q.state, to)
	}
	switch to {
	case verbs.QPError:
		q.toError(0, nil)
	case verbs.QPReset:
		q.reset()
	case verbs.QPSQD:
		if q.state == verbs.QPRTS {
			q.state = verbs.QPSQD
			q.draining = true
			q.checkDrained()
		}
	case verbs.QPRTS:
		if q.state != verbs.QPRTS {
			q.state = verbs.QPRTS
			q.c.kickWriter()
		}
	}
	return nil
}

func (q *qp) PostSend(wrs []verbs.SendWR) error {
	q.c.mu.Lock()
	defer q.c.mu.Unlock()
	if q.closed {
		return &verbs.PostError{Err: verbs.ErrClosed}
	}
	switch q.state {
	case verbs.QPReset, verbs.QPInit, verbs.QPRTR:
		return &verbs.PostError{Err: fmt.Errorf("%w: post send in %v", verbs.ErrQPState, q.state)}
	}
	defer q.postedSend()
	for i := range wrs {
		wr := &wrs[i]
		if err := q.checkSend(wr); err != nil {
			return &verbs.PostError{Index: i, Err: err}
		}
		if q.tail-q.head == uint64(len(q.sq)) {
			return &verbs.PostError{Index: i, Err: verbs.ErrQueueFull}
		}
		w := q.slot(q.tail)
		*w = swqe{
			id:       wr.ID,
			op:       wr.Op,
			flags:    wr.Flags,
			signaled: q.sigAll || wr.Flags&verbs.SendSignaled != 0,
			sgl:      append(w.sgl[:0], wr.SGL...),
			inline:   w.inline[:0],
			rsegs:    w.rsegs[:0],
			length:   wr.Len(),
			imm:      wr.Imm,
			raddr:    wr.RemoteAddr,
			rkey:     wr.RKey,
			invRKey:  wr.InvRKey,
			bind:     wr.Bind,
		}
		if wr.Flags&verbs.SendInline != 0 {
			q.gatherInline(w)
		}
		if q.state == verbs.QPError {
			w.done, w.status = true, verbs.StatusFlushed
		}
		q.tail++
	}
	return nil
}

func (q *qp) postedSend() {
	if q.state == verbs.QPError {
		q.retire()
	} else {
		q.c.kickWriter()
	}
}

// checkSend validates a send WR at post time (what ibv_post_send refuses
// with EINVAL).
func (q *qp) checkSend(wr *verbs.SendWR) error {
	switch {
	case !wr.Op.Valid():
		return fmt.Errorf("%w: opcode %v", verbs.ErrInvalid, wr.Op)
	case wr.Flags&^sendFlagsAll != 0:
		return fmt.Errorf("%w: send flags %v", verbs.ErrInvalid, wr.Flags)
	case len(wr.SGL) > q.caps.MaxSendSGE:
		return fmt.Errorf("%w: %d SGEs above %d", verbs.ErrInvalid, len(wr.SGL), q.caps.MaxSendSGE)
	case wr.Op.Local() && len(wr.SGL) > 0:
		return fmt.Errorf("%w: %v takes no SGEs", verbs.ErrInvalid, wr.Op)
	case wr.Len() > q.dev.attr.MaxMsgSize:
		return fmt.Errorf("%w: message of %d bytes above %d", verbs.ErrInvalid, wr.Len(), q.dev.attr.MaxMsgSize)
	case wr.Op == verbs.OpBindMW && (wr.Bind.MW == nil || wr.Bind.MR == nil):
		return fmt.Errorf("%w: BIND_MW without window or region", verbs.ErrInvalid)
	}
	if wr.Flags&verbs.SendInline != 0 {
		if wr.Op == verbs.OpRead || wr.Op.Local() {
			return fmt.Errorf("%w: INLINE with %v", verbs.ErrInvalid, wr.Op)
		}
		if wr.Len() > uint64(q.caps.MaxInline) {
			return fmt.Errorf("%w: %d inline bytes above %d", verbs.ErrInvalid, wr.Len(), q.caps.MaxInline)
		}
	}
	return nil
}

// gatherInline copies inline data at post time, as the HCA driver does; the
// caller may reuse the buffer as soon as the post returns. Soft still checks
// the lkeys (it reads no memory outside registered regions).
func (q *qp) gatherInline(w *swqe) {
	for _, s := range w.sgl {
		if s.Length == 0 {
			continue
		}
		seg, ok := q.dev.localSeg(q.pd, s, false)
		if !ok || !seg.m.acquire() {
			w.prefail = verbs.StatusLocalProtection
			w.inline = w.inline[:0]
			return
		}
		w.inline = append(w.inline, seg.m.mem[seg.off:seg.off+seg.n]...)
		seg.m.release()
		seg.m.nread.Add(seg.n)
		q.dev.touch(Touch{QPN: q.num, WRID: w.id, Key: s.LKey, Addr: s.Addr, Len: seg.n})
	}
}

func (q *qp) PostRecv(wrs []verbs.RecvWR) error {
	q.c.mu.Lock()
	defer q.c.mu.Unlock()
	if q.closed {
		return &verbs.PostError{Err: verbs.ErrClosed}
	}
	if q.state == verbs.QPReset {
		return &verbs.PostError{Err: fmt.Errorf("%w: post receive in %v", verbs.ErrQPState, q.state)}
	}
	defer q.checkLost()
	for i := range wrs {
		wr := &wrs[i]
		if len(wr.SGL) > q.caps.MaxRecvSGE {
			return &verbs.PostError{Index: i, Err: fmt.Errorf("%w: %d SGEs above %d", verbs.ErrInvalid, len(wr.SGL), q.caps.MaxRecvSGE)}
		}
		if q.state == verbs.QPError {
			q.complete(q.rcq, verbs.Completion{ID: wr.ID, Status: verbs.StatusFlushed, Op: verbs.CompRecv, QPN: q.num}, false)
			continue
		}
		if q.rqTail-q.rqHead == uint64(len(q.rq)) {
			return &verbs.PostError{Index: i, Err: verbs.ErrQueueFull}
		}
		r := q.rslot(q.rqTail)
		r.id = wr.ID
		r.sgl = append(r.sgl[:0], wr.SGL...)
		q.rqTail++
	}
	return nil
}

func (q *qp) Close() error {
	c := q.c
	c.mu.Lock()
	if q.closed {
		c.mu.Unlock()
		return nil
	}
	q.closed = true
	q.stopTimers()
	q.state = verbs.QPReset
	if c.qp == q {
		c.qp = nil
	}
	for i := range q.sq {
		q.sq[i].bind = verbs.Bind{}
	}
	c.mu.Unlock()
	d := q.dev
	d.unbindQP(q)
	q.scq.detach()
	q.rcq.detach()
	d.mu.Lock()
	q.pd.qps--
	d.res.QPs--
	d.mu.Unlock()
	return nil
}

// ---- engine (all with c.mu held) ----

func (q *qp) slot(i uint64) *swqe  { return &q.sq[i%uint64(len(q.sq))] }
func (q *qp) rslot(i uint64) *rwqe { return &q.rq[i%uint64(len(q.rq))] }

func compOp(op verbs.Opcode) verbs.CompletionOp {
	switch op {
	case verbs.OpSend, verbs.OpSendImm, verbs.OpSendInv:
		return verbs.CompSend
	case verbs.OpWrite, verbs.OpWriteImm:
		return verbs.CompWrite
	case verbs.OpRead:
		return verbs.CompRead
	case verbs.OpBindMW:
		return verbs.CompBindMW
	case verbs.OpLocalInv:
		return verbs.CompLocalInv
	}
	return 0
}

// complete adds a completion; a lost one (CQ overflow) dooms the QP.
func (q *qp) complete(c *cq, wc verbs.Completion, solicited bool) {
	if !c.push(wc, solicited) {
		q.cqLost = true
	}
}

// checkLost moves the QP to the error state after a completion was lost.
func (q *qp) checkLost() {
	if q.cqLost && q.state != verbs.QPError {
		q.c.emit(verbs.EventCQError, verbs.ErrCQOverflow)
		q.toError(verbs.EventQPFatal, verbs.ErrCQOverflow)
	}
}

// retire generates completions, in order, for the finished WRs at the head
// of the send queue.
func (q *qp) retire() {
	for q.head != q.tail {
		w := q.slot(q.head)
		if !w.done {
			break
		}
		if w.status != verbs.StatusSuccess || w.signaled {
			wc := verbs.Completion{ID: w.id, Status: w.status, Op: compOp(w.op), QPN: q.num}
			if w.op == verbs.OpRead && w.status == verbs.StatusSuccess {
				wc.ByteLen = uint32(w.length)
			}
			q.complete(q.scq, wc, false)
		}
		w.bind = verbs.Bind{}
		q.head++
	}
	q.acked = max(q.acked, q.head)
	q.sent = max(q.sent, q.head)
	q.checkLost()
}

// toError moves the QP to the error state: every WR not yet completed
// completes with WR_FLUSH_ERR (a WR that failed has set its own status
// first), receives flush, timers stop.
func (q *qp) toError(ev verbs.EventType, cause error) {
	if q.state == verbs.QPError || q.closed {
		return
	}
	q.state = verbs.QPError
	q.stopTimers()
	for i := q.head; i != q.tail; i++ {
		if w := q.slot(i); !w.done {
			w.done, w.status = true, verbs.StatusFlushed
		}
	}
	q.sent, q.acked, q.inflight = q.tail, q.tail, 0
	q.rnrWait, q.rnrDrop, q.draining = false, false, false
	q.retire()
	for q.rqHead != q.rqTail {
		r := q.rslot(q.rqHead)
		q.rqHead++
		q.complete(q.rcq, verbs.Completion{ID: r.id, Status: verbs.StatusFlushed, Op: verbs.CompRecv, QPN: q.num}, false)
	}
	if ev != 0 {
		q.c.emit(ev, cause)
	}
}

// reset discards all work without completions (any state → RESET).
func (q *qp) reset() {
	q.stopTimers()
	q.state = verbs.QPReset
	for i := q.head; i != q.tail; i++ {
		q.slot(i).bind = verbs.Bind{}
	}
	q.head, q.sent, q.acked = q.tail, q.tail, q.tail
	q.inflight = 0
	q.rqHead = q.rqTail
	clear(q.resps)
	q.resps = q.resps[:0]
	q.rnrWait, q.rnrDrop, q.draining = false, false, false
}

func (q *qp) stopTimers() {
	if q.rnrTimer != nil {
		q.rnrTimer.Stop()
		q.rnrTimer = nil
	}
	if q.ackTimer != nil {
		q.ackTimer.Stop()
		q.ackTimer = nil
	}
	q.rnrGen++
	q.ackGen++
}

// firstUnacked returns the oldest transmitted request without an answer.
func (q *qp) firstUnacked() *swqe {
	for q.acked < q.sent && q.slot(q.acked).done {
		q.acked++
	}
	if q.acked == q.sent {
		return nil
	}
	return q.slot(q.acked)
}

// failOldest fails the oldest unanswered request with st (link loss,
// protocol error, timeout); toError flushes the rest.
func (q *qp) failOldest(st verbs.Status) {
	if q.state == verbs.QPError {
		return
	}
	w := q.firstUnacked()
	if w == nil && q.acked != q.tail && q.slot(q.acked).tx && !q.slot(q.acked).done {
		w = q.slot(q.acked) // sent back by an RNR NAK, not retransmitted yet
	}
	if w != nil {
		w.done, w.status = true, st
	}
}

func (q *qp) checkDrained() {
	if q.state == verbs.QPSQD && q.draining && q.inflight == 0 {
		q.draining = false
		q.c.emit(verbs.EventSQDrained, nil)
	}
}

// progress follows an answer: completions, drain, and a wider window.
func (q *qp) progress() {
	q.retire()
	q.checkDrained()
	q.c.kickWriter()
}

func (q *qp) armAckTimer() {
	if q.inflight == 0 || q.ackTimer != nil {
		return
	}
	q.lastProgress = q.dev.clock.Now()
	q.scheduleAck(q.dev.opts.AckTimeout)
}

func (q *qp) scheduleAck(d time.Duration) {
	gen := q.ackGen
	q.ackTimer = q.dev.clock.AfterFunc(d, func() { q.ackTimeout(gen) })
}

// ackTimeout fails the oldest request when the peer has answered nothing
// for AckTimeout (RETRY_EXC_ERR: an HCA's transport retries ran out).
func (q *qp) ackTimeout(gen uint64) {
	c := q.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if q.closed || gen != q.ackGen {
		return
	}
	q.ackTimer = nil
	if q.inflight == 0 || q.state == verbs.QPError {
		return
	}
	timeout := q.dev.opts.AckTimeout
	last := q.lastProgress
	if io := time.Unix(0, c.ioAt.Load()); io.After(last) {
		last = io // the link is still moving our data
	}
	if el := q.dev.clock.Now().Sub(last); el < timeout {
		q.scheduleAck(timeout - el)
		return
	}
	q.failOldest(verbs.StatusRetryExceeded)
	q.toError(0, nil)
}

// collect appends the frames the writer should send now: answers first, then
// requests. The payload descriptions go to the writer's scratch (c.wsegs,
// c.wdata), never to slot storage the consumer may reuse.
func (q *qp) collect(batch []outFrame) []outFrame {
	c := q.c
	for _, r := range q.resps {
		f := outFrame{h: header{typ: r.typ, psn: r.psn, code: r.code, dmaLen: r.timer}}
		if r.typ == frameReadResp && r.seg.n > 0 {
			f.h.length = uint32(r.seg.n)
			i := len(c.wsegs)
			c.wsegs = append(c.wsegs, r.seg)
			f.segs = c.wsegs[i : i+1 : i+1]
		}
		batch = append(batch, f)
	}
	clear(q.resps)
	q.resps = q.resps[:0]
	return q.collectRequests(batch)
}

func (q *qp) collectRequests(batch []outFrame) []outFrame {
	c := q.c
	for q.state == verbs.QPRTS && !q.rnrWait && q.sent != q.tail && q.inflight < q.window {
		w := q.slot(q.sent)
		if w.done { // a local operation already carried out before a go-back
			q.sent++
			continue
		}
		if w.flags&verbs.SendFence != 0 && q.inflight > 0 {
			break
		}
		if w.op.Local() {
			q.execLocal(w)
			q.sent++
			if w.status != verbs.StatusSuccess {
				q.toError(0, nil)
			}
			continue
		}
		if w.prefail != 0 {
			w.done, w.status = true, w.prefail
			q.toError(0, nil)
			continue
		}
		f := outFrame{h: header{psn: q.txPSN, length: uint32(w.length)}}
		if w.flags&verbs.SendInline != 0 {
			i := len(c.wdata)
			c.wdata = append(c.wdata, w.inline...)
			f.data = c.wdata[i:len(c.wdata):len(c.wdata)]
		} else {
			start := len(c.wsegs)
			ok := true
			for _, s := range w.sgl {
				if s.Length == 0 {
					continue
				}
				seg, good := q.dev.localSeg(q.pd, s, w.op == verbs.OpRead)
				if !good {
					ok = false
					break
				}
				c.wsegs = append(c.wsegs, seg)
			}
			if !ok {
				c.wsegs = c.wsegs[:start]
				w.done, w.status = true, verbs.StatusLocalProtection
				q.toError(0, nil)
				continue
			}
			segs := c.wsegs[start:len(c.wsegs):len(c.wsegs)]
			if w.op == verbs.OpRead {
				w.rsegs = append(w.rsegs[:0], segs...)
				c.wsegs = c.wsegs[:start]
			} else {
				f.segs = segs
				for _, s := range segs {
					q.dev.touch(Touch{QPN: q.num, WRID: w.id, Key: s.m.key, Addr: s.m.base + s.off, Len: s.n})
				}
			}
		}
		solicited := uint8(0)
		if w.flags&verbs.SendSolicited != 0 {
			solicited = flagSolicited
		}
		switch w.op {
		case verbs.OpSend:
			f.h.typ, f.h.flags = frameSend, solicited
		case verbs.OpSendImm:
			f.h.typ, f.h.flags, f.h.imm = frameSend, solicited|flagImm, w.imm
		case verbs.OpSendInv:
			f.h.typ, f.h.flags, f.h.imm = frameSend, solicited|flagInv, w.invRKey
		case verbs.OpWrite:
			f.h.typ, f.h.addr, f.h.rkey = frameWrite, w.raddr, w.rkey
		case verbs.OpWriteImm:
			f.h.typ, f.h.flags, f.h.imm, f.h.addr, f.h.rkey = frameWrite, solicited|flagImm, w.imm, w.raddr, w.rkey
		case verbs.OpRead:
			f.h.typ, f.h.addr, f.h.rkey, f.h.dmaLen, f.h.length = frameReadReq, w.raddr, w.rkey, uint32(w.length), 0
		}
		w.psn, w.tx = q.txPSN, true
		q.txPSN++
		q.inflight++
		q.sent++
		batch = append(batch, f)
	}
	q.armAckTimer()
	q.retire()
	return batch
}

// execLocal carries out a bind or local invalidate.
func (q *qp) execLocal(w *swqe) {
	w.done, w.status = true, verbs.StatusSuccess
	switch w.op {
	case verbs.OpBindMW:
		if !q.dev.bindMW(q, &w.bind) {
			w.status = verbs.StatusMWBind
		}
	case verbs.OpLocalInv:
		if !q.dev.invalidate(q, w.invRKey, false) {
			w.status = verbs.StatusLocalQPOp
		}
	}
}

// recvHead returns the oldest posted receive, or nil (also while receives
// are withheld by fault injection).
func (q *qp) recvHead() *rwqe {
	if q.withhold || q.rqHead == q.rqTail {
		return nil
	}
	return q.rslot(q.rqHead)
}

// popRecv completes the oldest receive.
func (q *qp) popRecv(wc verbs.Completion, solicited bool) {
	r := q.rslot(q.rqHead)
	q.rqHead++
	wc.ID, wc.QPN = r.id, q.num
	q.complete(q.rcq, wc, solicited)
	q.checkLost()
}

func (q *qp) ack(psn uint32) {
	if n := len(q.resps); n > 0 && q.resps[n-1].typ == frameAck {
		q.resps[n-1].psn = psn
		return
	}
	q.resps = append(q.resps, resp{typ: frameAck, psn: psn})
}

func (q *qp) nak(psn uint32, code uint8) {
	r := resp{typ: frameNak, psn: psn, code: code}
	if code == nakRNR {
		r.timer = uint32(q.minRNR / time.Microsecond)
		q.rnrDrop = true
		q.dev.stats.rnrNaksSent.Add(1)
	}
	q.resps = append(q.resps, r)
	q.c.kickWriter()
}

// recvFail completes the oldest receive with st, NAKs the request and moves
// the QP to the error state.
func (q *qp) recvFail(st verbs.Status, code uint8, psn uint32) {
	q.popRecv(verbs.Completion{Status: st, Op: verbs.CompRecv}, false)
	q.nak(psn, code)
	q.toError(0, nil)
}

// accessError refuses a remote access (IBA 9.7.5.2.4): NAK to the requester,
// error state and EventQPAccessError here, no completion.
func (q *qp) accessError(h header, n uint64) {
	q.dev.stats.accessErrors.Add(1)
	q.nak(h.psn, nakAccess)
	q.toError(verbs.EventQPAccessError,
		fmt.Errorf("soft: peer's %v of %d bytes at %#x with rkey %#x refused", h.typ, n, h.addr, h.rkey))
}

type scatterResult uint8

const (
	scatterOK      scatterResult = iota
	scatterAborted               // the QP was flushed, reset or closed meanwhile
	scatterDstGone               // a destination region was deregistered
	scatterSrcGone               // the in-process peer's source region was deregistered
)

// scatter copies n payload bytes into segs chunk by chunk. It waits for the
// wire without c.mu and copies each chunk under c.mu after checking that q
// is still live, so nothing is written into a buffer whose WR has already
// completed. segs is the reader's scratch.
func (c *conn) scatter(q *qp, segs []segment, p payload, n uint64, wrid uint64, rkey uint32, remote bool) (scatterResult, error) {
	si, so := 0, uint64(0)
	for n > 0 {
		ch, err := p.peek(chunkSize)
		if err != nil {
			return 0, err
		}
		if ch.n == 0 {
			return 0, io.ErrUnexpectedEOF
		}
		c.mu.Lock()
		if c.qp != q || q.state == verbs.QPError || q.state == verbs.QPReset {
			c.mu.Unlock()
			return scatterAborted, nil
		}
		q.lastProgress = c.dev.clock.Now()
		for done := 0; done < ch.n; {
			for si < len(segs) && segs[si].n == so {
				si, so = si+1, 0
			}
			if si == len(segs) {
				c.mu.Unlock()
				return 0, errScatterOverrun
			}
			s := segs[si]
			k := min(uint64(ch.n-done), s.n-so)
			sub := ch
			if sub.src == nil {
				sub.b = ch.b[done : done+int(k)]
			} else {
				sub.off += uint64(done)
			}
			sub.n = int(k)
			srcOK, dstOK := sub.copyTo(s.m, s.off+so)
			if !dstOK || !srcOK {
				c.mu.Unlock()
				if !dstOK {
					return scatterDstGone, nil
				}
				return scatterSrcGone, nil
			}
			s.m.nwritten.Add(k)
			key := s.m.key
			if remote {
				key = rkey
			}
			c.dev.touch(Touch{QPN: q.num, WRID: wrid, Key: key, Addr: s.m.base + s.off + so, Len: k, Write: true, Remote: remote})
			so += k
			done += int(k)
		}
		c.mu.Unlock()
		p.advance(ch.n)
		n -= uint64(ch.n)
	}
	return scatterOK, nil
}

var errScatterOverrun = fmt.Errorf("%w: payload longer than its destination", verbs.ErrProtocol)

var errSourceRegion = fmt.Errorf("%w: the peer deregistered memory of a request in flight", verbs.ErrProtocol)

// request serves a SEND, WRITE or READ request from the peer.
func (c *conn) request(h header, p payload) error {
	c.mu.Lock()
	q, drop, err := c.dataPhase(h.typ)
	if err != nil || drop {
		c.mu.Unlock()
		return err
	}
	if h.psn != q.epsn {
		if q.rnrDrop && h.psn-q.epsn < uint32(c.peerDepth) {
			c.mu.Unlock() // sent before our RNR NAK reached the peer
			return nil
		}
		c.mu.Unlock()
		return frameErr(h.typ, "psn %d, expected %d", h.psn, q.epsn)
	}
	q.rnrDrop = false
	if len(q.resps) >= q.maxResps {
		c.mu.Unlock()
		return frameErr(h.typ, "more than %d requests unanswered", q.maxResps)
	}
	n := uint64(h.length)
	var wrid uint64
	switch h.typ {
	case frameReadReq:
		n = uint64(h.dmaLen)
		var seg segment
		if n > 0 {
			var ok bool
			if seg, ok = c.dev.remoteSeg(q, h.rkey, h.addr, n, verbs.AccessRemoteRead); !ok {
				q.accessError(h, n)
				c.mu.Unlock()
				return nil
			}
			c.dev.touch(Touch{QPN: q.num, Key: h.rkey, Addr: h.addr, Len: n, Remote: true})
		}
		q.resps = append(q.resps, resp{typ: frameReadResp, psn: h.psn, seg: seg})
		q.epsn++
		c.kickWriter()
		c.mu.Unlock()
		return nil
	case frameSend:
		r := q.recvHead()
		if r == nil {
			q.nak(h.psn, nakRNR)
			c.mu.Unlock()
			return nil
		}
		wrid = r.id
		c.rsegs = c.rsegs[:0]
		var total uint64
		for _, s := range r.sgl {
			if s.Length == 0 {
				continue
			}
			seg, ok := c.dev.localSeg(q.pd, s, true)
			if !ok {
				q.recvFail(verbs.StatusLocalProtection, nakRemoteOp, h.psn)
				c.mu.Unlock()
				return nil
			}
			c.rsegs = append(c.rsegs, seg)
			total += seg.n
		}
		if n > total {
			q.recvFail(verbs.StatusLocalLength, nakInvalidReq, h.psn)
			c.mu.Unlock()
			return nil
		}
	case frameWrite:
		if h.flags&flagImm != 0 {
			r := q.recvHead()
			if r == nil {
				q.nak(h.psn, nakRNR)
				c.mu.Unlock()
				return nil
			}
			wrid = r.id
		}
		c.rsegs = c.rsegs[:0]
		if n > 0 {
			seg, ok := c.dev.remoteSeg(q, h.rkey, h.addr, n, verbs.AccessRemoteWrite)
			if !ok {
				q.accessError(h, n)
				c.mu.Unlock()
				return nil
			}
			c.rsegs = append(c.rsegs, seg)
		}
	}
	c.mu.Unlock()

	remote := h.typ == frameWrite
	res, err := c.scatter(q, c.rsegs, p, n, wrid, h.rkey, remote)
	if err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.qp != q || q.state == verbs.QPError || q.state == verbs.QPReset {
		return nil
	}
	switch res {
	case scatterAborted:
		return nil
	case scatterSrcGone:
		return errSourceRegion
	case scatterDstGone:
		if remote {
			q.accessError(h, n)
		} else {
			q.recvFail(verbs.StatusLocalProtection, nakRemoteOp, h.psn)
		}
		return nil
	}
	solicited := h.flags&flagSolicited != 0
	switch {
	case h.typ == frameSend:
		wc := verbs.Completion{Status: verbs.StatusSuccess, Op: verbs.CompRecv, ByteLen: uint32(n)}
		if h.flags&flagImm != 0 {
			wc.Flags, wc.Imm = verbs.WithImm, h.imm
		}
		if h.flags&flagInv != 0 {
			if !c.dev.invalidate(q, h.imm, true) {
				q.recvFail(verbs.StatusLocalAccess, nakInvalidReq, h.psn)
				return nil
			}
			wc.Flags, wc.InvalidatedRKey = verbs.WithInv, h.imm
		}
		q.popRecv(wc, solicited)
	case h.flags&flagImm != 0:
		q.popRecv(verbs.Completion{Status: verbs.StatusSuccess, Op: verbs.CompRecvWriteImm, Flags: verbs.WithImm, Imm: h.imm, ByteLen: uint32(n)}, solicited)
	}
	q.epsn++
	q.ack(h.psn)
	c.kickWriter()
	return nil
}

// response handles an answer to one of our requests.
func (c *conn) response(h header, p payload) error {
	c.mu.Lock()
	q, drop, err := c.dataPhase(h.typ)
	if err != nil || drop {
		c.mu.Unlock()
		return err
	}
	w := q.firstUnacked()
	if w == nil {
		c.mu.Unlock()
		return frameErr(h.typ, "psn %d: no request outstanding", h.psn)
	}
	q.lastProgress = c.dev.clock.Now()
	switch h.typ {
	case frameAck:
		if h.psn-w.psn >= q.txPSN-w.psn {
			c.mu.Unlock()
			return frameErr(h.typ, "psn %d outside [%d, %d)", h.psn, w.psn, q.txPSN)
		}
		for i := q.acked; i != q.sent; i++ {
			x := q.slot(i)
			if x.done {
				continue
			}
			if x.psn-w.psn > h.psn-w.psn {
				break
			}
			if x.op == verbs.OpRead {
				c.mu.Unlock()
				return frameErr(h.typ, "psn %d passes RDMA READ %d without its response", h.psn, x.psn)
			}
			x.done, x.status = true, verbs.StatusSuccess
			q.inflight--
		}
		q.progress()
		c.mu.Unlock()
		return nil
	case frameNak:
		if h.psn != w.psn {
			c.mu.Unlock()
			return frameErr(h.typ, "psn %d, oldest outstanding %d", h.psn, w.psn)
		}
		switch h.code {
		case nakRNR:
			q.rnr(w, time.Duration(h.dmaLen)*time.Microsecond)
		case nakAccess:
			w.status = verbs.StatusRemoteAccess
		case nakInvalidReq:
			w.status = verbs.StatusRemoteInvalidReq
		default:
			w.status = verbs.StatusRemoteOp
		}
		if h.code != nakRNR {
			w.done = true
			q.inflight--
			q.toError(0, nil)
		}
		c.mu.Unlock()
		return nil
	}
	// READ response
	if h.psn != w.psn || w.op != verbs.OpRead || uint64(h.length) != w.length {
		c.mu.Unlock()
		return frameErr(h.typ, "psn %d length %d does not answer the oldest request", h.psn, h.length)
	}
	c.rsegs = append(c.rsegs[:0], w.rsegs...)
	wrid := w.id
	c.mu.Unlock()
	res, err := c.scatter(q, c.rsegs, p, uint64(h.length), wrid, 0, false)
	if err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.qp != q || q.state == verbs.QPError || q.state == verbs.QPReset {
		return nil
	}
	switch res {
	case scatterAborted:
		return nil
	case scatterSrcGone:
		w.done, w.status = true, verbs.StatusRemoteOp
		q.inflight--
		q.toError(0, nil)
		return nil
	case scatterDstGone:
		w.done, w.status = true, verbs.StatusLocalProtection
		q.inflight--
		q.toError(0, nil)
		return nil
	}
	w.done, w.status = true, verbs.StatusSuccess
	q.inflight--
	q.progress()
	return nil
}

// rnr handles an RNR NAK for w, the oldest outstanding request.
func (q *qp) rnr(w *swqe, timer time.Duration) {
	q.dev.stats.rnrNaksRecv.Add(1)
	if q.rnrRetry == 0 || (q.rnrRetry < 7 && w.rnrTries >= q.rnrRetry) {
		w.done, w.status = true, verbs.StatusRNRRetryExceeded
		q.inflight--
		q.toError(0, nil)
		return
	}
	if w.rnrTries < 255 {
		w.rnrTries++
	}
	q.sent = q.acked
	q.txPSN = w.psn
	q.inflight = 0
	q.rnrWait = true
	q.rnrGen++
	gen := q.rnrGen
	c := q.c
	q.rnrTimer = q.dev.clock.AfterFunc(timer, func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if q.rnrGen == gen && !q.closed {
			q.rnrWait = false
			q.rnrTimer = nil
			c.kickWriter()
		}
	})
}
