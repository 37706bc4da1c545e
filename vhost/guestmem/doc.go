// Package guestmem owns a vhost-user front-end's guest memory as the back-end
// sees it: the regions QEMU hands over (SET_MEM_TABLE, ADD_MEM_REG,
// REM_MEM_REG), each mapped MAP_SHARED, and the one translator every guest
// address goes through.
//
// # Address spaces
//
// Two address spaces meet here and have distinct types: GPA (guest-physical,
// what descriptors carry) and UVA (the front-end's own virtual addresses,
// what SET_VRING_ADDR carries). A Table translates either into a slice of the
// mapping; there is no other path from an address to memory.
//
// # Threat model
//
// The guest chooses every GPA and length; QEMU (semi-trusted) chooses the
// regions. Every translation is bounds-checked with overflow-safe arithmetic
// and either returns slices entirely inside mapped regions or an
// *AccessError wrapping ErrOutOfBounds. Region specs are validated (size,
// overflow, overlap in either space, slot limit, file length so that touching
// the mapping cannot SIGBUS) and rejected with ErrBadRegion. A range that
// crosses from one region into a GPA-adjacent one is split into several
// slices (AppendSlices) rather than read past the first mapping.
//
// # Lifetimes and concurrency
//
// Memory is safe for concurrent use. Updates build a new immutable Table and
// swap it in under a short mutex. Readers take a retained snapshot
// (Memory.Snapshot) and Release it when done; a Region is reference-counted by
// the Tables that hold it and unmapped only when the last one is released. So
// a region removed while a queue still holds a descriptor chain in it stays
// mapped until that chain is given back: no use-after-unmap. Lock order:
// Memory.mu is a leaf lock.
package guestmem
