package ibsdp

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"time"

	"github.com/vsdp/vsdp/sdpback/internal/refpeer"
	"github.com/vsdp/vsdp/verbs"
)

// Defaults: what ib_sdp (gen2) uses, scaled down where a test needs
// no more (gen2 posts 64 receives).
const (
	DefaultBufs      = 16
	DefaultBufSize   = 8*4096 + refpeer.HeadSize // rcvbuf_initial_size 32 KiB plus the BSDH (ref §4.3)
	DefaultSendBufs  = 16
	DefaultMaxUnread = 4 << 20 // SO_RCVBUF stand-in: unread bytes before receives stop being reposted
	maxSendPayload   = 64<<10 - 1296
)

// Errors. A reset Conn's Err wraps ErrReset and the cause.
var (
	ErrReset   = errors.New("ibsdp: connection reset")
	ErrTimeout = errors.New("ibsdp: timed out")
	ErrClosed  = errors.New("ibsdp: connection closed")
)

// Options configures a Conn; zero values take the defaults above.
type Options struct {
	Device verbs.Device
	Addr   netip.Addr // this peer's fabric address: the Hello's source
	// Bufs and BufSize are the receives posted and their size (BSDH
	// included): the credits and LocalRcvSz/ActRcvSz announced.
	Bufs, BufSize int
	SendBufs      int
	MaxUnread     int
	RNRRetry      uint8
}

func (o *Options) defaults() {
	if o.Bufs == 0 {
		o.Bufs = DefaultBufs
	}
	if o.BufSize == 0 {
		o.BufSize = DefaultBufSize
	}
	if o.SendBufs == 0 {
		o.SendBufs = DefaultSendBufs
	}
	if o.MaxUnread == 0 {
		o.MaxUnread = DefaultMaxUnread
	}
}

// srcAvail is the SrcAvail being processed (gen2's rx_sa).
type srcAvail struct {
	mseq uint32
	end  int64 // stream offset just past its inline bytes
}

// advert is what one of our messages told the peer: bufs and mseq_ack.
type advert struct {
	bufs int
	ack  uint32
}

// Conn is one SDP connection behaving as ib_sdp does: version 2.2,
// MaxAdverts 1, 32 KiB receive buffers, data only above a two-credit
// reserve, a credit update when the peer's view of our receives falls
// behind, DisConn half close with the first closer's CM disconnect, a reset
// on SinkAvail or AbortConn, and a second SrcAvail during one being
// processed taken as Data header and all. It checks every message of the
// engine against the rules a gen2 host relies on and records breaches
// (Violations) instead of trusting them.
//
// A Conn has no goroutines: its methods poll the completion queue while
// they wait. It is not safe for concurrent use.
type Conn struct {
	o                Options
	pd               verbs.PD
	cq               verbs.CQ
	cm               verbs.Conn
	qp               verbs.QP
	rx, tx           *verbs.DMA
	rxMR, txMR       verbs.MR
	txSize           int // bytes per send slot
	maxPayload       int
	mseq             uint32 // next mseq to send
	lastRecv         uint32
	credits          int
	minCredits       int
	posted           int
	held             []int // receive slots not reposted while unread is full
	freeTx           []int
	queue            []refpeer.Packet
	adverts          map[uint32]advert // by our mseq; 0 is the Hello/HelloAck
	unread           []byte
	consumed         int64
	rxSA             *srcAvail
	state            string
	peerFin, finSent bool
	finSlot          int
	err              error
	log              []refpeer.Packet
	violations       []string
	closed           bool
	asData           int // second SrcAvails taken as Data (header and all)
}

