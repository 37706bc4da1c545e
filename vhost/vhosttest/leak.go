package vhosttest

import (
	"fmt"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

// LeakSnapshot records the goroutines and open file descriptors of the
// process at one moment.
type LeakSnapshot struct {
	goroutines int
	fds        map[int]string // fd -> what it refers to
	maps       int            // memfd mappings (guest RAM the back-end mapped)
}

// TakeLeakSnapshot records the process's goroutines and fds now. It first
// makes sure Go's netpoller is initialised, so that its own descriptors are
// never mistaken for a leak.
func TakeLeakSnapshot() LeakSnapshot {
	if r, w, err := os.Pipe(); err == nil { // pipes are pollable: starts the netpoller
		r.Close()
		w.Close()
	}
	return LeakSnapshot{goroutines: runtime.NumGoroutine(), fds: openFDs(), maps: memfdMaps()}
}

// memfdMaps counts the process's mappings of memfd files.
func memfdMaps() int {
	b, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		return 0
	}
	return strings.Count(string(b), "/memfd:")
}

func openFDs() map[int]string {
	out := map[int]string{}
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return out
	}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		target, err := os.Readlink("/proc/self/fd/" + e.Name())
		if err != nil {
			continue // the directory's own fd, closed by now
		}
		out[fd] = target
	}
	return out
}

// Check compares the process with the snapshot, waiting up to wait for
// goroutines, fds and mappings that are on their way out. It reports every
// fd opened since (or reused for something else), memfd mappings left
// behind and, if goroutines grew, their stacks.
func (s LeakSnapshot) Check(wait time.Duration) error {
	deadline := time.Now().Add(wait)
	for {
		g := runtime.NumGoroutine()
		var leaked []string
		for fd, target := range openFDs() {
			if old, ok := s.fds[fd]; !ok || old != target {
				leaked = append(leaked, fmt.Sprintf("fd %d -> %s", fd, target))
			}
		}
		maps := memfdMaps()
		if g <= s.goroutines && len(leaked) == 0 && maps <= s.maps {
			return nil
		}
		if time.Now().After(deadline) {
			sort.Strings(leaked)
			msg := ""
			if len(leaked) > 0 {
				msg += fmt.Sprintf("leaked %d fds: %s", len(leaked), strings.Join(leaked, ", "))
			}
			if maps > s.maps {
				if msg != "" {
					msg += "; "
				}
				msg += fmt.Sprintf("memfd mappings grew from %d to %d", s.maps, maps)
			}
			if g > s.goroutines {
				buf := make([]byte, 1<<20)
				buf = buf[:runtime.Stack(buf, true)]
				if msg != "" {
					msg += "; "
				}
				msg += fmt.Sprintf("goroutines grew from %d to %d:\n%s", s.goroutines, g, buf)
			}
			return fmt.Errorf("vhosttest: %s", msg)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// CheckLeaks snapshots goroutines, fds and memfd mappings now and fails t
// at cleanup if any grew (after waiting up to 5 s). Call it first in a test, so that
// its cleanup runs after every other.
func CheckLeaks(t testing.TB) {
	t.Helper()
	s := TakeLeakSnapshot()
	t.Cleanup(func() {
		if err := s.Check(5 * time.Second); err != nil {
			t.Error(err)
		}
	})
}
