package vmtest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vsdp/vsdp/images"
)

// Shutdown bounds.
const (
	quitTimeout = 3 * time.Second  // QMP quit, then SIGKILL
	killTimeout = 10 * time.Second // after SIGKILL
)

// VM is a QEMU guest whose agent is up. Close it (Start does so in
// t.Cleanup); QEMU runs in its own process group and is killed with it.
type VM struct {
	Name    string
	Accel   string        // "tcg" or "kvm"
	Image   *images.Image // the initramfs it booted
	Console string        // console log (ttyS0)
	QEMULog string        // QEMU's own stdout and stderr
	Args    []string      // QEMU's command line

	opts   Options
	dir    string // runtime directory: QMP and agent sockets
	cmd    *exec.Cmd
	exited chan struct{} // closed when QEMU has been reaped
	// waitErr is QEMU's exit status; valid once exited is closed.
	waitErr error
	mon     *monitor
	agent   *Agent

	closeOnce sync.Once
	closeErr  error
}

// Boot starts a VM and waits until its agent answers and /init reported no
// failed step. On error everything is torn down. The caller must Close it.
func Boot(ctx context.Context, o Options) (*VM, error) {
	v, err := launch(ctx, o)
	if err != nil {
		return nil, err
	}
	if err := v.ready(ctx); err != nil {
		v.Close()
		return nil, err
	}
	return v, nil
}

// launch builds the image, starts QEMU and connects QMP.
func launch(ctx context.Context, o Options) (*VM, error) {
	o = o.withDefaults()
	if err := o.validate(); err != nil {
		return nil, err
	}
	cfg, err := loadConfig()
	if err != nil {
		return nil, err
	}
	if err := cfg.check(); err != nil {
		return nil, err
	}
	kernel, err := images.LoadKernel(cfg.kernelDir)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrSetup, err)
	}
	img, err := (&images.Builder{Kernel: kernel, Root: cfg.root}).Build(ctx, o.agentSpec())
	if err != nil {
		return nil, err
	}
	accel := o.accel
	if accel == "" {
		accel = chooseAccel(ctx, cfg, kernel)
	}
	logDir := o.LogDir
	if logDir == "" {
		logDir = cfg.logDir
	}
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "vsdp-vm-")
	if err != nil {
		return nil, err
	}
	v := &VM{
		Name:   o.Name,
		Accel:  accel,
		Image:  img,
		opts:   o,
		dir:    dir,
		exited: make(chan struct{}),
	}
	v.Console, v.QEMULog = logPaths(logDir, o.Name)
	p := paths{
		kernel:  kernel.BootImage(),
		initrd:  img.Path,
		console: v.Console,
		qmp:     filepath.Join(dir, "qmp.sock"),
		agent:   filepath.Join(dir, "agent.sock"),
	}
	v.Args = o.qemuArgs(p, accel)
	qlog, err := os.Create(v.QEMULog)
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	os.Remove(v.Console) // QEMU recreates it; no stale log if it fails early
	v.cmd = exec.Command(cfg.qemu, v.Args...)
	v.cmd.Stdout, v.cmd.Stderr = qlog, qlog // stdin is /dev/null
	// Own process group: killed as a whole. Pdeathsig: killed if the test
	// process dies without running its cleanups.
	v.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	err = v.cmd.Start()
	qlog.Close()
	if err != nil {
		os.RemoveAll(dir)
		return nil, &BootError{VM: o.Name, Reason: "starting QEMU", Err: err}
	}
	procs.add(v.cmd.Process.Pid, o.Name)
	go func() {
		v.waitErr = v.cmd.Wait()
		close(v.exited)
	}()

	bctx, cancel := context.WithTimeout(ctx, o.BootTimeout)
	defer cancel()
	if v.mon, err = dialQMP(bctx, p.qmp, v.exited); err != nil {
		v.Close()
		return nil, v.bootError("QMP", err)
	}
	return v, nil
}

// bootError wraps err with QEMU's own last words when it has exited.
func (v *VM) bootError(reason string, err error) error {
	select {
	case <-v.exited:
		reason += fmt.Sprintf(" (QEMU exited: %v: %s)", v.waitErr, strings.TrimSpace(tailFile(v.QEMULog, 1024)))
	default:
	}
	return &BootError{VM: v.Name, Reason: reason, Console: v.Console, Err: err}
}

