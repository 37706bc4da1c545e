//go:build linux && cgo

package sdp_test

import "testing"

func TestPerftestField(t *testing.T) {
	const bw = " #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]\n 65536      128              6.12               4.53   		   0.000087\n"
	const lat = " #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]   99% percentile[usec]   99.9% percentile[usec]\n 64      200          801.00         4012.00      1100.50            1068.68          310.20          3900.00                4012.00\n"
	for _, r := range []struct {
		out              string
		size, width, col int
		want             float64
		ok               bool
	}{
		{bw, 65536, 5, 3, 4.53, true},
		{lat, 64, 7, 5, 1068.68, true},
		{bw, 64, 5, 3, 0, false},   // no row for the size
		{lat, 64, 10, 5, 0, false}, // too few fields
		{bw + lat, 64, 7, 5, 1068.68, true},
	} {
		v, err := perftestField(r.out, r.size, r.width, r.col)
		if (err == nil) != r.ok || v != r.want {
			t.Errorf("size %d col %d: %v, %v; want %v", r.size, r.col, v, err, r.want)
		}
	}
}
