package vsocktest

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/vsdp/vsdp/vhost/vhosttest"
	"github.com/vsdp/vsdp/vhost/vsock"
)

// BufAlloc is the receive buffer the guest advertises per stream (Linux's
// default, 256 KiB).
const BufAlloc = 256 << 10

// RxBufSize is each rx buffer (QEMU 7.2 with Linux 6.3+ posts 3776-byte
// buffers; Linux 6.1 a 44-byte header plus a page).
const RxBufSize = 3776

// ErrReset: the host reset the stream.
var ErrReset = errors.New("vsocktest: connection reset by host")

type key struct{ local, peer uint32 }

// Guest is one guest's vsock driver.
type Guest struct {
	dev    *vhosttest.Device
	rx, tx *vhosttest.Queue
	cid    uint64

	mu      sync.Mutex
	cond    *sync.Cond
	conns   map[key]*Conn
	pending map[key]chan error
	listen  map[uint32]chan *Conn
	next    uint32
	closed  bool
	err     error
	done    chan struct{}
	async   sync.WaitGroup // replies sent from the rx loop's helpers
	stats   Stats          // guarded by mu
}

// Stats count how the driver's rx loop woke up. The driver asks for an
// interrupt at every used entry (EVENT_IDX used_event = its next index), so
// a device that publishes rx entries must signal: Missed counts entries
// found published while no interrupt came even after a grace period — a
// notification the device owed and never sent.
type Stats struct {
	Interrupts uint64 // woken by the rx call eventfd
	Timeouts   uint64 // no interrupt within the poll interval (idle, or a slow host)
	Missed     uint64 // timeouts that found rx entries no interrupt announced
	Packets    uint64 // rx packets received
	Batches    uint64 // rx drains that found at least one packet
}

// Stats returns the driver's counters.
func (g *Guest) Stats() Stats {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.stats
}

// spawn runs f on its own goroutine unless the driver is closing; Close
// waits for it (it touches guest memory, which goes after Close).
// Caller holds g.mu.
func (g *Guest) spawn(f func()) {
	if g.closed {
		return
	}
	g.async.Add(1)
	go func() { defer g.async.Done(); f() }()
}

// New starts a driver on a started fake device whose rings are vsock's rx
// (0) and tx (1).
func New(dev *vhosttest.Device, cid uint64) (*Guest, error) {
	if len(dev.Queues) < 2 {
		return nil, fmt.Errorf("vsocktest: device has %d queues, want 2", len(dev.Queues))
	}
	g := &Guest{dev: dev, rx: dev.Queues[0], tx: dev.Queues[1], cid: cid, conns: map[key]*Conn{},
		pending: map[key]chan error{}, listen: map[uint32]chan *Conn{}, next: 50000, done: make(chan struct{})}
	g.cond = sync.NewCond(&g.mu)
	g.fillRx()
	go g.loop()
	return g, nil
}

// Close stops the driver (not the device).
func (g *Guest) Close() {
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return
	}
	g.closed = true
	g.cond.Broadcast()
	g.mu.Unlock()
	<-g.done
	g.async.Wait()
}

func (g *Guest) fillRx() {
	for {
		if _, err := g.rx.Add(nil, []int{RxBufSize}); err != nil {
			break
		}
	}
	g.rx.Notify(false)
}

// pollInterval bounds how long the rx loop sleeps without an interrupt (a
// safety net: with a correct device every rx publication interrupts).
const pollInterval = 2 * time.Millisecond

// missedGrace is how long a timed-out loop that finds rx entries waits for
// their interrupt before counting it missed: the device signals just after
// publishing, so a host that stalls the device between the two is not a
// lost interrupt.
const missedGrace = 500 * time.Millisecond

// loop reaps rx packets and tx completions until Close.
func (g *Guest) loop() {
	defer close(g.done)
	var scratch []byte
	for {
		g.mu.Lock()
		if g.closed {
			g.mu.Unlock()
			return
		}
		// Drain every used rx buffer under one lock and wake readers once
		// per batch, not per packet.
		n := 0
		var err error
		for {
			var u vhosttest.UsedElem
			var ok bool
			u, ok, err = g.rx.UsedAppend(scratch)
			if err != nil || !ok {
				break
			}
			scratch = u.Data[:0]
			n++
			g.packet(u.Data)
		}
		if n > 0 {
			g.stats.Packets += uint64(n)
			g.stats.Batches++
			g.cond.Broadcast()
		}
		g.mu.Unlock()
		if err != nil {
			g.fail(err)
			return
		}
		if n > 0 {
			g.fillRx()
		}
		g.reapTx()
		if n == 0 {
			g.wait()
		}
	}
}

