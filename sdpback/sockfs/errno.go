package sockfs

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// errnoOf converts an error to the guest's errno: the one place where
// errors become errno. def is used when err carries none.
func errnoOf(err error, def syscall.Errno) syscall.Errno {
	var en syscall.Errno
	switch {
	case err == nil:
		return 0
	case errors.Is(err, ErrCtl):
		return syscall.EINVAL
	case errors.As(err, &en) && en != 0:
		return en
	case errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, context.DeadlineExceeded):
		return syscall.ETIMEDOUT
	case errors.Is(err, context.Canceled):
		return syscall.EINTR
	case errors.Is(err, net.ErrClosed):
		return syscall.EPIPE
	case errors.Is(err, io.ErrUnexpectedEOF):
		return syscall.ECONNRESET
	}
	return def
}

func status(e syscall.Errno) fuse.Status { return fuse.Status(e) }
