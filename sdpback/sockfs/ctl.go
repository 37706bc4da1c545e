package sockfs

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// Verb is a ctl command.
type Verb uint8

// Verbs, as written to tcp/N/ctl.
const (
	VerbConnect   Verb = iota + 1 // connect ADDR!PORT
	VerbAnnounce                  // announce *!PORT | ADDR!PORT
	VerbHangup                    // hangup
	VerbKeepalive                 // keepalive [SECONDS]
	VerbNoDelay                   // nodelay [on|off]
	VerbShutdown                  // shutdown (half close: the peer reads EOF)
)

var verbNames = [...]string{VerbConnect: "connect", VerbAnnounce: "announce", VerbHangup: "hangup",
	VerbKeepalive: "keepalive", VerbNoDelay: "nodelay", VerbShutdown: "shutdown"}

func (v Verb) String() string {
	if int(v) < len(verbNames) && verbNames[v] != "" {
		return verbNames[v]
	}
	return "Verb(" + strconv.Itoa(int(v)) + ")"
}

// Limits of the ctl language.
const (
	// MaxCtl is the longest ctl write accepted (one command per write).
	MaxCtl = 256
	// MaxKeepalive is the longest keepalive period, in seconds.
	MaxKeepalive = 24 * 60 * 60
	// DefaultKeepalive is the period of a bare "keepalive", in seconds.
	DefaultKeepalive = 30
)

// ErrCtl is the cause of every ctl parse failure (the guest sees EINVAL).
var ErrCtl = errors.New("sockfs: bad ctl command")

// Cmd is one parsed ctl command.
type Cmd struct {
	Verb Verb
	// Addr: connect's destination; announce's local address (Any: "*").
	Addr netip.AddrPort
	Any  bool
	// Seconds: keepalive's period (0: off).
	Seconds int
	// On: nodelay's setting.
	On bool
}

// String formats c in the ctl language; ParseCmd(c.String()) == c.
func (c Cmd) String() string {
	switch c.Verb {
	case VerbConnect:
		return "connect " + FormatAddr(c.Addr)
	case VerbAnnounce:
		if c.Any {
			return "announce *!" + strconv.Itoa(int(c.Addr.Port()))
		}
		return "announce " + FormatAddr(c.Addr)
	case VerbKeepalive:
		return "keepalive " + strconv.Itoa(c.Seconds)
	case VerbNoDelay:
		if c.On {
			return "nodelay on"
		}
		return "nodelay off"
	}
	return c.Verb.String()
}

// FormatAddr writes an address the Plan 9 way: "10.1.0.7!5000".
func FormatAddr(a netip.AddrPort) string {
	if !a.IsValid() {
		return "0.0.0.0!0"
	}
	return a.Addr().String() + "!" + strconv.Itoa(int(a.Port()))
}

func bad(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrCtl}, args...)...)
}

// ParseCmd parses one ctl write: a verb and its arguments separated by
// blanks, at most MaxCtl bytes, with at most one trailing newline. Every
// failure wraps ErrCtl.
func ParseCmd(b []byte) (Cmd, error) {
	if len(b) > MaxCtl {
		return Cmd{}, bad("%d bytes, the limit is %d", len(b), MaxCtl)
	}
	s := string(b)
	s = strings.TrimSuffix(s, "\n")
	s = strings.TrimSuffix(s, "\r")
	for _, r := range s {
		if r < ' ' && r != '\t' || r == 0x7f || r >= 0x80 {
			return Cmd{}, bad("control or non-ASCII byte %q", r)
		}
	}
	f := strings.Fields(s)
	if len(f) == 0 {
		return Cmd{}, bad("empty command")
	}
	var c Cmd
	args := f[1:]
	nargs := func(lo, hi int) error {
		if len(args) < lo || len(args) > hi {
			return bad("%s takes %d..%d arguments, got %d", f[0], lo, hi, len(args))
		}
		return nil
	}
	var err error
	switch f[0] {
	case "connect":
		c.Verb = VerbConnect
		if err = nargs(1, 1); err != nil {
			return Cmd{}, err
		}
		if c.Addr, err = parseAddr(args[0], false); err != nil {
			return Cmd{}, err
		}
		if c.Addr.Port() == 0 || c.Addr.Addr().IsUnspecified() {
			return Cmd{}, bad("connect needs an address and a port, got %q", args[0])
		}
	case "announce":
		c.Verb = VerbAnnounce
		if err = nargs(1, 1); err != nil {
			return Cmd{}, err
		}
		if host, port, ok := strings.Cut(args[0], "!"); ok && host == "*" {
			p, err := parsePort(port)
			if err != nil {
				return Cmd{}, err
			}
			c.Any, c.Addr = true, netip.AddrPortFrom(netip.IPv4Unspecified(), p)
		} else if c.Addr, err = parseAddr(args[0], true); err != nil {
			return Cmd{}, err
		}
	case "hangup":
		c.Verb = VerbHangup
		if err = nargs(0, 0); err != nil {
			return Cmd{}, err
		}
	case "shutdown":
		c.Verb = VerbShutdown
		if err = nargs(0, 0); err != nil {
			return Cmd{}, err
		}
	case "keepalive":
		c.Verb = VerbKeepalive
		if err = nargs(0, 1); err != nil {
			return Cmd{}, err
		}
		c.Seconds = DefaultKeepalive
		if len(args) == 1 {
			n, err := strconv.ParseUint(args[0], 10, 32)
			if err != nil || n > MaxKeepalive {
				return Cmd{}, bad("keepalive period %q: want 0..%d seconds", args[0], MaxKeepalive)
			}
			c.Seconds = int(n)
		}
	case "nodelay":
		c.Verb = VerbNoDelay
		if err = nargs(0, 1); err != nil {
			return Cmd{}, err
		}
		c.On = true
		if len(args) == 1 {
			switch args[0] {
			case "on":
			case "off":
				c.On = false
			default:
				return Cmd{}, bad("nodelay %q: want on or off", args[0])
			}
		}
	default:
		return Cmd{}, bad("unknown verb %q", f[0])
	}
	return c, nil
}

// parseAddr parses "ADDR!PORT" (IPv4 or IPv6 literal, decimal port).
func parseAddr(s string, port0 bool) (netip.AddrPort, error) {
	i := strings.LastIndexByte(s, '!')
	if i < 0 {
		return netip.AddrPort{}, bad("address %q: want ADDR!PORT", s)
	}
	a, err := netip.ParseAddr(s[:i])
	if err != nil || a.Zone() != "" {
		return netip.AddrPort{}, bad("address %q: bad IP address", s)
	}
	p, err := parsePort(s[i+1:])
	if err != nil {
		return netip.AddrPort{}, err
	}
	if p == 0 && !port0 {
		return netip.AddrPort{}, bad("address %q: port 0", s)
	}
	return netip.AddrPortFrom(a.Unmap(), p), nil
}

func parsePort(s string) (uint16, error) {
	if s == "" || len(s) > 5 || (len(s) > 1 && s[0] == '0') {
		return 0, bad("port %q: want 0..65535", s)
	}
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil {
		return 0, bad("port %q: want 0..65535", s)
	}
	return uint16(n), nil
}
