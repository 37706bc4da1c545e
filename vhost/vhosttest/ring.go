package vhosttest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"os"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/vsdp/vsdp/vhost/guestmem"
	"golang.org/x/sys/unix"
)

// UVABase is where the fake front-end pretends guest RAM is mapped in its own
// address space. It is deliberately far from GPA 0 so that a back-end which
// confuses the two address spaces fails loudly.
const UVABase guestmem.UVA = 0x7f3a_0000_0000

// GuestMemory is guest RAM for tests: one memfd, mapped in this process,
// described to the back-end as one vhost-user region starting at GPA Base.
type GuestMemory struct {
	fd   int
	data []byte
	base guestmem.GPA
	uva  guestmem.UVA

	mu   sync.Mutex
	next uint64
}

// GuestMemoryOptions tune NewGuestMemoryOpts. The zero value is GPA 0 at
// UVABase.
type GuestMemoryOptions struct {
	Base guestmem.GPA
	UVA  guestmem.UVA
}

// NewGuestMemory creates size bytes of memfd-backed guest RAM at GPA 0.
func NewGuestMemory(size uint64) (*GuestMemory, error) {
	return NewGuestMemoryOpts(size, GuestMemoryOptions{})
}

// NewGuestMemoryOpts creates guest RAM with a chosen GPA and UVA base.
func NewGuestMemoryOpts(size uint64, o GuestMemoryOptions) (*GuestMemory, error) {
	if o.UVA == 0 {
		o.UVA = UVABase + guestmem.UVA(o.Base)
	}
	fd, err := unix.MemfdCreate("vhosttest-guest-ram", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("memfd_create: %w", err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("ftruncate: %w", err)
	}
	data, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("mmap: %w", err)
	}
	// Start allocations one page in, so GPA Base itself is never a valid
	// buffer and a zeroed descriptor points at unused memory.
	return &GuestMemory{fd: fd, data: data, base: o.Base, uva: o.UVA, next: 4096}, nil
}

// Fd returns the memfd (owned by the GuestMemory; send a dup or this one).
func (m *GuestMemory) Fd() int { return m.fd }

// Size returns the RAM size.
func (m *GuestMemory) Size() uint64 { return uint64(len(m.data)) }

// Spec describes the memory as one vhost-user region.
func (m *GuestMemory) Spec() guestmem.RegionSpec {
	return guestmem.RegionSpec{GPA: m.base, Size: uint64(len(m.data)), UVA: m.uva}
}

// UVA translates a GPA of this memory to the front-end address QEMU would
// send in SET_VRING_ADDR.
func (m *GuestMemory) UVA(a guestmem.GPA) guestmem.UVA { return m.uva + guestmem.UVA(a-m.base) }

// Alloc reserves size bytes aligned to align (a power of two) and zeroes
// them. It is a bump allocator: tests are short-lived.
func (m *GuestMemory) Alloc(size, align uint64) (guestmem.GPA, error) {
	if align == 0 || align&(align-1) != 0 {
		return 0, fmt.Errorf("vhosttest: bad alignment %d", align)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	off := (m.next + align - 1) &^ (align - 1)
	if off+size > uint64(len(m.data)) || off+size < off {
		return 0, fmt.Errorf("vhosttest: guest memory exhausted (%d bytes wanted, %d used of %d)", size, m.next, len(m.data))
	}
	m.next = off + size
	clear(m.data[off : off+size])
	return m.base + guestmem.GPA(off), nil
}

// Bytes returns [a, a+n) of guest memory. It panics outside the memory: it
// is for test code, which controls its addresses.
func (m *GuestMemory) Bytes(a guestmem.GPA, n uint64) []byte {
	off := uint64(a - m.base)
	return m.data[off : off+n : off+n]
}

// Close unmaps and closes the memfd.
func (m *GuestMemory) Close() {
	if m.data != nil {
		_ = unix.Munmap(m.data)
		m.data = nil
		unix.Close(m.fd)
	}
}

// NewEventFD returns a non-blocking eventfd as a file.
func NewEventFD() (*os.File, error) {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), "eventfd"), nil
}

