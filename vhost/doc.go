// Package vhost is the vhost-user back-end core: it speaks the protocol to
// front-ends (QEMU 7.2's vhost-user-vsock-pci and vhost-user-fs-pci), owns
// each connection's guest memory and rings, and hands running rings to a
// Device.
//
// # What it owns
//
//   - The message codec (message.go): the 12-byte header, request codes with
//     their wire names, and every payload shape the core handles, decoded
//     with exact sizes in host byte order.
//   - The validation table (validate.go): one row per request giving whether
//     the core implements it, whether it has its own reply, the protocol or
//     virtio feature that gates it, how many fds it carries, and a value
//     check. Every message passes it before any handler runs.
//   - Feature negotiation: the core offers VERSION_1, RING_INDIRECT_DESC,
//     RING_EVENT_IDX and PROTOCOL_FEATURES plus the device's own bits, and
//     the protocol features MQ, REPLY_ACK, CONFIGURE_MEM_SLOTS, RESET_DEVICE
//     and, for a device with config space, CONFIG (QEMU's vsock device will
//     not start without it). SET_FEATURES and SET_PROTOCOL_FEATURES with
//     bits never offered are rejected.
//   - The session (session.go): one per front-end connection, with its
//     guestmem.Memory, its rings and its Device.
//   - The server (server.go): listens on a Unix socket, serves many
//     front-ends at once, or one at a time (Exclusive: a newcomer waits a
//     bounded time for the served one to end, then is refused), counts,
//     and exposes Trace and Record hooks.
//
// # Ring life cycle
//
// A ring runs only while it is started (it has a kick eventfd: QEMU's kick
// fds arrive already signalled) and enabled (SET_VRING_ENABLE 1, or always
// when PROTOCOL_FEATURES was not acked). When both hold, the session builds
// a virtq.Queue over the ring areas, gives it to Device.QueueStart and runs
// one goroutine that waits for kicks on Go's netpoller and calls
// Device.Kick. SET_VRING_ENABLE(0), GET_VRING_BASE, a new kick fd,
// RESET_DEVICE, RESET_OWNER and disconnect stop it: the kicker's deadline
// wakes the goroutine (stopping never waits for another kick), the device
// gets QueueStop, and the queue's last avail index is kept for
// GET_VRING_BASE, which also forgets the kick fd (the ring is stopped until
// the next SET_VRING_KICK). Ring size, base and addresses cannot change
// while the ring runs, nor can the acked features.
//
// Memory updates (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG) apply while rings
// run: a queue keeps the mapping of its ring areas and takes a fresh table
// for every chain, so a removed region is unmapped only once no queue or
// chain uses it, and a descriptor pointing into it breaks its ring.
//
// # Threat model and fault scopes
//
// The guest is hostile from its first instruction; the front-end (QEMU) is
// semi-trusted: every message is checked, none can crash the daemon or
// reach another connection. Responses are scoped to the fault:
//
//   - A message with the wrong version or flag bits (REPLY from the
//     front-end, unknown bits), a payload of the wrong size for its request,
//     the wrong number of fds, an unknown or not negotiated request, or a
//     value out of range (queue index, ring size, base, feature bits,
//     alignment, region) is rejected: no handler runs, every fd that came
//     with it is closed, the rejection is counted and traced, and the
//     front-end hears of it when it asked (a non-zero REPLY_ACK status with
//     NEED_REPLY; an empty reply for a request that has its own reply, which
//     front-ends treat as a failure instead of waiting forever). Kick, call
//     and err fds must be eventfds: anything else could stall or spin a ring
//     goroutine. Call and err signals are single non-blocking writes, so a
//     front-end that saturates an eventfd's counter loses only that signal
//     (its driver is being woken anyway), never a goroutine.
//   - A header announcing more than MaxPayload bytes, or a connection that
//     ends inside a message, leaves the stream unparsable: the connection is
//     closed (ErrProtocol) and the session frees everything.
//   - A ring the driver corrupts (virtq.ErrBroken), a device failure on a
//     ring, or a failing kick fd breaks that ring — and any other ring of
//     the session whose queue is found corrupt at the same time. The ring
//     stops, the device gets QueueStop, the err eventfd is signalled once,
//     one RingsBroken is counted and one EventRingBroken traced; further
//     kicks do nothing until the front-end sets the ring up again. The
//     connection and every other connection go on.
//   - A disconnect stops every ring (their goroutines exit), closes every
//     fd, drops the memory (unmapped once the last queue releases it) and
//     closes the device.
//
// Bounds: MaxPayload (4096) bytes and MaxFDs (32) fds per message, 8
// regions per SET_MEM_TABLE, Server.MaxMemSlots regions per connection,
// ring sizes up to the device's MaxQueueSize, config accesses up to 256
// bytes. Ring walks are bounded by virtq.
//
// The library never logs: it returns errors wrapping ErrProtocol,
// ErrUnsupported, ErrInvalid, ErrState or ErrClosed (as *MessageError for
// messages, *RingError for rings), counts (Stats), and reports through the
// optional Trace hook, through which the daemon logs.
//
// # Concurrency and lock order
//
// Each session's message loop runs on one goroutine and owns the session's
// state; Server.ServeConn runs it on the caller's goroutine, Server.Serve on
// a new one per connection. Each running ring has one goroutine. Session.mu
// guards only the hand-over between the two (which run is current, whether
// it is stopping or was broken by another ring's goroutine); it is a leaf
// lock held for a few loads and stores, and virtq.Queue's lock may be taken
// under it. Device methods are never called with it held. Server.mu guards
// the listener and session sets. Order: Server.mu, then nothing; Session.mu,
// then virtq.Queue.mu.
//
// Server.Close closes listeners and connections and waits until every
// session has freed what it held; it is idempotent and safe to call
// concurrently. Trace and Record are called from several goroutines.
//
// Not supported: dirty logging and migration (LOG_SHMFD, SET_LOG_*),
// in-flight tracking (INFLIGHT_SHMFD), back-end requests (BACKEND_REQ), the
// STATUS protocol feature, in-band notifications, IOTLB, packed rings and
// polling mode (a ring without a kick fd). Requests for them are rejected.
package vhost
