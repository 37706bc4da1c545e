package vsdpnet

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vsdp/vsdp/guestdrv/ctl"
)

// Errors.
var (
	// ErrNoDevice: the host's control service could not be reached or
	// stopped answering.
	ErrNoDevice = errors.New("vsdpnet: no vsdp device")
	// ErrProtocol: the host broke the control protocol; the control
	// connection was closed.
	ErrProtocol = errors.New("vsdpnet: control protocol violation")
)

// Options configure a Client. The zero value means: AF_VSOCK to CID 2,
// port ctl.DefaultPort, unless the environment (VSDP_HOST_CID,
// VSDP_CTL_PORT, VSDP_TEST_UNIX_DIR, VSDP_TEST_TCP_PORT) says otherwise.
type Options struct {
	HostCID uint32        // the host's CID; default 2
	CtlPort uint32        // the control port; default ctl.DefaultPort
	Timeout time.Duration // for the host's answers; default 5 s
	// Fallback dials and listens on the guest's own TCP stack when the
	// device cannot be reached (libvsdp's "both"). Default: fail.
	Fallback bool
	// UnixDir and TCPPort select a test transport (see the package
	// documentation).
	UnixDir string
	TCPPort int
	// NoEnv ignores the environment.
	NoEnv bool
}

// Client dials and listens through one control connection.
type Client struct {
	opt    Options
	tr     transport
	ctl    ctlConn
	closed atomic.Bool
}

// New returns a Client. It connects to the host on first use.
func New(o Options) *Client {
	if !o.NoEnv {
		envU32 := func(name string, dst *uint32) {
			if v, err := strconv.ParseUint(os.Getenv(name), 10, 32); err == nil && *dst == 0 {
				*dst = uint32(v)
			}
		}
		envU32("VSDP_HOST_CID", &o.HostCID)
		envU32("VSDP_CTL_PORT", &o.CtlPort)
		if o.UnixDir == "" && o.TCPPort == 0 {
			if d := os.Getenv("VSDP_TEST_UNIX_DIR"); d != "" {
				o.UnixDir = d
			} else if p, err := strconv.Atoi(os.Getenv("VSDP_TEST_TCP_PORT")); err == nil {
				o.TCPPort = p
			}
		}
	}
	if o.HostCID == 0 {
		o.HostCID = unix.VMADDR_CID_HOST
	}
	if o.CtlPort == 0 {
		o.CtlPort = ctl.DefaultPort
	}
	if o.Timeout <= 0 {
		o.Timeout = 5 * time.Second
	}
	c := &Client{opt: o}
	c.tr = transport{cid: o.HostCID, ctlPort: o.CtlPort, unixDir: o.UnixDir, tcpCtl: o.TCPPort}
	c.ctl = ctlConn{tr: &c.tr, timeout: o.Timeout}
	return c
}

// Close closes the control connection: the host withdraws this client's
// listeners. Streams already open keep working. Close is idempotent.
func (c *Client) Close() error {
	c.closed.Store(true)
	return c.ctl.close()
}

var defaultClient = sync.OnceValue(func() *Client { return New(Options{}) })

// Dial dials address over the device with the default Client.
func Dial(network, address string) (net.Conn, error) {
	return defaultClient().DialContext(context.Background(), network, address)
}

// DialContext is Dial with a context.
func DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	return defaultClient().DialContext(ctx, network, address)
}

// Listen listens on address over the device with the default Client.
func Listen(network, address string) (net.Listener, error) {
	return defaultClient().Listen(network, address)
}

func validErrno(e int32, fallback syscall.Errno) syscall.Errno {
	if e > 0 && e < 4096 {
		return syscall.Errno(e)
	}
	return fallback
}

func tcpAddr(a netip.AddrPort) *net.TCPAddr {
	if !a.IsValid() {
		return &net.TCPAddr{}
	}
	return net.TCPAddrFromAddrPort(a)
}

