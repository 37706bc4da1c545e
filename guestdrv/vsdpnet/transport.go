package vsdpnet

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// transport makes the sockets that carry control and data: AF_VSOCK, or a
// test transport (see the package documentation).
type transport struct {
	cid, ctlPort uint32
	unixDir      string
	tcpCtl       int
}

func (t *transport) socket() (int, error) {
	dom := unix.AF_VSOCK
	switch {
	case t.unixDir != "":
		dom = unix.AF_UNIX
	case t.tcpCtl != 0:
		dom = unix.AF_INET
	}
	return unix.Socket(dom, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
}

func (t *transport) unixName(name string, port uint32) *unix.SockaddrUnix {
	return &unix.SockaddrUnix{Name: filepath.Join(t.unixDir, fmt.Sprintf("%s-%d", name, port))}
}

// hostAddr is the address of a host port (the control port when ctl).
func (t *transport) hostAddr(port uint32, ctl bool) (unix.Sockaddr, error) {
	switch {
	case t.unixDir != "":
		if ctl {
			return &unix.SockaddrUnix{Name: filepath.Join(t.unixDir, "ctl")}, nil
		}
		return t.unixName("host", port), nil
	case t.tcpCtl != 0:
		if ctl {
			port = uint32(t.tcpCtl)
		}
		if port == 0 || port > 65535 {
			return nil, unix.ECONNREFUSED
		}
		return &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}, Port: int(port)}, nil
	}
	if ctl {
		port = t.ctlPort
	}
	return &unix.SockaddrVM{CID: t.cid, Port: port}, nil
}

func randomPort() uint32 {
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		return 0x10000000 | uint32(time.Now().UnixNano())&0x6fffffff
	}
	return 0x10000000 | binary.LittleEndian.Uint32(b[:])&0x6fffffff
}

// prepareDial readies a dialing socket: the vsock connect timeout (above
// the host's deadline), or a name for the Unix transport's dialer.
func (t *transport) prepareDial(fd int, timeout time.Duration) error {
	switch {
	case t.unixDir != "":
		return t.bindUnique(fd, "g")
	case t.tcpCtl != 0:
		return nil
	}
	d := timeout + timeout/4 + time.Second
	tv := unix.NsecToTimeval(d.Nanoseconds())
	return unix.SetsockoptTimeval(fd, unix.AF_VSOCK, unix.SO_VM_SOCKETS_CONNECT_TIMEOUT, &tv)
}

func (t *transport) bindUnique(fd int, name string) error {
	var err error
	for range 16 {
		if err = unix.Bind(fd, t.unixName(name, randomPort())); err != unix.EADDRINUSE {
			return err
		}
	}
	return err
}

// bindListen binds a listening socket to a port of the kernel's choosing.
func (t *transport) bindListen(fd int) error {
	switch {
	case t.unixDir != "":
		return t.bindUnique(fd, "guest")
	case t.tcpCtl != 0:
		return unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}})
	}
	return unix.Bind(fd, &unix.SockaddrVM{CID: unix.VMADDR_CID_ANY, Port: unix.VMADDR_PORT_ANY})
}

// portOf reads the port from a transport address.
func (t *transport) portOf(sa unix.Sockaddr) (uint32, bool) {
	switch a := sa.(type) {
	case *unix.SockaddrVM:
		return a.Port, t.unixDir == "" && t.tcpCtl == 0
	case *unix.SockaddrInet4:
		return uint32(a.Port), t.tcpCtl != 0
	case *unix.SockaddrUnix:
		i := strings.LastIndexByte(a.Name, '-')
		if t.unixDir == "" || i < 0 {
			return 0, false
		}
		v, err := strconv.ParseUint(a.Name[i+1:], 10, 32)
		return uint32(v), err == nil
	}
	return 0, false
}

func (t *transport) localPort(fd int) (uint32, bool) {
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return 0, false
	}
	return t.portOf(sa)
}

// forget removes a Unix transport name once the host has read it.
func (t *transport) forget(fd int) {
	if t.unixDir == "" {
		return
	}
	if sa, err := unix.Getsockname(fd); err == nil {
		if u, ok := sa.(*unix.SockaddrUnix); ok && u.Name != "" {
			os.Remove(u.Name)
		}
	}
}

// isRefusal reports the errnos a refused device connect shows: vsock's RST
// (ECONNRESET), and AF_UNIX's and TCP's refusals.
func isRefusal(err error) bool {
	return err == unix.ECONNRESET || err == unix.ECONNREFUSED || err == unix.ENOENT || err == unix.EPROTO
}
