package sdp

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/vsdp/vsdp/sdpback/internal/refpeer"
	"github.com/vsdp/vsdp/sdpback/internal/refpeer/ibsdp"
	"github.com/vsdp/vsdp/verbs/soft"
)

// peerPair connects an engine connection (dialing, on device A, with the
// given config) to a reference peer listening on device B. The peer is
// driven only by the test goroutine: it processes what the engine sends
// only inside its own calls, so the engine can be held in any close state.
func peerPair(t *testing.T, cfg Config) (*Conn, *ibsdp.Conn, [2]*soft.Device) {
	t.Helper()
	a1, a2 := netip.MustParseAddr("10.9.1.1"), netip.MustParseAddr("10.9.1.2")
	da, db := softPair(t, a1, a2)
	cfg.Device, cfg.Addr = da, a1
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	l, err := ibsdp.Listen(ibsdp.Options{Device: db, Addr: a2}, 30)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ch := make(chan *ibsdp.Conn, 1)
	go func() { p, _ := l.Accept(ctx); ch <- p }()
	c, err := s.Dial(ctx, netip.AddrPortFrom(a2, 30))
	p := <-ch
	if err != nil || p == nil {
		t.Fatalf("dial: %v (peer accepted: %v)", err, p != nil)
	}
	t.Cleanup(func() { p.Close() })
	return c, p, [2]*soft.Device{da, db}
}

// peerSaw polls the peer until it has received a message with mid.
func peerSaw(t *testing.T, p *ibsdp.Conn, mid uint8) {
	t.Helper()
	for {
		for _, pk := range p.Log() {
			if pk.Mid == mid {
				return
			}
		}
		if err := p.WaitMessages(len(p.Log())+1, 5*time.Second); err != nil {
			t.Fatalf("peer never saw MID %#x: %v", mid, err)
		}
	}
}

// Outcomes at the engine's Read and Write.
const (
	rdEOF      = "EOF"
	rdDataEOF  = "data, then EOF"
	rdProtocol = "ECONNRESET (protocol)"
	rdAborted  = "ECONNRESET (aborted)"
	rdClosed   = "net.ErrClosed"
	wrOK       = "ok"
	wrEPIPE    = "EPIPE"
	wrReset    = "ECONNRESET"
	wrClosed   = "net.ErrClosed"
)

// outcome is what delivering an event in a state must lead to.
type outcome struct {
	state    string
	read     string
	write    string
	released bool // freed (Done closed) before the reader takes the unread data
}

