package soft

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"

	"github.com/vsdp/vsdp/verbs"
)

// Endpoint is where a soft device accepts connections: an in-process name, a
// TCP address or a Unix socket path.
type Endpoint struct {
	Net  string // "inproc", "tcp" or "unix"
	Addr string
}

// ParseEndpoint parses "inproc:NAME", "tcp:HOST:PORT" or "unix:PATH".
func ParseEndpoint(s string) (Endpoint, error) {
	n, a, ok := strings.Cut(s, ":")
	if !ok || a == "" {
		return Endpoint{}, fmt.Errorf("%w: endpoint %q: want inproc:NAME, tcp:HOST:PORT or unix:PATH", verbs.ErrInvalid, s)
	}
	e := Endpoint{Net: n, Addr: a}
	if err := e.validate(); err != nil {
		return Endpoint{}, err
	}
	return e, nil
}

func (e Endpoint) validate() error {
	switch e.Net {
	case "inproc", "unix":
		if e.Addr == "" {
			return fmt.Errorf("%w: endpoint %v: empty address", verbs.ErrInvalid, e)
		}
	case "tcp":
		if _, _, err := net.SplitHostPort(e.Addr); err != nil {
			return fmt.Errorf("%w: endpoint %v: %v", verbs.ErrInvalid, e, err)
		}
	default:
		return fmt.Errorf("%w: endpoint %v: unknown network %q", verbs.ErrInvalid, e, e.Net)
	}
	return nil
}

// IsZero reports whether e is the zero Endpoint.
func (e Endpoint) IsZero() bool { return e == Endpoint{} }

func (e Endpoint) String() string { return e.Net + ":" + e.Addr }

// Table is the soft connection manager's address table: fabric IPv4
// address → endpoint. It stands in for IPoIB neighbour resolution and the
// subnet manager, which the soft fabric does not have. It is safe for
// concurrent use and may change while devices use it.
type Table struct {
	mu sync.RWMutex
	m  map[netip.Addr]Endpoint
}

// NewTable returns an empty table.
func NewTable() *Table { return &Table{m: make(map[netip.Addr]Endpoint)} }

// Set maps a fabric IPv4 address to an endpoint.
func (t *Table) Set(a netip.Addr, e Endpoint) error {
	a = a.Unmap()
	if !a.Is4() {
		return fmt.Errorf("%w: fabric address %v is not IPv4", verbs.ErrInvalid, a)
	}
	if err := e.validate(); err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.m[a] = e
	return nil
}

// Delete removes an address.
func (t *Table) Delete(a netip.Addr) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.m, a.Unmap())
}

// Lookup returns the endpoint of a fabric address.
func (t *Table) Lookup(a netip.Addr) (Endpoint, bool) {
	if t == nil {
		return Endpoint{}, false
	}
	t.mu.RLock()
	defer t.mu.RUnlock()
	e, ok := t.m[a.Unmap()]
	return e, ok
}

// Network joins in-process devices: a device opened with a Network serves
// the endpoint "inproc:NAME". Tests make one Network each; there is no
// process-wide default.
type Network struct {
	mu    sync.Mutex
	nodes map[string]*Device
}

// NewNetwork returns an empty in-process network.
func NewNetwork() *Network { return &Network{nodes: make(map[string]*Device)} }

func (n *Network) attach(name string, d *Device) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if _, ok := n.nodes[name]; ok {
		return fmt.Errorf("%w: in-process endpoint %q in use", verbs.ErrBusy, name)
	}
	n.nodes[name] = d
	return nil
}

func (n *Network) detach(name string, d *Device) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.nodes[name] == d {
		delete(n.nodes, name)
	}
}

func (n *Network) lookup(name string) *Device {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.nodes[name]
}

// dial opens a link to an endpoint.
func (d *Device) dial(ctx context.Context, e Endpoint) (link, error) {
	switch e.Net {
	case "inproc":
		if d.opts.Network == nil {
			return nil, fmt.Errorf("%w: no in-process network for %v", verbs.ErrUnreachable, e)
		}
		peer := d.opts.Network.lookup(e.Addr)
		if peer == nil {
			return nil, fmt.Errorf("%w: no device at %v", verbs.ErrUnreachable, e)
		}
		a, b := newPipe()
		if !peer.incoming(b) {
			return nil, fmt.Errorf("%w: device at %v is closed", verbs.ErrUnreachable, e)
		}
		return a, nil
	case "tcp", "unix":
		var nd net.Dialer
		nc, err := nd.DialContext(ctx, e.Net, e.Addr)
		if err != nil {
			if ctx.Err() != nil {
				return nil, fmt.Errorf("%w: %w", verbs.ErrTimeout, ctx.Err())
			}
			return nil, fmt.Errorf("%w: %v: %w", verbs.ErrUnreachable, e, err)
		}
		if tc, ok := nc.(*net.TCPConn); ok {
			tc.SetNoDelay(true) //nolint:errcheck // latency only
		}
		return newStreamLink(nc, d.attr.MaxMsgSize, &d.stats), nil
	}
	return nil, fmt.Errorf("%w: endpoint %v", verbs.ErrInvalid, e)
}
