package sockfs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/vsdp/vsdp/sdpback"
)

// state is a connection directory's state.
type state uint8

const (
	stIdle        state = iota // cloned, nothing asked yet
	stDialing                  // a connect is parked
	stEstablished              // a stream is live
	stAnnounced                // listening
	stClosed                   // hung up
	stFailed                   // connect failed, or the stream was reset
)

// conn is connection directory N.
type conn struct {
	fs   *FS
	num  int
	inc  uint64
	uid  uint32
	gid  uint32
	born time.Time
	refs int // open files; guarded by FS.mu

	ctx    context.Context // ended by hangup: parked connects and listens
	cancel context.CancelFunc

	mu        sync.Mutex
	state     state
	st        *sdpback.FileConn // kept after hangup for its counters
	lst       *sdpback.FileListener
	local     netip.AddrPort
	remote    netip.AddrPort
	errno     syscall.Errno // stFailed: why
	why       string
	nodelay   bool
	keepalive int // seconds; 0 off
}

func newConn(fs *FS, num int, inc uint64, owner fuse.Owner, st *sdpback.FileConn) *conn {
	c := &conn{fs: fs, num: num, inc: inc, uid: owner.Uid, gid: owner.Gid, born: time.Now()}
	c.ctx, c.cancel = context.WithCancel(fs.ctx)
	if st != nil {
		c.state, c.st, c.local, c.remote = stEstablished, st, st.LocalAddr(), st.RemoteAddr()
	}
	return c
}

// idle reports whether c holds no live stream, listener or dial.
func (c *conn) idle() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.state == stIdle || c.state == stClosed || c.state == stFailed
}

// parked returns a context for a parked request: ended by hangup, by
// Close, or by the request's FUSE interrupt (cancel; virtio-fs never sends
// one, /dev/fuse does). stop must be called.
func (c *conn) parked(cancel <-chan struct{}) (ctx context.Context, stop func()) {
	ctx, end := context.WithCancel(c.ctx)
	if cancel == nil {
		return ctx, end
	}
	go func() {
		select {
		case <-cancel:
			end()
		case <-ctx.Done():
		}
	}()
	return ctx, end
}

// hangup ends c's stream, announcement or parked dial and completes every
// parked request. Idempotent.
func (c *conn) hangup() {
	c.mu.Lock()
	if c.state == stClosed {
		c.mu.Unlock()
		return
	}
	c.state = stClosed
	st, lst := c.st, c.lst
	c.lst = nil
	c.mu.Unlock()
	c.cancel()
	if lst != nil {
		lst.Close()
	}
	if st != nil {
		st.Close()
	}
}

// fail records a stream failure (a reset seen by a read or a write).
func (c *conn) fail(errno syscall.Errno, why string) {
	c.mu.Lock()
	if c.state == stEstablished {
		c.state, c.errno, c.why = stFailed, errno, why
	}
	c.mu.Unlock()
}

// ctl runs one ctl command.
func (c *conn) ctl(cancel <-chan struct{}, cmd Cmd) syscall.Errno {
	switch cmd.Verb {
	case VerbConnect:
		return c.connect(cancel, cmd.Addr)
	case VerbAnnounce:
		return c.announce(cmd)
	case VerbHangup:
		c.hangup()
		return 0
	}
	c.mu.Lock()
	st, state := c.st, c.state
	switch cmd.Verb {
	case VerbNoDelay:
		c.nodelay = cmd.On
	case VerbKeepalive:
		c.keepalive = cmd.Seconds
	}
	c.mu.Unlock()
	live := state == stEstablished
	switch cmd.Verb {
	case VerbNoDelay:
		if live {
			return errnoOf(st.SetNoDelay(cmd.On), syscall.EIO)
		}
	case VerbKeepalive:
		if live {
			return errnoOf(st.SetKeepAlive(time.Duration(cmd.Seconds)*time.Second), syscall.EIO)
		}
	case VerbShutdown:
		if !live {
			return syscall.ENOTCONN
		}
		return errnoOf(st.CloseWrite(), syscall.EPIPE)
	}
	return 0
}

// connect dials dst, parked until the stream is up or the dial fails.
func (c *conn) connect(cancel <-chan struct{}, dst netip.AddrPort) syscall.Errno {
	c.mu.Lock()
	switch c.state {
	case stIdle:
	case stEstablished:
		c.mu.Unlock()
		return syscall.EISCONN
	case stDialing:
		c.mu.Unlock()
		return syscall.EALREADY
	default:
		c.mu.Unlock()
		return syscall.EINVAL
	}
	c.state, c.remote = stDialing, dst
	c.mu.Unlock()

	ctx, stop := c.parked(cancel)
	st, err := c.fs.vm.DialFile(ctx, dst)
	hungup := c.ctx.Err() != nil
	stop()
	c.mu.Lock()
	if c.state != stDialing || hungup { // hung up while dialing
		c.mu.Unlock()
		if st != nil {
			st.Close()
		}
		return syscall.ECONNABORTED
	}
	if err != nil {
		errno := errnoOf(err, syscall.ECONNREFUSED)
		c.state, c.errno, c.why = stFailed, errno, reason(err)
		c.mu.Unlock()
		return errno
	}
	c.state, c.st, c.local = stEstablished, st, st.LocalAddr()
	nodelay, keepalive := c.nodelay, c.keepalive
	c.mu.Unlock()
	if nodelay {
		st.SetNoDelay(true)
	}
	if keepalive > 0 {
		st.SetKeepAlive(time.Duration(keepalive) * time.Second)
	}
	return 0
}