// TestDisConnEveryState drives an engine connection into each state of the
// close state machine and delivers, from the reference peer, a DisConn, an
// AbortConn or a CM disconnect (the peer's abortive close) there. It checks
// the resulting state, what Read and Write return, that no timer fires
// afterwards (the clock moves on two minutes), and that everything is
// released and no goroutine is left once both sides close.
func TestDisConnEveryState(t *testing.T) {
	const unread = "unread"
	type setup func(t *testing.T, c *Conn, p *ibsdp.Conn, clk *manualClock)
	withUnread := func(t *testing.T, c *Conn, p *ibsdp.Conn) {
		if err := p.Write([]byte(unread), 2*time.Second); err != nil {
			t.Fatal(err)
		}
		if !waitFor(5*time.Second, func() bool { return c.Buffered() == len(unread) }) {
			t.Fatalf("%d bytes buffered", c.Buffered())
		}
	}
	closeWrite := func(t *testing.T, c *Conn, p *ibsdp.Conn) {
		if err := c.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		peerSaw(t, p, refpeer.MidDisconn)
	}
	peerFin := func(t *testing.T, c *Conn, p *ibsdp.Conn) {
		if err := p.CloseWrite(2 * time.Second); err != nil {
			t.Fatal(err)
		}
		if !waitFor(5*time.Second, func() bool { return c.State() == "CLOSE_WAIT" }) {
			t.Fatalf("state %s after the peer's DisConn", c.State())
		}
	}
	reset := outcome{"RESET", rdAborted, wrReset, true}
	// Events, in this order: DisConn, AbortConn, CM disconnect.
	for _, tc := range []struct {
		name  string
		pre   string // state before the event
		setup setup
		want  [3]outcome
	}{
		{"established", "ESTABLISHED", func(*testing.T, *Conn, *ibsdp.Conn, *manualClock) {},
			[3]outcome{{"CLOSE_WAIT", rdEOF, wrOK, false}, reset, reset}},
		{"established with unread data", "ESTABLISHED", func(t *testing.T, c *Conn, p *ibsdp.Conn, _ *manualClock) { withUnread(t, c, p) },
			[3]outcome{{"CLOSE_WAIT", rdDataEOF, wrOK, false}, reset, reset}},
		{"after CloseWrite", "FIN_WAIT1", func(t *testing.T, c *Conn, p *ibsdp.Conn, _ *manualClock) { closeWrite(t, c, p) },
			[3]outcome{{"TIME_WAIT", rdEOF, wrEPIPE, true}, reset, reset}},
		{"after CloseWrite with unread data", "FIN_WAIT1", func(t *testing.T, c *Conn, p *ibsdp.Conn, _ *manualClock) {
			withUnread(t, c, p)
			closeWrite(t, c, p)
		}, [3]outcome{{"TIME_WAIT", rdDataEOF, wrEPIPE, false}, reset, reset}},
		// A disconnect after the peer's DisConn is TCP's RST after a FIN
		// (gen2, ref §3.5): what the peer sent stays readable, then EOF;
		// writes get EPIPE.
		{"after the peer's DisConn", "CLOSE_WAIT", func(t *testing.T, c *Conn, p *ibsdp.Conn, _ *manualClock) { peerFin(t, c, p) },
			[3]outcome{{"RESET", rdProtocol, wrReset, true}, reset, {"RESET", rdEOF, wrEPIPE, true}}},
		{"after the peer's DisConn with unread data", "CLOSE_WAIT", func(t *testing.T, c *Conn, p *ibsdp.Conn, _ *manualClock) {
			withUnread(t, c, p)
			peerFin(t, c, p)
		}, [3]outcome{{"RESET", rdProtocol, wrReset, true}, reset, {"RESET", rdDataEOF, wrEPIPE, true}}},
		{"both DisConns, ours last", "LAST_ACK", func(t *testing.T, c *Conn, p *ibsdp.Conn, _ *manualClock) {
			peerFin(t, c, p)
			if err := c.CloseWrite(); err != nil {
				t.Fatal(err)
			}
		}, [3]outcome{{"RESET", rdProtocol, wrReset, true}, reset, {"TIME_WAIT", rdEOF, wrEPIPE, true}}},
		{"during the close timeout", "FIN_WAIT1", func(t *testing.T, c *Conn, p *ibsdp.Conn, clk *manualClock) {
			closeWrite(t, c, p)
			clk.Advance(59 * time.Second)
		}, [3]outcome{{"TIME_WAIT", rdEOF, wrEPIPE, true}, reset, reset}},
		{"after the close timeout", "RESET", func(t *testing.T, c *Conn, p *ibsdp.Conn, clk *manualClock) {
			closeWrite(t, c, p)
			clk.Advance(61 * time.Second)
		}, [3]outcome{reset, reset, reset}},
		{"after Close", "FIN_WAIT1", func(t *testing.T, c *Conn, p *ibsdp.Conn, _ *manualClock) {
			c.Close()
			peerSaw(t, p, refpeer.MidDisconn)
		}, [3]outcome{{"TIME_WAIT", rdClosed, wrClosed, true}, {"RESET", rdClosed, wrClosed, true}, {"RESET", rdClosed, wrClosed, true}}},
		{"after Abort", "RESET", func(t *testing.T, c *Conn, _ *ibsdp.Conn, _ *manualClock) { c.Abort() },
			[3]outcome{{"RESET", rdClosed, wrClosed, true}, {"RESET", rdClosed, wrClosed, true}, {"RESET", rdClosed, wrClosed, true}}},
	} {
		for ev, evName := range []string{"DisConn", "AbortConn", "disconnect"} {
			t.Run(tc.name+"/"+evName, func(t *testing.T) {
				g0 := runtime.NumGoroutine()
				clk := &manualClock{now: time.Unix(1e9, 0)}
				c, p, devs := peerPair(t, Config{Clock: clk, CloseTimeout: time.Minute})
				tc.setup(t, c, p, clk)
				if !waitFor(5*time.Second, func() bool { return c.State() == tc.pre }) {
					t.Fatalf("state %s before the event, want %s", c.State(), tc.pre)
				}
				var err error
				switch ev {
				case 0:
					err = p.Send(refpeer.Packet{BSDH: refpeer.BSDH{Mid: refpeer.MidDisconn}}, time.Second)
				case 1:
					err = p.Send(refpeer.Packet{BSDH: refpeer.BSDH{Mid: refpeer.MidAbort}}, time.Second)
				case 2:
					p.Disconnect()
				}
				if err != nil && tc.pre != "RESET" {
					t.Fatalf("peer send: %v", err)
				}
				want := tc.want[ev]
				if !waitFor(5*time.Second, func() bool { return c.State() == want.state }) {
					t.Fatalf("state %s after %s, want %s", c.State(), evName, want.state)
				}
				if want.state != tc.pre {
					// A state that should not change gets time to go wrong.
					time.Sleep(10 * time.Millisecond)
				}
				if want.released { // before anything is read
					select {
					case <-c.Done():
					case <-time.After(5 * time.Second):
						t.Fatalf("not released (state %s)", c.State())
					}
				} else {
					select {
					case <-c.Done():
						t.Fatalf("released in %s, want it held (half open, or data unread)", c.State())
					case <-time.After(10 * time.Millisecond):
					}
				}
				if err := checkRead(c, want.read, unread); err != nil {
					t.Fatal(err)
				}
				if err := checkWrite(c, want.write); err != nil {
					t.Fatal(err)
				}
				if s := c.State(); s == "TIME_WAIT" || s == "RESET" {
					select { // once read, a finished stream is released
					case <-c.Done():
					case <-time.After(5 * time.Second):
						t.Fatalf("not released in %s after reading", s)
					}
				}
				// Timers: nothing fires later to change the outcome.
				clk.Advance(2 * time.Minute)
				if s := c.State(); s != want.state {
					t.Fatalf("state %s two minutes later, want %s", s, want.state)
				}
				// Both close: everything is released.
				c.Close()
				p.Close()
				select {
				case <-c.Done():
				case <-time.After(5 * time.Second):
					t.Fatalf("not released after both closed (state %s)", c.State())
				}
				c.s.Close()
				for _, d := range devs {
					if r := d.Resources(); !r.Zero() {
						t.Fatalf("device %s leaked %v", d.Info().Name, r)
					}
					d.Close()
				}
				checkGoroutines(t, g0)
			})
		}
	}
}

