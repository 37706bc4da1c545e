package vsdpnet_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/nettest"

	"github.com/vsdp/vsdp/guestdrv"
	"github.com/vsdp/vsdp/guestdrv/ctl"
	"github.com/vsdp/vsdp/guestdrv/internal/leakcheck"
	"github.com/vsdp/vsdp/guestdrv/vsdpnet"
)

var transports = []guestdrv.Transport{guestdrv.Unix, guestdrv.TCP}

// setup starts a fake host and a client for it, and checks at the end that
// neither left goroutines or descriptors behind.
func setup(t *testing.T, tr guestdrv.Transport) (*guestdrv.FakeHost, *vsdpnet.Client) {
	t.Helper()
	leak := leakcheck.Take()
	o := guestdrv.HostOptions{Transport: tr}
	if tr == guestdrv.Unix {
		d, err := os.MkdirTemp("", "vsdp")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(d) })
		o.Dir = d
	}
	h, err := guestdrv.NewFakeHost(o)
	if err != nil {
		t.Fatal(err)
	}
	co := vsdpnet.Options{NoEnv: true, Timeout: 2 * time.Second}
	if tr == guestdrv.Unix {
		co.UnixDir = o.Dir
	} else {
		co.TCPPort = h.TCPPort()
	}
	c := vsdpnet.New(co)
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("client close: %v", err)
		}
		if err := c.Close(); err != nil {
			t.Errorf("second client close: %v", err)
		}
		if err := h.Close(); err != nil {
			t.Errorf("host close: %v", err)
		}
		if err := h.Err(); err != nil {
			t.Errorf("fake host: %v", err)
		}
		leak.Check(t)
	})
	return h, c
}

func randomBytes(n int, seed uint64) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, ^seed))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// TestDialOutcomes: every answer to DIAL, and the error each gives, in the
// shape package net uses.
func TestDialOutcomes(t *testing.T) {
	cases := []struct {
		name    string
		plan    guestdrv.Plan
		errno   syscall.Errno
		timeout bool
	}{
		{"refused", guestdrv.Plan{Kind: guestdrv.PlanTicket, Errno: syscall.ECONNREFUSED}, syscall.ECONNREFUSED, false},
		{"timeout", guestdrv.Plan{Kind: guestdrv.PlanTicket, Errno: syscall.ETIMEDOUT}, syscall.ETIMEDOUT, true},
		{"unreachable-late", guestdrv.Plan{Kind: guestdrv.PlanTicket, Errno: syscall.EHOSTUNREACH, ResultDelay: 100 * time.Millisecond}, syscall.EHOSTUNREACH, false},
		{"deny", guestdrv.Plan{Kind: guestdrv.PlanDeny, Errno: syscall.EACCES}, syscall.EACCES, false},
		{"deny-bad-errno", guestdrv.Plan{Kind: guestdrv.PlanDeny, Errno: syscall.Errno(1 << 20)}, syscall.EACCES, false},
	}
	for _, tr := range transports {
		for _, c := range cases {
			t.Run(tr.String()+"/"+c.name, func(t *testing.T) {
				h, cl := setup(t, tr)
				h.SetDial(func(guestdrv.Dial) guestdrv.Plan { return c.plan })
				conn, err := cl.Dial("tcp", "10.1.0.7:5000")
				if err == nil {
					conn.Close()
					t.Fatal("dial succeeded")
				}
				var op *net.OpError
				if !errors.As(err, &op) || op.Op != "dial" || op.Addr.String() != "10.1.0.7:5000" {
					t.Errorf("error %#v is not a dial *net.OpError for 10.1.0.7:5000", err)
				}
				var se *os.SyscallError
				if !errors.Is(err, c.errno) || !errors.As(err, &se) || se.Syscall != "connect" {
					t.Errorf("error %v, want connect: %v", err, c.errno)
				}
				if ne, ok := err.(net.Error); !ok || ne.Timeout() != c.timeout {
					t.Errorf("Timeout() of %v: want %v", err, c.timeout)
				}
			})
		}
	}
}

