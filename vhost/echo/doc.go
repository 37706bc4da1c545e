// Package echo is a loopback virtio device for testing and benchmarking the
// vhost-user core without QEMU or a guest.
//
// # Design
//
// It serves two rings laid out like virtio-vsock's: queue 0 (RX) carries
// device-writable buffers the driver posts, queue 1 (TX) carries
// device-readable buffers the driver sends. Every TX chain is a message: its
// readable bytes are copied, through virtq.Reader and virtq.Writer (so the
// driver's descriptor split never matters), into as many RX chains as it
// takes, and an RX chain never holds bytes of two messages. A message of
// zero bytes yields one RX chain of zero bytes. When no RX buffer is posted
// the current TX chain waits, with later TX chains left on the ring: the
// cross-ring back-pressure a vsock device has. A kick on either ring resumes
// the copy.
//
// Each Kick does a bounded amount of work (Options.Budget chains) and asks
// the core to call again when work is left, so stopping a ring never waits
// on a guest that keeps posting buffers.
//
// # Threat model
//
// The driver is untrusted: every chain comes through virtq, which bounds and
// validates it. A ring the driver corrupts makes Kick return the
// virtq.ErrBroken error, and the core breaks the ring. Config space accesses
// outside the configured bytes fail.
//
// # Concurrency
//
// One mutex (Device.mu) serialises every method; Kick for RX and TX may be
// called from two goroutines and take turns. Lock order: Device.mu, then the
// virtq.Queue locks inside Pop/Push/Flush.
package echo
