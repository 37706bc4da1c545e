package virtq

// Split virtqueue primer (virtio 1.2 §2.7, "Split Virtqueues"):
//
//	descriptor table  16*N bytes, align 16: {le64 addr (GPA), le32 len, le16 flags, le16 next}
//	avail ring        6+2*N bytes, align 2: {le16 flags, le16 idx, le16 ring[N], le16 used_event}
//	used ring         6+8*N bytes, align 4: {le16 flags, le16 idx, {le32 id, le32 len}[N], le16 avail_event}
//
// The driver (guest) writes descriptors and avail.ring[idx%N], then (write
// barrier) bumps avail.idx. The device (us) reads avail.idx (acquire), then
// the ring entry and the descriptors it names, each copied once and validated
// on the copy. The device writes used.ring[idx%N], then (release) bumps
// used.idx, then (full barrier) reads used_event or avail.flags to decide
// whether to interrupt the driver.
//
// Memory ordering. Go has no 16-bit atomics, so 16-bit indices are accessed
// through the naturally aligned 32-bit word that contains them:
//   - avail.idx lives at avail+2 and avail is 2-aligned, so its aligned word
//     is either [avail, avail+4) or [avail+2, avail+6): always inside the ring.
//   - used.flags and used.idx form the aligned word [used, used+4), both
//     written only by the device, so one atomic store publishes both.
// used_event, avail.flags and avail_event are advisory (notification
// suppression): they are read or written with plain 16-bit accesses placed
// after a full barrier, as the spec's algorithm requires.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/vsdp/vsdp/vhost/guestmem"
	"golang.org/x/sys/unix"
)

// MaxSize is the largest split-ring size (virtio 1.2 §2.7: Queue Size ≤ 32768).
const MaxSize = 32768

// Descriptor flags (virtio 1.2 §2.7.5).
const (
	DescNext     = 1 // VIRTQ_DESC_F_NEXT
	DescWrite    = 2 // VIRTQ_DESC_F_WRITE: device-writable
	DescIndirect = 4 // VIRTQ_DESC_F_INDIRECT
)

// Ring flags.
const (
	AvailNoInterrupt = 1 // VIRTQ_AVAIL_F_NO_INTERRUPT
	UsedNoNotify     = 1 // VIRTQ_USED_F_NO_NOTIFY
)

// maxChainBytes bounds the bytes of one direction of a chain (virtio 1.2
// §2.7.5.3.1: a chain must not exceed 2^32 bytes).
const maxChainBytes = 1<<32 - 1

var (
	// ErrBroken: the driver corrupted the ring; the queue stays broken until
	// it is set up again. Errors wrapping it are *ChainError or *RingError.
	ErrBroken = errors.New("virtq: ring broken by driver")
	// ErrStopped: the queue was stopped (GET_VRING_BASE, reset, disconnect).
	ErrStopped = errors.New("virtq: queue stopped")
	// ErrConfig: the ring configuration is invalid.
	ErrConfig = errors.New("virtq: invalid ring configuration")
)

// ChainError reports a descriptor chain the driver got wrong.
type ChainError struct {
	Queue  int
	Head   uint16
	Reason string
}

func (e *ChainError) Error() string {
	return fmt.Sprintf("virtq: queue %d chain %d: %s", e.Queue, e.Head, e.Reason)
}

func (e *ChainError) Unwrap() error { return ErrBroken }

// RingError reports a ring-level violation (avail index jumped, etc.).
type RingError struct {
	Queue  int
	Reason string
}

func (e *RingError) Error() string { return fmt.Sprintf("virtq: queue %d: %s", e.Queue, e.Reason) }

func (e *RingError) Unwrap() error { return ErrBroken }

// Config describes one ring as the front-end set it up.
type Config struct {
	Index     int    // queue index, for errors
	Size      uint16 // SET_VRING_NUM; power of two, 1..32768 (32768 is encoded as 0x8000)
	Desc      guestmem.UVA
	Avail     guestmem.UVA
	Used      guestmem.UVA
	LastAvail uint16 // SET_VRING_BASE
	EventIdx  bool   // VIRTIO_F_EVENT_IDX negotiated
	Indirect  bool   // VIRTIO_F_INDIRECT_DESC negotiated
}

