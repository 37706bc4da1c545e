package sdpback

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/vsdp/vsdp/guestdrv/ctl"
	"github.com/vsdp/vsdp/sdpback/sdp"
)

// Limits per VM (the zero VMConfig fields take these).
const (
	DefaultMaxStreams   = 1024
	DefaultMaxTickets   = 256
	DefaultMaxListeners = 64
	DefaultMaxCtlConns  = 64
	DefaultDialTimeout  = 10 * time.Second
	maxCtlOutput        = 64 << 10
	ticketBase          = 0x1000_0000
	ticketSpan          = 0x1000_0000
	listenPortLo        = 49152
)

// VMConfig configures one VM.
type VMConfig struct {
	Name        string
	Addr        netip.Addr // the VM's fabric address
	Policy      Policy
	CtlPort     uint32 // host vsock port of the control service (ctl.DefaultPort)
	DialTimeout time.Duration
	MaxStreams  int
	MaxTickets  int
	MaxListen   int
	MaxCtl      int
}

// VMStats are a VM's counters.
type VMStats struct {
	Dials, Denied, Locals, DialFailures uint64
	Streams                             int
	Listeners                           int
	CtlConns                            int
	BadControl                          uint64 // control connections dropped for malformed frames or floods
	FromGuest, ToGuest                  uint64
}

// VM is one VM's host side: its SDP stack (on its own fabric address), its
// policy, its control connections, tickets, listeners and streams. Nothing
// here is shared with another VM.
type VM struct {
	cfg   VMConfig
	stack *sdp.Stack
	dev   Device
	ctx   context.Context
	stop  context.CancelFunc

	mu          sync.Mutex
	ctls        map[*ctlConn]struct{}
	tickets     map[uint32]*ticket
	listeners   map[uint16]*guestListener
	streams     map[*bridge]struct{}
	files       map[*FileConn]struct{} // file streams (files.go)
	filePending int                    // file dials in flight, each holding a stream slot
	nextTk      uint32
	closed      bool
	dials       sync.WaitGroup // fabric dials in flight
	stats       VMStats

	fromGuest, toGuest atomic.Uint64
}

// ticket is a DIAL in progress: the fabric dial runs while the guest
// connects its vsock socket to the ticket port.
type ticket struct {
	port    uint32
	ctl     *ctlConn
	dst     netip.AddrPort
	path    Path
	done    bool
	conn    net.Conn
	err     error
	local   netip.AddrPort
	answer  Answer
	expires *time.Timer
}

// NewVM creates a VM's host side on stack (whose address is the VM's) and
// dev (its guest-facing device, for incoming connections).
func NewVM(cfg VMConfig, stack *sdp.Stack, dev Device) *VM {
	if cfg.CtlPort == 0 {
		cfg.CtlPort = ctl.DefaultPort
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = DefaultDialTimeout
	}
	if cfg.MaxStreams == 0 {
		cfg.MaxStreams = DefaultMaxStreams
	}
	if cfg.MaxTickets == 0 {
		cfg.MaxTickets = DefaultMaxTickets
	}
	if cfg.MaxListen == 0 {
		cfg.MaxListen = DefaultMaxListeners
	}
	if cfg.MaxCtl == 0 {
		cfg.MaxCtl = DefaultMaxCtlConns
	}
	vm := &VM{cfg: cfg, stack: stack, dev: dev, ctls: map[*ctlConn]struct{}{}, tickets: map[uint32]*ticket{},
		listeners: map[uint16]*guestListener{}, streams: map[*bridge]struct{}{}, files: map[*FileConn]struct{}{}}
	vm.ctx, vm.stop = context.WithCancel(context.Background())
	return vm
}

// SetDevice sets the guest-facing device (it may be created after the VM).
func (vm *VM) SetDevice(d Device) {
	vm.mu.Lock()
	vm.dev = d
	vm.mu.Unlock()
}

// Config returns the VM's configuration.
func (vm *VM) Config() VMConfig { return vm.cfg }

// Stats returns the VM's counters.
func (vm *VM) Stats() VMStats {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	s := vm.stats
	s.Streams, s.Listeners, s.CtlConns = len(vm.streams)+len(vm.files), len(vm.listeners), len(vm.ctls)
	s.FromGuest, s.ToGuest = vm.fromGuest.Load(), vm.toGuest.Load()
	return s
}

// Streams returns per-stream counters.
func (vm *VM) Streams() []StreamStats {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	out := make([]StreamStats, 0, len(vm.streams)+len(vm.files))
	for b := range vm.streams {
		out = append(out, b.stats())
	}
	for c := range vm.files {
		out = append(out, c.Stats())
	}
	return out
}

