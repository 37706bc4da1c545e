package vmtest

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vsdp/vsdp/images"
)

func TestMain(m *testing.M) { Main(m) }

// TestVMBoot boots one guest and checks the agent: a program's output and
// exit status, a failing program reported as failing, a missing program, a
// timeout, a canceled background program, files both ways checked by hash,
// and QMP status. One boot serves all of these.
func TestVMBoot(t *testing.T) {
	Require(t)
	checkLeaks(t)
	start := time.Now()
	v := Start(t, Options{Name: "boot", Reboot: true})
	t.Logf("booted in %v (accel %s, image %s, cached %v)", time.Since(start).Round(time.Millisecond), v.Accel, v.Image.Path, v.Image.Cached)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()

	if h := v.Agent().Hello(); !strings.HasPrefix(h.Kernel, "6.") {
		t.Errorf("agent hello kernel = %q", h.Kernel)
	}
	if st, err := v.Status(ctx); err != nil || st != "running" {
		t.Errorf("QMP status = %q, %v; want running", st, err)
	}

	t.Run("output", func(t *testing.T) {
		r, err := v.Exec(ctx, Cmd{Args: []string{"sh", "-c", "echo out; echo err >&2; cat; uname -n"}, Stdin: []byte("in\n")})
		if err != nil {
			t.Fatal(err)
		}
		if r.ExitCode != 0 || r.Err() != nil {
			t.Errorf("exit %d, err %v", r.ExitCode, r.Err())
		}
		if got, want := string(r.Stdout), "out\nin\nboot\n"; got != want {
			t.Errorf("stdout %q, want %q", got, want)
		}
		if got := string(r.Stderr); got != "err\n" {
			t.Errorf("stderr %q", got)
		}
	})
	t.Run("failing", func(t *testing.T) {
		r, err := v.Exec(ctx, Cmd{Args: []string{"sh", "-c", "echo boom >&2; exit 3"}})
		if err != nil {
			t.Fatal(err)
		}
		var ee *ExitError
		if r.ExitCode != 3 || !errors.As(r.Err(), &ee) || !strings.Contains(ee.Error(), "boom") {
			t.Errorf("exit %d, err %v; want exit 3 with stderr in the error", r.ExitCode, r.Err())
		}
		if _, err := v.Run(ctx, "false"); err == nil {
			t.Error("Run(false) succeeded")
		}
	})
	t.Run("missing", func(t *testing.T) {
		_, err := v.Run(ctx, "/no/such/program")
		var ae *AgentError
		if !errors.As(err, &ae) {
			t.Errorf("err = %v, want *AgentError", err)
		}
	})
	t.Run("timeout", func(t *testing.T) {
		r, err := v.Exec(ctx, Cmd{Args: []string{"sleep", "30"}, Timeout: 300 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		if !r.TimedOut || r.Signal == "" || r.Err() == nil {
			t.Errorf("result %+v; want timed out and killed", r)
		}
	})
	t.Run("background", func(t *testing.T) {
		p, err := v.Start(ctx, Cmd{Args: []string{"sh", "-c", "echo started; touch /tmp/started; exec sleep 60"}})
		if err != nil {
			t.Fatal(err)
		}
		// The guest runs requests concurrently: these are answered while
		// the sleep runs.
		if _, err := v.Run(ctx, "sh", "-c", "for i in $(seq 100); do [ -e /tmp/started ] && exit 0; sleep 0.1; done; exit 1"); err != nil {
			t.Fatal(err)
		}
		r, err := p.Stop(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if !r.Canceled || string(r.Stdout) != "started\n" {
			t.Errorf("stopped result %+v", r)
		}
	})
	t.Run("files", func(t *testing.T) {
		data := make([]byte, 256<<10)
		rand.Read(data)
		sum := sha256.Sum256(data)
		t0 := time.Now()
		if err := v.Agent().WriteFile(ctx, "/tmp/blob", data, 0o600); err != nil {
			t.Fatal(err)
		}
		up := time.Since(t0)
		out := v.Check(t, "sha256sum", "/tmp/blob")
		if got := strings.Fields(out)[0]; got != hex.EncodeToString(sum[:]) {
			t.Errorf("guest sha256 %s, want %x", got, sum)
		}
		t0 = time.Now()
		back, err := v.Agent().ReadFile(ctx, "/tmp/blob")
		if err != nil {
			t.Fatal(err)
		}
		down := time.Since(t0)
		if sha256.Sum256(back) != sum {
			t.Errorf("read back %d bytes with another hash", len(back))
		}
		mib := float64(len(data)) / (1 << 20)
		t.Logf("agent file transfer (virtio-serial, JSON+base64): host→guest %.2f MiB/s, guest→host %.2f MiB/s",
			mib/up.Seconds(), mib/down.Seconds())
		if _, err := v.Agent().ReadFile(ctx, "/no/such/file"); err == nil {
			t.Error("reading a missing file succeeded")
		}
	})
	t.Run("modules", func(t *testing.T) {
		// No device modules without devices: the guest has no network.
		out := v.Check(t, "ls", "/sys/class/net")
		if strings.TrimSpace(out) != "lo" {
			t.Errorf("network interfaces %q, want only lo (-nic none)", out)
		}
	})

	t.Run("reset", func(t *testing.T) {
		before := v.Agent().Hello()
		start := time.Now()
		if err := v.Reset(ctx); err != nil {
			t.Fatal(err)
		}
		if _, err := v.WaitEvent(ctx, "RESET"); err != nil {
			t.Error(err)
		}
		after := v.Agent().Hello()
		if after.Start == before.Start {
			t.Errorf("agent greeting unchanged after reset: %+v", after)
		}
		// The guest really rebooted: /tmp (a tmpfs) is empty again.
		if _, err := v.Agent().ReadFile(ctx, "/tmp/blob"); err == nil {
			t.Error("/tmp/blob survived the reset")
		}
		t.Logf("reset and reboot took %v", time.Since(start).Round(time.Millisecond))
	})
	t.Run("poweroff", func(t *testing.T) {
		if err := v.Agent().Poweroff(ctx); err != nil {
			t.Fatal(err)
		}
		if err := v.Wait(ctx); err != nil {
			t.Errorf("QEMU exit after guest poweroff: %v", err)
		}
		if _, err := v.WaitEvent(ctx, "SHUTDOWN"); err != nil {
			t.Error(err)
		}
	})

	pid := v.Pid()
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("QEMU pid %d still exists after Close: %v", pid, err)
	}
	if _, err := v.Run(ctx, "true"); err == nil {
		t.Error("Run after Close succeeded")
	}
	if !bytes.Contains([]byte(tailFile(v.Console, 64<<10)), []byte(images.InitReadyMessage)) {
		t.Errorf("console log %s lacks %q", v.Console, images.InitReadyMessage)
	}
}

// TestVMBootFailures: a guest whose /init reports a failed step does not
// count as booted (so a test whose device module fails to load fails), a
// boot that outlasts its timeout fails, and an image that cannot be built
// fails before QEMU starts. No QEMU survives any of these.
func TestVMBootFailures(t *testing.T) {
	Require(t)
	checkLeaks(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	logDir := TestLogDir(t)

	_, err := Boot(ctx, Options{Name: "initfail", LogDir: logDir, Image: images.Spec{Init: []string{"echo fine", "echo about to fail; exit 3"}}})
	var be *BootError
	if !errors.As(err, &be) || !errors.Is(err, ErrBoot) || !strings.Contains(err.Error(), "init[1] exited 3") {
		t.Errorf("failing Init line: err %v, want a BootError naming init[1]", err)
	} else {
		t.Logf("as expected: %v", err)
	}

	start := time.Now()
	_, err = Boot(ctx, Options{Name: "slow", LogDir: logDir, BootTimeout: 300 * time.Millisecond})
	if !errors.Is(err, ErrBoot) || time.Since(start) > 20*time.Second {
		t.Errorf("boot timeout: err %v after %v, want ErrBoot soon", err, time.Since(start))
	}

	if _, err = Boot(ctx, Options{Name: "nomod", LogDir: logDir, Image: images.Spec{Modules: []string{"no_such_module"}}}); !errors.Is(err, images.ErrNoModule) {
		t.Errorf("unknown module: err %v, want ErrNoModule", err)
	}
	if left := procs.snapshot(); len(left) != 0 {
		t.Errorf("QEMU processes left after failed boots: %v", left)
	}
}
