package daemon_test

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vsdp/vsdp/images"
	"github.com/vsdp/vsdp/internal/daemon"
	"github.com/vsdp/vsdp/vmtest"
)

func TestMain(m *testing.M) { vmtest.Main(m) }

// TestVMProductPath boots one guest whose only way out is vsdpd's vsock
// device (-nic none) and runs programs we did not write, dynamically
// linked, under libvsdp.so: GNU wget fetches a file from a host HTTP server
// exported over SDP (checked by sha256 in the guest and by vsdpd's
// counters), socat talks to an echo export, and refused and denied
// destinations give the errors a TCP program expects.
func TestVMProductPath(t *testing.T) {
	vmtest.Require(t)
	lib := filepath.Join(guestBuild(t), "build", "guest", "libvsdp.so")
	const size = 16 << 20
	b := newDemoBlob(size)
	httpLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer httpLn.Close()
	go http.Serve(httpLn, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(b.data) }))
	echoLn := serveTCP(t, func(c net.Conn) { io.Copy(c, c) })
	upSums := make(chan string, 1)
	sinkLn := serveTCP(t, func(c net.Conn) {
		h := sha256.New()
		io.Copy(h, c)
		upSums <- fmt.Sprintf("%x", h.Sum(nil))
	})
	sock := filepath.Join(t.TempDir(), "vm.sock")
	copies := newCopyLog()
	cfg := &daemon.Config{
		Fabric: daemon.Fabric{Addr: "10.60.0.1"},
		Exports: []daemon.ExportConfig{{Port: 80, Target: httpLn.Addr().String()}, {Port: 7, Target: echoLn},
			{Port: 9, Target: sinkLn}},
		VMs: []daemon.VMConfig{{Name: "guest", Socket: sock, CID: 5, Addr: "10.60.0.5",
			Policy: []string{"deny 10.60.0.9:* EACCES", "sdp 10.60.0.0/24"}}},
		Touch: copies.touch,
	}
	d := startDaemon(t, cfg) // before the VMs: QEMU goes before its back-end
	vm := vmtest.Start(t, vmtest.Options{
		Name: "product",
		Image: images.Spec{
			Modules:  []string{"vmw_vsock_virtio_transport"},
			Binaries: []string{"/usr/bin/wget", "/usr/bin/socat"},
			Files: []images.File{
				{Path: "/lib/libvsdp.so", Host: lib, Mode: 0o755},
				{Path: "/etc/vsdp.conf", Data: "use sdp client * 10.60.0.0/24:*\n"},
			},
		},
		VhostUser: []vmtest.VhostUser{{Kind: vmtest.VhostVsock, Socket: sock}},
	})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	sh := func(cmd string) *vmtest.Result {
		t.Helper()
		return guestShell(t, ctx, vm, []string{"LD_PRELOAD=/lib/libvsdp.so"}, cmd)
	}
	back := d.VMs()[0].Back

	t.Run("wget fetches an exported host service over SDP", func(t *testing.T) {
		before := back.EngineStats()
		t0 := time.Now()
		r := sh("/usr/bin/wget -q -O - http://10.60.0.1/blob | sha256sum")
		el := time.Since(t0)
		want := fmt.Sprintf("%x", b.sum)
		if got := strings.Fields(string(r.Stdout)); len(got) == 0 || got[0] != want {
			t.Fatalf("guest sha256 %q (exit %d, stderr %q), want %s", r.Stdout, r.ExitCode, r.Stderr, want)
		}
		after := back.EngineStats()
		if got := after.BytesRecv - before.BytesRecv; got < size {
			t.Fatalf("SDP engine received %d bytes for the VM, want at least %d: the path was not SDP", got, size)
		}
		// Exactly one host copy per byte fabric-to-guest: the engine's,
		// from its receive buffers into the guest's; the provider never
		// writes guest memory.
		if recv, copied := after.BytesRecv-before.BytesRecv, after.ReadCopiedBytes-before.ReadCopiedBytes; copied != recv {
			t.Fatalf("engine copied %d bytes into the guest of %d received, want one copy each", copied, recv)
		}
		if _, written := copies.guest(d.VMs()[0].GuestKeys()); written != 0 {
			t.Fatalf("provider wrote %d bytes into guest memory, want 0", written)
		}
		t.Logf("wget: %d MiB in %v (%.1f MiB/s, TCG)", size>>20, el.Round(time.Millisecond), float64(size)/(1<<20)/el.Seconds())
	})
	t.Run("socat uploads with no host copy", func(t *testing.T) {
		const up = 8 << 20
		readBefore, _ := copies.guest(d.VMs()[0].GuestKeys())
		before, devBefore := back.EngineStats(), d.VMs()[0].Device().Stats()
		r := sh(fmt.Sprintf("head -c %d /dev/urandom > /tmp/up && sha256sum /tmp/up && /usr/bin/socat -u FILE:/tmp/up TCP:10.60.0.1:9", up))
		var sum string
		select {
		case sum = <-upSums:
		case <-time.After(time.Minute):
			t.Fatal("the sink saw no end of stream")
		}
		if got := strings.Fields(string(r.Stdout)); r.ExitCode != 0 || len(got) == 0 || got[0] != sum {
			t.Fatalf("guest sha256 %q (exit %d, stderr %q), sink got %s", r.Stdout, r.ExitCode, r.Stderr, sum)
		}
		after, devAfter := back.EngineStats(), d.VMs()[0].Device().Stats()
		readAfter, _ := copies.guest(d.VMs()[0].GuestKeys())
		engineCopied, devCopied := after.CopiedBytes-before.CopiedBytes, devAfter.CopiedBytes-devBefore.CopiedBytes
		t.Logf("upload %d MiB: provider read %d bytes from guest memory; engine copied %d, vsock device copied %d",
			up>>20, readAfter-readBefore, engineCopied, devCopied)
		if engineCopied != 0 || devCopied != 0 || readAfter-readBefore != up {
			t.Fatalf("guest-to-fabric: provider read %d bytes from guest memory (want %d); host copies: engine %d, vsock device %d (want 0)",
				readAfter-readBefore, up, engineCopied, devCopied)
		}
	})
	t.Run("socat through the echo export", func(t *testing.T) {
		r := sh("echo hello-over-sdp | /usr/bin/socat -t 5 - TCP:10.60.0.1:7")
		if strings.TrimSpace(string(r.Stdout)) != "hello-over-sdp" {
			t.Fatalf("socat echo %q (exit %d, stderr %q)", r.Stdout, r.ExitCode, r.Stderr)
		}
	})
	t.Run("refused destination", func(t *testing.T) {
		r := sh("/usr/bin/socat -u OPEN:/dev/null TCP:10.60.0.1:81 2>&1; echo rc=$?")
		if out := string(r.Stdout); !strings.Contains(out, "Connection refused") {
			t.Fatalf("connect to a port nobody listens on: %q, want Connection refused", out)
		}
	})
	t.Run("denied destination", func(t *testing.T) {
		r := sh("/usr/bin/socat -u OPEN:/dev/null TCP:10.60.0.9:80 2>&1; echo rc=$?")
		if out := string(r.Stdout); !strings.Contains(out, "Permission denied") {
			t.Fatalf("connect to a denied address: %q, want Permission denied (EACCES)", out)
		}
		if st := back.Stats(); st.Denied == 0 {
			t.Fatalf("no denial counted: %+v", st)
		}
	})
}

