package guestdrv

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vsdp/vsdp/guestdrv/ctl"
)

// Transport is a test transport: what stands in for AF_VSOCK on a host
// whose kernel has no vsock loopback.
type Transport int

const (
	// Unix: AF_UNIX stream sockets in a directory (VSDP_TEST_UNIX_DIR).
	// Control: DIR/ctl; host port P: DIR/host-P; a guest listener on Q:
	// DIR/guest-Q; a guest dialer binds DIR/g-N; the host connects from
	// DIR/from-C. Connects complete or fail at once; a peer's close reads
	// as EOF/EPIPE, as a vsock RST on an established stream does.
	Unix Transport = iota
	// TCP: AF_INET stream sockets on 127.0.0.1 (VSDP_TEST_TCP_PORT=the
	// control port). Port numbers are the TCP ports. Connects are
	// asynchronous (EINPROGRESS) as on vsock.
	TCP
)

func (t Transport) String() string {
	if t == TCP {
		return "tcp"
	}
	return "unix"
}

// PlanKind says how the fake host answers a DIAL.
type PlanKind int

const (
	// PlanTicket answers TICKET. With Plan.Errno zero the host accepts the
	// guest's connect and hands the stream to Plan.Serve; otherwise the
	// guest's connect fails and RESULT carries Errno.
	PlanTicket PlanKind = iota
	// PlanLocal answers LOCAL: use the guest's own TCP stack.
	PlanLocal
	// PlanDeny answers DENY{Errno}.
	PlanDeny
	// PlanSilent does not answer at all.
	PlanSilent
)

// Dial is a DIAL the host received.
type Dial struct {
	Conn  int    // control connection number, from 1
	PID   uint32 // the HELLO's pid on that connection
	Dst   netip.AddrPort
	Flags uint32
}

// Plan is the host's scripted answer to one DIAL.
type Plan struct {
	Kind  PlanKind
	Errno syscall.Errno // DENY's errno, or RESULT's for a failed ticket
	// ResultDelay delays RESULT (for a failed ticket, after the guest has
	// seen its connect fail).
	ResultDelay time.Duration
	Timeout     time.Duration  // TICKET's timeout; default 10 s
	Local       netip.AddrPort // RESULT's local address; default 10.9.0.2:40000+n
	Remote      netip.AddrPort // RESULT's remote address; default the DIAL's dst
	Serve       func(*Stream)  // the accepted stream; default: echo
}

// Listen is a LISTEN the host received.
type Listen struct {
	Conn      int
	PID       uint32
	Bind      netip.AddrPort
	Backlog   uint32
	GuestPort uint32
}

// ListenPlan is the host's answer to a LISTEN: Errno non-zero denies it;
// otherwise Bound (default: Bind, with port 0 replaced) is exported.
type ListenPlan struct {
	Errno syscall.Errno
	Bound netip.AddrPort
}

// Event is one message a guest sent, in arrival order.
type Event struct {
	Conn int
	PID  uint32
	Msg  ctl.Msg
}

// Stream is the host's side of one device stream.
type Stream struct {
	net.Conn
	GuestPort, HostPort uint32
	// Local and Remote are the addresses as the guest sees them.
	Local, Remote netip.AddrPort
	cc            *ctlConn
}

// Listener is a guest listener the host exported.
type Listener struct {
	Listen
	Bound netip.AddrPort
	cc    *ctlConn
}

// HostOptions configure a FakeHost.
type HostOptions struct {
	Transport Transport
	// Dir holds the Unix transport's sockets; it must be short (AF_UNIX
	// paths are limited to 107 bytes). Required for Unix.
	Dir string
	// CID is HELLO_OK's guest CID; default 3.
	CID uint32
}

// FakeHost plays vsdpd's control service over a test transport, with
// scripted outcomes. It is for tests of libvsdp.so and vsdpnet.
type FakeHost struct {
	opt HostOptions
	ln  net.Listener

	mu        sync.Mutex
	closed    bool
	nconn     int
	nport     uint32
	conns     map[int]*ctlConn
	dial      func(Dial) Plan
	listen    func(Listen) ListenPlan
	events    []Event
	listeners []*Listener
	streams   map[[2]uint32]*Stream
	changed   chan struct{} // closed and replaced at every new event
	errs      []error
	wg        sync.WaitGroup
}

type ctlConn struct {
	id  int
	c   net.Conn
	pid uint32
	wmu sync.Mutex
}