// RingOptions choose the negotiated ring features and layout quirks.
type RingOptions struct {
	EventIdx bool
	Indirect bool
	// AvailOdd places the avail ring at an address that is 2 mod 4, which
	// the spec allows and which back-ends must handle.
	AvailOdd bool
}

// UsedElem is one completed chain as the driver sees it.
type UsedElem struct {
	Head uint16
	Len  uint32
	Data []byte // the chain's writable bytes, first Len of them (capped at their size)
}

type inflight struct {
	descs    []uint16 // descriptor indices in the main table
	writable [][]byte // device-writable buffers, in order
	bufs     []guestmem.GPA
	sizes    []uint64
}

// Ring is the driver (guest) side of one split virtqueue in GuestMemory.
// It is safe for concurrent use.
type Ring struct {
	mem  *GuestMemory
	n    uint16
	opts RingOptions

	desc, avail, used guestmem.GPA
	descB, availB     []byte
	usedB             []byte

	mu        sync.Mutex
	free      []uint16
	inflight  map[uint16]*inflight
	availIdx  uint16
	kickedAt  uint16 // avail index at the last NeedKick==true
	lastUsed  uint16
	bufFree   map[uint64][]guestmem.GPA // size class -> free buffers
	availWord *uint32
	availHigh bool
	usedWord  *uint32
	fence     atomic.Uint64
}

// NewRing lays out a ring of n entries in mem.
func NewRing(mem *GuestMemory, n uint16, opts RingOptions) (*Ring, error) {
	if n == 0 || n&(n-1) != 0 || n > 32768 {
		return nil, fmt.Errorf("vhosttest: ring size %d", n)
	}
	r := &Ring{mem: mem, n: n, opts: opts, inflight: map[uint16]*inflight{}, bufFree: map[uint64][]guestmem.GPA{}}
	var err error
	if r.desc, err = mem.Alloc(16*uint64(n), 16); err != nil {
		return nil, err
	}
	asz := 6 + 2*uint64(n)
	if opts.AvailOdd {
		a, err := mem.Alloc(asz+2, 4)
		if err != nil {
			return nil, err
		}
		r.avail = a + 2
	} else if r.avail, err = mem.Alloc(asz, 4); err != nil {
		return nil, err
	}
	if r.used, err = mem.Alloc(6+8*uint64(n), 4); err != nil {
		return nil, err
	}
	r.descB = mem.Bytes(r.desc, 16*uint64(n))
	r.availB = mem.Bytes(r.avail, asz)
	r.usedB = mem.Bytes(r.used, 6+8*uint64(n))
	if uintptr(unsafe.Pointer(&r.availB[0]))%4 == 0 {
		r.availWord, r.availHigh = (*uint32)(unsafe.Pointer(&r.availB[0])), true
	} else {
		r.availWord = (*uint32)(unsafe.Pointer(&r.availB[2]))
	}
	r.usedWord = (*uint32)(unsafe.Pointer(&r.usedB[0]))
	for i := int(n) - 1; i >= 0; i-- {
		r.free = append(r.free, uint16(i))
	}
	return r, nil
}

// Size returns the number of entries.
func (r *Ring) Size() uint16 { return r.n }

// Addrs returns the ring areas as guest-physical addresses.
func (r *Ring) Addrs() (desc, avail, used guestmem.GPA) { return r.desc, r.avail, r.used }

// UVAs returns the ring areas as the front-end addresses for SET_VRING_ADDR.
func (r *Ring) UVAs() (desc, avail, used guestmem.UVA) {
	return r.mem.UVA(r.desc), r.mem.UVA(r.avail), r.mem.UVA(r.used)
}

// Options returns the ring's options.
func (r *Ring) Options() RingOptions { return r.opts }

// FreeDescs returns the number of free descriptors in the main table.
func (r *Ring) FreeDescs() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.free)
}

