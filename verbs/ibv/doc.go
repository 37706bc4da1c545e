// Package ibv is the rdma-core provider of package verbs: cgo over
// libibverbs and librdmacm. It is the only package of the repository that
// imports "C"; every file but this one builds only with linux && cgo, so
// without cgo the package is empty and the rest of the repository builds
// and tests with CGO_ENABLED=0. verbs/provider chooses between this provider
// and verbs/soft.
//
// # What it owns
//
//   - Provider (Devices, Open): ibv_get_device_list. A host whose kernel has
//     no RDMA support makes it return NULL with errno ENOSYS; that is zero
//     devices, not an error.
//   - Device: one device context, the one librdmacm opened for it (so queue
//     pairs can be created on connection manager identifiers), one
//     rdma_event_channel, and the device's protection domains, completion
//     queues, listeners and connections.
//   - PD, MR, MW (type 2, bound with OpBindMW through ibv_post_send), CQ with
//     its own completion channel (and Spin, a busy-poll that stays in C), RC
//     QP (ibv_create_qp, transitions driven by the provider with the CM's
//     attributes).
//   - The connection manager: Listen and Resolve/Connect with IP addressing in
//     RDMA_PS_TCP, and an active Resolve/Connect with native IB addressing
//     (AF_IB) for SDP service IDs.
//
// # Design
//
// Memory. DMA memory is never Go heap memory: RegMR takes the address of
// memory the caller mapped (guest regions, verbs.AllocDMA) and passes it to C
// as an integer; the caller keeps it mapped until the MR is closed. No Go
// pointer is retained by C. Work request lists are built by Go in flat,
// pointer-free C structures (struct vsdp_swr, vsdp_rwr, ibv_sge) in Go memory,
// and a C helper links them into ibv_send_wr/ibv_recv_wr lists on its stack
// for the duration of one ibv_post_send/ibv_post_recv call (32 at a time,
// keeping bad_wr's index). One cgo call posts a whole list; one polls a whole
// batch of completions (up to 1024), converted in C to a flat struct.
//
// Waiting. Every descriptor librdmacm or libibverbs owns that delivers events
// (the completion channel of each CQ, the CM event channel of each device,
// the asynchronous event descriptor of each device context) is duplicated,
// made non-blocking (the flag lives in the shared open file description) and
// registered with Go's netpoller through verbs.PollFD. A goroutine that waits
// parks on the netpoller, never in a blocking C call: ibv_get_cq_event,
// rdma_get_cm_event and ibv_get_async_event are called only once the
// descriptor is readable and return EAGAIN when drained. CQ events are
// acknowledged in batches of 32 (and the rest at Close, before
// ibv_destroy_cq). CM and async events are copied out and acknowledged inside
// the C helper, so rdma_destroy_id and ibv_destroy_qp never wait for them.
//
// Busy-polling. Spin (for a CQ of this provider, the Spinner method) waits
// for a completion on the calling goroutine without the completion channel:
// each call into C polls the queue up to 64 times before it returns empty,
// the way a C program's polling loop does, and Spin checks its context and
// the queue's closing between calls. No goroutine is handed anything, and
// Close waits at most one such call. In two TCG guests it measured within
// the noise of a Go loop calling Poll (one cgo call per poll); see
// docs/bench.md.
//
// Events. One goroutine per Device reads CM events and dispatches them by the
// identifier's context value (an integer handle, not a pointer) to its Conn
// or Listener; one goroutine per device context (shared by every Device open
// on it, reference-counted) reads asynchronous events and dispatches them by
// QP number. IBV_EVENT_COMM_EST is passed on with rdma_notify; CQ_ERR marks
// the CQ overflowed (Poll then fails with ErrCQOverflow) and reaches the
// connections whose queue pairs use it.
//
// Service IDs and private data (ref/sdp-protocol.md §3.1, §10 item 2):
//
//   - RDMA_PS_TCP (0x01060000|port), IP addressing: REQ 56 bytes of private
//     data (the RDMA CM's 36-byte header comes first), REP 196, REJ 148.
//     Listen and Resolve both work; this is what vsdp uses between ibv hosts.
//   - SDP (0x10000|port): Listen fails with ErrNotSupported (mainline kernels
//     bind no user-space listener in that range). Resolve with an SDP service
//     ID resolves the IP address to GIDs and P_Key, then resolves again with
//     AF_IB and the explicit service ID in RDMA_PS_IB, where the CM puts the
//     private data at offset 0 (REQ 92 bytes): the route to a legacy SDP
//     listener. It needs an IB link layer (RDMA_CORE_CAP_AF_IB); on RoCE,
//     including rxe, it fails with ErrNotSupported, and PrivateDataLimits says
//     so.
//
// Queue pairs. The provider creates each queue pair itself (ibv_create_qp;
// the identifier does not own it, so librdmacm never moves it behind the
// provider's back) and moves it through INIT, RTR and RTS with the
// attributes the CM computes (rdma_init_qp_attr), overriding those that
// belong to this side: the RNR NAK timer it advertises (QPOptions.MinRNRTimer,
// at RTR; the CM's default is code 0, 655.36 ms) and its transport and RNR
// retry counts (ConnParam.RetryCount and RNRRetry, at RTS). The IB CM alone
// would give each side the counts the *peer's* REQ or REP carried; this
// provider sends its own values in them too, so a librdmacm peer that lets
// the CM set its queue pair retries as often as this side does. The passive
// side moves to RTR and RTS before sending the REP; the active side does so
// on CONNECT_RESPONSE and then sends the RTU with rdma_establish.
// QueryRetry reports what a queue pair really has, with its local ACK
// timeout, which stays the CM's (on rxe, code 19: 2.1 s, where perftest
// sets 14: 67 ms).
//
// Memory windows: the device cannot be asked whether a window is bound, so
// the provider records what was posted (a bind it predicts the device
// accepts, a local invalidate, a received SEND with invalidate) and MW.Bound
// and MR.Close's busy check follow that record.
//
// Listener backlog: requests beyond ListenOptions.Backlog are refused with
// rdma_reject, which the IB CM sends as a consumer-defined REJ (reason 28);
// librdmacm offers no way to send RejectNoResources.
//
// # Soft-RoCE (rxe, Linux 6.1)
//
// TestVMIbv runs the provider on rdma_rxe in two TCG guests: this package's
// TestGuest tests in one guest (both ends in one process, looped back by
// rxe), the verbstest conformance suite in one process and across the link,
// and SEND/WRITE/READ bandwidth at 4 KiB and 64 KiB plus 64-byte SEND
// latency (polled with Spin and on completion events, perftest's t_avg)
// across the link beside perftest. The provider works around two rxe
// behaviours:
//
//   - WITH_INV: the rxe driver writes the kernel's IB_WC_WITH_INVALIDATE
//     (1<<2) into user completions and librxe passes it on, where
//     libibverbs reads 1<<2 as IBV_WC_IP_CSUM_OK; on rxe (vendor ID
//     0xffffff) a receive completion with that bit is read as WITH_INV.
//   - Receives posted to a queue pair in the error state are not flushed
//     (librxe posts receives without entering the kernel, and only the
//     kernel's responder flushes). After a PostRecv on an rxe queue pair
//     that may be in error (moved there, or a completion of it failed), the
//     provider queries the state and, in ERR, modifies to ERR again, which
//     runs the responder.
//
// Deviations from the IBA it cannot hide, each pinned by a guest test; the
// conformance suite reports them as known skips with their reasons
// (verbstest.Deviations(verbstest.ProviderRXE), verbs/verbstest/deviations.go):
//
//   - Type-2 windows do not bound accesses: rxe checks the region's range
//     only, so a peer reaches past the window's end within the region
//     (TestGuestRXEWindowBounds). Do not rely on windows to fence memory
//     on rxe.
//   - The responder of a refused remote access moves to ERR without
//     IBV_EVENT_QP_ACCESS_ERR (TestGuestErrors/rkey).
//   - Failed data copies complete with LOC_QP_OP_ERR (requester: bad lkey;
//     responder: receive too short or without local write), answered with
//     REM_OP_ERR, where the IBA has LOC_PROT_ERR, LOC_LEN_ERR and
//     REM_INV_REQ_ERR (TestGuestErrors/length).
//   - A send queue takes more requests than the depth reported (16 asked and
//     reported, 31 taken: the ring is rounded up), so ErrQueueFull comes
//     late (TestGuestQueueDepth).
//
// Native IB addressing is not available: rdma_resolve_addr with AF_IB fails
// with ENODEV on rxe (RoCE ports lack RDMA_CORE_CAP_AF_IB), so an SDP
// service ID cannot be reached there (TestGuestSDP).
//
// # Threat model
//
// The peer is untrusted: everything it sends arrives through the kernel and
// the device (completions, CM private data of bounded size, REJ reasons),
// and is copied into Go values before use; private data lengths come from a
// uint8 and are bounded by the 256-byte copy buffer. The caller is trusted
// with memory: an SGE or a registered buffer naming memory the caller does
// not own is the caller's bug, as with libibverbs. A fault is scoped to its
// object: a failed QP reports through Conn.Events and its completions, a
// connection failure fails that Conn's waiters, a broken CM event loop fails
// the Device's pending operations. Nothing panics on peer input.
//
// # Concurrency and lock order
//
// Every object is safe for concurrent use; Close is idempotent and may race
// with anything. Lock order, outermost first: qp.mu (held exclusively only by
// QP.Close), listener.mu, conn.mu, hub.mu, Device.mu (innermost). QP.Close
// takes conn.mu inside qp.mu; nothing takes a qp lock while holding conn.mu.
// C calls made under conn.mu are short kernel calls, never waits. Objects
// close only after their children: Device.Close fails with ErrBusy while any
// PD, CQ, Conn or Listener is open, PD.Close while MRs, MWs or QPs are, and so
// on; a Close that destroys something waits (RWMutex) until no other call on
// it is inside C.
package ibv
