package vmtest

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/vsdp/vsdp/images"
)

// Environment variables that control VM tests.
const (
	// EnvEnable must be "1" for VM tests to run; otherwise they skip.
	EnvEnable = "VSDP_VMTEST"
	// EnvQEMU names the QEMU binary (default: qemu-system-x86_64 in PATH).
	EnvQEMU = "VSDP_QEMU"
	// EnvKernelDir is the kernel cache (default: build/kernel).
	EnvKernelDir = "VSDP_KERNEL_DIR"
	// EnvLogDir is where console logs go (default: build/vmtest/logs).
	EnvLogDir = "VSDP_VMTEST_LOGDIR"
	// EnvAccel forces the accelerator: "tcg" or "kvm" (default: tcg unless
	// a cached KVM boot probe succeeded).
	EnvAccel = "VSDP_VMTEST_ACCEL"
)

// Sentinel errors.
var (
	// ErrSetup: QEMU, the kernel or another prerequisite is missing.
	ErrSetup = errors.New("vmtest: VM test prerequisites missing (run `make deps`)")
	// ErrBoot: the guest did not come up (QEMU failed, boot timed out, or
	// /init reported a failed step).
	ErrBoot = errors.New("vmtest: guest did not come up")
	// ErrAgent: the connection to the guest agent failed or was lost.
	ErrAgent = errors.New("vmtest: guest agent connection failed")
	// ErrQMP: a QMP command failed or timed out.
	ErrQMP = errors.New("vmtest: QMP failed")
	// ErrClosed: the VM was closed.
	ErrClosed = errors.New("vmtest: VM closed")
)

// BootError is a guest that did not come up.
type BootError struct {
	VM      string
	Reason  string
	Console string // path of the console log
	Err     error
}

func (e *BootError) Error() string {
	msg := fmt.Sprintf("vmtest: VM %s did not come up: %s", e.VM, e.Reason)
	if e.Err != nil {
		msg += ": " + e.Err.Error()
	}
	if e.Console != "" {
		msg += " (console log: " + e.Console + ")"
	}
	return msg
}

func (e *BootError) Unwrap() []error {
	if e.Err == nil {
		return []error{ErrBoot}
	}
	return []error{ErrBoot, e.Err}
}

// config is where things are on this host.
type config struct {
	root      string // module root
	qemu      string
	kernelDir string
	logDir    string
	stateDir  string // build/vmtest: the KVM probe result
	accel     string // from EnvAccel, may be ""
}

func loadConfig() (*config, error) {
	wd, err := os.Getwd()
	if err != nil {
		return nil, err
	}
	root, err := images.FindModuleRoot(wd)
	if err != nil {
		return nil, err
	}
	c := &config{
		root:      root,
		qemu:      os.Getenv(EnvQEMU),
		kernelDir: os.Getenv(EnvKernelDir),
		logDir:    os.Getenv(EnvLogDir),
		stateDir:  filepath.Join(root, "build", "vmtest"),
		accel:     os.Getenv(EnvAccel),
	}
	if c.qemu == "" {
		c.qemu = "qemu-system-x86_64"
	}
	if c.kernelDir == "" {
		c.kernelDir = filepath.Join(root, "build", "kernel")
	}
	if c.logDir == "" {
		c.logDir = filepath.Join(c.stateDir, "logs")
	}
	switch c.accel {
	case "", "tcg", "kvm":
	default:
		return nil, fmt.Errorf("%w: %s=%q (want tcg or kvm)", ErrSetup, EnvAccel, c.accel)
	}
	return c, nil
}

// check reports the first missing prerequisite.
func (c *config) check() error {
	if _, err := exec.LookPath(c.qemu); err != nil {
		return fmt.Errorf("%w: QEMU: %v", ErrSetup, err)
	}
	if _, err := images.LoadKernel(c.kernelDir); err != nil {
		return fmt.Errorf("%w: %v", ErrSetup, err)
	}
	if dyn, err := images.IsDynamic(images.DefaultBusybox); err != nil || dyn {
		return fmt.Errorf("%w: %s is missing or not static (busybox-static)", ErrSetup, images.DefaultBusybox)
	}
	return nil
}

// pkgDir returns the test's package directory relative to the module root
// ("./vmtest"), for hints.
func pkgDir() string {
	wd, err := os.Getwd()
	if err != nil {
		return "./<pkg>"
	}
	root, err := images.FindModuleRoot(wd)
	if err != nil {
		return "./<pkg>"
	}
	rel, err := filepath.Rel(root, wd)
	if err != nil || rel == "." {
		return "."
	}
	return "./" + filepath.ToSlash(rel)
}

// Require gates a VM test. Without VSDP_VMTEST=1 it skips the test with a
// hint; with it, a missing prerequisite (QEMU, the kernel, busybox-static)
// fails the test, so CI never skips silently.
func Require(t testing.TB) {
	t.Helper()
	if os.Getenv(EnvEnable) != "1" {
		t.Skipf("VM test: run `make deps` then `%s=1 go test -run '^%s$' %s`", EnvEnable, t.Name(), pkgDir())
		return
	}
	c, err := loadConfig()
	if err == nil {
		err = c.check()
	}
	if err != nil {
		t.Fatalf("%v\n(%s=1 is set, so a missing prerequisite is a failure; run `make deps`)", err, EnvEnable)
	}
}