// streamCountLocked is the number of stream slots in use: vsock streams,
// file streams and file dials in flight. Caller holds vm.mu.
func (vm *VM) streamCountLocked() int { return len(vm.streams) + len(vm.files) + vm.filePending }

// reservePortLocked reserves port (0: the first free one from
// listenPortLo) in the listener registry for gl. Caller holds vm.mu.
func (vm *VM) reservePortLocked(port uint16, gl *guestListener) (uint16, bool) {
	if port == 0 {
		for p := uint16(listenPortLo); p != 0; p++ {
			if vm.listeners[p] == nil {
				port = p
				break
			}
		}
	}
	if port == 0 || vm.listeners[port] != nil {
		return 0, false
	}
	gl.port = port
	vm.listeners[port] = gl
	return port, true
}

// Close ends every stream, listener and control connection of the VM
// (guest reset or disconnect). Idempotent.
func (vm *VM) Close() {
	vm.mu.Lock()
	if vm.closed {
		vm.mu.Unlock()
		return
	}
	vm.closed = true
	vm.stop()
	var bs []*bridge
	for b := range vm.streams {
		bs = append(bs, b)
	}
	var ls []*guestListener
	for _, l := range vm.listeners {
		ls = append(ls, l)
	}
	var ts []*ticket
	for _, t := range vm.tickets {
		ts = append(ts, t)
	}
	var fs []*FileConn
	for c := range vm.files {
		fs = append(fs, c)
	}
	clear(vm.streams)
	clear(vm.files)
	clear(vm.listeners)
	clear(vm.tickets)
	clear(vm.ctls)
	vm.mu.Unlock()
	vm.dials.Wait()
	for _, b := range bs {
		b.close()
	}
	for _, l := range ls {
		if l.l != nil { // nil while a listener is still opening
			l.l.Close()
		}
	}
	for _, c := range fs {
		c.Close()
	}
	for _, t := range ts {
		t.expires.Stop()
		if t.conn != nil {
			t.conn.Close()
		}
		if t.answer != nil {
			t.answer.Refuse()
		}
	}
}

// Reset ends the guest-side state (every stream, listener and ticket) but
// keeps the VM usable: the guest driver restarted.
func (vm *VM) Reset() {
	vm.Close()
	vm.mu.Lock()
	vm.closed = false
	vm.ctx, vm.stop = context.WithCancel(context.Background())
	vm.mu.Unlock()
}

func (vm *VM) addStream(b *bridge) {
	vm.mu.Lock()
	vm.streams[b] = struct{}{}
	vm.mu.Unlock()
}

func (vm *VM) dropStream(b *bridge) {
	vm.mu.Lock()
	delete(vm.streams, b)
	vm.mu.Unlock()
}

// GuestConnect handles a guest's vsock connection to a host port: the
// control service, or a ticket from an earlier DIAL. Anything else is
// refused.
func (vm *VM) GuestConnect(hostPort, guestPort uint32, a Answer) {
	if hostPort == vm.cfg.CtlPort {
		vm.mu.Lock()
		full := len(vm.ctls) >= vm.cfg.MaxCtl || vm.closed
		vm.mu.Unlock()
		if full {
			a.Refuse()
			return
		}
		c := &ctlConn{vm: vm}
		s, err := a.Accept(c)
		if err != nil {
			return
		}
		c.stream = s
		vm.mu.Lock()
		vm.ctls[c] = struct{}{}
		vm.mu.Unlock()
		return
	}
	vm.mu.Lock()
	t := vm.tickets[hostPort]
	if t == nil {
		vm.mu.Unlock()
		a.Refuse()
		return
	}
	// A second connection to the same ticket: the guest library retried a
	// connect a signal interrupted. The newest attempt wins.
	old := t.answer
	t.answer = a
	ready := t.done
	vm.mu.Unlock()
	if old != nil {
		old.Refuse()
	}
	if ready {
		vm.complete(t)
	}
}

