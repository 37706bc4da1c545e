package sdp

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"

	"github.com/vsdp/vsdp/sdpback/wire"
	"github.com/vsdp/vsdp/verbs"
)

// Stack is an SDP endpoint on one verbs device: its protection domain, its
// connections and listeners. Close it after its connections.
type Stack struct {
	cfg   Config
	pd    verbs.PD
	space PortSpace

	mu        sync.Mutex
	conns     map[*Conn]struct{}
	listeners map[*Listener]struct{}
	nextPort  uint16
	closed    bool
	done      ConnStats // counters of released connections
	idle      []*bufSet // registered buffer sets kept for new connections (pool.go)
	reused    uint64    // sets handed out from idle

	// trace, when set (by tests, before any Dial or Listen), is told each
	// connection set-up phase as it ends.
	trace func(phase string)
}

func (s *Stack) mark(phase string) {
	if s.trace != nil {
		s.trace(phase)
	}
}

// Stats sums the counters of every connection the stack has had.
func (s *Stack) Stats() ConnStats {
	s.mu.Lock()
	sum := s.done
	cs := make([]*Conn, 0, len(s.conns))
	for c := range s.conns {
		cs = append(cs, c)
	}
	s.mu.Unlock()
	for _, c := range cs {
		sum.add(c.Stats())
	}
	return sum
}

func (a *ConnStats) add(b ConnStats) {
	a.MsgsSent += b.MsgsSent
	a.MsgsRecv += b.MsgsRecv
	a.BytesSent += b.BytesSent
	a.BytesRecv += b.BytesRecv
	a.CreditUpdates += b.CreditUpdates
	a.CopiedBytes += b.CopiedBytes
	a.GatherBytes += b.GatherBytes
	a.ReadCopiedBytes += b.ReadCopiedBytes
	a.SendSMs += b.SendSMs
	a.Overdrafts += b.Overdrafts
}

// New opens a stack on cfg.Device.
func New(cfg Config) (*Stack, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	space := cfg.PortSpace
	if space == PortSpaceAuto {
		space = PortSpaceSDP
		if _, err := cfg.Device.PrivateDataLimits(verbs.SDPServiceID(1)); err != nil {
			space = PortSpaceTCP
		}
	}
	pd, err := cfg.Device.AllocPD()
	if err != nil {
		return nil, err
	}
	return &Stack{cfg: cfg, pd: pd, space: space, conns: map[*Conn]struct{}{}, listeners: map[*Listener]struct{}{}, nextPort: 32768}, nil
}

// PortSpace returns the port space the stack uses.
func (s *Stack) PortSpace() PortSpace { return s.space }

// PD returns the stack's protection domain, for registering memory that
// SendGather sends from (guest memory, registered local-access only).
func (s *Stack) PD() verbs.PD { return s.pd }

func (s *Stack) serviceID(port uint16) verbs.ServiceID {
	if s.space == PortSpaceTCP {
		return verbs.TCPServiceID(port)
	}
	return verbs.SDPServiceID(port)
}

// Close closes the listeners and aborts the connections, then frees the
// protection domain. Idempotent.
func (s *Stack) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	var ls []*Listener
	for l := range s.listeners {
		ls = append(ls, l)
	}
	var cs []*Conn
	for c := range s.conns {
		cs = append(cs, c)
	}
	s.mu.Unlock()
	for _, l := range ls {
		l.Close()
	}
	for _, c := range cs {
		c.Abort()
		<-c.Done()
	}
	s.mu.Lock()
	idle := s.idle
	s.idle = nil
	s.mu.Unlock()
	for _, b := range idle {
		b.close()
	}
	return s.pd.Close()
}

func (s *Stack) forget(c *Conn) {
	st := c.Stats()
	s.mu.Lock()
	if _, ok := s.conns[c]; ok {
		delete(s.conns, c)
		s.done.add(st)
	}
	s.mu.Unlock()
}

func (s *Stack) hello(bufs int, src, dst netip.AddrPort) wire.Hello {
	return wire.Hello{
		Bufs: uint16(bufs), Version: wire.Version22, MaxAdverts: 1,
		DesRemRcvSz: uint32(s.cfg.RecvBufSize), LocalRcvSz: uint32(s.cfg.RecvBufSize),
		SrcPort: src.Port(), SrcIP: src.Addr().Unmap(), DstIP: dst.Addr().Unmap(),
	}
}

// newConn takes a connection's buffers and creates its CQ (not yet its
// queue pair).
func (s *Stack) newConn(cm verbs.Conn, local, remote netip.AddrPort) (*Conn, error) {
	cfg := &s.cfg
	c := &Conn{s: s, cm: cm, local: local, remote: remote, rxSize: cfg.RecvBufSize, open: -1, finSlot: -1,
		nextMseq: 1, gathers: map[int]func(error){}, wake: make(chan struct{}), done: make(chan struct{})}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	var err error
	if c.set, err = s.getSet(); err != nil {
		c.cancel()
		return nil, err
	}
	s.mark("buffers")
	nctl := cfg.SendBufs + ctlSlots
	for i := nctl - 1; i >= 0; i-- {
		c.freeCtl = append(c.freeCtl, i)
	}
	if c.cq, err = cfg.Device.CreateCQ(verbs.CQOptions{Entries: cfg.RecvBufs + nctl + cfg.SendBufs + 4}); err != nil {
		s.putSet(c.set, true) // no queue pair ever used it
		c.cancel()
		return nil, err
	}
	s.mark("cq")
	return c, nil
}

