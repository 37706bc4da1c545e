package soft

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vsdp/vsdp/verbs"
)

// Defaults and bounds.
const (
	defaultName              = "soft0"
	defaultMaxMsgSize        = 1 << 30
	maxMaxMsgSize            = 1 << 31
	defaultAckTimeout        = 4 * time.Second
	defaultHandshakeTimeout  = 10 * time.Second
	defaultConnectTimeout    = 10 * time.Second
	defaultDisconnectTimeout = 2 * time.Second
	defaultMaxHandshakes     = 64
	defaultBacklog           = 128
	maxBacklog               = 4096
	defaultCQEntries         = 256
	defaultQPWR              = 128
	defaultSGE               = 4
	defaultInline            = 64
	defaultMinRNRTimer       = time.Millisecond
)

// Clock is the time source for the RNR, acknowledgement and connection
// manager timers; tests may inject their own.
type Clock interface {
	Now() time.Time
	AfterFunc(d time.Duration, f func()) Timer
}

// Timer is a pending Clock.AfterFunc call.
type Timer interface {
	Stop() bool
}

type realClock struct{}

func (realClock) Now() time.Time                            { return time.Now() }
func (realClock) AfterFunc(d time.Duration, f func()) Timer { return time.AfterFunc(d, f) }

// Touch records one copy the provider made to or from registered memory, so
// callers can count host copies. An SGE larger than the copy step (64 KiB)
// yields several records.
type Touch struct {
	QPN    uint32
	WRID   uint64 // the local work request; 0 for a peer's RDMA access
	Key    uint32 // the lkey, or the rkey the peer used
	Addr   uint64
	Len    uint64
	Write  bool // memory was written (scatter, RDMA WRITE target, READ result)
	Remote bool // on the peer's behalf (RDMA WRITE or READ target)
}

// Options configure a soft device. The zero value is a device named "soft0"
// with no addresses, no table and no transport: give it Addrs, a Table and a
// Network and/or a Listen endpoint.
type Options struct {
	Name string
	// Addrs are this device's fabric IPv4 addresses (each VM's fabric
	// address is one). Listeners bind to them; the first is the default
	// source of outgoing connections.
	Addrs []netip.Addr
	// Table maps fabric addresses, this device's included, to endpoints.
	Table *Table
	// Network joins in-process devices; with it the device serves
	// "inproc:"+Name.
	Network *Network
	// Listen is a "tcp" or "unix" endpoint to serve; port 0 picks one (see
	// Device.Endpoint).
	Listen Endpoint
	// Listener, when set, is served instead of Listen: a "tcp" or "unix"
	// listener already bound (say, by a parent process that owns the
	// socket's path). Once Open succeeds the device owns it and closes it.
	Listener net.Listener

	MaxMsgSize        uint64        // largest message; default 1 GiB, at most 2 GiB
	AckTimeout        time.Duration // no answer for this long fails outstanding work (RETRY_EXC_ERR)
	HandshakeTimeout  time.Duration // an incoming link must send its REQ within this
	ConnectTimeout    time.Duration // Connect/Accept without a context deadline
	DisconnectTimeout time.Duration // DREQ without a DREP
	MaxHandshakes     int           // incoming links waiting for their REQ
	// Touch, when set, is called for every copy to or from registered
	// memory. It runs on the provider's goroutines with a lock held: it
	// must be quick and must not call back into the device.
	Touch func(Touch)
	Clock Clock
}

// DeviceStats are a device's counters.
type DeviceStats struct {
	FramesIn, FramesOut uint64
	// StagedBytes are payload bytes the stream transport copied through
	// its user-space buffers (an extra host copy per byte on each side);
	// the in-process transport stages nothing.
	StagedBytes       uint64
	RNRNaksSent       uint64
	RNRNaksReceived   uint64
	ProtocolErrors    uint64
	AccessErrors      uint64
	CQOverflows       uint64
	HandshakesDropped uint64
}

type devStats struct {
	framesIn, framesOut, stagedBytes           atomic.Uint64
	rnrNaksSent, rnrNaksRecv, protocolErrors   atomic.Uint64
	accessErrors, cqOverflows, handshakesDropd atomic.Uint64
}

// Device is a soft RDMA device. It implements verbs.Device.
type Device struct {
	opts  Options
	attr  verbs.DeviceAttr
	info  verbs.DeviceInfo
	clock Clock
	keys  keyTable
	stats devStats

	mu         sync.Mutex
	closed     bool
	res        verbs.Resources
	listeners  map[listenKey]*listener
	qpn        uint32
	handshakes map[link]struct{}
	ln         net.Listener
	endpoint   Endpoint
	wg         sync.WaitGroup
}