// dial handles DIAL: decide by policy, hand out a ticket and start the
// fabric (or host TCP) connection.
func (vm *VM) dial(c *ctlConn, m ctl.Msg) {
	action, errno := vm.cfg.Policy.Decide(m.Remote)
	vm.mu.Lock()
	vm.stats.Dials++
	switch action {
	case Deny:
		vm.stats.Denied++
		vm.mu.Unlock()
		c.send(ctl.Msg{Type: ctl.TypeDeny, ID: m.ID, Errno: int32(errno)})
		return
	case Local:
		vm.stats.Locals++
		vm.mu.Unlock()
		c.send(ctl.Msg{Type: ctl.TypeLocal, ID: m.ID})
		return
	}
	if len(vm.tickets) >= vm.cfg.MaxTickets || vm.streamCountLocked() >= vm.cfg.MaxStreams || vm.closed {
		vm.stats.Denied++
		vm.mu.Unlock()
		c.send(ctl.Msg{Type: ctl.TypeDeny, ID: m.ID, Errno: int32(syscall.EAGAIN)})
		return
	}
	port := vm.allocTicket()
	t := &ticket{port: port, ctl: c, dst: m.Remote, path: PathSDP}
	if action == HostTCP {
		t.path = PathHostTCP
	}
	vm.tickets[port] = t
	// A guest that never connects its ticket must not pin a connection.
	t.expires = time.AfterFunc(vm.cfg.DialTimeout+5*time.Second, func() { vm.expire(t) })
	ctx := vm.ctx
	vm.dials.Add(1)
	vm.mu.Unlock()
	c.send(ctl.Msg{Type: ctl.TypeTicket, ID: m.ID, Port: port, Timeout: uint32((vm.cfg.DialTimeout + time.Second) / time.Millisecond)})
	go func() {
		defer vm.dials.Done()
		dctx, cancel := context.WithTimeout(ctx, vm.cfg.DialTimeout)
		defer cancel()
		var conn net.Conn
		var err error
		local := netip.AddrPortFrom(vm.cfg.Addr, 0)
		if t.path == PathSDP {
			var sc *sdp.Conn
			if sc, err = vm.stack.Dial(dctx, m.Remote); err == nil {
				conn = sc
				if a, ok := sc.LocalAddr().(sdp.Addr); ok {
					local = a.AddrPort
				}
				if m.Flags&ctl.DialNoDelay != 0 {
					sc.SetNoDelay(true)
				}
			}
		} else {
			var d net.Dialer
			if conn, err = d.DialContext(dctx, "tcp", m.Remote.String()); err == nil {
				local = conn.LocalAddr().(*net.TCPAddr).AddrPort()
			}
		}
		vm.mu.Lock()
		if vm.tickets[t.port] != t { // expired, or the VM closed
			vm.mu.Unlock()
			if conn != nil {
				conn.Close()
			}
			return
		}
		t.done, t.conn, t.err, t.local = true, conn, err, local
		if err != nil {
			vm.stats.DialFailures++
		}
		ready := t.answer != nil
		vm.mu.Unlock()
		if ready {
			vm.complete(t)
		}
	}()
}

func (vm *VM) allocTicket() uint32 {
	for {
		p := ticketBase + vm.nextTk%ticketSpan
		vm.nextTk++
		if vm.tickets[p] == nil {
			return p
		}
	}
}

// complete answers the guest's vsock connection once the dial is done:
// RESULT on the control connection first, then RESPONSE or RST.
func (vm *VM) complete(t *ticket) {
	vm.mu.Lock()
	if vm.tickets[t.port] != t {
		vm.mu.Unlock()
		return
	}
	delete(vm.tickets, t.port)
	t.expires.Stop()
	vm.mu.Unlock()
	errno := errnoOf(t.err)
	t.ctl.send(ctl.Msg{Type: ctl.TypeResult, ID: t.port, Errno: int32(errno), Local: t.local, Remote: t.dst})
	if t.err != nil {
		t.answer.Refuse()
		return
	}
	b := newBridge(vm, t.path, t.conn, t.local, t.dst)
	s, err := t.answer.Accept(b)
	if err != nil {
		t.conn.Close()
		return
	}
	b.attach(s)
}

func (vm *VM) expire(t *ticket) {
	vm.mu.Lock()
	if vm.tickets[t.port] != t {
		vm.mu.Unlock()
		return
	}
	delete(vm.tickets, t.port)
	vm.mu.Unlock()
	if t.conn != nil {
		t.conn.Close()
	}
	if t.answer != nil {
		t.answer.Refuse()
	}
}

// errnoOf maps a dial error to the guest's errno.
func errnoOf(err error) syscall.Errno {
	if err == nil {
		return 0
	}
	for _, e := range []syscall.Errno{syscall.ECONNREFUSED, syscall.ENETUNREACH, syscall.ETIMEDOUT, syscall.EHOSTUNREACH, syscall.ECONNRESET} {
		if errors.Is(err, e) {
			return e
		}
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return syscall.ETIMEDOUT
	}
	return syscall.ECONNREFUSED
}

