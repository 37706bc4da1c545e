package sdpback

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/vsdp/vsdp/sdpback/sdp"
	"github.com/vsdp/vsdp/verbs"
)

// Path says how a stream leaves the host.
type Path string

// Paths.
const (
	PathSDP     Path = "sdp"
	PathHostTCP Path = "tcp"
)

// StreamStats are one stream's counters, reported by the daemon.
type StreamStats struct {
	Path                Path
	Local, Remote       netip.AddrPort
	GuestPort, HostPort uint32
	FromGuest, ToGuest  uint64 // payload bytes
}

// bridge joins one guest stream to one fabric (SDP) or host TCP connection.
//
// Guest to fabric: payloads queue (bounded by the guest's vsock credit) and
// a writer goroutine writes them to the connection, releasing each when
// written. Fabric to guest: for SDP the device pulls straight from the
// engine's receive buffers into guest memory (ReadTo: one copy); for TCP a
// reader goroutine fills a bounded buffer the device pulls from.
type bridge struct {
	vm     *VM
	path   Path
	conn   net.Conn
	sdp    *sdp.Conn // nil for host TCP
	stream Stream
	local  netip.AddrPort
	remote netip.AddrPort

	mu        sync.Mutex
	cond      *sync.Cond
	q         []*Payload
	guestEOF  bool   // guest sent SHUTDOWN(send)
	rcvShut   bool   // guest sent SHUTDOWN(rcv)
	wgen      uint64 // bumped by the engine's writable callback
	wrDone    bool   // the writer finished its half
	abort     bool
	closed    bool
	rbuf      []byte // TCP path: received, not pulled
	readEOF   bool
	readErr   error
	resetSent bool

	fromGuest, toGuest atomic.Uint64
}

const tcpPullBuf = 256 << 10

// resetFlushWait bounds how long a stream's RST waits for its RESET
// message to reach the guest (a guest not reading its control connection
// gets the RST anyway).
const resetFlushWait = 500 * time.Millisecond

func newBridge(vm *VM, path Path, conn net.Conn, local, remote netip.AddrPort) *bridge {
	b := &bridge{vm: vm, path: path, conn: conn, local: local, remote: remote}
	b.cond = sync.NewCond(&b.mu)
	if c, ok := conn.(*sdp.Conn); ok {
		b.sdp = c
	}
	return b
}

// attach starts the bridge once the device accepted the stream.
func (b *bridge) attach(s Stream) {
	b.mu.Lock()
	b.stream = s
	b.mu.Unlock()
	b.vm.addStream(b)
	go b.writer()
	if b.sdp != nil {
		b.sdp.SetCallbacks(s.Notify, b.writable)
		s.Notify()
	} else {
		go b.reader()
	}
}

func (b *bridge) stats() StreamStats {
	st := StreamStats{Path: b.path, Local: b.local, Remote: b.remote, FromGuest: b.fromGuest.Load(), ToGuest: b.toGuest.Load()}
	if b.stream != nil {
		st.GuestPort, st.HostPort = b.stream.GuestPort(), b.stream.HostPort()
	}
	return st
}

// Deliver implements Handler.
func (b *bridge) Deliver(p *Payload) {
	b.mu.Lock()
	if b.closed || b.abort {
		b.mu.Unlock()
		p.Release()
		return
	}
	b.q = append(b.q, p)
	b.cond.Signal()
	b.mu.Unlock()
}

// writer writes guest payloads to the connection in order.
func (b *bridge) writer() {
	for {
		b.mu.Lock()
		for len(b.q) == 0 && !b.guestEOF && !b.closed && !b.abort {
			b.cond.Wait()
		}
		if b.closed || b.abort {
			q := b.q
			b.q = nil
			b.mu.Unlock()
			for _, p := range q {
				p.Release()
			}
			return
		}
		if len(b.q) == 0 && b.guestEOF {
			b.wrDone = true
			full := b.rcvShut
			b.mu.Unlock()
			if full {
				b.conn.Close() // graceful close (abortive if fabric data is unread)
			} else {
				closeWrite(b.conn)
			}
			return
		}
		p := b.q[0]
		b.q = b.q[1:]
		b.mu.Unlock()
		var err error
		if b.sdp != nil && p.SGL != nil {
			err = b.gather(p) // releases p when the sends complete
		} else {
			for _, s := range p.Segs {
				if _, err = b.conn.Write(s); err != nil {
					break
				}
			}
			p.Release()
		}
		b.fromGuest.Add(uint64(p.Len))
		b.vm.fromGuest.Add(uint64(p.Len))
		if err != nil {
			b.fail(err)
			return
		}
	}
}

// writable wakes a writer waiting for a free send slot.
func (b *bridge) writable() {
	b.mu.Lock()
	b.wgen++
	b.cond.Broadcast()
	b.mu.Unlock()
}

