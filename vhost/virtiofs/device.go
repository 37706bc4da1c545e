package virtiofs

import (
	"errors"
	"fmt"
	"io"
	"log"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/vsdp/vsdp/vhost"
	"github.com/vsdp/vsdp/vhost/virtq"
)

var _ vhost.Device = (*Device)(nil)

// HiprioQueue is the index of the hiprio ring; request rings follow it
// (Linux and QEMU never set up the spec's notification queue).
const HiprioQueue = 0

// Defaults for Options' zero values, and fixed bounds.
const (
	DefaultWorkers     = 256
	DefaultMaxWrite    = 1 << 20
	DefaultStopTimeout = 5 * time.Second
	// MaxQueueSize is the largest ring accepted (QEMU's limit, and the
	// queue-size vsdp runs with).
	MaxQueueSize = 1024
	// MaxRequestQueues bounds Options.RequestQueues.
	MaxRequestQueues = 64
	// requestSlack is added to MaxWrite to bound each direction of a
	// request: headers, names and xattr values (at most 64 KiB).
	requestSlack = 68 << 10
	// hiprioBatch bounds the hiprio chains served per Kick.
	hiprioBatch = 64
	// initWait bounds how long FUSE_INIT waits for requests still running
	// before it is refused with EBUSY.
	initWait = 100 * time.Millisecond
)

// Errors.
var (
	// ErrInvalid: options out of range.
	ErrInvalid = errors.New("virtiofs: invalid options")
	// ErrNoQueue: the core offered a ring the device does not have.
	ErrNoQueue = errors.New("virtiofs: no such queue")
)

// Options configure a Device. The zero value is usable.
type Options struct {
	// RequestQueues is the number of request rings (QEMU's
	// num-request-queues); 0 means 1.
	RequestQueues int
	// Workers bounds the requests in flight over all request rings; 0
	// means DefaultWorkers. Each parked request holds one worker and its
	// chain's descriptors.
	Workers int
	// Mount is handed to go-fuse (copied); nil means defaults. Its Logger
	// is replaced by a discarding one and Debug is cleared: the library
	// never logs. MaxWrite 0 means DefaultMaxWrite.
	Mount *fuse.MountOptions
	// StopTimeout bounds how long QueueStop, Reset and Close wait for
	// requests still in the filesystem; 0 means DefaultStopTimeout.
	StopTimeout time.Duration
	// OnStop is called (from the goroutine stopping the device, possibly
	// several times) when a request ring stops, and at Reset and Close:
	// the filesystem must then complete every request parked in it.
	OnStop func()
}

// Stats are device counters.
type Stats struct {
	Requests     uint64 // chains taken from request rings
	Hiprio       uint64 // chains taken from the hiprio ring
	Replies      uint64 // chains given back to the guest
	ErrorReplies uint64 // replies the device wrote itself (rejections, go-fuse failures)
	BadChains    uint64 // malformed chains (short, wrong length, oversized, no room)
	Unsupported  uint64 // opcodes answered ENOSYS by the device
	InitBusy     uint64 // FUSE_INIT refused while other requests ran
	Stalls       uint64 // a ring left waiting because every worker was busy
	Dropped      uint64 // finished requests whose ring had stopped: discarded
	MaxReadable  int    // the largest request taken (device-readable bytes)
	InFlight     int    // requests in workers now
	MaxInFlight  int    // the most at once
}

// session is one FUSE session's go-fuse state; FUSE_INIT replaces it with
// the negotiated flags, Reset with a fresh one.
type session struct {
	ps          *fuse.ProtocolServer
	setxattrExt bool // SETXATTR carries the extended struct
	renameSwap  bool // RENAME carries the flags word (never on Linux)
}

// reqQueue is one request ring.
type reqQueue struct {
	q        *virtq.Queue // guarded by Device.mu; nil while stopped
	stalled  bool         // guarded by Device.mu: waiting for a worker
	inflight int          // guarded by Device.mu
	pumpMu   sync.Mutex
	pumpReq  atomic.Bool
}