var _ verbs.Device = (*Device)(nil)

// Open opens a soft device.
func Open(o Options) (*Device, error) {
	if o.Name == "" {
		o.Name = defaultName
	}
	o.Addrs = append([]netip.Addr(nil), o.Addrs...)
	for i, a := range o.Addrs {
		a = a.Unmap()
		if !a.Is4() {
			return nil, fmt.Errorf("%w: fabric address %v is not IPv4", verbs.ErrInvalid, a)
		}
		o.Addrs[i] = a
	}
	if o.MaxMsgSize == 0 {
		o.MaxMsgSize = defaultMaxMsgSize
	}
	if o.MaxMsgSize > maxMaxMsgSize {
		return nil, fmt.Errorf("%w: MaxMsgSize %d above %d", verbs.ErrInvalid, o.MaxMsgSize, uint64(maxMaxMsgSize))
	}
	setDefault(&o.AckTimeout, defaultAckTimeout)
	setDefault(&o.HandshakeTimeout, defaultHandshakeTimeout)
	setDefault(&o.ConnectTimeout, defaultConnectTimeout)
	setDefault(&o.DisconnectTimeout, defaultDisconnectTimeout)
	if o.MaxHandshakes <= 0 {
		o.MaxHandshakes = defaultMaxHandshakes
	}
	if o.Clock == nil {
		o.Clock = realClock{}
	}
	d := &Device{
		opts:       o,
		clock:      o.Clock,
		listeners:  make(map[listenKey]*listener),
		handshakes: make(map[link]struct{}),
		qpn:        0x100,
		attr: verbs.DeviceAttr{
			MaxQP:      1 << 16,
			MaxQPWR:    maxQueueDepth,
			MaxSGE:     32,
			MaxCQ:      1 << 16,
			MaxCQE:     1 << 20,
			MaxMR:      1 << 20,
			MaxMW:      1 << 16,
			MaxPD:      1 << 12,
			MaxInline:  1024,
			MaxMsgSize: o.MaxMsgSize,
		},
	}
	d.keys.objs = make(map[uint32]any)
	h := fnv.New64a()
	h.Write([]byte(o.Name))
	transport := "soft-inproc"
	if !o.Listen.IsZero() || o.Listener != nil {
		transport = "soft-stream"
	}
	d.info = verbs.DeviceInfo{Name: o.Name, Provider: "soft", GUID: h.Sum64(), Transport: transport, Attr: d.attr}
	if o.Network != nil {
		if err := o.Network.attach(o.Name, d); err != nil {
			return nil, err
		}
	}
	if o.Listener != nil {
		a := o.Listener.Addr()
		if n := a.Network(); n != "tcp" && n != "unix" {
			d.detach()
			return nil, fmt.Errorf("%w: a %s listener", verbs.ErrInvalid, n)
		}
		d.ln = o.Listener
		d.endpoint = Endpoint{Net: a.Network(), Addr: a.String()}
		d.wg.Add(1)
		go d.acceptLoop()
	} else if !o.Listen.IsZero() {
		if err := o.Listen.validate(); err != nil || o.Listen.Net == "inproc" {
			d.detach()
			return nil, fmt.Errorf("%w: listen endpoint %v", verbs.ErrInvalid, o.Listen)
		}
		ln, err := net.Listen(o.Listen.Net, o.Listen.Addr)
		if err != nil {
			d.detach()
			return nil, fmt.Errorf("soft: listen on %v: %w", o.Listen, err)
		}
		d.ln = ln
		d.endpoint = Endpoint{Net: o.Listen.Net, Addr: ln.Addr().String()}
		d.wg.Add(1)
		go d.acceptLoop()
	} else if o.Network != nil {
		d.endpoint = Endpoint{Net: "inproc", Addr: o.Name}
	}
	return d, nil
}

func setDefault(p *time.Duration, v time.Duration) {
	if *p <= 0 {
		*p = v
	}
}

func (d *Device) detach() {
	if d.opts.Network != nil {
		d.opts.Network.detach(d.opts.Name, d)
	}
}

// Endpoint returns the endpoint the device serves: the stream listener's
// actual address if it has one, else its in-process name.
func (d *Device) Endpoint() Endpoint { return d.endpoint }

