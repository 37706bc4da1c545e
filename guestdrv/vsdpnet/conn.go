package vsdpnet

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vsdp/vsdp/guestdrv/ctl"
)

// Conn is a stream through the device: a net.Conn on a vsock socket.
type Conn struct {
	f            *os.File
	rc           syscall.RawConn
	ctl          *ctlConn
	gport, hport uint32
	local        *net.TCPAddr
	remote       *net.TCPAddr
	closed       atomic.Bool

	mu             sync.Mutex
	resetErr       syscall.Errno
	rdDone, wrDone bool
	linger0        bool
}

var _ net.Conn = (*Conn)(nil)

func (c *Conn) opErr(op string, err error) error {
	if err == nil {
		return nil
	}
	return &net.OpError{Op: op, Net: "tcp", Source: c.local, Addr: c.remote, Err: netErr(op, err)}
}

// netErr turns an error of the vsock file under a stream or listener into
// what the net package would report: net.ErrClosed, the deadline error, or
// a syscall error naming op.
func netErr(op string, err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		err = pe.Err
	}
	switch {
	case errors.Is(err, os.ErrClosed):
		err = net.ErrClosed
	case errors.Is(err, os.ErrDeadlineExceeded):
		err = os.ErrDeadlineExceeded
	}
	if errno, ok := err.(syscall.Errno); ok {
		err = os.NewSyscallError(op, errno)
	}
	return err
}

// reset returns the errno of the host's RESET for this stream, once per
// direction, or 0.
func (c *Conn) reset(reading bool) syscall.Errno {
	c.mu.Lock()
	e := c.resetErr
	c.mu.Unlock()
	if e == 0 {
		m, ok := c.ctl.take(ctl.TypeReset, c.gport, c.hport, 0)
		if !ok {
			return 0
		}
		e = validErrno(m.Errno, syscall.ECONNRESET)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.resetErr = e
	done := &c.wrDone
	if reading {
		done = &c.rdDone
	}
	if *done {
		return 0
	}
	*done = true
	return e
}

// Read reads from the stream; a reset announced by the host reads as its
// errno (ECONNRESET) once, instead of EOF.
func (c *Conn) Read(b []byte) (int, error) {
	n, err := c.f.Read(b)
	if err == io.EOF {
		if e := c.reset(true); e != 0 {
			return n, c.opErr("read", e)
		}
		return n, io.EOF
	}
	return n, c.opErr("read", err)
}

// Write writes to the stream; a reset announced by the host fails it with
// its errno once, instead of EPIPE.
func (c *Conn) Write(b []byte) (int, error) {
	n, err := c.f.Write(b)
	if err != nil {
		var pe *os.PathError
		if errors.As(err, &pe) && pe.Err == syscall.EPIPE {
			if e := c.reset(false); e != 0 {
				return n, c.opErr("write", e)
			}
		}
	}
	return n, c.opErr("write", err)
}

// Close closes the stream. With unread data, or after SetLinger(0), it
// first tells the host to abort the stream rather than close it gracefully.
func (c *Conn) Close() error {
	if !c.closed.CompareAndSwap(false, true) {
		return c.opErr("close", net.ErrClosed)
	}
	c.mu.Lock()
	abort := c.linger0
	c.mu.Unlock()
	if !abort {
		c.rc.Control(func(fd uintptr) {
			var b [1]byte
			n, _, err := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
			abort = err == nil && n > 0
		})
	}
	if abort && c.hport != 0 {
		c.ctl.send(ctl.Msg{Type: ctl.TypeAbort, GuestPort: c.gport, HostPort: c.hport})
	}
	return c.opErr("close", c.f.Close())
}

func (c *Conn) shutdown(op string, how int) error {
	var serr error
	if c.closed.Load() {
		return c.opErr(op, net.ErrClosed)
	}
	if err := c.rc.Control(func(fd uintptr) { serr = unix.Shutdown(int(fd), how) }); err != nil {
		return c.opErr(op, err)
	}
	return c.opErr(op, serr)
}

// CloseWrite shuts down the sending side: the peer reads EOF.
func (c *Conn) CloseWrite() error { return c.shutdown("close", unix.SHUT_WR) }

// CloseRead shuts down the receiving side.
func (c *Conn) CloseRead() error { return c.shutdown("close", unix.SHUT_RD) }

// LocalAddr returns the stream's local address as the fabric sees it.
func (c *Conn) LocalAddr() net.Addr { return c.local }

// RemoteAddr returns the peer's address.
func (c *Conn) RemoteAddr() net.Addr { return c.remote }

// SetDeadline sets the read and write deadlines.
func (c *Conn) SetDeadline(t time.Time) error { return c.opErr("set", c.f.SetDeadline(t)) }

// SetReadDeadline sets the read deadline.
func (c *Conn) SetReadDeadline(t time.Time) error { return c.opErr("set", c.f.SetReadDeadline(t)) }

// SetWriteDeadline sets the write deadline.
func (c *Conn) SetWriteDeadline(t time.Time) error { return c.opErr("set", c.f.SetWriteDeadline(t)) }

// SyscallConn gives access to the vsock socket.
func (c *Conn) SyscallConn() (syscall.RawConn, error) { return c.rc, nil }

func (c *Conn) setopt(level, name, value int) error {
	if c.closed.Load() {
		return c.opErr("set", net.ErrClosed)
	}
	err := c.ctl.send(ctl.Msg{Type: ctl.TypeSetOpt, GuestPort: c.gport, HostPort: c.hport,
		Level: int32(level), Name: int32(name), Value: int32(value)})
	if err != nil {
		return c.opErr("set", err)
	}
	return nil
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// SetNoDelay asks the host to send without delay (TCP_NODELAY on its
// side; SDP's Nagle).
func (c *Conn) SetNoDelay(on bool) error {
	return c.setopt(syscall.IPPROTO_TCP, syscall.TCP_NODELAY, b2i(on))
}

// SetKeepAlive asks the host to keep the stream alive.
func (c *Conn) SetKeepAlive(on bool) error {
	return c.setopt(syscall.SOL_SOCKET, syscall.SO_KEEPALIVE, b2i(on))
}

// SetKeepAlivePeriod sets the keepalive idle time, in whole seconds.
func (c *Conn) SetKeepAlivePeriod(d time.Duration) error {
	return c.setopt(syscall.IPPROTO_TCP, syscall.TCP_KEEPIDLE, int(max(d/time.Second, 1)))
}

// SetLinger with sec 0 makes Close abortive; other values keep the
// default graceful close.
func (c *Conn) SetLinger(sec int) error {
	c.mu.Lock()
	c.linger0 = sec == 0
	c.mu.Unlock()
	return nil
}
