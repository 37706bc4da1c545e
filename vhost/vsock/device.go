package vsock

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/vsdp/vsdp/vhost"
	"github.com/vsdp/vsdp/vhost/guestmem"
	"github.com/vsdp/vsdp/vhost/virtq"
)

var _ vhost.Device = (*Device)(nil)

// Queue indices served by the back-end (QEMU keeps the event queue, 2).
const (
	RxQueue = 0
	TxQueue = 1
)

// Defaults for Config's zero values.
const (
	DefaultBufAlloc       = 256 << 10
	DefaultMaxConns       = 1024
	DefaultMaxHeldPerConn = 32
	DefaultMaxHeld        = 64
	maxOrphanRST          = 256
	firstEphemeralPort    = 1 << 30
)

// Config configures one VM's vsock device.
type Config struct {
	CID uint64 // the guest's CID (≥ 3)
	// BufAlloc is the receive buffer advertised to the guest per stream:
	// the most guest data the host holds for one stream.
	BufAlloc uint32
	// MaxConns bounds streams (and pending connects) per VM.
	MaxConns int
	// MaxHeldPerConn and MaxHeld bound guest tx chains held for zero-copy
	// until their payload is consumed (per stream, per VM); beyond them
	// payload is copied and the chain released at once.
	MaxHeldPerConn int
	MaxHeld        int
}

func (c *Config) defaults() {
	if c.BufAlloc == 0 {
		c.BufAlloc = DefaultBufAlloc
	}
	if c.MaxConns <= 0 {
		c.MaxConns = DefaultMaxConns
	}
	if c.MaxHeldPerConn <= 0 {
		c.MaxHeldPerConn = DefaultMaxHeldPerConn
	}
	if c.MaxHeld <= 0 {
		c.MaxHeld = DefaultMaxHeld
	}
}

// Errors.
var (
	// ErrReset: the guest reset the stream, or the device stopped.
	ErrReset = errors.New("vsock: stream reset")
	// ErrRefused: the guest refused a host-initiated connection (RST).
	ErrRefused = errors.New("vsock: connection refused by guest")
	// ErrProtocol: the guest broke the vsock protocol on this stream.
	ErrProtocol = errors.New("vsock: protocol violation")
	// ErrLimit: a per-VM bound was reached.
	ErrLimit = errors.New("vsock: per-VM limit reached")
	// ErrStopped: the device is not running.
	ErrStopped = errors.New("vsock: device stopped")
)

// Backend receives guest-initiated connections.
type Backend interface {
	// Connect is called when the guest opens a stream to a host port. The
	// backend answers through req, once, from any goroutine: Accept sends
	// RESPONSE, Refuse sends RST. It must not block.
	Connect(req *Request)
}

// Stream is the host side of one connected stream.
type Stream interface {
	// Deliver hands over bytes the guest sent, in order. The payload stays
	// valid until p.Release, which returns the guest's credit; the stream
	// must release every payload eventually. Deliver must not block: the
	// credit the device advertises bounds what it must hold.
	Deliver(p *Payload)
	// Pull copies host-to-guest bytes into dst (guest receive memory) and
	// returns how many it wrote, and eof once everything was sent and the
	// host side is finished. The device calls it only after Notify.
	Pull(dst [][]byte) (n int, eof bool)
	// Shutdown reports the guest's SHUTDOWN: it will read (rcv) or send
	// (send) no more. abortive is true when the guest stopped reading with
	// host data it never consumed: TCP would reset.
	Shutdown(rcv, send, abortive bool)
	// Reset reports that the stream is gone (guest RST, protocol violation,
	// device stop). No other method is called afterwards.
	Reset(err error)
}

// Payload is guest data: slices of guest memory held until Release (zero
// copy), or a host copy when the hold limits were reached.
type Payload struct {
	Segs   [][]byte
	Len    int
	Copied bool // Segs is a host copy, not guest memory
	// Mem is the guest memory Segs lie in (nil for a copy); it stays
	// retained until Release, so its regions may be registered with an
	// RDMA device for a zero-copy send.
	Mem  *guestmem.Table
	once sync.Once
	done func()
}

