package soft

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vsdp/vsdp/verbs"
)

type connState uint8

const (
	csIdle          connState = iota // active: resolved, not connecting yet
	csRequested                      // passive: REQ received, the consumer decides
	csConnecting                     // active: REQ sent; passive: REP sent
	csEstablished                    // data may flow
	csDisconnecting                  // DREQ sent, waiting for the DREP
	csDisconnected                   // rejected, disconnected, timed out or link lost
)

var (
	errDisconnectTimeout = errors.New("soft: no DREP before the disconnect timeout")
	errLinkDropped       = errors.New("soft: link dropped by fault injection")
	errInjected          = errors.New("soft: QP error forced by fault injection")
)

// conn is one connection manager identifier and its link. One mutex, mu,
// guards the connection and its queue pair (the QP's engine state lives in
// qp but is protected by its conn's mu). Two goroutines serve an open link:
// the reader (the only one that consumes frames) and the writer (the only
// one that sends them). Neither holds mu while waiting on the link.
type conn struct {
	dev      *Device
	active   bool
	local    netip.Addr
	remote   netip.Addr
	sid      verbs.ServiceID
	endpoint Endpoint
	kick     chan struct{}
	events   chan verbs.Event

	mu              sync.Mutex
	state           connState
	l               link
	down            chan struct{} // closed when the link is stopped
	linkStopped     bool
	qp              *qp
	qpCreated       bool
	priv            []byte // the peer's private data
	peerDepth       int
	ctrlPre         []outFrame // REQ, REP, RTU: sent before data
	ctrlPost        []outFrame // DREQ, DREP, REJ: sent after data
	closeAfterFlush bool
	delay           time.Duration
	hsDone          chan struct{}
	hsFinished      bool
	hsErr           error
	discTimer       Timer
	evSent          uint16
	owned           bool // handed to the consumer, counted in Resources
	closed          bool
	aborted         bool // passive request withdrawn before the consumer saw it

	wg sync.WaitGroup

	// ioAt is when the writer last got bytes onto the link (UnixNano): a
	// large transfer that is still moving is progress for the ack timeout.
	ioAt atomic.Int64

	// Writer-goroutine scratch: the payload descriptions of one batch.
	wsegs []segment
	wdata []byte
	// Reader-goroutine scratch: the segments being scattered into.
	rsegs []segment
}

var _ verbs.Conn = (*conn)(nil)

func newConn(d *Device, active bool) *conn {
	return &conn{
		dev:    d,
		active: active,
		kick:   make(chan struct{}, 1),
		events: make(chan verbs.Event, verbs.EventQueueLen),
		hsDone: make(chan struct{}),
	}
}

func (c *conn) kickWriter() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

// emit delivers an event; the caller holds mu. Each type goes out at most
// once (SQ_DRAINED whenever there is room), so the buffered channel never
// blocks.
func (c *conn) emit(t verbs.EventType, err error) {
	if c.closed {
		return
	}
	if t != verbs.EventSQDrained {
		if c.evSent&(1<<t) != 0 {
			return
		}
		c.evSent |= 1 << t
	}
	var qpn uint32
	if c.qp != nil {
		qpn = c.qp.num
	}
	select {
	case c.events <- verbs.Event{Type: t, QPN: qpn, Err: err}:
	default:
	}
}

func (c *conn) finishHandshake(err error) {
	if c.hsFinished {
		return
	}
	c.hsFinished = true
	c.hsErr = err
	close(c.hsDone)
}

// startLink attaches l and starts the reader and writer; the caller holds mu.
func (c *conn) startLink(l link) {
	if sl, ok := l.(*streamLink); ok {
		sl.progress = func() { c.ioAt.Store(c.dev.clock.Now().UnixNano()) }
	}
	c.l = l
	c.down = make(chan struct{})
	c.wg.Add(2)
	go c.readLoop()
	go c.writeLoop()
}

// stopLink stops the link once; the caller holds mu. A graceful stop lets
// frames already handed to the link arrive; an abrupt one drops them.
func (c *conn) stopLink(abrupt bool) {
	if c.l == nil || c.linkStopped {
		return
	}
	c.linkStopped = true
	close(c.down)
	if abrupt {
		c.l.abort()
	} else {
		c.l.close()
	}
}