// Dial connects to an SDP listener at dst (service ID 0x10000|port, the
// 92-byte Hello in the REQ).
func Dial(ctx context.Context, o Options, dst netip.AddrPort) (*Conn, error) {
	o.defaults()
	c, err := newConn(o)
	if err != nil {
		return nil, err
	}
	hh := refpeer.HH{BSDH: refpeer.BSDH{Bufs: uint16(o.Bufs)}, MajMin: refpeer.MajMin, IPVCap: 0x40, MaxAdverts: refpeer.MaxAdverts,
		DesRemRcvSz: uint32(o.BufSize), LocalRcvSz: uint32(o.BufSize), SrcPort: 40000}
	if dst.Addr().Is6() && !dst.Addr().Is4In6() {
		hh.IPVCap = 0x60
		hh.SrcAddr, hh.DstAddr = o.Addr.As16(), dst.Addr().As16()
	} else {
		s, d := o.Addr.Unmap().As4(), dst.Addr().Unmap().As4()
		copy(hh.SrcAddr[12:], s[:])
		copy(hh.DstAddr[12:], d[:])
	}
	cm, rep, err := verbs.Dial(ctx, o.Device, verbs.DialConfig{
		Resolve: verbs.ResolveOptions{Addr: dst.Addr(), ServiceID: verbs.SDPServiceID(dst.Port()), Src: o.Addr},
		PD:      c.pd,
		QP:      c.qpOptions(),
		Param:   verbs.ConnParam{PrivateData: refpeer.MarshalHello(hh), RNRRetry: o.RNRRetry, RetryCount: 5},
		Prepare: c.prepare,
	})
	if err != nil {
		c.qp = nil // closed by verbs.Dial
		c.release()
		return nil, err
	}
	c.cm = cm
	hah, err := refpeer.ParseHelloAck(rep) // gen2's active side checks the version only
	if err == nil && hah.ActRcvSz <= refpeer.HeadSize {
		err = fmt.Errorf("%w: ActRcvSz %d", refpeer.ErrHello, hah.ActRcvSz)
	}
	if err != nil {
		c.Close()
		return nil, err
	}
	c.setPeer(int(hah.Bufs), int(hah.ActRcvSz))
	return c, nil
}

// Listener accepts SDP connections as a gen2 passive side.
type Listener struct {
	o Options
	l verbs.Listener
}

// Listen listens on the SDP service ID of port.
func Listen(o Options, port uint16) (*Listener, error) {
	o.defaults()
	l, err := o.Device.Listen(verbs.ListenOptions{Addr: o.Addr, ServiceID: verbs.SDPServiceID(port), Backlog: 4})
	if err != nil {
		return nil, err
	}
	return &Listener{o: o, l: l}, nil
}

// Close stops listening.
func (l *Listener) Close() error { return l.l.Close() }

// Accept waits for a connection request, validates its Hello as gen2
// does (rejecting a bad one) and accepts it with a HelloAck.
func (l *Listener) Accept(ctx context.Context) (*Conn, error) {
	req, err := l.l.Accept(ctx)
	if err != nil {
		return nil, err
	}
	hh, err := refpeer.ParseHello(req.PrivateData())
	if err == nil && hh.LocalRcvSz <= refpeer.HeadSize {
		err = fmt.Errorf("%w: LocalRcvSz %d", refpeer.ErrHello, hh.LocalRcvSz)
	}
	if err != nil {
		req.Reject(nil)
		req.Close()
		return nil, err
	}
	c, err := newConn(l.o)
	if err != nil {
		req.Reject(nil)
		req.Close()
		return nil, err
	}
	c.setPeer(int(hh.Bufs), int(hh.LocalRcvSz))
	ack := refpeer.MarshalHelloAck(refpeer.HAH{BSDH: refpeer.BSDH{Bufs: uint16(l.o.Bufs)}, MajMin: refpeer.MajMin, MaxAdverts: refpeer.MaxAdverts, ActRcvSz: uint32(l.o.BufSize)})
	if err := verbs.AcceptConn(ctx, req, verbs.AcceptConfig{PD: c.pd, QP: c.qpOptions(),
		Param: verbs.ConnParam{PrivateData: ack, RNRRetry: l.o.RNRRetry, RetryCount: 5}, Prepare: c.prepare}); err != nil {
		req.Close()
		c.qp = nil // closed by verbs.AcceptConn
		c.release()
		return nil, err
	}
	c.cm = req
	return c, nil
}

