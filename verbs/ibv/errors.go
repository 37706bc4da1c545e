//go:build linux && cgo

package ibv

import (
	"errors"
	"fmt"
	"syscall"

	"github.com/vsdp/vsdp/verbs"
)

// Error is a failed libibverbs or librdmacm call: the C function, the errno
// it left, and the verbs sentinel that errno maps to. errors.Is matches both
// the sentinel and the syscall.Errno.
type Error struct {
	Op    string // the C function, "ibv_reg_mr"
	Errno syscall.Errno
	Err   error // a verbs sentinel
}

func (e *Error) Error() string {
	return fmt.Sprintf("ibv: %s: %v", e.Op, e.Errno)
}

// Unwrap returns the sentinel and the errno.
func (e *Error) Unwrap() []error { return []error{e.Err, e.Errno} }

// errnoSentinel maps an errno to the verbs sentinel a caller tests for. This
// is the one place errno values are interpreted.
func errnoSentinel(e syscall.Errno) error {
	switch e {
	case syscall.EINVAL, syscall.ERANGE, syscall.E2BIG, syscall.EFAULT:
		return verbs.ErrInvalid
	case syscall.ENOMEM, syscall.ENOBUFS, syscall.ENOSPC, syscall.EAGAIN:
		return verbs.ErrQueueFull
	case syscall.EBUSY, syscall.EADDRINUSE, syscall.EEXIST:
		return verbs.ErrBusy
	case syscall.ENODEV, syscall.ENOSYS, syscall.EOPNOTSUPP, syscall.EPROTONOSUPPORT,
		syscall.EAFNOSUPPORT, syscall.ENXIO:
		return verbs.ErrNotSupported
	case syscall.ENETUNREACH, syscall.EHOSTUNREACH, syscall.EADDRNOTAVAIL, syscall.ENETDOWN:
		return verbs.ErrUnreachable
	case syscall.ETIMEDOUT:
		return verbs.ErrTimeout
	case syscall.ECONNREFUSED:
		return verbs.ErrRefused
	case syscall.ECONNRESET, syscall.ECONNABORTED, syscall.ENOTCONN, syscall.EPIPE:
		return verbs.ErrDisconnected
	case syscall.EBADF:
		return verbs.ErrClosed
	case syscall.EPROTO:
		return verbs.ErrProtocol
	}
	return verbs.ErrNotSupported
}

// callErr builds an *Error from the errno a C call left (err from the
// two-value cgo form, or a returned errno value). A call that failed without
// setting errno reports EIO.
func callErr(op string, err error) error {
	var e syscall.Errno
	if !errors.As(err, &e) || e == 0 {
		e = syscall.EIO
	}
	return &Error{Op: op, Errno: e, Err: errnoSentinel(e)}
}

// rcErr builds an *Error from a call that returns its errno (ibv_post_send,
// ibv_modify_qp and the like); a negative value is taken as -errno.
func rcErr(op string, rc int) error {
	if rc < 0 {
		rc = -rc
	}
	return callErr(op, syscall.Errno(rc))
}

// statusErr builds the error of a connection manager event whose status is a
// negative errno.
func statusErr(op string, status int) error {
	if status == 0 {
		status = -int(syscall.EIO)
	}
	return rcErr(op, status)
}
