//go:build linux && cgo

package ibv

import (
	"slices"
	"testing"
	"time"
)

func TestParseGuestFigures(t *testing.T) {
	out := "=== RUN   TestGuestPeer\nRATE send 65536 5.03\n    guest_peer_test.go:1: RATE write 4096 9\nRATE write 4096 4.35\nLAT event 64 2467.96\nLAT bogus\n"
	got := parseGuestFigures(out)
	want := map[string]float64{"RATE send 65536": 5.03, "RATE write 4096": 4.35, "LAT event 64": 2467.96}
	if len(got) != len(want) {
		t.Fatalf("figures %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %v, want %v", k, got[k], v)
		}
	}
}

func TestPerftestAvg(t *testing.T) {
	ms := time.Millisecond
	for _, tt := range []struct {
		name string
		rtts []time.Duration
		want time.Duration
		ok   bool
	}{
		{"two slowest left out", []time.Duration{4 * ms, 100 * ms, 2 * ms, 900 * ms}, 1500 * time.Microsecond, true},
		{"equal", []time.Duration{2 * ms, 2 * ms, 2 * ms, 2 * ms, 2 * ms}, ms, true},
		{"order does not matter", []time.Duration{900 * ms, 2 * ms, 100 * ms, 4 * ms}, 1500 * time.Microsecond, true},
		{"too few", []time.Duration{ms, ms}, 0, false},
		{"none", nil, 0, false},
	} {
		in := append([]time.Duration(nil), tt.rtts...)
		got, err := perftestAvg(tt.rtts)
		if got != tt.want || (err == nil) != tt.ok {
			t.Errorf("%s: %v, %v; want %v (ok %v)", tt.name, got, err, tt.want, tt.ok)
		}
		if !slices.Equal(in, tt.rtts) {
			t.Errorf("%s: the samples were reordered", tt.name)
		}
	}
}
