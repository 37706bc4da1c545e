package vmtest

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vsdp/vsdp/images"
)

// probeTimeout bounds the KVM probe boot. A working KVM boots the probe
// guest in about a second; on the hosts this project runs on, /dev/kvm
// opens but a stock guest hangs (vm-recipes.md), so the probe times out
// once and its result is cached.
const probeTimeout = 20 * time.Second

// probeFile caches the probe's result under build/vmtest.
const probeFile = "kvm-probe.json"

type probeResult struct {
	Key    string    `json:"key"` // host kernel, QEMU binary, guest kernel
	OK     bool      `json:"ok"`
	Detail string    `json:"detail,omitempty"`
	When   time.Time `json:"when"`
}

var probeMu sync.Mutex // one probe at a time in this process

// chooseAccel returns "kvm" only where a real boot under KVM worked (a
// cached probe), and "tcg" otherwise; EnvAccel overrides it.
func chooseAccel(ctx context.Context, cfg *config, kernel *images.Kernel) string {
	if cfg.accel != "" {
		return cfg.accel
	}
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return "tcg"
	}
	f.Close()
	probeMu.Lock()
	defer probeMu.Unlock()
	key := probeKey(cfg, kernel)
	path := filepath.Join(cfg.stateDir, probeFile)
	if b, err := os.ReadFile(path); err == nil {
		var r probeResult
		if json.Unmarshal(b, &r) == nil && r.Key == key {
			return accelName(r.OK)
		}
	}
	r := probeResult{Key: key, When: time.Now()}
	r.OK, r.Detail = probeKVM(ctx, cfg)
	if b, err := json.MarshalIndent(r, "", "  "); err == nil {
		if os.MkdirAll(cfg.stateDir, 0o755) == nil {
			writeFileAtomic(path, b)
		}
	}
	return accelName(r.OK)
}

func accelName(kvm bool) string {
	if kvm {
		return "kvm"
	}
	return "tcg"
}

// probeKey names what the probe result depends on.
func probeKey(cfg *config, kernel *images.Kernel) string {
	var uts unix.Utsname
	unix.Uname(&uts)
	q := cfg.qemu
	if p, err := exec.LookPath(q); err == nil {
		q = p
	}
	var qinfo string
	if st, err := os.Stat(q); err == nil {
		qinfo = fmt.Sprintf("%d@%d", st.Size(), st.ModTime().Unix())
	}
	return fmt.Sprintf("%s %s | %s %s | %s", unix.ByteSliceToString(uts.Release[:]),
		unix.ByteSliceToString(uts.Version[:]), q, qinfo, kernel.Package)
}

// probeKVM boots a minimal guest under KVM and runs one program in it.
func probeKVM(ctx context.Context, cfg *config) (bool, string) {
	v, err := Boot(ctx, Options{
		Name:        "kvm-probe",
		BootTimeout: probeTimeout,
		LogDir:      cfg.stateDir,
		accel:       "kvm",
	})
	if err != nil {
		return false, err.Error()
	}
	defer v.Close()
	rctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	if _, err := v.Run(rctx, "true"); err != nil {
		return false, err.Error()
	}
	return true, "booted"
}

func writeFileAtomic(path string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path)+"-")
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		os.Remove(f.Name())
		return err
	}
	if err := f.Close(); err != nil {
		os.Remove(f.Name())
		return err
	}
	return os.Rename(f.Name(), path)
}
