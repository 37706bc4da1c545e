package sdp_test

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
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vsdp/vsdp/sdpback/sdp"
	"github.com/vsdp/vsdp/verbs"
	"github.com/vsdp/vsdp/verbs/soft"
	"golang.org/x/net/nettest"
)

var (
	addrA = netip.MustParseAddr("10.7.0.1")
	addrB = netip.MustParseAddr("10.7.0.2")
)

// fabric is two soft devices joined in process (or over TCP loopback),
// with a stack on each.
type fabric struct {
	a, b   *sdp.Stack
	da, db *soft.Device
}

func newFabric(t testing.TB, transport string, cfg sdp.Config) *fabric {
	t.Helper()
	table := soft.NewTable()
	var net_ *soft.Network
	oa := soft.Options{Name: "a", Addrs: []netip.Addr{addrA}, Table: table}
	ob := soft.Options{Name: "b", Addrs: []netip.Addr{addrB}, Table: table}
	switch transport {
	case "inproc":
		net_ = soft.NewNetwork()
		oa.Network, ob.Network = net_, net_
	case "tcp":
		oa.Listen = soft.Endpoint{Net: "tcp", Addr: "127.0.0.1:0"}
		ob.Listen = soft.Endpoint{Net: "tcp", Addr: "127.0.0.1:0"}
	}
	da, err := soft.Open(oa)
	if err != nil {
		t.Fatal(err)
	}
	db, err := soft.Open(ob)
	if err != nil {
		t.Fatal(err)
	}
	table.Set(addrA, da.Endpoint())
	table.Set(addrB, db.Endpoint())
	ca, cb := cfg, cfg
	ca.Device, ca.Addr = da, addrA
	cb.Device, cb.Addr = db, addrB
	sa, err := sdp.New(ca)
	if err != nil {
		t.Fatal(err)
	}
	sb, err := sdp.New(cb)
	if err != nil {
		t.Fatal(err)
	}
	f := &fabric{a: sa, b: sb, da: da, db: db}
	t.Cleanup(func() {
		sa.Close()
		sb.Close()
		for _, d := range []*soft.Device{da, db} {
			if r := d.Resources(); !r.Zero() {
				t.Errorf("device %s leaked %v", d.Info().Name, r)
			}
			d.Close()
		}
	})
	return f
}

// pair returns a connected (client on A, server on B) pair.
func (f *fabric) pair(t testing.TB, port uint16) (*sdp.Conn, *sdp.Conn) {
	t.Helper()
	l, err := f.b.Listen(port, 16)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	type res struct {
		c   *sdp.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, err := l.AcceptSDP(context.Background())
		ch <- res{c, err}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := f.a.Dial(ctx, netip.AddrPortFrom(addrB, port))
	if err != nil {
		t.Fatal(err)
	}
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	return c, r.c
}

func TestNetConn(t *testing.T) {
	for _, tr := range []string{"inproc", "tcp"} {
		t.Run(tr, func(t *testing.T) {
			f := newFabric(t, tr, sdp.Config{})
			port := uint16(7000)
			nettest.TestConn(t, func() (net.Conn, net.Conn, func(), error) {
				port++
				a, b := f.pair(t, port)
				return a, b, func() { a.Close(); b.Close() }, nil
			})
		})
	}
}

func TestDialErrors(t *testing.T) {
	f := newFabric(t, "inproc", sdp.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := f.a.Dial(ctx, netip.AddrPortFrom(addrB, 1))
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial to a port nobody listens on: %v, want ECONNREFUSED", err)
	}
	_, err = f.a.Dial(ctx, netip.MustParseAddrPort("10.9.9.9:80"))
	if !errors.Is(err, syscall.ENETUNREACH) {
		t.Fatalf("dial to an unknown address: %v, want ENETUNREACH", err)
	}
}

// TestIntegrity moves random-sized writes (1 B .. 8 MiB) both ways at once
// on several connections, checking content by hash.
func TestIntegrity(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  sdp.Config
		tr   string
	}{
		{"default", sdp.Config{}, "inproc"},
		{"tiny-credits", sdp.Config{RecvBufs: 4, RecvBufSize: 256, SendBufs: 2}, "inproc"},
		{"tcp-transport", sdp.Config{}, "tcp"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFabric(t, tc.tr, tc.cfg)
			var wg sync.WaitGroup
			total := 3 << 20
			if testing.Short() || tc.name == "tiny-credits" {
				total = 1 << 20
			}
			for i := 0; i < 4; i++ {
				a, b := f.pair(t, uint16(8000+i))
				seed := uint64(i)
				for _, dir := range [][2]*sdp.Conn{{a, b}, {b, a}} {
					wg.Add(1)
					go func(w, r *sdp.Conn, seed uint64) {
						defer wg.Done()
						if err := transfer(w, r, seed, total); err != nil {
							t.Error(err)
						}
					}(dir[0], dir[1], seed)
					seed += 100
				}
				t.Cleanup(func() { a.Close(); b.Close() })
			}
			wg.Wait()
		})
	}
}