// Outstanding returns the number of chains made available and not yet used.
func (r *Ring) Outstanding() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.inflight)
}

// ErrRingFull: not enough free descriptors.
var ErrRingFull = errors.New("vhosttest: ring full")

// ErrChainTooLong: a chain of more buffers than the ring has entries, which
// a driver must not build even through an indirect table (virtio 1.2
// §2.7.5.3.1). Hostile tests build one with AddRawIndirect.
var ErrChainTooLong = errors.New("vhosttest: chain longer than the ring")

func sizeClass(n uint64) uint64 {
	if n <= 64 {
		return 64
	}
	return 1 << bits.Len64(n-1)
}

func (r *Ring) allocBuf(n uint64) (guestmem.GPA, uint64, error) {
	c := sizeClass(n)
	if l := r.bufFree[c]; len(l) > 0 {
		a := l[len(l)-1]
		r.bufFree[c] = l[:len(l)-1]
		return a, c, nil
	}
	a, err := r.mem.Alloc(c, 64)
	return a, c, err
}

// putDesc writes descriptor i of table t.
func putDesc(t []byte, i int, addr guestmem.GPA, n uint32, flags, next uint16) {
	b := t[16*i : 16*i+16]
	binary.LittleEndian.PutUint64(b[0:], uint64(addr))
	binary.LittleEndian.PutUint32(b[8:], n)
	binary.LittleEndian.PutUint16(b[12:], flags)
	binary.LittleEndian.PutUint16(b[14:], next)
}

// Add makes a chain available: one device-readable descriptor per element of
// out (holding its bytes) followed by one device-writable descriptor per
// element of inSizes. It returns the head index.
func (r *Ring) Add(out [][]byte, inSizes []int) (uint16, error) {
	return r.add(out, inSizes, false)
}

// AddIndirect is Add with the descriptors in an indirect table referenced by
// a single main-table descriptor.
func (r *Ring) AddIndirect(out [][]byte, inSizes []int) (uint16, error) {
	return r.add(out, inSizes, true)
}

func (r *Ring) add(out [][]byte, inSizes []int, indirect bool) (uint16, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	total := len(out) + len(inSizes)
	if total == 0 {
		return 0, fmt.Errorf("vhosttest: empty chain")
	}
	if total > int(r.n) {
		return 0, fmt.Errorf("%w: %d buffers, ring of %d", ErrChainTooLong, total, r.n)
	}
	need := total
	if indirect {
		need = 1
	}
	if len(r.free) < need {
		return 0, ErrRingFull
	}
	inf := &inflight{}
	type seg struct {
		addr  guestmem.GPA
		n     uint32
		write bool
	}
	segs := make([]seg, 0, total)
	for _, b := range out {
		a, c, err := r.allocBuf(uint64(len(b)))
		if err != nil {
			r.freeBufs(inf)
			return 0, err
		}
		inf.bufs, inf.sizes = append(inf.bufs, a), append(inf.sizes, c)
		copy(r.mem.Bytes(a, uint64(len(b))), b)
		segs = append(segs, seg{a, uint32(len(b)), false})
	}
	for _, n := range inSizes {
		a, c, err := r.allocBuf(uint64(n))
		if err != nil {
			r.freeBufs(inf)
			return 0, err
		}
		inf.bufs, inf.sizes = append(inf.bufs, a), append(inf.sizes, c)
		inf.writable = append(inf.writable, r.mem.Bytes(a, uint64(n)))
		segs = append(segs, seg{a, uint32(n), true})
	}
	flagsOf := func(i int, s seg) (f uint16) {
		if s.write {
			f |= 2
		}
		if i < len(segs)-1 {
			f |= 1
		}
		return f
	}
	var head uint16
	if indirect {
		ta, c, err := r.allocBuf(16 * uint64(total))
		if err != nil {
			r.freeBufs(inf)
			return 0, err
		}
		inf.bufs, inf.sizes = append(inf.bufs, ta), append(inf.sizes, c)
		t := r.mem.Bytes(ta, 16*uint64(total))
		for i, s := range segs {
			putDesc(t, i, s.addr, s.n, flagsOf(i, s), uint16(i+1))
		}
		head = r.pop()
		putDesc(r.descB, int(head), ta, uint32(16*total), 4, 0)
		inf.descs = []uint16{head}
	} else {
		idx := make([]uint16, total)
		for i := range idx {
			idx[i] = r.pop()
		}
		for i, s := range segs {
			next := uint16(0)
			if i < total-1 {
				next = idx[i+1]
			}
			putDesc(r.descB, int(idx[i]), s.addr, s.n, flagsOf(i, s), next)
		}
		head = idx[0]
		inf.descs = idx
	}
	r.inflight[head] = inf
	r.publish(head)
	return head, nil
}

