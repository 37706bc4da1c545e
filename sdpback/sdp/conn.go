package sdp

// SDP connection primer (ref/sdp-protocol.md §1, §3–§4):
//
// Every message is one IB SEND into one of the peer's pre-posted receive
// buffers, starting with a 16-byte BSDH {mid, flags, bufs, len, mseq,
// mseq_ack}. bufs is the sender's count of posted receives; with mseq_ack
// (the last mseq it received) it gives the receiver its credits:
//
//	credits = mseq_ack − next_mseq + 1 + bufs        (gen2's formula, ref §4.1)
//
// One message costs one credit whatever it carries. Reserve rule (CA4-82):
// payload needs > 2 credits, a payload-free control message 2, a pure
// credit update (Data with no payload) 1 — so a credit update can always
// go out and two full directions cannot deadlock. Hello/HelloAck carry
// mseq 0; the first stream message is mseq 1; mseqs are checked in order.
//
// Close (ref §3.4): the first closer sends DisConn (in order after its
// data) and waits; the peer's reader sees EOF, its close sends DisConn;
// the first closer, on receiving it, disconnects the CM (DREQ). Close with
// unread data, linger 0, a timeout, or any error completion other than a
// flush is abortive: the CM is disconnected at once and the peer sees
// ECONNRESET.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/vsdp/vsdp/sdpback/wire"
	"github.com/vsdp/vsdp/verbs"
)

type state uint8

const (
	stEstablished state = iota
	stFinWait1          // our DisConn queued or sent; waiting for the peer's
	stCloseWait         // the peer's DisConn arrived; ours not yet sent
	stLastAck           // both DisConns sent, the peer's first: waiting for its disconnect
	stTimeWait          // both DisConns seen; CM disconnect issued
	stReset             // aborted or failed
)

var stateNames = [...]string{"ESTABLISHED", "FIN_WAIT1", "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT", "RESET"}

func (s state) String() string { return stateNames[s] }

// Work request IDs: the top byte says what the WR is, the rest indexes a
// slot.
const (
	wrRecv   = 1 << 56
	wrData   = 2 << 56 // a data slot (BCopy from the connection's send buffers)
	wrCtl    = 3 << 56 // a control slot (header-only message or gather header)
	wrKeep   = 4 << 56 // keepalive write
	wrKind   = 0xff << 56
	wrIndex  = 1<<56 - 1
	pollSize = 32
)

// rxSeg is received payload not yet read: bytes [off, end) of receive slot.
type rxSeg struct {
	slot     int
	off, end int
}

// txMsg is a message waiting for credits.
type txMsg struct {
	mid   wire.MID
	slot  int // data slot (wrData) or control slot (wrCtl)
	ctl   bool
	n     int          // payload bytes
	sgl   []verbs.SGE  // gather payload (ctl slot holds the header)
	done  func(error)  // gather completion
	bytes uint32       // RdmaRdCompl etc.
	size  uint32       // ChRcvBufAck
	flags wire.Flags   // OOB
	ext   wire.Message // extended-header fields for control messages
}

// ConnStats are a connection's counters.
type ConnStats struct {
	MsgsSent, MsgsRecv   uint64
	BytesSent, BytesRecv uint64 // payload
	CreditUpdates        uint64 // payload-free Data messages sent
	CopiedBytes          uint64 // payload copied by the engine (Write into send buffers)
	ReadCopiedBytes      uint64 // payload copied out of receive buffers (Read, ReadTo)
	GatherBytes          uint64 // payload sent straight from caller memory
	SendSMs              uint64 // SrcAvails answered with SendSM
	// Overdrafts counts messages built without a credit: always zero
	// unless the credit accounting is wrong (the fuzz target checks it).
	Overdrafts uint64
}

