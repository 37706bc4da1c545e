//go:build linux && cgo

package ibv

/*
#include "shim.h"
*/
import "C"

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/vsdp/vsdp/verbs"
)

// maxPollBatch bounds the completions one Poll moves across the cgo boundary
// (and the scratch array that carries them).
const maxPollBatch = 1024

// cq is a completion queue with its own completion channel, whose descriptor
// is non-blocking and waited on through the netpoller.
type cq struct {
	dev  *Device
	cq   *C.struct_ibv_cq
	ch   *C.struct_ibv_comp_channel
	fd   *verbs.PollFD // a duplicate of ch's fd
	size int

	overflow atomic.Bool // IBV_EVENT_CQ_ERR arrived
	closing  atomic.Bool

	// mu is held shared by Poll, Notify and Wait and exclusively by Close,
	// which destroys the queue only once no call is inside C.
	mu sync.RWMutex

	pollMu  sync.Mutex // Poll's scratch
	scratch []C.struct_vsdp_wc

	waitMu  sync.Mutex // Wait's acknowledgement count
	unacked int

	closeMu sync.Mutex // serialises Close
	qps     int        // queue pairs using the CQ, guarded by dev.mu
	closed  bool       // guarded by dev.mu
}

var _ verbs.CQ = (*cq)(nil)

