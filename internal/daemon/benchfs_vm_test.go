package daemon_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/vsdp/vsdp/internal/daemon"
	"github.com/vsdp/vsdp/vmtest"
)

// virtiofsd is QEMU's own virtio-fs back-end (Debian's qemu-system-common).
const virtiofsd = "/usr/lib/qemu/virtiofsd"

// timed matches what the guest script prints: a byte count and
// busybox time's "real Xm Y.YYs".
var timed = regexp.MustCompile(`(?s)bytes=(\d+).*real\s+(\d+)m\s*([0-9.]+)s`)

// TestVMBenchSocketFS measures bulk throughput through a socket filesystem
// data file (guest -> virtio-fs device -> sdpback -> SDP -> exported host
// service and back) beside QEMU's virtiofsd (cache=none) reading and
// writing a plain file, in one guest with both devices, both driven by the
// same busybox dd with 1 MiB requests. It prints BENCHVM rows for
// cmd/benchtab (make bench); it asserts only that the data moved.
func TestVMBenchSocketFS(t *testing.T) {
	vmtest.Require(t)
	if _, err := os.Stat(virtiofsd); err != nil {
		t.Fatalf("%v: install qemu-system-common (make deps)", err)
	}
	const size = 64 << 20
	blob := make([]byte, size)
	rand.Read(blob)
	blobLn := serveTCP(t, func(c net.Conn) { c.Write(blob) })
	sunk := make(chan int64, 1)
	sinkLn := serveTCP(t, func(c net.Conn) { n, _ := io.Copy(io.Discard, c); sunk <- n })
	dir := t.TempDir()
	share := filepath.Join(dir, "share")
	if err := os.Mkdir(share, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(share, "blob"), blob, 0o644); err != nil {
		t.Fatal(err)
	}
	vfsSock := filepath.Join(dir, "virtiofsd.sock")
	vfsd := exec.Command(virtiofsd, "--socket-path="+vfsSock, "-o", "source="+share, "-o", "cache=none")
	vfsLog, err := os.Create(filepath.Join(dir, "virtiofsd.log"))
	if err != nil {
		t.Fatal(err)
	}
	vfsd.Stdout, vfsd.Stderr = vfsLog, vfsLog
	if err := vfsd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vfsd.Process.Kill(); vfsd.Wait() }) // by PID: the one we started
	for i := 0; ; i++ {
		if _, err := os.Stat(vfsSock); err == nil {
			break
		} else if i == 100 {
			b, _ := os.ReadFile(vfsLog.Name())
			t.Fatalf("virtiofsd made no socket: %s", b)
		}
		time.Sleep(50 * time.Millisecond)
	}
	cfg := &daemon.Config{
		Fabric:  daemon.Fabric{Addr: "10.63.0.1"},
		Exports: []daemon.ExportConfig{{Port: 80, Target: blobLn}, {Port: 9, Target: sinkLn}},
		VMs: []daemon.VMConfig{{Name: "bench", Socket: filepath.Join(dir, "vsock.sock"), FSSocket: filepath.Join(dir, "fs.sock"),
			CID: 5, Addr: "10.63.0.5", Policy: []string{"sdp 10.63.0.0/24"}}},
	}
	startDaemon(t, cfg) // before the VM: QEMU goes before its back-end
	vm := vmtest.Start(t, vmtest.Options{
		Name: "fsbench",
		VhostUser: []vmtest.VhostUser{
			{Kind: vmtest.VhostFS, Socket: cfg.VMs[0].FSSocket, Tag: "vsdpnet"},
			{Kind: vmtest.VhostFS, Socket: vfsSock, Tag: "hostfs"},
		},
	})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	run := func(script string) string {
		t.Helper()
		r := guestShell(t, ctx, vm, nil, script)
		out := string(r.Stdout) + string(r.Stderr)
		if r.ExitCode != 0 {
			t.Fatalf("%s: exit %d:\n%s", script, r.ExitCode, out)
		}
		return out
	}
	rate := func(out string) float64 {
		t.Helper()
		m := timed.FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("no byte count and time in:\n%s", out)
		}
		n, _ := strconv.ParseFloat(m[1], 64)
		mins, _ := strconv.ParseFloat(m[2], 64)
		s, _ := strconv.ParseFloat(m[3], 64)
		s += 60 * mins
		if n != size || s <= 0 {
			t.Fatalf("dd moved %v bytes in %v s, want %d:\n%s", n, s, size, out)
		}
		return n / s / (1 << 20)
	}
	run("mkdir -p /net /hostfs && mount -t virtiofs vsdpnet /net && mount -t virtiofs hostfs /hostfs")
	const cnt = size >> 20
	// Every case is timed the same way: busybox time around a shell
	// running dd with 1 MiB requests; reads land in tmpfs, whose size is
	// the byte count.
	readCmd := func(path string) string {
		return fmt.Sprintf(`time dd if=%s of=/tmp/r bs=1M; echo bytes=$(stat -c %%s /tmp/r); rm /tmp/r`, path)
	}
	writeCmd := func(path, extra string) string { // the host checks the bytes that arrived
		return fmt.Sprintf(`time sh -c "dd if=/dev/zero of=%s bs=1M count=%d 2>/dev/null%s"; echo bytes=%d`, path, cnt, extra, size)
	}
	sockRead := rate(run(`exec 3<>/net/tcp/clone; read n <&3; echo "connect 10.63.0.1!80" >&3 || exit 1
` + readCmd("/net/tcp/$n/data")))
	sockWrite := rate(run(`exec 3<>/net/tcp/clone; read n <&3; echo "connect 10.63.0.1!9" >&3 || exit 1
` + writeCmd("/net/tcp/$n/data", "; echo shutdown >&3")))
	select {
	case n := <-sunk:
		if n != size {
			t.Fatalf("the sink got %d bytes, want %d", n, size)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the sink saw no end of stream")
	}
	fileRead := rate(run(readCmd("/hostfs/blob")))
	fileWrite := rate(run(writeCmd("/hostfs/out", "; sync")))
	if fi, err := os.Stat(filepath.Join(share, "out")); err != nil || fi.Size() != size {
		t.Fatalf("virtiofsd's file: %v %v", fi, err)
	}
	const table = "Socket filesystem vs virtiofsd (64 MiB, dd bs=1M, TCG guest)"
	fmt.Printf("BENCHVM %s|read|sockfs data file (SDP)|%.1f|virtiofsd cache=none, plain file|%.1f|MiB/s\n", table, sockRead, fileRead)
	fmt.Printf("BENCHVM %s|write|sockfs data file (SDP)|%.1f|virtiofsd cache=none, plain file|%.1f|MiB/s\n", table, sockWrite, fileWrite)
	fmt.Printf("BENCHVM-NOTE %s|one TCG guest with both vhost-user-fs devices (queue-size 1024), one boot; rates from busybox dd in the guest (guest clock); the sockfs bytes cross SDP on the pure-Go provider to a host TCP service\n", table)
	t.Logf("sockfs read %.1f write %.1f MiB/s; virtiofsd read %.1f write %.1f MiB/s", sockRead, sockWrite, fileRead, fileWrite)
}