// wait sleeps until an rx interrupt or pollInterval, and counts how it
// woke.
func (g *Guest) wait() {
	woke, _ := g.rx.WaitCall(pollInterval)
	missed := false
	if !woke && g.rx.UsedIdx() != g.rx.LastUsed() {
		// Entries are published and no interrupt was seen: give the
		// device its grace period to signal.
		got, _ := g.rx.WaitCall(missedGrace)
		missed = !got
	}
	g.mu.Lock()
	if woke {
		g.stats.Interrupts++
	} else {
		g.stats.Timeouts++
	}
	if missed {
		g.stats.Missed++
	}
	g.mu.Unlock()
}

func (g *Guest) fail(err error) {
	g.mu.Lock()
	g.err = err
	g.cond.Broadcast()
	g.mu.Unlock()
}

func (g *Guest) reapTx() {
	for {
		_, ok, err := g.tx.Used()
		if err != nil || !ok {
			break
		}
	}
	g.mu.Lock()
	g.cond.Broadcast()
	g.mu.Unlock()
}

// errClosed: the driver was closed.
var errClosed = errors.New("vsocktest: driver closed")

// send queues one packet, waiting for tx descriptors.
func (g *Guest) send(h vsock.Header, payload []byte) error {
	g.mu.Lock()
	closed := g.closed
	g.mu.Unlock()
	if closed {
		return errClosed
	}
	h.SrcCID, h.DstCID, h.Type, h.Len = g.cid, vsock.HostCID, vsock.TypeStream, uint32(len(payload))
	hb := make([]byte, vsock.HeaderSize)
	h.Encode(hb)
	out := [][]byte{hb}
	if len(payload) > 0 {
		out = append(out, payload)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := g.tx.Add(out, nil)
		if err == nil {
			return g.tx.Notify(false)
		}
		if !errors.Is(err, vhosttest.ErrRingFull) || time.Now().After(deadline) {
			return err
		}
		g.reapTx()
		time.Sleep(100 * time.Microsecond)
	}
}

// packet dispatches one rx packet; b is valid only during the call.
// Caller holds g.mu and broadcasts g.cond afterwards.
func (g *Guest) packet(b []byte) {
	var h vsock.Header
	if h.Decode(b) != nil || int(h.Len) != len(b)-vsock.HeaderSize {
		g.err = fmt.Errorf("vsocktest: malformed rx packet of %d bytes", len(b))
		return
	}
	payload := b[vsock.HeaderSize:]
	k := key{h.DstPort, h.SrcPort}
	c := g.conns[k]
	if c != nil {
		c.peerBuf, c.peerFwd = h.BufAlloc, h.FwdCnt
	}
	switch h.Op {
	case vsock.OpResponse:
		if ch := g.pending[k]; ch != nil {
			delete(g.pending, k)
			ch <- nil
		}
	case vsock.OpRST:
		if ch := g.pending[k]; ch != nil {
			delete(g.pending, k)
			ch <- ErrReset
		}
		if c != nil {
			c.reset = true
			delete(g.conns, k)
		}
	case vsock.OpRequest:
		ch := g.listen[h.DstPort]
		if ch == nil {
			g.spawn(func() { g.send(vsock.Header{SrcPort: h.DstPort, DstPort: h.SrcPort, Op: vsock.OpRST}, nil) })
			return
		}
		c := g.newConn(k, h.BufAlloc, h.FwdCnt)
		g.spawn(func() {
			g.send(vsock.Header{SrcPort: h.DstPort, DstPort: h.SrcPort, Op: vsock.OpResponse, BufAlloc: BufAlloc}, nil)
			ch <- c
		})
	case vsock.OpRW:
		if c == nil {
			return
		}
		if c.buffered()+len(payload) > BufAlloc {
			c.err = fmt.Errorf("vsocktest: host sent beyond the guest's credit (%d buffered + %d)", c.buffered(), len(payload))
		}
		c.push(payload)
	case vsock.OpShutdown:
		if c != nil && h.Flags&vsock.ShutdownSend != 0 {
			c.eof = true
		}
	case vsock.OpCreditRequest:
		if c != nil {
			g.spawn(c.creditUpdate)
		}
	}
}

func (g *Guest) newConn(k key, peerBuf, peerFwd uint32) *Conn {
	c := &Conn{g: g, k: k, peerBuf: peerBuf, peerFwd: peerFwd}
	g.conns[k] = c
	return c
}

// Dial connects to a host port.
func (g *Guest) Dial(port uint32, timeout time.Duration) (*Conn, error) {
	g.mu.Lock()
	g.next++
	k := key{g.next, port}
	ch := make(chan error, 1)
	g.pending[k] = ch
	c := g.newConn(k, 0, 0)
	g.mu.Unlock()
	if err := g.send(vsock.Header{SrcPort: k.local, DstPort: port, Op: vsock.OpRequest, BufAlloc: BufAlloc}, nil); err != nil {
		return nil, err
	}
	select {
	case err := <-ch:
		if err != nil {
			g.mu.Lock()
			delete(g.conns, k)
			g.mu.Unlock()
			return nil, err
		}
		return c, nil
	case <-time.After(timeout):
		g.mu.Lock()
		delete(g.pending, k)
		delete(g.conns, k)
		g.mu.Unlock()
		return nil, fmt.Errorf("vsocktest: connect to %d timed out", port)
	}
}