// ---- consumer API ----

func (c *conn) QP() verbs.QP {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.qp == nil {
		return nil
	}
	return c.qp
}

func (c *conn) PrivateData() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]byte(nil), c.priv...)
}

func (c *conn) LocalAddr() netip.Addr      { return c.local }
func (c *conn) RemoteAddr() netip.Addr     { return c.remote }
func (c *conn) ServiceID() verbs.ServiceID { return c.sid }
func (c *conn) Events() <-chan verbs.Event { return c.events }

func (c *conn) CreateQP(p verbs.PD, o verbs.QPOptions) (verbs.QP, error) {
	return c.createQP(p, o)
}

// handshakeContext applies the default timeout when ctx has no deadline.
func (c *conn) handshakeContext(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, c.dev.opts.ConnectTimeout)
}

func (c *conn) Connect(ctx context.Context, p verbs.ConnParam) ([]byte, error) {
	if err := p.Validate(); err != nil {
		return nil, err
	}
	if err := (verbs.PrivateDataLimits{Req: verbs.IBReqPrivateData}).Check("REQ", len(p.PrivateData)); err != nil {
		return nil, err
	}
	c.mu.Lock()
	switch {
	case c.closed:
		c.mu.Unlock()
		return nil, verbs.ErrClosed
	case !c.active:
		c.mu.Unlock()
		return nil, fmt.Errorf("%w: Connect on a passive connection", verbs.ErrInvalid)
	case c.state != csIdle:
		c.mu.Unlock()
		return nil, fmt.Errorf("%w: Connect called twice", verbs.ErrInvalid)
	case c.qp == nil:
		c.mu.Unlock()
		return nil, fmt.Errorf("%w: create the queue pair before Connect", verbs.ErrInvalid)
	}
	q := c.qp
	q.rnrRetry = p.RNRRetry
	c.state = csConnecting
	c.mu.Unlock()

	ctx, cancel := c.handshakeContext(ctx)
	defer cancel()
	l, err := c.dev.dial(ctx, c.endpoint)
	if err != nil {
		c.mu.Lock()
		c.state = csDisconnected
		c.mu.Unlock()
		if errors.Is(err, verbs.ErrUnreachable) {
			return nil, &verbs.AddrError{Addr: c.remote, Err: err}
		}
		return nil, err
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		l.abort()
		return nil, verbs.ErrClosed
	}
	c.startLink(l)
	c.ctrlPre = append(c.ctrlPre, outFrame{
		h: header{
			typ:    frameREQ,
			length: uint32(len(p.PrivateData)),
			addr:   uint64(c.sid),
			imm:    ipv4(c.local),
			rkey:   ipv4(c.remote),
			psn:    q.num,
			dmaLen: uint32(q.caps.MaxSendWR),
		},
		data: append([]byte(nil), p.PrivateData...),
	})
	c.kickWriter()
	c.mu.Unlock()
	return c.awaitHandshake(ctx, true)
}