// Conn is one SDP stream. It implements net.Conn with half close
// (CloseWrite), and a lower-level event-driven API (SendGather, ReadTo,
// OnReadable, OnWritable) for devices that move guest memory without a
// host copy. Methods are safe for concurrent use.
type Conn struct {
	s      *Stack
	cm     verbs.Conn
	qp     verbs.QP
	cq     verbs.CQ
	local  netip.AddrPort
	remote netip.AddrPort

	set    *bufSet // registered buffers; nil once released (back to the stack)
	rxSize int
	txSize int // bytes per data slot: the peer's receive size, capped by ours

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{} // the completion loop exited and resources are released

	mu           sync.Mutex
	state        state
	err          error // why it was reset
	nextMseq     uint32
	lastRecvMseq uint32
	credits      int
	posted       int
	advBufs      int    // bufs in our last message
	advMseqAck   uint32 // mseq_ack in our last message
	finSlot      int    // control slot carrying our DisConn (-1: not posted)
	finSent      bool   // our DisConn completed
	rxq          []rxSeg
	tail         []byte // unread bytes kept when the peer disconnected after its DisConn
	pipe         bool   // that reset: reads end in EOF, writes fail with EPIPE
	rxBytes      int
	peerFin      bool
	freeData     []int
	freeCtl      []int
	open         int // data slot being filled (-1: none)
	openN        int
	queue        []txMsg
	finQueued    bool
	unacked      bool   // a data message not yet covered by the peer's mseq_ack
	unackedMseq  uint32 // its mseq
	inflight     int    // send WRs posted and not completed
	gathers      map[int]func(error)
	userClosed   bool
	wrClosed     bool
	noDelay      bool
	nagle        Timer
	closeTimer   Timer
	keepTimer    Timer
	active       bool // traffic since the keepalive timer was armed
	rdDeadline   time.Time
	wrDeadline   time.Time
	wake         chan struct{}
	onReadable   func()
	onWritable   func()
	stats        ConnStats
	released     bool
	disconnected bool               // the peer's CM disconnect arrived
	discHandled  bool               // and was decided
	discAt       time.Time          // when the drained CQ first showed the disconnect pending
	rxFlushed    bool               // a receive flushed: nothing more can arrive
	wakeRun      context.CancelFunc // cuts the completion loop's wait short
}

func (c *Conn) lockedBroadcast() {
	close(c.wake)
	c.wake = make(chan struct{})
}

// callbacks returns the event callbacks to run after unlocking.
func (c *Conn) callbacks() (r, w func()) { return c.onReadable, c.onWritable }

// LocalAddr implements net.Conn.
func (c *Conn) LocalAddr() net.Addr { return Addr{c.local} }

// RemoteAddr implements net.Conn.
func (c *Conn) RemoteAddr() net.Addr { return Addr{c.remote} }

// Stats returns the connection's counters.
func (c *Conn) Stats() ConnStats {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stats
}

// State returns the close state (for tests and status files).
func (c *Conn) State() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.state.String()
}

func (c *Conn) rxBuf(slot int) []byte {
	b := c.set.rx.Bytes()
	return b[slot*c.rxSize : (slot+1)*c.rxSize]
}

func (c *Conn) txBuf(slot int) []byte {
	b := c.set.tx.Bytes()
	return b[slot*c.txSize : (slot+1)*c.txSize]
}

func (c *Conn) ctlBuf(slot int) []byte {
	b := c.set.ctl.Bytes()
	return b[slot*ctlSlotSize : (slot+1)*ctlSlotSize]
}

// maxPayload is the most payload one message may carry to the peer.
func (c *Conn) maxPayload() int { return c.txSize - wire.BSDHSize }

// postRecvs posts the given receive slots. Caller holds c.mu (or owns c).
func (c *Conn) postRecvs(slots ...int) error {
	wrs := make([]verbs.RecvWR, len(slots))
	for i, s := range slots {
		wrs[i] = verbs.RecvWR{ID: wrRecv | uint64(s), SGL: []verbs.SGE{{
			Addr: c.set.rxMR.Addr() + uint64(s*c.rxSize), Length: uint32(c.rxSize), LKey: c.set.rxMR.LKey(),
		}}}
	}
	if err := c.qp.PostRecv(wrs); err != nil {
		return err
	}
	c.posted += len(slots)
	return nil
}

// start launches the completion and event loops of an established
// connection.
func (c *Conn) start() {
	go c.run()
	go c.events()
	c.mu.Lock()
	c.armKeepalive()
	c.mu.Unlock()
}

// run polls the CQ until the connection is torn down, then releases
// everything.
func (c *Conn) run() {
	defer c.release()
	wc := make([]verbs.Completion, pollSize)
	for {
		// The wait can be cut short by the events goroutine: a CM
		// disconnect is decided here, after the completions that arrived
		// before it were processed (data and DisConn the peer sent before
		// disconnecting must not be lost to the race between the two).
		wctx, wake := context.WithCancel(c.ctx)
		c.mu.Lock()
		c.wakeRun = wake
		pendingDisc := c.disconnected && !c.discHandled
		c.mu.Unlock()
		var n int
		var err error
		if pendingDisc {
			n, err = c.cq.Poll(wc)
		} else {
			n, err = verbs.PollWait(wctx, c.cq, wc)
		}
		wake()
		if err != nil && c.ctx.Err() == nil && wctx.Err() == nil {
			c.mu.Lock()
			c.resetLocked(fmt.Errorf("completion queue: %w", err))
			c.mu.Unlock()
			return
		}
		if c.ctx.Err() != nil {
			return
		}
		var dones []func()
		c.mu.Lock()
		for _, w := range wc[:n] {
			dones = c.complete(w, dones)
		}
		if n == 0 && c.disconnected && !c.discHandled {
			// The CQ is drained. Messages the peer sent before it
			// disconnected may still be landing (the CM event can overtake
			// a provider's completion): decide once the receive queue has
			// flushed (nothing more can arrive) or a grace period passed.
			if c.discAt.IsZero() {
				c.discAt = time.Now()
			}
			if c.rxFlushed || c.graceful() || time.Since(c.discAt) > disconnectGrace {
				c.onDisconnect()
			} else {
				c.mu.Unlock()
				time.Sleep(time.Millisecond)
				c.mu.Lock()
			}
		}
		c.pump()
		c.lockedBroadcast()
		r, wr := c.callbacks()
		c.mu.Unlock()
		for _, f := range dones {
			f()
		}
		if r != nil {
			r()
		}
		if wr != nil {
			wr()
		}
	}
}

