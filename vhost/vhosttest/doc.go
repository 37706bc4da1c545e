// Package vhosttest is a fake vhost-user front-end for tests and benchmarks:
// guest RAM in a memfd (GuestMemory), the driver side of split virtqueues
// (Ring) including raw setters to build hostile rings, and a front-end that
// speaks the vhost-user protocol to a back-end over a real Unix socket.
// For benchmarks, CPUMeter and ReportCPU turn a timed loop's process CPU
// time into a per-core figure (MB/cpu-s) beside Go's MB/s.
//
// It plays the guest and QEMU, so it is trusted test code: it panics on its
// own misuse rather than returning errors for impossible states, but it
// reports everything the back-end does wrong (unknown used heads, overstated
// used lengths) as errors. Ring builds only chains a driver may build (Add
// and AddIndirect refuse one of more buffers than the ring has entries,
// ErrChainTooLong); AddRawIndirect and the raw setters build the rest. A
// head, and every buffer of its chain, stays in flight until the device
// uses it, so a chain the device rejects is never reused. Ring is safe for
// concurrent use; GuestMemory's allocator is a mutex-guarded bump
// allocator.
package vhosttest
