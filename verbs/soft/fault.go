package soft

import (
	"fmt"
	"time"

	"github.com/vsdp/vsdp/verbs"
)

// Injector injects faults into one soft connection, for tests.
type Injector struct {
	c *conn
}

// Inject returns the fault injector of a soft connection.
func Inject(c verbs.Conn) (*Injector, error) {
	sc, ok := c.(*conn)
	if !ok {
		return nil, fmt.Errorf("%w: %T is not a soft connection", verbs.ErrInvalid, c)
	}
	return &Injector{c: sc}, nil
}

// DropLink cuts the link at once, as a cable pull would: both sides fail
// what is in flight with RETRY_EXC_ERR, flush the rest and report
// EventDisconnected.
func (i *Injector) DropLink() {
	c := i.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.l == nil || c.linkStopped {
		return
	}
	c.fail(verbs.StatusRetryExceeded, 0, fmt.Errorf("%w: %w", verbs.ErrDisconnected, errLinkDropped))
	c.stopLink(true)
}

// SetDelay delays every batch of frames this side sends by d (0 restores).
func (i *Injector) SetDelay(d time.Duration) {
	i.c.mu.Lock()
	i.c.delay = d
	i.c.mu.Unlock()
}

// ForceError moves the queue pair to the error state as a fatal local error
// would: everything flushes and EventQPFatal is raised. The peer is not told;
// its requests go unanswered.
func (i *Injector) ForceError() {
	c := i.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.qp != nil {
		c.qp.toError(verbs.EventQPFatal, errInjected)
	}
}

// WithholdReceives makes the queue pair behave as if no receive were posted
// (the peer's sends get RNR NAKs) while on is true.
func (i *Injector) WithholdReceives(on bool) {
	c := i.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.qp != nil {
		c.qp.withhold = on
	}
}