// disconnectGrace bounds the wait for completions that a peer's CM
// disconnect overtook.
const disconnectGrace = 200 * time.Millisecond

// graceful reports whether a disconnect now would end the stream cleanly.
// Caller holds c.mu.
func (c *Conn) graceful() bool {
	return c.state == stLastAck || c.state == stTimeWait || (c.state == stFinWait1 && c.peerFin)
}

// onDisconnect decides what the peer's CM disconnect means, once every
// completion before it was processed. Caller holds c.mu.
func (c *Conn) onDisconnect() {
	c.discHandled = true
	switch {
	case c.state == stLastAck || c.state == stTimeWait:
		c.state = stTimeWait
		c.maybeTeardown()
	case c.state == stFinWait1 && c.peerFin:
		// Both DisConns crossed: the peer got ours (it disconnects only
		// then) and we have its own.
		c.state = stTimeWait
		c.maybeTeardown()
	case c.state == stCloseWait:
		// The peer's DisConn came first, so everything it sent is here;
		// then it stopped waiting for ours (an abortive close after its
		// half close, or its close timer). As TCP after a FIN and then a
		// RST (and gen2, ref §3.5): what it sent stays readable, reads
		// then end in EOF, and writes fail with EPIPE.
		var tail []byte
		for _, seg := range c.rxq {
			tail = append(tail, c.rxBuf(seg.slot)[seg.off:seg.end]...)
		}
		c.resetLocked(fmt.Errorf("%w: peer disconnected after its DisConn", ErrAborted))
		c.tail, c.rxBytes, c.pipe = tail, len(tail), true
	case c.state != stReset:
		c.resetLocked(fmt.Errorf("%w: peer disconnected in %v", ErrAborted, c.state))
	}
}

// events handles connection manager events.
func (c *Conn) events() {
	for {
		select {
		case <-c.ctx.Done():
			return
		case ev, ok := <-c.cm.Events():
			if !ok {
				return
			}
			c.mu.Lock()
			switch ev.Type {
			case verbs.EventDisconnected:
				c.disconnected = true
				if c.wakeRun != nil {
					c.wakeRun() // the completion loop decides, after draining the CQ
				}
			case verbs.EventQPFatal, verbs.EventQPRequestError, verbs.EventQPAccessError, verbs.EventCQError:
				c.resetLocked(fmt.Errorf("%v: %w", ev, ErrAborted))
			}
			r, w := c.callbacks()
			c.mu.Unlock()
			if r != nil {
				r()
			}
			if w != nil {
				w()
			}
		}
	}
}

// complete handles one work completion. Caller holds c.mu.
func (c *Conn) complete(w verbs.Completion, dones []func()) []func() {
	kind, idx := w.ID&wrKind, int(w.ID&wrIndex)
	if kind == wrRecv {
		c.posted--
		if w.Status != verbs.StatusSuccess {
			if w.Status == verbs.StatusFlushed {
				// The queue pair is in the error state: the connection is
				// over, whether or not the CM event has arrived yet. The
				// completion loop decides, as for a disconnect, once
				// everything before the flush was processed.
				c.rxFlushed = true
				c.disconnected = true
				return dones
			}
			c.resetLocked(fmt.Errorf("receive: %w", w.Err()))
			return dones
		}
		if c.state == stReset {
			return dones // later messages of a batch that reset the stream are dropped
		}
		c.active = true
		if err := c.receive(idx, int(w.ByteLen)); err != nil {
			c.resetLocked(err)
		}
		return dones
	}
	c.inflight--
	switch kind {
	case wrData:
		c.freeData = append(c.freeData, idx)
	case wrCtl:
		c.freeCtl = append(c.freeCtl, idx)
		if idx == c.finSlot && w.Status == verbs.StatusSuccess {
			c.finSent = true
			c.finishClose()
		}
		if f, ok := c.gathers[idx]; ok {
			delete(c.gathers, idx)
			err := w.Err()
			dones = append(dones, func() { f(err) })
		}
	}
	if w.Status == verbs.StatusFlushed {
		c.disconnected = true // as for a flushed receive: decided by onDisconnect
	}
	benign := w.Status == verbs.StatusFlushed
	// Once both DisConns are through, the stream is complete both ways: a
	// late send failing as the peer tears down loses nothing.
	benign = benign || (c.peerFin && c.finSent)
	if w.Status != verbs.StatusSuccess && !benign {
		c.resetLocked(fmt.Errorf("send: %w", w.Err()))
	}
	return dones
}