func (r *Ring) pop() uint16 {
	i := r.free[len(r.free)-1]
	r.free = r.free[:len(r.free)-1]
	return i
}

func (r *Ring) freeBufs(inf *inflight) {
	for i, a := range inf.bufs {
		r.bufFree[inf.sizes[i]] = append(r.bufFree[inf.sizes[i]], a)
	}
}

// publish writes head into the next avail slot and releases the new index.
func (r *Ring) publish(heads ...uint16) {
	for _, h := range heads {
		slot := int(r.availIdx % r.n)
		binary.LittleEndian.PutUint16(r.availB[4+2*slot:], h)
		r.availIdx++
	}
	r.storeAvailIdx(r.availIdx)
}

func (r *Ring) storeAvailIdx(v uint16) {
	w := atomic.LoadUint32(r.availWord)
	if r.availHigh {
		w = w&0xffff | uint32(v)<<16
	} else {
		w = w&^0xffff | uint32(v)
	}
	atomic.StoreUint32(r.availWord, w)
}

// NeedKick reports whether the device asked to be notified of the chains
// made available since the last kick (EVENT_IDX avail_event, or the used
// ring's NO_NOTIFY flag), and records the kick.
func (r *Ring) NeedKick() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	old := r.kickedAt
	nw := r.availIdx
	if old == nw {
		return false
	}
	r.kickedAt = nw
	if r.opts.EventIdx {
		ev := binary.LittleEndian.Uint16(r.usedB[4+8*int(r.n):])
		return uint16(nw-ev-1) < uint16(nw-old)
	}
	return atomic.LoadUint32(r.usedWord)&1 == 0
}

// SetUsedEvent writes the avail ring's used_event (EVENT_IDX): the device
// interrupts once it publishes the used entry with that index.
func (r *Ring) SetUsedEvent(v uint16) {
	binary.LittleEndian.PutUint16(r.availB[4+2*int(r.n):], v)
}

// SetNoInterrupt sets or clears VIRTQ_AVAIL_F_NO_INTERRUPT.
func (r *Ring) SetNoInterrupt(on bool) {
	f := uint16(0)
	if on {
		f = 1
	}
	binary.LittleEndian.PutUint16(r.availB[0:], f)
}

// UsedIdx returns the device's published used index.
func (r *Ring) UsedIdx() uint16 { return uint16(atomic.LoadUint32(r.usedWord) >> 16) }

// Used takes the next used element, if any, and frees its descriptors and
// buffers. Data is a fresh copy of the written bytes.
func (r *Ring) Used() (UsedElem, bool, error) { return r.take(nil) }

// UsedAppend is Used with the written bytes appended to buf[:0] (Data
// aliases buf when it is large enough): a driver that drains many small
// buffers reuses one scratch buffer instead of allocating per element.
func (r *Ring) UsedAppend(buf []byte) (UsedElem, bool, error) { return r.take(buf[:0]) }

