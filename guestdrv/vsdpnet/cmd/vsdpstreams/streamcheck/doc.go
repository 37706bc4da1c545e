// Package streamcheck is the stream-check protocol the VM tests speak
// between guest programs (guestdrv/testdata/vsdpstreams.c through
// libvsdp.so, cmd/vsdpstreams through vsdpnet) and host services, so each
// side can verify the other's bytes without shipping them.
//
// # Protocol
//
// A client opens a stream and sends a 32-byte header, then Up bytes, then
// half-closes (shutdown SHUT_WR). The server sends Down bytes and keeps the
// stream open until its owner releases it (so the host's per-stream
// counters can be read while the stream is still in the table); the client
// reads exactly Down bytes, then EOF. Header (big-endian):
//
//	0  magic "VSC1"
//	4  index  uint32  the stream's number in its plan
//	8  seed   uint64
//	16 up     uint64  1..MaxSize bytes client to server
//	24 down   uint64  1..MaxSize bytes server to client
//
// Content is deterministic: stream i's bytes in direction d are the
// little-endian outputs of splitmix64 started at seed ^ ((2i+d+1) *
// 0xD1B54A32D192ED03), so a receiver checks every byte at its offset, and
// both ends report the SHA-256 of what they sent and received. Sizes come
// from Plan: random sizes from 1 byte to MaxSize drawn from the seed, the
// first stream 1 byte up and MaxSize down, the second the reverse, and each
// direction's total bounded by a budget. The C program implements the same
// functions; TestCInterop holds the two to each other.
//
// Report lines, one per stream, are what the guest programs print:
//
//	stream=I up=N down=M up_sha256=HEX down_sha256=HEX local=A:P remote=A:P
//
// # Threat model
//
// Nothing here is hostile input in production: this is test equipment.
// Still, the parsers check lengths and ranges and return errors (never
// panic) on any input, and every exchange is bounded by its context, the
// sizes a header may carry and the budget of a plan.
//
// # Concurrency
//
// Functions are safe for concurrent use on different connections. Run and
// Serve use one goroutine for the sending half while the caller's goroutine
// receives; both are done when they return.
package streamcheck