// receive processes the message in receive slot idx. An error resets the
// connection. Caller holds c.mu.
func (c *Conn) receive(idx, n int) error {
	if idx >= c.s.cfg.RecvBufs || n > c.rxSize {
		return fmt.Errorf("%w: receive slot %d with %d bytes", ErrProtocol, idx, n)
	}
	m, err := wire.Decode(c.rxBuf(idx)[:n])
	if err != nil {
		return fmt.Errorf("%w: %w", ErrProtocol, err)
	}
	if m.MSeq != c.lastRecvMseq+1 {
		return fmt.Errorf("%w: mseq %d, expected %d", ErrProtocol, m.MSeq, c.lastRecvMseq+1)
	}
	if d := int32(m.MSeqAck - c.nextMseq); d >= 0 {
		return fmt.Errorf("%w: mseq_ack %d acknowledges messages never sent (next %d)", ErrProtocol, m.MSeqAck, c.nextMseq)
	}
	c.lastRecvMseq = m.MSeq
	c.stats.MsgsRecv++
	c.credits = int(int32(m.MSeqAck-c.nextMseq+1)) + int(m.Bufs)
	if c.unacked && int32(m.MSeqAck-c.unackedMseq) >= 0 {
		c.unacked = false
	}
	keep := false // the slot holds payload for the reader
	switch m.MID {
	case wire.MIDData:
		if len(m.Payload) > 0 {
			if c.peerFin {
				return fmt.Errorf("%w: data after DisConn", ErrProtocol)
			}
			if c.userClosed {
				// Data for a socket nobody will read: TCP resets (RFC 1122).
				return fmt.Errorf("%w: data arrived after close", ErrAborted)
			}
			keep = true
			off := len(c.rxBuf(idx)[:n]) - len(m.Payload)
			c.rxq = append(c.rxq, rxSeg{slot: idx, off: off, end: n})
			c.rxBytes += len(m.Payload)
			c.stats.BytesRecv += uint64(len(m.Payload))
		}
	case wire.MIDDisConn:
		if c.peerFin {
			return fmt.Errorf("%w: second DisConn", ErrProtocol)
		}
		c.peerFin = true
		switch c.state {
		case stEstablished:
			c.state = stCloseWait
		case stFinWait1:
			c.finishClose()
		}
	case wire.MIDSrcAvail:
		// Read zero-copy offered: not taken yet. Keep the inline bytes as
		// stream data and answer SendSM: the source sends the rest by
		// BCopy (ref §5.2). A gen2 source counts inline bytes as delivered.
		if c.peerFin {
			return fmt.Errorf("%w: SrcAvail after DisConn", ErrProtocol)
		}
		if len(m.Payload) > 0 {
			keep = true
			off := n - len(m.Payload)
			c.rxq = append(c.rxq, rxSeg{slot: idx, off: off, end: n})
			c.rxBytes += len(m.Payload)
			c.stats.BytesRecv += uint64(len(m.Payload))
		}
		c.stats.SendSMs++
		c.queue = append(c.queue, txMsg{mid: wire.MIDSendSM, ctl: true, slot: -1})
	case wire.MIDSrcAvailCancel:
		// Our SendSM acknowledges the cancel (ref §5.4).
		c.queue = append(c.queue, txMsg{mid: wire.MIDSendSM, ctl: true, slot: -1})
	case wire.MIDChRcvBuf:
		// We keep our receive size: acknowledge the current one, as gen1
		// does (ref §4.3); sizes exclude the BSDH (ref §10.1).
		c.queue = append(c.queue, txMsg{mid: wire.MIDChRcvBufAck, ctl: true, slot: -1, size: uint32(c.rxSize - wire.BSDHSize)})
	case wire.MIDAbortConn:
		return fmt.Errorf("%w: peer sent AbortConn", ErrAborted)
	default:
		// SendSM, RdmaRdCompl, RdmaWrCompl, SinkAvail, ModeChange, cancels
		// and SuspComm answer things this engine never offers.
		return fmt.Errorf("%w: unexpected %v", ErrProtocol, m.MID)
	}
	if !keep {
		return c.postRecvs(idx)
	}
	return nil
}

