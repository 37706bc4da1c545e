package vmtest

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
	"github.com/digitalocean/go-qemu/qmp/raw"
)

// qmpTimeout bounds a QMP command whose context has no deadline.
const qmpTimeout = 10 * time.Second

// Event is a QMP event (SHUTDOWN, DEVICE_DELETED, ...).
type Event = qmp.Event

// monitor wraps go-qemu's SocketMonitor with what a test harness needs:
// every call bounded by a context, and events kept in a log that waiters
// can search (go-qemu's event channel is unbuffered and blocks command
// replies until drained, so a goroutine always drains it).
//
// A go-qemu call cannot be interrupted; when one times out, its goroutine
// stays blocked until the VM is closed (QEMU killed, socket closed), which
// the harness always does after an error.
type monitor struct {
	mon *qmp.SocketMonitor
	raw *raw.Monitor

	mu      sync.Mutex
	events  []Event
	changed chan struct{} // closed and replaced when events grows or the stream ends
	ended   bool
	drained chan struct{} // closed when the event stream ends
}

// dialQMP connects to QEMU's QMP socket, retrying until it exists, ctx ends
// or QEMU exits.
func dialQMP(ctx context.Context, path string, exited <-chan struct{}) (*monitor, error) {
	var mon *qmp.SocketMonitor
	for {
		var err error
		mon, err = qmp.NewSocketMonitor("unix", path, time.Second)
		if err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w: connecting to %s: %v (last error: %v)", ErrQMP, path, ctx.Err(), err)
		case <-exited:
			return nil, fmt.Errorf("%w: QEMU exited before QMP was up", ErrQMP)
		case <-time.After(20 * time.Millisecond):
		}
	}
	if err := bounded(ctx, mon.Connect); err != nil {
		mon.Disconnect()
		return nil, fmt.Errorf("%w: handshake: %v", ErrQMP, err)
	}
	events, err := mon.Events(context.Background())
	if err != nil {
		mon.Disconnect()
		return nil, fmt.Errorf("%w: events: %v", ErrQMP, err)
	}
	m := &monitor{
		mon:     mon,
		raw:     raw.NewMonitor(mon),
		changed: make(chan struct{}),
		drained: make(chan struct{}),
	}
	go m.drain(events)
	return m, nil
}

func (m *monitor) drain(events <-chan qmp.Event) {
	defer close(m.drained)
	for e := range events {
		m.mu.Lock()
		if len(m.events) < 10000 { // bounded: a test's VM has a few dozen
			m.events = append(m.events, e)
		}
		close(m.changed)
		m.changed = make(chan struct{})
		m.mu.Unlock()
	}
	m.mu.Lock()
	m.ended = true
	close(m.changed)
	m.changed = make(chan struct{})
	m.mu.Unlock()
}

// bounded runs f and waits for it at most until ctx ends (qmpTimeout when
// ctx has no deadline).
func bounded(ctx context.Context, f func() error) error {
	ctx, cancel := withDefaultTimeout(ctx, qmpTimeout)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- f() }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// run sends a raw QMP command and returns its "return" member.
func (m *monitor) run(ctx context.Context, command string, args any) (json.RawMessage, error) {
	cmd, err := json.Marshal(qmp.Command{Execute: command, Args: args})
	if err != nil {
		return nil, err
	}
	var out []byte
	err = bounded(ctx, func() error {
		var err error
		out, err = m.mon.Run(cmd)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrQMP, command, err)
	}
	var r struct {
		Return json.RawMessage `json:"return"`
	}
	if err := json.Unmarshal(out, &r); err != nil {
		return nil, fmt.Errorf("%w: %s: reply %q: %v", ErrQMP, command, out, err)
	}
	return r.Return, nil
}

func (m *monitor) status(ctx context.Context) (raw.StatusInfo, error) {
	var st raw.StatusInfo
	err := bounded(ctx, func() error {
		var err error
		st, err = m.raw.QueryStatus()
		return err
	})
	if err != nil {
		return st, fmt.Errorf("%w: query-status: %v", ErrQMP, err)
	}
	return st, nil
}

// waitEvent waits for the first event named name after the first skip
// events of the log.
func (m *monitor) waitEvent(ctx context.Context, name string, skip int) (Event, int, error) {
	for {
		m.mu.Lock()
		for i := skip; i < len(m.events); i++ {
			if m.events[i].Event == name {
				e := m.events[i]
				m.mu.Unlock()
				return e, i + 1, nil
			}
		}
		skip = len(m.events)
		ended, changed := m.ended, m.changed
		m.mu.Unlock()
		if ended {
			return Event{}, skip, fmt.Errorf("%w: QMP closed before event %s", ErrQMP, name)
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return Event{}, skip, fmt.Errorf("%w: waiting for event %s: %v", ErrQMP, name, ctx.Err())
		}
	}
}

func (m *monitor) eventLog() []Event {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]Event(nil), m.events...)
}

// close disconnects; the drain goroutine ends with the stream.
func (m *monitor) close() {
	m.mon.Disconnect()
	select {
	case <-m.drained:
	case <-time.After(5 * time.Second):
	}
}
