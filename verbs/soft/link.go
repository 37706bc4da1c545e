package soft

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"

	"github.com/vsdp/vsdp/verbs"
)

// chunkSize bounds one copy step: the stream buffers, and how much memory is
// copied while a connection's lock is held.
const chunkSize = 64 << 10

// maxPipeFrames bounds an in-process link's queue. Honest peers stay far
// below it (requests are bounded by queue depths); beyond it the link fails.
const maxPipeFrames = 4 * maxQueueDepth

var (
	errLinkClosed = errors.New("soft: link closed")
	// errSourceGone: a region being read for the wire was deregistered.
	errSourceGone = errors.New("soft: source memory region deregistered")
)

// outFrame is a frame to send: a header and its payload, gathered at send
// time from owned bytes (private data, inline data) and then from region
// segments.
type outFrame struct {
	h    header
	data []byte
	segs []segment
}

func (f *outFrame) payloadLen() uint64 {
	n := uint64(len(f.data))
	for _, s := range f.segs {
		n += s.n
	}
	return n
}

// link carries frames between the two ends of one connection. send is called
// by one goroutine at a time, recv by one goroutine at a time; close may be
// called from anywhere.
type link interface {
	// send transmits frames in order.
	send(fs []outFrame) error
	// recv returns the next frame. Its payload must be consumed or
	// discarded before the next recv.
	recv() (header, payload, error)
	// close shuts the link: frames already sent are still delivered, then
	// the peer's recv fails. Idempotent.
	close()
	// abort shuts the link at once, discarding frames in flight (a dropped
	// link).
	abort()
}

// payload is the body of a received frame, consumed in chunks so that the
// engine copies into registered memory only under its lock and never holds
// the lock while waiting for the wire.
type payload interface {
	remaining() uint64
	// peek blocks until the next chunk, of at most max bytes, is available.
	peek(max int) (chunk, error)
	// advance consumes n bytes of the last chunk.
	advance(n int)
	// discard drops the rest of the payload.
	discard() error
}

// chunk is a piece of payload: bytes, or a piece of a source region (an
// in-process peer's memory, copied straight into the destination).
type chunk struct {
	b   []byte
	src *mr
	off uint64
	n   int
}

// copyTo copies the chunk into dst at off. It reports which side failed when
// a region was deregistered under it.
func (c chunk) copyTo(dst *mr, off uint64) (srcOK, dstOK bool) {
	if !dst.acquire() {
		return true, false
	}
	defer dst.release()
	if c.src == nil {
		copy(dst.mem[off:off+uint64(c.n)], c.b)
		return true, true
	}
	if !c.src.acquire() {
		return false, true
	}
	copy(dst.mem[off:off+uint64(c.n)], c.src.mem[c.off:c.off+uint64(c.n)])
	c.src.release()
	c.src.nread.Add(uint64(c.n))
	return true, true
}

// readPayload reads a small payload (private data) whole.
func readPayload(p payload, max int) ([]byte, error) {
	n := p.remaining()
	if n > uint64(max) {
		return nil, fmt.Errorf("%w: %d bytes of private data", verbs.ErrProtocol, n)
	}
	out := make([]byte, 0, n)
	for p.remaining() > 0 {
		c, err := p.peek(int(p.remaining()))
		if err != nil {
			return nil, err
		}
		if c.src != nil {
			if !c.src.acquire() {
				return nil, errSourceGone
			}
			out = append(out, c.src.mem[c.off:c.off+uint64(c.n)]...)
			c.src.release()
		} else {
			out = append(out, c.b...)
		}
		p.advance(c.n)
	}
	return out, nil
}

// ---- in-process transport ----

type pipeQueue struct {
	mu     sync.Mutex
	cond   sync.Cond
	frames []outFrame
	head   int
	closed bool
}

func newPipeQueue() *pipeQueue {
	q := &pipeQueue{}
	q.cond.L = &q.mu
	return q
}