// pump posts what the credits allow: queued messages in order, the open
// Nagle slot when it may go, and a credit update when the peer needs one.
// Caller holds c.mu.
func (c *Conn) pump() {
	if c.state == stReset || c.released {
		return
	}
	c.flushOpen(false)
	var wrs []verbs.SendWR
	for len(c.queue) > 0 && c.inflight < c.sqDepth() {
		m := &c.queue[0]
		need := creditsForControl
		if m.n > 0 || m.sgl != nil {
			need = creditsForData
		}
		if c.credits < need {
			break
		}
		if m.ctl && m.slot < 0 {
			if len(c.freeCtl) == 0 {
				break
			}
			m.slot = c.freeCtl[len(c.freeCtl)-1]
			c.freeCtl = c.freeCtl[:len(c.freeCtl)-1]
		}
		wrs = append(wrs, c.build(m))
		c.queue = c.queue[1:]
	}
	// A credit update when the peer's view of our receives is stale: its
	// credits (what we last advertised, less the messages it sent since)
	// are low against what we have posted (gen2's rule, ref §4.1).
	if len(wrs) == 0 && c.credits >= creditsForUpdate && c.inflight < c.sqDepth() && len(c.freeCtl) > 0 && c.needCreditUpdate() {
		m := txMsg{mid: wire.MIDData, ctl: true, slot: c.freeCtl[len(c.freeCtl)-1]}
		c.freeCtl = c.freeCtl[:len(c.freeCtl)-1]
		wrs = append(wrs, c.build(&m))
		c.stats.CreditUpdates++
	}
	if len(wrs) == 0 {
		return
	}
	if err := c.qp.PostSend(wrs); err != nil {
		c.resetLocked(fmt.Errorf("post send: %w", err))
		return
	}
	c.active = true
	c.lockedBroadcast()
}

func (c *Conn) sqDepth() int { return c.qp.Caps().MaxSendWR }

// remoteCredits is the peer's credit count as it computes it: our last
// advertisement less the messages it sent after that. Caller holds c.mu.
func (c *Conn) remoteCredits() int { return c.advBufs - int(c.lastRecvMseq-c.advMseqAck) }

func (c *Conn) needCreditUpdate() bool {
	if c.peerFin {
		return false // the peer sends nothing after its DisConn: it needs no credits
	}
	rc := c.remoteCredits()
	if rc > 2 {
		rc *= 2
	}
	return rc < c.posted
}

// finishClose moves FIN_WAIT1 to TIME_WAIT once both DisConns are done:
// the peer's received and ours completed (so the peer has it before the
// CM disconnect). Caller holds c.mu.
func (c *Conn) finishClose() {
	if c.state == stFinWait1 && c.peerFin && c.finSent {
		c.state = stTimeWait
		c.maybeTeardown()
	}
}

// maybeTeardown releases a gracefully finished connection once no data
// waits for the reader (or nobody will read it). Caller holds c.mu.
func (c *Conn) maybeTeardown() {
	if c.state == stTimeWait && (c.userClosed || c.rxBytes == 0) {
		c.teardownLocked()
	}
}

// build stamps the BSDH and makes the send WR for m, consuming a credit
// and an mseq. Caller holds c.mu.
func (c *Conn) build(m *txMsg) verbs.SendWR {
	wm := wire.Message{MID: m.mid, Flags: m.flags, Bufs: uint16(min(c.posted, 0xffff)), MSeq: c.nextMseq, MSeqAck: c.lastRecvMseq,
		Bytes: m.bytes, BufSize: m.size}
	var buf []byte
	var wr verbs.SendWR
	if m.ctl {
		buf = c.ctlBuf(m.slot)
		hl, err := wm.PutHeader(buf, m.n)
		if err != nil {
			panic(fmt.Sprintf("sdp: building %v: %v", m.mid, err)) // our own message: a bug, not input
		}
		wr = verbs.SendWR{ID: wrCtl | uint64(m.slot), Op: verbs.OpSend, Flags: verbs.SendSignaled,
			SGL: append([]verbs.SGE{{Addr: c.set.ctlMR.Addr() + uint64(m.slot*ctlSlotSize), Length: uint32(hl), LKey: c.set.ctlMR.LKey()}}, m.sgl...)}
		if m.done != nil {
			c.gathers[m.slot] = m.done
		}
	} else {
		buf = c.txBuf(m.slot)
		if _, err := wm.PutHeader(buf, m.n); err != nil {
			panic(fmt.Sprintf("sdp: building data: %v", err))
		}
		c.set.txHi = max(c.set.txHi, m.slot*c.txSize+wire.BSDHSize+m.n)
		wr = verbs.SendWR{ID: wrData | uint64(m.slot), Op: verbs.OpSend, Flags: verbs.SendSignaled,
			SGL: []verbs.SGE{{Addr: c.set.txMR.Addr() + uint64(m.slot*c.txSize), Length: uint32(wire.BSDHSize + m.n), LKey: c.set.txMR.LKey()}}}
	}
	if m.n > 0 {
		c.unacked, c.unackedMseq = true, c.nextMseq
		c.stats.BytesSent += uint64(m.n)
	}
	if m.mid == wire.MIDDisConn {
		c.finSlot = m.slot
	}
	if c.credits < 1 {
		c.stats.Overdrafts++
	}
	c.nextMseq++
	c.credits--
	c.advBufs, c.advMseqAck = int(wm.Bufs), wm.MSeqAck
	c.inflight++
	c.stats.MsgsSent++
	return wr
}

