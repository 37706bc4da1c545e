//go:build linux && cgo

package sdp_test

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/vsdp/vsdp/sdpback/sdp"
	"github.com/vsdp/vsdp/verbs"
	"github.com/vsdp/vsdp/verbs/provider"
	"golang.org/x/net/nettest"
)

// Guest-side tests of the engine on real kernel RDMA (soft-RoCE): they run
// inside TestVMSDPOverIbv's two guests, configured by these variables.
const (
	envDevice = "VSDP_SDP_DEVICE" // the RDMA device (rxe0)
	envAddr   = "VSDP_SDP_ADDR"   // this guest's fabric address
	envPeer   = "VSDP_SDP_PEER"   // the other guest's address
	envRole   = "VSDP_SDP_ROLE"   // "server" or "client"
	peerPort  = 5001
)

func ibvStack(t *testing.T) (*sdp.Stack, netip.Addr) {
	t.Helper()
	name := os.Getenv(envDevice)
	if name == "" {
		t.Skipf("needs an RDMA device: runs inside TestVMSDPOverIbv's soft-RoCE guests (or set %s and %s)", envDevice, envAddr)
	}
	addr := netip.MustParseAddr(os.Getenv(envAddr))
	p, err := provider.Open("ibv", provider.Options{})
	if err != nil {
		t.Fatal(err)
	}
	dev, err := p.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	st, err := sdp.New(sdp.Config{Device: dev, Addr: addr})
	if err != nil {
		t.Fatal(err)
	}
	if st.PortSpace() != sdp.PortSpaceTCP {
		t.Errorf("port space %v: rdma-core cannot listen on SDP service IDs, want RDMA_PS_TCP with the compact Hello", st.PortSpace())
	}
	t.Cleanup(func() {
		st.Close()
		if r := dev.Resources(); !r.Zero() {
			t.Errorf("leaked %v", r)
		}
		dev.Close()
	})
	return st, addr
}

// TestGuestSDPNetConn runs nettest.TestConn on the engine over rxe, both
// ends in this guest (rxe loops the connection back).
func TestGuestSDPNetConn(t *testing.T) {
	st, addr := ibvStack(t)
	port := uint16(6000)
	nettest.TestConn(t, func() (net.Conn, net.Conn, func(), error) {
		port++
		l, err := st.Listen(port, 4)
		if err != nil {
			return nil, nil, nil, err
		}
		defer l.Close()
		ch := make(chan *sdp.Conn, 1)
		go func() {
			c, _ := l.AcceptSDP(context.Background())
			ch <- c
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		a, err := st.Dial(ctx, netip.AddrPortFrom(addr, port))
		if err != nil {
			return nil, nil, nil, err
		}
		b := <-ch
		return a, b, func() { a.Close(); b.Close() }, nil
	})
}

// TestGuestSDPPeer: the client runs echoConns connections at once across
// the link; on each it sends random data in random write sizes (1 byte up
// to the whole transfer) while reading the server's echo, and checks the
// content by hash. It then times 64-byte round trips on one more.
func TestGuestSDPPeer(t *testing.T) {
	st, _ := ibvStack(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const echoConns = 3
	switch os.Getenv(envRole) {
	case "server":
		l, err := st.Listen(peerPort, 8)
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		var wg sync.WaitGroup
		for i := 0; i < echoConns+1; i++ {
			c, err := l.AcceptSDP(ctx)
			if err != nil {
				t.Fatal(err)
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				c.SetNoDelay(true)
				if n, err := io.Copy(c, c); err != nil {
					t.Errorf("echo after %d bytes: %v", n, err)
				}
				c.CloseWrite()
				c.Close()
			}()
		}
		wg.Wait()
	case "client":
		peer := netip.AddrPortFrom(netip.MustParseAddr(os.Getenv(envPeer)), peerPort)
		var c *sdp.Conn
		var err error
		for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(200 * time.Millisecond) {
			if c, err = st.Dial(ctx, peer); err == nil || time.Now().After(deadline) {
				break
			}
		}
		if err != nil {
			t.Fatal(err)
		}
		conns := []*sdp.Conn{c}
		for len(conns) < echoConns {
			if c, err = st.Dial(ctx, peer); err != nil {
				t.Fatal(err)
			}
			conns = append(conns, c)
		}
		const size = 2 << 20
		start := time.Now()
		var wg sync.WaitGroup
		for i, c := range conns {
			wg.Add(1)
			go func(seed uint64) {
				defer wg.Done()
				if err := echoCheck(c, seed, size); err != nil {
					t.Errorf("connection %d: %v", seed, err)
				}
				c.Close()
			}(uint64(i))
		}
		wg.Wait()
		if t.Failed() {
			t.FailNow()
		}
		el := time.Since(start)
		t.Logf("SDP over rxe: %d connections echoed %d MiB each in %v (%.2f MiB/s each way in all)", echoConns, size>>20,
			el.Round(time.Millisecond), float64(echoConns*size)/(1<<20)/el.Seconds())

		c, err = st.Dial(ctx, peer)
		if err != nil {
			t.Fatal(err)
		}
		c.SetNoDelay(true)
		buf := make([]byte, 64)
		const rounds = 100
		start = time.Now()
		for i := 0; i < rounds; i++ {
			if _, err := c.Write(buf); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(c, buf); err != nil {
				t.Fatal(err)
			}
		}
		t.Logf("SDP over rxe: 64-byte round trip %v", (time.Since(start) / rounds).Round(time.Microsecond))
		c.CloseWrite()
		io.Copy(io.Discard, c)
		c.Close()
	default:
		t.Skipf("needs %s=server|client and %s: runs in TestVMSDPOverIbv's two guests", envRole, envPeer)
	}
}

// echoCheck sends n random bytes (seeded) on c in random write sizes from
// 1 byte to n, half-closes, and checks that the echo read back is the same
// by length and sha256.
func echoCheck(c *sdp.Conn, seed uint64, n int) error {
	rng := rand.New(rand.NewPCG(seed, 5))
	data := make([]byte, n)
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	werr := make(chan error, 1)
	go func() {
		for p := data; len(p) > 0; {
			k := min(len(p), 1+rng.IntN(n))
			if _, err := c.Write(p[:k]); err != nil {
				werr <- err
				return
			}
			p = p[k:]
		}
		werr <- c.CloseWrite()
	}()
	h := sha256.New()
	got, err := io.Copy(h, c)
	if err != nil {
		return fmt.Errorf("echo read: %v after %d bytes", err, got)
	}
	if err := <-werr; err != nil {
		return fmt.Errorf("write: %v", err)
	}
	if got != int64(n) || [32]byte(h.Sum(nil)) != sha256.Sum256(data) {
		return fmt.Errorf("echoed %d bytes of %d; content differs", got, n)
	}
	return nil
}

var _ verbs.Device