// Release gives the guest's buffers and credit back. Idempotent.
func (p *Payload) Release() { p.once.Do(p.done) }

// Stats are device counters.
type Stats struct {
	TxPackets, RxPackets    uint64
	TxBytes, RxBytes        uint64 // payload: guest→host, host→guest
	Connects, Accepted      uint64
	Refused, Resets         uint64
	ProtocolErrors          uint64 // streams reset for breaking the protocol
	BadPackets              uint64 // malformed packets (wrong CID, type, length)
	CreditViolations        uint64
	OrphanRSTDropped        uint64
	HeldChains, CopiedBytes uint64 // zero-copy holds; bytes copied instead
}

type key struct{ guest, host uint32 }

type state uint8

const (
	stConnecting state = iota // guest REQUEST seen, backend deciding
	stRequesting              // host REQUEST queued/sent, waiting for RESPONSE
	stOpen
	stClosed
)

// Conn is the device's handle on one stream, given to the backend.
type Conn struct {
	d      *Device
	k      key
	stream Stream
	state  state // guarded by d.mu

	// guarded by d.mu
	peerBufAlloc, peerFwdCnt uint32 // the guest's receive window
	txCnt                    uint32 // bytes sent to the guest
	fwdCnt                   uint32 // guest bytes the host consumed
	rxCnt                    uint32 // guest bytes received
	lastFwdSent              uint32
	held                     int
	guestShut                uint32 // SHUTDOWN flags received
	hostEOFSent              bool
	dataReady                bool
	gen                      uint64 // bumped by Notify
	eof                      bool
	creditRequested          bool
	pend                     pending
	queued                   bool // on d.work
	onResult                 func(error)
}

type pending struct {
	response, request, credit bool
}

func (p pending) any() bool { return p.response || p.request || p.credit }

// Device is the virtio-vsock device of one VM: the connection table, the
// vsock credit protocol, and the rx/tx rings.
type Device struct {
	cfg     Config
	backend Backend

	mu       sync.Mutex // guards everything below; never held while calling the backend
	rx, tx   *virtq.Queue
	conns    map[key]*Conn
	work     []*Conn  // conns with a pending packet, FIFO
	orphans  []Header // RSTs answering packets for no stream
	held     int
	spare    *virtq.Chain // an rx buffer popped but not needed yet
	spareQ   *virtq.Queue
	nextPort uint32
	stats    Stats

	pumpMu  sync.Mutex
	pumpReq atomic.Bool
}

// New returns a device for one VM.
func New(cfg Config, b Backend) (*Device, error) {
	cfg.defaults()
	if cfg.CID < 3 || cfg.CID >= 0xffffffff {
		return nil, fmt.Errorf("vsock: guest CID %d is reserved", cfg.CID)
	}
	return &Device{cfg: cfg, backend: b, conns: map[key]*Conn{}, nextPort: firstEphemeralPort}, nil
}

// CID returns the guest CID.
func (d *Device) CID() uint64 { return d.cfg.CID }

// Config returns the virtio config space: le64 guest_cid.
func (d *Device) ConfigSpace() []byte {
	return binary.LittleEndian.AppendUint64(nil, d.cfg.CID)
}

// Stats returns the counters.
func (d *Device) Stats() Stats {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.stats
}

// Conns returns the number of streams in the table.
func (d *Device) Conns() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.conns)
}

// Info implements vhost.Device: two rings (QEMU keeps the event queue),
// stream sockets only (no feature bits: STREAM is implied, and offering
// SEQPACKET would make QEMU 7.2 ack it), and a config space.
func (d *Device) Info() vhost.Info {
	return vhost.Info{Name: "vsock", Type: 19, Queues: 2, MaxQueueSize: 1024, Config: true}
}

