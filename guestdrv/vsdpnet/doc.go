// Package vsdpnet gives guest Go programs TCP-shaped Dial and Listen over
// the vsdp device: the same control protocol (guestdrv/ctl) that
// libvsdp.so speaks for C programs, which an LD_PRELOAD library cannot
// reach in a Go binary.
//
//	c, err := vsdpnet.Dial("tcp", "10.1.0.7:5000")   // a net.Conn
//	ln, err := vsdpnet.Listen("tcp", ":5000")        // a net.Listener
//
// # Design
//
// A Client holds one control connection (an AF_VSOCK stream to the host's
// control port), opened on first use with HELLO and reopened, after a
// one-second pause, when it breaks. Dial sends DIAL and follows the answer:
// TICKET connects a new vsock stream to the ticket's port, LOCAL dials the
// guest's own TCP stack, DENY fails with the host's errno. Listen binds a
// vsock port, registers it with LISTEN, and Accept pairs each connection
// with the host's PEER note (or asks WHO). Every stream is its own vsock
// socket, wrapped in an *os.File in non-blocking mode, so reads, writes,
// accepts and connects wait in Go's netpoller, deadlines work, and Close
// unblocks them; no goroutine sits in a blocking system call.
//
// Nothing reads the control connection in the background. A call that needs
// the host takes the connection's lock and reads frames until it has its
// answer, filing RESULT, PEER and RESET as notes for others. The host sends
// each note before the stream event it explains, so a note is readable by
// the time the event is seen; callers still wait a bounded time.
//
// # Errors
//
// Errors are what package net returns for TCP: *net.OpError wrapping an
// *os.SyscallError with the Linux errno (errors.Is(err,
// syscall.ECONNREFUSED) works), net.ErrClosed after Close, and deadline
// errors that are net.Errors with Timeout() true. A vsock RST on an
// established stream reads as EOF in the guest; when the host announced it
// with RESET, Read and Write report that errno (ECONNRESET) instead, once
// each. ErrNoDevice wraps failures to reach the control service;
// ErrProtocol marks a host that broke the protocol.
//
// # Test transport
//
// Options.UnixDir (or VSDP_TEST_UNIX_DIR) and Options.TCPPort (or
// VSDP_TEST_TCP_PORT) replace AF_VSOCK by AF_UNIX sockets in a directory or
// by TCP on 127.0.0.1, with the layout guestdrv.FakeHost serves: control at
// DIR/ctl, host port P at DIR/host-P, a listener on port Q at DIR/guest-Q,
// a dialer bound to DIR/g-N. Only the address family differs from vsock.
//
// # Threat model
//
// The host is trusted to route, but its frames are still checked: a
// malformed frame or a host-to-guest reply of the wrong type closes the
// control connection (the pending call fails with ErrProtocol); errno values
// outside 1..4095 are replaced. Nothing the host sends can make the package
// panic or block beyond Options.Timeout.
//
// # Concurrency
//
// A Client, its Conns and Listeners are safe for concurrent use. Lock
// order: Client.mu (the control connection) before a Conn's mu; no lock is
// held across a data read or write.
package vsdpnet
