package verbs

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// PollFD waits for a file descriptor to become readable through Go's
// netpoller, so a waiting goroutine holds no OS thread: soft waits on an
// eventfd, ibv on a completion channel. Wait admits one waiter at a time.
type PollFD struct {
	f      *os.File
	mu     sync.Mutex // serialises waiters: the read deadline is per file
	closed atomic.Bool
}

// NewPollFD takes ownership of fd, sets it non-blocking and registers it with
// the netpoller.
func NewPollFD(fd int, name string) (*PollFD, error) {
	if err := unix.SetNonblock(fd, true); err != nil {
		return nil, fmt.Errorf("verbs: set non-blocking: %w", err)
	}
	f := os.NewFile(uintptr(fd), name)
	if f == nil {
		return nil, fmt.Errorf("%w: bad file descriptor %d", ErrInvalid, fd)
	}
	return &PollFD{f: f}, nil
}

var longAgo = time.Unix(1, 0)

// Wait calls consume with the descriptor whenever it may be readable, until
// consume reports that it took an event (true) or fails. consume must not
// block: it reads the non-blocking descriptor and returns false on EAGAIN.
// Wait returns ctx.Err() when the context ends first, and ErrClosed when the
// PollFD is closed.
func (p *PollFD) Wait(ctx context.Context, consume func(fd int) (bool, error)) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	rc, err := p.f.SyscallConn()
	if err != nil {
		return p.normErr(err)
	}
	if err := p.f.SetReadDeadline(time.Time{}); err != nil {
		return p.normErr(err)
	}
	if ctx.Done() != nil {
		fired := make(chan struct{})
		stop := context.AfterFunc(ctx, func() {
			p.f.SetReadDeadline(longAgo) //nolint:errcheck // closed file: Read fails anyway
			close(fired)
		})
		defer func() {
			if !stop() {
				<-fired
			}
		}()
	}
	var cerr error
	err = rc.Read(func(fd uintptr) bool {
		var ok bool
		ok, cerr = consume(int(fd))
		return ok || cerr != nil
	})
	if cerr != nil {
		return cerr
	}
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) && ctx.Err() != nil {
			return ctx.Err()
		}
		return p.normErr(err)
	}
	return nil
}

// ReadEventFD is a consume function for Wait over an eventfd: it reads and
// clears the counter.
func ReadEventFD(fd int) (bool, error) {
	var b [8]byte
	n, err := unix.Read(fd, b[:])
	switch {
	case err == unix.EAGAIN || err == unix.EINTR:
		return false, nil
	case err != nil:
		return false, fmt.Errorf("verbs: read eventfd: %w", err)
	case n != 8:
		return false, fmt.Errorf("verbs: short eventfd read of %d bytes", n)
	}
	return true, nil
}

// Close closes the descriptor, waking a waiter with ErrClosed. Idempotent.
func (p *PollFD) Close() error {
	p.closed.Store(true)
	err := p.f.Close()
	if errors.Is(err, fs.ErrClosed) {
		return nil
	}
	return err
}

// Control runs f with the descriptor while the PollFD cannot be closed
// under it (for a provider's eventfd signal). It returns ErrClosed after
// Close.
func (p *PollFD) Control(f func(fd int)) error {
	rc, err := p.f.SyscallConn()
	if err != nil {
		return p.normErr(err)
	}
	return p.normErr(rc.Control(func(fd uintptr) { f(int(fd)) }))
}

// WriteEventFD adds one to an eventfd counter; use it with Control.
func WriteEventFD(fd int) error {
	var b [8]byte
	binary.NativeEndian.PutUint64(b[:], 1)
	_, err := unix.Write(fd, b[:])
	if err == unix.EAGAIN {
		return nil // the counter is saturated: a wake-up is pending anyway
	}
	return err
}

// normErr reports errors of a closed descriptor as ErrClosed (the raw
// connection's own error for it is not fs.ErrClosed).
func (p *PollFD) normErr(err error) error {
	if err == nil {
		return nil
	}
	if p.closed.Load() || errors.Is(err, fs.ErrClosed) {
		return fmt.Errorf("%w: %w", ErrClosed, err)
	}
	return err
}