// SetFeatures implements vhost.Device.
func (d *Device) SetFeatures(uint64) error { return nil }

// GetConfig implements vhost.Device: struct virtio_vsock_config {le64 guest_cid}.
func (d *Device) GetConfig(offset uint32, buf []byte) error {
	cs := d.ConfigSpace()
	if uint64(offset)+uint64(len(buf)) > uint64(len(cs)) {
		return fmt.Errorf("vsock: config access [%d,+%d) outside %d bytes", offset, len(buf), len(cs))
	}
	copy(buf, cs[offset:])
	return nil
}

// SetConfig implements vhost.Device: the config space is read-only.
func (d *Device) SetConfig(uint32, []byte, uint32) error {
	return errors.New("vsock: config space is read-only")
}

// QueueStart implements vhost.Device.
func (d *Device) QueueStart(index int, q *virtq.Queue) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	switch index {
	case RxQueue:
		d.rx = q
	case TxQueue:
		d.tx = q
	default:
		return fmt.Errorf("vsock: no queue %d", index)
	}
	return nil
}

// Reset implements vhost.Device.
func (d *Device) Reset() { d.resetAll(ErrStopped) }

// Close implements vhost.Device.
func (d *Device) Close() error { d.resetAll(ErrStopped); return nil }

// QueueStop implements vhost.Device. Stopping either ring resets every
// stream: the guest driver is going away or being reset.
func (d *Device) QueueStop(index int) {
	d.mu.Lock()
	switch index {
	case RxQueue:
		d.rx = nil
		if d.spare != nil {
			d.spareQ.Discard(d.spare)
			d.spare, d.spareQ = nil, nil
		}
	case TxQueue:
		d.tx = nil
	}
	d.mu.Unlock()
	d.resetAll(ErrStopped)
}

// resetAll drops every stream.
func (d *Device) resetAll(err error) {
	d.mu.Lock()
	var gone []*Conn
	for _, c := range d.conns {
		if c.state != stClosed {
			c.state = stClosed
			gone = append(gone, c)
		}
	}
	clear(d.conns)
	d.work, d.orphans = nil, nil
	d.mu.Unlock()
	for _, c := range gone {
		c.finish(fmt.Errorf("%w: %w", ErrReset, err))
	}
}

// finish tells the stream (or the dialer) the stream is over.
func (c *Conn) finish(err error) {
	if c.onResult != nil {
		f := c.onResult
		c.onResult = nil
		f(err)
		return
	}
	if c.stream != nil {
		c.stream.Reset(err)
	}
}

// Kick implements vhost.Device: tx carries guest packets; an rx kick
// means new receive buffers.
func (d *Device) Kick(index int) (more bool, err error) {
	switch index {
	case TxQueue:
		err = d.processTx()
	case RxQueue:
		d.pump()
		d.mu.Lock()
		q := d.rx
		d.mu.Unlock()
		if q != nil {
			err = q.Err()
		}
	}
	return false, err
}

// processTx handles every packet the guest queued, a bounded batch at a
// time so that rx keeps flowing.
func (d *Device) processTx() error {
	d.mu.Lock()
	q := d.tx
	d.mu.Unlock()
	if q == nil {
		return nil
	}
	for {
		q.DisableNotify()
		for {
			c, err := q.Pop()
			if err != nil {
				q.Flush()
				return err
			}
			if c == nil {
				break
			}
			d.handlePacket(q, c)
		}
		q.Flush()
		d.pump()
		if !q.EnableNotify() {
			return nil
		}
	}
}

