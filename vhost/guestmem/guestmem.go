package guestmem

import (
	"errors"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// GPA is a guest-physical address: what descriptor addr fields hold.
type GPA uint64

// UVA is a front-end (QEMU) user virtual address: what SET_VRING_ADDR and a
// region's userspace_addr hold. It is a different address space from GPA and
// the two never mix: the type system keeps them apart.
type UVA uint64

// RegionSpec describes one memory region as the front-end sends it
// (VhostUserMemoryRegion: guest_phys_addr, memory_size, userspace_addr,
// mmap_offset).
type RegionSpec struct {
	GPA        GPA
	Size       uint64
	UVA        UVA
	MmapOffset uint64
}

func (s RegionSpec) String() string {
	return fmt.Sprintf("gpa=%#x size=%#x uva=%#x off=%#x", uint64(s.GPA), s.Size, uint64(s.UVA), s.MmapOffset)
}

// DefaultMaxSlots is the slot count reported for GET_MAX_MEM_SLOTS when the
// caller does not choose one (QEMU's own limit for vhost-user is 509 on x86).
const DefaultMaxSlots = 509

// MaxRegionSize bounds one region (1 TiB): larger sizes are treated as hostile.
const MaxRegionSize = 1 << 40

// Sentinel errors.
var (
	// ErrOutOfBounds: an address range is not (entirely) inside mapped
	// memory, or its end overflows.
	ErrOutOfBounds = errors.New("guestmem: address range not mapped")
	// ErrBadRegion: a region spec is invalid (zero or huge size, overflow,
	// overlap with another region in GPA or UVA space, too many slots,
	// unknown on removal).
	ErrBadRegion = errors.New("guestmem: invalid region")
	// ErrClosed: the memory was closed.
	ErrClosed = errors.New("guestmem: closed")
)

// AccessError reports an address range that failed translation.
type AccessError struct {
	Space string // "gpa" or "uva"
	Addr  uint64
	Len   uint64
}

func (e *AccessError) Error() string {
	return fmt.Sprintf("guestmem: %s range [%#x, +%#x) not mapped", e.Space, e.Addr, e.Len)
}

func (e *AccessError) Unwrap() error { return ErrOutOfBounds }

// Region is one mapped region. It is reference counted: the mapping stays
// valid while any Table that holds it is retained, and is unmapped when the
// last reference goes.
type Region struct {
	spec RegionSpec
	mmap []byte // whole mapping, starting at file offset 0
	data []byte // the region's bytes: mmap[MmapOffset : MmapOffset+Size]
	refs atomic.Int64
}

// Spec returns the region as the front-end described it.
func (r *Region) Spec() RegionSpec { return r.spec }

// Bytes returns the region's memory, indexed from its GPA. The slice is valid
// only while a Table holding the region is retained.
func (r *Region) Bytes() []byte { return r.data }

func (r *Region) retain() { r.refs.Add(1) }

func (r *Region) release() {
	if n := r.refs.Add(-1); n == 0 {
		_ = unix.Munmap(r.mmap)
		r.mmap, r.data = nil, nil
	} else if n < 0 {
		panic("guestmem: region released too often")
	}
}

// mapRegion validates spec and maps fd MAP_SHARED read-write. The fd is not
// closed: the caller owns it (the mapping survives its close).
func mapRegion(fd int, spec RegionSpec) (*Region, error) {
	if err := validSpec(spec); err != nil {
		return nil, err
	}
	length := spec.MmapOffset + spec.Size
	if length < spec.Size || length > MaxRegionSize*2 {
		return nil, fmt.Errorf("%w: mmap offset %#x overflows", ErrBadRegion, spec.MmapOffset)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("%w: fstat: %v", ErrBadRegion, err)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFREG || st.Mode&unix.S_IFMT == 0 {
		// memfd and shm files are regular: refuse a mapping past their end,
		// which would SIGBUS on first touch.
		if st.Size >= 0 && uint64(st.Size) < length {
			return nil, fmt.Errorf("%w: file of %d bytes shorter than offset+size %#x", ErrBadRegion, st.Size, length)
		}
	}
	// Map from offset 0 so that huge-page backed files keep their alignment;
	// the region starts MmapOffset bytes in.
	m, err := unix.Mmap(fd, 0, int(length), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("%w: mmap %s: %v", ErrBadRegion, spec, err)
	}
	r := &Region{spec: spec, mmap: m, data: m[spec.MmapOffset:length:length]}
	r.refs.Store(1)
	return r, nil
}

func validSpec(s RegionSpec) error {
	switch {
	case s.Size == 0:
		return fmt.Errorf("%w: zero size", ErrBadRegion)
	case s.Size > MaxRegionSize:
		return fmt.Errorf("%w: size %#x too large", ErrBadRegion, s.Size)
	case uint64(s.GPA)+s.Size < uint64(s.GPA):
		return fmt.Errorf("%w: gpa range overflows (%s)", ErrBadRegion, s)
	case uint64(s.UVA)+s.Size < uint64(s.UVA):
		return fmt.Errorf("%w: uva range overflows (%s)", ErrBadRegion, s)
	}
	return nil
}

func overlaps(a0, an, b0, bn uint64) bool { return a0 < b0+bn && b0 < a0+an }

// Table is an immutable view of the mapped regions at one moment. Translation
// goes through a Table; slices it returns stay valid while it is retained.
type Table struct {
	byGPA []*Region // sorted by GPA
	byUVA []*Region // sorted by UVA
	refs  atomic.Int64
}

var emptyTable = func() *Table { t := &Table{}; t.refs.Store(1 << 62); return t }()

// Retain adds a reference and returns t.
func (t *Table) Retain() *Table {
	if t != emptyTable {
		t.refs.Add(1)
	}
	return t
}

// Release drops a reference; the last one releases the table's regions.
func (t *Table) Release() {
	if t == emptyTable {
		return
	}
	if n := t.refs.Add(-1); n == 0 {
		for _, r := range t.byGPA {
			r.release()
		}
	} else if n < 0 {
		panic("guestmem: table released too often")
	}
}

// Len returns the number of regions.
func (t *Table) Len() int { return len(t.byGPA) }

// Regions returns the specs of the regions, sorted by GPA.
func (t *Table) Regions() []RegionSpec {
	out := make([]RegionSpec, len(t.byGPA))
	for i, r := range t.byGPA {
		out[i] = r.spec
	}
	return out
}

// RegionOf returns the region whose mapping holds b's first byte, or nil.
// It lets a caller that has only a slice (a descriptor's buffer) find the
// region to register with an RDMA device.
func (t *Table) RegionOf(b []byte) *Region {
	if len(b) == 0 {
		return nil
	}
	p := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	for _, r := range t.byGPA {
		base := uintptr(unsafe.Pointer(unsafe.SliceData(r.data)))
		if p >= base && p-base < uintptr(len(r.data)) {
			return r
		}
	}
	return nil
}

// Region returns the region containing GPA a, or nil.
func (t *Table) Region(a GPA) *Region {
	r, _ := t.findGPA(uint64(a))
	return r
}

func (t *Table) findGPA(a uint64) (*Region, uint64) {
	rs := t.byGPA
	i := sort.Search(len(rs), func(i int) bool { return uint64(rs[i].spec.GPA)+rs[i].spec.Size > a })
	if i < len(rs) && uint64(rs[i].spec.GPA) <= a {
		return rs[i], a - uint64(rs[i].spec.GPA)
	}
	return nil, 0
}

func (t *Table) findUVA(a uint64) (*Region, uint64) {
	rs := t.byUVA
	i := sort.Search(len(rs), func(i int) bool { return uint64(rs[i].spec.UVA)+rs[i].spec.Size > a })
	if i < len(rs) && uint64(rs[i].spec.UVA) <= a {
		return rs[i], a - uint64(rs[i].spec.UVA)
	}
	return nil, 0
}

// Slice returns guest memory [a, a+n) when it lies inside one region.
// n == 0 is valid for any mapped address.
func (t *Table) Slice(a GPA, n uint64) ([]byte, error) {
	r, off := t.findGPA(uint64(a))
	if r == nil || n > r.spec.Size-off {
		return nil, &AccessError{Space: "gpa", Addr: uint64(a), Len: n}
	}
	return r.data[off : off+n : off+n], nil
}

// AppendSlices appends to dst the slices covering [a, a+n), splitting the
// range where it crosses from one region into a GPA-adjacent one. The whole
// range must be mapped. Zero-length ranges append nothing and succeed wherever
// they point: they touch no memory.
func (t *Table) AppendSlices(dst [][]byte, a GPA, n uint64) ([][]byte, error) {
	addr := uint64(a)
	if addr+n < addr {
		return dst, &AccessError{Space: "gpa", Addr: addr, Len: n}
	}
	start := len(dst)
	for n > 0 {
		r, off := t.findGPA(addr)
		if r == nil {
			return dst[:start], &AccessError{Space: "gpa", Addr: uint64(a), Len: n + (addr - uint64(a))}
		}
		k := min(n, r.spec.Size-off)
		dst = append(dst, r.data[off:off+k:off+k])
		addr += k
		n -= k
	}
	return dst, nil
}

// SliceUVA returns front-end memory [a, a+n) when it lies inside one region.
func (t *Table) SliceUVA(a UVA, n uint64) ([]byte, error) {
	r, off := t.findUVA(uint64(a))
	if r == nil || n > r.spec.Size-off {
		return nil, &AccessError{Space: "uva", Addr: uint64(a), Len: n}
	}
	return r.data[off : off+n : off+n], nil
}

// Memory is the set of regions one front-end connection has given. It is
// safe for concurrent use: updates build a new Table and swap it in, readers
// take a retained snapshot.
type Memory struct {
	mu       sync.Mutex // guards cur and closed; held only briefly
	cur      *Table
	closed   bool
	maxSlots int
}

// NewMemory returns an empty memory that accepts at most maxSlots regions
// (DefaultMaxSlots if maxSlots <= 0).
func NewMemory(maxSlots int) *Memory {
	if maxSlots <= 0 {
		maxSlots = DefaultMaxSlots
	}
	return &Memory{cur: emptyTable, maxSlots: maxSlots}
}

// MaxSlots returns the slot limit.
func (m *Memory) MaxSlots() int { return m.maxSlots }

// Snapshot returns the current table, retained. The caller must Release it.
func (m *Memory) Snapshot() *Table {
	m.mu.Lock()
	t := m.cur.Retain()
	m.mu.Unlock()
	return t
}

// Slots returns the number of regions currently mapped.
func (m *Memory) Slots() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.cur.Len()
}

// install builds a table from regions (whose references it takes over) and
// swaps it in, releasing the previous one.
func (m *Memory) install(regions []*Region) error {
	t, err := newTable(regions, m.maxSlots)
	if err != nil {
		for _, r := range regions {
			r.release()
		}
		return err
	}
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		t.Release()
		return ErrClosed
	}
	old := m.cur
	m.cur = t
	m.mu.Unlock()
	old.Release()
	return nil
}

