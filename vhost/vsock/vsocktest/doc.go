// Package vsocktest is a guest-side virtio-vsock driver for tests and
// benchmarks: it drives a vsock back-end through the fake vhost-user
// front-end (vhost/vhosttest) the way the Linux driver does — rx buffers
// posted ahead, packets on tx, credit in both directions — and offers
// blocking stream connections. It is trusted test code; it reports what the
// device does wrong (a packet larger than its buffer, data beyond the
// guest's credit) as errors on the stream.
//
// One goroutine reaps the rings: it drains every used rx buffer under one
// lock into per-stream receive buffers (bounded by the credit, so they stop
// growing at BufAlloc) and wakes readers once per batch, reposts rx
// buffers, then sleeps until an rx interrupt (polling every 2 ms as a
// safety net). Stats count how it woke, so tests can tell a stream carried
// by interrupts from one rescued by polls (Missed: an interrupt the device
// owed). Lock order: Guest.mu, then the rings' own locks.
//
// Queue is the byte queue that back-end test streams (vsock.Stream
// implementations in tests) keep what Deliver got in and Pull hands back;
// it has no lock, the stream that holds it locks.
package vsocktest
