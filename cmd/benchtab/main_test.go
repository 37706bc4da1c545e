package main

import (
	"bytes"
	"strings"
	"testing"
)

func TestParseAndPrint(t *testing.T) {
	in := `goos: linux
BenchmarkEcho/4KiB/vhost-2         	  100000	     10000 ns/op	 409.60 MB/s	       500.0 MB/cpu-s	         0.8 cores	       0 B/op	       0 allocs/op
BenchmarkEcho/4KiB/baseline-copy-2 	 1000000	      1000 ns/op	4096.00 MB/s	      4000 MB/cpu-s
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
	for _, want := range []string{"| 4KiB |", "baseline-copy", "409.6 MB/s", "**0.10x** baseline",
		"- 4KiB/vhost: 500.0 MB/cpu-s (0.125x baseline)", "- 4KiB/vhost: 0.8 cores", "- 4KiB/baseline-copy: 4000 MB/cpu-s\n"} {
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

func TestVMTables(t *testing.T) {
	in := `=== RUN   TestVMIbv/peer
        RATE send 65536 5.03
BENCHVM bw|SEND 64 KiB|verbs/ibv|5.03|ib_send_bw|5.44|MiB/s
BENCHVM lat|poll mode|verbs/ibv|2400.00|ib_send_lat|1200.00|µs
BENCHVM bw|SEND 4 KiB|verbs/ibv|2.00|ib_send_bw|0|MiB/s
BENCHVM bw|too|few|fields
BENCHVM bw|bad|x|abc|y|1|MiB/s
BENCHVM-NOTE bw|two TCG guests
BENCHVM-NOTE malformed
--- PASS: TestVMIbv (71.76s)
`
	tables := parseVM(strings.NewReader(in))
	if len(tables) != 2 || tables[0].name != "bw" || tables[1].name != "lat" {
		t.Fatalf("tables %+v", tables)
	}
	if len(tables[0].rows) != 2 || len(tables[0].notes) != 1 {
		t.Fatalf("bw table %+v: malformed lines were not dropped", tables[0])
	}
	var out bytes.Buffer
	printVM(&out, tables[0])
	s := out.String()
	for _, want := range []string{"## bw", "| SEND 64 KiB | verbs/ibv: 5.03 MiB/s | ib_send_bw: 5.44 MiB/s | **0.92x** |", "| SEND 4 KiB |", "| – |", "- two TCG guests"} {
		if !strings.Contains(s, want) {
			t.Errorf("bw table lacks %q:\n%s", want, s)
		}
	}
	if strings.Contains(s, "below 1") {
		t.Errorf("a bandwidth table says ratios below 1 are faster:\n%s", s)
	}
	out.Reset()
	printVM(&out, tables[1])
	if s := out.String(); !strings.Contains(s, "**2.00x**") || !strings.Contains(s, "below 1 means ours is faster") {
		t.Errorf("latency table:\n%s", s)
	}
}