// work is one request in a worker.
type work struct {
	rq     *reqQueue
	q      *virtq.Queue
	ch     *virtq.Chain
	unique uint64 // guarded by Device.mu; 0 until parsed
}

// Device is the virtio-fs device of one front-end: FUSE requests from the
// guest's rings, served by go-fuse's ProtocolServer over a RawFileSystem.
type Device struct {
	vhost.NoConfig

	fs      fuse.RawFileSystem
	opts    Options
	mount   fuse.MountOptions
	limit   int // most bytes per direction of one request
	discard *log.Logger

	// initMu is held shared around every request handed to go-fuse and
	// exclusively by FUSE_INIT, which rewrites go-fuse's session state.
	initMu sync.RWMutex
	sess   atomic.Pointer[session]

	mu      sync.Mutex
	hi      *virtq.Queue
	reqs    []*reqQueue
	works   map[*work]struct{}
	closed  bool
	changed chan struct{} // closed and replaced whenever a worker finishes
	stats   Stats
}

// New returns a device serving fs. fs is shared by every FUSE session the
// device sees (a guest reset starts a new one).
func New(fs fuse.RawFileSystem, o Options) (*Device, error) {
	if fs == nil {
		return nil, fmt.Errorf("%w: no filesystem", ErrInvalid)
	}
	switch {
	case o.RequestQueues < 0 || o.RequestQueues > MaxRequestQueues:
		return nil, fmt.Errorf("%w: %d request queues, want 1..%d", ErrInvalid, o.RequestQueues, MaxRequestQueues)
	case o.Workers < 0:
		return nil, fmt.Errorf("%w: %d workers", ErrInvalid, o.Workers)
	case o.StopTimeout < 0:
		return nil, fmt.Errorf("%w: stop timeout %v", ErrInvalid, o.StopTimeout)
	}
	if o.RequestQueues == 0 {
		o.RequestQueues = 1
	}
	if o.Workers == 0 {
		o.Workers = DefaultWorkers
	}
	if o.StopTimeout == 0 {
		o.StopTimeout = DefaultStopTimeout
	}
	d := &Device{fs: fs, opts: o, works: map[*work]struct{}{}, changed: make(chan struct{}),
		discard: log.New(io.Discard, "", 0)}
	if o.Mount != nil {
		d.mount = *o.Mount
	}
	d.mount.Logger = d.discard
	d.mount.Debug = false
	if d.mount.MaxWrite <= 0 {
		d.mount.MaxWrite = DefaultMaxWrite
	}
	d.limit = d.mount.MaxWrite + requestSlack
	for range o.RequestQueues {
		d.reqs = append(d.reqs, &reqQueue{})
	}
	d.sess.Store(d.newSession())
	return d, nil
}

func (d *Device) newSession() *session {
	m := d.mount
	return &session{ps: fuse.NewProtocolServer(d.fs, &m)}
}

// MaxRequest is the most bytes the device accepts in either direction of
// one request (MaxWrite plus room for headers, names and xattr values).
func (d *Device) MaxRequest() int { return d.limit }

// Stats returns the counters.
func (d *Device) Stats() Stats {
	d.mu.Lock()
	defer d.mu.Unlock()
	s := d.stats
	s.InFlight = len(d.works)
	return s
}

func (d *Device) count(f func(*Stats)) {
	d.mu.Lock()
	f(&d.stats)
	d.mu.Unlock()
}

// Info implements vhost.Device: hiprio plus the request rings, no feature
// bits of its own (VIRTIO_FS_F_NOTIFICATION is not offered: neither QEMU
// nor Linux use it) and no config space (QEMU fills the tag and the number
// of request queues itself and never asks the back-end).
func (d *Device) Info() vhost.Info {
	return vhost.Info{Name: "virtiofs", Type: 26, Queues: 1 + len(d.reqs), MaxQueueSize: MaxQueueSize}
}