// abandon frees what a connection that failed during set-up holds. Its
// buffers are not kept: the peer may have written into them.
func (c *Conn) abandon() {
	closeAll(c.qp, c.cm, c.cq)
	c.s.putSet(c.set, false)
	c.set = nil
	c.cancel()
}

func (s *Stack) qpOptions(c *Conn) verbs.QPOptions {
	return verbs.QPOptions{SendCQ: c.cq, RecvCQ: c.cq, MaxSendWR: s.cfg.SendBufs + ctlSlots + 2, MaxRecvWR: s.cfg.RecvBufs,
		MaxSendSGE: 8, MaxRecvSGE: 1}
}

// prepare posts every receive before the peer can send.
func (c *Conn) prepare(qp verbs.QP) error {
	c.qp = qp
	slots := make([]int, c.s.cfg.RecvBufs)
	for i := range slots {
		slots[i] = i
	}
	return c.postRecvs(slots...)
}

// setPeer sizes the send side from the peer's receive size.
func (c *Conn) setPeer(bufs int, rcvSize uint32) error {
	size := min(int(rcvSize), c.s.cfg.RecvBufSize)
	if size < wire.BSDHSize+1 {
		return fmt.Errorf("%w: peer receive size %d", ErrProtocol, rcvSize)
	}
	c.txSize = size // the send buffers have room for SendBufs × RecvBufSize
	for i := c.s.cfg.SendBufs - 1; i >= 0; i-- {
		c.freeData = append(c.freeData, i)
	}
	c.credits = bufs
	return nil
}

func (s *Stack) register(c *Conn) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return net.ErrClosed
	}
	s.conns[c] = struct{}{}
	return nil
}

// Dial connects to an SDP listener at addr (fabric address and port).
func (s *Stack) Dial(ctx context.Context, addr netip.AddrPort) (*Conn, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, s.cfg.DialTimeout)
		defer cancel()
	}
	c, err := s.dial(ctx, addr)
	if err != nil {
		return nil, &net.OpError{Op: "dial", Net: "sdp", Addr: Addr{addr}, Err: dialErrno(err)}
	}
	return c, nil
}

func (s *Stack) dial(ctx context.Context, addr netip.AddrPort) (*Conn, error) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, net.ErrClosed
	}
	port := s.nextPort
	s.nextPort++
	if s.nextPort == 0 {
		s.nextPort = 32768
	}
	s.mu.Unlock()
	s.mark("dial")
	svc := s.serviceID(addr.Port())
	cm, err := s.cfg.Device.Resolve(ctx, verbs.ResolveOptions{Addr: addr.Addr(), ServiceID: svc, Src: s.cfg.Addr})
	if err != nil {
		return nil, err
	}
	s.mark("resolved")
	local := netip.AddrPortFrom(s.cfg.Addr, port)
	if a := cm.LocalAddr(); a.IsValid() {
		local = netip.AddrPortFrom(a, port)
	}
	c, err := s.newConn(cm, local, addr)
	if err != nil {
		cm.Close()
		return nil, err
	}
	fail := func(e error) (*Conn, error) {
		c.abandon()
		return nil, e
	}
	qp, err := cm.CreateQP(s.pd, s.qpOptions(c))
	if err != nil {
		return fail(err)
	}
	s.mark("qp")
	if err := c.prepare(qp); err != nil {
		return fail(err)
	}
	s.mark("posted")
	h := s.hello(s.cfg.RecvBufs, local, addr)
	var pd []byte
	if s.space == PortSpaceTCP {
		pd, err = h.AppendCompact(nil)
	} else {
		pd, err = h.Append(nil)
	}
	if err != nil {
		return fail(err)
	}
	rep, err := cm.Connect(ctx, verbs.ConnParam{PrivateData: pd, RNRRetry: s.cfg.RNRRetry, RetryCount: 7})
	if err != nil {
		return fail(err)
	}
	s.mark("connected")
	ack, err := wire.DecodeHelloAck(rep)
	if err != nil {
		return fail(fmt.Errorf("%w: HelloAck: %w", ErrProtocol, err))
	}
	if err := c.setPeer(int(ack.Bufs), ack.ActRcvSz); err != nil {
		return fail(err)
	}
	s.mark("peer")
	if err := s.register(c); err != nil {
		return fail(err)
	}
	c.start()
	s.mark("started")
	return c, nil
}

