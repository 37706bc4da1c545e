package vhost

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Server serves vhost-user front-ends: each accepted connection gets its own
// Session and Device. The zero value (with NewDevice set) is ready to use;
// the other fields are options whose zero value is the default. Fields must
// not change once serving starts.
type Server struct {
	// NewDevice creates the device for each front-end. Required.
	NewDevice Factory
	// MaxMemSlots is what GET_MAX_MEM_SLOTS reports and the region limit
	// per front-end (0: guestmem.DefaultMaxSlots, 509).
	MaxMemSlots int
	// Trace, if set, is called for every message (after it is handled),
	// ring start, stop and break, and connection start and end. It is
	// called from several goroutines and must not block for long.
	Trace func(Event)
	// Record, if set, is called for every message received, before it is
	// validated, with the raw payload (valid only during the call).
	Record func(Message)
	// Exclusive, when positive, makes Serve serve one front-end at a
	// time: one that connects while another is served waits up to this
	// long for that session to end (a restarted QEMU racing its
	// predecessor's teardown), then is refused and closed. Whoever can
	// connect to the socket could otherwise take the device from the
	// live front-end. ServeConn is not affected.
	Exclusive time.Duration

	mu        sync.Mutex
	closed    bool
	listeners map[net.Listener]struct{}
	sessions  map[*Session]struct{}
	wg        sync.WaitGroup // running sessions
	lastID    atomic.Uint64
	stats     counters
}

// EventKind says what an Event reports.
type EventKind uint8

// Event kinds.
const (
	EventMessage    EventKind = iota // a message was handled (Err: why it was rejected or failed)
	EventConnect                     // a front-end connected
	EventDisconnect                  // a session ended (Err: why, nil for a clean disconnect)
	EventRingStart                   // a ring started running
	EventRingStop                    // a ring was stopped by the front-end or at disconnect
	EventRingBroken                  // a ring broke (Err: *RingError)
	EventRefused                     // a front-end was refused: another is served (Server.Exclusive)
)

func (k EventKind) String() string {
	switch k {
	case EventMessage:
		return "message"
	case EventConnect:
		return "connect"
	case EventDisconnect:
		return "disconnect"
	case EventRingStart:
		return "ring-start"
	case EventRingStop:
		return "ring-stop"
	case EventRingBroken:
		return "ring-broken"
	case EventRefused:
		return "refused"
	}
	return fmt.Sprintf("event-%d", uint8(k))
}

// Event is what the Trace hook receives.
type Event struct {
	Session uint64
	Kind    EventKind
	Header  Header // EventMessage
	FDs     int    // EventMessage: fds received with it
	Queue   int    // ring events; -1 otherwise
	Err     error
}

func (e Event) String() string {
	s := fmt.Sprintf("session %d %s", e.Session, e.Kind)
	switch e.Kind {
	case EventMessage:
		s += fmt.Sprintf(" %s flags=%#x size=%d fds=%d", e.Header.Request, e.Header.Flags, e.Header.Size, e.FDs)
	case EventRingStart, EventRingStop, EventRingBroken:
		s += fmt.Sprintf(" queue %d", e.Queue)
	}
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

// Message is a received message as the Record hook sees it.
type Message struct {
	Session uint64
	Header  Header
	Payload []byte // valid only during the hook call
	FDs     int
}

type counter int

const (
	cRejected counter = iota
	cRingsStarted
	cRingsStopped
	cRingsBroken
	cKicks
	cConnections
	cDisconnects
	cRefused
	numCounters
)

// MessageKinds is the length of Stats.Messages.
const MessageKinds = 64

type counters struct {
	messages [MessageKinds]atomic.Uint64
	n        [numCounters]atomic.Uint64
}

// Stats are a session's or a server's counters (a server's sum every
// session it ever served).
type Stats struct {
	// Messages counts messages by request code; index 0 counts codes
	// outside 1..MessageKinds-1.
	Messages     [MessageKinds]uint64
	Rejected     uint64 // messages rejected by validation or whose handler failed
	RingsStarted uint64
	RingsStopped uint64 // stopped by the front-end or at disconnect (broken rings included)
	RingsBroken  uint64 // broken by the driver, the device or a failing kick fd
	Kicks        uint64 // kicks received on running rings
	Connections  uint64 // server only: front-ends served
	Disconnects  uint64 // server only: sessions ended
	Refused      uint64 // server only: front-ends refused (Exclusive)
}

// Total returns the number of messages received.
func (s Stats) Total() uint64 {
	var n uint64
	for _, v := range s.Messages {
		n += v
	}
	return n
}

func (c *counters) snapshot() Stats {
	var s Stats
	for i := range c.messages {
		s.Messages[i] = c.messages[i].Load()
	}
	s.Rejected = c.n[cRejected].Load()
	s.RingsStarted = c.n[cRingsStarted].Load()
	s.RingsStopped = c.n[cRingsStopped].Load()
	s.RingsBroken = c.n[cRingsBroken].Load()
	s.Kicks = c.n[cKicks].Load()
	s.Connections = c.n[cConnections].Load()
	s.Disconnects = c.n[cDisconnects].Load()
	s.Refused = c.n[cRefused].Load()
	return s
}

func (s *Session) inc(c counter) {
	s.stats.n[c].Add(1)
	s.srv.stats.n[c].Add(1)
}

func (s *Session) countMessage(r Request) {
	i := int(r)
	if r >= MessageKinds {
		i = 0
	}
	s.stats.messages[i].Add(1)
	s.srv.stats.messages[i].Add(1)
}

func (srv *Server) trace(e Event) {
	if srv.Trace != nil {
		srv.Trace(e)
	}
}

// Stats returns the server's counters.
func (srv *Server) Stats() Stats { return srv.stats.snapshot() }

// Sessions returns the sessions running now.
func (srv *Server) Sessions() []*Session {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	out := make([]*Session, 0, len(srv.sessions))
	for s := range srv.sessions {
		out = append(out, s)
	}
	return out
}

// ListenAndServe listens on the Unix socket path and serves until Close.
// The path must not exist (a stale socket from a crashed daemon is the
// caller's to remove); it is removed when the listener closes.
func (srv *Server) ListenAndServe(path string) error {
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return err
	}
	return srv.Serve(l)
}

