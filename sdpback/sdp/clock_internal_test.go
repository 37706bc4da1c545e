package sdp

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vsdp/vsdp/verbs/soft"
)

// manualClock fires timers only when advanced: protocol timers (keepalive,
// the close timeout, Nagle) become deterministic.
type manualClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []*manualTimer
}

type manualTimer struct {
	c    *manualClock
	at   time.Time
	f    func()
	done bool
}

func (c *manualClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }

func (c *manualClock) AfterFunc(d time.Duration, f func()) Timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &manualTimer{c: c, at: c.now.Add(d), f: f}
	c.timers = append(c.timers, t)
	return t
}

func (t *manualTimer) Stop() bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	was := !t.done
	t.done = true
	return was
}

// Advance moves time on and runs the timers that came due.
func (c *manualClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	var due []*manualTimer
	for _, t := range c.timers {
		if !t.done && !t.at.After(c.now) {
			t.done = true
			due = append(due, t)
		}
	}
	c.mu.Unlock()
	for _, t := range due {
		t.f()
	}
}

// softPair opens soft devices "a" at a1 and "b" at a2 on one in-process
// network, with a short ack timeout; they close when the test ends.
func softPair(t *testing.T, a1, a2 netip.Addr) (da, db *soft.Device) {
	t.Helper()
	table, nw := soft.NewTable(), soft.NewNetwork()
	open := func(name string, a netip.Addr) *soft.Device {
		d, err := soft.Open(soft.Options{Name: name, Addrs: []netip.Addr{a}, Table: table, Network: nw, AckTimeout: 300 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		table.Set(a, d.Endpoint())
		t.Cleanup(func() { d.Close() })
		return d
	}
	return open("a", a1), open("b", a2)
}

// clockPair connects two stacks with the given config (its clock shared)
// on a soft pair: a dialing connection on A and the one B accepted.
func clockPair(t *testing.T, cfg Config) (*Conn, *Conn) {
	t.Helper()
	a1, a2 := netip.MustParseAddr("10.9.0.1"), netip.MustParseAddr("10.9.0.2")
	da, db := softPair(t, a1, a2)
	ca, cb := cfg, cfg
	ca.Device, ca.Addr, cb.Device, cb.Addr = da, a1, db, a2
	sa, err := New(ca)
	if err != nil {
		t.Fatal(err)
	}
	sb, err := New(cb)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sa.Close(); sb.Close() })
	l, err := sb.Listen(9, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ch := make(chan *Conn, 1)
	go func() { c, _ := l.AcceptSDP(context.Background()); ch <- c }()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := sa.Dial(ctx, netip.AddrPortFrom(a2, 9))
	if err != nil {
		t.Fatal(err)
	}
	return c, <-ch
}

func readErr(c *Conn, d time.Duration) error {
	c.SetReadDeadline(time.Now().Add(d))
	_, err := c.Read(make([]byte, 16))
	return err
}

// TestKeepaliveDetectsDeadPeer: the peer's queue pair dies silently (it
// answers nothing). An idle connection without keepalive never notices; with
// keepalive, the zero-length RDMA WRITE goes unanswered and the connection
// resets.
func TestKeepaliveDetectsDeadPeer(t *testing.T) {
	for _, keepalive := range []bool{false, true} {
		clk := &manualClock{now: time.Unix(1e9, 0)}
		cfg := Config{Clock: clk}
		if keepalive {
			cfg.Keepalive = time.Hour
		}
		a, b := clockPair(t, cfg)
		inj, err := soft.Inject(b.cm)
		if err != nil {
			t.Fatal(err)
		}
		inj.SetDelay(time.Hour) // the peer goes silent: nothing it sends, acks included, arrives
		clk.Advance(2 * time.Hour)
		err = readErr(a, 3*time.Second)
		switch {
		case keepalive && !errors.Is(err, syscall.ECONNRESET):
			t.Fatalf("with keepalive: read %v, want ECONNRESET", err)
		case !keepalive && !errors.Is(err, errDeadline()):
			t.Fatalf("without keepalive: read %v, want a timeout (the dead peer goes unnoticed)", err)
		}
	}
}

var osDeadline = os.ErrDeadlineExceeded

func errDeadline() error { return osDeadline }

// TestCloseTimeout: after our DisConn the peer never sends its own; when
// CloseTimeout passes the connection is reset, and the peer sees it.
func TestCloseTimeout(t *testing.T) {
	clk := &manualClock{now: time.Unix(1e9, 0)}
	a, b := clockPair(t, Config{Clock: clk, CloseTimeout: time.Minute})
	if err := a.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if err := readErr(b, 5*time.Second); err == nil || err.Error() != "EOF" {
		t.Fatalf("peer read %v, want EOF after our DisConn", err)
	}
	clk.Advance(30 * time.Second)
	if s := a.State(); s != "FIN_WAIT1" {
		t.Fatalf("state %s before the timeout, want FIN_WAIT1", s)
	}
	clk.Advance(31 * time.Second)
	if err := readErr(a, 3*time.Second); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("read after the close timeout: %v, want ECONNRESET", err)
	}
	// The reset reaches the peer asynchronously: its writes start failing.
	var err error
	for deadline := time.Now().Add(5 * time.Second); err == nil && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		_, err = b.Write([]byte("late"))
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("peer writes after our reset: %v, want ECONNRESET", err)
	}
}
