// Package verbstest is the conformance suite of package verbs: one set of
// cases that every provider must pass — verbs/soft over each transport in
// `go test ./verbs/soft`, and verbs/ibv on soft-RoCE between two guests.
//
// # What it covers
//
// Device description and object lifetimes (parents refuse to close before
// their children, Close is idempotent, nothing leaks); SEND, SEND with
// immediate, inline, solicited and unsignaled sends with several SGEs;
// RDMA WRITE, WRITE with immediate, zero-length WRITE (no rkey check); RDMA
// READ and zero-length READ; type-2 memory windows (bind, access inside,
// past the end, remote invalidation with SEND_WITH_INV, local invalidation,
// rebinding with a new key); RNR with retry 0 (fails at once, the responder
// sees nothing) and 7 (retries until a receive is posted); remote access
// violations for write and read rights, bounds and unknown keys, with both
// sides' outcomes (REM_ACCESS_ERR at the requester; error state,
// EventQPAccessError, flushed receives and unchanged memory at the
// responder); bad lkeys, local bounds and local write rights (LOC_PROT_ERR);
// receives too short (LOC_LEN_ERR and REM_INV_REQ_ERR); a receive into
// memory without local write (LOC_PROT_ERR and REM_OP_ERR); the QP state
// machine (queue full, error and flush, RESET); CQ overflow; disconnect from
// either side; reject with private data, no listener, unreachable address,
// timeout; private data at and over the limits; solicited-only and next
// completion notification; ordering of SENDs and WRITEs under a bounded
// load, checked by SHA-256.
//
// # Running it
//
// Run(t, fabric, cfg) runs each case with both halves in this process; the
// Fabric yields a fresh pair of devices per case. Between two machines (two
// guests with rdma_rxe), run RunPassive on one and RunActive on the other,
// each with its own opened device and the same Config:
//
//	// guest A (passive, fabric address 10.0.0.1):
//	verbstest.RunPassive(t, verbstest.Side{Device: dev, Addr: a}, cfg)
//	// guest B (active):
//	verbstest.RunActive(t, verbstest.Side{Device: dev, Addr: b}, a, cfg)
//
// The halves meet only through the connection manager and the verbs: case i
// uses the service ID cfg.ServiceID(cfg.BasePort+i) (verbs.TCPServiceID for
// rdma-core), the passive half exchanges buffer addresses and keys in REP
// private data or SEND messages, and every case ends with the active half
// disconnecting. The active half retries while the service ID has no
// listener yet, so the two processes need no other synchronisation; start
// the passive one first to save retries. (A refused attempt's QP flushes the
// receives it had posted; the active half drains them before retrying.)
// verbs/soft's TestConformanceTwoHalves runs both halves this way, side by
// side on one device pair, with no signal between them. Two cases coordinate by time: the
// RNR retry 7 case posts its receive after 300 ms, the timeout case holds a
// request for 1.5 s against a 400 ms connect deadline.
//
// # Known deviations
//
// The suite holds each provider's known deviations as data (Deviations:
// provider → case → documented reason; soft-RoCE's in deviations.go).
// Config.Provider names the provider under test; a case on its list is
// reported as a skip whose message starts with KnownDeviationPrefix and
// gives the reason, so a runner sees "known, because ..." instead of
// filtering cases by hand, and every other case must pass. With
// Config.CheckDeviations the deviations run too and must fail: one that
// passes means the list is stale. Expected lists what a provider must pass.
//
// # Design
//
// Each half returns an error instead of calling t.Fatal, so both halves can
// run on goroutines of one test; the runner cancels the other half when one
// fails, and checks Device.Resources after each case. Data is checked by
// content hash against deterministic patterns both processes compute. Every
// loop is bounded by a count and by the case's context. The suite needs
// nothing but the verbs interfaces: no provider-specific hooks, so a
// provider passes or fails it as it is.
//
// # Threat model
//
// Test code: both devices are trusted. The suite itself plays the
// misbehaving peer within the protocol (accesses it has no right to, keys
// that were invalidated, sends with no receive posted); malformed wire
// frames are provider-specific and tested by each provider.
package verbstest