func newConn(o Options) (*Conn, error) {
	c := &Conn{o: o, mseq: 1, state: "ESTABLISHED", finSlot: -1, adverts: map[uint32]advert{0: {bufs: o.Bufs}}}
	var err error
	if c.pd, err = o.Device.AllocPD(); err != nil {
		return nil, err
	}
	if c.cq, err = o.Device.CreateCQ(verbs.CQOptions{Entries: o.Bufs + o.SendBufs + 4}); err != nil {
		c.release()
		return nil, err
	}
	if c.rx, err = verbs.AllocDMA(o.Bufs * o.BufSize); err != nil {
		c.release()
		return nil, err
	}
	if c.rxMR, err = c.pd.RegMR(c.rx.Bytes(), verbs.AccessLocalWrite); err != nil {
		c.release()
		return nil, err
	}
	return c, nil
}

func (c *Conn) qpOptions() verbs.QPOptions {
	return verbs.QPOptions{SendCQ: c.cq, RecvCQ: c.cq, MaxSendWR: c.o.SendBufs, MaxRecvWR: c.o.Bufs, MaxSendSGE: 1, MaxRecvSGE: 1}
}

func (c *Conn) prepare(qp verbs.QP) error {
	c.qp = qp
	for i := range c.o.Bufs {
		if err := c.post(i); err != nil {
			return err
		}
	}
	return nil
}

// setPeer sizes the send slots for the peer's receive size: gen2 sends at
// most min(size − 16, 64 KiB − 1296) bytes per message.
func (c *Conn) setPeer(bufs, size int) {
	c.credits, c.minCredits = bufs, bufs
	c.maxPayload = min(size-refpeer.HeadSize, maxSendPayload)
	c.txSize = max(c.maxPayload+refpeer.HeadSize, 32+64)
	var err error
	if c.tx, err = verbs.AllocDMA(c.o.SendBufs * c.txSize); err == nil {
		c.txMR, err = c.pd.RegMR(c.tx.Bytes(), 0)
	}
	if err != nil {
		c.resetf("send buffers: %v", err)
		return
	}
	for i := c.o.SendBufs - 1; i >= 0; i-- {
		c.freeTx = append(c.freeTx, i)
	}
}

func (c *Conn) post(slot int) error {
	err := c.qp.PostRecv([]verbs.RecvWR{{ID: uint64(slot), SGL: []verbs.SGE{{
		Addr: c.rxMR.Addr() + uint64(slot*c.o.BufSize), Length: uint32(c.o.BufSize), LKey: c.rxMR.LKey()}}}})
	if err == nil {
		c.posted++
	}
	return err
}

// State is the close state, in gen2's (TCP's) names.
func (c *Conn) State() string { return c.state }

// Err is why the connection was reset, or nil.
func (c *Conn) Err() error { return c.err }

// Credits is the peer's current send credit count; MinCredits the lowest
// it was after any refresh.
func (c *Conn) Credits() int    { return c.credits }
func (c *Conn) MinCredits() int { return c.minCredits }

// Log returns every message received, in order.
func (c *Conn) Log() []refpeer.Packet { return c.log }

// Violations returns the engine's breaches of the rules a gen2 host relies
// on (sequence numbers, the credit reserve, data after DisConn, framing).
func (c *Conn) Violations() []string { return c.violations }

// SrcAvailsAsData counts SrcAvails that arrived while another was being
// processed and were taken as Data, header and all.
func (c *Conn) SrcAvailsAsData() int { return c.asData }

// MaxPayload is the most payload one Data message carries.
func (c *Conn) MaxPayload() int { return c.maxPayload }

