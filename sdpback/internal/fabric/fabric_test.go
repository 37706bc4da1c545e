package fabric_test

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/vsdp/vsdp/sdpback/internal/fabric"
)

var hosts = []fabric.Host{
	{Name: "a", Addr: netip.MustParseAddr("10.3.0.1")},
	{Name: "b", Addr: netip.MustParseAddr("10.3.0.2")},
	{Name: "c", Addr: netip.MustParseAddr("10.3.0.3")},
}

// TestStacksConnect: every stack reaches every other at its host's
// address, and bytes arrive intact (sha256).
func TestStacksConnect(t *testing.T) {
	st := fabric.Stacks(t, hosts...)
	if len(st) != len(hosts) {
		t.Fatalf("%d stacks for %d hosts", len(st), len(hosts))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	blob := make([]byte, 256<<10)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range blob {
		blob[i] = byte(rng.Uint32())
	}
	for i, srv := range st {
		l, err := srv.Listen(7, 4)
		if err != nil {
			t.Fatal(err)
		}
		for j, cli := range st {
			if i == j {
				continue
			}
			sums := make(chan [32]byte, 1)
			go func() {
				c, err := l.AcceptSDP(ctx)
				if err != nil {
					sums <- [32]byte{}
					return
				}
				defer c.Close()
				h := sha256.New()
				io.Copy(h, c)
				sums <- [32]byte(h.Sum(nil))
			}()
			c, err := cli.Dial(ctx, netip.AddrPortFrom(hosts[i].Addr, 7))
			if err != nil {
				t.Fatalf("%s dials %s: %v", hosts[j].Name, hosts[i].Name, err)
			}
			if got := c.LocalAddr().String(); !strings.HasPrefix(got, hosts[j].Addr.String()+":") {
				t.Errorf("%s's connection is from %s", hosts[j].Name, got)
			}
			if _, err := c.Write(blob); err != nil {
				t.Fatal(err)
			}
			c.Close()
			if got := <-sums; got != sha256.Sum256(blob) {
				t.Fatalf("%s -> %s: content differs", hosts[j].Name, hosts[i].Name)
			}
		}
		l.Close()
	}
}

// recorder runs a test's cleanups when asked and keeps its errors.
type recorder struct {
	testing.TB
	cleanups []func()
	errs     []string
}

func (r *recorder) Cleanup(f func()) { r.cleanups = append(r.cleanups, f) }
func (r *recorder) Errorf(format string, args ...any) {
	r.errs = append(r.errs, fmt.Sprintf(format, args...))
}

func (r *recorder) end() {
	for i := len(r.cleanups) - 1; i >= 0; i-- {
		r.cleanups[i]()
	}
}

// TestStacksLeak: a verbs object left on a device fails the test when it
// ends; a clean run reports nothing.
func TestStacksLeak(t *testing.T) {
	clean := &recorder{TB: t}
	fabric.Stacks(clean, hosts[:2]...)
	clean.end()
	if len(clean.errs) != 0 {
		t.Fatalf("clean run: %q", clean.errs)
	}

	leaky := &recorder{TB: t}
	st := fabric.Stacks(leaky, hosts[:2]...)
	mw, err := st[1].PD().AllocMW()
	if err != nil {
		t.Fatal(err)
	}
	leaky.end()
	mw.Close()
	if len(leaky.errs) != 1 || !strings.HasPrefix(leaky.errs[0], "b leaked") {
		t.Fatalf("a memory window left on b: %q, want one leak on b", leaky.errs)
	}
}
