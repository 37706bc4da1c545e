package sdp

import (
	"bytes"
	"context"
	"crypto/sha256"
	"io"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/vsdp/vsdp/verbs"
	"github.com/vsdp/vsdp/verbs/soft"
)

// poolPair opens two stacks on a soft pair with cfg and a listener on B.
func poolPair(t *testing.T, cfg Config) (a, b *Stack, l *Listener, da, db *soft.Device) {
	t.Helper()
	a1, a2 := netip.MustParseAddr("10.9.2.1"), netip.MustParseAddr("10.9.2.2")
	da, db = softPair(t, a1, a2)
	ca, cb := cfg, cfg
	ca.Device, ca.Addr, cb.Device, cb.Addr = da, a1, db, a2
	var err error
	if a, err = New(ca); err != nil {
		t.Fatal(err)
	}
	if b, err = New(cb); err != nil {
		t.Fatal(err)
	}
	if l, err = b.Listen(40, 8); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		l.Close()
		a.Close()
		b.Close()
		for i, d := range []*soft.Device{da, db} {
			if r := d.Resources(); !r.Zero() {
				t.Errorf("device %d leaked %v", i, r)
			}
		}
	})
	return a, b, l, da, db
}

func poolDial(t *testing.T, a *Stack, l *Listener) (*Conn, *Conn) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	x, err := a.Dial(ctx, netip.AddrPortFrom(netip.MustParseAddr("10.9.2.2"), 40))
	if err != nil {
		t.Fatal(err)
	}
	y, err := l.AcceptSDP(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return x, y
}

// exchange sends n random bytes each way and checks them by hash.
func exchange(t *testing.T, x, y *Conn, n int, seed uint64) {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, seed))
	for _, d := range [][2]*Conn{{x, y}, {y, x}} {
		data := make([]byte, n)
		for i := range data {
			data[i] = byte(rng.Uint32()) | 1 // no zero bytes: a leak would show
		}
		go d[0].Write(data)
		got := make([]byte, n)
		if _, err := io.ReadFull(d[1], got); err != nil {
			t.Fatal(err)
		}
		if sha256.Sum256(got) != sha256.Sum256(data) {
			t.Fatal("payload differs")
		}
	}
}

func closeBoth(x, y *Conn) {
	x.Close()
	y.Close()
	<-x.Done()
	<-y.Done()
}

func idleSets(s *Stack) ([]*bufSet, uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*bufSet(nil), s.idle...), s.reused
}

func allZero(b []byte) bool { return !bytes.ContainsFunc(b, func(r rune) bool { return r != 0 }) }

