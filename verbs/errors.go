package verbs

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
)

// Sentinel errors. Providers wrap them (with %w) so callers test with
// errors.Is; typed errors below carry detail.
var (
	// ErrNotSupported: the provider cannot do this (for example bind a
	// listener to an SDP service ID through the RDMA CM).
	ErrNotSupported = errors.New("verbs: not supported")
	// ErrInvalid: an argument is out of range or inconsistent (EINVAL).
	ErrInvalid = errors.New("verbs: invalid argument")
	// ErrClosed is net.ErrClosed: the object (or its device) is closed.
	ErrClosed = net.ErrClosed
	// ErrBusy: the object still has children, or the address is in use.
	ErrBusy = errors.New("verbs: resource busy")
	// ErrQPState: the operation is not allowed in the queue pair's state.
	ErrQPState = errors.New("verbs: invalid queue pair state")
	// ErrQueueFull: a post would exceed the work queue's depth (ENOMEM).
	ErrQueueFull = errors.New("verbs: work queue full")
	// ErrCQOverflow: completions were lost because the CQ was full; the CQ
	// and the queue pairs that lost completions are unusable.
	ErrCQOverflow = errors.New("verbs: completion queue overflow")
	// ErrRefused: the peer rejected the connection, or nothing listens on
	// the service ID (ECONNREFUSED). See *RejectError for which.
	ErrRefused = errors.New("verbs: connection refused")
	// ErrUnreachable: no route to the fabric address (ENETUNREACH).
	ErrUnreachable = errors.New("verbs: fabric address unreachable")
	// ErrTimeout: the peer did not answer in time (ETIMEDOUT).
	ErrTimeout = errors.New("verbs: connection timed out")
	// ErrDisconnected: the connection is gone.
	ErrDisconnected = errors.New("verbs: disconnected")
	// ErrProtocol: the peer broke the transport or CM protocol; the
	// connection was reset.
	ErrProtocol = errors.New("verbs: peer protocol violation")
	// ErrCompletion: a work request completed with an error status.
	ErrCompletion = errors.New("verbs: work request failed")
)

// CompletionError is a completion whose status is not success.
type CompletionError struct {
	Completion Completion
}

func (e *CompletionError) Error() string {
	c := e.Completion
	return fmt.Sprintf("verbs: work request %d on qp %d completed with %v", c.ID, c.QPN, c.Status)
}

// Unwrap returns ErrCompletion.
func (e *CompletionError) Unwrap() error { return ErrCompletion }

// PostError reports a post that failed at work request Index: the requests
// before it were posted, it and the ones after were not (bad_wr in
// ibv_post_send).
type PostError struct {
	Index int
	Err   error
}

func (e *PostError) Error() string {
	return fmt.Sprintf("verbs: post failed at work request %d: %v", e.Index, e.Err)
}

func (e *PostError) Unwrap() error { return e.Err }

// RejectError is a refused connection: a REJ from the peer (Reason, with its
// private data) or no listener (RejectInvalidServiceID).
type RejectError struct {
	Reason      RejectReason
	PrivateData []byte
}

func (e *RejectError) Error() string {
	if len(e.PrivateData) > 0 {
		return fmt.Sprintf("verbs: connection rejected: %v (%d bytes of private data)", e.Reason, len(e.PrivateData))
	}
	return fmt.Sprintf("verbs: connection rejected: %v", e.Reason)
}

// Unwrap returns ErrRefused.
func (e *RejectError) Unwrap() error { return ErrRefused }

// PrivateDataError is private data longer than a CM message can carry.
type PrivateDataError struct {
	Msg   string // "REQ", "REP" or "REJ"
	Len   int
	Limit int
}

func (e *PrivateDataError) Error() string {
	return fmt.Sprintf("verbs: %d bytes of %s private data exceed the limit of %d", e.Len, e.Msg, e.Limit)
}

// Unwrap returns ErrInvalid.
func (e *PrivateDataError) Unwrap() error { return ErrInvalid }

// AddrError is a resolution failure for a fabric address.
type AddrError struct {
	Addr netip.Addr
	Err  error // ErrUnreachable or another sentinel, possibly wrapping a cause
}

func (e *AddrError) Error() string { return fmt.Sprintf("verbs: address %v: %v", e.Addr, e.Err) }

func (e *AddrError) Unwrap() error { return e.Err }

// BusyError is a Close refused because children are still open.
type BusyError struct {
	Object   string // "device", "pd", "cq", "mr", "conn"
	Children string // what is still open
}

func (e *BusyError) Error() string {
	return fmt.Sprintf("verbs: cannot close %s: %s still open", e.Object, e.Children)
}

// Unwrap returns ErrBusy.
func (e *BusyError) Unwrap() error { return ErrBusy }
