package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/vsdp/vsdp/images"
	"github.com/vsdp/vsdp/internal/daemon"
	"github.com/vsdp/vsdp/vmtest"
)

// stage2 boots a real guest (QEMU, TCG) whose only devices out are vsdpd's
// vsock device and socket filesystem, and runs GNU wget under libvsdp.so
// against the export; then stage 3 in the same guest.
func stage2(d *daemon.Daemon, sock, fsSock string, b *blob) error {
	fmt.Println("stage 2: a real guest under QEMU (TCG), no network but vsdpd's devices")
	root, err := images.FindModuleRoot(".")
	if err != nil {
		return err
	}
	lib := filepath.Join(root, "build", "guest", "libvsdp.so")
	var missing []string
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		missing = append(missing, "QEMU (make deps)")
	}
	if _, err := images.LoadKernel(filepath.Join(root, "build", "kernel")); err != nil {
		missing = append(missing, "the guest kernel (make deps)")
	}
	if _, err := os.Stat(lib); err != nil {
		missing = append(missing, "build/guest/libvsdp.so (make build)")
	}
	if _, err := os.Stat("/usr/bin/wget"); err != nil {
		missing = append(missing, "/usr/bin/wget (make deps)")
	}
	if len(missing) > 0 {
		fmt.Printf("  not run: missing %s\n", strings.Join(missing, ", "))
		return nil
	}
	before := d.VMs()[0].Back.Stats()
	conf := fmt.Sprintf("# vsdp demo: every TCP client connection goes through the device\nuse sdp client * %s:*\n", hostFabric)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	opts := vmtest.Options{
		Name:      "vsdp-demo",
		MemoryMiB: 512,
		Image: images.Spec{
			Modules:  []string{"vmw_vsock_virtio_transport"},
			Binaries: []string{"/usr/bin/wget"},
			Files: []images.File{
				{Path: "/lib/libvsdp.so", Host: lib, Mode: 0o755},
				{Path: "/etc/vsdp.conf", Data: conf},
			},
		},
		VhostUser: []vmtest.VhostUser{{Kind: vmtest.VhostVsock, Socket: sock},
			{Kind: vmtest.VhostFS, Socket: fsSock, Tag: "vsdpnet"}},
	}
	t0 := time.Now()
	vm, err := vmtest.Boot(ctx, opts)
	if err != nil {
		var be *vmtest.BootError
		if errors.As(err, &be) {
			return fmt.Errorf("boot: %w", err)
		}
		return err
	}
	defer vm.Close()
	fmt.Printf("  guest booted in %v; it has no NIC (-nic none)\n", time.Since(t0).Round(100*time.Millisecond))
	url := fmt.Sprintf("http://%s:%d/blob", hostFabric, exportPort)
	cmd := fmt.Sprintf("LD_PRELOAD=/lib/libvsdp.so /usr/bin/wget -q -O - %s | sha256sum", url)
	t0 = time.Now()
	res, err := vm.Exec(ctx, vmtest.Cmd{Args: []string{"/bin/sh", "-c", cmd}, Timeout: 3 * time.Minute})
	el := time.Since(t0)
	if err != nil {
		return fmt.Errorf("wget in the guest: %w", err)
	}
	out := strings.TrimSpace(string(res.Stdout))
	want := fmt.Sprintf("%x", b.sum)
	after := d.VMs()[0].Back.Stats()
	n := after.ToGuest - before.ToGuest
	fmt.Printf("  guest ran            %s\n", cmd)
	fmt.Printf("  exit status          %d\n", res.ExitCode)
	if !strings.HasPrefix(out, want) {
		return fmt.Errorf("guest sha256 %q, want %s (stderr %q)", out, want, res.Stderr)
	}
	fmt.Printf("  fetched              %d bytes through the device, sha256 matches\n", n)
	fmt.Printf("  throughput           %.1f MiB/s (TCG guest, including wget and sha256sum in the guest)\n", float64(len(b.data))/(1<<20)/el.Seconds())
	fmt.Printf("  path                 SDP: %d dials from the guest, %d denied\n", after.Dials-before.Dials, after.Denied-before.Denied)
	fmt.Println()
	return stage3(ctx, d, vm, b)
}

// stage3 has a busybox shell in the same guest (no LD_PRELOAD: a static
// binary) fetch the export's raw bytes through the socket filesystem.
func stage3(ctx context.Context, d *daemon.Daemon, vm *vmtest.VM, b *blob) error {
	fmt.Println("stage 3: the same guest's busybox shell through the socket filesystem (virtio-fs /net)")
	script := fmt.Sprintf(`mkdir -p /net && mount -t virtiofs vsdpnet /net || exit 1
exec 3<>/net/tcp/clone; read n <&3
echo "connect %s!%d" >&3 || exit 1
dd if=/net/tcp/$n/data of=/tmp/blob bs=1M 2>/dev/null; sha256sum /tmp/blob; rm /tmp/blob
echo "status: $(cat /net/tcp/$n/status)"; echo "stats: $(tr '\n' ' ' < /net/tcp/$n/stats)"`, hostFabric, rawPort)
	before := d.VMs()[0].Back.Stats()
	t0 := time.Now()
	res, err := vm.Exec(ctx, vmtest.Cmd{Args: []string{"/bin/sh", "-c", script}, Timeout: 3 * time.Minute})
	el := time.Since(t0)
	if err != nil {
		return fmt.Errorf("shell in the guest: %w", err)
	}
	out := string(res.Stdout)
	want := fmt.Sprintf("%x", b.sum)
	n := d.VMs()[0].Back.Stats().ToGuest - before.ToGuest
	fmt.Println("  guest ran            exec 3<>/net/tcp/clone; read n <&3; echo \"connect ...\" >&3; dd if=/net/tcp/$n/data ...")
	if res.ExitCode != 0 || !strings.Contains(out, want) {
		return fmt.Errorf("exit %d, want sha256 %s:\n%s%s", res.ExitCode, want, out, res.Stderr)
	}
	fmt.Printf("  fetched              %d bytes through the data file, sha256 matches\n", n)
	fmt.Printf("  throughput           %.1f MiB/s (TCG guest, including dd to tmpfs and sha256sum in the guest)\n", float64(n)/(1<<20)/el.Seconds())
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if strings.HasPrefix(l, "status: ") || strings.HasPrefix(l, "stats: ") {
			k, v, _ := strings.Cut(l, ": ")
			fmt.Printf("  %-20s %s\n", k+" file", strings.Join(strings.Fields(v), " "))
		}
	}
	return nil
}