func newTable(regions []*Region, maxSlots int) (*Table, error) {
	if len(regions) > maxSlots {
		return nil, fmt.Errorf("%w: %d regions exceed %d slots", ErrBadRegion, len(regions), maxSlots)
	}
	t := &Table{byGPA: append([]*Region(nil), regions...), byUVA: append([]*Region(nil), regions...)}
	sort.Slice(t.byGPA, func(i, j int) bool { return t.byGPA[i].spec.GPA < t.byGPA[j].spec.GPA })
	sort.Slice(t.byUVA, func(i, j int) bool { return t.byUVA[i].spec.UVA < t.byUVA[j].spec.UVA })
	for i := 1; i < len(regions); i++ {
		a, b := t.byGPA[i-1].spec, t.byGPA[i].spec
		if overlaps(uint64(a.GPA), a.Size, uint64(b.GPA), b.Size) {
			return nil, fmt.Errorf("%w: gpa overlap between %s and %s", ErrBadRegion, a, b)
		}
		a, b = t.byUVA[i-1].spec, t.byUVA[i].spec
		if overlaps(uint64(a.UVA), a.Size, uint64(b.UVA), b.Size) {
			return nil, fmt.Errorf("%w: uva overlap between %s and %s", ErrBadRegion, a, b)
		}
	}
	t.refs.Store(1)
	return t, nil
}

