//go:build linux && cgo

package sdp_test

import (
	"context"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vsdp/vsdp/vmtest"
	"github.com/vsdp/vsdp/vmtest/perftest"
)

// ulpTable is the VM-tier table of the ULP comparison (make bench).
const ulpTable = "ULP comparison on soft-RoCE: SDP (verbs/ibv) beside perftest and kernel TCP"

// ulpCompare runs TestGuestULP over SDP and over kernel TCP between the
// fabric's guests (client in guest 0), then perftest's ib_send_bw and
// ib_send_lat on the same link, and prints the table for cmd/benchtab.
func ulpCompare(ctx context.Context, t *testing.T, f *vmtest.Fabric) {
	a, b := f.Guests[0], f.Guests[1]
	figures := map[string]float64{}
	for _, transport := range []string{"sdp", "tcp"} {
		run := []string{sdpGuestBinary, "-test.run", "^TestGuestULP$", "-test.v", "-test.count=1", "-test.timeout=4m"}
		env := func(i int, extra ...string) []string {
			return append([]string{envDevice + "=" + vmtest.RXEDevice, envAddr + "=" + f.IPs[i], envULP + "=" + transport}, extra...)
		}
		cr, sr, err := f.RunPair(ctx,
			vmtest.Cmd{Args: run, Env: env(1, envRole+"=server"), Timeout: 5 * time.Minute, MaxOutput: 1 << 20},
			vmtest.Cmd{Args: run, Env: env(0, envRole+"=client", envPeer+"="+f.IPs[1]), Timeout: 5 * time.Minute, MaxOutput: 1 << 20})
		if err != nil {
			t.Fatal(err)
		}
		cout, sout := string(cr.Stdout)+string(cr.Stderr), string(sr.Stdout)+string(sr.Stderr)
		t.Logf("%s client in %s:\n%s\nserver in %s:\n%s", transport, a.Name, cout, b.Name, sout)
		for who, r := range map[string]struct {
			out string
			err error
		}{"client": {cout, cr.Err()}, "server": {sout, sr.Err()}} {
			if r.err != nil || !strings.Contains(r.out, "--- PASS: TestGuestULP ") {
				t.Errorf("%s %s: did not pass (%v)", transport, who, r.err)
			}
		}
		for _, m := range ulpRE.FindAllStringSubmatch(cout, -1) {
			figures[m[1]], _ = strconv.ParseFloat(m[2], 64)
		}
		for _, k := range []string{"bulk", "rtt", "setup"} {
			if figures[transport+" "+k] == 0 {
				t.Errorf("the %s client printed no %q figure", transport, k)
			}
		}
	}
	if t.Failed() {
		return
	}
	bw, err := perftest.Run(ctx, f, []string{"ib_send_bw", "-d", vmtest.RXEDevice, "-F", "-p", "18640", "-s", "65536", "-n", "128", "-t", "16"},
		func(out string) (float64, error) { return perftest.BW(out, 65536) })
	if err != nil {
		t.Errorf("ib_send_bw: %v", err)
	}
	lat, err := perftest.Run(ctx, f, []string{"ib_send_lat", "-d", vmtest.RXEDevice, "-F", "-p", "18641", "-s", "64", "-n", "200"},
		func(out string) (float64, error) { return perftest.Lat(out, 64) })
	if err != nil {
		t.Errorf("ib_send_lat: %v", err)
	}
	rtt := 2 * lat // perftest reports half the round trip
	row := func(name string, ours float64, base string, baseV float64, unit string) {
		if baseV > 0 {
			fmt.Printf("BENCHVM %s|%s|SDP|%.2f|%s|%.2f|%s\n", ulpTable, name, ours, base, baseV, unit)
		}
	}
	row("bulk, 64 KiB writes", figures["sdp bulk"], "perftest ib_send_bw", bw, "MiB/s")
	row("bulk, 64 KiB writes", figures["sdp bulk"], "kernel TCP", figures["tcp bulk"], "MiB/s")
	row("64-byte round trip", figures["sdp rtt"], "perftest ib_send_lat (2 x t_avg)", rtt, "µs")
	row("64-byte round trip", figures["sdp rtt"], "kernel TCP", figures["tcp rtt"], "µs")
	row("connection set-up (median)", figures["sdp setup"], "kernel TCP", figures["tcp setup"], "µs")
	fmt.Printf("BENCHVM-NOTE %s|%s -> %s, two TCG guests on one link (%v); SDP on verbs/ibv over rdma_rxe, TCP on the same eth0; %d MiB bulk until the receiver's SHA-256 is back, %d timed round trips, %d connections; perftest native verbs, same link, same run\n",
		ulpTable, a.Name, b.Name, f.Link, ulpBulk>>20, ulpRounds, ulpConnects)
}

var ulpRE = regexp.MustCompile(`(?m)^ULP (\w+ \w+) ([0-9.]+)$`)
