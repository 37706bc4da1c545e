package perftest

import (
	"errors"
	"testing"
)

// perftest's result rows as ib_send_bw and ib_send_lat print them.
const (
	bwOut = `---------------------------------------------------------------------------------------
 #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]
 65536      128              6.12               5.44   		   0.000087
 4096       256              4.01               3.90   		   0.000998
---------------------------------------------------------------------------------------
`
	latOut = `---------------------------------------------------------------------------------------
 #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]   99% percentile[usec]   99.9% percentile[usec] 
 64      300          801.00         4012.00      1100.50            1226.59          310.20          3900.00                4012.00  
---------------------------------------------------------------------------------------
`
	// A header naming the size first, a row with a bad number, and a row
	// too short: none is a result row but the bad number's.
	oddOut = ` 64 bytes per message
 128 10 x y z
 256 10 1.0
`
)

func TestParse(t *testing.T) {
	for _, r := range []struct {
		name  string
		got   func() (float64, error)
		want  float64
		noRow bool // the error must be ErrNoRow
		ok    bool
	}{
		{"bw 64 KiB", func() (float64, error) { return BW(bwOut, 65536) }, 5.44, false, true},
		{"bw 4 KiB", func() (float64, error) { return BW(bwOut, 4096) }, 3.90, false, true},
		{"bw missing size", func() (float64, error) { return BW(bwOut, 1024) }, 0, true, false},
		{"lat 64", func() (float64, error) { return Lat(latOut, 64) }, 1226.59, false, true},
		{"lat missing size", func() (float64, error) { return Lat(latOut, 128) }, 0, true, false},
		{"lat from bw output", func() (float64, error) { return Lat(bwOut, 65536) }, 0, true, false},
		{"bw from lat output", func() (float64, error) { return BW(latOut, 64) }, 4012.00, false, true}, // a wider row has the columns too (t_max)
		{"header is not a row", func() (float64, error) { return Field(oddOut, 64, 3, 2) }, 0, true, false},
		{"bad number", func() (float64, error) { return Field(oddOut, 128, 5, 3) }, 0, false, false},
		{"short row", func() (float64, error) { return Field(oddOut, 256, 5, 3) }, 0, true, false},
		{"column past width", func() (float64, error) { return Field(bwOut, 4096, 5, 5) }, 0, false, false},
		{"negative column", func() (float64, error) { return Field(bwOut, 4096, 5, -1) }, 0, false, false},
		{"empty output", func() (float64, error) { return BW("", 64) }, 0, true, false},
		{"too few fields for the width", func() (float64, error) { return Field(latOut, 64, 10, 5) }, 0, true, false},
		{"lat after bw rows", func() (float64, error) { return Lat(bwOut+latOut, 64) }, 1226.59, false, true},
	} {
		v, err := r.got()
		if (err == nil) != r.ok || v != r.want {
			t.Errorf("%s: %v, %v; want %v (ok %v)", r.name, v, err, r.want, r.ok)
		}
		if r.noRow != errors.Is(err, ErrNoRow) {
			t.Errorf("%s: error %v, ErrNoRow wanted: %v", r.name, err, r.noRow)
		}
	}
}

func TestShiftPort(t *testing.T) {
	args := []string{"ib_send_lat", "-d", "rxe0", "-p", "18548", "-s", "64"}
	got, err := shiftPort(args, 500)
	if err != nil {
		t.Fatal(err)
	}
	if got[4] != "19048" || args[4] != "18548" {
		t.Fatalf("got %v, args now %v: want the port moved in a copy", got, args)
	}
	for _, bad := range [][]string{
		{"ib_send_bw", "-s", "64"},          // no -p
		{"ib_send_bw", "-p"},                // -p without a value
		{"ib_send_bw", "-p", "x"},           // not a number
		{"ib_send_bw", "-p", "65500", "-F"}, // out of range once moved
	} {
		if _, err := shiftPort(bad, 500); err == nil {
			t.Errorf("shiftPort(%q) succeeded", bad)
		}
	}
}