// handlePacket handles one tx chain and gives it back (now, or when its
// payload is released).
func (d *Device) handlePacket(q *virtq.Queue, ch *virtq.Chain) {
	r := ch.Reader()
	var hb [HeaderSize]byte
	if n, _ := r.Read(hb[:]); n < HeaderSize {
		d.count(func(s *Stats) { s.BadPackets++ })
		q.Push(ch, 0)
		return
	}
	var h Header
	h.Decode(hb[:]) // copied once: the guest cannot change it under us
	var deferred []func()
	hold := false
	d.mu.Lock()
	d.stats.TxPackets++
	switch {
	case h.SrcCID != d.cfg.CID || h.DstCID != HostCID:
		// A packet from or to the wrong address: answer nothing (it would
		// go to an address the guest does not own) and count it.
		d.stats.BadPackets++
	case h.Type != TypeStream:
		d.stats.BadPackets++
		d.orphanRST(h)
	case h.Len > MaxPayload || int(h.Len) > r.Remaining():
		d.stats.BadPackets++
		deferred = d.violation(h, "payload length %d exceeds its buffer (%d) or %d", h.Len, r.Remaining(), MaxPayload)
	default:
		deferred, hold = d.dispatch(h, ch, &r)
	}
	d.mu.Unlock()
	if !hold {
		q.Push(ch, 0)
	}
	for _, f := range deferred {
		f()
	}
}

func (d *Device) count(f func(*Stats)) { d.mu.Lock(); f(&d.stats); d.mu.Unlock() }

// orphanRST answers a packet that belongs to no stream. Caller holds d.mu.
func (d *Device) orphanRST(h Header) {
	if h.Op == OpRST {
		return // never answer a reset
	}
	if len(d.orphans) >= maxOrphanRST {
		d.stats.OrphanRSTDropped++
		return
	}
	d.orphans = append(d.orphans, Header{
		SrcCID: HostCID, DstCID: h.SrcCID, SrcPort: h.DstPort, DstPort: h.SrcPort,
		Type: h.Type, Op: OpRST,
	})
	d.pumpReq.Store(true)
}

// violation resets the stream the header names (or answers RST if none).
// Caller holds d.mu.
func (d *Device) violation(h Header, format string, args ...any) []func() {
	d.stats.ProtocolErrors++
	c := d.conns[key{h.SrcPort, h.DstPort}]
	if c == nil {
		d.orphanRST(h)
		return nil
	}
	err := fmt.Errorf("%w: %s", ErrProtocol, fmt.Sprintf(format, args...))
	return d.resetConn(c, err, true)
}

// resetConn removes c, optionally queuing an RST. Caller holds d.mu; the
// returned funcs run after unlocking.
func (d *Device) resetConn(c *Conn, err error, sendRST bool) []func() {
	if c.state == stClosed {
		return nil
	}
	d.stats.Resets++
	if sendRST {
		d.closeConn(c)
	} else {
		c.state = stClosed
		delete(d.conns, c.k)
	}
	return []func(){func() { c.finish(err) }}
}

// closeConn removes c after an orderly close and answers with the RST that
// completes it (virtio 1.2 §5.10.6.6). Caller holds d.mu.
func (d *Device) closeConn(c *Conn) {
	c.state = stClosed
	delete(d.conns, c.k)
	d.orphans = append(d.orphans, Header{SrcCID: HostCID, DstCID: d.cfg.CID, SrcPort: c.k.host, DstPort: c.k.guest, Type: TypeStream, Op: OpRST})
	d.pumpReq.Store(true)
}

