package sdpback

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vsdp/vsdp/sdpback/sdp"
)

// Export publishes a host TCP service on the fabric: SDP connections to
// Port on the export stack's address are spliced to Target over host TCP,
// so VMs reach hosts that do not run vsdp.
type Export struct {
	Port   uint16
	Target string // host:port
}

// ExportStats count an export's traffic.
type ExportStats struct {
	Conns, Failed    uint64
	ToTarget, ToPeer uint64
}

// Exporter serves exports on one stack.
type Exporter struct {
	stack *sdp.Stack
	ctx   context.Context
	stop  context.CancelFunc
	wg    sync.WaitGroup

	mu   sync.Mutex
	ls   []*sdp.Listener
	open map[net.Conn]struct{}

	conns, failed, toTarget, toPeer atomic.Uint64
}

// NewExporter serves exports on stack.
func NewExporter(stack *sdp.Stack) *Exporter {
	e := &Exporter{stack: stack, open: map[net.Conn]struct{}{}}
	e.ctx, e.stop = context.WithCancel(context.Background())
	return e
}

// Add starts serving one export.
func (e *Exporter) Add(x Export) error {
	l, err := e.stack.Listen(x.Port, 0)
	if err != nil {
		return err
	}
	e.mu.Lock()
	e.ls = append(e.ls, l)
	e.mu.Unlock()
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		for {
			c, err := l.AcceptSDP(e.ctx)
			if err != nil {
				return
			}
			e.wg.Add(1)
			go func() {
				defer e.wg.Done()
				e.splice(c, x.Target)
			}()
		}
	}()
	return nil
}

// Stats returns the exporter's counters.
func (e *Exporter) Stats() ExportStats {
	return ExportStats{Conns: e.conns.Load(), Failed: e.failed.Load(), ToTarget: e.toTarget.Load(), ToPeer: e.toPeer.Load()}
}

func (e *Exporter) track(c net.Conn, on bool) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if on {
		if e.ctx.Err() != nil {
			return false
		}
		e.open[c] = struct{}{}
	} else {
		delete(e.open, c)
	}
	return true
}

func (e *Exporter) splice(c *sdp.Conn, target string) {
	e.conns.Add(1)
	d := net.Dialer{Timeout: 10 * time.Second}
	t, err := d.DialContext(e.ctx, "tcp", target)
	if err != nil {
		e.failed.Add(1)
		c.Abort() // the peer sees a reset, as a TCP client would
		return
	}
	if !e.track(c, true) || !e.track(t, true) {
		c.Abort()
		t.Close()
		return
	}
	defer e.track(c, false)
	defer e.track(t, false)
	var wg sync.WaitGroup
	wg.Add(2)
	pipe := func(dst, src net.Conn, n *atomic.Uint64) {
		defer wg.Done()
		k, err := io.Copy(dst, src)
		n.Add(uint64(k))
		if err != nil && !errors.Is(err, net.ErrClosed) {
			// A reset on one side resets the other.
			if tc, ok := dst.(*net.TCPConn); ok {
				tc.SetLinger(0)
				tc.Close()
			} else if sc, ok := dst.(*sdp.Conn); ok {
				sc.Abort()
			}
			return
		}
		closeWrite(dst)
	}
	go pipe(t, c, &e.toTarget)
	go pipe(c, t, &e.toPeer)
	wg.Wait()
	c.Close()
	t.Close()
}

// Close stops every export and ends its connections.
func (e *Exporter) Close() {
	e.stop()
	e.mu.Lock()
	ls := e.ls
	e.ls = nil
	open := make([]net.Conn, 0, len(e.open))
	for c := range e.open {
		open = append(open, c)
	}
	e.mu.Unlock()
	for _, l := range ls {
		l.Close()
	}
	for _, c := range open {
		c.Close()
	}
	e.wg.Wait()
}
