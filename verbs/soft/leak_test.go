package soft

import (
	"math/rand/v2"
	"os"
	"runtime"
	"testing"
	"time"
)

func fdCount(t testing.TB) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatalf("count fds: %v", err)
	}
	return len(ents)
}

// checkLeaks records goroutine and fd counts; the returned function fails the
// test if they have not come back (allowing a moment for exiting goroutines).
func checkLeaks(t testing.TB) func() {
	g0, f0 := runtime.NumGoroutine(), fdCount(t)
	return func() {
		t.Helper()
		var g, f int
		for i := 0; i < 200; i++ {
			g, f = runtime.NumGoroutine(), fdCount(t)
			if g <= g0 && f <= f0 {
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
		buf := make([]byte, 1<<16)
		buf = buf[:runtime.Stack(buf, true)]
		t.Errorf("leak: goroutines %d -> %d, fds %d -> %d\n%s", g0, g, f0, f, buf)
	}
}

// pattern returns n deterministic bytes for seed.
func pattern(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}