// dispatch acts on a validated header. Caller holds d.mu.
func (d *Device) dispatch(h Header, ch *virtq.Chain, r *virtq.Reader) (deferred []func(), hold bool) {
	k := key{h.SrcPort, h.DstPort}
	c := d.conns[k]
	if c != nil && h.Op != OpRequest {
		c.peerBufAlloc, c.peerFwdCnt = h.BufAlloc, h.FwdCnt
	}
	switch h.Op {
	case OpRequest:
		if c != nil {
			return d.violation(h, "REQUEST on an existing stream"), false
		}
		if len(d.conns) >= d.cfg.MaxConns {
			d.orphanRST(h)
			return nil, false
		}
		c = &Conn{d: d, k: k, state: stConnecting, peerBufAlloc: h.BufAlloc, peerFwdCnt: h.FwdCnt}
		d.conns[k] = c
		d.stats.Connects++
		req := &Request{c: c, GuestPort: h.SrcPort, HostPort: h.DstPort}
		return []func(){func() { d.backend.Connect(req) }}, false
	case OpResponse:
		if c == nil || c.state != stRequesting {
			if c == nil {
				d.orphanRST(h)
				return nil, false
			}
			return d.violation(h, "unexpected RESPONSE"), false
		}
		c.state = stOpen
		d.stats.Accepted++
		f := c.onResult
		c.onResult = nil
		if c.dataReady {
			d.schedule(c)
		}
		return []func(){func() { f(nil) }}, false
	case OpRST:
		if c == nil {
			return nil, false // after our own RST the guest answers with one
		}
		err := ErrReset
		if c.state == stRequesting {
			err = ErrRefused
			d.stats.Refused++
		}
		return d.resetConn(c, err, false), false
	case OpShutdown:
		if c == nil {
			d.orphanRST(h)
			return nil, false
		}
		if c.state != stOpen {
			return d.violation(h, "SHUTDOWN before the stream is open"), false
		}
		flags := h.Flags & (ShutdownRcv | ShutdownSend)
		newly := flags &^ c.guestShut
		c.guestShut |= flags
		abortive := newly&ShutdownRcv != 0 && c.txCnt != c.peerFwdCnt
		if c.guestShut == ShutdownRcv|ShutdownSend {
			// The guest closed: finish it with an RST, as the spec's clean
			// close requires, after telling the stream.
			s := c.stream
			d.closeConn(c)
			return []func(){func() { s.Shutdown(newly&ShutdownRcv != 0, newly&ShutdownSend != 0, abortive) }}, false
		}
		if newly == 0 {
			return nil, false
		}
		s := c.stream
		return []func(){func() { s.Shutdown(newly&ShutdownRcv != 0, newly&ShutdownSend != 0, abortive) }}, false
	case OpRW:
		if c == nil {
			d.orphanRST(h)
			return nil, false
		}
		if c.state != stOpen || c.guestShut&ShutdownSend != 0 {
			return d.violation(h, "data on a stream that is not open for guest sends"), false
		}
		// Credit check (virtio 1.2 §5.10.6.3): the guest may have at most
		// BufAlloc bytes unconsumed by the host.
		if uint64(c.rxCnt-c.fwdCnt)+uint64(h.Len) > uint64(d.cfg.BufAlloc) {
			d.stats.CreditViolations++
			return d.violation(h, "guest sent %d bytes beyond its credit (%d outstanding of %d)", h.Len, c.rxCnt-c.fwdCnt, d.cfg.BufAlloc), false
		}
		if h.Len == 0 {
			return nil, false
		}
		c.rxCnt += h.Len
		d.stats.TxBytes += uint64(h.Len)
		p := &Payload{Len: int(h.Len)}
		n := int(h.Len)
		if c.held < d.cfg.MaxHeldPerConn && d.held < d.cfg.MaxHeld {
			c.held++
			d.held++
			d.stats.HeldChains++
			p.Segs = r.Slices(nil, n)
			p.Mem = ch.Table()
			q := d.tx
			p.done = func() { d.released(c, n, true); q.Push(ch, 0); q.Flush() }
			hold = true
		} else {
			buf := make([]byte, n)
			r.Read(buf)
			p.Segs, p.Copied = [][]byte{buf}, true
			d.stats.CopiedBytes += uint64(n)
			p.done = func() { d.released(c, n, false) }
		}
		s := c.stream
		return []func(){func() { s.Deliver(p) }}, hold
	case OpCreditUpdate:
		if c == nil {
			d.orphanRST(h)
			return nil, false
		}
		c.creditRequested = false
		if c.dataReady {
			d.schedule(c)
		}
		return nil, false
	case OpCreditRequest:
		if c == nil {
			d.orphanRST(h)
			return nil, false
		}
		c.pend.credit = true
		d.schedule(c)
		return nil, false
	default:
		if c == nil {
			d.orphanRST(h)
			return nil, false
		}
		return d.violation(h, "unknown op %v", h.Op), false
	}
}

