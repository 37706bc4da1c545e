package vhosttest

import "github.com/vsdp/vsdp/vhost/guestmem"

// Builders for hostile rings. They write the main descriptor table and the
// avail ring directly: a hostile test owns the whole ring and must not mix
// them with Add on the same slots.

// PostChain writes ds into main-table slots first, first+1, … (Next fields
// as given) and publishes first as a head.
func (r *Ring) PostChain(first uint16, ds ...RawDesc) {
	for i, d := range ds {
		r.SetDesc(first+uint16(i), d)
	}
	r.PutAvail(first)
}

// PostLoop publishes a chain of n descriptors starting at slot first whose
// last descriptor links back to the first: a cycle no bound-less walker
// escapes. Each descriptor is a readable 64-byte buffer at buf.
func (r *Ring) PostLoop(first uint16, n int, buf guestmem.GPA) {
	for i := range n {
		next := first + uint16(i) + 1
		if i == n-1 {
			next = first
		}
		r.SetDesc(first+uint16(i), RawDesc{Addr: buf, Len: 64, Flags: 1, Next: next})
	}
	r.PutAvail(first)
}

// PostIndirect writes table as an indirect table, points main-table slot at
// it (flags INDIRECT plus extra) and publishes slot.
func (r *Ring) PostIndirect(slot uint16, extra uint16, table []RawDesc) error {
	a, err := r.WriteTable(table)
	if err != nil {
		return err
	}
	r.SetDesc(slot, RawDesc{Addr: a, Len: uint32(16 * len(table)), Flags: 4 | extra})
	r.PutAvail(slot)
	return nil
}

// Buffer allocates n bytes of guest memory for hand-built descriptors.
func (r *Ring) Buffer(n uint64) (guestmem.GPA, error) { return r.mem.Alloc(n, 64) }
