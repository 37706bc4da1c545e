package vmtest

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vsdp/vsdp/images"
	"github.com/vsdp/vsdp/vhost"
	"github.com/vsdp/vsdp/vhost/vsock"
)

func memfdMappings(t *testing.T) int {
	b, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(string(b), "/memfd:")
}

// TestVMQEMUKilled serves two guests from one vhost-user server. Both
// drivers reach DRIVER_OK with both rings started and kicked (seen from
// the guest's /sys/bus/virtio and from the server's counters). Then the
// first guest's QEMU is killed mid-traffic: its session ends and releases
// its guest memory mappings, and the second guest keeps echoing.
func TestVMQEMUKilled(t *testing.T) {
	Require(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "vsock.sock")
	srv := &vhost.Server{NewDevice: func() (vhost.Device, error) {
		return vsock.New(vsock.Config{CID: vsockCID}, &echoBackend{})
	}}
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	image := images.Spec{Programs: []images.Program{{Package: vsockProg, Path: "/bin/vsockcat"}}}
	a := Start(t, Options{Name: "victim", Image: image, VhostUser: []VhostUser{{Kind: VhostVsock, Socket: sock}}})
	b := Start(t, Options{Name: "survivor", Image: image, VhostUser: []VhostUser{{Kind: VhostVsock, Socket: sock}}})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	for _, v := range []*VM{a, b} {
		// virtio device 0x0013 is vsock; status 0xf = ACKNOWLEDGE |
		// DRIVER | DRIVER_OK | FEATURES_OK.
		out := v.Check(t, "sh", "-c", "for d in /sys/bus/virtio/devices/*; do if [ $(cat $d/device) = 0x0013 ]; then cat $d/status; fi; done")
		if strings.TrimSpace(out) != "0x0000000f" && strings.TrimSpace(out) != "0xf" && strings.TrimSpace(out) != "15" {
			t.Fatalf("%s: vsock device status %q, want DRIVER_OK|FEATURES_OK (0xf)", v.Name, out)
		}
	}
	if got := len(srv.Sessions()); got != 2 {
		t.Fatalf("%d sessions, want 2", got)
	}
	for _, s := range srv.Sessions() {
		if st := s.Stats(); st.RingsStarted < 2 || st.Kicks == 0 {
			t.Fatalf("session %d: %d rings started, %d kicks; want both rings running and kicked", s.ID(), st.RingsStarted, st.Kicks)
		}
	}
	maps := memfdMappings(t)

	// Traffic on the victim, then SIGKILL to its QEMU.
	if _, err := a.Start(ctx, Cmd{Args: []string{"sh", "-c", fmt.Sprintf("head -c 200000000 /dev/zero | vsockcat 2 %d > /dev/null", echoPort)}, Timeout: 2 * time.Minute}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	if err := syscall.Kill(a.Pid(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for len(srv.Sessions()) != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("%d sessions 20 s after the victim's QEMU died, want 1", len(srv.Sessions()))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if st := srv.Stats(); st.Disconnects != 1 {
		t.Fatalf("server stats %+v: want one disconnect", st)
	}
	for deadline := time.Now().Add(10 * time.Second); memfdMappings(t) >= maps; {
		if time.Now().After(deadline) {
			t.Fatalf("memfd mappings %d, not fewer than the %d before the kill: the dead guest's memory is still mapped", memfdMappings(t), maps)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// The survivor is unaffected.
	out := b.Check(t, "sh", "-c", fmt.Sprintf("head -c 65536 /dev/urandom > /tmp/in; vsockcat 2 %d < /tmp/in > /tmp/out; sha256sum /tmp/in /tmp/out; wc -c < /tmp/out", echoPort))
	checkEcho(t, out, 1, 65536)
}
