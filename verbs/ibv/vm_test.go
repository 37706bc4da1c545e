//go:build linux && cgo

package ibv

import (
	"context"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vsdp/vsdp/images"
	"github.com/vsdp/vsdp/verbs/verbstest"
	"github.com/vsdp/vsdp/vmtest"
	"github.com/vsdp/vsdp/vmtest/perftest"
)

// guestTests are the tests TestVMIbv runs inside a soft-RoCE guest, all of
// which must pass (none may skip).
var guestTests = []string{
	"TestGuestConnect",
	"TestGuestPrivateDataLimits",
	"TestGuestRefused",
	"TestGuestTransfer",
	"TestGuestErrors",
	"TestGuestMW",
	"TestGuestRetryAttrs",
	"TestGuestSDP",
	"TestGuestCQOverflow",
	"TestGuestConcurrentClose",
	"TestGuestRXEWindowBounds",
	"TestGuestQueueDepth",
	"TestGuestSpin",
	"TestGuestConformance",
}

// conformanceNames lists the subtests a conformance run must pass: every
// case but soft-RoCE's known deviations, which verbstest reports as skips
// with their reasons (knownSkips).
func conformanceNames(test string) []string {
	names := []string{test}
	for _, n := range verbstest.Expected(verbstest.ProviderRXE) {
		names = append(names, test+"/"+n)
	}
	return names
}

// knownSkips maps each subtest of a conformance run that verbstest skips as
// a known soft-RoCE deviation to the reason it must give.
func knownSkips(test string) map[string]string {
	skips := map[string]string{}
	for n, reason := range verbstest.Deviations(verbstest.ProviderRXE) {
		skips[test+"/"+n] = verbstest.KnownDeviationPrefix + verbstest.ProviderRXE + ": " + reason
	}
	return skips
}

const guestBinary = "/bin/ibv.test"

