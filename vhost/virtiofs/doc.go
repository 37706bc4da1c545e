// Package virtiofs is the virtio-fs device (virtio 1.2 §5.11) served to one
// VM through vhost-user: QEMU's vhost-user-fs-pci with a hiprio ring (0)
// and Options.RequestQueues request rings (1..N; QEMU's
// num-request-queues). Requests are FUSE messages, handed to go-fuse's
// fuse.ProtocolServer (v2.12.1) over a fuse.RawFileSystem the caller
// supplies (for example fs.NewNodeFS); the device knows nothing of what
// the filesystem serves.
//
// # What it owns
//
// The rings' chains and the requests in flight: a bounded pool of workers
// (Options.Workers, default 256) runs the synchronous HandleRequest calls,
// and replies are pushed out of order as workers finish. It serves no
// config space (QEMU fills tag and num_request_queues itself and never
// sends GET_CONFIG for this device) and offers no feature bits
// (VIRTIO_FS_F_NOTIFICATION is used by neither QEMU nor Linux, so the
// device can never wake a guest poll: stream files are for blocking I/O).
// hiprio (FORGET, BATCH_FORGET, INTERRUPT) is served inline on its ring's
// goroutine, a bounded batch per Kick, and never waits behind a worker.
//
// go-fuse v2.12.1 gathers WRITE payloads that span descriptors (it passes
// them as an iovec to Writev, or copies them for a plain Write) and
// scatters READ replies over every writable descriptor; the tests check
// 1 MiB both ways over 4 KiB and 1000-byte descriptors by sha256. The
// device passes the guest's own segments, so payloads are not copied by
// the device. FUSE_INIT is go-fuse's (MaxWrite defaults to 1 MiB here; the
// guest caps its requests at the ring size less 4 pages).
//
// # Threat model
//
// The guest is hostile: every chain is checked before go-fuse sees it, on
// a single host copy of its fixed part (header and opcode struct, at most
// 128 bytes) that go-fuse then parses, so the guest cannot change what
// was checked. Rules, each answered with an error reply when the chain
// has room for a reply header (16 bytes) and pushed with length 0
// otherwise, and counted in Stats:
//
//   - readable part shorter than fuse_in_header, or in_header.len not the
//     readable length: EINVAL (BadChains);
//   - more than MaxRequest bytes readable (MaxWrite + 68 KiB): E2BIG; the
//     writable part is used only up to MaxRequest (BadChains);
//   - an opcode go-fuse does not serve, or not FUSE at all: ENOSYS
//     (Unsupported);
//   - on hiprio anything but FORGET, BATCH_FORGET and INTERRUPT, and
//     INTERRUPT on a request ring: EINVAL (BadChains);
//   - shorter than the opcode's struct (go-fuse would report it on the
//     process-wide logger), a WRITE whose size is not its payload, a
//     FUSE_INIT of another major version or a minor below 12: EINVAL or
//     EPROTO (BadChains);
//   - a request needing a reply with less than 16 writable bytes: pushed
//     with length 0 (BadChains);
//   - a FUSE_INIT while other requests run for longer than 100 ms: EBUSY
//     (InitBusy; it rewrites go-fuse's session state, so it runs alone);
//   - whatever go-fuse refuses without answering (a READ larger than its
//     room): the device answers with go-fuse's errno.
//
// Node ids and file handles never issued reach the filesystem: go-fuse's
// fs bridge panics on them (after printing on the process-wide logger) and
// go-fuse recovers the panic as EIO; a filesystem that must stay silent
// has to check ids itself. A ring the driver corrupts breaks through virtq
// (Kick returns the error) and only that ring.
//
// # The worker bound and its consequences
//
// At most Options.Workers requests are in the filesystem at once. When all
// are busy the device stops popping: chains stay in the ring and the ring
// is marked stalled; the next worker to finish pumps it again (the same
// one-at-a-time pump as vsock's rx path). Each parked request (a read on a
// quiet stream) holds a worker and its chain's descriptors: run QEMU with
// queue-size=1024 (and indirect descriptors, which Linux uses) so that
// parked reads do not exhaust the ring, which would stall every other
// operation on the mount. virtiofs drops FUSE_INTERRUPT, so a guest
// process killed while its read is parked waits in D state until the
// request is answered: the filesystem must answer parked requests when
// the stream ends or is hung up.
//
// Stopping: QueueStop of a request ring, Reset and Close interrupt every
// request still in the filesystem (a FUSE_INTERRUPT through go-fuse, which
// cancels the request's context), call Options.OnStop (the owner hangs up
// parked requests a filesystem does not cancel on its context), and wait
// up to StopTimeout. A request that finishes later is discarded (its
// chain's memory is released), never pushed: the device never pushes to a
// stopped ring. A late reply may still have written into its guest
// buffers, so a filesystem must honour cancellation or OnStop promptly.
// Reset starts a new go-fuse session; the RawFileSystem is shared and
// keeps the nodes the previous session looked up.
//
// # Concurrency and lock order
//
// Calls arrive from the vhost core (message loop; one goroutine per ring
// for Kick) and from workers. Device.mu guards the ring table, the work
// set, stall marks and counters; it is held while popping (so a stopped
// ring is never popped) and while a worker pushes and flushes (so a
// stopped ring is never pushed to). initMu is held shared around every
// request handed to go-fuse and exclusively by FUSE_INIT; it is never
// taken with Device.mu held. Each request ring's pumpMu makes the pump run
// one at a time. Lock order: pumpMu, then Device.mu, then virtq's
// Queue.mu; initMu, then Device.mu (begin), then nothing.
package virtiofs
