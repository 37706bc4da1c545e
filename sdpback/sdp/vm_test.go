//go:build linux && cgo

package sdp_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/vsdp/vsdp/images"
	"github.com/vsdp/vsdp/vmtest"
)

const sdpGuestBinary = "/bin/sdp.test"

// TestVMSDPOverIbv runs the SDP engine on real kernel RDMA: two TCG guests
// with soft-RoCE, the engine on verbs/ibv (RDMA_PS_TCP and the compact
// Hello, since rdma-core cannot listen on SDP service IDs). nettest runs in
// one guest (rxe loopback); the echo integrity test and 64-byte round trips
// run across the link; then the ULP comparison (bench_vm_test.go): SDP
// beside perftest's native verbs and kernel TCP on the same link.
func TestVMSDPOverIbv(t *testing.T) {
	vmtest.Require(t)
	f := vmtest.StartFabric(t, vmtest.FabricOptions{
		Guest: vmtest.Options{
			Name:      "sdp",
			MemoryMiB: 768,
			Image: images.Spec{Programs: []images.Program{
				{Package: "./sdpback/sdp", Test: true, CGO: true, Path: sdpGuestBinary},
			}},
		},
	})
	a, b := f.Guests[0], f.Guests[1]
	ctx, cancel := context.WithTimeout(context.Background(), 9*time.Minute)
	defer cancel()
	env := func(i int, extra ...string) []string {
		return append([]string{envDevice + "=" + vmtest.RXEDevice, envAddr + "=" + f.IPs[i]}, extra...)
	}
	check := func(t *testing.T, who string, out string, err error, tests ...string) {
		t.Helper()
		t.Logf("%s:\n%s", who, out)
		if err != nil {
			t.Errorf("%s: %v", who, err)
		}
		for _, name := range tests {
			if !strings.Contains(out, "--- PASS: "+name+" ") {
				t.Errorf("%s: %s did not pass", who, name)
			}
		}
		if strings.Contains(out, "--- SKIP") {
			t.Errorf("%s: a guest test skipped", who)
		}
	}
	t.Run("nettest over rxe loopback", func(t *testing.T) {
		r, err := a.Exec(ctx, vmtest.Cmd{Args: []string{sdpGuestBinary, "-test.run", "^TestGuestSDPNetConn$", "-test.v", "-test.count=1", "-test.timeout=4m"},
			Env: env(0), Timeout: 5 * time.Minute, MaxOutput: 1 << 20})
		if err != nil {
			t.Fatal(err)
		}
		check(t, a.Name, string(r.Stdout)+string(r.Stderr), r.Err(), "TestGuestSDPNetConn")
	})
	t.Run("echo across the link", func(t *testing.T) {
		run := []string{sdpGuestBinary, "-test.run", "^TestGuestSDPPeer$", "-test.v", "-test.count=1", "-test.timeout=4m"}
		cr, sr, err := f.RunPair(ctx,
			vmtest.Cmd{Args: run, Env: env(1, envRole+"=server"), Timeout: 5 * time.Minute, MaxOutput: 1 << 20},
			vmtest.Cmd{Args: run, Env: env(0, envRole+"=client", envPeer+"="+f.IPs[1]), Timeout: 5 * time.Minute, MaxOutput: 1 << 20})
		if err != nil {
			t.Fatal(err)
		}
		check(t, "client "+a.Name, string(cr.Stdout)+string(cr.Stderr), cr.Err(), "TestGuestSDPPeer")
		check(t, "server "+b.Name, string(sr.Stdout)+string(sr.Stderr), sr.Err(), "TestGuestSDPPeer")
	})
	t.Run("ULP comparison", func(t *testing.T) { ulpCompare(ctx, t, f) })
}