// TestDialEcho: a ticket that succeeds gives a net.Conn with RESULT's
// addresses that carries data intact both ways.
func TestDialEcho(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.String(), func(t *testing.T) {
			h, cl := setup(t, tr)
			got := make(chan [32]byte, 1)
			h.SetDial(func(d guestdrv.Dial) guestdrv.Plan {
				return guestdrv.Plan{Kind: guestdrv.PlanTicket, Local: netip.MustParseAddrPort("10.9.0.2:41000"),
					Serve: func(s *guestdrv.Stream) {
						b, _ := io.ReadAll(s)
						got <- sha256.Sum256(b)
						s.Write(b)
						s.Close()
					}}
			})
			conn, err := cl.DialContext(context.Background(), "tcp4", "10.1.0.7:5000")
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if conn.LocalAddr().String() != "10.9.0.2:41000" || conn.RemoteAddr().String() != "10.1.0.7:5000" {
				t.Errorf("addresses %v -> %v", conn.LocalAddr(), conn.RemoteAddr())
			}
			var flags uint32
			for _, e := range h.Events() {
				if e.Msg.Type == ctl.TypeDial {
					flags = e.Msg.Flags
				}
			}
			if flags != ctl.DialNoDelay|ctl.DialKeepAlive {
				t.Errorf("DIAL flags %#x, want NODELAY|KEEPALIVE (Go's defaults)", flags)
			}
			data := randomBytes(3<<20, 1)
			want := sha256.Sum256(data)
			go func() {
				conn.Write(data)
				conn.(*vsdpnet.Conn).CloseWrite()
			}()
			back, err := io.ReadAll(conn)
			if err != nil {
				t.Fatal(err)
			}
			if s := <-got; s != want {
				t.Error("the host received other bytes than were sent")
			}
			if sha256.Sum256(back) != want {
				t.Errorf("echo: %d bytes, not the ones sent", len(back))
			}
		})
	}
}

// TestDialLocal: LOCAL dials the guest's own TCP (a loopback listener).
func TestDialLocal(t *testing.T) {
	h, cl := setup(t, guestdrv.Unix)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		if c, err := ln.Accept(); err == nil {
			c.Write([]byte("local"))
			c.Close()
		}
	}()
	h.SetDial(func(guestdrv.Dial) guestdrv.Plan { return guestdrv.Plan{Kind: guestdrv.PlanLocal} })
	conn, err := cl.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, ok := conn.(*net.TCPConn); !ok {
		t.Errorf("LOCAL gave a %T, want the guest's *net.TCPConn", conn)
	}
	if b, _ := io.ReadAll(conn); string(b) != "local" {
		t.Errorf("read %q", b)
	}
}

// TestNoDevice: without a control service, ErrNoDevice, or the guest's TCP
// with Fallback.
func TestNoDevice(t *testing.T) {
	leak := leakcheck.Take()
	defer leak.Check(t)
	dir := t.TempDir()
	cl := vsdpnet.New(vsdpnet.Options{NoEnv: true, UnixDir: dir, Timeout: time.Second})
	defer cl.Close()
	_, err := cl.Dial("tcp", "10.1.0.7:5000")
	if !errors.Is(err, vsdpnet.ErrNoDevice) {
		t.Errorf("dial without a device: %v, want ErrNoDevice", err)
	}
	_, err = cl.Listen("tcp", ":5000")
	if !errors.Is(err, vsdpnet.ErrNoDevice) {
		t.Errorf("listen without a device: %v, want ErrNoDevice", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		if c, err := ln.Accept(); err == nil {
			c.Close()
		}
	}()
	fb := vsdpnet.New(vsdpnet.Options{NoEnv: true, UnixDir: dir, Fallback: true})
	defer fb.Close()
	conn, err := fb.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatalf("fallback dial: %v", err)
	}
	conn.Close()
}

// TestListenAccept: Listen registers; Accept reports PEER's addresses (or
// WHO's, when PEER is missing); Close withdraws and unblocks Accept.
func TestListenAccept(t *testing.T) {
	for _, tr := range transports {
		for _, peer := range []bool{true, false} {
			t.Run(fmt.Sprintf("%v/peer=%v", tr, peer), func(t *testing.T) {
				h, cl := setup(t, tr)
				h.SetListen(func(l guestdrv.Listen) guestdrv.ListenPlan {
					return guestdrv.ListenPlan{Bound: netip.MustParseAddrPort("10.9.0.2:6000")}
				})
				ln, err := cl.Listen("tcp", ":6000")
				if err != nil {
					t.Fatal(err)
				}
				if ln.Addr().String() != "10.9.0.2:6000" {
					t.Errorf("Addr %v", ln.Addr())
				}
				l, err := h.WaitListener(0, 5*time.Second)
				if err != nil {
					t.Fatal(err)
				}
				if l.Bind.String() != "0.0.0.0:6000" {
					t.Errorf("LISTEN for %v", l.Bind)
				}
				remote := netip.MustParseAddrPort("10.2.0.1:33333")
				s, err := h.Call(l, remote, peer)
				if err != nil {
					t.Fatal(err)
				}
				conn, err := ln.Accept()
				if err != nil {
					t.Fatal(err)
				}
				if conn.RemoteAddr().String() != "10.2.0.1:33333" || conn.LocalAddr().String() != "10.9.0.2:6000" {
					t.Errorf("accepted %v -> %v", conn.RemoteAddr(), conn.LocalAddr())
				}
				data := randomBytes(1<<20, 2)
				go func() { s.Write(data); s.CloseWrite() }()
				b, err := io.ReadAll(conn)
				if err != nil || !bytes.Equal(b, data) {
					t.Errorf("read %d bytes, %v", len(b), err)
				}
				conn.Close()
				s.Close()
				accepted := make(chan error, 1)
				go func() { _, err := ln.Accept(); accepted <- err }()
				time.Sleep(20 * time.Millisecond)
				if err := ln.Close(); err != nil {
					t.Fatal(err)
				}
				if err := <-accepted; !errors.Is(err, net.ErrClosed) {
					t.Errorf("Accept after Close: %v, want net.ErrClosed", err)
				}
				if err := ln.Close(); !errors.Is(err, net.ErrClosed) {
					t.Errorf("second Close: %v", err)
				}
				if _, err := h.WaitEvent(func(e guestdrv.Event) bool {
					return e.Msg.Type == ctl.TypeUnlisten && e.Msg.Port == l.GuestPort
				}, 5*time.Second); err != nil {
					t.Error("no UNLISTEN:", err)
				}
			})
		}
	}
}

