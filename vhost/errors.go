package vhost

import (
	"errors"
	"fmt"
)

// Sentinel errors. Errors returned by this package wrap one of them.
var (
	// ErrProtocol: a message is malformed (size, fd count, flags, version)
	// or the stream cannot be parsed any more.
	ErrProtocol = errors.New("vhost: protocol violation")
	// ErrUnsupported: the request is unknown, not implemented, or gated by
	// a feature that was not negotiated.
	ErrUnsupported = errors.New("vhost: request not supported")
	// ErrInvalid: a value in a well-formed message is out of range (a queue
	// index, a ring size, feature bits never offered, a bad region).
	ErrInvalid = errors.New("vhost: invalid value")
	// ErrState: the request is not allowed in the current state (for
	// example reconfiguring a running ring).
	ErrState = errors.New("vhost: request not allowed now")
	// ErrClosed: the server was closed.
	ErrClosed = errors.New("vhost: server closed")
)

// MessageError reports a message that was rejected or whose handler failed.
// Err wraps one of the sentinels (and, where one exists, the cause from
// guestmem, virtq or the device).
type MessageError struct {
	Request Request
	Err     error
}

func (e *MessageError) Error() string { return fmt.Sprintf("vhost: %s: %v", e.Request, e.Err) }

func (e *MessageError) Unwrap() error { return e.Err }

func msgErr(req Request, sentinel error, format string, args ...any) *MessageError {
	return &MessageError{Request: req, Err: fmt.Errorf("%w: %s", sentinel, fmt.Sprintf(format, args...))}
}

// RingError reports a ring that broke while running: the driver corrupted
// it, the device failed on it, or its kick fd failed. Err wraps the cause
// (virtq.ErrBroken for a corrupt ring).
type RingError struct {
	Queue int
	Err   error
}

func (e *RingError) Error() string { return fmt.Sprintf("vhost: queue %d broken: %v", e.Queue, e.Err) }

func (e *RingError) Unwrap() error { return e.Err }