// SetTable replaces every region (SET_MEM_TABLE). fds[i] backs specs[i]; the
// fds are not closed. On error the previous table stays in force.
func (m *Memory) SetTable(specs []RegionSpec, fds []int) error {
	if len(specs) != len(fds) {
		return fmt.Errorf("%w: %d regions but %d fds", ErrBadRegion, len(specs), len(fds))
	}
	if len(specs) > m.maxSlots {
		return fmt.Errorf("%w: %d regions exceed %d slots", ErrBadRegion, len(specs), m.maxSlots)
	}
	regions := make([]*Region, 0, len(specs))
	for i, s := range specs {
		r, err := mapRegion(fds[i], s)
		if err != nil {
			for _, r := range regions {
				r.release()
			}
			return err
		}
		regions = append(regions, r)
	}
	return m.install(regions)
}

// Add maps one more region (ADD_MEM_REG). The fd is not closed.
func (m *Memory) Add(spec RegionSpec, fd int) error {
	r, err := mapRegion(fd, spec)
	if err != nil {
		return err
	}
	t := m.Snapshot()
	defer t.Release()
	regions := make([]*Region, 0, t.Len()+1)
	for _, old := range t.byGPA {
		old.retain()
		regions = append(regions, old)
	}
	return m.installIfCurrent(t, append(regions, r))
}