func TestListenDenied(t *testing.T) {
	h, cl := setup(t, guestdrv.Unix)
	h.SetListen(func(guestdrv.Listen) guestdrv.ListenPlan { return guestdrv.ListenPlan{Errno: syscall.EADDRINUSE} })
	_, err := cl.Listen("tcp", ":6000")
	var op *net.OpError
	if !errors.Is(err, syscall.EADDRINUSE) || !errors.As(err, &op) || op.Op != "listen" {
		t.Errorf("listen: %v, want a listen OpError with EADDRINUSE", err)
	}
	if _, err := cl.Listen("udp", ":1"); err == nil {
		t.Error("listen on udp succeeded")
	}
}

// TestReset: a host RESET surfaces as ECONNRESET from Read and from Write,
// once each, rather than EOF and EPIPE. (AF_UNIX reads a closed peer as
// EOF/EPIPE, as vsock reads an RST.)
func TestReset(t *testing.T) {
	h, cl := setup(t, guestdrv.Unix)
	h.SetDial(func(guestdrv.Dial) guestdrv.Plan {
		return guestdrv.Plan{Kind: guestdrv.PlanTicket, Serve: func(s *guestdrv.Stream) {
			s.Write([]byte("some data"))
			time.Sleep(30 * time.Millisecond)
			s.Reset(syscall.ECONNRESET)
		}}
	})
	conn, err := cl.Dial("tcp", "10.1.0.7:5000")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	b, err := io.ReadAll(conn)
	if string(b) != "some data" || !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("read %q, %v; want the data then ECONNRESET", b, err)
	}
	if _, err := conn.Read(make([]byte, 1)); err != io.EOF {
		t.Errorf("second read: %v, want EOF", err)
	}
	if _, err := conn.Write([]byte("x")); !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("write: %v, want ECONNRESET", err)
	}
	if _, err := conn.Write([]byte("x")); !errors.Is(err, syscall.EPIPE) {
		t.Errorf("second write: %v, want EPIPE", err)
	}
}

// TestCloseAbort: Close with unread data, or after SetLinger(0), sends
// ABORT; a clean Close does not; a second Close reports net.ErrClosed.
func TestCloseAbort(t *testing.T) {
	for _, mode := range []string{"unread", "linger", "clean"} {
		t.Run(mode, func(t *testing.T) {
			h, cl := setup(t, guestdrv.Unix)
			streams := make(chan *guestdrv.Stream, 1)
			h.SetDial(func(guestdrv.Dial) guestdrv.Plan {
				return guestdrv.Plan{Kind: guestdrv.PlanTicket, Serve: func(s *guestdrv.Stream) {
					streams <- s
					s.Write([]byte("unread"))
					io.Copy(io.Discard, s)
					s.Close()
				}}
			})
			conn, err := cl.Dial("tcp", "10.1.0.7:5000")
			if err != nil {
				t.Fatal(err)
			}
			s := <-streams
			b := make([]byte, 6)
			switch mode {
			case "unread":
				time.Sleep(50 * time.Millisecond) // let the data arrive
			case "linger":
				io.ReadFull(conn, b)
				conn.(*vsdpnet.Conn).SetLinger(0)
			case "clean":
				io.ReadFull(conn, b)
			}
			if err := conn.Close(); err != nil {
				t.Fatal(err)
			}
			if err := conn.Close(); !errors.Is(err, net.ErrClosed) {
				t.Errorf("second Close: %v", err)
			}
			_, err = h.WaitEvent(func(e guestdrv.Event) bool {
				return e.Msg.Type == ctl.TypeAbort && e.Msg.GuestPort == s.GuestPort && e.Msg.HostPort == s.HostPort
			}, 300*time.Millisecond)
			if (err == nil) != (mode != "clean") {
				t.Errorf("ABORT seen: %v, want %v", err == nil, mode != "clean")
			}
		})
	}
}