// awaitHandshake waits for the handshake's end; on timeout it abandons the
// connection (the peer sees the link close).
func (c *conn) awaitHandshake(ctx context.Context, wantRep bool) ([]byte, error) {
	select {
	case <-c.hsDone:
	case <-ctx.Done():
		c.mu.Lock()
		if !c.hsFinished {
			c.state = csDisconnected
			c.finishHandshake(fmt.Errorf("%w: %w", verbs.ErrTimeout, ctx.Err()))
			c.stopLink(true)
		}
		c.mu.Unlock()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.hsErr != nil {
		return nil, c.hsErr
	}
	if wantRep {
		return append([]byte(nil), c.priv...), nil
	}
	return nil, nil
}

func (c *conn) Accept(ctx context.Context, p verbs.ConnParam) error {
	if err := p.Validate(); err != nil {
		return err
	}
	if err := (verbs.PrivateDataLimits{Rep: verbs.IBRepPrivateData}).Check("REP", len(p.PrivateData)); err != nil {
		return err
	}
	c.mu.Lock()
	switch {
	case c.closed:
		c.mu.Unlock()
		return verbs.ErrClosed
	case c.active:
		c.mu.Unlock()
		return fmt.Errorf("%w: Accept on an active connection", verbs.ErrInvalid)
	case c.state == csDisconnected:
		c.mu.Unlock()
		return fmt.Errorf("%w: the peer withdrew the request", verbs.ErrDisconnected)
	case c.state != csRequested:
		c.mu.Unlock()
		return fmt.Errorf("%w: Accept called twice", verbs.ErrInvalid)
	case c.qp == nil:
		c.mu.Unlock()
		return fmt.Errorf("%w: create the queue pair before Accept", verbs.ErrInvalid)
	}
	q := c.qp
	q.rnrRetry = p.RNRRetry
	q.connected(c.peerDepth)
	c.ctrlPre = append(c.ctrlPre, outFrame{
		h:    header{typ: frameREP, length: uint32(len(p.PrivateData)), psn: q.num, dmaLen: uint32(q.caps.MaxSendWR)},
		data: append([]byte(nil), p.PrivateData...),
	})
	c.state = csConnecting
	c.kickWriter()
	c.mu.Unlock()
	ctx, cancel := c.handshakeContext(ctx)
	defer cancel()
	_, err := c.awaitHandshake(ctx, false)
	return err
}

func (c *conn) Reject(priv []byte) error {
	if err := (verbs.PrivateDataLimits{Rej: verbs.IBRejPrivateData}).Check("REJ", len(priv)); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.closed:
		return verbs.ErrClosed
	case c.active:
		return fmt.Errorf("%w: Reject on an active connection", verbs.ErrInvalid)
	case c.state == csDisconnected:
		return nil // the peer is gone already
	case c.state != csRequested:
		return fmt.Errorf("%w: Reject after Accept", verbs.ErrInvalid)
	}
	c.ctrlPost = append(c.ctrlPost, outFrame{
		h:    header{typ: frameREJ, length: uint32(len(priv)), imm: uint32(verbs.RejectConsumer)},
		data: append([]byte(nil), priv...),
	})
	c.closeAfterFlush = true
	c.state = csDisconnected
	c.finishHandshake(verbs.ErrRefused)
	c.kickWriter()
	return nil
}

func (c *conn) Disconnect() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return verbs.ErrClosed
	}
	switch c.state {
	case csEstablished:
		if c.qp != nil {
			c.qp.toError(0, nil)
		}
		c.ctrlPost = append(c.ctrlPost, outFrame{h: header{typ: frameDREQ}})
		c.state = csDisconnecting
		c.discTimer = c.dev.clock.AfterFunc(c.dev.opts.DisconnectTimeout, func() {
			c.mu.Lock()
			defer c.mu.Unlock()
			if c.state == csDisconnecting {
				c.finishDisconnect(errDisconnectTimeout)
			}
		})
		c.kickWriter()
	case csRequested:
		c.ctrlPost = append(c.ctrlPost, outFrame{h: header{typ: frameREJ, imm: uint32(verbs.RejectConsumer)}})
		c.closeAfterFlush = true
		c.state = csDisconnected
		c.finishHandshake(verbs.ErrDisconnected)
		c.kickWriter()
	case csIdle, csConnecting:
		c.state = csDisconnected
		c.finishHandshake(verbs.ErrDisconnected)
		if c.qp != nil {
			c.qp.toError(0, nil)
		}
		c.stopLink(true)
	}
	return nil
}

// finishDisconnect ends a connection that was established: the caller holds
// mu.
func (c *conn) finishDisconnect(cause error) {
	c.state = csDisconnected
	if c.discTimer != nil {
		c.discTimer.Stop()
		c.discTimer = nil
	}
	if c.qp != nil {
		c.qp.toError(0, nil)
	}
	c.emit(verbs.EventDisconnected, cause)
	c.stopLink(false)
}

// withdrawn reports whether a pending request's peer went away.
func (c *conn) withdrawn() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.aborted || c.state != csRequested
}

func (c *conn) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	if c.qp != nil {
		c.mu.Unlock()
		return &verbs.BusyError{Object: "conn", Children: "its queue pair"}
	}
	c.mu.Unlock()
	c.destroy()
	d := c.dev
	d.mu.Lock()
	if c.owned {
		c.owned = false
		d.res.Conns--
	}
	d.mu.Unlock()
	return nil
}

