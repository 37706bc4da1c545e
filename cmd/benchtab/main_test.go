package main

import (
	"bytes"
	"strings"
	"testing"
)

func TestParseAndPrint(t *testing.T) {
	in := `goos: linux
BenchmarkEcho/4KiB/vhost-2         	  100000	     10000 ns/op	 409.60 MB/s	       0 B/op	       0 allocs/op
BenchmarkEcho/4KiB/baseline-copy-2 	 1000000	      1000 ns/op	4096.00 MB/s
BenchmarkLatency/64B/sdp-2         	  1000	     20000 ns/op	   0.5 copies/byte
ok  	github.com/vsdp/vsdp/vhost/echo	3.2s
`
	fams, order := parse(strings.NewReader(in), &bytes.Buffer{})
	if len(order) != 2 || order[0] != "BenchmarkEcho" {
		t.Fatalf("families %v", order)
	}
	var out bytes.Buffer
	print(&out, fams["BenchmarkEcho"])
	s := out.String()
	for _, want := range []string{"| 4KiB |", "baseline-copy", "409.6 MB/s", "**0.10x** baseline"} {
		if !strings.Contains(s, want) {
			t.Errorf("table lacks %q:\n%s", want, s)
		}
	}
	out.Reset()
	print(&out, fams["BenchmarkLatency"])
	if !strings.Contains(out.String(), "0.5 copies/byte") || !strings.Contains(out.String(), "50.0k op/s") {
		t.Errorf("latency table:\n%s", out.String())
	}
}