// released returns credit for consumed guest bytes.
func (d *Device) released(c *Conn, n int, held bool) {
	d.mu.Lock()
	if held {
		c.held--
		d.held--
	}
	c.fwdCnt += uint32(n)
	// Tell the guest about freed space once a quarter of the window opened
	// (every packet we send carries fwd_cnt too).
	if c.state == stOpen && c.fwdCnt-c.lastFwdSent >= d.cfg.BufAlloc/4 {
		c.pend.credit = true
		d.schedule(c)
	}
	d.mu.Unlock()
	d.pump()
}

// schedule queues c for the pump. Caller holds d.mu.
func (d *Device) schedule(c *Conn) {
	if !c.queued && c.state != stClosed {
		c.queued = true
		d.work = append(d.work, c)
	}
	d.pumpReq.Store(true)
}

// Request is a guest's connection attempt, answered once by the backend.
type Request struct {
	c         *Conn
	GuestPort uint32 // the guest's (source) port
	HostPort  uint32 // the host port the guest connects to
	answered  atomic.Bool
}

// Accept opens the stream: RESPONSE goes to the guest. It fails if the
// guest reset the attempt meanwhile (the stream is then never used).
func (r *Request) Accept(s Stream) (*Conn, error) {
	if r.answered.Swap(true) {
		return nil, errors.New("vsock: request answered twice")
	}
	c := r.c
	d := c.d
	d.mu.Lock()
	if c.state != stConnecting {
		d.mu.Unlock()
		return nil, ErrReset
	}
	c.stream = s
	c.state = stOpen
	c.pend.response = true
	d.stats.Accepted++
	d.schedule(c)
	d.mu.Unlock()
	d.pump()
	return c, nil
}

// Refuse answers the attempt with RST.
func (r *Request) Refuse() {
	if r.answered.Swap(true) {
		return
	}
	c := r.c
	d := c.d
	d.mu.Lock()
	d.stats.Refused++
	fs := d.resetConn(c, ErrRefused, true)
	d.mu.Unlock()
	_ = fs // no stream to tell yet
	d.pump()
}

// Dial opens a host-initiated stream to a guest port: REQUEST goes to the
// guest and done is called once with nil (RESPONSE) or an error (RST,
// device stop). The returned Conn is usable for Notify at once; data flows
// after done(nil).
func (d *Device) Dial(guestPort uint32, s Stream, done func(error)) (*Conn, error) {
	return d.DialThen(guestPort, s, nil, done)
}

// DialThen is Dial with a hook that runs once the host port is chosen and
// before the REQUEST goes out: the control protocol announces the stream
// (PEER) there, so the guest hears of it before it is asked to accept it.
func (d *Device) DialThen(guestPort uint32, s Stream, before func(*Conn), done func(error)) (*Conn, error) {
	c, err := d.dial(guestPort, s, done)
	if err != nil {
		return nil, err
	}
	if before != nil {
		before(c)
	}
	d.mu.Lock()
	if c.state == stRequesting {
		d.schedule(c)
	}
	d.mu.Unlock()
	d.pump()
	return c, nil
}

func (d *Device) dial(guestPort uint32, s Stream, done func(error)) (*Conn, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.rx == nil || d.tx == nil {
		return nil, ErrStopped
	}
	if len(d.conns) >= d.cfg.MaxConns {
		return nil, ErrLimit
	}
	var k key
	for i := 0; ; i++ {
		if i > d.cfg.MaxConns+1 {
			return nil, ErrLimit
		}
		port := d.nextPort
		d.nextPort++
		if d.nextPort == 0 {
			d.nextPort = firstEphemeralPort
		}
		k = key{guestPort, port}
		if d.conns[k] == nil {
			break
		}
	}
	c := &Conn{d: d, k: k, stream: s, state: stRequesting, onResult: done}
	c.pend.request = true
	d.conns[k] = c
	d.stats.Connects++
	return c, nil
}

