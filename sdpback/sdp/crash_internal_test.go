package sdp

import (
	"errors"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/vsdp/vsdp/verbs/soft"
)

// streamBoth starts bounded writers of n bytes on a and b (both directions
// at once) and returns their results.
func streamBoth(a, b *Conn, n int) (chan error, chan error) {
	w := func(c *Conn) chan error {
		errc := make(chan error, 1)
		go func() {
			buf := make([]byte, 16<<10)
			for sent := 0; sent < n; sent += len(buf) {
				if _, err := c.Write(buf); err != nil {
					errc <- err
					return
				}
			}
			errc <- nil
		}()
		return errc
	}
	return w(a), w(b)
}

// drain reads c until an error and returns it.
func drain(c *Conn) chan error {
	errc := make(chan error, 1)
	go func() {
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		buf := make([]byte, 64<<10)
		for {
			if _, err := c.Read(buf); err != nil {
				errc <- err
				return
			}
		}
	}()
	return errc
}

// wantErr waits for an error on errc that satisfies ok.
func wantErr(t *testing.T, what string, errc chan error, ok func(error) bool) {
	t.Helper()
	select {
	case err := <-errc:
		if !ok(err) {
			t.Fatalf("%s: %v", what, err)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("%s: still blocked after 20 s", what)
	}
}

func isReset(err error) bool { return errors.Is(err, syscall.ECONNRESET) }

// TestAbortInFlight: one side aborts while megabytes are in flight both
// ways. The peer's reader and writer get ECONNRESET (never EOF), the
// aborting side's own calls fail at once, and both release everything.
func TestAbortInFlight(t *testing.T) {
	g := runtime.NumGoroutine()
	a, b := clockPair(t, Config{})
	wa, wb := streamBoth(a, b, 64<<20)
	ra, rb := drain(a), drain(b)
	if !waitFor(5*time.Second, func() bool { return a.Stats().BytesRecv > 256<<10 && b.Stats().BytesRecv > 256<<10 }) {
		t.Fatal("no data flowed before the abort")
	}
	a.Abort()
	wantErr(t, "peer's read", rb, isReset)
	wantErr(t, "peer's write", wb, isReset)
	wantErr(t, "aborting side's read", ra, func(err error) bool { return err != nil })
	wantErr(t, "aborting side's write", wa, func(err error) bool { return err != nil })
	b.Close()
	for _, c := range []*Conn{a, b} {
		select {
		case <-c.Done():
		case <-time.After(10 * time.Second):
			t.Fatalf("connection in %s not released", c.State())
		}
	}
	checkGoroutines(t, g+4) // the pair's stacks stay open until cleanup
}

// TestPeerCrash: the peer's side disappears mid-stream without a word. A
// cut link (DropLink) fails both sides at once; a peer that goes silent (a
// crashed host: nothing it sends, acks included, arrives) is found by the
// survivor's transport retry timeout. Either way every blocked call returns
// ECONNRESET within bounded time and nothing is left behind.
func TestPeerCrash(t *testing.T) {
	for _, tc := range []struct {
		name  string
		crash func(*soft.Injector)
	}{
		{"link cut", (*soft.Injector).DropLink},
		{"peer goes silent", func(i *soft.Injector) { i.SetDelay(time.Hour) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := clockPair(t, Config{})
			wa, wb := streamBoth(a, b, 1<<30)
			ra, rb := drain(a), drain(b)
			if !waitFor(5*time.Second, func() bool { return a.Stats().BytesRecv > 256<<10 }) {
				t.Fatal("no data flowed before the crash")
			}
			inj, err := soft.Inject(b.cm)
			if err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			tc.crash(inj)
			wantErr(t, "survivor's write", wa, isReset)
			wantErr(t, "survivor's read", ra, isReset)
			t.Logf("survivor saw the crash after %v", time.Since(start).Round(time.Millisecond))
			// The crashed side's own calls fail too (its sends go unacked).
			wantErr(t, "crashed side's write", wb, func(err error) bool { return err != nil })
			wantErr(t, "crashed side's read", rb, func(err error) bool { return err != nil })
			a.Close()
			b.Close()
			for _, c := range []*Conn{a, b} {
				select {
				case <-c.Done():
				case <-time.After(10 * time.Second):
					t.Fatalf("connection in %s not released", c.State())
				}
			}
		})
	}
}
