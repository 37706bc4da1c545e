//go:build linux && cgo

package ibv

import (
	"context"
	"crypto/sha256"
	"errors"
	"runtime"
	"testing"
	"time"

	"github.com/vsdp/vsdp/verbs"
)

// fakeCQ completes one entry after empty empty polls, or fails with err.
type fakeCQ struct {
	verbs.CQ // nil: only Poll is called
	empty    int
	err      error
	polls    int
}

func (f *fakeCQ) Poll(wc []verbs.Completion) (int, error) {
	f.polls++
	if f.err != nil {
		return 0, f.err
	}
	if f.polls <= f.empty {
		return 0, nil
	}
	wc[0] = verbs.Completion{ID: 7}
	return 1, nil
}

// TestSpinOther covers Spin on a CQ of another provider: polled from Go,
// the context checked every spinPolls empty polls.
func TestSpinOther(t *testing.T) {
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	boom := errors.New("boom")
	for _, tt := range []struct {
		name  string
		ctx   context.Context
		cq    *fakeCQ
		wc    int
		n     int
		err   error
		polls int
	}{
		{"ready", context.Background(), &fakeCQ{}, 4, 1, nil, 1},
		{"after empty polls", context.Background(), &fakeCQ{empty: 3 * spinPolls}, 4, 1, nil, 3*spinPolls + 1},
		{"canceled while empty", canceled, &fakeCQ{empty: 1 << 30}, 4, 0, context.Canceled, spinPolls},
		{"canceled but ready", canceled, &fakeCQ{}, 4, 1, nil, 1},
		{"poll fails", context.Background(), &fakeCQ{err: boom}, 4, 0, boom, 1},
		{"no room", context.Background(), &fakeCQ{}, 0, 0, verbs.ErrInvalid, 0},
	} {
		wc := make([]verbs.Completion, tt.wc)
		n, err := Spin(tt.ctx, tt.cq, wc)
		if n != tt.n || !errors.Is(err, tt.err) || tt.cq.polls != tt.polls {
			t.Errorf("%s: %d, %v after %d polls; want %d, %v after %d", tt.name, n, err, tt.cq.polls, tt.n, tt.err, tt.polls)
		}
		if n == 1 && wc[0].ID != 7 {
			t.Errorf("%s: completion %+v", tt.name, wc[0])
		}
	}
}

// TestGuestSpin runs Spin on rxe: a SEND and its receive found by spinning
// (content checked by SHA-256), an empty queue left by its context's end,
// and a spinning caller woken with ErrClosed by Close, with no goroutine
// left behind.
func TestGuestSpin(t *testing.T) {
	d, addr := guestEnv(t)
	srv, cli := connectPair(t, d, addr, pairOpts{bufSize: 1 << 16, cqSize: 16, qp: verbs.QPOptions{MaxSendWR: 8, MaxRecvWR: 8}})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	const size = 1000
	copy(cli.buf(), randomBytes(size))
	sum := sha256.Sum256(cli.buf()[:size])
	if err := srv.qp.PostRecv([]verbs.RecvWR{{ID: 1, SGL: []verbs.SGE{srv.sge(0, size)}}}); err != nil {
		t.Fatal(err)
	}
	if err := cli.qp.PostSend([]verbs.SendWR{{ID: 2, Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{cli.sge(0, size)}}}); err != nil {
		t.Fatal(err)
	}
	wc := make([]verbs.Completion, 4)
	for _, c := range []struct {
		s  *side
		id uint64
		op verbs.CompletionOp
	}{{srv, 1, verbs.CompRecv}, {cli, 2, verbs.CompSend}} {
		n, err := Spin(ctx, c.s.cq, wc)
		if err != nil || n != 1 {
			t.Fatalf("Spin: %d, %v", n, err)
		}
		want(t, wc[0], c.id, verbs.StatusSuccess, c.op)
	}
	if got := sha256.Sum256(srv.buf()[:size]); got != sum {
		t.Error("received bytes differ from those sent")
	}

	// Nothing more will complete: Spin ends with its context.
	short, stop := context.WithTimeout(ctx, 50*time.Millisecond)
	start := time.Now()
	n, err := Spin(short, cli.cq, wc)
	stop()
	if n != 0 || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Spin on an empty CQ: %d, %v; want DeadlineExceeded", n, err)
	}
	if el := time.Since(start); el > 10*time.Second {
		t.Errorf("Spin took %v to see its context end", el)
	}

	// Close gets in between Spin's calls into C and ends it.
	goroutines := runtime.NumGoroutine()
	q, err := d.CreateCQ(verbs.CQOptions{Entries: 4})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := Spin(ctx, q, make([]verbs.Completion, 1))
		done <- err
	}()
	time.Sleep(20 * time.Millisecond)
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, verbs.ErrClosed) {
			t.Errorf("Spin on a closed CQ: %v, want ErrClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Spin did not end after Close")
	}
	if _, err := Spin(ctx, q, wc); !errors.Is(err, verbs.ErrClosed) {
		t.Errorf("Spin after Close: %v, want ErrClosed", err)
	}
	for i := 0; runtime.NumGoroutine() > goroutines && i < 100; i++ {
		time.Sleep(10 * time.Millisecond)
	}
	if g := runtime.NumGoroutine(); g > goroutines {
		t.Errorf("%d goroutines after, %d before", g, goroutines)
	}
}