// transfer writes n random bytes in random-sized writes on w, half-closes,
// and checks r reads exactly them.
func transfer(w, r *sdp.Conn, seed uint64, n int) error {
	rng := rand.New(rand.NewPCG(seed, seed+1))
	data := make([]byte, n)
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	errc := make(chan error, 1)
	go func() {
		p := data
		for len(p) > 0 {
			k := min(len(p), 1+rng.IntN(min(8<<20, n)))
			if _, err := w.Write(p[:k]); err != nil {
				errc <- err
				return
			}
			p = p[k:]
		}
		errc <- w.CloseWrite()
	}()
	h := sha256.New()
	got, err := io.Copy(h, r)
	if err != nil {
		return fmt.Errorf("read: %v after %d bytes", err, got)
	}
	if err := <-errc; err != nil {
		return fmt.Errorf("write: %v", err)
	}
	if got != int64(n) || !bytes.Equal(h.Sum(nil), sha256Sum(data)) {
		return fmt.Errorf("read %d bytes, want %d; content differs", got, n)
	}
	return nil
}

func sha256Sum(b []byte) []byte { s := sha256.Sum256(b); return s[:] }

func TestCloseSemantics(t *testing.T) {
	f := newFabric(t, "inproc", sdp.Config{CloseTimeout: 2 * time.Second})
	t.Run("half close gives EOF and the other direction still works", func(t *testing.T) {
		a, b := f.pair(t, 9001)
		defer a.Close()
		defer b.Close()
		a.Write([]byte("ping"))
		a.CloseWrite()
		got, err := io.ReadAll(b)
		if err != nil || string(got) != "ping" {
			t.Fatalf("read %q, %v", got, err)
		}
		if _, err := a.Write([]byte("x")); !errors.Is(err, syscall.EPIPE) {
			t.Fatalf("write after CloseWrite: %v, want EPIPE", err)
		}
		b.Write([]byte("pong"))
		b.Close()
		got, err = io.ReadAll(a)
		if err != nil || string(got) != "pong" {
			t.Fatalf("reverse read %q, %v", got, err)
		}
	})
	t.Run("close with unread data resets the peer", func(t *testing.T) {
		a, b := f.pair(t, 9002)
		defer a.Close()
		a.Write([]byte("unread"))
		deadline := time.Now().Add(5 * time.Second)
		for b.Buffered() == 0 && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
		b.Close()
		a.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err := a.Read(make([]byte, 10))
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("read after peer's abortive close: %v, want ECONNRESET", err)
		}
	})
	t.Run("both close releases everything", func(t *testing.T) {
		a, b := f.pair(t, 9003)
		a.Close()
		b.Close()
		for _, c := range []*sdp.Conn{a, b} {
			select {
			case <-c.Done():
			case <-time.After(5 * time.Second):
				t.Fatalf("connection not released (state %s)", c.State())
			}
		}
	})
}

var _ verbs.Device = (*soft.Device)(nil)
