package virtiofs_test

import (
	"context"
	"crypto/sha256"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vsdp/vsdp/vhost"
	"github.com/vsdp/vsdp/vhost/vhosttest"
	"github.com/vsdp/vsdp/vhost/virtiofs"
	"github.com/vsdp/vsdp/vhost/virtiofs/virtiofstest"
	"github.com/vsdp/vsdp/vmtest"
)

// TestVMVirtiofs boots one guest with a vhost-user-fs-pci device
// (queue-size 1024) served by the device over an in-memory filesystem: the
// stock virtiofs driver mounts it, a file reads back, 8 MiB written with
// dd bs=1M (multi-page requests) arrives intact (sha256 on the host) and
// reads back intact, the directory lists, and the mount comes off cleanly.
func TestVMVirtiofs(t *testing.T) {
	vmtest.Require(t)
	vhosttest.CheckLeaks(t)
	mem := virtiofstest.NewMemFS(map[string][]byte{"hello": []byte(hello)}, nil)
	raw := mem.RawFS()
	var dev *virtiofs.Device
	devs := make(chan *virtiofs.Device, 4)
	srv := &vhost.Server{NewDevice: func() (vhost.Device, error) {
		d, err := virtiofs.New(raw, virtiofs.Options{})
		if err == nil {
			devs <- d
		}
		return d, err
	}}
	sock := filepath.Join(t.TempDir(), "fs.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	t.Cleanup(func() { // after the VM's own cleanup: QEMU goes before its back-end
		srv.Close()
		select {
		case <-served:
		case <-time.After(10 * time.Second):
			t.Error("vhost server did not stop")
		}
	})
	const tag = "vsdpfs"
	v := vmtest.Start(t, vmtest.Options{
		Name:      "virtiofs",
		VhostUser: []vmtest.VhostUser{{Kind: vmtest.VhostFS, Socket: sock, Tag: tag, QueueSize: 1024}},
	})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const n = 8 << 20
	script := fmt.Sprintf("set -e; mkdir -p /mnt/v; mount -t virtiofs %s /mnt/v; "+
		"echo CAT; cat /mnt/v/hello; "+
		"head -c %d /dev/urandom > /tmp/src; dd if=/tmp/src of=/mnt/v/big bs=1M 2>/dev/null; "+
		"echo SRC $(sha256sum < /tmp/src); echo BACK $(sha256sum < /mnt/v/big); "+
		"echo LS $(ls /mnt/v); umount /mnt/v; echo DONE", tag, n)
	r, err := v.Exec(ctx, vmtest.Cmd{Args: []string{"sh", "-c", script}, Timeout: 2 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	out := string(r.Stdout)
	if err := r.Err(); err != nil {
		t.Fatalf("%v\nstdout: %s\nstderr: %s", err, out, r.Stderr)
	}
	select {
	case dev = <-devs:
	default:
		t.Fatal("no device was created")
	}
	field := func(key string) string {
		for _, line := range strings.Split(out, "\n") {
			if rest, ok := strings.CutPrefix(line, key+" "); ok {
				return strings.Fields(rest + " -")[0]
			}
		}
		t.Fatalf("no %s line in %q", key, out)
		return ""
	}
	if !strings.Contains(out, "CAT\n"+hello) {
		t.Errorf("cat of hello: %q", out)
	}
	big := mem.File("big")
	if big == nil {
		t.Fatal("the guest's file is not in the filesystem")
	}
	content := big.Bytes()
	host := fmt.Sprintf("%x", sha256.Sum256(content))
	if len(content) != n || host != field("SRC") {
		t.Errorf("host holds %d bytes with sha256 %s; the guest wrote %d with %s", len(content), host, n, field("SRC"))
	}
	if back := field("BACK"); back != host {
		t.Errorf("read back sha256 %s, want %s", back, host)
	}
	ls := strings.Fields(strings.TrimPrefix(out[strings.Index(out, "LS "):], "LS "))
	if len(ls) < 3 || !strings.Contains(strings.Join(ls, " "), "big hello sub") {
		t.Errorf("ls: %q", ls)
	}
	s := dev.Stats()
	t.Logf("device stats: %+v", s)
	if s.BadChains != 0 || s.MaxReadable <= 64<<10 || s.Requests < n/(1<<20) {
		t.Errorf("stats %+v: want no bad chains and multi-page writes", s)
	}
}
