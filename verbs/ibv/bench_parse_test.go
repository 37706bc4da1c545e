//go:build linux && cgo

package ibv

import "testing"

// perftest's result rows as ib_send_bw and ib_send_lat print them.
const (
	perftestBWOut = `---------------------------------------------------------------------------------------
 #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]
 65536      128              6.12               5.44   		   0.000087
 4096       256              4.01               3.90   		   0.000998
---------------------------------------------------------------------------------------
`
	perftestLatOut = `---------------------------------------------------------------------------------------
 #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]   99% percentile[usec]   99.9% percentile[usec] 
 64      300          801.00         4012.00      1100.50            1226.59          310.20          3900.00                4012.00  
---------------------------------------------------------------------------------------
`
)

func TestParsePerftest(t *testing.T) {
	for _, r := range []struct {
		name string
		got  func() (float64, error)
		want float64
		ok   bool
	}{
		{"bw 64 KiB", func() (float64, error) { return parseBW(perftestBWOut, 65536) }, 5.44, true},
		{"bw 4 KiB", func() (float64, error) { return parseBW(perftestBWOut, 4096) }, 3.90, true},
		{"bw missing size", func() (float64, error) { return parseBW(perftestBWOut, 1024) }, 0, false},
		{"lat 64", func() (float64, error) { return parseLat(perftestLatOut, 64) }, 1226.59, true},
		{"lat missing size", func() (float64, error) { return parseLat(perftestLatOut, 128) }, 0, false},
		{"lat from bw output", func() (float64, error) { return parseLat(perftestBWOut, 65536) }, 0, false},
	} {
		v, err := r.got()
		if (err == nil) != r.ok || v != r.want {
			t.Errorf("%s: %v, %v; want %v (ok %v)", r.name, v, err, r.want, r.ok)
		}
	}
}

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