// TestSetOpt: the TCP knobs are forwarded as SETOPT with the stream's
// ports.
func TestSetOpt(t *testing.T) {
	h, cl := setup(t, guestdrv.TCP)
	streams := make(chan *guestdrv.Stream, 1)
	h.SetDial(func(guestdrv.Dial) guestdrv.Plan {
		return guestdrv.Plan{Kind: guestdrv.PlanTicket, Serve: func(s *guestdrv.Stream) {
			streams <- s
			io.Copy(io.Discard, s)
			s.Close()
		}}
	})
	conn, err := cl.Dial("tcp", "10.1.0.7:5000")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := conn.(*vsdpnet.Conn)
	s := <-streams
	if err := c.SetNoDelay(false); err != nil {
		t.Fatal(err)
	}
	c.SetKeepAlive(true)
	c.SetKeepAlivePeriod(45 * time.Second)
	want := [][3]int32{{syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 0}, {syscall.SOL_SOCKET, syscall.SO_KEEPALIVE, 1},
		{syscall.IPPROTO_TCP, syscall.TCP_KEEPIDLE, 45}}
	for _, w := range want {
		if _, err := h.WaitEvent(func(e guestdrv.Event) bool {
			m := e.Msg
			return m.Type == ctl.TypeSetOpt && m.GuestPort == s.GuestPort && m.HostPort == s.HostPort &&
				[3]int32{m.Level, m.Name, m.Value} == w
		}, 2*time.Second); err != nil {
			t.Errorf("no SETOPT %v: %v", w, err)
		}
	}
}

// TestHostBreaksProtocol: garbage from the host is ErrProtocol, and the
// client recovers once the host behaves.
func TestHostBreaksProtocol(t *testing.T) {
	leak := leakcheck.Take()
	defer leak.Check(t)
	dir := t.TempDir()
	ln, err := net.Listen("unix", filepath.Join(dir, "ctl"))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		r := ctl.NewReader(c)
		r.Read() // HELLO
		b, _ := (&ctl.Msg{Type: ctl.TypeHelloOK, Ver: ctl.Version}).Append(nil)
		c.Write(b)
		r.Read() // DIAL
		c.Write([]byte{1, byte(ctl.TypeAbort), 8, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8})
		io.Copy(io.Discard, c)
		c.Close()
	}()
	cl := vsdpnet.New(vsdpnet.Options{NoEnv: true, UnixDir: dir, Timeout: time.Second})
	_, err = cl.Dial("tcp", "10.1.0.7:5000")
	if !errors.Is(err, vsdpnet.ErrProtocol) {
		t.Errorf("dial against a host that breaks the protocol: %v, want ErrProtocol", err)
	}
	cl.Close()
	ln.Close()
	<-done
}

// TestDialContext: a host that does not answer lets the context end the
// dial.
func TestDialContext(t *testing.T) {
	h, cl := setup(t, guestdrv.Unix)
	h.SetDial(func(guestdrv.Dial) guestdrv.Plan { return guestdrv.Plan{Kind: guestdrv.PlanSilent} })
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := cl.DialContext(ctx, "tcp", "10.1.0.7:5000")
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("dial: %v, want the context's deadline", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("took %v", d)
	}
}

// TestConn runs golang.org/x/net/nettest's conformance suite on a pair of
// vsdpnet streams (one dialed, one accepted) that the fake host joins.
func TestConn(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.String(), func(t *testing.T) {
			h, cl := setup(t, tr)
			ln, err := cl.Listen("tcp", ":7000")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			l, err := h.WaitListener(0, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			h.SetDial(func(d guestdrv.Dial) guestdrv.Plan {
				return guestdrv.Plan{Kind: guestdrv.PlanTicket, Serve: func(s *guestdrv.Stream) {
					peer, err := h.Call(l, netip.MustParseAddrPort("10.2.0.1:1"), true)
					if err != nil {
						s.Close()
						return
					}
					guestdrv.Pipe(s, peer)
				}}
			})
			nettest.TestConn(t, func() (c1, c2 net.Conn, stop func(), err error) {
				c1, err = cl.Dial("tcp", "10.9.0.2:7000")
				if err != nil {
					return nil, nil, nil, err
				}
				c2, err = ln.Accept()
				if err != nil {
					c1.Close()
					return nil, nil, nil, err
				}
				return c1, c2, func() { c1.Close(); c2.Close() }, nil
			})
		})
	}
}