// pipeEnd is one end of an in-process link. Payload is not copied on send:
// the receiver copies straight from the sender's registered memory (as a
// DMA engine would), so the in-process transport adds no copies of its own.
// Owned bytes and the segment list are copied, because the sender reuses
// its slots.
type pipeEnd struct {
	in, out *pipeQueue
	cur     pipePayload
}

func newPipe() (*pipeEnd, *pipeEnd) {
	a, b := newPipeQueue(), newPipeQueue()
	return &pipeEnd{in: a, out: b}, &pipeEnd{in: b, out: a}
}

func (p *pipeEnd) send(fs []outFrame) error {
	q := p.out
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return errLinkClosed
	}
	if len(q.frames)-q.head+len(fs) > maxPipeFrames {
		return fmt.Errorf("soft: in-process link queue above %d frames", maxPipeFrames)
	}
	for _, f := range fs {
		if len(f.data) > 0 {
			f.data = append([]byte(nil), f.data...)
		}
		if len(f.segs) > 0 {
			f.segs = append([]segment(nil), f.segs...)
		}
		q.frames = append(q.frames, f)
	}
	q.cond.Signal()
	return nil
}

func (p *pipeEnd) recv() (header, payload, error) {
	q := p.in
	q.mu.Lock()
	for q.head == len(q.frames) && !q.closed {
		q.cond.Wait()
	}
	if q.head == len(q.frames) {
		q.mu.Unlock()
		return header{}, nil, io.EOF
	}
	f := q.frames[q.head]
	q.frames[q.head] = outFrame{}
	q.head++
	if q.head == len(q.frames) {
		q.frames, q.head = q.frames[:0], 0
	} else if q.head > 1024 && q.head*2 > len(q.frames) {
		n := copy(q.frames, q.frames[q.head:])
		clear(q.frames[n:])
		q.frames, q.head = q.frames[:n], 0
	}
	q.mu.Unlock()
	p.cur = pipePayload{f: f, rem: f.payloadLen()}
	return f.h, &p.cur, nil
}

func (p *pipeEnd) close() {
	for _, q := range []*pipeQueue{p.in, p.out} {
		q.mu.Lock()
		q.closed = true
		q.cond.Broadcast()
		q.mu.Unlock()
	}
}

func (p *pipeEnd) abort() {
	for _, q := range []*pipeQueue{p.in, p.out} {
		q.mu.Lock()
		q.closed = true
		clear(q.frames)
		q.frames, q.head = nil, 0
		q.cond.Broadcast()
		q.mu.Unlock()
	}
}

type pipePayload struct {
	f   outFrame
	di  int    // position in f.data
	si  int    // segment index
	so  uint64 // offset within segment si
	rem uint64
}

func (p *pipePayload) remaining() uint64 { return p.rem }

func (p *pipePayload) peek(max int) (chunk, error) {
	if p.rem == 0 || max <= 0 {
		return chunk{}, nil
	}
	if p.di < len(p.f.data) {
		n := min(max, len(p.f.data)-p.di)
		return chunk{b: p.f.data[p.di : p.di+n], n: n}, nil
	}
	for p.si < len(p.f.segs) && p.so == p.f.segs[p.si].n {
		p.si, p.so = p.si+1, 0
	}
	s := p.f.segs[p.si]
	n := int(min(uint64(max), s.n-p.so))
	return chunk{src: s.m, off: s.off + p.so, n: n}, nil
}

func (p *pipePayload) advance(n int) {
	p.rem -= uint64(n)
	if p.di < len(p.f.data) {
		p.di += n
		return
	}
	p.so += uint64(n)
}

func (p *pipePayload) discard() error {
	p.rem = 0
	return nil
}

// ---- stream transport (TCP or Unix socket) ----

// streamLink frames a byte stream. Everything read from it is untrusted: the
// header decoder validates each field, payloads are consumed in bounded
// chunks, and no length from the peer sizes an allocation.
type streamLink struct {
	nc     net.Conn
	br     *bufio.Reader
	maxMsg uint64
	stats  *devStats
	// progress, if set, is called whenever a flush got bytes out (a
	// connection's ack timeout counts it as progress). Set before use.
	progress func()

	wbuf []byte // writer staging, one writer at a time
	hb   [headerLen]byte
	cur  streamPayload

	closeOnce sync.Once
}