func (c *Conn) violate(format string, args ...any) {
	c.violations = append(c.violations, fmt.Sprintf(format, args...))
}

func (c *Conn) resetf(format string, args ...any) {
	if c.state == "RESET" {
		return
	}
	c.state = "RESET"
	c.err = fmt.Errorf("%w: %s", ErrReset, fmt.Sprintf(format, args...))
	c.unread = nil
	if c.cm != nil {
		c.cm.Disconnect()
	}
}

// Send posts pk as the next message, stamping bufs, mseq and mseq_ack,
// without the credit rules: for tests that need an odd message (a second
// DisConn, AbortConn, SinkAvail, a SrcAvail). It waits up to d for a free
// send slot.
func (c *Conn) Send(pk refpeer.Packet, d time.Duration) error {
	if err := c.until(d, func() bool { return len(c.freeTx) > 0 }); err != nil {
		return err
	}
	return c.transmit(pk)
}

// transmit stamps and posts pk in a free send slot.
func (c *Conn) transmit(pk refpeer.Packet) error {
	pk.Bufs, pk.Mseq, pk.MseqAck = uint16(min(c.posted, 0xffff)), c.mseq, c.lastRecv
	b, err := refpeer.Marshal(pk)
	if err != nil {
		return err
	}
	if len(b) > c.txSize {
		return fmt.Errorf("ibsdp: %d-byte message exceeds the %d-byte send slot", len(b), c.txSize)
	}
	slot := c.freeTx[len(c.freeTx)-1]
	c.freeTx = c.freeTx[:len(c.freeTx)-1]
	copy(c.tx.Bytes()[slot*c.txSize:], b)
	err = c.qp.PostSend([]verbs.SendWR{{ID: uint64(slot), Op: verbs.OpSend, Flags: verbs.SendSignaled,
		SGL: []verbs.SGE{{Addr: c.txMR.Addr() + uint64(slot*c.txSize), Length: uint32(len(b)), LKey: c.txMR.LKey()}}}})
	if err != nil {
		c.freeTx = append(c.freeTx, slot)
		return err
	}
	if pk.Mid == refpeer.MidDisconn && c.finSlot < 0 {
		c.finSlot = slot
	}
	c.adverts[c.mseq] = advert{bufs: int(pk.Bufs), ack: pk.MseqAck}
	delete(c.adverts, c.mseq-4096) // far older than any receive count allows to be unacknowledged
	c.mseq++
	c.credits--
	return nil
}

// pump sends queued messages as gen2 does: data only above the two-credit
// reserve, control with two credits, in order; then a credit update if the
// peer's view of our receives has fallen behind.
func (c *Conn) pump() {
	for len(c.queue) > 0 && len(c.freeTx) > 0 && c.state != "RESET" {
		pk := c.queue[0]
		need := 2
		if len(pk.Data) > 0 {
			need = 3
		}
		if c.credits < need {
			break
		}
		if err := c.transmit(pk); err != nil {
			c.resetf("send: %v", err)
			return
		}
		c.queue = c.queue[1:]
	}
	if len(c.queue) > 0 || len(c.freeTx) == 0 || c.credits < 1 || c.peerFin || c.state == "RESET" {
		return
	}
	last := c.adverts[c.mseq-1]
	remote := last.bufs - int(c.lastRecv-last.ack) // the engine's credits as it sees them
	if (remote <= 2 && c.posted > remote) || c.posted > remote+remote/2 {
		if err := c.transmit(refpeer.Packet{BSDH: refpeer.BSDH{Mid: refpeer.MidData}}); err != nil {
			c.resetf("credit update: %v", err)
		}
	}
}

// until polls completions until cond holds, the connection resets, or d
// passes.
func (c *Conn) until(d time.Duration, cond func() bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	wc := make([]verbs.Completion, 16)
	for {
		c.pump()
		if cond() {
			return nil
		}
		if c.state == "RESET" {
			return c.err
		}
		if c.closed {
			return ErrClosed
		}
		c.drainEvents()
		n, err := verbs.PollWait(ctx, c.cq, wc)
		if err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("%w after %v (state %s)", ErrTimeout, d, c.state)
			}
			c.resetf("completion queue: %v", err)
			continue
		}
		for _, w := range wc[:n] {
			c.complete(w)
		}
	}
}

