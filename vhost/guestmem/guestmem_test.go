package guestmem_test

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/vsdp/vsdp/vhost/guestmem"
	"golang.org/x/sys/unix"
)

func memfd(t testing.TB, size int64) int {
	t.Helper()
	fd, err := unix.MemfdCreate("guestmem-test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Ftruncate(fd, size); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

func TestRegionValidation(t *testing.T) {
	fd := memfd(t, 1<<20)
	for _, tc := range []struct {
		name string
		spec guestmem.RegionSpec
	}{
		{"zero size", guestmem.RegionSpec{GPA: 0, Size: 0, UVA: 0x1000}},
		{"huge size", guestmem.RegionSpec{GPA: 0, Size: 1 << 41, UVA: 0x1000}},
		{"gpa overflow", guestmem.RegionSpec{GPA: ^guestmem.GPA(0) - 10, Size: 4096, UVA: 0x1000}},
		{"uva overflow", guestmem.RegionSpec{GPA: 0, Size: 4096, UVA: ^guestmem.UVA(0) - 10}},
		{"larger than file", guestmem.RegionSpec{GPA: 0, Size: 2 << 20, UVA: 0x1000}},
		{"offset past file", guestmem.RegionSpec{GPA: 0, Size: 4096, UVA: 0x1000, MmapOffset: 1 << 20}},
		{"offset overflow", guestmem.RegionSpec{GPA: 0, Size: 4096, UVA: 0x1000, MmapOffset: ^uint64(0) - 100}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := guestmem.NewMemory(0)
			defer m.Close()
			if err := m.Add(tc.spec, fd); !errors.Is(err, guestmem.ErrBadRegion) {
				t.Fatalf("Add(%s) = %v, want ErrBadRegion", tc.spec, err)
			}
			if err := m.SetTable([]guestmem.RegionSpec{tc.spec}, []int{fd}); !errors.Is(err, guestmem.ErrBadRegion) {
				t.Fatalf("SetTable = %v, want ErrBadRegion", err)
			}
		})
	}
	t.Run("not mappable fd", func(t *testing.T) {
		m := guestmem.NewMemory(0)
		defer m.Close()
		var p [2]int
		if err := unix.Pipe(p[:]); err != nil {
			t.Fatal(err)
		}
		defer unix.Close(p[0])
		defer unix.Close(p[1])
		if err := m.Add(guestmem.RegionSpec{Size: 4096, UVA: 0x1000}, p[0]); !errors.Is(err, guestmem.ErrBadRegion) {
			t.Fatalf("pipe accepted: %v", err)
		}
	})
}

func TestOverlapsAndSlots(t *testing.T) {
	fd := memfd(t, 1<<20)
	m := guestmem.NewMemory(2)
	defer m.Close()
	a := guestmem.RegionSpec{GPA: 0, Size: 1 << 19, UVA: 0x10000000}
	if err := m.Add(a, fd); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		spec guestmem.RegionSpec
	}{
		{"gpa overlap", guestmem.RegionSpec{GPA: 1<<19 - 1, Size: 4096, UVA: 0x20000000}},
		{"uva overlap", guestmem.RegionSpec{GPA: 1 << 30, Size: 4096, UVA: 0x10000000 + 4096}},
	} {
		if err := m.Add(tc.spec, fd); !errors.Is(err, guestmem.ErrBadRegion) {
			t.Errorf("%s: %v", tc.name, err)
		}
	}
	b := guestmem.RegionSpec{GPA: 1 << 19, Size: 1 << 19, UVA: 0x20000000, MmapOffset: 1 << 19}
	if err := m.Add(b, fd); err != nil {
		t.Fatal(err)
	}
	if err := m.Add(guestmem.RegionSpec{GPA: 1 << 30, Size: 4096, UVA: 0x30000000}, fd); !errors.Is(err, guestmem.ErrBadRegion) {
		t.Fatalf("third region beyond 2 slots: %v", err)
	}
	if err := m.SetTable([]guestmem.RegionSpec{a, b, {GPA: 1 << 30, Size: 4096, UVA: 0x30000000}}, []int{fd, fd, fd}); !errors.Is(err, guestmem.ErrBadRegion) {
		t.Fatalf("SetTable beyond slots: %v", err)
	}
	if err := m.SetTable([]guestmem.RegionSpec{a}, []int{fd, fd}); !errors.Is(err, guestmem.ErrBadRegion) {
		t.Fatalf("fd count mismatch: %v", err)
	}
	if m.Slots() != 2 {
		t.Fatalf("failed updates changed the table: %d slots", m.Slots())
	}
	if err := m.Remove(guestmem.RegionSpec{GPA: 0, Size: 4096, UVA: 0x10000000}); !errors.Is(err, guestmem.ErrBadRegion) {
		t.Fatalf("remove with wrong size: %v", err)
	}
	// The mmap offset is ignored on removal, as the protocol says.
	if err := m.Remove(guestmem.RegionSpec{GPA: b.GPA, Size: b.Size, UVA: b.UVA}); err != nil {
		t.Fatal(err)
	}
	if m.Slots() != 1 {
		t.Fatalf("%d slots after remove", m.Slots())
	}
}