// Validate checks the size and alignments.
func (c Config) Validate() error {
	n := uint32(c.Size)
	if c.Size == 0 || n > MaxSize || n&(n-1) != 0 {
		return fmt.Errorf("%w: queue %d size %d is not a power of two in 1..%d", ErrConfig, c.Index, c.Size, MaxSize)
	}
	switch {
	case c.Desc%16 != 0:
		return fmt.Errorf("%w: queue %d descriptor table %#x not 16-byte aligned", ErrConfig, c.Index, uint64(c.Desc))
	case c.Avail%2 != 0:
		return fmt.Errorf("%w: queue %d avail ring %#x not 2-byte aligned", ErrConfig, c.Index, uint64(c.Avail))
	case c.Used%4 != 0:
		return fmt.Errorf("%w: queue %d used ring %#x not 4-byte aligned", ErrConfig, c.Index, uint64(c.Used))
	}
	return nil
}

// Area sizes of a ring of n entries (virtio 1.2 §2.7).
func DescSize(n uint16) uint64  { return 16 * uint64(n) }
func AvailSize(n uint16) uint64 { return 6 + 2*uint64(n) }
func UsedSize(n uint16) uint64  { return 6 + 8*uint64(n) }

// Queue is the device side of one split ring. Its methods are safe for
// concurrent use (one mutex serialises them); a device typically pops and
// pushes from the ring's goroutine and pushes from others.
type Queue struct {
	mem  *guestmem.Memory
	cfg  Config
	ring *guestmem.Table // retained: keeps the ring areas mapped
	desc []byte
	// availWord points at the aligned 32-bit word holding avail.idx;
	// availShift selects its half.
	availWord  *uint32
	availShift uint
	availRing  []byte // avail.ring[N] and used_event
	availFlags *uint16
	usedEvent  *uint16
	usedWord   *uint32 // used.flags | used.idx<<16
	usedRing   []byte  // used.ring[N]
	availEvent *uint16

	call atomic.Pointer[os.File]

	mu         sync.Mutex // guards everything below
	tbl        *guestmem.Table
	lastAvail  uint16
	usedIdx    uint16 // next used index to publish
	pending    uint16 // used entries written but not yet published
	notifyDue  bool   // a publication inside Push asked for an interrupt
	usedFlags  uint16
	broken     error
	stopped    bool
	free       []*Chain
	stats      Stats
	fenceDummy atomic.Uint64
}

// Stats counts a queue's work; read with Queue.Stats.
type Stats struct {
	Popped     uint64 // chains popped
	Pushed     uint64 // used entries published
	Interrupts uint64 // call eventfd signals
	Flushes    uint64 // used-index publications
}

// New sets up a queue over mem. The ring areas must be mapped now; they stay
// mapped (even if their region is removed) until Close.
func New(mem *guestmem.Memory, cfg Config) (*Queue, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	t := mem.Snapshot()
	n := cfg.Size
	desc, err := t.SliceUVA(cfg.Desc, DescSize(n))
	if err == nil {
		var avail, used []byte
		if avail, err = t.SliceUVA(cfg.Avail, AvailSize(n)); err == nil {
			if used, err = t.SliceUVA(cfg.Used, UsedSize(n)); err == nil {
				q := &Queue{mem: mem, cfg: cfg, ring: t, desc: desc, lastAvail: cfg.LastAvail}
				q.setRings(avail, used)
				q.usedIdx = uint16(atomic.LoadUint32(q.usedWord) >> 16)
				return q, nil
			}
		}
	}
	t.Release()
	return nil, fmt.Errorf("%w: queue %d ring areas: %w", ErrConfig, cfg.Index, err)
}

func (q *Queue) setRings(avail, used []byte) {
	n := int(q.cfg.Size)
	p := uintptr(unsafe.Pointer(&avail[0]))
	if p%4 == 0 {
		q.availWord, q.availShift = (*uint32)(unsafe.Pointer(&avail[0])), 16
	} else {
		q.availWord, q.availShift = (*uint32)(unsafe.Pointer(&avail[2])), 0
	}
	q.availFlags = (*uint16)(unsafe.Pointer(&avail[0]))
	q.availRing = avail[4 : 4+2*n]
	q.usedEvent = (*uint16)(unsafe.Pointer(&avail[4+2*n]))
	q.usedWord = (*uint32)(unsafe.Pointer(&used[0]))
	q.usedRing = used[4 : 4+8*n]
	q.availEvent = (*uint16)(unsafe.Pointer(&used[4+8*n]))
}

