package daemon_test

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vsdp/vsdp/internal/daemon"
	"github.com/vsdp/vsdp/sdpback/sdp"
	"github.com/vsdp/vsdp/vmtest"
)

// TestVMSocketFS boots one guest whose only device is vsdpd's socket
// filesystem (vhost-user-fs, no network at all) and drives /net from a
// busybox shell, as a script would: request and reply through an export,
// 64 MiB each way through a data file (sha256 on both sides, and the VM's
// stream counters), a guest announce accepting a host SDP client with the
// right remote address, and the errors a shell sees: a bad ctl command,
// a refused connect (with status saying why) and a reset stream.
func TestVMSocketFS(t *testing.T) {
	vmtest.Require(t)
	const size = 64 << 20
	down := newDemoBlob(size)
	blobLn := serveTCP(t, func(c net.Conn) { c.Write(down.data) })
	echoLn := serveTCP(t, func(c net.Conn) { io.Copy(c, c) })
	upSums := make(chan [32]byte, 1)
	upCounts := make(chan int64, 1)
	sinkLn := serveTCP(t, func(c net.Conn) {
		h := sha256.New()
		n, _ := io.Copy(h, c)
		upCounts <- n
		upSums <- [32]byte(h.Sum(nil))
	})
	dir := t.TempDir()
	cfg := &daemon.Config{
		Fabric: daemon.Fabric{Addr: "10.62.0.1"},
		Exports: []daemon.ExportConfig{{Port: 80, Target: blobLn}, {Port: 7, Target: echoLn},
			{Port: 9, Target: sinkLn}},
		VMs: []daemon.VMConfig{{Name: "fsguest", Socket: filepath.Join(dir, "vsock.sock"), FSSocket: filepath.Join(dir, "fs.sock"),
			CID: 5, Addr: "10.62.0.5", Policy: []string{"deny 10.62.0.9 EACCES", "sdp 10.62.0.0/24"}}},
	}
	d := startDaemon(t, cfg) // before the VM: QEMU goes before its back-end
	vm := vmtest.Start(t, vmtest.Options{
		Name:      "sockfs",
		VhostUser: []vmtest.VhostUser{{Kind: vmtest.VhostFS, Socket: cfg.VMs[0].FSSocket, Tag: "vsdpnet"}},
	})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	sh := func(script string) (string, int) {
		t.Helper()
		r := guestShell(t, ctx, vm, nil, script)
		return string(r.Stdout) + string(r.Stderr), r.ExitCode
	}
	if out, rc := sh("mkdir -p /net && mount -t virtiofs vsdpnet /net && ls /net /net/tcp"); rc != 0 ||
		!strings.Contains(out, "clone") || !strings.Contains(out, "policy") {
		t.Fatalf("mount: rc %d: %s", rc, out)
	}
	back := d.VMs()[0].Back

	t.Run("request and reply from a shell", func(t *testing.T) {
		out, rc := sh(`exec 3<>/net/tcp/clone; read n <&3; echo "connect 10.62.0.1!7" >&3 || exit 1
d=/net/tcp/$n
echo hello-over-sockfs > $d/data; echo shutdown >&3
cat $d/data; cat $d/status $d/remote`)
		if rc != 0 || !strings.Contains(out, "hello-over-sockfs") || !strings.Contains(out, "10.62.0.1!7") {
			t.Fatalf("rc %d:\n%s", rc, out)
		}
	})
	t.Run("64 MiB down and up through data files", func(t *testing.T) {
		before := back.Stats()
		// The transfers are timed on their own (busybox time); generating
		// and hashing 64 MiB under TCG is not the path being measured.
		out, rc := sh(`exec 3<>/net/tcp/clone; read n <&3; echo "connect 10.62.0.1!80" >&3 || exit 1
time dd if=/net/tcp/$n/data of=/tmp/down bs=1M 2>&1 | grep real; sha256sum /tmp/down; rm /tmp/down; cat /net/tcp/$n/stats`)
		if want := fmt.Sprintf("%x", down.sum); rc != 0 || !strings.Contains(out, want) || !strings.Contains(out, fmt.Sprint(size)) {
			t.Fatalf("download: rc %d, want sha256 %s and %d bytes in the stats file:\n%s", rc, want, size, out)
		}
		t.Logf("download: %s", strings.Join(strings.Fields(out), " "))
		out, rc = sh(`head -c 67108864 /dev/urandom > /tmp/up; sha256sum /tmp/up
exec 3<>/net/tcp/clone; read n <&3; echo "connect 10.62.0.1!9" >&3 || exit 1
time dd if=/tmp/up of=/net/tcp/$n/data bs=1M 2>&1 | grep real; echo shutdown >&3; rm /tmp/up; cat /net/tcp/$n/stats`)
		if rc != 0 {
			t.Fatalf("upload: rc %d:\n%s", rc, out)
		}
		t.Logf("upload: %s", strings.Join(strings.Fields(out), " "))
		var sum [32]byte
		select {
		case sum = <-upSums:
		case <-time.After(30 * time.Second):
			t.Fatal("the sink saw no end of stream")
		}
		if n := <-upCounts; n != size || !strings.Contains(out, fmt.Sprintf("%x", sum)) {
			t.Fatalf("upload: sink got %d bytes with sha256 %x; guest said:\n%s", n, sum, out)
		}
		after := back.Stats()
		if after.ToGuest-before.ToGuest != size || after.FromGuest-before.FromGuest != size {
			t.Fatalf("VM counters moved %d to and %d from the guest, want %d each",
				after.ToGuest-before.ToGuest, after.FromGuest-before.FromGuest, size)
		}
	})
	t.Run("announce and listen accept a host SDP client", func(t *testing.T) {
		p, err := vm.Start(ctx, vmtest.Cmd{Args: []string{"/bin/sh", "-c", `exec 3<>/net/tcp/clone; read n <&3
echo "announce *!5000" >&3 || exit 1
exec 4</net/tcp/$n/listen; read m <&4
cat /net/tcp/$m/remote; head -c 9 /net/tcp/$m/data; echo from-guest > /net/tcp/$m/data`}, Timeout: time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		var c net.Conn
		for i := 0; ; i++ { // until the guest has announced
			dctx, dcancel := context.WithTimeout(ctx, 5*time.Second)
			c, err = d.HostStack().Dial(dctx, netip.MustParseAddrPort("10.62.0.5:5000"))
			dcancel()
			if err == nil || i == 100 {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil {
			t.Fatalf("host SDP client: %v", err)
		}
		defer c.Close()
		c.Write([]byte("from-host"))
		c.SetReadDeadline(time.Now().Add(time.Minute))
		reply, _ := io.ReadAll(io.LimitReader(c, 11))
		r, err := p.Wait(ctx)
		if err != nil {
			t.Fatal(err)
		}
		out := string(r.Stdout) + string(r.Stderr)
		local := c.LocalAddr().(sdp.Addr).AddrPort
		want := fmt.Sprintf("%s!%d", local.Addr(), local.Port())
		if r.ExitCode != 0 || !strings.Contains(out, want) || !strings.Contains(out, "from-host") || string(reply) != "from-guest\n" {
			t.Fatalf("guest listener: rc %d, host got %q, want remote %s:\n%s", r.ExitCode, reply, want, out)
		}
	})
	t.Run("errors a shell sees", func(t *testing.T) {
		abortingPeer(t, ctx, d.HostStack(), 6, []byte("partial"))
		out, _ := sh(`exec 3<>/net/tcp/clone; read n <&3
echo bogus >&3; echo "bad=$?"
echo "connect 10.62.0.1!81" >&3; echo "refused=$?"; cat /net/tcp/$n/status
exec 4<>/net/tcp/clone; read k <&4
echo "connect 10.62.0.9!80" >&4; echo "denied=$?"
exec 5<>/net/tcp/clone; read r <&5
echo "connect 10.62.0.1!6" >&5; cat /net/tcp/$r/data; echo "reset=$?"`)
		for _, want := range []string{"Invalid argument", "bad=1", "Connection refused", "refused=1",
			"Permission denied", "denied=1", "partial", "Connection reset by peer", "reset=1"} {
			if !strings.Contains(out, want) {
				t.Fatalf("shell output lacks %q:\n%s", want, out)
			}
		}
		if !strings.Contains(strings.ToLower(out), "refused") {
			t.Fatalf("status does not say why:\n%s", out)
		}
	})
}