// ready connects the agent and checks /init's failure record.
func (v *VM) ready(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, v.opts.BootTimeout)
	defer cancel()
	path := filepath.Join(v.dir, "agent.sock")
	var conn net.Conn
	for {
		var err error
		var d net.Dialer
		if conn, err = d.DialContext(ctx, "unix", path); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return v.bootError("connecting to the agent socket", ctx.Err())
		case <-v.exited:
			return v.bootError("connecting to the agent socket", ErrClosed)
		case <-time.After(20 * time.Millisecond):
		}
	}
	deadline, _ := ctx.Deadline()
	// Unblock the handshake at once if QEMU dies.
	stop := context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Now()) })
	defer stop()
	exitWatch := make(chan struct{})
	defer close(exitWatch)
	go func() {
		select {
		case <-v.exited:
			conn.SetReadDeadline(time.Now())
		case <-exitWatch:
		}
	}()
	a, err := newAgent(conn, deadline)
	if err != nil {
		return v.bootError("waiting for the agent", err)
	}
	v.agent = a
	failed, err := a.ReadFile(ctx, images.InitFailedFile)
	var ae *AgentError
	switch {
	case err == nil:
		return v.bootError("/init: "+strings.ReplaceAll(strings.TrimSpace(string(failed)), "\n", "; "), nil)
	case errors.As(err, &ae) && strings.Contains(ae.Msg, "no such file"):
		return nil
	default:
		return v.bootError("reading "+images.InitFailedFile, err)
	}
}

// Agent returns the connection to the guest agent.
func (v *VM) Agent() *Agent { return v.agent }

// Run runs a program in the guest (see Agent.Run).
func (v *VM) Run(ctx context.Context, args ...string) (*Result, error) {
	return v.agent.Run(ctx, args...)
}

// Exec runs a program in the guest (see Agent.Exec).
func (v *VM) Exec(ctx context.Context, c Cmd) (*Result, error) { return v.agent.Exec(ctx, c) }

// Start starts a program in the guest (see Agent.Start).
func (v *VM) Start(ctx context.Context, c Cmd) (*Process, error) { return v.agent.Start(ctx, c) }

// Check runs a program in the guest and returns its stdout; a failure fails
// the test.
func (v *VM) Check(t testing.TB, args ...string) string {
	t.Helper()
	r, err := v.agent.Run(context.Background(), args...)
	if err != nil {
		t.Fatalf("%s: %v", v.Name, err)
	}
	return string(r.Stdout)
}

// QMP runs a QMP command (raw JSON arguments, e.g. for device_add with
// properties) and returns its "return" member.
func (v *VM) QMP(ctx context.Context, command string, args any) ([]byte, error) {
	return v.mon.run(ctx, command, args)
}

// Status returns QEMU's run state ("running", "paused", "shutdown", ...).
func (v *VM) Status(ctx context.Context) (string, error) {
	st, err := v.mon.status(ctx)
	if err != nil {
		return "", err
	}
	return st.Status.String(), nil
}

// Reset resets the guest (QMP system_reset) and waits until it booted
// again and its new agent greeted (bounded by the boot timeout). Requests
// pending at the reset fail. It needs Options.Reboot: with -no-reboot QEMU
// exits on a reset.
func (v *VM) Reset(ctx context.Context) error {
	if !v.opts.Reboot {
		return fmt.Errorf("vmtest: Reset of %s needs Options.Reboot (QEMU runs with -no-reboot)", v.Name)
	}
	ctx, cancel := context.WithTimeout(ctx, v.opts.BootTimeout)
	defer cancel()
	before := v.agent.Hello().Start
	if _, err := v.mon.run(ctx, "system_reset", nil); err != nil {
		return err
	}
	if _, err := v.agent.waitRestart(ctx, before); err != nil {
		return v.bootError("after reset", err)
	}
	return nil
}

// WaitEvent waits for the first QMP event named name (SHUTDOWN,
// DEVICE_DELETED, ...) since the VM started.
func (v *VM) WaitEvent(ctx context.Context, name string) (Event, error) {
	ctx, cancel := withDefaultTimeout(ctx, time.Minute)
	defer cancel()
	e, _, err := v.mon.waitEvent(ctx, name, 0)
	return e, err
}

// Events returns the QMP events received so far.
func (v *VM) Events() []Event { return v.mon.eventLog() }

// Wait waits for QEMU to exit by itself (after a guest poweroff) and
// returns its exit status.
func (v *VM) Wait(ctx context.Context) error {
	ctx, cancel := withDefaultTimeout(ctx, time.Minute)
	defer cancel()
	select {
	case <-v.exited:
		return v.waitErr
	case <-ctx.Done():
		return fmt.Errorf("vmtest: waiting for QEMU %s to exit: %w", v.Name, ctx.Err())
	}
}

// Pid returns QEMU's process id.
func (v *VM) Pid() int { return v.cmd.Process.Pid }

// Close stops the VM: QMP quit, then SIGKILL to its process group, and
// reaps QEMU. It is idempotent and safe to call concurrently; it fails only
// if QEMU could not be reaped.
func (v *VM) Close() error {
	v.closeOnce.Do(func() { v.closeErr = v.shutdown() })
	return v.closeErr
}