// Index returns the queue index.
func (q *Queue) Index() int { return q.cfg.Index }

// Size returns the ring size.
func (q *Queue) Size() uint16 { return q.cfg.Size }

// SetCall replaces the call eventfd (nil: no interrupts, the driver polls).
// The latest file is always the one signalled. The queue does not close
// files; a Write to a file closed concurrently fails harmlessly.
func (q *Queue) SetCall(f *os.File) { q.call.Store(f) }

// Stats returns the counters.
func (q *Queue) Stats() Stats {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.stats
}

// Err returns the error that broke the queue, or nil.
func (q *Queue) Err() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.broken
}

func (q *Queue) fence() { q.fenceDummy.Add(1) } // a full barrier (LOCK XADD on amd64)

func (q *Queue) availIdx() uint16 {
	return uint16(atomic.LoadUint32(q.availWord) >> q.availShift)
}

func (q *Queue) fail(err error) error {
	if q.broken == nil {
		q.broken = err
	}
	return q.broken
}

func (q *Queue) check() error {
	if q.stopped {
		return ErrStopped
	}
	return q.broken
}

// Pending reports whether the driver has made chains available that were not
// popped yet.
func (q *Queue) Pending() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.check() == nil && q.availIdx() != q.lastAvail
}

// Pop takes the next available chain. It returns (nil, nil) when the ring is
// empty, ErrStopped after Stop, and an error wrapping ErrBroken when the
// driver corrupted the ring (the queue then stays broken). Every popped chain
// must be given back with Push (or Discard after Stop).
func (q *Queue) Pop() (*Chain, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if err := q.check(); err != nil {
		return nil, err
	}
	avail := q.availIdx()
	if avail == q.lastAvail {
		return nil, nil
	}
	if uint16(avail-q.lastAvail) > q.cfg.Size {
		return nil, q.fail(&RingError{Queue: q.cfg.Index, Reason: fmt.Sprintf("avail index %d is %d ahead of %d, beyond queue size %d", avail, uint16(avail-q.lastAvail), q.lastAvail, q.cfg.Size)})
	}
	slot := int(q.lastAvail % q.cfg.Size)
	head := binary.LittleEndian.Uint16(q.availRing[2*slot:])
	if head >= q.cfg.Size {
		return nil, q.fail(&ChainError{Queue: q.cfg.Index, Head: head, Reason: fmt.Sprintf("head index %d out of range", head)})
	}
	q.refreshTable()
	c := q.newChain()
	c.Head = head
	if err := q.walk(c); err != nil {
		q.recycle(c)
		return nil, q.fail(err)
	}
	c.tbl = q.tbl.Retain()
	c.q = q
	q.lastAvail++
	q.stats.Popped++
	return c, nil
}

// refreshTable keeps a retained snapshot of guest memory for translation.
// Snapshots are cheap but not free; take a new one each pop so that added
// regions are seen and removed ones are released as soon as possible.
func (q *Queue) refreshTable() {
	t := q.mem.Snapshot()
	if q.tbl != nil {
		q.tbl.Release()
	}
	q.tbl = t
}

type desc struct {
	addr  uint64
	len   uint32
	flags uint16
	next  uint16
}

func readDesc(table []byte, i uint32) desc {
	b := table[16*i : 16*i+16]
	return desc{
		addr:  binary.LittleEndian.Uint64(b[0:]),
		len:   binary.LittleEndian.Uint32(b[8:]),
		flags: binary.LittleEndian.Uint16(b[12:]),
		next:  binary.LittleEndian.Uint16(b[14:]),
	}
}

