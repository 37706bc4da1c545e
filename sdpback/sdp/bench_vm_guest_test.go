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
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/vsdp/vsdp/internal/workload"
)

// The ULP comparison's workload, the same for SDP and kernel TCP.
const (
	envULP      = "VSDP_SDP_ULP" // "sdp" or "tcp": the transport TestGuestULP measures
	ulpPort     = 5101
	ulpBulk     = 8 << 20  // bytes sent one way
	ulpWrite    = 64 << 10 // bytes per write
	ulpPingSize = 64       // ping-pong message
	ulpWarm     = 10       // ping-pongs not timed
	ulpRounds   = 200      // ping-pongs timed
	ulpConnects = 10       // connections timed (dial until established, then close)
)

// ulpNet is what TestGuestULP needs of a transport.
type ulpNet struct {
	listen func() (accept func(context.Context) (net.Conn, error), close func() error, err error)
	dial   func(ctx context.Context) (net.Conn, error)
	trace  *phases // SDP's set-up phases, printed after the set-up connections
}

// TestGuestULP is one half of the ULP comparison that TestVMSDPOverIbv runs
// between its two soft-RoCE guests, once over the SDP engine on verbs/ibv
// and once over the guests' kernel TCP on the same link. On one connection
// the client sends 8 MiB in 64 KiB writes and half-closes; the server
// hashes what it reads and answers with the SHA-256, which the client
// checks. On a second, 64-byte ping-pongs, echoed and checked. Then ten
// connections, each dialled until established and closed. The client
// prints "ULP transport metric value" lines: bulk MiB/s (until the digest
// is back), the average round trip in µs, the median set-up in µs.
func TestGuestULP(t *testing.T) {
	transport, role := os.Getenv(envULP), os.Getenv(envRole)
	if transport == "" || role == "" {
		t.Skipf("needs %s=sdp|tcp, %s=server|client and %s: runs in TestVMSDPOverIbv's two guests", envULP, envRole, envPeer)
	}
	var n ulpNet
	switch transport {
	case "sdp":
		st, _ := ibvStack(t)
		n.trace = tracePhases(st)
		n.listen = func() (func(context.Context) (net.Conn, error), func() error, error) {
			l, err := st.Listen(ulpPort, 16)
			if err != nil {
				return nil, nil, err
			}
			return func(ctx context.Context) (net.Conn, error) {
				c, err := l.AcceptSDP(ctx)
				if err != nil {
					return nil, err
				}
				c.SetNoDelay(true)
				return c, nil
			}, l.Close, nil
		}
		n.dial = func(ctx context.Context) (net.Conn, error) {
			c, err := st.Dial(ctx, netip.AddrPortFrom(netip.MustParseAddr(os.Getenv(envPeer)), ulpPort))
			if err != nil {
				return nil, err
			}
			c.SetNoDelay(true)
			return c, nil
		}
	case "tcp":
		n.listen = func() (func(context.Context) (net.Conn, error), func() error, error) {
			l, err := net.Listen("tcp", net.JoinHostPort(os.Getenv(envAddr), strconv.Itoa(ulpPort)))
			if err != nil {
				return nil, nil, err
			}
			return func(ctx context.Context) (net.Conn, error) {
				type res struct {
					c   net.Conn
					err error
				}
				ch := make(chan res, 1)
				go func() { c, err := l.Accept(); ch <- res{c, err} }()
				select {
				case r := <-ch:
					return r.c, r.err
				case <-ctx.Done():
					l.Close()
					return nil, ctx.Err()
				}
			}, l.Close, nil
		}
		n.dial = func(ctx context.Context) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", net.JoinHostPort(os.Getenv(envPeer), strconv.Itoa(ulpPort)))
		}
	default:
		t.Fatalf("%s=%q", envULP, transport)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	switch role {
	case "server":
		ulpServer(ctx, t, n)
	case "client":
		ulpClient(ctx, t, n, transport)
	default:
		t.Fatalf("%s=%q", envRole, role)
	}
}

func ulpServer(ctx context.Context, t *testing.T, n ulpNet) {
	accept, closeLn, err := n.listen()
	if err != nil {
		t.Fatal(err)
	}
	defer closeLn()
	c, err := accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := workload.Digest(c); err != nil || got != ulpBulk {
		t.Fatalf("bulk: %d bytes, %v", got, err)
	}
	c.Close()

	c, err = accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := io.Copy(c, c); err != nil || got != ulpPingSize*(ulpWarm+ulpRounds) {
		t.Fatalf("echo: %d bytes, %v", got, err)
	}
	c.Close()

	// The client times its dials; a connection it closed at once may be
	// gone before it is accepted, so these accepts wait a bounded time.
	for i := 0; i < ulpConnects; i++ {
		actx, cancel := context.WithTimeout(ctx, 20*time.Second)
		c, err := accept(actx)
		cancel()
		if err != nil {
			t.Logf("set-up connection %d not accepted: %v", i, err)
			break
		}
		c.Close()
	}
	n.printTrace()
}

// printTrace prints the set-up phases of the last ulpConnects connections.
func (n ulpNet) printTrace() {
	if n.trace == nil {
		return
	}
	lines := n.trace.lines()
	for _, l := range lines[max(0, len(lines)-ulpConnects):] {
		fmt.Printf("ULP-TRACE %s\n", l)
	}
}

func ulpClient(ctx context.Context, t *testing.T, n ulpNet, transport string) {
	// The server may not listen yet: retry for a while.
	var c net.Conn
	var err error
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		if c, err = n.dial(ctx); err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(6, 6))
	data := make([]byte, ulpBulk)
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	start := time.Now()
	digest, err := workload.Bulk(c, data, ulpWrite)
	if err != nil {
		t.Fatal(err)
	}
	el := time.Since(start)
	if digest != sha256.Sum256(data) {
		t.Fatal("bulk: the server's digest differs")
	}
	c.Close()
	t.Logf("%s bulk: %d MiB in %v", transport, ulpBulk>>20, el.Round(time.Millisecond))
	fmt.Printf("ULP %s bulk %.2f\n", transport, float64(ulpBulk)/(1<<20)/el.Seconds())

	if c, err = n.dial(ctx); err != nil {
		t.Fatal(err)
	}
	if el, err = workload.PingPong(c, ulpPingSize, ulpWarm, ulpRounds); err != nil {
		t.Fatal(err)
	}
	c.Close()
	fmt.Printf("ULP %s rtt %.2f\n", transport, float64(el.Microseconds())/ulpRounds)

	setup := make([]time.Duration, ulpConnects)
	for i := range setup {
		t0 := time.Now()
		c, err := n.dial(ctx)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		setup[i] = time.Since(t0)
		c.Close()
	}
	n.printTrace()
	slices.Sort(setup)
	t.Logf("%s set-up: %v", transport, setup)
	fmt.Printf("ULP %s setup %.2f\n", transport, float64(setup[len(setup)/2].Microseconds()))
}