// Listen accepts host connections to a guest port.
func (g *Guest) Listen(port uint32) <-chan *Conn {
	ch := make(chan *Conn, 16)
	g.mu.Lock()
	g.listen[port] = ch
	g.mu.Unlock()
	return ch
}

// Conn is one guest stream.
type Conn struct {
	g                *Guest
	k                key
	peerBuf, peerFwd uint32 // the host's window
	txCnt            uint32
	fwd, fwdSent     uint32
	rbuf             []byte // received bytes are rbuf[roff:]
	roff             int
	eof, reset       bool
	err              error
}

// buffered returns the bytes received and not read. Caller holds g.mu.
func (c *Conn) buffered() int { return len(c.rbuf) - c.roff }

// push appends received bytes, moving the unread ones to the front when
// that makes room: the credit bounds them to BufAlloc, so the buffer stops
// growing there. Caller holds g.mu.
func (c *Conn) push(p []byte) {
	if len(c.rbuf)+len(p) > cap(c.rbuf) && c.roff > 0 {
		c.rbuf = c.rbuf[:copy(c.rbuf, c.rbuf[c.roff:])]
		c.roff = 0
	}
	c.rbuf = append(c.rbuf, p...)
}

// LocalPort and PeerPort name the stream.
func (c *Conn) LocalPort() uint32 { return c.k.local }

// PeerPort returns the host port.
func (c *Conn) PeerPort() uint32 { return c.k.peer }

// Write sends p, within the host's credit.
func (c *Conn) Write(p []byte) (int, error) {
	g := c.g
	n := 0
	for len(p) > 0 {
		g.mu.Lock()
		for !c.reset && !g.closed && g.err == nil && int64(c.peerBuf)-int64(c.txCnt-c.peerFwd) <= 0 {
			g.cond.Wait()
		}
		if c.reset || g.closed || g.err != nil {
			g.mu.Unlock()
			return n, errors.Join(ErrReset, g.err)
		}
		k := min(len(p), int(int64(c.peerBuf)-int64(c.txCnt-c.peerFwd)), vsock.MaxPayload)
		c.txCnt += uint32(k)
		fwd := c.fwd
		g.mu.Unlock()
		if err := g.send(vsock.Header{SrcPort: c.k.local, DstPort: c.k.peer, Op: vsock.OpRW, BufAlloc: BufAlloc, FwdCnt: fwd}, p[:k]); err != nil {
			return n, err
		}
		n += k
		p = p[k:]
	}
	return n, nil
}

// Read reads stream bytes; io.EOF after the host's SHUTDOWN.
func (c *Conn) Read(p []byte) (int, error) {
	g := c.g
	g.mu.Lock()
	for c.buffered() == 0 && !c.eof && !c.reset && c.err == nil && !g.closed && g.err == nil {
		g.cond.Wait()
	}
	if c.err != nil || g.err != nil {
		g.mu.Unlock()
		return 0, errors.Join(c.err, g.err)
	}
	if c.buffered() == 0 {
		g.mu.Unlock()
		if c.reset {
			return 0, ErrReset
		}
		return 0, io.EOF
	}
	n := copy(p, c.rbuf[c.roff:])
	c.roff += n
	if c.roff == len(c.rbuf) {
		c.rbuf, c.roff = c.rbuf[:0], 0
	}
	c.fwd += uint32(n)
	update := c.fwd-c.fwdSent >= BufAlloc/4
	g.mu.Unlock()
	if update {
		c.creditUpdate()
	}
	return n, nil
}

func (c *Conn) creditUpdate() {
	g := c.g
	g.mu.Lock()
	fwd := c.fwd
	c.fwdSent = fwd
	g.mu.Unlock()
	g.send(vsock.Header{SrcPort: c.k.local, DstPort: c.k.peer, Op: vsock.OpCreditUpdate, BufAlloc: BufAlloc, FwdCnt: fwd}, nil)
}

// CloseWrite sends SHUTDOWN(send): the host reads EOF.
func (c *Conn) CloseWrite() error {
	return c.g.send(vsock.Header{SrcPort: c.k.local, DstPort: c.k.peer, Op: vsock.OpShutdown, Flags: vsock.ShutdownSend, BufAlloc: BufAlloc, FwdCnt: c.fwd}, nil)
}

// Close sends SHUTDOWN both ways (the host answers with RST).
func (c *Conn) Close() error {
	return c.g.send(vsock.Header{SrcPort: c.k.local, DstPort: c.k.peer, Op: vsock.OpShutdown, Flags: vsock.ShutdownSend | vsock.ShutdownRcv, BufAlloc: BufAlloc, FwdCnt: c.fwd}, nil)
}
