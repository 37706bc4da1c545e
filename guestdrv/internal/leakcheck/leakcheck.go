package leakcheck

import (
	"bytes"
	"fmt"
	"os"
	"runtime"
	"sort"
	"testing"
	"time"
)

// Snapshot is the goroutine count and open descriptors at one moment.
type Snapshot struct {
	goroutines int
	fds        map[string]int // target -> how many descriptors refer to it
}

// Take records the goroutines and open descriptors now. It first makes
// sure Go's netpoller is started, so that its descriptors never count as a
// leak.
func Take() Snapshot {
	if r, w, err := os.Pipe(); err == nil { // pipes are pollable: starts the netpoller
		r.Close()
		w.Close()
	}
	return Snapshot{goroutines: runtime.NumGoroutine(), fds: openFDs()}
}

// openFDs counts the process's open descriptors by what they refer to.
func openFDs() map[string]int {
	out := map[string]int{}
	ents, _ := os.ReadDir("/proc/self/fd")
	for _, e := range ents {
		if target, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil {
			out[target]++
		}
	}
	return out
}

// Check fails t if, within 5 s, the goroutines or the descriptors to any
// target do not come back to at most what s recorded.
func (s Snapshot) Check(t testing.TB) {
	t.Helper()
	s.check(t, 5*time.Second)
}

func (s Snapshot) check(t testing.TB, wait time.Duration) {
	t.Helper()
	deadline := time.Now().Add(wait)
	for {
		var extra []string
		for k, n := range openFDs() {
			if n > s.fds[k] {
				extra = append(extra, fmt.Sprintf("%s x%d", k, n-s.fds[k]))
			}
		}
		g := runtime.NumGoroutine()
		if len(extra) == 0 && g <= s.goroutines {
			return
		}
		if time.Now().After(deadline) {
			sort.Strings(extra)
			buf := make([]byte, 1<<16)
			buf = buf[:runtime.Stack(buf, true)]
			t.Errorf("leak: %d goroutines (was %d), new fds %v\n%s", g, s.goroutines, extra,
				bytes.TrimSpace(buf))
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}