// Remove unmaps the region with spec's GPA, UVA and size (REM_MEM_REG; the
// mmap offset is ignored, as the protocol says). The mapping goes once no
// retained Table still holds it, so queues using it never touch unmapped
// memory.
func (m *Memory) Remove(spec RegionSpec) error {
	t := m.Snapshot()
	defer t.Release()
	regions := make([]*Region, 0, t.Len())
	found := false
	for _, r := range t.byGPA {
		if !found && r.spec.GPA == spec.GPA && r.spec.UVA == spec.UVA && r.spec.Size == spec.Size {
			found = true
			continue
		}
		r.retain()
		regions = append(regions, r)
	}
	if !found {
		for _, r := range regions {
			r.release()
		}
		return fmt.Errorf("%w: no region %s to remove", ErrBadRegion, spec)
	}
	return m.installIfCurrent(t, regions)
}

// installIfCurrent installs regions only if base is still the current table;
// vhost-user messages on one connection are serial, so a conflict means a
// concurrent caller, which is a programming error reported as ErrBadRegion.
func (m *Memory) installIfCurrent(base *Table, regions []*Region) error {
	nt, err := newTable(regions, m.maxSlots)
	if err != nil {
		for _, r := range regions {
			r.release()
		}
		return err
	}
	m.mu.Lock()
	if m.closed || m.cur != base {
		m.mu.Unlock()
		nt.Release()
		if m.closed {
			return ErrClosed
		}
		return fmt.Errorf("%w: concurrent memory update", ErrBadRegion)
	}
	m.cur = nt
	m.mu.Unlock()
	base.Release()
	return nil
}

// Close drops every region; mappings go once no snapshot holds them. Close is
// idempotent. Later updates fail with ErrClosed; Snapshot returns an empty
// table.
func (m *Memory) Close() {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return
	}
	m.closed = true
	old := m.cur
	m.cur = emptyTable
	m.mu.Unlock()
	old.Release()
}

// Reset drops every region but keeps the memory usable (RESET_DEVICE).
func (m *Memory) Reset() {
	m.mu.Lock()
	old := m.cur
	m.cur = emptyTable
	m.mu.Unlock()
	old.Release()
}
