// Package virtq is the device side of a virtio split virtqueue living in
// guest memory: pop a descriptor chain, read and write it through a
// Reader/Writer that hides how the guest split its buffers, push used entries
// in batches, and decide notifications (EVENT_IDX or the flag bits). It also
// wraps a ring's kick and call eventfds for Go's netpoller (Kicker, Signal).
//
// # Threat model
//
// The guest driver owns the descriptor table and avail ring and may rewrite
// them at any moment. Every field is copied out of guest memory once and
// validated on the copy; the walk is bounded (a chain visits at most as many
// entries as its table has: cycles are caught; and a chain holds at most
// Queue Size buffer descriptors, counting an indirect table's, as virtio 1.2
// §2.7.5.3.1 requires of drivers: a longer chain is rejected, not served,
// so one chain never costs more than the ring it came from), head and
// next indices are range-checked, indirect tables must be negotiated, a
// non-zero multiple of 16 bytes, no longer than the queue size less the
// descriptors before them, never nested and
// never combined with NEXT; readable descriptors must precede writable ones;
// each direction is capped at 2^32-1 bytes; every buffer is translated
// through guestmem (so it lies inside guest memory); an avail index that
// moves more than the queue size is rejected. Any violation breaks that queue
// only: Pop returns a *ChainError or *RingError wrapping ErrBroken and keeps
// returning it until the queue is set up again. The used length pushed is
// clamped to the chain's writable size, never overstated.
//
// # Memory ordering
//
// See the primer at the top of virtq.go: 16-bit indices are accessed through
// their aligned 32-bit words with sync/atomic; advisory fields
// (used_event, avail_event, flags) with plain accesses after a full barrier.
//
// # Concurrency
//
// A Queue's methods are serialised by one mutex, so a device may pop on the
// ring's goroutine and push from others. Chains hold a retained guestmem
// Table, so their slices stay valid until Push or Discard even if the region
// is removed. Stop (GET_VRING_BASE) publishes what was pushed and makes every
// later call fail with ErrStopped; a Kicker's Stop wakes a waiting goroutine
// without another kick. Lock order: Queue.mu, then guestmem's Memory.mu.
package virtq
