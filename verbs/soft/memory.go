package soft

import (
	"fmt"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/vsdp/vsdp/verbs"
)

// Keys: the upper 24 bits of an lkey/rkey index the device's key table, the
// low 8 bits are a tag (for windows, the consumer's; for regions, a counter).
// A lookup succeeds only for the object's current full key, so a stale key
// (an invalidated window, a closed region) finds nothing.
const maxKeyIndex = 1<<24 - 1

// keyTable maps key indexes to regions and windows. Its lock also guards the
// bind state of every window and the window count of every region.
type keyTable struct {
	mu   sync.RWMutex
	objs map[uint32]any // *mr or *mw, by index
	next uint32
	tag  uint8
}

// alloc reserves a fresh index for obj; the caller holds mu.
func (t *keyTable) alloc(obj any, limit int) (uint32, error) {
	if len(t.objs) >= limit {
		return 0, fmt.Errorf("%w: key table full (%d)", verbs.ErrQueueFull, limit)
	}
	for {
		t.next++
		if t.next > maxKeyIndex {
			t.next = 1
		}
		if _, used := t.objs[t.next]; !used {
			t.objs[t.next] = obj
			return t.next, nil
		}
	}
}

// pd is a protection domain.
type pd struct {
	dev    *Device
	mrs    int // children, guarded by dev.mu
	mws    int
	qps    int
	closed bool
}

func (p *pd) RegMR(buf []byte, access verbs.Access) (verbs.MR, error) {
	if err := access.ValidateMR(); err != nil {
		return nil, err
	}
	if len(buf) == 0 {
		return nil, fmt.Errorf("%w: empty memory region", verbs.ErrInvalid)
	}
	d := p.dev
	m := &mr{
		dev:    d,
		pd:     p,
		mem:    buf,
		base:   uint64(uintptr(unsafe.Pointer(unsafe.SliceData(buf)))),
		access: access,
	}
	m.cond.L = &m.mu
	if m.base+uint64(len(buf)) < m.base {
		return nil, fmt.Errorf("%w: region wraps the address space", verbs.ErrInvalid)
	}
	d.keys.mu.Lock()
	defer d.keys.mu.Unlock()
	d.mu.Lock()
	defer d.mu.Unlock()
	if p.closed || d.closed {
		return nil, verbs.ErrClosed
	}
	idx, err := d.keys.alloc(m, d.attr.MaxMR+d.attr.MaxMW)
	if err != nil {
		return nil, err
	}
	d.keys.tag++
	m.key = idx<<8 | uint32(d.keys.tag)
	p.mrs++
	d.res.MRs++
	return m, nil
}

func (p *pd) AllocMW() (verbs.MW, error) {
	d := p.dev
	w := &mw{dev: d, pd: p}
	d.keys.mu.Lock()
	defer d.keys.mu.Unlock()
	d.mu.Lock()
	defer d.mu.Unlock()
	if p.closed || d.closed {
		return nil, verbs.ErrClosed
	}
	if d.res.MWs >= d.attr.MaxMW {
		return nil, fmt.Errorf("%w: %d memory windows", verbs.ErrQueueFull, d.res.MWs)
	}
	idx, err := d.keys.alloc(w, d.attr.MaxMR+d.attr.MaxMW)
	if err != nil {
		return nil, err
	}
	w.key = idx << 8
	p.mws++
	d.res.MWs++
	return w, nil
}

func (p *pd) Close() error {
	d := p.dev
	d.mu.Lock()
	defer d.mu.Unlock()
	if p.closed {
		return nil
	}
	if p.mrs+p.mws+p.qps > 0 {
		return &verbs.BusyError{Object: "pd", Children: fmt.Sprintf("%d MRs, %d MWs, %d QPs", p.mrs, p.mws, p.qps)}
	}
	p.closed = true
	d.res.PDs--
	return nil
}

