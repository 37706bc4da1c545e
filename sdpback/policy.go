package sdpback

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"syscall"
)

// Action is what the policy does with a guest's connection.
type Action uint8

// Actions.
const (
	// Deny refuses the connection with the rule's errno (EACCES by default).
	Deny Action = iota
	// SDP carries the stream over the fabric with the SDP engine.
	SDP
	// HostTCP carries it over the host's own TCP stack (fallback; it leaves
	// with the host's identity, so it is only ever explicit).
	HostTCP
	// Local tells the guest to use its own TCP stack (LOCAL).
	Local
)

var actionNames = [...]string{"deny", "sdp", "tcp", "local"}

func (a Action) String() string {
	if int(a) < len(actionNames) {
		return actionNames[a]
	}
	return fmt.Sprintf("Action(%d)", uint8(a))
}

// ParseAction parses "deny", "sdp", "tcp" or "local".
func ParseAction(s string) (Action, error) {
	for i, n := range actionNames {
		if s == n {
			return Action(i), nil
		}
	}
	return 0, fmt.Errorf("sdpback: unknown action %q (want deny, sdp, tcp or local)", s)
}

// Rule matches destinations by prefix and port range.
type Rule struct {
	Prefix netip.Prefix // zero Prefix: any address
	PortLo uint16       // 0..65535; PortLo == PortHi == 0 means any port
	PortHi uint16
	Action Action
	Errno  syscall.Errno // Deny: the guest's errno (0: EACCES)
}

// Match reports whether r applies to dst.
func (r Rule) Match(dst netip.AddrPort) bool {
	if r.Prefix.IsValid() && !r.Prefix.Contains(dst.Addr().Unmap()) {
		return false
	}
	if r.PortLo == 0 && r.PortHi == 0 {
		return true
	}
	return dst.Port() >= r.PortLo && dst.Port() <= r.PortHi
}

func (r Rule) String() string {
	dst := "*"
	if r.Prefix.IsValid() {
		dst = r.Prefix.String()
	}
	ports := "*"
	if r.PortLo != 0 || r.PortHi != 0 {
		ports = strconv.Itoa(int(r.PortLo))
		if r.PortHi != r.PortLo {
			ports += "-" + strconv.Itoa(int(r.PortHi))
		}
	}
	s := fmt.Sprintf("%s %s:%s", r.Action, dst, ports)
	if r.Action == Deny && r.Errno != 0 {
		s += " " + errnoName(r.Errno)
	}
	return s
}

// Policy is an ordered rule list: the first match wins; no match denies
// with EACCES (a guest reaches only what its policy names).
type Policy []Rule

// Decide returns the action and, for Deny, the errno.
func (p Policy) Decide(dst netip.AddrPort) (Action, syscall.Errno) {
	for _, r := range p {
		if r.Match(dst) {
			if r.Action == Deny {
				if r.Errno == 0 {
					return Deny, syscall.EACCES
				}
				return Deny, r.Errno
			}
			return r.Action, 0
		}
	}
	return Deny, syscall.EACCES
}

func (p Policy) String() string {
	var b strings.Builder
	for _, r := range p {
		b.WriteString(r.String())
		b.WriteByte('\n')
	}
	b.WriteString("deny *:* EACCES (default)\n")
	return b.String()
}

var errnos = map[string]syscall.Errno{
	"EACCES": syscall.EACCES, "EPERM": syscall.EPERM, "ECONNREFUSED": syscall.ECONNREFUSED,
	"ENETUNREACH": syscall.ENETUNREACH, "EHOSTUNREACH": syscall.EHOSTUNREACH, "ETIMEDOUT": syscall.ETIMEDOUT,
}

func errnoName(e syscall.Errno) string {
	for n, v := range errnos {
		if v == e {
			return n
		}
	}
	return strconv.Itoa(int(e))
}

// ParseRule parses "ACTION ADDR[/PREFIX]|*[:PORT[-PORT]|:*] [ERRNO]", for
// example "sdp 10.1.0.0/16:5000-6000", "tcp 192.0.2.7:80",
// "deny *:* ENETUNREACH". IPv6 addresses go in brackets: "[fd00::/8]:*".
func ParseRule(s string) (Rule, error) {
	f := strings.Fields(s)
	if len(f) < 2 || len(f) > 3 {
		return Rule{}, fmt.Errorf("sdpback: rule %q: want ACTION DEST [ERRNO]", s)
	}
	var r Rule
	var err error
	if r.Action, err = ParseAction(f[0]); err != nil {
		return Rule{}, err
	}
	dst, ports := f[1], "*"
	if strings.HasPrefix(dst, "[") {
		end := strings.Index(dst, "]")
		if end < 0 {
			return Rule{}, fmt.Errorf("sdpback: rule %q: unclosed [", s)
		}
		rest := dst[end+1:]
		dst = dst[1:end]
		if rest != "" {
			if !strings.HasPrefix(rest, ":") {
				return Rule{}, fmt.Errorf("sdpback: rule %q: junk after ]", s)
			}
			ports = rest[1:]
		}
	} else if i := strings.LastIndex(dst, ":"); i >= 0 {
		dst, ports = dst[:i], dst[i+1:]
	}
	if dst != "*" {
		if strings.Contains(dst, "/") {
			if r.Prefix, err = netip.ParsePrefix(dst); err != nil {
				return Rule{}, fmt.Errorf("sdpback: rule %q: %v", s, err)
			}
		} else {
			a, err := netip.ParseAddr(dst)
			if err != nil {
				return Rule{}, fmt.Errorf("sdpback: rule %q: %v", s, err)
			}
			r.Prefix = netip.PrefixFrom(a, a.BitLen())
		}
		r.Prefix = r.Prefix.Masked()
	}
	if ports != "*" {
		lo, hi, ok := strings.Cut(ports, "-")
		if !ok {
			hi = lo
		}
		l, err1 := strconv.ParseUint(lo, 10, 16)
		h, err2 := strconv.ParseUint(hi, 10, 16)
		if err1 != nil || err2 != nil || l > h || l == 0 {
			return Rule{}, fmt.Errorf("sdpback: rule %q: bad port range %q", s, ports)
		}
		r.PortLo, r.PortHi = uint16(l), uint16(h)
	}
	if len(f) == 3 {
		if r.Action != Deny {
			return Rule{}, fmt.Errorf("sdpback: rule %q: only deny takes an errno", s)
		}
		e, ok := errnos[f[2]]
		if !ok {
			return Rule{}, fmt.Errorf("sdpback: rule %q: unknown errno %q", s, f[2])
		}
		r.Errno = e
	}
	return r, nil
}
