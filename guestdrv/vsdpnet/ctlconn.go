package vsdpnet

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vsdp/vsdp/guestdrv/ctl"
)

const (
	notesMax   = 1024            // RESULT/PEER/RESET notes kept, oldest dropped
	retryPause = time.Second     // between failed attempts to reach the host
	noteWait   = time.Second     // how long a stream event waits for its note
	rxMax      = 4 * ctl.MaxBody // reassembly buffer; a frame is at most 248 bytes
)

// ctlConn is a Client's control connection. Everything is under mu.
type ctlConn struct {
	tr      *transport
	timeout time.Duration

	mu      sync.Mutex
	f       *os.File
	rc      syscall.RawConn
	buf     []byte
	notes   []ctl.Msg
	nextID  uint32
	failAt  time.Time
	failErr error
	closed  bool
	// the request being answered
	waitID  uint32
	waiting bool
	got     bool
	reply   ctl.Msg
}

var aLongTimeAgo = time.Unix(1, 0)

// connect connects a non-blocking socket wrapped in f, waiting for the
// outcome in the netpoller until ctx ends.
func connect(ctx context.Context, f *os.File, rc syscall.RawConn, sa unix.Sockaddr) error {
	var cerr error
	if err := rc.Control(func(fd uintptr) {
		for cerr = unix.Connect(int(fd), sa); cerr == unix.EINTR; cerr = unix.Connect(int(fd), sa) {
		}
	}); err != nil {
		return err
	}
	switch cerr {
	case nil, unix.EISCONN:
		return nil
	case unix.EINPROGRESS, unix.EALREADY:
	default:
		return cerr
	}
	if d, ok := ctx.Deadline(); ok {
		f.SetWriteDeadline(d)
	}
	stop := context.AfterFunc(ctx, func() { f.SetWriteDeadline(aLongTimeAgo) })
	defer stop()
	defer f.SetWriteDeadline(time.Time{})
	// RawConn.Write resets the write readiness, then calls f: so f must
	// look before it asks to wait (a completion after the reset is a new
	// edge; one before it is seen by the look). SO_ERROR is 0 both while
	// connecting and once connected: getpeername tells them apart.
	var serr error
	err := rc.Write(func(fd uintptr) bool {
		v, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR)
		if err != nil {
			serr = err
			return true
		}
		switch e := unix.Errno(v); e {
		case unix.EINPROGRESS, unix.EALREADY, unix.EINTR:
			return false
		case 0, unix.EISCONN:
			_, err := unix.Getpeername(int(fd))
			return err == nil // else not there yet
		default:
			serr = e
			return true
		}
	})
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return err
	}
	return serr
}

// openLocked opens the connection and says HELLO, unless it is open.
func (c *ctlConn) openLocked() error {
	if c.closed {
		return net.ErrClosed
	}
	if c.f != nil {
		return nil
	}
	if !c.failAt.IsZero() && time.Since(c.failAt) < retryPause {
		return c.failErr
	}
	err := c.dialLocked()
	if err != nil {
		c.failAt, c.failErr = time.Now(), err
		return err
	}
	c.failAt, c.failErr = time.Time{}, nil
	return nil
}

func (c *ctlConn) dialLocked() error {
	fd, err := c.tr.socket()
	if err != nil {
		return fmt.Errorf("%w: socket: %v", ErrNoDevice, err)
	}
	f := os.NewFile(uintptr(fd), "vsdp-ctl")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return fmt.Errorf("%w: %v", ErrNoDevice, err)
	}
	sa, _ := c.tr.hostAddr(0, true)
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	err = connect(ctx, f, rc, sa)
	cancel()
	if err != nil {
		f.Close()
		return fmt.Errorf("%w: connect: %v", ErrNoDevice, err)
	}
	c.f, c.rc, c.buf = f, rc, make([]byte, 0, rxMax)
	if err := c.writeLocked(ctl.Msg{Type: ctl.TypeHello, PID: uint32(os.Getpid()), Ver: ctl.Version}); err != nil {
		return err
	}
	c.waitID, c.waiting, c.got = 0, true, false
	err = c.pump(func() bool { return c.got }, time.Now().Add(c.timeout))
	c.waiting = false
	switch {
	case err != nil:
		return err
	case !c.got:
		c.drop()
		return fmt.Errorf("%w: no HELLO_OK in %v", ErrNoDevice, c.timeout)
	case c.reply.Type != ctl.TypeHelloOK || c.reply.Ver != ctl.Version:
		c.drop()
		return fmt.Errorf("%w: HELLO answered by %v version %d", ErrProtocol, c.reply.Type, c.reply.Ver)
	}
	return nil
}

func (c *ctlConn) drop() {
	if c.f != nil {
		c.f.Close()
	}
	c.f, c.rc, c.buf = nil, nil, nil
	c.failAt, c.failErr = time.Now(), fmt.Errorf("%w: the control connection broke", ErrNoDevice)
}

func (c *ctlConn) writeLocked(m ctl.Msg) error {
	b, err := m.Append(nil)
	if err != nil {
		return err
	}
	c.f.SetWriteDeadline(time.Now().Add(c.timeout))
	_, err = c.f.Write(b)
	c.f.SetWriteDeadline(time.Time{})
	if err != nil {
		c.drop()
		return fmt.Errorf("%w: %v", ErrNoDevice, err)
	}
	return nil
}

