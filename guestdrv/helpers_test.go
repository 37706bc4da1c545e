package guestdrv

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vsdp/vsdp/guestdrv/internal/leakcheck"
)

// Built once per test binary (TestMain): the library, the checker, the C
// test program and the sanitizer-built harness.
var bin struct {
	dir      string
	lib      string
	conf     string // vsdp-conf
	prog     string // testdata/vsdptest.c
	harness  string // testdata/harness.c with ASan and UBSan
	buildErr error
}

func TestMain(m *testing.M) {
	bin.buildErr = buildCached()
	os.Exit(m.Run())
}

// buildCached builds the C parts into a cache directory named by a hash of
// their sources and of the compiler, so that fuzz workers and later runs
// reuse one build. A build goes to a temporary directory first and is
// renamed into place whole.
func buildCached() error {
	h := sha256.New()
	srcs, _ := filepath.Glob("libvsdp/*")
	tds, _ := filepath.Glob("testdata/*.c")
	for _, f := range append(append([]string{"build.sh"}, srcs...), tds...) {
		b, err := os.ReadFile(f)
		if err != nil {
			return err
		}
		fmt.Fprintf(h, "%s %d\n", f, len(b))
		h.Write(b)
	}
	ver, err := exec.Command("gcc", "--version").Output()
	if err != nil {
		return fmt.Errorf("gcc: %v", err)
	}
	h.Write(ver)
	base, err := os.UserCacheDir()
	if err != nil {
		base = os.TempDir()
	}
	dir := filepath.Join(base, "vsdp-guestdrv", hex.EncodeToString(h.Sum(nil))[:16])
	setPaths(dir)
	if _, err := os.Stat(filepath.Join(dir, "ok")); err == nil {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), "build")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	setPaths(tmp)
	if err := buildAll(tmp); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(tmp, "ok"), nil, 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp, dir); err != nil {
		if _, err2 := os.Stat(filepath.Join(dir, "ok")); err2 != nil {
			return err // not another process's build either
		}
	}
	setPaths(dir)
	// forget builds of older sources (a day old: leave concurrent runs be)
	if old, err := os.ReadDir(filepath.Dir(dir)); err == nil {
		for _, e := range old {
			p := filepath.Join(filepath.Dir(dir), e.Name())
			if info, err := e.Info(); err == nil && p != dir && time.Since(info.ModTime()) > 24*time.Hour {
				os.RemoveAll(p)
			}
		}
	}
	return nil
}

func setPaths(dir string) {
	bin.dir = dir
	bin.lib = filepath.Join(dir, "libvsdp.so")
	bin.conf = filepath.Join(dir, "vsdp-conf")
	bin.prog = filepath.Join(dir, "vsdptest")
	bin.harness = filepath.Join(dir, "harness")
}

func buildAll(dir string) error {
	run := func(name string, args ...string) error {
		cmd := exec.Command(name, args...)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
		return nil
	}
	if err := run("bash", "build.sh", dir); err != nil {
		return err
	}
	cflags := []string{"-std=c11", "-Wall", "-Wextra", "-Werror", "-g"}
	if err := run("gcc", append(cflags, "-O2", "-pthread", "-o", bin.prog, "testdata/vsdptest.c", "-ldl")...); err != nil {
		return err
	}
	return run("gcc", append(cflags, "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
		"-o", bin.harness, "testdata/harness.c", "libvsdp/rules.c")...)
}

func needBuild(t testing.TB) {
	t.Helper()
	if bin.buildErr != nil {
		t.Fatalf("building the C parts: %v", bin.buildErr)
	}
}

// shortDir returns a temporary directory with a path short enough for
// AF_UNIX names.
func shortDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("", "vsdp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

var transports = []Transport{Unix, TCP}

// newHost starts a fake host for t and checks, when t ends, that it met no
// error and that nothing leaked.
func newHost(t *testing.T, tr Transport) *FakeHost {
	t.Helper()
	needBuild(t)
	leak := leakcheck.Take()
	o := HostOptions{Transport: tr}
	if tr == Unix {
		o.Dir = shortDir(t)
	}
	h, err := NewFakeHost(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := h.Close(); err != nil {
			t.Errorf("closing the fake host: %v", err)
		}
		if err := h.Err(); err != nil {
			t.Errorf("fake host: %v", err)
		}
		leak.Check(t)
	})
	return h
}

// result is what a C test program printed.
type result struct {
	kv  map[string]string
	out string
}

func (r result) get(t *testing.T, k string) string {
	t.Helper()
	v, ok := r.kv[k]
	if !ok {
		t.Fatalf("the program printed no %q:\n%s", k, r.out)
	}
	return v
}

func (r result) want(t *testing.T, k, v string) {
	t.Helper()
	if got := r.get(t, k); got != v {
		t.Errorf("%s = %q, want %q\n%s", k, got, v, r.out)
	}
}

func (r result) num(t *testing.T, k string) int {
	t.Helper()
	n, err := strconv.Atoi(r.get(t, k))
	if err != nil {
		t.Fatalf("%s: %v", k, err)
	}
	return n
}

// writeConf writes a configuration file and returns its path.
func writeConf(t *testing.T, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "vsdp.conf")
	if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// guestEnv is the environment of a program run under the library.