// TestVMIbv proves the provider on real kernel RDMA: two TCG guests with
// rdma_rxe joined by a QEMU link. This package's test binary (built with
// cgo) runs the TestGuest tests against rxe0 in one guest (both ends of each
// connection in one process, looped back by rxe), then TestGuestPeer across
// the link, server in one guest and client in the other.
func TestVMIbv(t *testing.T) {
	vmtest.Require(t)
	start := time.Now()
	f := vmtest.StartFabric(t, vmtest.FabricOptions{
		Guest: vmtest.Options{
			Name:      "ibv",
			MemoryMiB: 768,
			Image: images.Spec{Programs: []images.Program{
				{Package: "./verbs/ibv", Test: true, CGO: true, Path: guestBinary},
			}},
		},
	})
	t.Logf("fabric up in %v", time.Since(start).Round(time.Millisecond))
	a, b := f.Guests[0], f.Guests[1]
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	env := func(i int, extra ...string) []string {
		e := []string{envDevice + "=" + vmtest.RXEDevice, envAddr + "=" + f.IPs[i]}
		if v := os.Getenv(envLatProbe); v != "" {
			e = append(e, envLatProbe+"="+v) // TestGuestPeer's latency variants
		}
		return append(e, extra...)
	}

	t.Run("loopback", func(t *testing.T) {
		r, err := a.Exec(ctx, vmtest.Cmd{
			Args:      []string{guestBinary, "-test.run", "^TestGuest", "-test.skip", "^TestGuest(Peer|ConformancePeer|Conformance)$", "-test.v", "-test.count=1", "-test.timeout=5m"},
			Env:       env(0),
			Timeout:   6 * time.Minute,
			MaxOutput: 1 << 20,
		})
		if err != nil {
			t.Fatal(err)
		}
		out := string(r.Stdout) + string(r.Stderr)
		t.Logf("guest %s (%v):\n%s", a.Name, r.Duration.Round(time.Millisecond), out)
		checkGuestRun(t, out, r.Err(), guestTests[:len(guestTests)-1], nil)

		// The conformance suite with both halves in one process; the
		// suite reports rxe's known deviations as such.
		r, err = a.Exec(ctx, vmtest.Cmd{
			Args:      []string{guestBinary, "-test.run", "^TestGuestConformance$", "-test.v", "-test.count=1", "-test.timeout=5m"},
			Env:       env(0),
			Timeout:   6 * time.Minute,
			MaxOutput: 1 << 20,
		})
		if err != nil {
			t.Fatal(err)
		}
		out = string(r.Stdout) + string(r.Stderr)
		t.Logf("guest %s, conformance in one process (%v):\n%s", a.Name, r.Duration.Round(time.Millisecond), out)
		checkGuestRun(t, out, r.Err(), conformanceNames("TestGuestConformance"), knownSkips("TestGuestConformance"))
	})

	t.Run("conformance", func(t *testing.T) {
		// The suite unchanged, across the link: passive half in b, active
		// half in a.
		run := []string{guestBinary, "-test.run", "^TestGuestConformancePeer$", "-test.v", "-test.count=1", "-test.timeout=5m"}
		cr, sr, err := f.RunPair(ctx,
			vmtest.Cmd{Args: run, Env: env(1, envRole+"=passive"), Timeout: 6 * time.Minute, MaxOutput: 1 << 20},
			vmtest.Cmd{Args: run, Env: env(0, envRole+"=active", envPeer+"="+f.IPs[1]), Timeout: 6 * time.Minute, MaxOutput: 1 << 20})
		if err != nil {
			t.Fatal(err)
		}
		aout := string(cr.Stdout) + string(cr.Stderr)
		pout := string(sr.Stdout) + string(sr.Stderr)
		t.Logf("active half in %s (%v):\n%s\npassive half in %s:\n%s", a.Name, cr.Duration.Round(time.Millisecond), aout, b.Name, pout)
		names, skips := conformanceNames("TestGuestConformancePeer"), knownSkips("TestGuestConformancePeer")
		checkGuestRun(t, aout, cr.Err(), names, skips)
		checkGuestRun(t, pout, sr.Err(), names, skips)
	})

	t.Run("peer", func(t *testing.T) {
		run := []string{guestBinary, "-test.run", "^TestGuestPeer$", "-test.v", "-test.count=1", "-test.timeout=4m"}
		cr, sr, err := f.RunPair(ctx,
			vmtest.Cmd{Args: run, Env: env(1, envRole+"=server"), Timeout: 5 * time.Minute, MaxOutput: 1 << 20},
			vmtest.Cmd{Args: run, Env: env(0, envRole+"=client", envPeer+"="+f.IPs[1]), Timeout: 5 * time.Minute, MaxOutput: 1 << 20})
		if err != nil {
			t.Fatal(err)
		}
		cout := string(cr.Stdout) + string(cr.Stderr)
		sout := string(sr.Stdout) + string(sr.Stderr)
		t.Logf("client in %s:\n%s\nserver in %s:\n%s", a.Name, cout, b.Name, sout)
		checkGuestRun(t, cout, cr.Err(), []string{"TestGuestPeer"}, nil)
		checkGuestRun(t, sout, sr.Err(), []string{"TestGuestPeer"}, nil)
		if t.Failed() {
			return
		}

		// The fair comparison: perftest's native verbs on the same link,
		// same message sizes, counts and window, measured right after.
		ours := parseGuestFigures(cout)
		port := perftestPort
		const bw = "verbs/ibv beside perftest on soft-RoCE: bandwidth"
		for _, size := range []int{peerBig, peerSmall} {
			for _, p := range []struct{ op, tool, depth string }{
				{"send", "ib_send_bw", "-t"}, {"write", "ib_write_bw", "-t"}, {"read", "ib_read_bw", "-o"},
			} {
				port++
				base, err := perftestBW(ctx, f, p.tool, port, size, peerCount(size), p.depth, strconv.Itoa(peerWindow))
				if err != nil {
					t.Errorf("%s: %v", p.tool, err)
					continue
				}
				key := fmt.Sprintf("RATE %s %d", p.op, size)
				if ours[key] == 0 {
					t.Errorf("the guest client printed no %q", key)
				}
				benchRow(bw, fmt.Sprintf("%s %d KiB", strings.ToUpper(p.op), size>>10), "verbs/ibv", ours[key], p.tool, base, "MiB/s")
			}
		}
		benchNote(bw, fmt.Sprintf("%s -> %s, %d in flight, %d MiB at 64 KiB and %d MiB at 4 KiB per op; two TCG guests, link %v; higher is better",
			a.Name, b.Name, peerWindow, peerTotal>>20, peerSmallTot>>20, f.Link))
		const lat = "verbs/ibv beside perftest on soft-RoCE: 64-byte SEND latency"
		for _, mode := range []string{"poll", "event"} {
			port++
			base, err := perftestLat(ctx, f, port, mode == "event")
			if err != nil {
				t.Errorf("ib_send_lat (%s): %v", mode, err)
				continue
			}
			key := fmt.Sprintf("LAT %s %d", mode, peerLatSize)
			if ours[key] == 0 {
				t.Errorf("the guest client printed no %q", key)
			}
			tool := "ib_send_lat"
			if mode == "event" {
				tool += " -e"
			}
			benchRow(lat, mode+" mode", "verbs/ibv", ours[key], tool, base, "µs")
		}
		benchNote(lat, fmt.Sprintf("perftest's t_avg (half the average round trip, the 2 slowest left out), %d timed ping-pongs after %d untimed; poll: both sides busy-poll the CQ (ibv.Spin), event: both wait on the completion channel; lower is better",
			peerLatIters, peerLatWarm))
	})
}