// destroy flushes what the writer still has to send (a REJ, a DREP) within
// the disconnect timeout, stops the link and its goroutines and closes the
// event channel.
func (c *conn) destroy() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	if c.state != csDisconnected {
		c.state = csDisconnected
		c.finishHandshake(verbs.ErrClosed)
	}
	if c.discTimer != nil {
		c.discTimer.Stop()
		c.discTimer = nil
	}
	if c.l != nil && !c.linkStopped {
		if len(c.ctrlPost)+len(c.ctrlPre) > 0 || c.closeAfterFlush {
			c.closeAfterFlush = true
			c.kickWriter()
			down := c.down
			c.mu.Unlock()
			t := c.dev.clock.AfterFunc(c.dev.opts.DisconnectTimeout, func() {
				c.mu.Lock()
				c.stopLink(true)
				c.mu.Unlock()
			})
			<-down
			t.Stop()
			c.mu.Lock()
		}
		c.stopLink(false)
	}
	c.closed = true
	c.mu.Unlock()
	c.wg.Wait()
	c.mu.Lock()
	close(c.events)
	c.mu.Unlock()
}

// ---- link goroutines ----

func (c *conn) writeLoop() {
	defer c.wg.Done()
	var batch []outFrame
	for {
		select {
		case <-c.kick:
		case <-c.down:
			return
		}
		for {
			c.mu.Lock()
			if c.linkStopped {
				c.mu.Unlock()
				return
			}
			c.wsegs, c.wdata = c.wsegs[:0], c.wdata[:0]
			batch = append(batch[:0], c.ctrlPre...)
			clear(c.ctrlPre)
			c.ctrlPre = c.ctrlPre[:0]
			if q := c.qp; q != nil {
				batch = q.collect(batch)
			}
			batch = append(batch, c.ctrlPost...)
			clear(c.ctrlPost)
			c.ctrlPost = c.ctrlPost[:0]
			closing := c.closeAfterFlush
			delay := c.delay
			down := c.down
			c.mu.Unlock()
			if len(batch) == 0 {
				if closing {
					c.mu.Lock()
					c.stopLink(false)
					c.mu.Unlock()
					return
				}
				break
			}
			if delay > 0 {
				t := time.NewTimer(delay)
				select {
				case <-t.C:
				case <-down:
					t.Stop()
					return
				}
			}
			err := c.l.send(batch)
			c.ioAt.Store(c.dev.clock.Now().UnixNano())
			c.dev.stats.framesOut.Add(uint64(len(batch)))
			clear(batch)
			if err != nil {
				c.linkDown(err)
				return
			}
		}
	}
}

func (c *conn) readLoop() {
	defer c.wg.Done()
	for {
		h, p, err := c.l.recv()
		if err != nil {
			var fe *FrameError
			if errors.As(err, &fe) {
				c.protocolError(err)
			} else {
				c.linkDown(err)
			}
			return
		}
		c.dev.stats.framesIn.Add(1)
		if err := c.handle(h, p); err != nil {
			var fe *FrameError
			if errors.As(err, &fe) || errors.Is(err, verbs.ErrProtocol) {
				c.protocolError(err)
			} else {
				c.linkDown(err)
			}
			return
		}
		if p.remaining() > 0 {
			if err := p.discard(); err != nil {
				c.linkDown(err)
				return
			}
		}
	}
}

// linkDown handles the loss of the link: what was in flight fails with
// RETRY_EXC_ERR (as when an HCA's retries run out), receives flush, and the
// consumer gets EventDisconnected.
func (c *conn) linkDown(cause error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.linkStopped && c.state == csDisconnected {
		return
	}
	if cause == io.EOF {
		cause = fmt.Errorf("%w: link closed by the peer", verbs.ErrDisconnected)
	} else {
		cause = fmt.Errorf("%w: %w", verbs.ErrDisconnected, cause)
	}
	c.fail(verbs.StatusRetryExceeded, 0, cause)
	c.stopLink(true)
}

// protocolError resets a connection whose peer broke the protocol: the
// oldest outstanding request fails with BAD_RESP_ERR, everything else
// flushes, and the consumer gets EventQPRequestError and EventDisconnected
// carrying the reason.
func (c *conn) protocolError(cause error) {
	c.dev.stats.protocolErrors.Add(1)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.linkStopped && c.state == csDisconnected {
		return
	}
	c.fail(verbs.StatusBadResponse, verbs.EventQPRequestError, cause)
	c.stopLink(true)
}