// SetFeatures implements vhost.Device.
func (d *Device) SetFeatures(uint64) error { return nil }

// QueueStart implements vhost.Device.
func (d *Device) QueueStart(index int, q *virtq.Queue) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	switch {
	case index == HiprioQueue:
		d.hi = q
	case index > 0 && index <= len(d.reqs):
		rq := d.reqs[index-1]
		rq.q, rq.stalled = q, false
	default:
		return fmt.Errorf("%w: %d", ErrNoQueue, index)
	}
	return nil
}

// QueueStop implements vhost.Device. A request ring's requests still in
// the filesystem are interrupted (a FUSE_INTERRUPT through go-fuse, which
// cancels their context), OnStop runs, and the device waits for them up to
// StopTimeout; one that finishes later is discarded, never pushed.
func (d *Device) QueueStop(index int) {
	d.mu.Lock()
	if index == HiprioQueue {
		d.hi = nil
		d.mu.Unlock()
		return
	}
	if index < 1 || index > len(d.reqs) {
		d.mu.Unlock()
		return
	}
	rq := d.reqs[index-1]
	rq.q, rq.stalled = nil, false
	uniques := d.uniques(rq)
	d.mu.Unlock()
	d.hangUp(uniques)
	d.wait(func() bool { return rq.inflight == 0 })
}

// Reset implements vhost.Device: every ring has stopped; requests still in
// the filesystem are hung up, and the next FUSE session starts afresh.
func (d *Device) Reset() {
	d.stopAll()
	d.sess.Store(d.newSession())
}

// Close implements vhost.Device. It is idempotent.
func (d *Device) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	d.mu.Unlock()
	d.stopAll()
	return nil
}

func (d *Device) stopAll() {
	d.mu.Lock()
	d.hi = nil
	for _, rq := range d.reqs {
		rq.q, rq.stalled = nil, false
	}
	uniques := d.uniques(nil)
	d.mu.Unlock()
	d.hangUp(uniques)
	d.wait(func() bool { return len(d.works) == 0 })
}

// uniques lists the FUSE uniques in flight on rq (all rings if nil).
// Caller holds d.mu.
func (d *Device) uniques(rq *reqQueue) []uint64 {
	var u []uint64
	for w := range d.works {
		if (rq == nil || w.rq == rq) && w.unique != 0 {
			u = append(u, w.unique)
		}
	}
	return u
}

// hangUp interrupts the given requests through go-fuse (closing the cancel
// channel a well-behaved filesystem selects on) and calls OnStop.
func (d *Device) hangUp(uniques []uint64) {
	if len(uniques) > 0 {
		var scratch [OutHeaderSize]byte
		d.initMu.RLock()
		ps := d.sess.Load().ps
		for _, u := range uniques {
			b := encodeInterrupt(u)
			ps.HandleRequest([][]byte{b}, [][]byte{scratch[:]})
		}
		d.initMu.RUnlock()
	}
	if d.opts.OnStop != nil {
		d.opts.OnStop()
	}
}

// wait waits until done (evaluated under d.mu) or StopTimeout.
func (d *Device) wait(done func() bool) bool {
	deadline := time.Now().Add(d.opts.StopTimeout)
	for {
		d.mu.Lock()
		ok := done()
		ch := d.changed
		d.mu.Unlock()
		if ok {
			return true
		}
		left := time.Until(deadline)
		if left <= 0 {
			return false
		}
		t := time.NewTimer(left)
		select {
		case <-ch:
		case <-t.C:
		}
		t.Stop()
	}
}

// Kick implements vhost.Device. hiprio is served inline, a bounded batch
// per call; a request ring's chains go to workers until all are busy.
func (d *Device) Kick(index int) (more bool, err error) {
	if index == HiprioQueue {
		return d.kickHiprio()
	}
	if index < 1 || index > len(d.reqs) {
		return false, fmt.Errorf("%w: %d", ErrNoQueue, index)
	}
	rq := d.reqs[index-1]
	d.mu.Lock()
	q := rq.q
	d.mu.Unlock()
	if q == nil {
		return false, nil
	}
	d.pump(rq)
	return false, q.Err()
}