// Listener accepts SDP connections on one port.
type Listener struct {
	s      *Stack
	l      verbs.Listener
	port   uint16
	accept chan *Conn
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
	once   sync.Once
	// Rejected counts requests refused (bad Hello, backlog full).
	mu       sync.Mutex
	rejected uint64
}

// Listen listens on port (0 is not allowed: SDP has no port allocation of
// its own here; the caller chooses).
func (s *Stack) Listen(port uint16, backlog int) (*Listener, error) {
	if backlog <= 0 {
		backlog = DefaultBacklog
	}
	vl, err := s.cfg.Device.Listen(verbs.ListenOptions{Addr: s.cfg.Addr, ServiceID: s.serviceID(port), Backlog: backlog})
	if err != nil {
		return nil, &net.OpError{Op: "listen", Net: "sdp", Addr: Addr{netip.AddrPortFrom(s.cfg.Addr, port)}, Err: err}
	}
	l := &Listener{s: s, l: vl, port: port, accept: make(chan *Conn, backlog), done: make(chan struct{})}
	l.ctx, l.cancel = context.WithCancel(context.Background())
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		vl.Close()
		return nil, net.ErrClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	go l.loop()
	return l, nil
}

// loop takes connection requests and completes the handshake.
func (l *Listener) loop() {
	defer close(l.done)
	for {
		req, err := l.l.Accept(l.ctx)
		if err != nil {
			return
		}
		c, err := l.handshake(req)
		if err != nil {
			l.mu.Lock()
			l.rejected++
			l.mu.Unlock()
			continue
		}
		select {
		case l.accept <- c:
		default:
			// Backlog full: the request was accepted at the CM level but
			// nobody takes it; reset it rather than hold it.
			c.Abort()
			l.mu.Lock()
			l.rejected++
			l.mu.Unlock()
		}
	}
}

func (l *Listener) handshake(req verbs.Conn) (*Conn, error) {
	s := l.s
	s.mark("request")
	var h wire.Hello
	var err error
	if s.space == PortSpaceTCP {
		h, err = wire.DecodeCompactHello(req.PrivateData(), req.RemoteAddr(), req.LocalAddr())
	} else {
		h, err = wire.DecodeHello(req.PrivateData())
	}
	if err != nil {
		req.Reject(nil)
		req.Close()
		return nil, err
	}
	local := netip.AddrPortFrom(h.DstIP, l.port)
	remote := netip.AddrPortFrom(h.SrcIP, h.SrcPort)
	c, err := s.newConn(req, local, remote)
	if err != nil {
		req.Reject(nil)
		req.Close()
		return nil, err
	}
	fail := func(e error) (*Conn, error) {
		req.Reject(nil)
		c.abandon()
		return nil, e
	}
	if err := c.setPeer(int(h.Bufs), h.LocalRcvSz); err != nil {
		return fail(err)
	}
	s.mark("peer")
	qp, err := req.CreateQP(s.pd, s.qpOptions(c))
	if err != nil {
		return fail(err)
	}
	s.mark("qp")
	if err := c.prepare(qp); err != nil {
		return fail(err)
	}
	s.mark("posted")
	ack := wire.HelloAck{Bufs: uint16(s.cfg.RecvBufs), Version: wire.Version22, MaxAdverts: 1, ActRcvSz: uint32(s.cfg.RecvBufSize)}
	pd, _ := ack.Append(nil)
	ctx, cancel := context.WithTimeout(l.ctx, s.cfg.DialTimeout)
	defer cancel()
	if err := req.Accept(ctx, verbs.ConnParam{PrivateData: pd, RNRRetry: s.cfg.RNRRetry, RetryCount: 7}); err != nil {
		return fail(err)
	}
	s.mark("established")
	if err := s.register(c); err != nil {
		return fail(err)
	}
	c.start()
	s.mark("started")
	return c, nil
}

// Accept waits for the next connection.
func (l *Listener) Accept() (net.Conn, error) { return l.AcceptSDP(context.Background()) }

// AcceptSDP waits for the next connection or the context's end.
func (l *Listener) AcceptSDP(ctx context.Context) (*Conn, error) {
	select {
	case c := <-l.accept:
		return c, nil
	case <-l.ctx.Done():
		return nil, &net.OpError{Op: "accept", Net: "sdp", Addr: l.Addr(), Err: net.ErrClosed}
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Addr implements net.Listener.
func (l *Listener) Addr() net.Addr { return Addr{netip.AddrPortFrom(l.s.cfg.Addr, l.port)} }

// Rejected returns the number of connection requests refused.
func (l *Listener) Rejected() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.rejected
}

// Close stops listening and aborts connections not yet accepted.
func (l *Listener) Close() error {
	l.once.Do(func() {
		l.cancel()
		l.l.Close()
		<-l.done
		for {
			select {
			case c := <-l.accept:
				c.Abort()
				continue
			default:
			}
			break
		}
		l.s.mu.Lock()
		delete(l.s.listeners, l)
		l.s.mu.Unlock()
	})
	return nil
}

var _ net.Listener = (*Listener)(nil)