// broadcastReset tells every control connection that a stream failed:
// the guest library turns the vsock EOF/EPIPE into this errno.
func (vm *VM) broadcastReset(guestPort, hostPort uint32, errno syscall.Errno) {
	vm.mu.Lock()
	cs := make([]*ctlConn, 0, len(vm.ctls))
	for c := range vm.ctls {
		cs = append(cs, c)
	}
	vm.mu.Unlock()
	for _, c := range cs {
		c.send(ctl.Msg{Type: ctl.TypeReset, GuestPort: guestPort, HostPort: hostPort, Errno: int32(errno)})
	}
}

// waitCtlFlushed waits until every control connection's output was pulled
// into guest buffers, or d passes.
func (vm *VM) waitCtlFlushed(d time.Duration) {
	deadline := time.Now().Add(d)
	vm.mu.Lock()
	cs := make([]*ctlConn, 0, len(vm.ctls))
	for c := range vm.ctls {
		cs = append(cs, c)
	}
	vm.mu.Unlock()
	for {
		pending := false
		for _, c := range cs {
			c.mu.Lock()
			pending = pending || (len(c.out) > 0 && !c.closed)
			c.mu.Unlock()
		}
		if !pending || time.Now().After(deadline) {
			return
		}
		time.Sleep(time.Millisecond)
	}
}

// guestListener is a fabric listener exported for a guest listener.
type guestListener struct {
	vm        *VM
	ctl       *ctlConn
	l         *sdp.Listener
	port      uint16
	guestPort uint32
}

func (vm *VM) listen(c *ctlConn, m ctl.Msg) {
	vm.mu.Lock()
	if len(vm.listeners) >= vm.cfg.MaxListen || vm.closed {
		vm.mu.Unlock()
		c.send(ctl.Msg{Type: ctl.TypeDeny, ID: m.ID, Errno: int32(syscall.ENOBUFS)})
		return
	}
	gl := &guestListener{vm: vm, ctl: c, guestPort: m.Port}
	port, ok := vm.reservePortLocked(m.Local.Port(), gl) // reserved while the fabric listener opens
	if !ok {
		vm.mu.Unlock()
		c.send(ctl.Msg{Type: ctl.TypeDeny, ID: m.ID, Errno: int32(syscall.EADDRINUSE)})
		return
	}
	vm.mu.Unlock()
	l, err := vm.stack.Listen(port, int(max(1, min(m.Backlog, 1024))))
	if err != nil {
		vm.mu.Lock()
		delete(vm.listeners, port)
		vm.mu.Unlock()
		c.send(ctl.Msg{Type: ctl.TypeDeny, ID: m.ID, Errno: int32(syscall.EADDRINUSE)})
		return
	}
	gl.l = l
	c.send(ctl.Msg{Type: ctl.TypeListenOK, ID: m.ID, Local: netip.AddrPortFrom(vm.cfg.Addr, port)})
	go gl.loop()
}

// loop forwards each fabric connection to the guest listener: PEER on the
// control connection first, then a vsock connection to the guest port.
func (gl *guestListener) loop() {
	for {
		c, err := gl.l.AcceptSDP(gl.vm.ctx)
		if err != nil {
			return
		}
		vm := gl.vm
		vm.mu.Lock()
		dev := vm.dev
		full := vm.streamCountLocked() >= vm.cfg.MaxStreams
		vm.mu.Unlock()
		if dev == nil || full {
			c.Abort()
			continue
		}
		local, remote := c.LocalAddr().(sdp.Addr).AddrPort, c.RemoteAddr().(sdp.Addr).AddrPort
		b := newBridge(vm, PathSDP, c, local, remote)
		announce := func(s Stream) {
			// PEER goes out before the vsock REQUEST, so the guest knows
			// the caller's address by the time accept() returns.
			gl.ctl.send(ctl.Msg{Type: ctl.TypePeer, ID: s.HostPort(), Port: gl.guestPort, Remote: remote, Local: local})
		}
		s, err := dev.Dial(gl.guestPort, b, announce, func(err error) {
			if err != nil {
				b.Reset(err)
			}
		})
		if err != nil {
			c.Abort()
			continue
		}
		b.attach(s)
	}
}

func (vm *VM) unlisten(c *ctlConn, guestPort uint32) {
	vm.mu.Lock()
	var gone []*guestListener
	for p, gl := range vm.listeners {
		if gl.ctl == c && (guestPort == 0 || gl.guestPort == guestPort) {
			delete(vm.listeners, p)
			gone = append(gone, gl)
		}
	}
	vm.mu.Unlock()
	for _, gl := range gone {
		if gl.l != nil {
			gl.l.Close()
		}
	}
}