type demoBlob struct {
	data []byte
	sum  [32]byte
}

func newDemoBlob(n int) *demoBlob {
	b := &demoBlob{data: make([]byte, n)}
	for i := range b.data {
		b.data[i] = byte(i*7 + i>>11)
	}
	b.sum = sha256.Sum256(b.data)
	return b
}

// TestVMListeners boots two guests on one vsdpd. Guest A listens (socat
// under libvsdp.so): a host SDP client and guest B both reach it over SDP,
// and A sees the caller's address. Then A and B exchange many streams both
// ways, through the C program under libvsdp.so and the Go program through
// vsdpnet (guestToGuest).
func TestVMListeners(t *testing.T) {
	vmtest.Require(t)
	root := guestBuild(t)
	dir := t.TempDir()
	cfg := &daemon.Config{
		Fabric: daemon.Fabric{Addr: "10.61.0.1"},
		VMs: []daemon.VMConfig{
			{Name: "a", Socket: filepath.Join(dir, "a.sock"), CID: 10, Addr: "10.61.0.10", Policy: []string{"sdp 10.61.0.0/24"}},
			{Name: "b", Socket: filepath.Join(dir, "b.sock"), CID: 11, Addr: "10.61.0.11", Policy: []string{"sdp 10.61.0.0/24"}},
		},
	}
	d := startDaemon(t, cfg) // before the VMs: QEMU goes before its back-end
	image := streamsImage(root, "use sdp client * 10.61.0.0/24:*\nuse sdp server * *:*\n").Merge(images.Spec{
		Binaries: []string{"/usr/bin/socat"},
		Files:    []images.File{{Path: "/bin/vsdptest", Host: filepath.Join(root, "build", "guest", "vsdptest"), Mode: 0o755}},
	})
	vms := bootAll(t,
		vmtest.Options{Name: "guest-a", Image: image, VhostUser: []vmtest.VhostUser{{Kind: vmtest.VhostVsock, Socket: cfg.VMs[0].Socket}}},
		vmtest.Options{Name: "guest-b", Image: image, VhostUser: []vmtest.VhostUser{{Kind: vmtest.VhostVsock, Socket: cfg.VMs[1].Socket}}})
	a, b := vms[0], vms[1]
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	env := []string{"LD_PRELOAD=/lib/libvsdp.so"}
	listen := func(port int, out string) *vmtest.Process {
		t.Helper()
		p, err := a.Start(ctx, vmtest.Cmd{Args: []string{"/usr/bin/socat", "-u",
			fmt.Sprintf("TCP-LISTEN:%d,reuseaddr", port), "SYSTEM:'echo peer=$SOCAT_PEERADDR > " + out + "; cat >> " + out + "'"},
			Env: env, Timeout: 2 * time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		// Wait until vsdpd exports the listener on A's fabric address.
		for deadline := time.Now().Add(30 * time.Second); d.VMs()[0].Back.Stats().Listeners == 0; {
			if time.Now().After(deadline) {
				t.Fatal("guest A's listener was never exported")
			}
			time.Sleep(50 * time.Millisecond)
		}
		return p
	}
	t.Run("host SDP client reaches a guest listener", func(t *testing.T) {
		p := listen(9000, "/tmp/from-host")
		c, err := d.HostStack().Dial(ctx, netip.MustParseAddrPort("10.61.0.10:9000"))
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("hello from the host\n"))
		c.Close()
		if _, err := p.Wait(ctx); err != nil {
			t.Fatal(err)
		}
		got := a.Check(t, "cat", "/tmp/from-host")
		if !strings.Contains(got, "hello from the host") || !strings.Contains(got, "peer=10.61.0.1") {
			t.Fatalf("guest A got %q: want the data and the host's fabric address as the peer", got)
		}
	})
	t.Run("guest B reaches guest A over SDP", func(t *testing.T) {
		p := listen(9001, "/tmp/from-b")
		r, err := b.Exec(ctx, vmtest.Cmd{Args: []string{"/bin/sh", "-c", "echo hello-from-b | /usr/bin/socat -u - TCP:10.61.0.10:9001"}, Env: env, Timeout: time.Minute})
		if err != nil || r.ExitCode != 0 {
			t.Fatalf("guest B: %v %+v", err, r)
		}
		if _, err := p.Wait(ctx); err != nil {
			t.Fatal(err)
		}
		got := a.Check(t, "cat", "/tmp/from-b")
		if !strings.Contains(got, "hello-from-b") || !strings.Contains(got, "peer=10.61.0.11") {
			t.Fatalf("guest A got %q: want B's data and B's fabric address", got)
		}
	})
	t.Run("remote abort gives ECONNRESET, never EOF", func(t *testing.T) {
		abortingPeer(t, ctx, d.HostStack(), 7777, make([]byte, 1000))
		// vsdptest (guestdrv/testdata) reads 1000 bytes, then reports what
		// read, a second read and write return.
		r, err := b.Exec(ctx, vmtest.Cmd{Args: []string{"/bin/vsdptest", "reset", "10.61.0.1", "7777"}, Env: env, Timeout: time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		out := string(r.Stdout)
		for _, want := range []string{"read_total=1000", "read_err=ECONNRESET", "write_err=ECONNRESET"} {
			if !strings.Contains(out, want) {
				t.Fatalf("guest program output lacks %q:\n%s", want, out)
			}
		}
	})
	t.Run("guests A and B exchange streams both ways over SDP", func(t *testing.T) {
		guestToGuest(t, ctx, d, a, b)
	})
}