// VSDP_TEST_PRELOAD replaces LD_PRELOAD, to run the suite against another
// build of the library (e.g. "libasan.so.8:/tmp/asan/libvsdp.so", with
// ASAN_OPTIONS=verify_asan_link_order=0:detect_leaks=0).
func guestEnv(h *FakeHost, conf string, extra ...string) []string {
	pre := bin.lib
	if p := os.Getenv("VSDP_TEST_PRELOAD"); p != "" {
		pre = p
	}
	env := []string{"PATH=" + os.Getenv("PATH"), "LD_PRELOAD=" + pre, "VSDP_CTL_TIMEOUT_MS=3000"}
	if a := os.Getenv("ASAN_OPTIONS"); a != "" {
		env = append(env, "ASAN_OPTIONS="+a, "UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1")
	}
	if conf != "" {
		env = append(env, "VSDP_CONFIG="+conf)
	}
	if h != nil {
		env = append(env, h.Env()...)
	}
	return append(env, extra...)
}

// runProg runs the C test program under the library and parses its output.
// It fails the test if the program fails, or leaks descriptors beyond the
// control connection.
func runProg(t *testing.T, h *FakeHost, conf string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin.prog, args...)
	cmd.Env = guestEnv(h, conf)
	open := 0
	if h != nil {
		open = h.Conns()
	}
	out, err := cmd.CombinedOutput()
	r := parseKV(string(out))
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", filepath.Base(bin.prog), args, err, out)
	}
	checkProgFDs(t, r)
	if h != nil {
		settle(t, h, open) // the program is gone: let the host take in all it sent
	}
	return r
}

func checkProgFDs(t *testing.T, r result) {
	t.Helper()
	before, err1 := strconv.Atoi(r.kv["fds_before"])
	after, err2 := strconv.Atoi(r.kv["fds_after"])
	if err1 != nil || err2 != nil {
		return
	}
	// the library may hold one descriptor: its control connection
	if after > before+1 {
		t.Errorf("the program leaked descriptors: %d before, %d after\n%s", before, after, r.out)
	}
}

func parseKV(out string) result {
	r := result{kv: map[string]string{}, out: out}
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			r.kv[k] = v
		}
	}
	return r
}

// progLines starts the C test program and delivers its output lines as
// they come, for tests that must act in the middle of its run.
type progLines struct {
	cmd   *exec.Cmd
	lines chan string
	mu    sync.Mutex
	all   strings.Builder
	done  chan error
}

func startProg(t *testing.T, h *FakeHost, conf string, args ...string) *progLines {
	t.Helper()
	cmd := exec.Command(bin.prog, args...)
	cmd.Env = guestEnv(h, conf)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &progLines{cmd: cmd, lines: make(chan string, 1024), done: make(chan error, 1)}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			p.mu.Lock()
			p.all.WriteString(sc.Text() + "\n")
			p.mu.Unlock()
			p.lines <- sc.Text()
		}
		close(p.lines)
		p.done <- cmd.Wait()
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		for range p.lines {
		}
		<-p.done
	})
	return p
}

// waitKey waits for a "key=value" line and returns the value.
func (p *progLines) waitKey(t *testing.T, key string) string {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for {
		select {
		case l, ok := <-p.lines:
			if !ok {
				t.Fatalf("the program ended without %q:\n%s", key, p.output())
			}
			if k, v, ok := strings.Cut(l, "="); ok && k == key {
				return v
			}
		case <-timeout:
			t.Fatalf("no %q after 30s:\n%s", key, p.output())
		}
	}
}

// wait waits for the program to end and returns all it printed.
func (p *progLines) wait(t *testing.T) result {
	t.Helper()
	for range p.lines {
	}
	select {
	case err := <-p.done:
		p.done <- err
		if err != nil {
			t.Fatalf("the program failed: %v\n%s", err, p.output())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("the program did not end:\n%s", p.output())
	}
	r := parseKV(p.output())
	checkProgFDs(t, r)
	return r
}

// settle waits until the host has taken in everything a program sent: its
// control connections are closed, leaving the open ones of before.
func settle(t *testing.T, h *FakeHost, open int) {
	t.Helper()
	if err := h.WaitIdle(open, 5*time.Second); err != nil {
		t.Fatal(err)
	}
}

func (p *progLines) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.all.String()
}

// randomFile writes n pseudo-random bytes and returns the path and sha256.
func randomFile(t *testing.T, n int, seed uint64) (string, [32]byte) {
	t.Helper()
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	p := filepath.Join(t.TempDir(), "in")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p, sha256.Sum256(b)
}

func fileSum(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

func short(s [32]byte) string { return hex.EncodeToString(s[:6]) }

func sha256Sum(b []byte) [32]byte { return sha256.Sum256(b) }

// closingListener listens on loopback TCP, closes every connection it
// accepts, and returns its port. It is closed when the test ends.
func closingListener(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	return strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
}

// serveEcho makes h answer every dial with a ticket whose stream is read
// to EOF, hashed and sent back, then closed. The hashes come on the
// returned channel (buffered for one).
func serveEcho(h *FakeHost) <-chan [32]byte {
	sums := make(chan [32]byte, 1)
	h.SetDial(func(d Dial) Plan {
		return Plan{Kind: PlanTicket, Serve: func(s *Stream) {
			b, _ := io.ReadAll(s)
			sums <- sha256Sum(b)
			s.Write(b)
			s.Close()
		}}
	})
	return sums
}

// ticketFrom returns a dial policy that grants every dial a ticket with
// the local address local.
func ticketFrom(local string) func(Dial) Plan {
	a := netip.MustParseAddrPort(local)
	return func(Dial) Plan { return Plan{Kind: PlanTicket, Local: a} }
}