// gather sends p straight from guest memory: one SDP message per
// MaxPayload bytes, each gathered by SGEs, p released when the last one
// completes locally.
func (b *bridge) gather(p *Payload) error {
	max := b.sdp.MaxPayload()
	var chunks [][]verbs.SGE
	var cur []verbs.SGE
	n := 0
	for _, s := range p.SGL {
		for s.Length > 0 {
			k := min(int(s.Length), max-n)
			cur = append(cur, verbs.SGE{Addr: s.Addr, Length: uint32(k), LKey: s.LKey})
			s.Addr += uint64(k)
			s.Length -= uint32(k)
			n += k
			if n == max || len(cur) == maxGatherSGEs {
				chunks, cur, n = append(chunks, cur), nil, 0
			}
		}
	}
	if len(cur) > 0 {
		chunks = append(chunks, cur)
	}
	left := atomic.Int32{}
	left.Store(int32(len(chunks)))
	done := func(error) {
		if left.Add(-1) == 0 {
			p.Release()
		}
	}
	for i, c := range chunks {
		for {
			b.mu.Lock()
			gen := b.wgen
			b.mu.Unlock()
			err := b.sdp.SendGather(c, done)
			if err == nil {
				break
			}
			if !errors.Is(err, sdp.ErrWouldBlock) {
				for range chunks[i:] {
					done(err)
				}
				return err
			}
			b.mu.Lock()
			if b.closed || b.abort {
				b.mu.Unlock()
				for range chunks[i:] {
					done(net.ErrClosed)
				}
				return nil
			}
			for b.wgen == gen && !b.closed && !b.abort {
				b.cond.Wait() // woken by the engine's writable callback
			}
			b.mu.Unlock()
		}
	}
	return nil
}

// maxGatherSGEs keeps a message's SGEs within the engine's queue pairs
// (the header takes one of their 8).
const maxGatherSGEs = 7

func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
		return
	}
	c.Close()
}

// reader fills rbuf from a TCP connection (the SDP path pulls directly).
func (b *bridge) reader() {
	buf := make([]byte, 64<<10)
	for {
		b.mu.Lock()
		for len(b.rbuf) >= tcpPullBuf && !b.closed {
			b.cond.Wait()
		}
		closed := b.closed
		b.mu.Unlock()
		if closed {
			return
		}
		n, err := b.conn.Read(buf)
		b.mu.Lock()
		b.rbuf = append(b.rbuf, buf[:n]...)
		if err != nil {
			if err == io.EOF {
				b.readEOF = true
			} else {
				b.readErr = err
			}
		}
		s := b.stream
		b.mu.Unlock()
		s.Notify()
		if err != nil {
			if err != io.EOF {
				b.fail(err)
			}
			return
		}
	}
}

// Pull implements Handler.
func (b *bridge) Pull(dst [][]byte) (int, bool) {
	if b.sdp != nil {
		n, eof, err := b.sdp.ReadTo(dst)
		b.toGuest.Add(uint64(n))
		b.vm.toGuest.Add(uint64(n))
		if err != nil && n == 0 {
			go b.fail(err)
		}
		return n, eof
	}
	b.mu.Lock()
	n := 0
	for _, d := range dst {
		k := copy(d, b.rbuf[n:])
		n += k
		if k < len(d) {
			break
		}
	}
	b.rbuf = b.rbuf[n:]
	if n > 0 {
		b.cond.Broadcast()
	}
	eof := b.readEOF && len(b.rbuf) == 0
	b.mu.Unlock()
	b.toGuest.Add(uint64(n))
	b.vm.toGuest.Add(uint64(n))
	return n, eof
}

// Shutdown implements Handler.
func (b *bridge) Shutdown(rcv, send, abortive bool) {
	if abortive {
		b.Reset(errors.New("guest closed with data unread"))
		return
	}
	b.mu.Lock()
	if send {
		b.guestEOF = true
	}
	if rcv {
		b.rcvShut = true
	}
	b.cond.Broadcast()
	closeNow := b.rcvShut && b.wrDone
	done := b.guestEOF && b.rcvShut
	b.mu.Unlock()
	if closeNow {
		b.conn.Close()
	}
	if done {
		// The guest closed both ways: the writer closes the connection
		// once its queue drains.
		b.vm.dropStream(b)
	}
}

// Reset implements Handler: the guest reset the stream (or aborted).
func (b *bridge) Reset(error) {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return
	}
	b.abort, b.closed = true, true
	b.cond.Broadcast()
	b.mu.Unlock()
	if b.sdp != nil {
		b.sdp.Abort()
	} else {
		if tc, ok := b.conn.(*net.TCPConn); ok {
			tc.SetLinger(0)
		}
		b.conn.Close()
	}
	b.vm.dropStream(b)
}

// fail handles a connection error: the guest hears RESET{errno} on its
// control connections, then a vsock RST.
func (b *bridge) fail(err error) {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return
	}
	b.closed = true
	b.cond.Broadcast()
	s := b.stream
	b.mu.Unlock()
	errno := syscall.ECONNRESET
	var en syscall.Errno
	if errors.As(err, &en) && en != 0 {
		errno = en
	}
	if s != nil {
		b.vm.broadcastReset(s.GuestPort(), s.HostPort(), errno)
		// The RESET must be in the guest's control socket before the
		// stream's RST: the two are different vsock streams, and the
		// guest library checks for a RESET when it sees the EOF.
		b.vm.waitCtlFlushed(resetFlushWait)
		s.Reset()
	}
	b.conn.Close()
	b.vm.dropStream(b)
}

// close releases the connection at VM shutdown.
func (b *bridge) close() {
	b.mu.Lock()
	b.closed = true
	b.cond.Broadcast()
	s := b.stream
	b.mu.Unlock()
	if s != nil {
		s.Reset()
	}
	b.conn.Close()
}