// reason is the policy detail of a failure, for status.
func reason(err error) string {
	switch {
	case errors.Is(err, sdpback.ErrDenied), errors.Is(err, sdpback.ErrLocal):
		var fe *sdpback.FileError
		if errors.As(err, &fe) && fe.Err != nil {
			return fe.Err.Error()
		}
	}
	return ""
}

// announce listens on the VM's fabric address.
func (c *conn) announce(cmd Cmd) syscall.Errno {
	vmAddr := c.fs.vm.Config().Addr
	if !cmd.Any && !cmd.Addr.Addr().IsUnspecified() && cmd.Addr.Addr() != vmAddr {
		return syscall.EADDRNOTAVAIL
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state != stIdle {
		return syscall.EISCONN
	}
	l, err := c.fs.vm.ListenFile(cmd.Addr.Port(), c.fs.opts.Backlog)
	if err != nil {
		return errnoOf(err, syscall.EADDRINUSE)
	}
	c.state, c.lst, c.local = stAnnounced, l, l.Addr()
	return 0
}

// accept parks until a call arrives on c's announcement.
func (c *conn) accept(cancel <-chan struct{}) (*sdpback.FileConn, syscall.Errno) {
	c.mu.Lock()
	l := c.lst
	ok := c.state == stAnnounced
	c.mu.Unlock()
	if !ok {
		return nil, syscall.EINVAL
	}
	ctx, stop := c.parked(cancel)
	defer stop()
	st, err := l.Accept(ctx)
	if err != nil {
		if c.ctx.Err() != nil { // hung up, or the filesystem closed
			return nil, syscall.ECONNABORTED
		}
		return nil, errnoOf(err, syscall.ECONNABORTED)
	}
	return st, 0
}

// stream returns the live stream, or the errno an operation gets
// without one (eof: reads see end of file).
func (c *conn) stream(write bool) (st *sdpback.FileConn, errno syscall.Errno, eof bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch c.state {
	case stEstablished:
		return c.st, 0, false
	case stClosed:
		if write {
			return nil, syscall.EPIPE, false
		}
		return nil, 0, true
	case stFailed:
		if c.errno == syscall.ECONNRESET {
			return nil, syscall.ECONNRESET, false
		}
	}
	return nil, syscall.ENOTCONN, false
}

// read reads the stream into buf (parked until data, EOF, reset or
// hangup).
func (c *conn) read(buf []byte) (int, syscall.Errno) {
	st, errno, eof := c.stream(false)
	if eof || errno != 0 {
		return 0, errno
	}
	if len(buf) == 0 {
		return 0, 0
	}
	n, err := st.Read(buf)
	if n > 0 || err == nil || err == io.EOF {
		return n, 0
	}
	if errors.Is(err, net.ErrClosed) {
		if _, _, eof := c.stream(false); eof {
			return 0, 0 // hung up here
		}
		return 0, syscall.ECONNRESET // closed under us (the VM went away)
	}
	errno = errnoOf(err, syscall.ECONNRESET)
	c.fail(errno, err.Error())
	return 0, errno
}

// write writes p to the stream (parked while the peer's window is full).
func (c *conn) write(p []byte) (int, syscall.Errno) {
	st, errno, _ := c.stream(true)
	if errno != 0 {
		return 0, errno
	}
	n, err := st.Write(p)
	if err == nil {
		return n, 0
	}
	switch {
	case errors.Is(err, net.ErrClosed), errors.Is(err, syscall.EPIPE):
		return n, syscall.EPIPE
	}
	errno = errnoOf(err, syscall.EIO)
	if errno == syscall.ECONNRESET {
		c.fail(errno, err.Error())
	}
	return n, errno
}

// failName names a failure in status, by errno.
func failName(e syscall.Errno) string {
	switch e {
	case syscall.ECONNREFUSED:
		return "Refused"
	case syscall.ETIMEDOUT:
		return "Timeout"
	case syscall.ENETUNREACH, syscall.EHOSTUNREACH:
		return "Unreachable"
	case syscall.EACCES, syscall.EPERM:
		return "Denied"
	case syscall.ECONNRESET:
		return "Reset"
	case syscall.ECONNABORTED, syscall.EINTR:
		return "Aborted"
	}
	return "Failed"
}

// text renders one of c's read-only files.
func (c *conn) text(k kind) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	var b strings.Builder
	switch k {
	case kLocal:
		b.WriteString(FormatAddr(c.local) + "\n")
	case kRemote:
		b.WriteString(FormatAddr(c.remote) + "\n")
	case kStatus:
		switch c.state {
		case stIdle:
			b.WriteString("Idle")
		case stDialing:
			b.WriteString("Dialing " + FormatAddr(c.remote))
		case stEstablished:
			b.WriteString("Established(" + strings.ToUpper(string(c.st.Path())) + ")")
		case stAnnounced:
			b.WriteString("Announced " + FormatAddr(c.local))
		case stClosed:
			b.WriteString("Closed")
		case stFailed:
			b.WriteString(failName(c.errno) + ": " + c.errno.Error())
			if c.why != "" {
				b.WriteString(" (" + c.why + ")")
			}
		}
		b.WriteByte('\n')
	case kStats:
		path := "none"
		var s sdpback.StreamStats
		if c.st != nil {
			s = c.st.Stats()
			path = string(s.Path)
		}
		onoff := "off"
		if c.nodelay {
			onoff = "on"
		}
		fmt.Fprintf(&b, "path %s\nout %d\nin %d\nlocal %s\nremote %s\nnodelay %s\nkeepalive %d\n",
			path, s.FromGuest, s.ToGuest, FormatAddr(c.local), FormatAddr(c.remote), onoff, c.keepalive)
	}
	return []byte(b.String())
}
