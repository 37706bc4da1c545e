// Package agent is the guest side of the vmtest agent protocol (package
// proto): it runs programs, and reads and writes files, on behalf of the
// host. The vmtest/agent command serves it on a virtio-serial port in the guest;
// tests serve it over in-memory pipes on the host.
//
// # Threat model
//
// The host is trusted (it owns the VM); the channel is not assumed clean:
// frames are checked by proto.ReadFrame, requests by their Validate methods,
// and a bad request is answered with an error, never a crash. Every program
// runs in its own process group with a timeout; on timeout or cancel the
// whole group is killed. Output kept per program is bounded; concurrent
// requests are bounded by MaxRunning.
//
// # Concurrency
//
// Serve reads frames in its own goroutine and runs each request in a
// goroutine of its own. Replies are written whole under Server.wmu. The map
// of running programs is guarded by Server.mu. Lock order: mu, then wmu
// (never held together in practice).
package agent