// resolve turns "host:port" into one address of the network's family.
func resolve(ctx context.Context, network, address string) (netip.AddrPort, error) {
	if ap, err := netip.ParseAddrPort(address); err == nil {
		ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
		if (network == "tcp4" && !ap.Addr().Is4()) || (network == "tcp6" && ap.Addr().Is4()) {
			return netip.AddrPort{}, &net.AddrError{Err: "address of the wrong family", Addr: address}
		}
		return ap, nil
	}
	host, port, err := net.SplitHostPort(address)
	if err != nil {
		return netip.AddrPort{}, err
	}
	p, err := net.DefaultResolver.LookupPort(ctx, network, port)
	if err != nil {
		return netip.AddrPort{}, err
	}
	if host == "" {
		if network == "tcp6" {
			return netip.AddrPortFrom(netip.IPv6Unspecified(), uint16(p)), nil
		}
		return netip.AddrPortFrom(netip.IPv4Unspecified(), uint16(p)), nil
	}
	fam := map[string]string{"tcp": "ip", "tcp4": "ip4", "tcp6": "ip6"}[network]
	ips, err := net.DefaultResolver.LookupNetIP(ctx, fam, host)
	if err != nil {
		return netip.AddrPort{}, err
	}
	if len(ips) == 0 {
		return netip.AddrPort{}, &net.DNSError{Err: "no address", Name: host, IsNotFound: true}
	}
	return netip.AddrPortFrom(ips[0].Unmap(), uint16(p)), nil
}

func checkNetwork(op, network string) error {
	switch network {
	case "tcp", "tcp4", "tcp6":
		return nil
	}
	return &net.OpError{Op: op, Net: network, Err: net.UnknownNetworkError(network)}
}

// DialContext dials address ("host:port") through the device.
func (c *Client) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	if err := checkNetwork("dial", network); err != nil {
		return nil, err
	}
	if c.closed.Load() {
		return nil, &net.OpError{Op: "dial", Net: network, Err: net.ErrClosed}
	}
	dst, err := resolve(ctx, network, address)
	if err != nil {
		return nil, &net.OpError{Op: "dial", Net: network, Err: err}
	}
	opErr := func(err error) error {
		return &net.OpError{Op: "dial", Net: network, Addr: tcpAddr(dst), Err: err}
	}
	// Go's TCP connections have NODELAY and keepalive on by default.
	rep, err := c.ctl.request(ctx, ctl.Msg{Type: ctl.TypeDial, Remote: dst, Flags: ctl.DialNoDelay | ctl.DialKeepAlive})
	if err != nil {
		if c.opt.Fallback && errors.Is(err, ErrNoDevice) {
			return (&net.Dialer{}).DialContext(ctx, network, address)
		}
		return nil, opErr(err)
	}
	switch rep.Type {
	case ctl.TypeLocal:
		return (&net.Dialer{}).DialContext(ctx, network, dst.String())
	case ctl.TypeDeny:
		return nil, opErr(os.NewSyscallError("connect", validErrno(rep.Errno, syscall.EACCES)))
	case ctl.TypeTicket:
		return c.dialTicket(ctx, rep, dst, opErr)
	}
	return nil, opErr(fmt.Errorf("%w: %v answers DIAL", ErrProtocol, rep.Type))
}

// Dial is DialContext without a context.
func (c *Client) Dial(network, address string) (net.Conn, error) {
	return c.DialContext(context.Background(), network, address)
}

