//go:build linux && cgo

package ibv

import (
	"errors"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/vsdp/vsdp/verbs"
)

// hasRDMAKernel reports whether the kernel exposes user verbs at all; without
// it libibverbs fails ibv_get_device_list with ENOSYS.
func hasRDMAKernel() bool {
	_, err := os.Stat("/sys/class/infiniband_verbs/abi_version")
	return err == nil
}

func countFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// settle waits briefly for goroutines to exit and returns the count.
func settle(want int) int {
	n := runtime.NumGoroutine()
	for i := 0; i < 50 && n > want; i++ {
		time.Sleep(10 * time.Millisecond)
		n = runtime.NumGoroutine()
	}
	return n
}

// TestDevices checks the device list. On a host without kernel RDMA support
// (these hosts: ibv_get_device_list returns NULL with ENOSYS) it must be
// empty and not an error; where devices exist every entry must be complete.
func TestDevices(t *testing.T) {
	fds, gs := countFDs(t), runtime.NumGoroutine()
	p := New()
	if p.Name() != "ibv" {
		t.Errorf("Name = %q", p.Name())
	}
	devs, err := p.Devices()
	if err != nil {
		t.Fatalf("Devices: %v", err)
	}
	if !hasRDMAKernel() && len(devs) != 0 {
		t.Fatalf("no kernel RDMA support, yet %d devices: %+v", len(devs), devs)
	}
	t.Logf("kernel RDMA support: %v; %d devices", hasRDMAKernel(), len(devs))
	for _, d := range devs {
		if d.Name == "" || d.Provider != "ibv" || d.Transport == "" || d.Attr.MaxQP <= 0 || d.Attr.MaxCQE <= 0 {
			t.Errorf("incomplete device info %+v", d)
		}
	}
	// Twice: the ENOSYS path must not leave state behind.
	if devs2, err := p.Devices(); err != nil || len(devs2) != len(devs) {
		t.Errorf("second Devices = %d, %v", len(devs2), err)
	}
	if got := countFDs(t); got != fds {
		t.Errorf("descriptors %d before, %d after", fds, got)
	}
	if got := settle(gs); got > gs {
		t.Errorf("goroutines %d before, %d after", gs, got)
	}
}

// TestOpenMissing opens a device that does not exist: ErrInvalid, nothing
// leaked.
func TestOpenMissing(t *testing.T) {
	fds, gs := countFDs(t), runtime.NumGoroutine()
	for _, name := range []string{"no-such-device", ""} {
		d, err := New().Open(name)
		if err == nil {
			d.Close()
			t.Fatalf("Open(%q) succeeded", name)
		}
		if !errors.Is(err, verbs.ErrInvalid) {
			t.Errorf("Open(%q) = %v, want ErrInvalid", name, err)
		}
	}
	if got := countFDs(t); got != fds {
		t.Errorf("descriptors %d before, %d after", fds, got)
	}
	if got := settle(gs); got > gs {
		t.Errorf("goroutines %d before, %d after", gs, got)
	}
}