// readSome reads what is there (deadline zero: without waiting). It
// returns 0, nil when nothing came.
func (c *ctlConn) readSome(deadline time.Time) (int, error) {
	c.f.SetReadDeadline(deadline)
	var n int
	var rerr error
	err := c.rc.Read(func(fd uintptr) bool {
		for {
			n, rerr = unix.Read(int(fd), c.buf[len(c.buf):cap(c.buf)])
			if rerr != unix.EINTR {
				break
			}
		}
		return rerr != unix.EAGAIN || deadline.IsZero()
	})
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return 0, nil
	case err != nil:
		return 0, err
	case rerr == unix.EAGAIN:
		return 0, nil
	case rerr != nil:
		return 0, rerr
	case n == 0:
		return 0, io.EOF
	}
	c.buf = c.buf[:len(c.buf)+n]
	return n, nil
}

// pump reads and files frames until done() or nothing more comes by the
// deadline (zero: until nothing is readable). A broken connection is
// dropped and reported.
func (c *ctlConn) pump(done func() bool, deadline time.Time) error {
	for !done() {
		if c.f == nil {
			return fmt.Errorf("%w: the control connection is closed", ErrNoDevice)
		}
		n, err := c.readSome(deadline)
		if err != nil {
			c.drop()
			return fmt.Errorf("%w: %v", ErrNoDevice, err)
		}
		if n == 0 {
			return nil
		}
		if err := c.parse(); err != nil {
			c.drop()
			return err
		}
	}
	return nil
}

func (c *ctlConn) parse() error {
	for {
		m, n, err := ctl.Decode(c.buf)
		if err == io.ErrUnexpectedEOF {
			if len(c.buf) == cap(c.buf) {
				return fmt.Errorf("%w: frame larger than %d bytes", ErrProtocol, cap(c.buf))
			}
			return nil
		}
		if err != nil {
			return fmt.Errorf("%w: %v", ErrProtocol, err)
		}
		c.buf = c.buf[:copy(c.buf, c.buf[n:])]
		switch m.Type {
		case ctl.TypeResult, ctl.TypePeer, ctl.TypeReset:
			if len(c.notes) == notesMax {
				c.notes = append(c.notes[:0], c.notes[1:]...)
			}
			c.notes = append(c.notes, m)
		case ctl.TypeHelloOK, ctl.TypeTicket, ctl.TypeLocal, ctl.TypeDeny, ctl.TypeListenOK, ctl.TypeWhoOK:
			if c.waiting && m.ID == c.waitID {
				c.reply, c.got = m, true
			} // else the answer to a request that timed out
		default:
			return fmt.Errorf("%w: %v from the host", ErrProtocol, m.Type)
		}
	}
}

func noteKey(m ctl.Msg) (ctl.Type, uint32, uint32) {
	switch m.Type {
	case ctl.TypePeer:
		return m.Type, m.ID, m.Port
	case ctl.TypeReset:
		return m.Type, m.GuestPort, m.HostPort
	}
	return m.Type, m.ID, 0
}

func (c *ctlConn) findNote(t ctl.Type, k1, k2 uint32) (ctl.Msg, bool) {
	for i, m := range c.notes {
		if mt, a, b := noteKey(m); mt == t && a == k1 && b == k2 {
			c.notes = append(c.notes[:i], c.notes[i+1:]...)
			return m, true
		}
	}
	return ctl.Msg{}, false
}

// request sends m with a fresh id and returns the host's answer, waiting
// until the client's timeout or ctx's deadline, whichever is first.
func (c *ctlConn) request(ctx context.Context, m ctl.Msg) (ctl.Msg, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.openLocked(); err != nil {
		return ctl.Msg{}, err
	}
	if c.nextID++; c.nextID == 0 {
		c.nextID = 1
	}
	m.ID = c.nextID
	if err := c.writeLocked(m); err != nil {
		return ctl.Msg{}, err
	}
	deadline := time.Now().Add(c.timeout)
	d, ok := ctx.Deadline()
	byCtx := ok && d.Before(deadline)
	if byCtx {
		deadline = d
	}
	c.waitID, c.waiting, c.got = m.ID, true, false
	err := c.pump(func() bool { return c.got }, deadline)
	c.waiting = false
	if err != nil {
		return ctl.Msg{}, err
	}
	if !c.got && (byCtx || ctx.Err() != nil) {
		// the answer, if it comes, is dropped
		if ctx.Err() != nil {
			return ctl.Msg{}, ctx.Err()
		}
		return ctl.Msg{}, context.DeadlineExceeded
	}
	if !c.got {
		c.drop()
		return ctl.Msg{}, fmt.Errorf("%w: no answer to %v in %v", ErrNoDevice, m.Type, c.timeout)
	}
	return c.reply, nil
}

// send sends m if the connection is open; ABORT, SETOPT and UNLISTEN need
// no answer and mean nothing to a host that lost the connection.
func (c *ctlConn) send(m ctl.Msg) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.f == nil {
		return fmt.Errorf("%w: no control connection", ErrNoDevice)
	}
	return c.writeLocked(m)
}

// take returns the note (t, k1, k2), reading for it up to wait.
func (c *ctlConn) take(t ctl.Type, k1, k2 uint32, wait time.Duration) (ctl.Msg, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if m, ok := c.findNote(t, k1, k2); ok {
		return m, true
	}
	if c.f == nil {
		return ctl.Msg{}, false
	}
	var found ctl.Msg
	ok := false
	var deadline time.Time
	if wait > 0 {
		deadline = time.Now().Add(wait)
	}
	c.pump(func() bool {
		found, ok = c.findNote(t, k1, k2)
		return ok
	}, deadline)
	return found, ok
}

func (c *ctlConn) close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true
	if c.f != nil {
		c.f.Close()
		c.f = nil
	}
	return nil
}