func (c *ctlConn) send(m ctl.Msg) error {
	b, err := m.Append(nil)
	if err != nil {
		return err
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_, err = c.c.Write(b)
	return err
}

// NewFakeHost starts a fake host. Close it when done.
func NewFakeHost(o HostOptions) (*FakeHost, error) {
	if o.CID == 0 {
		o.CID = 3
	}
	h := &FakeHost{
		opt:     o,
		nport:   20000,
		conns:   map[int]*ctlConn{},
		streams: map[[2]uint32]*Stream{},
		changed: make(chan struct{}),
	}
	var err error
	switch o.Transport {
	case Unix:
		if o.Dir == "" || len(o.Dir) > 80 {
			return nil, fmt.Errorf("fakehost: unix transport needs a short Dir, got %q", o.Dir)
		}
		h.ln, err = net.Listen("unix", filepath.Join(o.Dir, "ctl"))
	case TCP:
		h.ln, err = net.Listen("tcp", "127.0.0.1:0")
	default:
		err = fmt.Errorf("fakehost: unknown transport %d", o.Transport)
	}
	if err != nil {
		return nil, err
	}
	h.wg.Add(1)
	go h.serve()
	return h, nil
}

// Env returns the environment that points libvsdp.so or vsdpnet at this
// host.
func (h *FakeHost) Env() []string {
	if h.opt.Transport == TCP {
		return []string{"VSDP_TEST_TCP_PORT=" + strconv.Itoa(h.TCPPort())}
	}
	return []string{"VSDP_TEST_UNIX_DIR=" + h.opt.Dir}
}

// TCPPort returns the control port of the TCP transport (0 for Unix).
func (h *FakeHost) TCPPort() int {
	if h.opt.Transport != TCP {
		return 0
	}
	return h.ln.Addr().(*net.TCPAddr).Port
}

// SetDial sets how DIALs are answered (default: a ticket to an echo).
func (h *FakeHost) SetDial(f func(Dial) Plan) {
	h.mu.Lock()
	h.dial = f
	h.mu.Unlock()
}

// SetListen sets how LISTENs are answered (default: exported as asked).
func (h *FakeHost) SetListen(f func(Listen) ListenPlan) {
	h.mu.Lock()
	h.listen = f
	h.mu.Unlock()
}

// Events returns a copy of the messages guests sent so far.
func (h *FakeHost) Events() []Event {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]Event(nil), h.events...)
}

// Err returns the errors the host met serving guests (a guest that broke
// the protocol, a failed accept), joined.
func (h *FakeHost) Err() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	return errors.Join(h.errs...)
}

// WaitEvent waits until some event satisfies match, or timeout passes.
func (h *FakeHost) WaitEvent(match func(Event) bool, timeout time.Duration) (Event, error) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	seen := 0
	for {
		h.mu.Lock()
		evs := h.events[seen:]
		ch := h.changed
		for _, e := range evs {
			if match(e) {
				h.mu.Unlock()
				return e, nil
			}
		}
		seen += len(evs)
		h.mu.Unlock()
		select {
		case <-ch:
		case <-deadline.C:
			return Event{}, fmt.Errorf("fakehost: no matching event in %v", timeout)
		}
	}
}

// Conns returns the number of open control connections.
func (h *FakeHost) Conns() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.conns)
}

// WaitIdle waits until at most max control connections are open, every
// one that ended with its messages recorded (after guest programs exited),
// or timeout.
func (h *FakeHost) WaitIdle(max int, timeout time.Duration) error {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		h.mu.Lock()
		n := len(h.conns)
		ch := h.changed
		h.mu.Unlock()
		if n <= max {
			return nil
		}
		select {
		case <-ch:
		case <-deadline.C:
			return fmt.Errorf("fakehost: %d control connections still open after %v", n, timeout)
		}
	}
}

// WaitListener waits for the n-th (from 0) exported listener.
func (h *FakeHost) WaitListener(n int, timeout time.Duration) (*Listener, error) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		h.mu.Lock()
		if len(h.listeners) > n {
			l := h.listeners[n]
			h.mu.Unlock()
			return l, nil
		}
		ch := h.changed
		h.mu.Unlock()
		select {
		case <-ch:
		case <-deadline.C:
			return nil, fmt.Errorf("fakehost: no listener %d in %v", n, timeout)
		}
	}
}

// StreamOf returns the stream with these ports, if the host has it.
func (h *FakeHost) StreamOf(guestPort, hostPort uint32) *Stream {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.streams[[2]uint32{guestPort, hostPort}]
}

