package sdpback

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/vsdp/vsdp/sdpback/sdp"
)

// File streams: the same streams as the vsock path, for a device whose
// guest side is plain read and write calls (the socket filesystem,
// sdpback/sockfs) rather than a guest socket with its own buffers. The
// device calls blocking Read and Write on a FileConn instead of the
// Handler push/pull interfaces; policy, limits, the listener registry and
// accounting are the VM's, shared with vsock streams.

// Sentinel causes carried by a *FileError.
var (
	// ErrDenied: the VM's policy refuses the destination (the FileError's
	// errno is the rule's, EACCES by default).
	ErrDenied = errors.New("sdpback: denied by policy")
	// ErrLocal: the policy sends the destination to the guest's own TCP
	// stack, which a file stream cannot use (errno ENETUNREACH).
	ErrLocal = errors.New("sdpback: policy routes the destination to the guest's own stack (local)")
	// ErrLimit: the VM's stream or listener limit is reached (errno EAGAIN
	// for streams, ENOBUFS for listeners).
	ErrLimit = errors.New("sdpback: VM limit reached")
)

// FileError is a failed file-stream operation: the errno a TCP user
// expects (the device returns it to the guest) and the cause.
type FileError struct {
	Op    string // "dial", "listen", "accept"
	Addr  netip.AddrPort
	Errno syscall.Errno
	Err   error
}