func newStreamLink(nc net.Conn, maxMsg uint64, stats *devStats) *streamLink {
	l := &streamLink{
		nc:     nc,
		br:     bufio.NewReaderSize(nc, chunkSize),
		maxMsg: maxMsg,
		stats:  stats,
		wbuf:   make([]byte, 0, chunkSize),
	}
	l.cur.l = l
	return l
}

func (l *streamLink) flush() error {
	if len(l.wbuf) == 0 {
		return nil
	}
	_, err := l.nc.Write(l.wbuf)
	l.wbuf = l.wbuf[:0]
	if err == nil && l.progress != nil {
		l.progress()
	}
	return err
}

func (l *streamLink) send(fs []outFrame) error {
	for i := range fs {
		f := &fs[i]
		if cap(l.wbuf)-len(l.wbuf) < headerLen {
			if err := l.flush(); err != nil {
				return err
			}
		}
		n := len(l.wbuf)
		l.wbuf = l.wbuf[:n+headerLen]
		f.h.put(l.wbuf[n:])
		data := f.data
		for len(data) > 0 {
			if len(l.wbuf) == cap(l.wbuf) {
				if err := l.flush(); err != nil {
					return err
				}
			}
			k := min(len(data), cap(l.wbuf)-len(l.wbuf))
			l.wbuf = append(l.wbuf, data[:k]...)
			data = data[k:]
		}
		for _, s := range f.segs {
			off, rem := s.off, s.n
			for rem > 0 {
				if len(l.wbuf) == cap(l.wbuf) {
					if err := l.flush(); err != nil {
						return err
					}
				}
				k := min(rem, uint64(cap(l.wbuf)-len(l.wbuf)))
				if !s.m.acquire() {
					return errSourceGone
				}
				l.wbuf = append(l.wbuf, s.m.mem[off:off+k]...)
				s.m.release()
				s.m.nread.Add(k)
				l.stats.stagedBytes.Add(k)
				off += k
				rem -= k
			}
		}
	}
	return l.flush()
}

func (l *streamLink) recv() (header, payload, error) {
	if l.cur.rem > 0 {
		if err := l.cur.discard(); err != nil {
			return header{}, nil, err
		}
	}
	if _, err := io.ReadFull(l.br, l.hb[:]); err != nil {
		return header{}, nil, err
	}
	h, err := decodeHeader(l.hb[:], l.maxMsg)
	if err != nil {
		return header{}, nil, err
	}
	l.cur.rem = uint64(h.length)
	return h, &l.cur, nil
}

func (l *streamLink) close() {
	l.closeOnce.Do(func() { l.nc.Close() })
}

func (l *streamLink) abort() {
	l.closeOnce.Do(func() {
		if tc, ok := l.nc.(*net.TCPConn); ok {
			tc.SetLinger(0) //nolint:errcheck // best effort: reset instead of FIN
		}
		l.nc.Close()
	})
}

type streamPayload struct {
	l   *streamLink
	rem uint64
}

func (p *streamPayload) remaining() uint64 { return p.rem }

func (p *streamPayload) peek(max int) (chunk, error) {
	if p.rem == 0 || max <= 0 {
		return chunk{}, nil
	}
	n := int(min(p.rem, uint64(max), uint64(p.l.br.Size())))
	b, err := p.l.br.Peek(n)
	if len(b) < n {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return chunk{}, err
	}
	return chunk{b: b, n: n}, nil
}

func (p *streamPayload) advance(n int) {
	p.l.br.Discard(n) //nolint:errcheck // the bytes were peeked
	p.rem -= uint64(n)
	p.l.stats.stagedBytes.Add(uint64(n))
}

func (p *streamPayload) discard() error {
	for p.rem > 0 {
		k := int(min(p.rem, uint64(p.l.br.Size())))
		n, err := p.l.br.Discard(k)
		p.rem -= uint64(n)
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return err
		}
	}
	return nil
}
