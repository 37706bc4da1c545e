// Package fabric builds soft-provider SDP fabrics for sdpback's tests: one
// pure-Go verbs device and one SDP stack per host, all joined by an
// in-process network and a shared address table, torn down when the test
// ends with each device checked for leaked verbs objects.
//
// Design: Stacks is the whole API. It serves tests that need several
// stacks on one fabric (a host that exports services, a VM's stack, a
// remote peer) and nothing else: each caller builds its own VM, device or
// filesystem on top and registers its cleanup after Stacks, so that (the
// testing package runs cleanups last-in first-out) those close before the
// stacks and devices do.
//
// Threat model: test-only; every input comes from the test itself.
// Failures end the test through testing.TB; the package never logs.
//
// Concurrency: call Stacks from the test goroutine. The stacks it returns
// are as safe for concurrent use as sdp.Stack is. No locks of its own.
package fabric