func TestTranslate(t *testing.T) {
	fd := memfd(t, 3<<16)
	m := guestmem.NewMemory(0)
	defer m.Close()
	// Region A: GPA [0, 64K) = file [64K, 128K); region B: GPA [64K, 128K)
	// = file [0, 64K), adjacent in GPA space; region C far away.
	specs := []guestmem.RegionSpec{
		{GPA: 0, Size: 1 << 16, UVA: 0x7000_0000, MmapOffset: 1 << 16},
		{GPA: 1 << 16, Size: 1 << 16, UVA: 0x5000_0000, MmapOffset: 0},
		{GPA: 1 << 32, Size: 1 << 16, UVA: 0x9000_0000, MmapOffset: 2 << 16},
	}
	if err := m.SetTable(specs, []int{fd, fd, fd}); err != nil {
		t.Fatal(err)
	}
	tbl := m.Snapshot()
	defer tbl.Release()
	// Write through GPA, read through UVA of the same bytes.
	b, err := tbl.Slice(0x10, 4)
	if err != nil {
		t.Fatal(err)
	}
	binary.LittleEndian.PutUint32(b, 0xdeadbeef)
	u, err := tbl.SliceUVA(0x7000_0010, 4)
	if err != nil || binary.LittleEndian.Uint32(u) != 0xdeadbeef {
		t.Fatalf("uva view: %x %v", u, err)
	}
	for _, tc := range []struct {
		name string
		addr uint64
		n    uint64
		ok   bool
		segs int
	}{
		{"inside A", 0, 1 << 16, true, 1},
		{"zero length at mapped", 100, 0, true, 0},
		{"straddles A/B (split)", 1<<16 - 8, 16, true, 2},
		{"end of B", 2<<16 - 1, 1, true, 1},
		{"past B", 2 << 16, 1, false, 0},
		{"straddles B end", 2<<16 - 1, 2, false, 0},
		{"hole", 1 << 20, 1, false, 0},
		{"C", 1 << 32, 4096, true, 1},
		{"wraps", ^uint64(0) - 1, 4, false, 0},
		{"huge length", 0, ^uint64(0), false, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			segs, err := tbl.AppendSlices(nil, guestmem.GPA(tc.addr), tc.n)
			if tc.ok != (err == nil) {
				t.Fatalf("AppendSlices err=%v, want ok=%v", err, tc.ok)
			}
			if err != nil {
				var ae *guestmem.AccessError
				if !errors.As(err, &ae) || !errors.Is(err, guestmem.ErrOutOfBounds) {
					t.Fatalf("error %v is not an AccessError", err)
				}
				return
			}
			total := 0
			for _, s := range segs {
				total += len(s)
			}
			if len(segs) != tc.segs || uint64(total) != tc.n {
				t.Fatalf("%d segments of %d bytes, want %d of %d", len(segs), total, tc.segs, tc.n)
			}
			_, err = tbl.Slice(guestmem.GPA(tc.addr), tc.n)
			if (err == nil) != (tc.segs <= 1) {
				t.Fatalf("Slice err=%v for %d segments", err, tc.segs)
			}
		})
	}
	if _, err := tbl.SliceUVA(0x5000_0000+1<<16, 1); !errors.Is(err, guestmem.ErrOutOfBounds) {
		t.Fatal("uva past region accepted")
	}
}

func TestRemoveWhileSnapshotHeld(t *testing.T) {
	fd := memfd(t, 1<<16)
	m := guestmem.NewMemory(0)
	spec := guestmem.RegionSpec{GPA: 0x1000_0000, Size: 1 << 16, UVA: 0x4000_0000}
	if err := m.Add(spec, fd); err != nil {
		t.Fatal(err)
	}
	held := m.Snapshot()
	b, err := held.Slice(spec.GPA, 8)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Remove(spec); err != nil {
		t.Fatal(err)
	}
	now := m.Snapshot()
	if _, err := now.Slice(spec.GPA, 8); !errors.Is(err, guestmem.ErrOutOfBounds) {
		t.Fatal("removed region still translates in a new snapshot")
	}
	now.Release()
	m.Close()
	copy(b, "mapped!!") // the held snapshot keeps the mapping alive
	if string(b) != "mapped!!" {
		t.Fatal("write lost")
	}
	held.Release()
	if err := m.Add(spec, fd); !errors.Is(err, guestmem.ErrClosed) {
		t.Fatalf("Add after Close: %v", err)
	}
	m.Close() // idempotent
}

// FuzzTranslate builds a table from fuzzed region specs over one memfd and
// translates fuzzed ranges: no panic, and every accepted range must be
// fully inside one of the accepted regions.
func FuzzTranslate(f *testing.F) {
	f.Add(uint64(0), uint64(4096), uint64(0x1000), uint64(0), uint64(100), uint64(16))
	f.Add(uint64(1<<20), uint64(1<<16), uint64(0x7fff0000), uint64(4096), uint64(1<<20+1<<16-1), uint64(2))
	f.Add(^uint64(0)-4095, uint64(4096), uint64(0), uint64(0), ^uint64(0), uint64(1))
	f.Fuzz(func(t *testing.T, gpa, size, uva, off, addr, n uint64) {
		fd := memfd(t, 1<<17)
		m := guestmem.NewMemory(0)
		defer m.Close()
		spec := guestmem.RegionSpec{GPA: guestmem.GPA(gpa), Size: size, UVA: guestmem.UVA(uva), MmapOffset: off}
		if err := m.Add(spec, fd); err != nil {
			return
		}
		tbl := m.Snapshot()
		defer tbl.Release()
		segs, err := tbl.AppendSlices(nil, guestmem.GPA(addr), n)
		if err != nil {
			return
		}
		if n == 0 {
			if len(segs) != 0 {
				t.Fatal("zero-length range produced segments")
			}
			return // zero-length ranges touch nothing, wherever they point
		}
		if addr < gpa || addr-gpa > size || n > size-(addr-gpa) {
			t.Fatalf("range [%#x,+%#x) accepted outside region %s", addr, n, spec)
		}
		total := uint64(0)
		for _, s := range segs {
			total += uint64(len(s))
			if len(s) > 0 {
				s[0], s[len(s)-1] = 1, 2 // must be writable mapped memory
			}
		}
		if total != n {
			t.Fatalf("segments cover %d bytes, want %d", total, n)
		}
	})
}