// walk follows the chain at c.Head (virtio 1.2 §2.7.5.3). Every descriptor is
// copied once; every bound is checked on the copy.
func (q *Queue) walk(c *Chain) error {
	bad := func(format string, args ...any) error {
		return &ChainError{Queue: q.cfg.Index, Head: c.Head, Reason: fmt.Sprintf(format, args...)}
	}
	table := q.desc
	tableLen := uint32(q.cfg.Size)
	ttl := tableLen // a chain visits each table entry at most once
	// A chain holds at most Queue Size buffer descriptors, counting those
	// in an indirect table (virtio 1.2 §2.7.5.3.1: a driver must not build
	// a longer one). The bound keeps what one chain costs the device (its
	// segment lists, its walk) proportional to the ring, not to 2^16.
	left := uint32(q.cfg.Size)
	i := uint32(c.Head)
	indirect, seenWrite := false, false
	var rlen, wlen uint64
	for {
		if ttl == 0 {
			return bad("chain longer than its table (%d entries): descriptor loop", tableLen)
		}
		ttl--
		d := readDesc(table, i)
		if d.flags&DescIndirect != 0 {
			switch {
			case !q.cfg.Indirect:
				return bad("indirect descriptor %d but INDIRECT_DESC not negotiated", i)
			case indirect:
				return bad("indirect descriptor inside an indirect table")
			case d.flags&DescNext != 0:
				return bad("descriptor %d has both INDIRECT and NEXT", i)
			case d.len == 0 || d.len%16 != 0:
				return bad("indirect table length %d is not a non-zero multiple of 16", d.len)
			case d.len/16 > left:
				return bad("indirect table of %d entries after %d descriptors exceeds the queue size %d", d.len/16, uint32(q.cfg.Size)-left, q.cfg.Size)
			}
			t, err := q.tbl.Slice(guestmem.GPA(d.addr), uint64(d.len))
			if err != nil {
				return bad("indirect table: %v", err)
			}
			table, tableLen, ttl, i, indirect = t, d.len/16, d.len/16, 0, true
			continue
		}
		// Unreachable while ttl ≤ left (the main table has Size entries and
		// an indirect table at most left), kept as the invariant's guard.
		if left == 0 {
			return bad("chain longer than the queue size %d", q.cfg.Size)
		}
		left--
		if d.flags&DescWrite == 0 && seenWrite {
			return bad("device-readable descriptor %d after a writable one", i)
		}
		if d.len > 0 {
			var err error
			if d.flags&DescWrite != 0 {
				wlen += uint64(d.len)
				if wlen > maxChainBytes {
					return bad("writable bytes exceed 2^32")
				}
				c.writable, err = q.tbl.AppendSlices(c.writable, guestmem.GPA(d.addr), uint64(d.len))
			} else {
				rlen += uint64(d.len)
				if rlen > maxChainBytes {
					return bad("readable bytes exceed 2^32")
				}
				c.readable, err = q.tbl.AppendSlices(c.readable, guestmem.GPA(d.addr), uint64(d.len))
			}
			if err != nil {
				return bad("descriptor %d: %v", i, err)
			}
		}
		seenWrite = seenWrite || d.flags&DescWrite != 0
		if d.flags&DescNext == 0 {
			break
		}
		i = uint32(d.next)
		if i >= tableLen {
			return bad("next index %d out of range (table of %d)", i, tableLen)
		}
	}
	c.rlen, c.wlen = int(rlen), int(wlen)
	return nil
}