// TestBufferPool checks the registered buffer sets a stack keeps: a set
// comes back scrubbed after a graceful close and after an abort, a new
// connection reuses it and carries data intact, the pool stays within
// BufferSets, the sets are never registered for remote access, and
// Stack.Close frees them (the cleanup checks the devices' resources).
func TestBufferPool(t *testing.T) {
	a, b, l, da, _ := poolPair(t, Config{BufferSets: 2})
	checkIdle := func(s *Stack, want int) {
		t.Helper()
		sets, _ := idleSets(s)
		if len(sets) != want {
			t.Fatalf("%d idle sets, want %d", len(sets), want)
		}
		for _, set := range sets {
			if !allZero(set.rx.Bytes()) || !allZero(set.tx.Bytes()) || !allZero(set.ctl.Bytes()) {
				t.Fatal("an idle set holds data")
			}
			for _, m := range []verbs.MR{set.rxMR, set.txMR, set.ctlMR} {
				if m.Access()&(verbs.AccessRemoteRead|verbs.AccessRemoteWrite|verbs.AccessRemoteAtomic|verbs.AccessMWBind) != 0 {
					t.Fatalf("a pooled region has access %v", m.Access())
				}
			}
		}
	}

	x, y := poolDial(t, a, l)
	exchange(t, x, y, 300<<10, 1) // more than the send and receive buffers hold
	closeBoth(x, y)
	checkIdle(a, 1)
	checkIdle(b, 1)

	// The next connection takes the set back; before any data it holds
	// none, and data still arrives intact.
	x, y = poolDial(t, a, l)
	if _, n := idleSets(a); n != 1 {
		t.Fatalf("dialer reused %d sets, want 1", n)
	}
	x.mu.Lock()
	clean := allZero(x.set.rx.Bytes()) && allZero(x.set.tx.Bytes())
	x.mu.Unlock()
	if !clean {
		t.Fatal("a reused set holds an earlier connection's data")
	}
	exchange(t, x, y, 100<<10, 2)
	// An abort with data in flight still returns a scrubbed set.
	go x.Write(bytes.Repeat([]byte{0x5a}, 200<<10))
	time.Sleep(10 * time.Millisecond)
	x.Abort()
	y.Abort()
	<-x.Done()
	<-y.Done()
	checkIdle(a, 1)

	// Four at once: two sets come from the pool on each side, the rest are
	// allocated; after closing, the pool keeps two and frees the rest.
	var xs, ys []*Conn
	for range 4 {
		x, y := poolDial(t, a, l)
		xs, ys = append(xs, x), append(ys, y)
	}
	for i := range xs {
		exchange(t, xs[i], ys[i], 50<<10, uint64(10+i))
		closeBoth(xs[i], ys[i])
	}
	checkIdle(a, 2)
	checkIdle(b, 2)
	if r := da.Resources(); r.MRs != 2*3 {
		t.Fatalf("dialer device holds %d regions, want 6 (two idle sets)", r.MRs)
	}
}

// TestBufferPoolOff checks that a negative BufferSets keeps no set.
func TestBufferPoolOff(t *testing.T) {
	a, _, l, da, _ := poolPair(t, Config{BufferSets: -1})
	x, y := poolDial(t, a, l)
	exchange(t, x, y, 10<<10, 3)
	closeBoth(x, y)
	if sets, _ := idleSets(a); len(sets) != 0 {
		t.Fatalf("%d idle sets with BufferSets -1", len(sets))
	}
	if r := da.Resources(); r.MRs != 0 {
		t.Fatalf("%d regions left registered with BufferSets -1", r.MRs)
	}
}

// TestConfigValidation has a case for every rule of Config.defaults.
func TestConfigValidation(t *testing.T) {
	dev := &soft.Device{}
	for _, tc := range []struct {
		name string
		cfg  Config
		want string // substring of the error; "" for valid
	}{
		{"no device", Config{}, "Device is required"},
		{"defaults", Config{Device: dev}, ""},
		{"few receive buffers", Config{Device: dev, RecvBufs: 3}, "RecvBufs 3"},
		{"many receive buffers", Config{Device: dev, RecvBufs: maxBufs + 1}, "RecvBufs"},
		{"negative send buffers", Config{Device: dev, SendBufs: -1}, "SendBufs -1"},
		{"many send buffers", Config{Device: dev, SendBufs: maxBufs + 1}, "SendBufs"},
		{"small receive size", Config{Device: dev, RecvBufSize: 79}, "RecvBufSize 79"},
		{"large receive size", Config{Device: dev, RecvBufSize: 1<<20 + 1}, "RecvBufSize"},
		{"RNR retry", Config{Device: dev, RNRRetry: 8}, "RNRRetry 8"},
		{"many buffer sets", Config{Device: dev, BufferSets: maxBufs + 1}, "BufferSets"},
		{"no buffer sets", Config{Device: dev, BufferSets: -1}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := tc.cfg
			err := cfg.defaults()
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("rejected: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("error %v, want one naming %q", err, tc.want)
			}
		})
	}
	cfg := Config{Device: &soft.Device{}}
	cfg.defaults()
	if cfg.BufferSets != DefaultBufferSets {
		t.Errorf("BufferSets default %d, want %d", cfg.BufferSets, DefaultBufferSets)
	}
	cfg = Config{Device: &soft.Device{}, BufferSets: -1}
	cfg.defaults()
	if cfg.BufferSets != 0 {
		t.Errorf("BufferSets -1 became %d, want 0", cfg.BufferSets)
	}
}