func (e *FileError) Error() string {
	s := fmt.Sprintf("sdpback: %s %v: %v", e.Op, e.Addr, e.Errno)
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

// Unwrap makes errors.Is match both the errno and the cause.
func (e *FileError) Unwrap() []error { return []error{e.Errno, e.Err} }

// FileConn is one file-facing stream: an SDP or host TCP connection in
// the VM's stream table. Read and Write block; Close ends it (Read then
// returns net.ErrClosed, as a hung-up stream should).
type FileConn struct {
	vm     *VM
	path   Path
	conn   net.Conn
	sdp    *sdp.Conn // nil for host TCP
	local  netip.AddrPort
	remote netip.AddrPort

	closed    atomic.Bool
	keepalive atomic.Int64 // requested period (ns); SDP uses the stack's

	fromGuest, toGuest atomic.Uint64
}

// Path says whether the stream is carried by SDP or host TCP.
func (c *FileConn) Path() Path { return c.path }

// LocalAddr is the stream's local fabric (or host) address.
func (c *FileConn) LocalAddr() netip.AddrPort { return c.local }

// RemoteAddr is the peer's address.
func (c *FileConn) RemoteAddr() netip.AddrPort { return c.remote }

// Read reads bytes the peer sent (blocking). io.EOF after the peer's
// close; an error matching ECONNRESET after a reset; net.ErrClosed after
// Close.
func (c *FileConn) Read(p []byte) (int, error) {
	n, err := c.conn.Read(p)
	if n > 0 {
		c.toGuest.Add(uint64(n))
		c.vm.toGuest.Add(uint64(n))
	}
	return n, err
}

// Write sends p (blocking while the peer's window is full). After
// CloseWrite it fails with EPIPE, after Close with net.ErrClosed.
func (c *FileConn) Write(p []byte) (int, error) {
	n, err := c.conn.Write(p)
	if n > 0 {
		c.fromGuest.Add(uint64(n))
		c.vm.fromGuest.Add(uint64(n))
	}
	return n, err
}

// CloseWrite half-closes the stream: the peer reads EOF after the data
// written so far.
func (c *FileConn) CloseWrite() error {
	if cw, ok := c.conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// SetNoDelay turns Nagle-style coalescing off (on=true) or on.
func (c *FileConn) SetNoDelay(on bool) error {
	if c.sdp != nil {
		c.sdp.SetNoDelay(on)
		return nil
	}
	if tc, ok := c.conn.(*net.TCPConn); ok {
		return tc.SetNoDelay(on)
	}
	return nil
}

// SetKeepAlive asks for keepalive probes on an idle stream every d (0:
// off). Host TCP applies it per connection; the SDP engine's keepalive is
// a stack setting (sdp.Config.Keepalive), so on SDP the request is only
// recorded (Keepalive reports it).
func (c *FileConn) SetKeepAlive(d time.Duration) error {
	c.keepalive.Store(int64(d))
	if tc, ok := c.conn.(*net.TCPConn); ok {
		if d <= 0 {
			return tc.SetKeepAlive(false)
		}
		if err := tc.SetKeepAlive(true); err != nil {
			return err
		}
		return tc.SetKeepAlivePeriod(d)
	}
	return nil
}

// Keepalive returns the period last asked for with SetKeepAlive.
func (c *FileConn) Keepalive() time.Duration { return time.Duration(c.keepalive.Load()) }

// Stats returns the stream's counters (FromGuest: written; ToGuest: read).
func (c *FileConn) Stats() StreamStats {
	return StreamStats{Path: c.path, Local: c.local, Remote: c.remote, FromGuest: c.fromGuest.Load(), ToGuest: c.toGuest.Load()}
}

// Close ends the stream gracefully (abortively when received data is
// unread, as a TCP close would) and removes it from the VM's table.
// Blocked Reads and Writes return net.ErrClosed. Idempotent.
func (c *FileConn) Close() error {
	if c.closed.Swap(true) {
		return nil
	}
	c.vm.mu.Lock()
	delete(c.vm.files, c)
	c.vm.mu.Unlock()
	return c.conn.Close()
}

// Abort resets the stream (the peer sees ECONNRESET) and removes it.
func (c *FileConn) Abort() {
	if c.sdp != nil {
		c.sdp.Abort()
	} else if tc, ok := c.conn.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.Close()
}

// DialFile opens a file stream to dst under the VM's policy: over SDP,
// over host TCP where a rule says tcp, refused with the rule's errno where
// one denies it (ErrDenied), and refused with ENETUNREACH where one says
// local (ErrLocal: a file stream has no guest stack to fall back to). The
// dial is bounded by the VM's DialTimeout and by ctx (a cancelled ctx
// gives ECONNABORTED). Failures are *FileError with ECONNREFUSED,
// ETIMEDOUT, ENETUNREACH, EHOSTUNREACH, EAGAIN (stream limit) or
// ENETDOWN (the VM is closed).
func (vm *VM) DialFile(ctx context.Context, dst netip.AddrPort) (*FileConn, error) {
	fail := func(errno syscall.Errno, err error) (*FileConn, error) {
		return nil, &FileError{Op: "dial", Addr: dst, Errno: errno, Err: err}
	}
	action, errno := vm.cfg.Policy.Decide(dst)
	vm.mu.Lock()
	vm.stats.Dials++
	switch {
	case action == Deny:
		vm.stats.Denied++
		vm.mu.Unlock()
		if r, ok := vm.cfg.Policy.rule(dst); ok {
			return fail(errno, fmt.Errorf("%w (rule %q)", ErrDenied, r.String()))
		}
		return fail(errno, fmt.Errorf("%w (no rule matches)", ErrDenied))
	case action == Local:
		vm.stats.Locals++
		vm.mu.Unlock()
		return fail(syscall.ENETUNREACH, ErrLocal)
	case vm.closed:
		vm.mu.Unlock()
		return fail(syscall.ENETDOWN, net.ErrClosed)
	case vm.streamCountLocked() >= vm.cfg.MaxStreams:
		vm.stats.Denied++
		vm.mu.Unlock()
		return fail(syscall.EAGAIN, ErrLimit)
	}
	vm.filePending++ // holds a stream slot while the dial runs
	vmctx := vm.ctx
	vm.mu.Unlock()
	defer func() {
		vm.mu.Lock()
		vm.filePending--
		vm.mu.Unlock()
	}()

	dctx, cancel := context.WithTimeout(ctx, vm.cfg.DialTimeout)
	defer cancel()
	stop := context.AfterFunc(vmctx, cancel) // VM close ends the dial
	defer stop()
	c := &FileConn{vm: vm, remote: dst, local: netip.AddrPortFrom(vm.cfg.Addr, 0)}
	var err error
	if action == SDP {
		c.path = PathSDP
		var sc *sdp.Conn
		if sc, err = vm.stack.Dial(dctx, dst); err == nil {
			c.conn, c.sdp = sc, sc
			if a, ok := sc.LocalAddr().(sdp.Addr); ok {
				c.local = a.AddrPort
			}
		}
	} else {
		c.path = PathHostTCP
		var d net.Dialer
		if c.conn, err = d.DialContext(dctx, "tcp", dst.String()); err == nil {
			c.local = c.conn.LocalAddr().(*net.TCPAddr).AddrPort()
		}
	}
	if err != nil {
		vm.mu.Lock()
		vm.stats.DialFailures++
		vm.mu.Unlock()
		switch {
		case vmctx.Err() != nil:
			return fail(syscall.ENETDOWN, err)
		case ctx.Err() == context.Canceled:
			return fail(syscall.ECONNABORTED, err)
		}
		return fail(errnoOf(err), err)
	}
	vm.mu.Lock()
	if vm.closed {
		vm.mu.Unlock()
		c.conn.Close()
		return fail(syscall.ENETDOWN, net.ErrClosed)
	}
	vm.files[c] = struct{}{}
	vm.mu.Unlock()
	return c, nil
}

// rule returns the first rule matching dst.
func (p Policy) rule(dst netip.AddrPort) (Rule, bool) {
	for _, r := range p {
		if r.Match(dst) {
			return r, true
		}
	}
	return Rule{}, false
}

// FileListener is a port announced on the VM's fabric address whose
// connections are accepted as file streams. It shares the VM's listener
// registry with the control protocol's LISTEN, so ports never collide.
type FileListener struct {
	vm   *VM
	gl   *guestListener
	port uint16
	once sync.Once
}

// ListenFile announces port (0: the VM picks a free port from 49152 up)
// on the VM's fabric address. Failures are *FileError with EADDRINUSE,
// ENOBUFS (listener limit) or ENETDOWN (the VM is closed).
func (vm *VM) ListenFile(port uint16, backlog int) (*FileListener, error) {
	addr := netip.AddrPortFrom(vm.cfg.Addr, port)
	vm.mu.Lock()
	if vm.closed {
		vm.mu.Unlock()
		return nil, &FileError{Op: "listen", Addr: addr, Errno: syscall.ENETDOWN, Err: net.ErrClosed}
	}
	if len(vm.listeners) >= vm.cfg.MaxListen {
		vm.mu.Unlock()
		return nil, &FileError{Op: "listen", Addr: addr, Errno: syscall.ENOBUFS, Err: ErrLimit}
	}
	gl := &guestListener{vm: vm}
	port, ok := vm.reservePortLocked(port, gl)
	vm.mu.Unlock()
	if !ok {
		return nil, &FileError{Op: "listen", Addr: addr, Errno: syscall.EADDRINUSE}
	}
	addr = netip.AddrPortFrom(vm.cfg.Addr, port)
	l, err := vm.stack.Listen(port, max(1, min(backlog, 1024)))
	if err != nil {
		vm.mu.Lock()
		delete(vm.listeners, port)
		vm.mu.Unlock()
		return nil, &FileError{Op: "listen", Addr: addr, Errno: syscall.EADDRINUSE, Err: err}
	}
	vm.mu.Lock()
	if vm.closed || vm.listeners[port] != gl {
		vm.mu.Unlock()
		l.Close()
		return nil, &FileError{Op: "listen", Addr: addr, Errno: syscall.ENETDOWN, Err: net.ErrClosed}
	}
	gl.l = l
	vm.mu.Unlock()
	return &FileListener{vm: vm, gl: gl, port: port}, nil
}

// Addr is the announced fabric address.
func (l *FileListener) Addr() netip.AddrPort { return netip.AddrPortFrom(l.vm.cfg.Addr, l.port) }

// Accept waits for the next connection, or ctx's end, or Close. A
// connection that would exceed the VM's stream limit is reset and the
// wait goes on.
func (l *FileListener) Accept(ctx context.Context) (*FileConn, error) {
	vm := l.vm
	for {
		sc, err := l.gl.l.AcceptSDP(ctx)
		if err != nil {
			errno := syscall.EINVAL // closed (hung up)
			if ctx.Err() != nil {
				errno = syscall.EINTR
			}
			return nil, &FileError{Op: "accept", Addr: l.Addr(), Errno: errno, Err: err}
		}
		c := &FileConn{vm: vm, path: PathSDP, conn: sc, sdp: sc,
			local: sc.LocalAddr().(sdp.Addr).AddrPort, remote: sc.RemoteAddr().(sdp.Addr).AddrPort}
		vm.mu.Lock()
		if vm.closed {
			vm.mu.Unlock()
			sc.Abort()
			return nil, &FileError{Op: "accept", Addr: l.Addr(), Errno: syscall.ENETDOWN, Err: net.ErrClosed}
		}
		if vm.streamCountLocked() >= vm.cfg.MaxStreams {
			vm.mu.Unlock()
			sc.Abort()
			continue
		}
		vm.files[c] = struct{}{}
		vm.mu.Unlock()
		return c, nil
	}
}

// Close withdraws the announcement; a blocked Accept returns. Idempotent.
func (l *FileListener) Close() error {
	l.once.Do(func() {
		vm := l.vm
		vm.mu.Lock()
		if vm.listeners[l.port] == l.gl {
			delete(vm.listeners, l.port)
		}
		vm.mu.Unlock()
		l.gl.l.Close()
	})
	return nil
}
