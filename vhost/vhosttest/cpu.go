package vhosttest

import (
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// CPUTime returns the CPU time the whole process has used so far, user
// and system, over all its threads (getrusage(RUSAGE_SELF)).
func CPUTime() time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// CPUMeter measures a benchmark's timed loop in wall time and in process
// CPU time, for a "per core" figure: bytes moved per CPU-second. The CPU
// time is the whole process's, so in a fake-front-end benchmark it
// includes the simulated guest's side (ring driver, copies into and out
// of guest buffers) as well as the back-end's: the figure is what the
// path costs end to end on this host, a lower bound on the back-end's own
// efficiency.
type CPUMeter struct {
	wall time.Time
	cpu  time.Duration
}

// StartCPU starts a meter; call it right after b.ResetTimer, and Stop
// right after the timed loop.
func StartCPU() CPUMeter { return CPUMeter{wall: time.Now(), cpu: CPUTime()} }

// Stop returns the wall and CPU time since StartCPU.
func (m CPUMeter) Stop() (wall, cpu time.Duration) {
	return time.Since(m.wall), CPUTime() - m.cpu
}

// ReportCPU reports, beside the benchmark's MB/s, "cores" (CPU seconds
// per wall second) and "MB/cpu-s" (bytes moved per CPU-second, in MB as
// Go's MB/s: 1e6 bytes), from a meter's Stop. bytes is the total moved in
// the timed loop (b.N times the size of one operation).
func ReportCPU(b *testing.B, bytes int64, wall, cpu time.Duration) {
	b.Helper()
	if wall > 0 {
		b.ReportMetric(cpu.Seconds()/wall.Seconds(), "cores")
	}
	if cpu > 0 {
		b.ReportMetric(float64(bytes)/cpu.Seconds()/1e6, "MB/cpu-s")
	}
}
