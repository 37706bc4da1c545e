package sdpback

import "github.com/vsdp/vsdp/verbs"

// The interfaces sdpback needs from a guest-facing device (the vsock device
// implements them through a thin adapter in the daemon), so that sdpback
// depends on no device package.

// Payload is guest data handed over by the device: slices of guest memory
// (or a device copy) valid until Release, which gives the guest its credit
// back.
type Payload struct {
	Segs    [][]byte
	Len     int
	Release func()
	// SGL, when set, describes Segs as registered memory of the VM's
	// stack (guest memory, local access only): the bridge then sends it
	// with no host copy.
	SGL []verbs.SGE
}

// Handler is sdpback's side of one guest stream; the device calls it.
type Handler interface {
	// Deliver passes bytes the guest sent. It must not block.
	Deliver(p *Payload)
	// Pull copies host-to-guest bytes into dst and reports eof once the
	// host side finished and everything was pulled.
	Pull(dst [][]byte) (n int, eof bool)
	// Shutdown: the guest will read (rcv) or send (send) no more; abortive
	// means it stopped reading with data unread.
	Shutdown(rcv, send, abortive bool)
	// Reset: the stream is gone on the guest side.
	Reset(err error)
}

// Stream is the device's handle on a guest stream.
type Stream interface {
	// Notify tells the device there may be something to Pull.
	Notify()
	// Reset aborts the stream towards the guest (vsock RST).
	Reset()
	GuestPort() uint32
	HostPort() uint32
}

// Device is what sdpback needs from the guest-facing device: opening a
// stream to a guest port (a guest listener's incoming connection).
type Device interface {
	// Dial opens a stream to guestPort. announce runs with the stream's
	// handle before the guest is asked to accept it; done reports the
	// guest's answer.
	Dial(guestPort uint32, h Handler, announce func(Stream), done func(error)) (Stream, error)
}

// Answer completes a guest's connection attempt: accept with a handler
// (returning the device's stream handle), or refuse.
type Answer interface {
	Accept(h Handler) (Stream, error)
	Refuse()
}
