package daemon_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vsdp/vsdp/images"
	"github.com/vsdp/vsdp/internal/daemon"
	"github.com/vsdp/vsdp/vmtest"
)

// TestVMWorkerMode boots a real guest against the vsdpd command as shipped:
// a supervisor with the VM in a worker process of its own, which maps the
// guest's memory and serves both of its devices. Through the vsock device
// socat under libvsdp.so, and through the socket filesystem a busybox
// shell, fetch an export that lives in the supervisor's process, across the
// processes' soft fabric; both are checked by sha256. SIGTERM then stops
// the supervisor and its worker.
func TestVMWorkerMode(t *testing.T) {
	vmtest.Require(t)
	lib := filepath.Join(guestBuild(t), "build", "guest", "libvsdp.so")
	bin := buildVsdpd(t)
	target, sum := serveBlob(t, 8<<20)
	dir := t.TempDir()
	cfg := daemon.Config{
		Fabric:  daemon.Fabric{Addr: "10.64.0.1"},
		Exports: []daemon.ExportConfig{{Port: 8080, Target: target}},
		VMs: []daemon.VMConfig{{Name: "w", Socket: filepath.Join(dir, "w.sock"), FSSocket: filepath.Join(dir, "w-fs.sock"),
			CID: 5, Addr: "10.64.0.5", Policy: []string{"sdp 10.64.0.1:8080"}}},
	}
	cmd, logPath := startVsdpd(t, bin, dir, cfg)
	worker := 0
	// Registered before the VM's cleanup, so it runs after QEMU is gone.
	t.Cleanup(func() {
		if err := stopVsdpd(cmd, 15*time.Second); err != nil {
			t.Errorf("vsdpd on SIGTERM: %v", err)
		}
		if worker != 0 && !gone(worker) {
			syscall.Kill(worker, syscall.SIGKILL)
			t.Errorf("worker %d outlived its supervisor", worker)
		}
		if t.Failed() {
			out, _ := os.ReadFile(logPath)
			t.Logf("vsdpd log:\n%s", out)
		}
	})
	worker = waitPID(t, filepath.Join(dir, "w.pid"), 0)
	if worker == cmd.Process.Pid {
		t.Fatalf("the VM is served by the supervisor itself (pid %d), not a worker", worker)
	}
	checkConfined(t, worker, true) // the guest below runs against a confined worker
	vm := vmtest.Start(t, vmtest.Options{
		Name: "worker",
		Image: images.Spec{
			Modules:  []string{"vmw_vsock_virtio_transport"},
			Binaries: []string{"/usr/bin/socat"},
			Files: []images.File{
				{Path: "/lib/libvsdp.so", Host: lib, Mode: 0o755},
				{Path: "/etc/vsdp.conf", Data: "use sdp client * 10.64.0.0/24:*\n"},
			},
		},
		VhostUser: []vmtest.VhostUser{{Kind: vmtest.VhostVsock, Socket: cfg.VMs[0].Socket},
			{Kind: vmtest.VhostFS, Socket: cfg.VMs[0].FSSocket, Tag: "vsdpnet"}},
	})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	want := fmt.Sprintf("%x", sum)
	r := guestShell(t, ctx, vm, []string{"LD_PRELOAD=/lib/libvsdp.so"}, "/usr/bin/socat -u TCP:10.64.0.1:8080 - | sha256sum")
	if got := strings.Fields(string(r.Stdout)); r.ExitCode != 0 || len(got) == 0 || got[0] != want {
		t.Fatalf("socat through the worker's vsock device: %q (exit %d, stderr %q), want %s", r.Stdout, r.ExitCode, r.Stderr, want)
	}
	r = guestShell(t, ctx, vm, nil, `mkdir -p /net && mount -t virtiofs vsdpnet /net || exit 1
exec 3<>/net/tcp/clone; read n <&3; echo "connect 10.64.0.1!8080" >&3 || exit 1
dd if=/net/tcp/$n/data bs=1M 2>/dev/null | sha256sum`)
	if got := strings.Fields(string(r.Stdout)); r.ExitCode != 0 || len(got) == 0 || got[0] != want {
		t.Fatalf("busybox through the worker's socket filesystem: %q (exit %d, stderr %q), want %s", r.Stdout, r.ExitCode, r.Stderr, want)
	}
}