// checkRead reads with a short deadline and compares with the outcome.
func checkRead(c *Conn, want, data string) error {
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	buf := make([]byte, 64)
	var got []byte
	var err error
	for {
		var n int
		n, err = c.Read(buf)
		got = append(got, buf[:n]...)
		if err != nil {
			break
		}
	}
	ok := false
	switch want {
	case rdEOF:
		ok = err == io.EOF && len(got) == 0
	case rdDataEOF:
		ok = err == io.EOF && string(got) == data
	case rdProtocol:
		ok = errors.Is(err, syscall.ECONNRESET) && errors.Is(err, ErrProtocol) && len(got) == 0
	case rdAborted:
		ok = errors.Is(err, syscall.ECONNRESET) && errors.Is(err, ErrAborted) && len(got) == 0
	case rdClosed:
		ok = errors.Is(err, net.ErrClosed) && len(got) == 0
	}
	if !ok {
		return fmt.Errorf("read %q, %v; want %s", got, err, want)
	}
	return nil
}

// checkWrite writes one byte and compares with the outcome.
func checkWrite(c *Conn, want string) error {
	_, err := c.Write([]byte("w"))
	ok := false
	switch want {
	case wrOK:
		ok = err == nil
	case wrEPIPE:
		ok = errors.Is(err, syscall.EPIPE)
	case wrReset:
		ok = errors.Is(err, syscall.ECONNRESET)
	case wrClosed:
		ok = errors.Is(err, net.ErrClosed)
	}
	if !ok {
		return fmt.Errorf("write: %v, want %s", err, want)
	}
	return nil
}