// drainEvents empties the CM event queue. A disconnect is acted on when
// the flushed work shows it (after everything that arrived before it); a
// queue pair error resets.
func (c *Conn) drainEvents() {
	for {
		select {
		case ev, ok := <-c.cm.Events():
			if !ok {
				return
			}
			switch ev.Type {
			case verbs.EventQPFatal, verbs.EventQPRequestError, verbs.EventQPAccessError, verbs.EventCQError:
				c.resetf("%v", ev)
			}
		default:
			return
		}
	}
}

// Poll processes what arrives for up to d.
func (c *Conn) Poll(d time.Duration) {
	c.until(d, func() bool { return false })
}

func (c *Conn) complete(w verbs.Completion) {
	if w.Op != verbs.CompRecv {
		c.freeTx = append(c.freeTx, int(w.ID))
		switch {
		case w.Status == verbs.StatusSuccess:
			if int(w.ID) == c.finSlot {
				c.finSent = true
				c.finish()
			}
		case w.Status == verbs.StatusFlushed:
			c.disconnected()
		default:
			c.resetf("send completion: %v", w.Err())
		}
		return
	}
	c.posted--
	switch {
	case w.Status == verbs.StatusFlushed:
		c.disconnected()
		return
	case w.Status != verbs.StatusSuccess:
		c.resetf("receive completion: %v", w.Err())
		return
	case c.state == "RESET":
		return
	}
	slot := int(w.ID)
	raw := c.rx.Bytes()[slot*c.o.BufSize : slot*c.o.BufSize+int(w.ByteLen)]
	c.receive(raw)
	if c.state == "RESET" {
		return
	}
	if len(c.unread) > c.o.MaxUnread {
		c.held = append(c.held, slot)
	} else if err := c.post(slot); err != nil {
		c.resetf("repost: %v", err)
	}
}

// disconnected handles the CM disconnect (seen as flushed work): the end of
// a graceful close in LAST_ACK, else a reset (gen2: ECONNRESET).
func (c *Conn) disconnected() {
	switch c.state {
	case "LAST_ACK", "TIME_WAIT":
		c.state = "TIME_WAIT"
	case "FIN_WAIT1":
		if c.peerFin {
			c.state = "TIME_WAIT"
			return
		}
		c.resetf("disconnected in %s", c.state)
	default:
		c.resetf("disconnected in %s", c.state)
	}
}

// finish ends a close we started: once the engine's DisConn arrived and
// ours completed, the first closer disconnects the CM (DREQ).
func (c *Conn) finish() {
	if c.state == "FIN_WAIT1" && c.peerFin && c.finSent {
		c.state = "TIME_WAIT"
		c.cm.Disconnect()
	}
}