// waitStream is StreamOf, waiting up to timeout for a stream the host is
// still accepting: on the Unix transport a guest's connect completes (on
// the listen backlog) before the host has accepted it, while vsdpd knows a
// stream before its connect completes.
func (h *FakeHost) waitStream(guestPort, hostPort uint32, timeout time.Duration) *Stream {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		h.mu.Lock()
		s := h.streams[[2]uint32{guestPort, hostPort}]
		ch := h.changed
		h.mu.Unlock()
		if s != nil {
			return s
		}
		select {
		case <-ch:
		case <-deadline.C:
			return nil
		}
	}
}

func (h *FakeHost) record(e Event) {
	h.mu.Lock()
	h.events = append(h.events, e)
	close(h.changed)
	h.changed = make(chan struct{})
	h.mu.Unlock()
}

func (h *FakeHost) fail(err error) {
	h.mu.Lock()
	h.errs = append(h.errs, err)
	h.mu.Unlock()
}

func (h *FakeHost) allocPort() uint32 {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.nport++
	return h.nport
}

// Close stops the host: its listeners, control connections and streams.
func (h *FakeHost) Close() error {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return nil
	}
	h.closed = true
	conns := make([]*ctlConn, 0, len(h.conns))
	for _, c := range h.conns {
		conns = append(conns, c)
	}
	streams := make([]*Stream, 0, len(h.streams))
	for _, s := range h.streams {
		streams = append(streams, s)
	}
	h.mu.Unlock()
	err := h.ln.Close()
	for _, c := range conns {
		c.c.Close()
	}
	for _, s := range streams {
		s.Close()
	}
	h.wg.Wait()
	return err
}

func (h *FakeHost) serve() {
	defer h.wg.Done()
	for {
		c, err := h.ln.Accept()
		if err != nil {
			return
		}
		h.mu.Lock()
		if h.closed {
			h.mu.Unlock()
			c.Close()
			return
		}
		h.nconn++
		cc := &ctlConn{id: h.nconn, c: c}
		h.conns[cc.id] = cc
		h.wg.Add(1)
		h.mu.Unlock()
		go h.serveConn(cc)
	}
}

func (h *FakeHost) serveConn(cc *ctlConn) {
	defer h.wg.Done()
	defer func() {
		cc.c.Close()
		h.mu.Lock()
		delete(h.conns, cc.id)
		close(h.changed)
		h.changed = make(chan struct{})
		// the connection's listeners are withdrawn with it
		kept := h.listeners[:0]
		for _, l := range h.listeners {
			if l.cc != cc {
				kept = append(kept, l)
			}
		}
		h.listeners = kept
		h.mu.Unlock()
	}()
	r := ctl.NewReader(cc.c)
	for {
		m, err := r.Read()
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) &&
				!errors.Is(err, syscall.ECONNRESET) {
				h.fail(fmt.Errorf("fakehost: conn %d: %w", cc.id, err))
			}
			return
		}
		if !m.Type.FromGuest() {
			h.fail(fmt.Errorf("fakehost: conn %d sent host type %v", cc.id, m.Type))
			return
		}
		if m.Type == ctl.TypeHello {
			cc.pid = m.PID
		}
		h.record(Event{Conn: cc.id, PID: cc.pid, Msg: m})
		switch m.Type {
		case ctl.TypeHello:
			err = cc.send(ctl.Msg{Type: ctl.TypeHelloOK, Ver: ctl.Version, CID: h.opt.CID})
		case ctl.TypeDial:
			err = h.onDial(cc, m)
		case ctl.TypeListen:
			err = h.onListen(cc, m)
		case ctl.TypeWho:
			if s := h.waitStream(m.GuestPort, m.HostPort, time.Second); s != nil {
				err = cc.send(ctl.Msg{Type: ctl.TypeWhoOK, ID: m.ID, Local: s.Local, Remote: s.Remote})
			} else {
				err = cc.send(ctl.Msg{Type: ctl.TypeDeny, ID: m.ID, Errno: int32(syscall.ENOTCONN)})
			}
		case ctl.TypeUnlisten:
			h.mu.Lock()
			kept := h.listeners[:0]
			for _, l := range h.listeners {
				if l.cc != cc || l.GuestPort != m.Port {
					kept = append(kept, l)
				}
			}
			h.listeners = kept
			h.mu.Unlock()
		}
		if err != nil {
			return
		}
	}
}