func (vm *VM) findStream(guestPort, hostPort uint32) *bridge {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	for b := range vm.streams {
		if b.stream != nil && b.stream.GuestPort() == guestPort && b.stream.HostPort() == hostPort {
			return b
		}
	}
	return nil
}

// ctlConn is one guest process's control connection.
type ctlConn struct {
	vm     *VM
	stream Stream

	mu     sync.Mutex
	in     []byte
	out    []byte
	eof    bool
	closed bool
}

// Deliver implements Handler: frames from the guest.
func (c *ctlConn) Deliver(p *Payload) {
	c.mu.Lock()
	for _, s := range p.Segs {
		c.in = append(c.in, s...)
	}
	p.Release()
	var msgs []ctl.Msg
	var bad error
	for {
		m, n, err := ctl.Decode(c.in)
		if err == io.ErrUnexpectedEOF {
			break
		}
		if err != nil {
			bad = err
			break
		}
		c.in = c.in[n:]
		msgs = append(msgs, m)
	}
	if len(c.in) == 0 {
		c.in = nil
	}
	c.mu.Unlock()
	for _, m := range msgs {
		if err := c.handle(m); err != nil {
			bad = err
			break
		}
	}
	if bad != nil {
		c.drop()
	}
}

func (c *ctlConn) handle(m ctl.Msg) error {
	vm := c.vm
	switch m.Type {
	case ctl.TypeHello:
		c.send(ctl.Msg{Type: ctl.TypeHelloOK, Ver: ctl.Version})
	case ctl.TypeDial:
		vm.dial(c, m)
	case ctl.TypeListen:
		vm.listen(c, m)
	case ctl.TypeUnlisten:
		vm.unlisten(c, m.Port)
	case ctl.TypeWho:
		if b := vm.findStream(m.GuestPort, m.HostPort); b != nil {
			c.send(ctl.Msg{Type: ctl.TypeWhoOK, ID: m.ID, Local: b.local, Remote: b.remote})
		} else {
			c.send(ctl.Msg{Type: ctl.TypeDeny, ID: m.ID, Errno: int32(syscall.ENOTCONN)})
		}
	case ctl.TypeAbort:
		if b := vm.findStream(m.GuestPort, m.HostPort); b != nil {
			b.Reset(errors.New("guest aborted"))
		}
	case ctl.TypeSetOpt:
		if b := vm.findStream(m.GuestPort, m.HostPort); b != nil && b.sdp != nil && m.Level == syscall.IPPROTO_TCP && m.Name == syscall.TCP_NODELAY {
			b.sdp.SetNoDelay(m.Value != 0)
		}
	default:
		return fmt.Errorf("%w: %v is not a guest message", ctl.ErrFrame, m.Type)
	}
	return nil
}

// send queues a frame for the guest. A guest that does not read its
// control connection loses it.
func (c *ctlConn) send(m ctl.Msg) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.out, _ = m.Append(c.out)
	over := len(c.out) > maxCtlOutput
	s := c.stream
	c.mu.Unlock()
	if over {
		c.drop()
		return
	}
	if s != nil {
		s.Notify()
	}
}

// Pull implements Handler.
func (c *ctlConn) Pull(dst [][]byte) (int, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, d := range dst {
		k := copy(d, c.out[n:])
		n += k
		if k < len(d) {
			break
		}
	}
	c.out = c.out[n:]
	return n, c.closed && len(c.out) == 0
}

// Shutdown implements Handler: the guest process closed its control
// connection (or exited): its listeners go.
func (c *ctlConn) Shutdown(rcv, send, abortive bool) {
	if send || rcv {
		c.close()
	}
}

// Reset implements Handler.
func (c *ctlConn) Reset(error) { c.close() }

func (c *ctlConn) close() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	c.mu.Unlock()
	vm := c.vm
	vm.unlisten(c, 0)
	vm.mu.Lock()
	delete(vm.ctls, c)
	vm.mu.Unlock()
}

// drop ends a control connection that broke the protocol.
func (c *ctlConn) drop() {
	c.vm.mu.Lock()
	c.vm.stats.BadControl++
	c.vm.mu.Unlock()
	c.close()
	if c.stream != nil {
		c.stream.Reset()
	}
}

// EngineStats sums the SDP engine's counters for this VM's connections
// (payload sent and received, bytes the engine copied).
func (vm *VM) EngineStats() sdp.ConnStats { return vm.stack.Stats() }