// receive handles one message from the engine.
func (c *Conn) receive(raw []byte) {
	pk, err := refpeer.Unmarshal(raw)
	if err != nil && !errors.Is(err, refpeer.ErrUnknownMID) {
		c.violate("message %x: %v", raw[:min(len(raw), refpeer.HeadSize)], err)
		c.resetf("bad message: %v", err)
		return
	}
	pk.Data = append([]byte(nil), pk.Data...)
	c.log = append(c.log, pk)
	if pk.Mseq != c.lastRecv+1 {
		c.violate("mseq %d after %d", pk.Mseq, c.lastRecv)
	}
	// The engine's credits when it sent this: what our message number
	// mseq_ack advertised, less what it sent since (gen2's formula).
	if a, ok := c.adverts[pk.MseqAck]; !ok || int32(pk.MseqAck-c.mseq) >= 0 {
		c.violate("%#x mseq %d: mseq_ack %d acknowledges nothing we sent", pk.Mid, pk.Mseq, pk.MseqAck)
	} else {
		had := int(int32(a.ack-pk.Mseq+1)) + a.bufs
		need := 2
		switch {
		case len(pk.Data) > 0 || pk.Mid == refpeer.MidSrcAvail:
			need = 3
		case pk.Mid == refpeer.MidData:
			need = 1
		}
		if had < need {
			c.violate("%#x mseq %d with %d bytes sent with %d credits, needs %d", pk.Mid, pk.Mseq, len(pk.Data), had, need)
		}
	}
	c.lastRecv = pk.Mseq
	c.credits = int(int32(pk.MseqAck-c.mseq+1)) + int(pk.Bufs)
	c.minCredits = min(c.minCredits, c.credits)
	if err != nil {
		return // an unknown MID: gen2's "FIXME: discard", credits refreshed
	}
	switch pk.Mid {
	case refpeer.MidData:
		if len(pk.Data) == 0 {
			return
		}
		if c.peerFin {
			c.violate("%d bytes of data after DisConn", len(pk.Data))
			return // gen2 drops it in CLOSE_WAIT
		}
		c.unread = append(c.unread, pk.Data...)
	case refpeer.MidSrcAvail:
		if c.peerFin {
			c.violate("SrcAvail after DisConn")
			return
		}
		if c.rxSA != nil {
			// gen2 relabels it as Data without stripping the SrcAvail
			// header: those 16 bytes land in the stream (ref §10.5).
			c.asData++
			c.unread = append(c.unread, raw[refpeer.HeadSize:]...)
			c.queue = append(c.queue, refpeer.Packet{BSDH: refpeer.BSDH{Mid: refpeer.MidSendSM}})
			return
		}
		c.unread = append(c.unread, pk.Data...)
		c.rxSA = &srcAvail{mseq: pk.Mseq, end: c.consumed + int64(len(c.unread))}
		c.resolveSrcAvail()
	case refpeer.MidSrcAvailCancel:
		if c.rxSA != nil && int32(pk.Mseq-c.rxSA.mseq) > 0 {
			c.rxSA = nil
			c.queue = append(c.queue, refpeer.Packet{BSDH: refpeer.BSDH{Mid: refpeer.MidSendSM}})
		}
	case refpeer.MidDisconn:
		if c.peerFin {
			c.violate("second DisConn")
			return
		}
		c.peerFin = true
		switch c.state {
		case "ESTABLISHED":
			c.state = "CLOSE_WAIT"
		case "FIN_WAIT1":
			c.finish()
		}
	case refpeer.MidAbort:
		c.resetf("AbortConn received")
	case refpeer.MidSinkAvail:
		c.resetf("SinkAvail received (gen2 does not do Write zero copy)")
	case refpeer.MidChRcvBuf:
		// gen2 grows only and is at its maximum: it acknowledges the size
		// it keeps, without the BSDH (ref §10.1).
		c.queue = append(c.queue, refpeer.Packet{BSDH: refpeer.BSDH{Mid: refpeer.MidChRcvBufAck}, CRBSize: uint32(c.o.BufSize - refpeer.HeadSize)})
	}
}

// resolveSrcAvail finishes the SrcAvail being processed once the reader
// has consumed its inline bytes: this sink does not pull (no RDMA Read), so
// it answers SendSM and the source sends the rest by BCopy.
func (c *Conn) resolveSrcAvail() {
	if c.rxSA != nil && c.consumed >= c.rxSA.end {
		c.rxSA = nil
		c.queue = append(c.queue, refpeer.Packet{BSDH: refpeer.BSDH{Mid: refpeer.MidSendSM}})
	}
}