// Push gives a chain back to the driver with the number of bytes written
// into its writable part. The used entry becomes visible at the next Flush.
// After Stop, Push only releases the chain and returns ErrStopped.
func (q *Queue) Push(c *Chain, written int) error {
	if c == nil || c.q != q {
		return fmt.Errorf("virtq: push of a chain that does not belong to queue %d", q.cfg.Index)
	}
	if written < 0 || written > c.wlen {
		written = c.wlen // never overstate; never underflow
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	err := q.check()
	if err == nil {
		slot := int((q.usedIdx + q.pending) % q.cfg.Size)
		e := q.usedRing[8*slot : 8*slot+8]
		binary.LittleEndian.PutUint32(e[0:], uint32(c.Head))
		binary.LittleEndian.PutUint32(e[4:], uint32(written))
		q.pending++
		if q.pending == q.cfg.Size {
			// The used ring is full of unpublished entries: publish now,
			// and remember whether the driver wanted an interrupt so the
			// next Flush delivers it.
			q.notifyDue = q.publish() || q.notifyDue
		}
	}
	q.recycle(c)
	return err
}

// Discard releases a chain without giving it back (only after Stop, or when
// the queue is broken: the ring is being reset anyway).
func (q *Queue) Discard(c *Chain) {
	if c == nil || c.q != q {
		return
	}
	q.mu.Lock()
	q.recycle(c)
	q.mu.Unlock()
}

// Flush publishes pushed used entries and interrupts the driver if it asked
// to be (EVENT_IDX or the NO_INTERRUPT flag).
func (q *Queue) Flush() error {
	q.mu.Lock()
	if err := q.check(); err != nil {
		q.mu.Unlock()
		return err
	}
	notify := q.publish() || q.notifyDue
	q.notifyDue = false
	call := q.call.Load()
	if notify && call != nil {
		q.stats.Interrupts++
	}
	q.mu.Unlock()
	if notify && call != nil {
		signal(call)
	}
	return nil
}

// publish stores used.idx and decides whether to interrupt (virtio 1.2
// §2.7.10 and §2.7.7.2). Caller holds q.mu.
func (q *Queue) publish() bool {
	if q.pending == 0 {
		return false
	}
	old := q.usedIdx
	q.usedIdx += q.pending
	q.stats.Pushed += uint64(q.pending)
	q.stats.Flushes++
	q.pending = 0
	atomic.StoreUint32(q.usedWord, uint32(q.usedFlags)|uint32(q.usedIdx)<<16) // release + full barrier
	if q.cfg.EventIdx {
		ev := *q.usedEvent
		return uint16(q.usedIdx-ev-1) < uint16(q.usedIdx-old)
	}
	return *q.availFlags&AvailNoInterrupt == 0
}

// signal writes 1 to an eventfd with one non-blocking attempt. A front-end
// may have saturated the counter: the write then fails with EAGAIN, and
// the driver is being woken anyway. It never waits (os.File.Write would
// park on the netpoller until the counter drained).
func signal(f *os.File) {
	var one [8]byte
	binary.LittleEndian.PutUint64(one[:], 1)
	rc, err := f.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Write(func(fd uintptr) bool {
		_, _ = unix.Write(int(fd), one[:])
		return true
	})
}

// DisableNotify asks the driver not to kick (used.flags NO_NOTIFY; with
// EVENT_IDX the driver kicks only when crossing avail_event, which is left
// where it is).
func (q *Queue) DisableNotify() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.check() != nil || q.cfg.EventIdx {
		return
	}
	q.usedFlags |= UsedNoNotify
	atomic.StoreUint32(q.usedWord, uint32(q.usedFlags)|uint32(q.usedIdx)<<16)
}

// EnableNotify re-arms kicks and reports whether chains arrived meanwhile;
// if so the caller must keep processing (or it could sleep forever).
func (q *Queue) EnableNotify() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.check() != nil {
		return false
	}
	if q.cfg.EventIdx {
		*q.availEvent = q.lastAvail
		q.fence()
	} else {
		q.usedFlags &^= UsedNoNotify
		atomic.StoreUint32(q.usedWord, uint32(q.usedFlags)|uint32(q.usedIdx)<<16)
	}
	return q.availIdx() != q.lastAvail
}

// Stop stops the ring (GET_VRING_BASE): pending used entries are published,
// nothing touches the ring afterwards, and the next avail index is returned.
// Stop is idempotent.
func (q *Queue) Stop() uint16 {
	q.mu.Lock()
	defer q.mu.Unlock()
	if !q.stopped && q.broken == nil {
		q.publish()
	}
	q.stopped = true
	return q.lastAvail
}

// LastAvail returns the next avail index the device will process.
func (q *Queue) LastAvail() uint16 {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.lastAvail
}

// Close stops the queue and releases its memory references. Chains still
// held keep their own reference until pushed or discarded.
func (q *Queue) Close() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.stopped = true
	if q.tbl != nil {
		q.tbl.Release()
		q.tbl = nil
	}
	if q.ring != nil {
		q.ring.Release()
		q.ring = nil
	}
	q.free = nil
}

func (q *Queue) newChain() *Chain {
	if n := len(q.free); n > 0 {
		c := q.free[n-1]
		q.free = q.free[:n-1]
		return c
	}
	return &Chain{}
}

// recycle returns c to the free list. Caller holds q.mu.
func (q *Queue) recycle(c *Chain) {
	if c.tbl != nil {
		c.tbl.Release()
	}
	clear(c.readable)
	clear(c.writable)
	*c = Chain{readable: c.readable[:0], writable: c.writable[:0]}
	if len(q.free) < 64 && !q.stopped {
		q.free = append(q.free, c)
	}
}