// TestDataAfterClose: stream data arriving after a close. After the peer's
// own DisConn it is a protocol violation (reset); after our CloseWrite it is
// the other half of the stream (read normally); after our Close nobody
// will read it, and the engine resets as TCP does (RFC 1122).
func TestDataAfterClose(t *testing.T) {
	late := refpeer.Packet{BSDH: refpeer.BSDH{Mid: refpeer.MidData}, Data: []byte("late")}
	lateSA := refpeer.Packet{BSDH: refpeer.BSDH{Mid: refpeer.MidSrcAvail}, SrcAH: &refpeer.SrcAH{Len: 100, Rkey: 1, Vaddr: 0x1000}, Data: []byte("late")}
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, c *Conn, p *ibsdp.Conn)
		msg   refpeer.Packet
		state string
		check func(c *Conn) error
	}{
		{"Data after the peer's DisConn", func(t *testing.T, c *Conn, p *ibsdp.Conn) {
			if err := p.CloseWrite(2 * time.Second); err != nil {
				t.Fatal(err)
			}
		}, late, "RESET", func(c *Conn) error { return checkRead(c, rdProtocol, "") }},
		{"SrcAvail after the peer's DisConn", func(t *testing.T, c *Conn, p *ibsdp.Conn) {
			if err := p.CloseWrite(2 * time.Second); err != nil {
				t.Fatal(err)
			}
		}, lateSA, "RESET", func(c *Conn) error { return checkRead(c, rdProtocol, "") }},
		{"Data after our CloseWrite", func(t *testing.T, c *Conn, p *ibsdp.Conn) {
			c.CloseWrite()
			peerSaw(t, p, refpeer.MidDisconn)
		}, late, "FIN_WAIT1", func(c *Conn) error {
			c.SetReadDeadline(time.Now().Add(2 * time.Second))
			buf := make([]byte, 8)
			n, err := c.Read(buf)
			if err != nil || string(buf[:n]) != "late" {
				return fmt.Errorf("read %q, %v; want the data (half close)", buf[:n], err)
			}
			return nil
		}},
		{"Data after our Close", func(t *testing.T, c *Conn, p *ibsdp.Conn) {
			c.Close()
			peerSaw(t, p, refpeer.MidDisconn)
		}, late, "RESET", func(c *Conn) error {
			c.mu.Lock()
			defer c.mu.Unlock()
			if !errors.Is(c.err, syscall.ECONNRESET) || !errors.Is(c.err, ErrAborted) {
				return fmt.Errorf("reset cause %v, want ErrAborted", c.err)
			}
			return nil
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, p, _ := peerPair(t, Config{CloseTimeout: time.Minute})
			defer c.Close()
			tc.setup(t, c, p)
			if err := p.Send(tc.msg, time.Second); err != nil {
				t.Fatal(err)
			}
			if !waitFor(5*time.Second, func() bool { return c.State() == tc.state }) {
				t.Fatalf("state %s, want %s", c.State(), tc.state)
			}
			if err := tc.check(c); err != nil {
				t.Fatal(err)
			}
		})
	}
}
