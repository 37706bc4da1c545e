package vhosttest_test

import (
	"runtime"
	"testing"
	"time"

	"github.com/vsdp/vsdp/vhost/vhosttest"
)

// TestCPUMeter spins one goroutine until the process has used 30 ms of
// CPU (bounded by 5 s of wall time on a busy machine): the meter must see
// at least that much CPU time, and never more than the machine's cores
// could give in the wall time it measured.
func TestCPUMeter(t *testing.T) {
	m := vhosttest.StartCPU()
	c0 := vhosttest.CPUTime()
	rounds := 0
	for deadline := time.Now().Add(5 * time.Second); vhosttest.CPUTime()-c0 < 30*time.Millisecond; rounds++ {
		if time.Now().After(deadline) {
			t.Fatalf("process CPU time did not advance 30 ms in 5 s of spinning (%d rounds)", rounds)
		}
	}
	wall, cpu := m.Stop()
	if cpu < 30*time.Millisecond {
		t.Fatalf("meter saw %v of CPU; CPUTime saw at least 30 ms", cpu)
	}
	if max := wall*time.Duration(runtime.NumCPU()) + 20*time.Millisecond; cpu > max {
		t.Fatalf("CPU time %v in %v of wall time on %d CPUs", cpu, wall, runtime.NumCPU())
	}
}
