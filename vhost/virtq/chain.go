package virtq

import (
	"errors"
	"io"
	"os"
	"time"

	"github.com/vsdp/vsdp/vhost/guestmem"
	"golang.org/x/sys/unix"
)

// Chain is one popped descriptor chain: its device-readable bytes (what the
// driver sent) and its device-writable bytes (where the device answers), as
// slices of guest memory. The slices stay valid until the chain is pushed or
// discarded; a device must not keep them after that.
type Chain struct {
	Head     uint16
	readable [][]byte
	writable [][]byte
	rlen     int
	wlen     int
	tbl      *guestmem.Table
	q        *Queue
}

// Readable returns the device-readable segments, in order.
func (c *Chain) Readable() [][]byte { return c.readable }

// Writable returns the device-writable segments, in order.
func (c *Chain) Writable() [][]byte { return c.writable }

// ReadableLen is the total size of the readable segments.
func (c *Chain) ReadableLen() int { return c.rlen }

// WritableLen is the total size of the writable segments.
func (c *Chain) WritableLen() int { return c.wlen }

// Table returns the memory snapshot the chain was translated with; it is
// retained until the chain is pushed, so a caller that needs the chain's
// memory longer (a zero-copy send held until its completion) must Retain it.
func (c *Chain) Table() *guestmem.Table { return c.tbl }

// Reader returns a reader over the readable part.
func (c *Chain) Reader() Reader { return Reader{segs: c.readable, left: c.rlen} }

// Writer returns a writer over the writable part.
func (c *Chain) Writer() Writer { return Writer{segs: c.writable, left: c.wlen} }

// Reader reads a chain's readable bytes without caring how the driver split
// them into descriptors. The zero value reads nothing.
type Reader struct {
	segs [][]byte
	off  int // offset into segs[0]
	left int
	done int
}

// Read implements io.Reader.
func (r *Reader) Read(p []byte) (int, error) {
	if r.left == 0 {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	n := 0
	for n < len(p) && len(r.segs) > 0 {
		k := copy(p[n:], r.segs[0][r.off:])
		n += k
		r.advance(k)
	}
	return n, nil
}

func (r *Reader) advance(k int) {
	r.left -= k
	r.done += k
	r.off += k
	for len(r.segs) > 0 && r.off == len(r.segs[0]) {
		r.segs, r.off = r.segs[1:], 0
	}
}

// Remaining returns the bytes left to read.
func (r *Reader) Remaining() int { return r.left }

// Consumed returns the bytes read so far.
func (r *Reader) Consumed() int { return r.done }

// Skip discards up to n bytes and returns how many it skipped.
func (r *Reader) Skip(n int) int {
	n = min(n, r.left)
	for k := n; k > 0; {
		step := min(k, len(r.segs[0])-r.off)
		r.advance(step)
		k -= step
	}
	return n
}

// Slices appends to dst the guest-memory segments holding the next n bytes
// (fewer if fewer remain) and consumes them: a zero-copy gather.
func (r *Reader) Slices(dst [][]byte, n int) [][]byte {
	n = min(n, r.left)
	for n > 0 {
		step := min(n, len(r.segs[0])-r.off)
		dst = append(dst, r.segs[0][r.off:r.off+step])
		r.advance(step)
		n -= step
	}
	return dst
}

// Writer writes into a chain's writable bytes. Short writes return
// io.ErrShortWrite. The zero value has no room.
type Writer struct {
	segs [][]byte
	off  int
	left int
	done int
}

// Write implements io.Writer.
func (w *Writer) Write(p []byte) (int, error) {
	n := 0
	for n < len(p) && len(w.segs) > 0 {
		k := copy(w.segs[0][w.off:], p[n:])
		n += k
		w.advance(k)
	}
	if n < len(p) {
		return n, io.ErrShortWrite
	}
	return n, nil
}

func (w *Writer) advance(k int) {
	w.left -= k
	w.done += k
	w.off += k
	for len(w.segs) > 0 && w.off == len(w.segs[0]) {
		w.segs, w.off = w.segs[1:], 0
	}
}

// Available returns the room left.
func (w *Writer) Available() int { return w.left }

// Written returns the bytes written so far: the used length to push.
func (w *Writer) Written() int { return w.done }

// Slices appends the guest-memory segments for the next n bytes of room
// (fewer if less remains) and counts them as written: a zero-copy scatter
// target (for example an RDMA READ straight into guest buffers). The caller
// must fill them before pushing the chain.
func (w *Writer) Slices(dst [][]byte, n int) [][]byte {
	n = min(n, w.left)
	for n > 0 {
		step := min(n, len(w.segs[0])-w.off)
		dst = append(dst, w.segs[0][w.off:w.off+step])
		w.advance(step)
		n -= step
	}
	return dst
}

// Kicker waits for kicks on a ring's kick eventfd through Go's netpoller:
// no OS thread blocks, and Stop wakes a waiter without another kick.
type Kicker struct {
	f *os.File
}

// NewKicker takes ownership of an eventfd.
func NewKicker(fd int) (*Kicker, error) {
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return &Kicker{f: os.NewFile(uintptr(fd), "vring-kick")}, nil
}

// Wait blocks until the eventfd is signalled (consuming the count) or Stop
// is called (ErrStopped).
func (k *Kicker) Wait() error {
	var b [8]byte
	_, err := k.f.Read(b[:])
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, os.ErrClosed) {
			return ErrStopped
		}
		return err
	}
	return nil
}

// Stop makes current and future Waits return ErrStopped. Idempotent.
func (k *Kicker) Stop() { _ = k.f.SetReadDeadline(time.Unix(1, 0)) }

// Close stops and closes the eventfd. Idempotent.
func (k *Kicker) Close() { k.Stop(); _ = k.f.Close() }

// File returns the underlying file (for tests).
func (k *Kicker) File() *os.File { return k.f }

// Signal writes 1 to an eventfd file (a call or err notification).
func Signal(f *os.File) { signal(f) }