// guestFigureRE matches the client's "RATE op size MiB/s" and "LAT mode
// size µs" lines.
var guestFigureRE = regexp.MustCompile(`(?m)^((?:RATE|LAT) \w+ \d+) ([0-9.]+)$`)

// parseGuestFigures maps "RATE send 65536" (etc.) to its figure.
func parseGuestFigures(out string) map[string]float64 {
	m := map[string]float64{}
	for _, g := range guestFigureRE.FindAllStringSubmatch(out, -1) {
		m[g[1]], _ = strconv.ParseFloat(g[2], 64)
	}
	return m
}

// benchRow prints one row of a VM-tier benchmark table for cmd/benchtab
// (make bench): our figure beside the baseline measured in the same run.
func benchRow(table, row, ours string, oursV float64, base string, baseV float64, unit string) {
	fmt.Printf("BENCHVM %s|%s|%s|%.2f|%s|%.2f|%s\n", table, row, ours, oursV, base, baseV, unit)
}

// benchNote prints a note under a VM-tier table.
func benchNote(table, note string) {
	fmt.Printf("BENCHVM-NOTE %s|%s\n", table, note)
}

// perftestPort is the first TCP port perftest exchanges QP details on.
const perftestPort = 18540

// perftestBW runs a perftest bandwidth tool with n messages of size bytes
// from guest 0 to guest 1 and returns the client's average in MiB/s
// (perftest's MB is 2^20 bytes).
func perftestBW(ctx context.Context, f *vmtest.Fabric, tool string, port, size, n int, depthFlag, depth string) (float64, error) {
	args := []string{tool, "-d", vmtest.RXEDevice, "-F", "-p", strconv.Itoa(port), "-s", strconv.Itoa(size), "-n", strconv.Itoa(n), depthFlag, depth}
	return perftest.Run(ctx, f, args, func(out string) (float64, error) { return perftest.BW(out, size) })
}

// perftestLat runs ib_send_lat with 64-byte messages, on events when
// event, and returns its average (half the round trip) in µs.
func perftestLat(ctx context.Context, f *vmtest.Fabric, port int, event bool) (float64, error) {
	args := []string{"ib_send_lat", "-d", vmtest.RXEDevice, "-F", "-p", strconv.Itoa(port), "-s", strconv.Itoa(peerLatSize), "-n", strconv.Itoa(peerLatIters)}
	if event {
		args = append(args, "-e")
	}
	return perftest.Run(ctx, f, args, func(out string) (float64, error) { return perftest.Lat(out, peerLatSize) })
}

var resultRE = regexp.MustCompile(`(?m)^\s*--- (PASS|FAIL|SKIP): (\S+)`)

// checkGuestRun fails unless every named test passed, every test in skips
// skipped with its message in the output, and nothing else failed or
// skipped.
func checkGuestRun(t *testing.T, out string, exit error, names []string, skips map[string]string) {
	t.Helper()
	got := map[string]string{}
	for _, m := range resultRE.FindAllStringSubmatch(out, -1) {
		got[m[2]] = m[1]
		if _, known := skips[m[2]]; m[1] != "PASS" && !(known && m[1] == "SKIP") {
			t.Errorf("%s: %s", m[2], m[1])
		}
	}
	for _, n := range names {
		if got[n] != "PASS" {
			t.Errorf("%s did not pass (result %q)", n, got[n])
		}
	}
	for n, msg := range skips {
		if got[n] != "SKIP" || !strings.Contains(out, msg) {
			t.Errorf("%s: result %q, want a skip as a known deviation (%q)", n, got[n], msg)
		}
	}
	if exit != nil {
		t.Errorf("guest test binary: %v", firstLine(exit))
	}
}

func firstLine(err error) string {
	s := fmt.Sprint(err)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}