// flushOpen queues the partially filled data slot when Nagle allows (or
// force). Caller holds c.mu.
func (c *Conn) flushOpen(force bool) {
	if c.open < 0 {
		return
	}
	if !force && !c.noDelay && c.unacked && c.openN < c.maxPayload() {
		if c.nagle == nil {
			c.nagle = c.s.cfg.Clock.AfterFunc(c.s.cfg.NagleDelay, func() {
				c.mu.Lock()
				c.nagle = nil
				c.flushOpen(true)
				c.pump()
				c.mu.Unlock()
			})
		}
		return
	}
	if c.nagle != nil {
		c.nagle.Stop()
		c.nagle = nil
	}
	c.queue = append(c.queue, txMsg{mid: wire.MIDData, slot: c.open, n: c.openN})
	c.open, c.openN = -1, 0
}

// resetLocked aborts the connection. Caller holds c.mu.
func (c *Conn) resetLocked(cause error) {
	if c.state == stReset {
		return
	}
	c.state = stReset
	c.err = &resetError{cause: cause}
	c.rxq, c.rxBytes = nil, 0 // a reset discards unread data, as TCP does
	c.teardownLocked()
}

// teardownLocked stops the loops; run then disconnects the CM (DREQ: the
// queue pair goes to the error state and outstanding work flushes) and
// releases the resources. Caller holds c.mu.
func (c *Conn) teardownLocked() {
	for _, t := range []Timer{c.nagle, c.closeTimer, c.keepTimer} {
		if t != nil {
			t.Stop()
		}
	}
	c.nagle, c.closeTimer, c.keepTimer = nil, nil, nil
	if c.state != stReset {
		c.state = stTimeWait
	}
	c.cancel()
	c.lockedBroadcast()
}

// release frees the verbs objects once the completion loop has stopped.
func (c *Conn) release() {
	c.cm.Disconnect()
	c.mu.Lock()
	c.released = true
	set := c.set
	c.set = nil // nothing may touch the buffers once they are back with the stack
	gathers := c.gathers
	c.gathers = map[int]func(error){}
	if c.state != stReset && c.err == nil {
		c.err = net.ErrClosed
	}
	c.mu.Unlock()
	for _, f := range gathers {
		f(net.ErrClosed)
	}
	// Destroying the queue pair ends every device access to the buffers:
	// only then may another connection have them.
	qpGone := c.qp.Close() == nil
	closeAll(c.cm, c.cq)
	c.s.putSet(set, qpGone)
	c.s.forget(c)
	close(c.done)
	c.mu.Lock()
	r, w := c.callbacks()
	c.lockedBroadcast()
	c.mu.Unlock()
	if r != nil {
		r()
	}
	if w != nil {
		w()
	}
}

type closer interface{ Close() error }

// closeAll closes children before parents; nil entries are skipped.
func closeAll(cs ...closer) {
	for _, x := range cs {
		if x != nil {
			x.Close()
		}
	}
}

// armKeepalive (re)starts the keepalive timer. Caller holds c.mu.
func (c *Conn) armKeepalive() {
	ka := c.s.cfg.Keepalive
	if ka <= 0 || c.state == stReset {
		return
	}
	c.active = false
	c.keepTimer = c.s.cfg.Clock.AfterFunc(ka, func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if c.state == stReset || c.released {
			return
		}
		if !c.active && c.inflight < c.sqDepth() {
			// A zero-length RDMA WRITE: no credit, no peer buffer; the
			// peer's HCA acknowledges it, a dead peer fails it (ref §6.2).
			if err := c.qp.PostSend([]verbs.SendWR{{ID: wrKeep, Op: verbs.OpWrite, Flags: verbs.SendSignaled}}); err != nil {
				c.resetLocked(fmt.Errorf("keepalive: %w", err))
				return
			}
			c.inflight++
		}
		c.armKeepalive()
	})
}

// --- net.Conn ---

func (c *Conn) opErr(op string, err error) error {
	if err == nil || err == io.EOF {
		return err
	}
	return &net.OpError{Op: op, Net: "sdp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
}

// wait blocks until woken, the deadline passes or the connection ends.
// Caller holds c.mu; it is released while waiting.
func (c *Conn) wait(deadline time.Time) error {
	ch := c.wake
	c.mu.Unlock()
	defer c.mu.Lock()
	if deadline.IsZero() {
		<-ch
		return nil
	}
	d := time.Until(deadline)
	if d <= 0 {
		return os.ErrDeadlineExceeded
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ch:
		return nil
	case <-t.C:
		return os.ErrDeadlineExceeded
	}
}

// Read implements net.Conn.
func (c *Conn) Read(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		if c.userClosed {
			return 0, c.opErr("read", net.ErrClosed)
		}
		if len(c.rxq) > 0 || len(c.tail) > 0 {
			if len(p) == 0 {
				return 0, nil
			}
			off := 0
			n := c.consume(func(b []byte) int { k := copy(p[off:], b); off += k; return k }, len(p))
			return n, nil
		}
		if c.state == stReset && !c.pipe {
			return 0, c.opErr("read", c.err)
		}
		if c.peerFin || c.released {
			return 0, io.EOF
		}
		if !c.rdDeadline.IsZero() && !time.Now().Before(c.rdDeadline) {
			return 0, c.opErr("read", os.ErrDeadlineExceeded)
		}
		if err := c.wait(c.rdDeadline); err != nil {
			return 0, c.opErr("read", err)
		}
	}
}