func (r *Ring) take(data []byte) (UsedElem, bool, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.UsedIdx() == r.lastUsed {
		return UsedElem{}, false, nil
	}
	slot := int(r.lastUsed % r.n)
	e := r.usedB[4+8*slot:]
	id := binary.LittleEndian.Uint32(e[0:])
	n := binary.LittleEndian.Uint32(e[4:])
	r.lastUsed++
	if r.opts.EventIdx {
		// Ask for an interrupt at the very next used entry, then a full
		// barrier before the next read of used.idx (virtio 1.2 §2.7.10:
		// otherwise a publication racing this store is never signalled).
		binary.LittleEndian.PutUint16(r.availB[4+2*int(r.n):], r.lastUsed)
		r.fence.Add(1)
	}
	inf, ok := r.inflight[uint16(id)]
	if id >= uint32(r.n) || !ok {
		return UsedElem{}, false, fmt.Errorf("vhosttest: device used unknown head %d", id)
	}
	delete(r.inflight, uint16(id))
	left := int(n)
	for _, w := range inf.writable {
		k := min(left, len(w))
		data = append(data, w[:k]...)
		left -= k
	}
	if left > 0 {
		return UsedElem{}, false, fmt.Errorf("vhosttest: device claimed %d bytes written to head %d, more than its %d writable", n, id, int(n)-left)
	}
	for _, d := range inf.descs {
		r.free = append(r.free, d)
	}
	r.freeBufs(inf)
	return UsedElem{Head: uint16(id), Len: n, Data: data}, true, nil
}

// LastUsed returns the used index the driver will consume next.
func (r *Ring) LastUsed() uint16 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.lastUsed
}

// --- Raw access for hostile rings ---

// RawDesc is one descriptor as written into a table.
type RawDesc struct {
	Addr  guestmem.GPA
	Len   uint32
	Flags uint16
	Next  uint16
}

// SetDesc overwrites main-table descriptor i (taking it off the free list
// is the caller's business: hostile tests own the whole ring).
func (r *Ring) SetDesc(i uint16, d RawDesc) {
	putDesc(r.descB, int(i), d.Addr, d.Len, d.Flags, d.Next)
}

// WriteTable allocates an indirect table holding ds and returns its GPA.
func (r *Ring) WriteTable(ds []RawDesc) (guestmem.GPA, error) {
	a, err := r.mem.Alloc(16*uint64(max(len(ds), 1)), 16)
	if err != nil {
		return 0, err
	}
	t := r.mem.Bytes(a, 16*uint64(max(len(ds), 1)))
	for i, d := range ds {
		putDesc(t, i, d.Addr, d.Len, d.Flags, d.Next)
	}
	return a, nil
}

// AddRawIndirect makes table, verbatim, the indirect table of a free head
// and publishes it: a hostile chain (too long, looping, pointing anywhere)
// that still owns its head. The head stays in flight until the device uses
// it — a device that rejects the chain never does — so Add never hands it
// out again meanwhile. Nothing of it is device-writable as far as Used is
// concerned: a device that claims to have written into it is reported.
func (r *Ring) AddRawIndirect(table []RawDesc) (uint16, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.free) == 0 {
		return 0, ErrRingFull
	}
	ta, c, err := r.allocBuf(16 * uint64(max(len(table), 1)))
	if err != nil {
		return 0, err
	}
	t := r.mem.Bytes(ta, 16*uint64(max(len(table), 1)))
	for i, d := range table {
		putDesc(t, i, d.Addr, d.Len, d.Flags, d.Next)
	}
	head := r.pop()
	putDesc(r.descB, int(head), ta, uint32(16*len(table)), 4, 0)
	r.inflight[head] = &inflight{descs: []uint16{head}, bufs: []guestmem.GPA{ta}, sizes: []uint64{c}}
	r.publish(head)
	return head, nil
}

// PutAvail writes heads into the avail ring verbatim and publishes them.
func (r *Ring) PutAvail(heads ...uint16) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.publish(heads...)
}

// SetAvailIdx stores any avail index, however absurd.
func (r *Ring) SetAvailIdx(v uint16) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.availIdx = v
	r.storeAvailIdx(v)
}

// AvailIdx returns the driver's avail index.
func (r *Ring) AvailIdx() uint16 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.availIdx
}