// mr is a registered memory region. Every access to its memory goes through
// acquire/release, so Close can wait for copies in progress and then promise
// that the memory is no longer touched. acquire never blocks (it fails once
// Close has begun), so holding two regions at once cannot deadlock.
type mr struct {
	dev    *Device
	pd     *pd
	mem    []byte
	base   uint64
	access verbs.Access
	key    uint32

	mu     sync.Mutex
	cond   sync.Cond
	active int
	dead   bool

	windows int  // bound windows, guarded by dev.keys.mu
	closed  bool // guarded by dev.keys.mu

	nread, nwritten atomic.Uint64
}

func (m *mr) LKey() uint32         { return m.key }
func (m *mr) RKey() uint32         { return m.key }
func (m *mr) Addr() uint64         { return m.base }
func (m *mr) Len() int             { return len(m.mem) }
func (m *mr) Access() verbs.Access { return m.access }
func (m *mr) Bytes() []byte        { return m.mem }

func (m *mr) acquire() bool {
	m.mu.Lock()
	ok := !m.dead
	if ok {
		m.active++
	}
	m.mu.Unlock()
	return ok
}

func (m *mr) release() {
	m.mu.Lock()
	m.active--
	if m.active == 0 && m.dead {
		m.cond.Broadcast()
	}
	m.mu.Unlock()
}

// span returns the offset of [addr, addr+n) in m, overflow-safe.
func (m *mr) span(addr, n uint64) (uint64, bool) {
	if addr < m.base {
		return 0, false
	}
	off := addr - m.base
	size := uint64(len(m.mem))
	if off > size || n > size-off {
		return 0, false
	}
	return off, true
}

func (m *mr) Close() error {
	d := m.dev
	d.keys.mu.Lock()
	if m.closed {
		d.keys.mu.Unlock()
		return nil
	}
	if m.windows > 0 {
		n := m.windows
		d.keys.mu.Unlock()
		return &verbs.BusyError{Object: "mr", Children: fmt.Sprintf("%d bound memory windows", n)}
	}
	m.closed = true
	delete(d.keys.objs, m.key>>8)
	d.keys.mu.Unlock()

	m.mu.Lock()
	m.dead = true
	for m.active > 0 {
		m.cond.Wait()
	}
	m.mu.Unlock()

	d.mu.Lock()
	m.pd.mrs--
	d.res.MRs--
	d.mu.Unlock()
	return nil
}

// RegionCounts are the bytes the provider moved through one memory region.
type RegionCounts struct {
	Read    uint64 // bytes read from the region (gathered, or served to RDMA READ)
	Written uint64 // bytes written into it (scattered receives, RDMA WRITE targets, READ results)
}

// RegionStats returns the bytes moved through a soft memory region.
func RegionStats(m verbs.MR) (RegionCounts, error) {
	r, ok := m.(*mr)
	if !ok {
		return RegionCounts{}, fmt.Errorf("%w: %T is not a soft memory region", verbs.ErrInvalid, m)
	}
	return RegionCounts{Read: r.nread.Load(), Written: r.nwritten.Load()}, nil
}

// mw is a type-2 memory window. All fields after pd are guarded by
// dev.keys.mu.
type mw struct {
	dev    *Device
	pd     *pd
	key    uint32
	bound  bool
	qp     *qp
	m      *mr
	addr   uint64
	length uint64
	access verbs.Access
	closed bool
}

func (w *mw) RKey() uint32 {
	w.dev.keys.mu.RLock()
	defer w.dev.keys.mu.RUnlock()
	return w.key
}

func (w *mw) Bound() bool {
	w.dev.keys.mu.RLock()
	defer w.dev.keys.mu.RUnlock()
	return w.bound
}

// unbind invalidates the window; the caller holds dev.keys.mu.
func (w *mw) unbind() {
	if !w.bound {
		return
	}
	w.bound = false
	w.m.windows--
	w.m, w.qp = nil, nil
}

func (w *mw) Close() error {
	d := w.dev
	d.keys.mu.Lock()
	if w.closed {
		d.keys.mu.Unlock()
		return nil
	}
	w.closed = true
	w.unbind()
	delete(d.keys.objs, w.key>>8)
	d.keys.mu.Unlock()
	d.mu.Lock()
	w.pd.mws--
	d.res.MWs--
	d.mu.Unlock()
	return nil
}