// kickHiprio serves FORGET, BATCH_FORGET and INTERRUPT on the calling
// goroutine: they never wait behind a worker.
func (d *Device) kickHiprio() (bool, error) {
	d.mu.Lock()
	q := d.hi
	d.mu.Unlock()
	if q == nil {
		return false, nil
	}
	q.DisableNotify()
	for range hiprioBatch {
		ch, err := q.Pop()
		if err != nil {
			q.Flush()
			return false, err
		}
		if ch == nil {
			if err := q.Flush(); err != nil {
				return false, err
			}
			return q.EnableNotify(), nil
		}
		d.count(func(s *Stats) { s.Hiprio++ })
		n := d.handle(ch.Readable(), ch.Writable(), true, nil)
		q.Push(ch, n)
		d.count(func(s *Stats) { s.Replies++ })
	}
	return true, q.Flush()
}

// pump hands rq's chains to workers. Any goroutine may call it (a kick, a
// worker that finished); one runs at a time per ring and a call made while
// it runs makes it go round again.
func (d *Device) pump(rq *reqQueue) {
	rq.pumpReq.Store(true)
	for {
		if !rq.pumpMu.TryLock() {
			return
		}
		for rq.pumpReq.Swap(false) {
			d.dispatch(rq)
		}
		rq.pumpMu.Unlock()
		if !rq.pumpReq.Load() {
			return
		}
	}
}

// dispatch pops chains while a worker is free. With every worker busy the
// chains stay in the ring and the ring is marked stalled: the next worker
// to finish pumps it again.
func (d *Device) dispatch(rq *reqQueue) {
	d.mu.Lock()
	q := rq.q
	d.mu.Unlock()
	if q == nil {
		return
	}
	q.DisableNotify()
	for {
		d.mu.Lock()
		if rq.q != q {
			d.mu.Unlock()
			return
		}
		if len(d.works) >= d.opts.Workers {
			if !rq.stalled {
				rq.stalled = true
				d.stats.Stalls++
			}
			d.mu.Unlock()
			return
		}
		ch, err := q.Pop()
		if err != nil || ch == nil {
			d.mu.Unlock()
			if err == nil && q.EnableNotify() {
				q.DisableNotify()
				continue // chains arrived while notifications were off
			}
			return
		}
		w := &work{rq: rq, q: q, ch: ch}
		d.works[w] = struct{}{}
		rq.inflight++
		d.stats.Requests++
		d.stats.MaxReadable = max(d.stats.MaxReadable, ch.ReadableLen())
		d.stats.MaxInFlight = max(d.stats.MaxInFlight, len(d.works))
		d.mu.Unlock()
		go d.run(w)
	}
}

// run is one worker: it serves w and gives its chain back.
func (d *Device) run(w *work) {
	n := d.handle(w.ch.Readable(), w.ch.Writable(), false, w)
	d.mu.Lock()
	if n >= 0 && w.rq.q == w.q {
		w.q.Push(w.ch, n)
		w.q.Flush()
		d.stats.Replies++
	} else {
		w.q.Discard(w.ch) // the ring stopped: never push to it
		d.stats.Dropped++
	}
	delete(d.works, w)
	w.rq.inflight--
	var resume []*reqQueue
	for _, rq := range d.reqs {
		if rq.stalled {
			rq.stalled = false
			resume = append(resume, rq)
		}
	}
	close(d.changed)
	d.changed = make(chan struct{})
	d.mu.Unlock()
	for _, rq := range resume {
		d.pump(rq)
	}
}

// begin records w's unique and reports whether its ring still runs (a
// request whose ring stopped is not started).
func (d *Device) begin(w *work, unique uint64) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	w.unique = unique
	return w.rq.q == w.q
}