func (h *FakeHost) onDial(cc *ctlConn, m ctl.Msg) error {
	h.mu.Lock()
	f := h.dial
	h.mu.Unlock()
	p := Plan{Kind: PlanTicket}
	if f != nil {
		p = f(Dial{Conn: cc.id, PID: cc.pid, Dst: m.Remote, Flags: m.Flags})
	}
	switch p.Kind {
	case PlanLocal:
		return cc.send(ctl.Msg{Type: ctl.TypeLocal, ID: m.ID})
	case PlanDeny:
		return cc.send(ctl.Msg{Type: ctl.TypeDeny, ID: m.ID, Errno: int32(p.Errno)})
	case PlanSilent:
		return nil
	}
	if p.Timeout == 0 {
		p.Timeout = 10 * time.Second
	}
	if !p.Remote.IsValid() {
		p.Remote = m.Remote
	}
	port, ln, err := h.ticketPort(p.Errno == 0)
	if err != nil {
		h.fail(err)
		return cc.send(ctl.Msg{Type: ctl.TypeDeny, ID: m.ID, Errno: int32(syscall.EAGAIN)})
	}
	if !p.Local.IsValid() {
		p.Local = netip.AddrPortFrom(netip.MustParseAddr("10.9.0.2"), uint16(40000+port%20000))
	}
	if err := cc.send(ctl.Msg{Type: ctl.TypeTicket, ID: m.ID, Port: port, Timeout: uint32(p.Timeout / time.Millisecond)}); err != nil {
		if ln != nil {
			ln.Close()
		}
		return err
	}
	result := ctl.Msg{Type: ctl.TypeResult, ID: port, Errno: int32(p.Errno), Local: p.Local, Remote: p.Remote}
	if p.Errno != 0 {
		if p.ResultDelay == 0 {
			return cc.send(result)
		}
		h.wg.Add(1)
		go func() {
			defer h.wg.Done()
			time.Sleep(p.ResultDelay)
			cc.send(result)
		}()
		return nil
	}
	// The host answers RESULT before the stream's RESPONSE: here, before
	// it accepts. The stream does not depend on the control connection:
	// on the Unix transport the guest's connect completes on the listen
	// backlog, and the guest may exec or exit (closing its control
	// connection) before RESULT is written; the stream is served anyway.
	err = cc.send(result)
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		h.acceptTicket(cc, ln, port, p)
	}()
	return err
}

// ticketPort allocates a host port: listening when open, else one nobody
// listens on (the guest's connect is refused).
func (h *FakeHost) ticketPort(open bool) (uint32, net.Listener, error) {
	if h.opt.Transport == TCP {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, nil, err
		}
		port := uint32(ln.Addr().(*net.TCPAddr).Port)
		if !open {
			ln.Close()
			return port, nil, nil
		}
		return port, ln, nil
	}
	port := h.allocPort()
	if !open {
		return port, nil, nil
	}
	ln, err := net.Listen("unix", filepath.Join(h.opt.Dir, fmt.Sprintf("host-%d", port)))
	return port, ln, err
}

func (h *FakeHost) acceptTicket(cc *ctlConn, ln net.Listener, port uint32, p Plan) {
	defer ln.Close()
	type deadliner interface{ SetDeadline(time.Time) error }
	if d, ok := ln.(deadliner); ok {
		d.SetDeadline(time.Now().Add(p.Timeout))
	}
	c, err := ln.Accept()
	if err != nil {
		h.mu.Lock()
		closed := h.closed
		h.mu.Unlock()
		if !closed {
			h.fail(fmt.Errorf("fakehost: ticket %d: the guest never connected: %w", port, err))
		}
		return
	}
	gp, err := portOf(c.RemoteAddr())
	if err != nil {
		h.fail(err)
		c.Close()
		return
	}
	s := &Stream{Conn: c, GuestPort: gp, HostPort: port, Local: p.Local, Remote: p.Remote, cc: cc}
	if !h.addStream(s) {
		return
	}
	serve := p.Serve
	if serve == nil {
		serve = Echo
	}
	serve(s)
}

func (h *FakeHost) addStream(s *Stream) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		s.Close()
		return false
	}
	h.streams[[2]uint32{s.GuestPort, s.HostPort}] = s
	close(h.changed)
	h.changed = make(chan struct{})
	return true
}

// portOf reads a port from a transport address: a TCP port, or the
// "-<digits>" suffix of a Unix socket's name.
func portOf(a net.Addr) (uint32, error) {
	switch a := a.(type) {
	case *net.TCPAddr:
		return uint32(a.Port), nil
	case *net.UnixAddr:
		i := strings.LastIndexByte(a.Name, '-')
		if i >= 0 {
			if v, err := strconv.ParseUint(a.Name[i+1:], 10, 32); err == nil {
				return uint32(v), nil
			}
		}
	}
	return 0, fmt.Errorf("fakehost: no port in address %v", a)
}