func (c *Client) dialTicket(ctx context.Context, t ctl.Msg, dst netip.AddrPort, opErr func(error) error) (net.Conn, error) {
	timeout := time.Duration(t.Timeout) * time.Millisecond
	fd, err := c.tr.socket()
	if err != nil {
		return nil, opErr(os.NewSyscallError("socket", err))
	}
	if err := c.tr.prepareDial(fd, timeout); err != nil {
		unix.Close(fd)
		return nil, opErr(os.NewSyscallError("setsockopt", err))
	}
	f := os.NewFile(uintptr(fd), "vsdp")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, opErr(err)
	}
	sa, err := c.tr.hostAddr(t.Port, false)
	if err == nil {
		err = connect(ctx, f, rc, sa)
	}
	rc.Control(func(fd uintptr) { c.tr.forget(int(fd)) })
	if err != nil {
		f.Close()
		if ctx.Err() != nil {
			return nil, opErr(ctx.Err())
		}
		errno, ok := err.(syscall.Errno)
		if !ok {
			return nil, opErr(err)
		}
		if isRefusal(errno) || errno == syscall.ETIMEDOUT {
			wait := min(c.opt.Timeout, 2*time.Second)
			if m, ok := c.ctl.take(ctl.TypeResult, t.Port, 0, wait); ok && m.Errno != 0 {
				errno = validErrno(m.Errno, syscall.ECONNREFUSED)
			} else if errno != syscall.ETIMEDOUT {
				errno = syscall.ECONNREFUSED
			}
		}
		return nil, opErr(os.NewSyscallError("connect", errno))
	}
	conn := &Conn{f: f, rc: rc, ctl: &c.ctl, hport: t.Port, remote: tcpAddr(dst), local: &net.TCPAddr{}}
	rc.Control(func(fd uintptr) { conn.gport, _ = c.tr.localPort(int(fd)) })
	if m, ok := c.ctl.take(ctl.TypeResult, t.Port, 0, noteWait); ok {
		conn.local, conn.remote = tcpAddr(m.Local), tcpAddr(m.Remote)
	}
	return conn, nil
}

// Listen listens on address ("host:port", host optional) through the
// device. The host chooses the port when it is 0.
func (c *Client) Listen(network, address string) (net.Listener, error) {
	if err := checkNetwork("listen", network); err != nil {
		return nil, err
	}
	if c.closed.Load() {
		return nil, &net.OpError{Op: "listen", Net: network, Err: net.ErrClosed}
	}
	bind, err := resolve(context.Background(), network, address)
	if err != nil {
		return nil, &net.OpError{Op: "listen", Net: network, Err: err}
	}
	opErr := func(err error) error {
		return &net.OpError{Op: "listen", Net: network, Addr: tcpAddr(bind), Err: err}
	}
	fd, err := c.tr.socket()
	if err != nil {
		return nil, opErr(os.NewSyscallError("socket", err))
	}
	var port uint32
	if err = c.tr.bindListen(fd); err == nil {
		if err = unix.Listen(fd, unix.SOMAXCONN); err == nil {
			var ok bool
			if port, ok = c.tr.localPort(fd); !ok {
				err = unix.EINVAL
			}
		}
	}
	if err != nil {
		unix.Close(fd)
		return nil, opErr(os.NewSyscallError("listen", err))
	}
	f := os.NewFile(uintptr(fd), "vsdp-listener")
	rep, err := c.ctl.request(context.Background(), ctl.Msg{Type: ctl.TypeListen, Local: bind, Backlog: unix.SOMAXCONN, Port: port})
	if err != nil {
		f.Close()
		if c.opt.Fallback && errors.Is(err, ErrNoDevice) {
			return net.Listen(network, address)
		}
		return nil, opErr(err)
	}
	switch rep.Type {
	case ctl.TypeListenOK:
	case ctl.TypeDeny:
		f.Close()
		return nil, opErr(os.NewSyscallError("listen", validErrno(rep.Errno, syscall.EACCES)))
	case ctl.TypeLocal:
		f.Close()
		return net.Listen(network, address)
	default:
		f.Close()
		return nil, opErr(fmt.Errorf("%w: %v answers LISTEN", ErrProtocol, rep.Type))
	}
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, opErr(err)
	}
	bound := rep.Local
	if !bound.IsValid() {
		bound = bind
	}
	return &Listener{f: f, rc: rc, c: c, port: port, addr: tcpAddr(bound)}, nil
}
