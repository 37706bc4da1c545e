package vhost_test

import (
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/vsdp/vsdp/vhost"
	"github.com/vsdp/vsdp/vhost/echo"
	"github.com/vsdp/vsdp/vhost/vhosttest"
)

// recorder collects Trace events.
type recorder struct {
	mu     sync.Mutex
	events []vhost.Event
}

func (r *recorder) add(e vhost.Event) {
	r.mu.Lock()
	r.events = append(r.events, e)
	r.mu.Unlock()
}

func (r *recorder) all() []vhost.Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]vhost.Event(nil), r.events...)
}

// last returns the last event matching pred.
func (r *recorder) last(pred func(vhost.Event) bool) (vhost.Event, bool) {
	ev := r.all()
	for i := len(ev) - 1; i >= 0; i-- {
		if pred(ev[i]) {
			return ev[i], true
		}
	}
	return vhost.Event{}, false
}

// wait polls for an event matching pred (events from ring goroutines come
// asynchronously).
func (r *recorder) wait(t testing.TB, what string, pred func(vhost.Event) bool) vhost.Event {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if e, ok := r.last(pred); ok {
			return e
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s event; events: %v", what, r.all())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (r *recorder) count(pred func(vhost.Event) bool) int {
	n := 0
	for _, e := range r.all() {
		if pred(e) {
			n++
		}
	}
	return n
}

type env struct {
	srv  *vhost.Server
	rec  *recorder
	mu   sync.Mutex
	devs []*echo.Device
}

// newEnv returns a server of echo devices whose Trace events are recorded.
// It is closed at cleanup.
func newEnv(t testing.TB, o echo.Options) *env {
	e := &env{rec: &recorder{}}
	e.srv = &vhost.Server{
		NewDevice: echo.Factory(o, func(d *echo.Device) { e.mu.Lock(); e.devs = append(e.devs, d); e.mu.Unlock() }),
		Trace:     e.rec.add,
	}
	t.Cleanup(func() { e.srv.Close() })
	return e
}

// pair connects a fake front-end over a socketpair.
func (e *env) pair(t testing.TB) (*vhosttest.Frontend, <-chan error) {
	t.Helper()
	f, done, err := vhosttest.Pair(e.srv)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f, done
}

// device connects and runs QEMU 7.2's realize sequence, then (if start)
// its DRIVER_OK sequence.
func (e *env) device(t testing.TB, o vhosttest.DeviceOptions, start bool) (*vhosttest.Device, <-chan error) {
	t.Helper()
	f, done := e.pair(t)
	d, err := f.Init(o)
	if err != nil {
		t.Fatalf("init: %v", err)
	}
	t.Cleanup(d.Close)
	if start {
		if err := d.Start(); err != nil {
			t.Fatalf("start: %v", err)
		}
	}
	return d, done
}

func loopback(d *vhosttest.Device, rxSize int) *vhosttest.Loopback {
	return &vhosttest.Loopback{RX: d.Queues[echo.RX], TX: d.Queues[echo.TX], RxSize: rxSize, MaxSegs: 3, Keep: true,
		Indirect: d.Features&vhost.FeatureIndirectDesc != 0}
}

// checkEcho verifies that recv holds msgs, message by message, by sha256.
func checkEcho(t testing.TB, msgs, recv [][]byte) {
	t.Helper()
	if len(recv) != len(msgs) {
		t.Fatalf("received %d messages, sent %d", len(recv), len(msgs))
	}
	for i := range msgs {
		if vhosttest.Digest(recv[i]) != vhosttest.Digest(msgs[i]) {
			t.Fatalf("message %d (%d bytes): sha256 differs", i, len(msgs[i]))
		}
	}
}

// waitDone waits for a session's end.
func waitDone(t testing.TB, done <-chan error) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(5 * time.Second):
		t.Fatal("session did not end within 5 s")
		return nil
	}
}

func isMessage(req vhost.Request) func(vhost.Event) bool {
	return func(e vhost.Event) bool { return e.Kind == vhost.EventMessage && e.Header.Request == req }
}

func isBroken(q int) func(vhost.Event) bool {
	return func(e vhost.Event) bool { return e.Kind == vhost.EventRingBroken && e.Queue == q }
}

func errIs(err, target error) bool { return errors.Is(err, target) }