// Stats returns the device's counters.
func (d *Device) Stats() DeviceStats {
	s := &d.stats
	return DeviceStats{
		FramesIn: s.framesIn.Load(), FramesOut: s.framesOut.Load(), StagedBytes: s.stagedBytes.Load(),
		RNRNaksSent: s.rnrNaksSent.Load(), RNRNaksReceived: s.rnrNaksRecv.Load(),
		ProtocolErrors: s.protocolErrors.Load(), AccessErrors: s.accessErrors.Load(),
		CQOverflows: s.cqOverflows.Load(), HandshakesDropped: s.handshakesDropd.Load(),
	}
}

func (d *Device) touch(t Touch) {
	if d.opts.Touch != nil {
		d.opts.Touch(t)
	}
}

// Info describes the device.
func (d *Device) Info() verbs.DeviceInfo { return d.info }

// Resources counts the device's live objects.
func (d *Device) Resources() verbs.Resources {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.res
}

// PrivateDataLimits returns the IB CM sizes: the soft connection manager
// carries private data at offset 0 for every service ID (no RDMA CM header),
// so the SDP service IDs get the full 92-byte Hello.
func (d *Device) PrivateDataLimits(verbs.ServiceID) (verbs.PrivateDataLimits, error) {
	return verbs.PrivateDataLimits{Req: verbs.IBReqPrivateData, Rep: verbs.IBRepPrivateData, Rej: verbs.IBRejPrivateData}, nil
}

// AllocPD allocates a protection domain.
func (d *Device) AllocPD() (verbs.PD, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, verbs.ErrClosed
	}
	if d.res.PDs >= d.attr.MaxPD {
		return nil, fmt.Errorf("%w: %d protection domains", verbs.ErrQueueFull, d.res.PDs)
	}
	d.res.PDs++
	return &pd{dev: d}, nil
}

// CreateCQ creates a completion queue.
func (d *Device) CreateCQ(o verbs.CQOptions) (verbs.CQ, error) {
	n := o.Entries
	if n == 0 {
		n = defaultCQEntries
	}
	if n < 0 || n > d.attr.MaxCQE {
		return nil, fmt.Errorf("%w: %d CQ entries", verbs.ErrInvalid, o.Entries)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, verbs.ErrClosed
	}
	if d.res.CQs >= d.attr.MaxCQ {
		return nil, fmt.Errorf("%w: %d completion queues", verbs.ErrQueueFull, d.res.CQs)
	}
	c, err := newCQ(d, n)
	if err != nil {
		return nil, err
	}
	d.res.CQs++
	return c, nil
}

func (d *Device) isLocal(a netip.Addr) bool {
	for _, l := range d.opts.Addrs {
		if l == a {
			return true
		}
	}
	return false
}

// Resolve looks the peer's fabric address up in the address table and
// returns an active connection.
func (d *Device) Resolve(ctx context.Context, o verbs.ResolveOptions) (verbs.Conn, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("%w: %w", verbs.ErrTimeout, err)
	}
	dst := o.Addr.Unmap()
	if !dst.Is4() {
		return nil, &verbs.AddrError{Addr: o.Addr, Err: fmt.Errorf("%w: not an IPv4 fabric address", verbs.ErrInvalid)}
	}
	src := o.Src.Unmap()
	if src.IsValid() && !d.isLocal(src) {
		return nil, &verbs.AddrError{Addr: o.Src, Err: fmt.Errorf("%w: not a local fabric address", verbs.ErrInvalid)}
	}
	if !src.IsValid() && len(d.opts.Addrs) > 0 {
		src = d.opts.Addrs[0]
	}
	if !src.IsValid() {
		src = netip.IPv4Unspecified()
	}
	e, ok := d.opts.Table.Lookup(dst)
	if !ok {
		return nil, &verbs.AddrError{Addr: dst, Err: fmt.Errorf("%w: not in the address table", verbs.ErrUnreachable)}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, verbs.ErrClosed
	}
	c := newConn(d, true)
	c.local, c.remote, c.sid, c.endpoint = src, dst, o.ServiceID, e
	c.owned = true
	d.res.Conns++
	return c, nil
}

type listenKey struct {
	addr netip.Addr
	sid  verbs.ServiceID
}

