package vmtest

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vsdp/vsdp/images"
	"github.com/vsdp/vsdp/vhost"
	"github.com/vsdp/vsdp/vhost/vhosttest"
	"github.com/vsdp/vsdp/vhost/vsock"
)

// traceFile is the recorded QEMU 7.2 conversation the host tier replays
// (vhost/trace_test.go). Set VSDP_RECORD_TRACE=1 to rewrite it.
const traceFile = "../vhost/testdata/qemu72-vsock-trace.json"

// TestVMQEMUTrace records what QEMU really sends a vhost-user-vsock
// back-end through a recording proxy: boot, unloading and reloading the
// guest's vsock transport, and a guest reset. Both stops must end in
// SET_VRING_ENABLE(0) and GET_VRING_BASE for each ring and be followed by a
// full renegotiation (features, memory, ring set-up, enable).
func TestVMQEMUTrace(t *testing.T) {
	Require(t)
	dir := t.TempDir()
	backSock, proxySock := filepath.Join(dir, "back.sock"), filepath.Join(dir, "proxy.sock")
	srv := &vhost.Server{NewDevice: func() (vhost.Device, error) {
		return vsock.New(vsock.Config{CID: vsockCID}, &echoBackend{})
	}}
	l, err := net.Listen("unix", backSock)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	rec, err := vhosttest.NewRecorder(proxySock, backSock)
	if err != nil {
		t.Fatal(err)
	}
	// Cleanups run last-in first-out: the VM (registered by Start below)
	// goes first, then the proxy, whose connections end with QEMU.
	t.Cleanup(rec.Close)
	v := Start(t, Options{
		Name:      "trace",
		Reboot:    true,
		VhostUser: []VhostUser{{Kind: VhostVsock, Socket: proxySock}},
		Image:     images.Spec{Programs: []images.Program{{Package: vsockProg, Path: "/bin/vsockcat"}}},
	})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if got := strings.TrimSpace(v.Check(t, "vsockcat", "-local-cid")); got != "42" {
		t.Fatalf("guest CID %q", got)
	}
	count := func(name string) int {
		return len(slices.DeleteFunc(rec.Trace("").Requests(), func(s string) bool { return s != name }))
	}
	waitFor := func(name string, n int) {
		t.Helper()
		deadline := time.Now().Add(60 * time.Second)
		for count(name) < n {
			if time.Now().After(deadline) {
				t.Fatalf("QEMU sent %d %s, want %d:\n%s", count(name), name, n, strings.Join(rec.Trace("").Requests(), " "))
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	waitFor("SET_VRING_ENABLE", 2)
	rec.Note("guest: rmmod vmw_vsock_virtio_transport")
	v.Check(t, "rmmod", "vmw_vsock_virtio_transport")
	waitFor("GET_VRING_BASE", 2)
	rec.Note("guest: insmod vmw_vsock_virtio_transport")
	v.Check(t, "sh", "-c", "insmod $(find /lib/modules -name vmw_vsock_virtio_transport.ko)")
	waitFor("SET_VRING_ENABLE", 6) // 2 at boot, 2 disables at rmmod, 2 again now
	rec.Note("host: QMP system_reset")
	if err := v.Reset(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor("GET_VRING_BASE", 4)
	waitFor("SET_VRING_ENABLE", 10)
	if got := strings.TrimSpace(v.Check(t, "vsockcat", "-local-cid")); got != "42" {
		t.Fatalf("after reset, guest CID %q", got)
	}
	tr := rec.Trace("QEMU 7.2 (Debian), vhost-user-vsock-pci, Debian 6.1 guest: boot, rmmod+insmod of the vsock transport, system_reset")
	// Every stop is SET_VRING_ENABLE(0) then GET_VRING_BASE per ring, and
	// each is followed by SET_FEATURES and SET_MEM_TABLE (renegotiation).
	reqs := tr.Requests()
	stops := 0
	for i, r := range reqs {
		if r != "GET_VRING_BASE" {
			continue
		}
		stops++
		if !slices.Contains(reqs[:i], "SET_VRING_ENABLE") {
			t.Errorf("GET_VRING_BASE at %d without an earlier SET_VRING_ENABLE", i)
		}
	}
	if stops < 4 {
		t.Errorf("%d GET_VRING_BASE, want at least 4 (two stops of two rings)", stops)
	}
	if n := count("SET_FEATURES"); n < 3 {
		t.Errorf("%d SET_FEATURES, want 3 negotiations (boot, reload, reset)", n)
	}
	if os.Getenv("VSDP_RECORD_TRACE") == "1" {
		if err := tr.Save(traceFile); err != nil {
			t.Fatal(err)
		}
		t.Logf("wrote %s (%d messages)", traceFile, len(tr.Msgs))
	}
}