// GuestPort and HostPort name the stream.
func (c *Conn) GuestPort() uint32 { return c.k.guest }

// HostPort returns the host-side port.
func (c *Conn) HostPort() uint32 { return c.k.host }

// Notify tells the device the stream may have data (or EOF) to Pull.
func (c *Conn) Notify() {
	d := c.d
	d.mu.Lock()
	if c.state == stClosed {
		d.mu.Unlock()
		return
	}
	c.dataReady = true
	c.gen++
	if c.state == stOpen {
		d.schedule(c)
	}
	d.mu.Unlock()
	d.pump()
}

// Reset aborts the stream: RST goes to the guest. The stream's Reset is
// not called (the caller knows).
func (c *Conn) Reset() {
	d := c.d
	d.mu.Lock()
	if c.state != stClosed {
		d.stats.Resets++
		d.closeConn(c)
	}
	d.mu.Unlock()
	d.pump()
}

// Unacked returns host bytes sent to the guest that its application has not
// read yet (tx_cnt - peer fwd_cnt).
func (c *Conn) Unacked() uint32 {
	c.d.mu.Lock()
	defer c.d.mu.Unlock()
	return c.txCnt - c.peerFwdCnt
}

// pump sends pending packets into guest rx buffers. Any goroutine may call
// it; one runs at a time and the others leave their request behind.
func (d *Device) pump() {
	d.pumpReq.Store(true)
	for {
		if !d.pumpMu.TryLock() {
			return
		}
		for d.pumpReq.Swap(false) {
			d.pumpOnce()
		}
		d.pumpMu.Unlock()
		if !d.pumpReq.Load() {
			return
		}
	}
}

// pumpOnce fills rx buffers until there is nothing to send or no buffer.
func (d *Device) pumpOnce() {
	d.mu.Lock()
	q := d.rx
	d.mu.Unlock()
	if q == nil {
		return
	}
	defer q.Flush()
	for d.hasWork() {
		ch := d.takeSpare(q)
		if ch == nil {
			var err error
			if ch, err = q.Pop(); err != nil {
				return
			}
			if ch == nil {
				if q.EnableNotify() {
					continue // buffers arrived meanwhile
				}
				return // the guest's rx kick runs the pump again
			}
		}
		if !d.fill(q, ch) {
			d.putSpare(q, ch)
			return
		}
	}
}

func (d *Device) hasWork() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.orphans) > 0 || len(d.work) > 0
}

// takeSpare returns an rx chain popped earlier and not used.
func (d *Device) takeSpare(q *virtq.Queue) *virtq.Chain {
	d.mu.Lock()
	defer d.mu.Unlock()
	ch := d.spare
	d.spare = nil
	if ch != nil && d.spareQ != q {
		d.spareQ.Discard(ch) // left over from a previous ring
		ch = nil
	}
	return ch
}

func (d *Device) putSpare(q *virtq.Queue, ch *virtq.Chain) {
	d.mu.Lock()
	d.spare, d.spareQ = ch, q
	d.mu.Unlock()
}