// CreateCQ creates a completion queue with its completion channel.
func (d *Device) CreateCQ(o verbs.CQOptions) (verbs.CQ, error) {
	n := o.Entries
	if n == 0 {
		n = defaultCQEntries
	}
	if n < 0 || (d.info.Attr.MaxCQE > 0 && n > d.info.Attr.MaxCQE) {
		return nil, fmt.Errorf("%w: %d CQ entries (device maximum %d)", verbs.ErrInvalid, o.Entries, d.info.Attr.MaxCQE)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.usable(); err != nil {
		return nil, err
	}
	ch, err := C.ibv_create_comp_channel(d.ctx)
	if ch == nil {
		return nil, callErr("ibv_create_comp_channel", err)
	}
	fd, err := pollDup(int(ch.fd), "ibv_comp_channel")
	if err != nil {
		C.ibv_destroy_comp_channel(ch)
		return nil, err
	}
	q, err := C.ibv_create_cq(d.ctx, C.int(n), nil, ch, 0)
	if q == nil {
		fd.Close()
		C.ibv_destroy_comp_channel(ch)
		return nil, callErr("ibv_create_cq", err)
	}
	c := &cq{dev: d, cq: q, ch: ch, fd: fd, size: int(q.cqe)}
	d.hub.addCQ(c)
	d.res.CQs++
	return c, nil
}

// Cap is the number of completions the queue holds (at least what was asked
// for: providers round up).
func (c *cq) Cap() int { return c.size }

// Poll moves up to len(wc) completions into wc with one call into C.
func (c *cq) Poll(wc []verbs.Completion) (int, error) {
	return c.poll(wc, 0)
}

// spinPolls bounds the empty polls one call into C makes for Spin before it
// comes back to Go to check the context and whether the queue is closing
// (and so lets Close, which waits for calls inside C, get in).
const spinPolls = 64

// Spin busy-polls the queue on the calling goroutine until it returns at
// least one completion, fails, or ctx ends: each call into C polls up to
// spinPolls times before it returns empty, so an idle wait costs one cgo
// transition per spinPolls polls, not one per poll.
func (c *cq) Spin(ctx context.Context, wc []verbs.Completion) (int, error) {
	if len(wc) == 0 {
		return 0, verbs.ErrInvalid
	}
	for {
		n, err := c.poll(wc, spinPolls)
		if n > 0 || err != nil {
			return n, err
		}
		if err := ctx.Err(); err != nil {
			return 0, err
		}
	}
}

// poll moves up to len(wc) completions into wc with one call into C; with
// spins > 0 that call busy-polls up to spins times while the queue is empty.
func (c *cq) poll(wc []verbs.Completion, spins int) (int, error) {
	if len(wc) == 0 {
		return 0, nil
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.closing.Load() {
		return 0, verbs.ErrClosed
	}
	want := min(len(wc), maxPollBatch)
	c.pollMu.Lock()
	if len(c.scratch) < want {
		c.scratch = make([]C.struct_vsdp_wc, want)
	}
	var r int
	if spins > 0 {
		r = int(C.vsdp_spin_cq(c.cq, &c.scratch[0], C.int(want), C.int(spins)))
	} else {
		r = int(C.vsdp_poll_cq(c.cq, &c.scratch[0], C.int(want)))
	}
	for i := 0; i < r; i++ {
		wc[i] = completion(&c.scratch[i], c.dev.rxe)
	}
	c.pollMu.Unlock()
	if r < 0 {
		return 0, rcErr("ibv_poll_cq", r)
	}
	for i := 0; i < r; i++ {
		switch {
		case wc[i].Status != verbs.StatusSuccess:
			c.dev.hub.qpFailed(wc[i].QPN)
		case wc[i].Flags&verbs.WithInv != 0:
			c.dev.remoteInvalidated(wc[i].InvalidatedRKey)
		}
	}
	if c.overflow.Load() {
		return r, fmt.Errorf("%w: the provider reported IBV_EVENT_CQ_ERR", verbs.ErrCQOverflow)
	}
	return r, nil
}

// Notify arms the queue.
func (c *cq) Notify(solicitedOnly bool) error {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.closing.Load() {
		return verbs.ErrClosed
	}
	so := C.int(0)
	if solicitedOnly {
		so = 1
	}
	if rc := C.vsdp_req_notify_cq(c.cq, so); rc != 0 {
		return rcErr("ibv_req_notify_cq", int(rc))
	}
	return nil
}

// Wait parks on the completion channel through the netpoller until an armed
// notification fires; it reads every pending channel event and acknowledges
// them in batches.
func (c *cq) Wait(ctx context.Context) error {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.closing.Load() {
		return verbs.ErrClosed
	}
	c.waitMu.Lock()
	defer c.waitMu.Unlock()
	err := c.fd.Wait(ctx, func(int) (bool, error) {
		n, err := C.vsdp_get_cq_events(c.ch, c.cq)
		if n < 0 {
			return false, callErr("ibv_get_cq_event", err)
		}
		if n == 0 {
			return false, nil
		}
		c.unacked += int(n)
		if c.unacked >= ackBatch {
			C.ibv_ack_cq_events(c.cq, C.uint(c.unacked))
			c.unacked = 0
		}
		return true, nil
	})
	if err != nil && c.closing.Load() {
		return verbs.ErrClosed // woken by Close
	}
	return err
}

// Close destroys the queue; it fails with ErrBusy while queue pairs use it.
// A waiter is woken with ErrClosed. Idempotent.
func (c *cq) Close() error {
	c.closeMu.Lock()
	defer c.closeMu.Unlock()
	d := c.dev
	d.mu.Lock()
	if c.closed {
		d.mu.Unlock()
		return nil
	}
	if c.qps > 0 {
		n := c.qps
		d.mu.Unlock()
		return &verbs.BusyError{Object: "cq", Children: fmt.Sprintf("%d queue pairs", n)}
	}
	c.closed = true
	d.mu.Unlock()

	c.closing.Store(true)
	c.fd.Close() // wakes a waiter
	c.mu.Lock()  // no call is inside C any more
	defer c.mu.Unlock()
	d.hub.removeCQ(c)
	if c.unacked > 0 {
		C.ibv_ack_cq_events(c.cq, C.uint(c.unacked))
		c.unacked = 0
	}
	var err error
	if rc := C.ibv_destroy_cq(c.cq); rc != 0 {
		err = rcErr("ibv_destroy_cq", int(rc))
	}
	if rc := C.ibv_destroy_comp_channel(c.ch); rc != 0 && err == nil {
		err = rcErr("ibv_destroy_comp_channel", int(rc))
	}
	d.mu.Lock()
	d.res.CQs--
	d.mu.Unlock()
	return err
}

// Spinner is implemented by this provider's completion queues (the
// verbs.CQ that Device.CreateCQ returns).
type Spinner interface {
	// Spin busy-polls until at least one completion is in wc, the queue
	// fails, or ctx ends.
	Spin(ctx context.Context, wc []verbs.Completion) (int, error)
}

var _ Spinner = (*cq)(nil)

// Spin returns at least one completion of q, busy-polling on the calling
// goroutine: no completion channel, no other goroutine, no sleep. A queue of
// this provider spins in C (Spinner), spinPolls empty polls per cgo call,
// the way a C program's polling loop does; any other verbs.CQ is polled
// from Go. ctx is checked between calls into C (every spinPolls empty
// polls). Spinning holds the calling thread's CPU: it is for latency tests
// and dedicated polling threads, not for general waiting (verbs.PollWait).
func Spin(ctx context.Context, q verbs.CQ, wc []verbs.Completion) (int, error) {
	if s, ok := q.(Spinner); ok {
		return s.Spin(ctx, wc)
	}
	if len(wc) == 0 {
		return 0, verbs.ErrInvalid
	}
	for i := 1; ; i++ {
		n, err := q.Poll(wc)
		if n > 0 || err != nil {
			return n, err
		}
		if i%spinPolls == 0 {
			if err := ctx.Err(); err != nil {
				return 0, err
			}
		}
	}
}