// consume copies up to max queued bytes through put, reposting drained
// receive slots. Caller holds c.mu.
func (c *Conn) consume(put func([]byte) int, max int) int {
	if c.released || c.state == stReset {
		c.rxq = nil // the buffers are gone; a tail kept at the reset is all there is
		n := 0
		for n < max && len(c.tail) > 0 {
			k := put(c.tail[:min(len(c.tail), max-n)])
			if k == 0 {
				break
			}
			c.tail, n = c.tail[k:], n+k
		}
		c.rxBytes = len(c.tail)
		return n
	}
	n := 0
	var drained []int
	for n < max && len(c.rxq) > 0 {
		seg := &c.rxq[0]
		b := c.rxBuf(seg.slot)[seg.off:seg.end]
		k := put(b[:min(len(b), max-n)])
		n += k
		seg.off += k
		if seg.off == seg.end {
			drained = append(drained, seg.slot)
			c.rxq = c.rxq[1:]
		}
		if k == 0 {
			break
		}
	}
	c.rxBytes -= n
	c.stats.ReadCopiedBytes += uint64(n)
	c.maybeTeardown()
	if len(drained) > 0 && c.state != stReset && !c.released && c.ctx.Err() == nil {
		if err := c.postRecvs(drained...); err != nil {
			c.resetLocked(fmt.Errorf("repost: %w", err))
		}
		c.pump()
	}
	return n
}

// Write implements net.Conn. It copies p into send buffers (BCopy).
func (c *Conn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.wrDeadline.IsZero() && !time.Now().Before(c.wrDeadline) {
		return 0, c.opErr("write", os.ErrDeadlineExceeded)
	}
	written := 0
	for len(p) > 0 {
		if err := c.writable(); err != nil {
			return written, c.opErr("write", err)
		}
		if c.open < 0 {
			if len(c.freeData) == 0 {
				if !c.wrDeadline.IsZero() && !time.Now().Before(c.wrDeadline) {
					return written, c.opErr("write", os.ErrDeadlineExceeded)
				}
				if err := c.wait(c.wrDeadline); err != nil {
					return written, c.opErr("write", err)
				}
				continue
			}
			c.open, c.openN = c.freeData[len(c.freeData)-1], 0
			c.freeData = c.freeData[:len(c.freeData)-1]
		}
		k := copy(c.txBuf(c.open)[wire.BSDHSize+c.openN:], p)
		c.openN += k
		c.set.txHi = max(c.set.txHi, c.open*c.txSize+wire.BSDHSize+c.openN)
		p = p[k:]
		written += k
		c.stats.CopiedBytes += uint64(k)
		if c.openN == c.maxPayload() {
			c.flushOpen(true)
		}
		c.pump()
	}
	c.pump()
	return written, nil
}

// writable says whether the stream takes data. Caller holds c.mu.
func (c *Conn) writable() error {
	switch {
	case c.userClosed:
		return net.ErrClosed
	case c.state == stReset && c.pipe:
		return errors.Join(syscall.EPIPE, c.err)
	case c.state == stReset:
		return c.err
	case c.wrClosed || c.released:
		return syscall.EPIPE
	}
	return nil
}

// CloseWrite shuts the sending side: DisConn goes out after the data
// written so far, and the peer reads EOF.
func (c *Conn) CloseWrite() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.writable(); err != nil {
		if c.wrClosed {
			return nil
		}
		return c.opErr("close", err)
	}
	c.shutWriteLocked()
	return nil
}

// shutWriteLocked queues DisConn and moves the close state machine.
func (c *Conn) shutWriteLocked() {
	if c.wrClosed {
		return
	}
	c.wrClosed = true
	c.flushOpen(true)
	c.queue = append(c.queue, txMsg{mid: wire.MIDDisConn, ctl: true, slot: -1})
	c.finQueued = true
	switch c.state {
	case stEstablished:
		c.state = stFinWait1
	case stCloseWait:
		c.state = stLastAck
	}
	if c.closeTimer == nil {
		c.closeTimer = c.s.cfg.Clock.AfterFunc(c.s.cfg.CloseTimeout, func() {
			c.mu.Lock()
			c.closeTimer = nil
			if c.state == stFinWait1 || c.state == stLastAck {
				c.resetLocked(fmt.Errorf("%w: no DisConn from the peer within %v", ErrAborted, c.s.cfg.CloseTimeout))
			}
			c.mu.Unlock()
		})
	}
	c.pump()
}