// fill writes the next packet into ch and pushes it. It returns false,
// leaving ch untouched, when there was nothing to send after all.
func (d *Device) fill(q *virtq.Queue, ch *virtq.Chain) bool {
	if ch.WritableLen() < HeaderSize {
		// A buffer too small for a header: the guest broke the driver
		// contract. Return it empty rather than hold it forever.
		d.count(func(s *Stats) { s.BadPackets++ })
		q.Push(ch, 0)
		return true
	}
	var hb [HeaderSize]byte
	d.mu.Lock()
	if len(d.orphans) > 0 {
		h := d.orphans[0]
		d.orphans = d.orphans[1:]
		d.stats.RxPackets++
		d.mu.Unlock()
		h.Encode(hb[:])
		w := ch.Writer()
		w.Write(hb[:])
		q.Push(ch, HeaderSize)
		return true
	}
	for len(d.work) > 0 {
		c := d.work[0]
		d.work = d.work[1:]
		c.queued = false
		if c.state == stClosed {
			continue
		}
		w := ch.Writer() // fresh for every attempt: an empty Pull must not leave a gap
		h, pull := d.nextPacket(c, w.Available()-HeaderSize)
		if h.Op == OpInvalid && pull <= 0 {
			continue
		}
		var n int
		var eof bool
		if pull > 0 {
			gen := c.gen
			s := c.stream
			d.mu.Unlock()
			w.Slices(nil, HeaderSize) // room for the header, written below
			n, eof = s.Pull(w.Slices(nil, pull))
			n = max(0, min(n, pull))
			d.mu.Lock()
			if c.state == stClosed {
				d.mu.Unlock()
				q.Push(ch, 0) // the stream died meanwhile: an empty buffer is dropped by the guest
				return true
			}
			switch {
			case n > 0:
				h.Op, h.Len = OpRW, uint32(n)
				c.txCnt += uint32(n)
				d.stats.RxBytes += uint64(n)
			case eof && !c.hostEOFSent:
				h.Op, h.Flags = OpShutdown, ShutdownSend
			}
			if eof {
				c.eof = true
			}
			if n == 0 && c.gen == gen {
				c.dataReady = false // nothing more until the next Notify
			}
			if h.Op == OpShutdown {
				c.hostEOFSent = true
				c.dataReady = false
			}
			if h.Op == OpInvalid {
				d.rearm(c)
				continue
			}
		}
		h.SrcCID, h.DstCID, h.SrcPort, h.DstPort, h.Type = HostCID, d.cfg.CID, c.k.host, c.k.guest, TypeStream
		h.BufAlloc, h.FwdCnt = d.cfg.BufAlloc, c.fwdCnt
		c.lastFwdSent = c.fwdCnt
		d.stats.RxPackets++
		d.rearm(c)
		d.mu.Unlock()
		h.Encode(hb[:])
		hw := ch.Writer() // the header goes in front of any payload Pull wrote
		hw.Write(hb[:])
		q.Push(ch, HeaderSize+n)
		return true
	}
	d.mu.Unlock()
	return false
}

// nextPacket picks c's next packet: a control packet, or room for data
// (pull > 0). Caller holds d.mu.
func (d *Device) nextPacket(c *Conn, room int) (h Header, pull int) {
	p := &c.pend
	switch {
	case p.request:
		p.request = false
		return Header{Op: OpRequest}, 0
	case p.response:
		p.response = false
		return Header{Op: OpResponse}, 0
	}
	if c.state != stOpen {
		return Header{}, 0
	}
	if c.dataReady && !c.hostEOFSent && c.guestShut&ShutdownRcv == 0 {
		credit := int64(c.peerBufAlloc) - int64(c.txCnt-c.peerFwdCnt)
		if credit > 0 && room > 0 {
			return Header{}, int(min(int64(room), credit, MaxPayload))
		}
		if !c.creditRequested {
			c.creditRequested = true
			return Header{Op: OpCreditRequest}, 0
		}
	}
	if p.credit {
		p.credit = false
		return Header{Op: OpCreditUpdate}, 0
	}
	return Header{}, 0
}

// rearm requeues c if it still has something to send. Caller holds d.mu.
func (d *Device) rearm(c *Conn) {
	if c.state == stClosed {
		return
	}
	credit := int64(c.peerBufAlloc) - int64(c.txCnt-c.peerFwdCnt)
	if c.pend.any() || (c.state == stOpen && c.dataReady && !c.hostEOFSent && credit > 0) {
		d.schedule(c)
	}
}
