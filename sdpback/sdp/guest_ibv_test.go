//go:build linux && cgo

package sdp_test

import (
	"context"
	"crypto/sha256"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
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

// TestGuestSDPPeer: the client sends random data of random write sizes to
// the server across the link, which echoes it; content is checked by hash
// both ways. The client also times 64-byte round trips.
func TestGuestSDPPeer(t *testing.T) {
	st, _ := ibvStack(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	switch os.Getenv(envRole) {
	case "server":
		l, err := st.Listen(peerPort, 4)
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		for i := 0; i < 2; i++ {
			c, err := l.AcceptSDP(ctx)
			if err != nil {
				t.Fatal(err)
			}
			c.SetNoDelay(true)
			n, err := io.Copy(c, c)
			if err != nil {
				t.Fatalf("echo after %d bytes: %v", n, err)
			}
			c.CloseWrite()
			c.Close()
		}
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
		const size = 4 << 20
		rng := rand.New(rand.NewPCG(5, 5))
		data := make([]byte, size)
		for i := range data {
			data[i] = byte(rng.Uint32())
		}
		start := time.Now()
		go func() {
			for p := data; len(p) > 0; {
				k := min(len(p), 1+rng.IntN(256<<10))
				if _, err := c.Write(p[:k]); err != nil {
					return
				}
				p = p[k:]
			}
			c.CloseWrite()
		}()
		h := sha256.New()
		n, err := io.Copy(h, c)
		el := time.Since(start)
		if err != nil || n != size || [32]byte(h.Sum(nil)) != sha256.Sum256(data) {
			t.Fatalf("echo: %d bytes, %v; content matches: %v", n, err, [32]byte(h.Sum(nil)) == sha256.Sum256(data))
		}
		c.Close()
		t.Logf("SDP over rxe: %d MiB echoed in %v (%.2f MiB/s each way)", size>>20, el.Round(time.Millisecond), float64(size)/(1<<20)/el.Seconds())

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

var _ verbs.Device
