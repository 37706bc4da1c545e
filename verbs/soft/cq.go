package soft

import (
	"context"
	"fmt"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/vsdp/vsdp/verbs"
)

const (
	armNone = iota
	armSolicited
	armNext
)

// cq is a completion queue: a ring of completions, an arming state and an
// eventfd on the netpoller. Lock order: conn.mu before cq.mu; cq.mu is a
// leaf apart from the eventfd write, done after unlocking.
type cq struct {
	dev *Device
	fd  *verbs.PollFD

	mu       sync.Mutex
	ring     []verbs.Completion
	head, n  int
	overflow bool
	arm      int
	qps      int // queue pairs using this CQ (send or receive)
	closed   bool
}

func newCQ(d *Device, entries int) (*cq, error) {
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("soft: eventfd: %w", err)
	}
	pfd, err := verbs.NewPollFD(efd, "soft-cq")
	if err != nil {
		unix.Close(efd)
		return nil, err
	}
	return &cq{dev: d, fd: pfd, ring: make([]verbs.Completion, entries)}, nil
}

// push adds a completion. It returns false when the CQ has overflowed (now
// or before): the completion is lost and the caller's queue pair must go to
// the error state. The caller holds its conn.mu.
func (c *cq) push(wc verbs.Completion, solicited bool) bool {
	c.mu.Lock()
	if c.overflow || c.closed {
		c.mu.Unlock()
		return false
	}
	if c.n == len(c.ring) {
		c.overflow = true
		c.arm = armNone
		c.mu.Unlock()
		c.signal() // wake a waiter so it polls and sees the overflow
		c.dev.stats.cqOverflows.Add(1)
		return false
	}
	c.ring[(c.head+c.n)%len(c.ring)] = wc
	c.n++
	fire := c.arm == armNext || (c.arm == armSolicited && (solicited || wc.Status != verbs.StatusSuccess))
	if fire {
		c.arm = armNone
	}
	c.mu.Unlock()
	if fire {
		c.signal()
	}
	return true
}

func (c *cq) signal() {
	c.fd.Control(func(fd int) { verbs.WriteEventFD(fd) }) //nolint:errcheck // closed CQ: nobody waits
}

func (c *cq) Poll(wc []verbs.Completion) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return 0, verbs.ErrClosed
	}
	k := 0
	for k < len(wc) && c.n > 0 {
		wc[k] = c.ring[c.head]
		c.head = (c.head + 1) % len(c.ring)
		c.n--
		k++
	}
	if c.overflow {
		return k, fmt.Errorf("soft: cq of %d entries: %w", len(c.ring), verbs.ErrCQOverflow)
	}
	return k, nil
}

func (c *cq) Notify(solicitedOnly bool) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return verbs.ErrClosed
	}
	if c.overflow {
		return fmt.Errorf("soft: %w", verbs.ErrCQOverflow)
	}
	if solicitedOnly {
		if c.arm != armNext {
			c.arm = armSolicited
		}
	} else {
		c.arm = armNext
	}
	return nil
}

func (c *cq) Wait(ctx context.Context) error {
	return c.fd.Wait(ctx, verbs.ReadEventFD)
}

func (c *cq) Cap() int { return len(c.ring) }

func (c *cq) Close() error {
	d := c.dev
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	if c.qps > 0 {
		n := c.qps
		c.mu.Unlock()
		return &verbs.BusyError{Object: "cq", Children: fmt.Sprintf("%d queue pairs", n)}
	}
	c.closed = true
	c.mu.Unlock()
	err := c.fd.Close()
	d.mu.Lock()
	d.res.CQs--
	d.mu.Unlock()
	return err
}