// Write sends b as Data messages (at most MaxPayload each) within the
// credit rules, waiting up to d for credits.
func (c *Conn) Write(b []byte, d time.Duration) error {
	if c.state != "ESTABLISHED" && c.state != "CLOSE_WAIT" {
		if c.err != nil {
			return c.err
		}
		return fmt.Errorf("ibsdp: write in %s", c.state)
	}
	for len(b) > 0 {
		k := min(len(b), c.maxPayload)
		c.queue = append(c.queue, refpeer.Packet{BSDH: refpeer.BSDH{Mid: refpeer.MidData}, Data: append([]byte(nil), b[:k]...)})
		b = b[k:]
	}
	return c.until(d, func() bool { return len(c.queue) == 0 })
}

// Read reads received stream bytes, waiting up to d for some. It returns
// io.EOF once the engine's DisConn arrived and everything was read.
func (c *Conn) Read(b []byte, d time.Duration) (int, error) {
	c.resolveSrcAvail()
	err := c.until(d, func() bool { return len(c.unread) > 0 || c.peerFin })
	if len(c.unread) == 0 {
		if err == nil {
			err = io.EOF
		}
		return 0, err
	}
	n := copy(b, c.unread)
	c.unread = c.unread[n:]
	c.consumed += int64(n)
	c.resolveSrcAvail()
	if len(c.unread) <= c.o.MaxUnread {
		for _, s := range c.held {
			if err := c.post(s); err != nil {
				c.resetf("repost: %v", err)
			}
		}
		c.held = nil
	}
	c.pump()
	return n, nil
}

// ReadAll reads until EOF, waiting at most d in all.
func (c *Conn) ReadAll(d time.Duration) ([]byte, error) {
	deadline := time.Now().Add(d)
	var out []byte
	buf := make([]byte, 64<<10)
	for {
		n, err := c.Read(buf, time.Until(deadline))
		out = append(out, buf[:n]...)
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return out, err
		}
	}
}

// CloseWrite queues DisConn after the data (gen2 sends it once the queue
// is empty and two credits remain) and waits up to d for it to be sent.
func (c *Conn) CloseWrite(d time.Duration) error {
	switch c.state {
	case "ESTABLISHED":
		c.state = "FIN_WAIT1"
	case "CLOSE_WAIT":
		c.state = "LAST_ACK"
	default:
		if c.err != nil {
			return c.err
		}
		return fmt.Errorf("ibsdp: CloseWrite in %s", c.state)
	}
	c.queue = append(c.queue, refpeer.Packet{BSDH: refpeer.BSDH{Mid: refpeer.MidDisconn}})
	return c.until(d, func() bool { return len(c.queue) == 0 })
}

// WaitState polls until the close state is s, for up to d.
func (c *Conn) WaitState(s string, d time.Duration) error {
	err := c.until(d, func() bool { return c.state == s })
	if c.state == s {
		return nil
	}
	return err
}

// WaitMessages polls until n messages in all have arrived, for up to d.
func (c *Conn) WaitMessages(n int, d time.Duration) error {
	return c.until(d, func() bool { return len(c.log) >= n })
}

// Disconnect issues the CM DREQ at once: gen2's abortive close.
func (c *Conn) Disconnect() {
	if c.cm != nil {
		c.cm.Disconnect()
	}
	if c.state != "TIME_WAIT" {
		c.resetf("disconnected locally")
	}
}

// Close disconnects and releases everything. Idempotent.
func (c *Conn) Close() error {
	if c.closed {
		return nil
	}
	if c.cm != nil {
		c.cm.Disconnect()
	}
	c.release()
	c.closed = true
	return nil
}

func (c *Conn) release() {
	if c.qp != nil {
		c.qp.Close()
		c.qp = nil
	}
	if c.cm != nil {
		c.cm.Close()
	}
	for _, x := range []interface{ Close() error }{c.rxMR, c.txMR, c.cq, c.pd} {
		if x != nil {
			x.Close()
		}
	}
	for _, d := range []*verbs.DMA{c.rx, c.tx} {
		if d != nil {
			d.Close()
		}
	}
}