func (h *FakeHost) onListen(cc *ctlConn, m ctl.Msg) error {
	h.mu.Lock()
	f := h.listen
	h.mu.Unlock()
	req := Listen{Conn: cc.id, PID: cc.pid, Bind: m.Local, Backlog: m.Backlog, GuestPort: m.Port}
	var p ListenPlan
	if f != nil {
		p = f(req)
	}
	if p.Errno != 0 {
		return cc.send(ctl.Msg{Type: ctl.TypeDeny, ID: m.ID, Errno: int32(p.Errno)})
	}
	if !p.Bound.IsValid() {
		p.Bound = m.Local
		if p.Bound.Port() == 0 {
			p.Bound = netip.AddrPortFrom(p.Bound.Addr(), uint16(5000+h.allocPort()%1000))
		}
	}
	l := &Listener{Listen: req, Bound: p.Bound, cc: cc}
	h.mu.Lock()
	h.listeners = append(h.listeners, l)
	close(h.changed)
	h.changed = make(chan struct{})
	h.mu.Unlock()
	return cc.send(ctl.Msg{Type: ctl.TypeListenOK, ID: m.ID, Local: p.Bound})
}

// Call plays an incoming fabric connection from remote to listener l: PEER
// on the listener's control connection, then a connect to its guest port.
// With peer false the PEER is left out (as when it went to another process).
func (h *FakeHost) Call(l *Listener, remote netip.AddrPort, peer bool) (*Stream, error) {
	var (
		fd   int
		err  error
		from uint32
		to   syscall.Sockaddr
	)
	if h.opt.Transport == TCP {
		fd, err = syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
		if err != nil {
			return nil, err
		}
		if err = syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err == nil {
			var sa syscall.Sockaddr
			if sa, err = syscall.Getsockname(fd); err == nil {
				from = uint32(sa.(*syscall.SockaddrInet4).Port)
			}
		}
		to = &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}, Port: int(l.GuestPort)}
	} else {
		fd, err = syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
		if err != nil {
			return nil, err
		}
		from = h.allocPort()
		name := filepath.Join(h.opt.Dir, fmt.Sprintf("from-%d", from))
		err = syscall.Bind(fd, &syscall.SockaddrUnix{Name: name})
		defer os.Remove(name)
		to = &syscall.SockaddrUnix{Name: filepath.Join(h.opt.Dir, fmt.Sprintf("guest-%d", l.GuestPort))}
	}
	if err != nil {
		syscall.Close(fd)
		return nil, err
	}
	local := l.Bound
	if peer {
		if err := l.cc.send(ctl.Msg{Type: ctl.TypePeer, ID: from, Port: l.GuestPort, Remote: remote, Local: local}); err != nil {
			syscall.Close(fd)
			return nil, err
		}
	}
	if err := syscall.Connect(fd, to); err != nil {
		syscall.Close(fd)
		return nil, fmt.Errorf("fakehost: connect to guest port %d: %w", l.GuestPort, err)
	}
	f := os.NewFile(uintptr(fd), "call")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, err
	}
	s := &Stream{Conn: c, GuestPort: l.GuestPort, HostPort: from, Local: local, Remote: remote, cc: l.cc}
	if !h.addStream(s) {
		return nil, net.ErrClosed
	}
	return s, nil
}

// Reset resets the stream as vsdpd does when its fabric side fails: RESET
// on the control connection, then the stream closes (which a guest reads
// as EOF, as it reads a vsock RST).
func (s *Stream) Reset(errno syscall.Errno) error {
	err := s.cc.send(ctl.Msg{Type: ctl.TypeReset, GuestPort: s.GuestPort, HostPort: s.HostPort, Errno: int32(errno)})
	s.Close()
	return err
}

// CloseWrite half-closes the host side.
func (s *Stream) CloseWrite() error {
	if cw, ok := s.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return s.Close()
}

// Echo serves a stream by echoing it until EOF, then closes it.
func Echo(s *Stream) {
	io.Copy(s, s)
	s.CloseWrite()
	io.Copy(io.Discard, s)
	s.Close()
}

// Pipe joins two streams until both directions end, propagating half
// closes, then closes both.
func Pipe(a, b *Stream) {
	var wg sync.WaitGroup
	wg.Add(2)
	cp := func(dst, src *Stream) {
		defer wg.Done()
		io.Copy(dst, src)
		dst.CloseWrite()
	}
	go cp(a, b)
	go cp(b, a)
	wg.Wait()
	a.Close()
	b.Close()
}
