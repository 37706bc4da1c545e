// Package vsock is the virtio-vsock device (virtio 1.2 §5.10) served to one
// VM through vhost-user: the rx and tx rings (QEMU keeps the event queue),
// the guest CID in config space, the stream table, and the vsock credit
// protocol. Streams are handed to a Backend; the device knows nothing of
// SDP, policy or the fabric.
//
// # Data path
//
// Guest to host: a tx chain's payload is handed to the stream as slices of
// guest memory (Payload) and the chain is given back only when the stream
// releases it — at most MaxHeldPerConn chains per stream and MaxHeld per VM
// (the 128-entry tx ring is shared by every stream and by the guest's own
// credit updates); beyond that the payload is copied and the chain released
// at once, and the copy is counted. Host to guest: the device pulls bytes
// from the stream straight into the guest's rx buffers, never more than
// the guest's advertised window (buf_alloc − (tx_cnt − fwd_cnt)) and never
// more than the buffer holds (Linux drops a packet that does not fit).
// Guest rx buffers may be one descriptor (Linux ≥ 6.3, QEMU 7.2 with
// 3776-byte buffers) or a 44-byte header descriptor plus a page (Linux 6.1):
// the chain Writer hides which.
//
// # Threat model
//
// The guest controls every packet. Headers are copied once out of guest
// memory and validated: a packet whose source is not the guest's CID or
// whose destination is not the host is dropped and counted (answering it
// would address someone else); a non-stream type or a packet for no stream
// is answered with RST (never an RST for an RST); a payload length beyond
// its buffer or 64 KiB, data beyond the credit the host granted, data on a
// stream not open for guest sends, a duplicate REQUEST or an unknown op
// resets only that stream (ErrProtocol) and is counted. Streams per VM are
// bounded (MaxConns), as are queued RSTs for unknown streams (extra ones
// are dropped and counted), held chains, and the data the host holds per
// stream (BufAlloc, enforced by the credit check). A corrupt ring breaks
// the device's ring through virtq and resets every stream.
//
// # Concurrency
//
// Device.mu guards the stream table and per-stream state; it is never held
// while calling the backend or a Stream (calls are collected and run after
// unlocking). The rx "pump" that fills guest buffers runs on whichever
// goroutine asks for it (a tx kick, an rx kick, a Notify, a Release), one at
// a time under pumpMu; a request made while it runs is picked up before it
// stops. Lock order: pumpMu, then Device.mu, then virtq's Queue.mu.
package vsock
