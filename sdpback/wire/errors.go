package wire

import (
	"errors"
	"fmt"
)

// Sentinel errors. Every error the package returns is an *Error wrapping
// exactly one of them (or io.ErrShortBuffer for a too-small caller buffer),
// so callers test with errors.Is.
var (
	// ErrTruncated: the bytes end before the header their MID (or
	// format) needs.
	ErrTruncated = errors.New("wire: truncated")
	// ErrLength: a length disagrees with another: the BSDH len field
	// with the received byte count, payload on a MID that carries none,
	// private data of the wrong size, a message longer than 2^32-1.
	ErrLength = errors.New("wire: length mismatch")
	// ErrMID: a reserved MID, or a defined MID where it cannot appear
	// (Hello/HelloAck in a SEND, a stream MID in CM private data).
	ErrMID = errors.New("wire: unknown or misplaced MID")
	// ErrField: a field holds a value the protocol forbids (reserved
	// bits set, zero where a positive value is required, an address
	// range that wraps, a field the MID does not use set on encode).
	ErrField = errors.New("wire: invalid field")
	// ErrVersion: a Hello/HelloAck major version other than 2, or a
	// compact-Hello format this package does not know.
	ErrVersion = errors.New("wire: unsupported version")
)

// Error describes one rejected message: which field broke which rule.
type Error struct {
	MID    MID    // the message's MID (as read, for decode errors)
	Field  string // wire field, e.g. "bsdh.len", "srcah.len", "hh.maxadverts"
	Value  uint64 // the offending value
	Reason string // the rule, in words
	Err    error  // one of the sentinels
}

func (e *Error) Error() string {
	return fmt.Sprintf("%v: %v %s=%d: %s", e.Err, e.MID, e.Field, e.Value, e.Reason)
}

// Unwrap returns the sentinel.
func (e *Error) Unwrap() error { return e.Err }

func fail(sentinel error, mid MID, field string, v uint64, reason string) error {
	return &Error{MID: mid, Field: field, Value: v, Reason: reason, Err: sentinel}
}