// Listen binds a listener. Any service ID may be bound.
func (d *Device) Listen(o verbs.ListenOptions) (verbs.Listener, error) {
	addr := o.Addr.Unmap()
	if addr.IsValid() && !d.isLocal(addr) {
		return nil, &verbs.AddrError{Addr: o.Addr, Err: fmt.Errorf("%w: not a local fabric address", verbs.ErrInvalid)}
	}
	backlog := o.Backlog
	if backlog == 0 {
		backlog = defaultBacklog
	}
	if backlog < 0 || backlog > maxBacklog {
		return nil, fmt.Errorf("%w: backlog %d", verbs.ErrInvalid, o.Backlog)
	}
	k := listenKey{addr: addr, sid: o.ServiceID}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, verbs.ErrClosed
	}
	if _, used := d.listeners[k]; used {
		return nil, fmt.Errorf("%w: service %v on %v already bound", verbs.ErrBusy, o.ServiceID, addr)
	}
	if addr.IsValid() {
		if _, used := d.listeners[listenKey{sid: o.ServiceID}]; used {
			return nil, fmt.Errorf("%w: service %v bound on every address", verbs.ErrBusy, o.ServiceID)
		}
	}
	l := &listener{dev: d, key: k, backlog: backlog, wake: make(chan struct{}, 1), done: make(chan struct{})}
	d.listeners[k] = l
	d.res.Listeners++
	return l, nil
}

// Close closes the device. It fails with ErrBusy while protection domains,
// completion queues, connections or listeners are open.
func (d *Device) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	if !d.res.Zero() {
		r := d.res
		d.mu.Unlock()
		return &verbs.BusyError{Object: "device", Children: r.String()}
	}
	d.closed = true
	for l := range d.handshakes {
		l.abort()
	}
	d.mu.Unlock()
	d.detach()
	var err error
	if d.ln != nil {
		err = d.ln.Close()
		if d.endpoint.Net == "unix" {
			os.Remove(d.endpoint.Addr) //nolint:errcheck // may be gone already
		}
	}
	d.wg.Wait()
	return err
}

func (d *Device) acceptLoop() {
	defer d.wg.Done()
	for {
		nc, err := d.ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return // closed
		}
		if tc, ok := nc.(*net.TCPConn); ok {
			tc.SetNoDelay(true) //nolint:errcheck // latency only
		}
		l := newStreamLink(nc, d.attr.MaxMsgSize, &d.stats)
		if !d.incoming(l) {
			l.abort()
		}
	}
}

// incoming takes a new link from a peer and reads its REQ on a goroutine of
// its own. It refuses when the device is closed or too many links are still
// in their handshake.
func (d *Device) incoming(l link) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return false
	}
	if len(d.handshakes) >= d.opts.MaxHandshakes {
		d.stats.handshakesDropd.Add(1)
		return false
	}
	d.handshakes[l] = struct{}{}
	d.wg.Add(1)
	go d.handshake(l)
	return true
}

// handshake reads the REQ of an incoming link (bounded by HandshakeTimeout)
// and hands the request to its listener, or rejects it.
func (d *Device) handshake(l link) {
	defer d.wg.Done()
	t := d.clock.AfterFunc(d.opts.HandshakeTimeout, l.abort)
	h, p, err := l.recv()
	var priv []byte
	if err == nil && h.typ != frameREQ {
		err = frameErr(h.typ, "first frame is not a REQ")
	}
	if err == nil {
		priv, err = readPayload(p, verbs.IBReqPrivateData)
	}
	stopped := t.Stop()
	d.mu.Lock()
	delete(d.handshakes, l)
	d.mu.Unlock()
	if err != nil || !stopped {
		d.stats.handshakesDropd.Add(1)
		l.abort()
		return
	}
	d.stats.framesIn.Add(1)
	d.dispatch(l, h, priv)
}

func (d *Device) reject(l link, reason verbs.RejectReason) {
	l.send([]outFrame{{h: header{typ: frameREJ, imm: uint32(reason)}}}) //nolint:errcheck // best effort before closing
	d.stats.framesOut.Add(1)
	l.close()
}