func (v *VM) shutdown() error {
	if v.agent != nil {
		v.agent.Close()
	}
	select {
	case <-v.exited:
	default:
		if v.mon != nil {
			ctx, cancel := context.WithTimeout(context.Background(), quitTimeout)
			v.mon.run(ctx, "quit", nil) // QEMU may close QMP before it replies
			cancel()
		}
		select {
		case <-v.exited:
		case <-time.After(quitTimeout):
		}
	}
	var err error
	select {
	case <-v.exited:
	default:
		syscall.Kill(-v.cmd.Process.Pid, syscall.SIGKILL)
		select {
		case <-v.exited:
		case <-time.After(killTimeout):
			err = fmt.Errorf("vmtest: QEMU %s (pid %d) not reaped %v after SIGKILL", v.Name, v.cmd.Process.Pid, killTimeout)
		}
	}
	// QEMU is gone; anything left in its group (nothing, normally) goes too.
	syscall.Kill(-v.cmd.Process.Pid, syscall.SIGKILL)
	if v.mon != nil {
		v.mon.close()
	}
	os.RemoveAll(v.dir)
	if err == nil {
		procs.remove(v.cmd.Process.Pid)
	}
	return err
}

// Start boots a VM for a test: its logs go to the test's log directory,
// it is closed in t.Cleanup, and if the test failed the tails of its
// console and QEMU logs are printed. A boot failure fails the test.
func Start(t testing.TB, o Options) *VM {
	t.Helper()
	o.LogDir = TestLogDir(t)
	v, err := Boot(context.Background(), o)
	if err != nil {
		name := o.Name
		if name == "" {
			name = "vm"
		}
		console, qlog := logPaths(o.LogDir, name)
		logTails(t, name, console, qlog)
		t.Fatal(err)
	}
	t.Cleanup(func() { closeForTest(t, v) })
	return v
}

// closeForTest closes v, checks that QEMU is gone and prints the logs of a
// failed test.
func closeForTest(t testing.TB, v *VM) {
	t.Helper()
	if err := v.Close(); err != nil {
		t.Error(err)
	}
	if err := syscall.Kill(v.Pid(), 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("vmtest: QEMU %s (pid %d) still exists after Close: %v", v.Name, v.Pid(), err)
	}
	if t.Failed() {
		logTails(t, v.Name, v.Console, v.QEMULog)
	}
}

// logTails prints the end of a VM's console and QEMU logs.
func logTails(t testing.TB, name, console, qlog string) {
	t.Helper()
	t.Logf("---- %s console (%s), last lines:\n%s", name, console, tailLines(tailFile(console, 16<<10), 60))
	if s := strings.TrimSpace(tailFile(qlog, 4<<10)); s != "" {
		t.Logf("---- %s QEMU log (%s):\n%s", name, qlog, s)
	}
}

var (
	unsafeName = regexp.MustCompile(`[^A-Za-z0-9_.-]+`)
	cleaned    sync.Map // log dirs emptied by this process
)

// TestLogDir returns the directory for a test's VM logs,
// build/vmtest/logs/TESTNAME (or under VSDP_VMTEST_LOGDIR), emptied the
// first time this process uses it.
func TestLogDir(t testing.TB) string {
	base := filepath.Join("build", "vmtest", "logs")
	if cfg, err := loadConfig(); err == nil {
		base = cfg.logDir
	}
	dir := filepath.Join(base, unsafeName.ReplaceAllString(t.Name(), "_"))
	if _, done := cleaned.LoadOrStore(dir, true); !done {
		os.RemoveAll(dir)
	}
	return dir
}

func tailFile(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err.Error()
	}
	off := max(st.Size()-n, 0)
	b := make([]byte, st.Size()-off)
	if _, err := f.ReadAt(b, off); err != nil {
		return err.Error()
	}
	return string(b)
}

func tailLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// procs records the QEMU processes this process started and has not reaped.
var procs = &registry{m: make(map[int]string)}

type registry struct {
	mu sync.Mutex
	m  map[int]string
}

func (r *registry) add(pid int, name string) {
	r.mu.Lock()
	r.m[pid] = name
	r.mu.Unlock()
}

func (r *registry) remove(pid int) {
	r.mu.Lock()
	delete(r.m, pid)
	r.mu.Unlock()
}

func (r *registry) snapshot() map[int]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[int]string, len(r.m))
	for k, v := range r.m {
		out[k] = v
	}
	return out
}

// Main runs a package's tests (call it from TestMain) and then makes sure
// no QEMU process started by them is left: survivors are killed and the
// run fails.
func Main(m *testing.M) {
	code := m.Run()
	if left := procs.snapshot(); len(left) > 0 {
		for pid, name := range left {
			fmt.Fprintf(os.Stderr, "vmtest: QEMU %s (pid %d) outlived its test; killing it\n", name, pid)
			syscall.Kill(-pid, syscall.SIGKILL)
			syscall.Kill(pid, syscall.SIGKILL)
		}
		code = 1
	}
	os.Exit(code)
}
