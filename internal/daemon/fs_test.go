package daemon_test

import (
	"crypto/sha256"
	"errors"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/vsdp/vsdp/internal/daemon"
	"github.com/vsdp/vsdp/sdpback"
	"github.com/vsdp/vsdp/vhost/vhosttest"
	"github.com/vsdp/vsdp/vhost/virtiofs/virtiofstest"
)

// fsGuest is a guest's FUSE client on a VM's socket filesystem, through the
// fake front-end and vsdpd's vhost-user-fs socket.
type fsGuest struct {
	t *testing.T
	c *virtiofstest.Client
}

func startFS(t *testing.T, cfg *daemon.Config) (*daemon.Daemon, *fsGuest) {
	t.Helper()
	d := startDaemon(t, cfg)
	dev := frontEnd(t, cfg.VMs[0].FSSocket, vhosttest.DeviceOptions{MemSize: 64 << 20, QueueSize: 1024, EventIdx: true, Indirect: true})
	c, err := virtiofstest.New(dev, virtiofstest.Options{Seg: 4096, Uid: 1000, Gid: 1000, Pid: 42})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	if _, err := c.Init(); err != nil {
		t.Fatalf("FUSE_INIT: %v", err)
	}
	return d, &fsGuest{t: t, c: c}
}

func (g *fsGuest) lookup(path string) uint64 {
	g.t.Helper()
	node := uint64(fuse.FUSE_ROOT_ID)
	for _, n := range strings.Split(path, "/") {
		e, err := g.c.Lookup(node, n)
		if err != nil {
			g.t.Fatalf("lookup %s: %v", path, err)
		}
		node = e.NodeId
	}
	return node
}

type fsFile struct {
	g        *fsGuest
	node, fh uint64
}

func (g *fsGuest) open(path string, flags uint32) *fsFile {
	g.t.Helper()
	node := g.lookup(path)
	o, err := g.c.Open(node, flags)
	if err != nil {
		g.t.Fatalf("open %s: %v", path, err)
	}
	return &fsFile{g: g, node: node, fh: o.Fh}
}

func (f *fsFile) write(b []byte) error {
	for len(b) > 0 {
		k := min(len(b), 128<<10)
		n, err := f.g.c.Write(f.node, f.fh, 0, b[:k])
		if err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

func (f *fsFile) text() string {
	f.g.t.Helper()
	b, err := f.g.c.Read(f.node, f.fh, 0, 4096)
	if err != nil {
		f.g.t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// TestSocketFSFetchesExportOverSDP is the socket filesystem's whole host
// path without QEMU: a guest's FUSE requests through vhost-user-fs and the
// virtio-fs device clone a connection, dial a host service exported over
// SDP, and read its bytes intact (sha256) from the data file; the VM's
// stream table counts them on the SDP path, and a refused destination
// fails the ctl write with ECONNREFUSED.
func TestSocketFSFetchesExportOverSDP(t *testing.T) {
	const size = 4 << 20
	target, sum := serveBlob(t, size)
	dir := t.TempDir()
	cfg := &daemon.Config{
		Fabric:  daemon.Fabric{Addr: "10.51.0.1"},
		Exports: []daemon.ExportConfig{{Port: 8080, Target: target}},
		VMs: []daemon.VMConfig{{Name: "vm1", Socket: filepath.Join(dir, "vsock.sock"), FSSocket: filepath.Join(dir, "fs.sock"),
			CID: 7, Addr: "10.51.0.7", Policy: []string{"sdp 10.51.0.1"}}},
	}
	d, g := startFS(t, cfg)

	ctl := g.open("tcp/clone", syscall.O_RDWR)
	n := ctl.text()
	if _, err := strconv.Atoi(n); err != nil {
		t.Fatalf("clone read %q", n)
	}
	if err := ctl.write([]byte("connect 10.51.0.1!9")); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("connect to a closed port: %v, want ECONNREFUSED", err)
	}
	if st := g.open("tcp/"+n+"/status", syscall.O_RDONLY).text(); !strings.Contains(strings.ToLower(st), "refused") {
		t.Fatalf("status after a refusal: %q", st)
	}
	ctl2 := g.open("tcp/clone", syscall.O_RDWR)
	n2 := ctl2.text()
	if err := ctl2.write([]byte("connect 10.51.0.1!8080")); err != nil {
		t.Fatalf("connect: %v", err)
	}
	data := g.open("tcp/"+n2+"/data", syscall.O_RDWR)
	h := sha256.New()
	got := 0
	for {
		b, err := g.c.Read(data.node, data.fh, 0, 128<<10)
		if err != nil {
			t.Fatal(err)
		}
		if len(b) == 0 {
			break
		}
		h.Write(b)
		got += len(b)
	}
	if got != size || [32]byte(h.Sum(nil)) != sum {
		t.Fatalf("read %d bytes through the data file; content differs or short", got)
	}
	var found bool
	for _, s := range d.VMs()[0].Back.Streams() {
		if s.Path == sdpback.PathSDP && s.ToGuest == size {
			found = true
		}
	}
	if !found {
		t.Fatalf("no SDP stream with %d bytes to the guest in %+v", size, d.VMs()[0].Back.Streams())
	}
	if fs := d.VMs()[0].FS(); fs == nil {
		t.Fatal("VM has no socket filesystem")
	}
}