// fail ends the connection in whatever state it is; the caller holds mu.
func (c *conn) fail(st verbs.Status, ev verbs.EventType, cause error) {
	switch c.state {
	case csIdle, csConnecting:
		if !c.hsFinished {
			err := fmt.Errorf("%w: %w", verbs.ErrTimeout, cause)
			if errors.Is(cause, verbs.ErrProtocol) {
				err = cause
			}
			c.finishHandshake(err)
		}
		if c.qp != nil {
			c.qp.failOldest(st)
			c.qp.toError(ev, cause)
		}
	case csRequested:
		c.aborted = true
		c.finishHandshake(cause)
	case csEstablished, csDisconnecting:
		if c.qp != nil {
			c.qp.failOldest(st)
			c.qp.toError(ev, cause)
		} else if ev != 0 {
			c.emit(ev, cause)
		}
		c.emit(verbs.EventDisconnected, cause)
	}
	c.state = csDisconnected
	if c.discTimer != nil {
		c.discTimer.Stop()
		c.discTimer = nil
	}
}

// handle processes one frame. An error is a protocol violation (or a link
// failure while reading the payload).
func (c *conn) handle(h header, p payload) error {
	switch {
	case h.typ.isRequest():
		return c.request(h, p)
	case h.typ.isResponse():
		return c.response(h, p)
	}
	// Private data is read before taking mu: the peer may stall mid-frame.
	var priv []byte
	if h.typ == frameREP || h.typ == frameREJ {
		var err error
		if priv, err = readPayload(p, verbs.IBRepPrivateData); err != nil {
			return err
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	switch h.typ {
	case frameREP:
		if !c.active || c.state != csConnecting || c.hsFinished {
			return frameErr(h.typ, "unexpected")
		}
		c.priv = priv
		c.peerDepth = int(h.dmaLen)
		if c.qp != nil {
			c.qp.connected(c.peerDepth)
		}
		c.ctrlPre = append(c.ctrlPre, outFrame{h: header{typ: frameRTU}})
		c.state = csEstablished
		c.emit(verbs.EventEstablished, nil)
		c.finishHandshake(nil)
		c.kickWriter()
	case frameREJ:
		if !c.active || c.state != csConnecting || c.hsFinished {
			return frameErr(h.typ, "unexpected")
		}
		c.state = csDisconnected
		c.finishHandshake(&verbs.RejectError{Reason: verbs.RejectReason(h.imm), PrivateData: priv})
		if c.qp != nil {
			c.qp.toError(0, nil)
		}
		c.stopLink(false)
	case frameRTU:
		if c.active || c.state != csConnecting {
			return frameErr(h.typ, "unexpected")
		}
		c.state = csEstablished
		c.emit(verbs.EventEstablished, nil)
		c.finishHandshake(nil)
		c.kickWriter()
	case frameDREQ:
		switch c.state {
		case csEstablished, csDisconnecting:
			c.ctrlPost = append(c.ctrlPost, outFrame{h: header{typ: frameDREP}})
			c.closeAfterFlush = true
			c.state = csDisconnected
			if c.discTimer != nil {
				c.discTimer.Stop()
				c.discTimer = nil
			}
			if c.qp != nil {
				c.qp.toError(0, nil)
			}
			c.emit(verbs.EventDisconnected, nil)
			c.kickWriter()
		default:
			return frameErr(h.typ, "unexpected")
		}
	case frameDREP:
		if c.state != csDisconnecting {
			return frameErr(h.typ, "unexpected")
		}
		c.finishDisconnect(nil)
	default:
		return frameErr(h.typ, "unexpected")
	}
	return nil
}

// dataPhase checks the connection state for a request or response; the
// caller holds mu. drop means: ignore the frame (the connection is closing).
func (c *conn) dataPhase(t frameType) (q *qp, drop bool, err error) {
	switch c.state {
	case csEstablished:
	case csDisconnecting, csDisconnected:
		return nil, true, nil
	default:
		return nil, false, frameErr(t, "data before the connection is established")
	}
	q = c.qp
	if q == nil || q.state == verbs.QPError || q.state == verbs.QPReset {
		return nil, true, nil
	}
	return q, false, nil
}