// Serve accepts front-ends on l until Close (ErrClosed) or a permanent
// accept error. l must yield *net.UnixConn connections (fds travel as
// SCM_RIGHTS); others are closed. Serve closes l when it returns.
func (srv *Server) Serve(l net.Listener) error {
	srv.mu.Lock()
	if srv.closed {
		srv.mu.Unlock()
		l.Close()
		return ErrClosed
	}
	if srv.listeners == nil {
		srv.listeners = map[net.Listener]struct{}{}
	}
	srv.listeners[l] = struct{}{}
	srv.mu.Unlock()
	defer func() {
		srv.mu.Lock()
		delete(srv.listeners, l)
		srv.mu.Unlock()
		l.Close()
	}()
	var delay time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			if srv.isClosed() {
				return ErrClosed
			}
			if !transient(err) {
				return err
			}
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			time.Sleep(delay)
			continue
		}
		delay = 0
		uc, ok := c.(*net.UnixConn)
		if !ok {
			c.Close()
			continue
		}
		if srv.Exclusive > 0 && !srv.waitIdle(srv.Exclusive) {
			srv.stats.n[cRefused].Add(1)
			srv.trace(Event{Kind: EventRefused, Queue: -1, Err: errBusy})
			uc.Close() // after the count: the front-end sees its refusal as EOF
			continue
		}
		s, err := srv.register(uc)
		if err != nil {
			return err
		}
		go srv.run(s)
	}
}

// errBusy is why an Exclusive server refused a front-end.
var errBusy = errors.New("vhost: another front-end is being served")

// waitIdle waits up to d for the server to serve no session and reports
// whether it does. Only the accept loop registers sessions on an
// Exclusive server's listeners, so idle stays true until it registers.
func (srv *Server) waitIdle(d time.Duration) bool {
	for end := time.Now().Add(d); ; {
		srv.mu.Lock()
		idle := len(srv.sessions) == 0 || srv.closed
		srv.mu.Unlock()
		if idle {
			return true
		}
		if time.Now().After(end) {
			return false
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func transient(err error) bool {
	for _, e := range []error{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED, syscall.EINTR} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

func (srv *Server) isClosed() bool {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	return srv.closed
}

// ServeConn serves one front-end on an established connection (for example
// one end of a socketpair) and returns when the session ends: nil when the
// front-end disconnected, an error wrapping ErrProtocol when it broke the
// stream, ErrClosed when the server was closed. The connection is closed.
func (srv *Server) ServeConn(c *net.UnixConn) error {
	s, err := srv.register(c)
	if err != nil {
		return err
	}
	return srv.run(s)
}

func (srv *Server) register(c *net.UnixConn) (*Session, error) {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if srv.closed {
		c.Close()
		return nil, ErrClosed
	}
	if srv.sessions == nil {
		srv.sessions = map[*Session]struct{}{}
	}
	s := &Session{srv: srv, id: srv.lastID.Add(1), conn: c}
	srv.sessions[s] = struct{}{}
	srv.wg.Add(1)
	return s, nil
}

func (srv *Server) run(s *Session) (err error) {
	defer srv.wg.Done()
	s.inc(cConnections)
	srv.trace(Event{Session: s.id, Kind: EventConnect, Queue: -1})
	defer func() {
		s.teardown()
		srv.mu.Lock()
		delete(srv.sessions, s)
		closed := srv.closed
		srv.mu.Unlock()
		if closed && err != nil && errors.Is(err, net.ErrClosed) {
			err = ErrClosed
		}
		s.inc(cDisconnects)
		srv.trace(Event{Session: s.id, Kind: EventDisconnect, Queue: -1, Err: err})
	}()
	if srv.NewDevice == nil {
		return fmt.Errorf("%w: Server.NewDevice is not set", ErrInvalid)
	}
	dev, err := srv.NewDevice()
	if err != nil {
		return fmt.Errorf("vhost: creating device: %w", err)
	}
	if err := s.init(dev); err != nil {
		_ = dev.Close()
		return err
	}
	return s.serve()
}

// Close stops accepting, disconnects every front-end and waits until every
// session has freed what it held. It is idempotent and safe to call
// concurrently.
func (srv *Server) Close() error {
	srv.mu.Lock()
	if !srv.closed {
		srv.closed = true
		for l := range srv.listeners {
			l.Close()
		}
		for s := range srv.sessions {
			s.conn.Close()
		}
	}
	srv.mu.Unlock()
	srv.wg.Wait()
	return nil
}