// segment is a resolved, bounds-checked piece of a region.
type segment struct {
	m   *mr
	off uint64
	n   uint64
}

// localSeg resolves an SGE against the queue pair's PD: the lkey must name a
// live region of this PD that contains the range, with local write if the
// provider will write into it (IBA 10.6.3.1). Failure is a local protection
// error.
func (d *Device) localSeg(p *pd, s verbs.SGE, write bool) (segment, bool) {
	d.keys.mu.RLock()
	defer d.keys.mu.RUnlock()
	m, ok := d.keys.objs[s.LKey>>8].(*mr)
	if !ok || m.key != s.LKey || m.pd != p || m.closed {
		return segment{}, false
	}
	if write && m.access&verbs.AccessLocalWrite == 0 {
		return segment{}, false
	}
	off, ok := m.span(s.Addr, uint64(s.Length))
	if !ok {
		return segment{}, false
	}
	return segment{m: m, off: off, n: uint64(s.Length)}, true
}

// remoteSeg resolves a peer's rkey for an RDMA access arriving on q: a region
// of q's PD with the right, or a window bound through q itself (type 2) with
// the right, and the range inside it (IBA 10.6.7.2, 9.7.4.1.6).
func (d *Device) remoteSeg(q *qp, rkey uint32, addr, n uint64, want verbs.Access) (segment, bool) {
	d.keys.mu.RLock()
	defer d.keys.mu.RUnlock()
	switch o := d.keys.objs[rkey>>8].(type) {
	case *mr:
		if o.key != rkey || o.pd != q.pd || o.closed || o.access&want != want {
			return segment{}, false
		}
		off, ok := o.span(addr, n)
		return segment{m: o, off: off, n: n}, ok
	case *mw:
		if o.key != rkey || !o.bound || o.qp != q || o.pd != q.pd || o.access&want != want {
			return segment{}, false
		}
		if addr < o.addr || addr-o.addr > o.length || n > o.length-(addr-o.addr) {
			return segment{}, false
		}
		off, ok := o.m.span(addr, n)
		return segment{m: o.m, off: off, n: n}, ok
	}
	return segment{}, false
}

// bindMW carries out a type-2 bind posted on q (IBA 10.6.7.2.2). It returns
// false for a bind the spec refuses: a window of another PD or provider, a
// window already bound, a key whose index is not the window's, a region
// without MW_BIND or outside it.
func (d *Device) bindMW(q *qp, b *verbs.Bind) bool {
	w, ok := b.MW.(*mw)
	if !ok {
		return false
	}
	m, ok := b.MR.(*mr)
	if !ok {
		return false
	}
	if err := b.Access.ValidateMW(m.access); err != nil {
		return false
	}
	d.keys.mu.Lock()
	defer d.keys.mu.Unlock()
	if w.closed || w.bound || w.pd != q.pd || m.closed || m.pd != q.pd || b.RKey>>8 != w.key>>8 {
		return false
	}
	if _, ok := m.span(b.Addr, b.Length); !ok {
		return false
	}
	w.key = b.RKey
	w.bound = true
	w.qp = q
	w.m = m
	w.addr, w.length, w.access = b.Addr, b.Length, b.Access
	m.windows++
	return true
}

// invalidate invalidates the window named by rkey on behalf of q: by a local
// invalidate (any window of q's PD) or a peer's SEND with invalidate
// (remote: only a window bound through q).
func (d *Device) invalidate(q *qp, rkey uint32, remote bool) bool {
	d.keys.mu.Lock()
	defer d.keys.mu.Unlock()
	w, ok := d.keys.objs[rkey>>8].(*mw)
	if !ok || w.key != rkey || !w.bound || w.pd != q.pd || (remote && w.qp != q) {
		return false
	}
	w.unbind()
	return true
}

// unbindQP invalidates every window bound through q (q is being destroyed).
func (d *Device) unbindQP(q *qp) {
	d.keys.mu.Lock()
	defer d.keys.mu.Unlock()
	for _, o := range d.keys.objs {
		if w, ok := o.(*mw); ok && w.qp == q {
			w.unbind()
		}
	}
}
