package vsdpnet

import (
	"context"
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vsdp/vsdp/guestdrv/ctl"
)

// Listener accepts streams the host routes to a guest vsock port.
type Listener struct {
	f      *os.File
	rc     syscall.RawConn
	c      *Client
	port   uint32
	addr   *net.TCPAddr
	closed atomic.Bool
}

var _ net.Listener = (*Listener)(nil)

func (l *Listener) opErr(err error) error {
	if err == nil {
		return nil
	}
	return &net.OpError{Op: "accept", Net: "tcp", Addr: l.addr, Err: netErr("accept", err)}
}

// Accept waits for the next stream.
func (l *Listener) Accept() (net.Conn, error) {
	c, err := l.AcceptVSDP()
	if err != nil {
		return nil, err
	}
	return c, nil
}

// AcceptVSDP is Accept returning the *Conn.
func (l *Listener) AcceptVSDP() (*Conn, error) {
	var (
		nfd  int
		sa   unix.Sockaddr
		aerr error
	)
	err := l.rc.Read(func(fd uintptr) bool {
		for {
			nfd, sa, aerr = unix.Accept4(int(fd), unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
			if aerr != unix.EINTR && aerr != unix.ECONNABORTED {
				break
			}
		}
		return aerr != unix.EAGAIN
	})
	if err == nil {
		err = aerr
	}
	if err != nil && l.closed.Load() {
		// RawConn reports a file closed under it as poll's "use of
		// closed file", which os.ErrClosed does not match.
		err = net.ErrClosed
	}
	if err != nil {
		return nil, l.opErr(err)
	}
	hp, _ := l.c.tr.portOf(sa)
	f := os.NewFile(uintptr(nfd), "vsdp")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, l.opErr(err)
	}
	c := &Conn{f: f, rc: rc, ctl: &l.c.ctl, gport: l.port, hport: hp, local: l.addr, remote: &net.TCPAddr{}}
	m, ok := l.c.ctl.take(ctl.TypePeer, hp, l.port, noteWait)
	if !ok {
		// the PEER went elsewhere, or never came: ask
		if w, err := l.c.ctl.request(context.Background(), ctl.Msg{Type: ctl.TypeWho, GuestPort: l.port, HostPort: hp}); err == nil && w.Type == ctl.TypeWhoOK {
			m, ok = w, true
		}
	}
	if ok {
		c.local, c.remote = tcpAddr(m.Local), tcpAddr(m.Remote)
	}
	return c, nil
}

// Close stops listening: the host withdraws the port, and a blocked Accept
// returns net.ErrClosed.
func (l *Listener) Close() error {
	if !l.closed.CompareAndSwap(false, true) {
		return l.opErr(net.ErrClosed)
	}
	l.c.ctl.send(ctl.Msg{Type: ctl.TypeUnlisten, Port: l.port})
	return l.opErr(l.f.Close())
}

// Addr returns the address the host exported.
func (l *Listener) Addr() net.Addr { return l.addr }

// SetDeadline sets a deadline for Accept.
func (l *Listener) SetDeadline(t time.Time) error { return l.opErr(l.f.SetReadDeadline(t)) }