// Close implements net.Conn. With unread data it aborts (the peer sees
// ECONNRESET); otherwise it closes gracefully in the background.
func (c *Conn) Close() error {
	c.mu.Lock()
	if c.userClosed {
		c.mu.Unlock()
		return nil
	}
	c.userClosed = true
	switch {
	case c.state == stReset || c.released:
	case c.rxBytes > 0:
		c.resetLocked(fmt.Errorf("%w: closed with %d unread bytes", ErrAborted, c.rxBytes))
	default:
		c.shutWriteLocked()
		c.maybeTeardown()
	}
	c.lockedBroadcast()
	c.mu.Unlock()
	return nil
}

// Abort resets the connection at once (linger 0).
func (c *Conn) Abort() {
	c.mu.Lock()
	c.userClosed = true
	c.resetLocked(fmt.Errorf("%w: aborted locally", ErrAborted))
	c.mu.Unlock()
}

// Done is closed once the connection's resources are released.
func (c *Conn) Done() <-chan struct{} { return c.done }

// SetNoDelay disables Nagle-style coalescing.
func (c *Conn) SetNoDelay(on bool) {
	c.mu.Lock()
	c.noDelay = on
	c.pump()
	c.mu.Unlock()
}

// SetDeadline implements net.Conn.
func (c *Conn) SetDeadline(t time.Time) error {
	c.mu.Lock()
	c.rdDeadline, c.wrDeadline = t, t
	c.lockedBroadcast()
	c.mu.Unlock()
	return nil
}

// SetReadDeadline implements net.Conn.
func (c *Conn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	c.rdDeadline = t
	c.lockedBroadcast()
	c.mu.Unlock()
	return nil
}

// SetWriteDeadline implements net.Conn.
func (c *Conn) SetWriteDeadline(t time.Time) error {
	c.mu.Lock()
	c.wrDeadline = t
	c.lockedBroadcast()
	c.mu.Unlock()
	return nil
}

// --- lower-level API for devices ---

// SetCallbacks installs functions called (without locks held, from the
// engine's goroutines) when data may be readable or the stream writable.
// They must not block.
func (c *Conn) SetCallbacks(readable, writable func()) {
	c.mu.Lock()
	c.onReadable, c.onWritable = readable, writable
	c.mu.Unlock()
}

// ErrWouldBlock: no credit or send slot now; OnWritable fires when there is.
var ErrWouldBlock = errors.New("sdp: would block")

// SendGather sends one Data message whose payload is gathered from caller
// memory registered with this stack's device (sgl; at most MaxPayload
// bytes), with no copy. done runs once the send completed locally (the
// memory may then be reused) or failed. It returns ErrWouldBlock when no
// control slot is free; credits are waited for internally, in order.
func (c *Conn) SendGather(sgl []verbs.SGE, done func(error)) error {
	n := 0
	for _, s := range sgl {
		n += int(s.Length)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.writable(); err != nil {
		return c.opErr("write", err)
	}
	if n == 0 || n > c.maxPayload() {
		return fmt.Errorf("sdp: gather of %d bytes, want 1..%d", n, c.maxPayload())
	}
	if len(c.freeCtl) == 0 || len(c.queue) >= c.s.cfg.SendBufs {
		return ErrWouldBlock
	}
	slot := c.freeCtl[len(c.freeCtl)-1]
	c.freeCtl = c.freeCtl[:len(c.freeCtl)-1]
	c.flushOpen(true)
	c.queue = append(c.queue, txMsg{mid: wire.MIDData, ctl: true, slot: slot, n: n, sgl: append([]verbs.SGE(nil), sgl...), done: done})
	c.stats.GatherBytes += uint64(n)
	c.pump()
	return nil
}

// MaxPayload is the most payload one SendGather may carry.
func (c *Conn) MaxPayload() int { return c.maxPayload() }

// ReadTo copies received bytes into dst (for example guest receive
// buffers) without blocking. It returns the bytes copied, eof once the peer
// closed and everything was read, and the reset error if any.
func (c *Conn) ReadTo(dst [][]byte) (n int, eof bool, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, d := range dst {
		off := 0
		k := c.consume(func(b []byte) int { m := copy(d[off:], b); off += m; return m }, len(d))
		n += k
		if k < len(d) {
			break
		}
	}
	if n == 0 {
		switch {
		case c.state == stReset && !c.pipe:
			return 0, false, c.err
		case c.peerFin || c.released:
			return 0, true, nil
		}
	}
	return n, false, nil
}

// Buffered returns the bytes received and not read yet.
func (c *Conn) Buffered() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.rxBytes
}