func ipv4(a netip.Addr) uint32 {
	b := a.As4()
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

func addrFrom(v uint32) netip.Addr {
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

func (d *Device) dispatch(l link, h header, priv []byte) {
	dst, src, sid := addrFrom(h.rkey), addrFrom(h.imm), verbs.ServiceID(h.addr)
	d.mu.Lock()
	ln := d.listeners[listenKey{addr: dst, sid: sid}]
	if ln == nil {
		ln = d.listeners[listenKey{sid: sid}]
	}
	if d.closed || ln == nil || !d.isLocal(dst) {
		d.mu.Unlock()
		d.reject(l, verbs.RejectInvalidServiceID)
		return
	}
	c := newConn(d, false)
	c.local, c.remote, c.sid = dst, src, sid
	c.priv = priv
	c.peerDepth = int(h.dmaLen)
	c.state = csRequested
	d.mu.Unlock()
	c.mu.Lock()
	c.startLink(l)
	c.mu.Unlock()
	if !ln.enqueue(c) {
		c.mu.Lock()
		c.ctrlPost = append(c.ctrlPost, outFrame{h: header{typ: frameREJ, imm: uint32(verbs.RejectNoResources)}})
		c.closeAfterFlush = true
		c.state = csDisconnected
		c.kickWriter()
		c.mu.Unlock()
		c.destroy()
	}
}

// listener is a bound service ID with a bounded queue of requests.
type listener struct {
	dev     *Device
	key     listenKey
	backlog int
	wake    chan struct{}
	done    chan struct{}

	mu      sync.Mutex
	pending []*conn
	closed  bool
}

var _ verbs.Listener = (*listener)(nil)

func (l *listener) Addr() netip.Addr           { return l.key.addr }
func (l *listener) ServiceID() verbs.ServiceID { return l.key.sid }

func (l *listener) enqueue(c *conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed || len(l.pending) >= l.backlog {
		return false
	}
	l.pending = append(l.pending, c)
	select {
	case l.wake <- struct{}{}:
	default:
	}
	return true
}

// Accept returns the next request whose peer is still waiting.
func (l *listener) Accept(ctx context.Context) (verbs.Conn, error) {
	for {
		l.mu.Lock()
		if l.closed {
			l.mu.Unlock()
			return nil, verbs.ErrClosed
		}
		for len(l.pending) > 0 {
			c := l.pending[0]
			l.pending[0] = nil
			l.pending = l.pending[1:]
			if c.withdrawn() {
				l.mu.Unlock()
				c.destroy()
				l.mu.Lock()
				continue
			}
			if len(l.pending) > 0 {
				select {
				case l.wake <- struct{}{}:
				default:
				}
			}
			d := l.dev
			d.mu.Lock()
			c.owned = true
			d.res.Conns++
			d.mu.Unlock()
			l.mu.Unlock()
			return c, nil
		}
		l.mu.Unlock()
		select {
		case <-l.wake:
		case <-l.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// Close stops listening; pending requests are rejected as if nobody
// listened.
func (l *listener) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	pending := l.pending
	l.pending = nil
	close(l.done)
	l.mu.Unlock()
	d := l.dev
	d.mu.Lock()
	delete(d.listeners, l.key)
	d.res.Listeners--
	d.mu.Unlock()
	for _, c := range pending {
		c.mu.Lock()
		if c.state == csRequested {
			c.ctrlPost = append(c.ctrlPost, outFrame{h: header{typ: frameREJ, imm: uint32(verbs.RejectInvalidServiceID)}})
			c.closeAfterFlush = true
			c.state = csDisconnected
			c.kickWriter()
		}
		c.mu.Unlock()
		c.destroy()
	}
	return nil
}

// Provider lists and opens soft devices from their options. It implements
// verbs.Provider.
type Provider struct {
	Configs []Options
}

var _ verbs.Provider = (*Provider)(nil)

// NewProvider returns a provider of the given devices.
func NewProvider(devices ...Options) *Provider { return &Provider{Configs: devices} }

// Name returns "soft".
func (p *Provider) Name() string { return "soft" }

// Devices lists the configured devices without opening them.
func (p *Provider) Devices() ([]verbs.DeviceInfo, error) {
	var out []verbs.DeviceInfo
	for _, o := range p.Configs {
		name := o.Name
		if name == "" {
			name = defaultName
		}
		h := fnv.New64a()
		h.Write([]byte(name))
		t := "soft-inproc"
		if !o.Listen.IsZero() {
			t = "soft-stream"
		}
		out = append(out, verbs.DeviceInfo{Name: name, Provider: "soft", GUID: h.Sum64(), Transport: t})
	}
	return out, nil
}

// Open opens the named device.
func (p *Provider) Open(name string) (verbs.Device, error) {
	for _, o := range p.Configs {
		n := o.Name
		if n == "" {
			n = defaultName
		}
		if n == name {
			return Open(o)
		}
	}
	return nil, fmt.Errorf("%w: no soft device %q", verbs.ErrInvalid, name)
}
