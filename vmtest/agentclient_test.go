package vmtest

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vsdp/vsdp/vmtest/internal/agent"
	"github.com/vsdp/vsdp/vmtest/internal/proto"
)

// socketPair returns two connected Unix stream sockets.
func socketPair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	var conns [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), fmt.Sprint("pair", i))
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c
	}
	return conns[0], conns[1]
}

// inProcessAgent serves the agent protocol on one end of a socket pair
// and returns a connected client. noise is written before the Hello.
func inProcessAgent(t *testing.T, noise []byte) (*Agent, func()) {
	t.Helper()
	host, guest := socketPair(t)
	srv := &agent.Server{Hello: proto.Hello{Version: proto.Version, Kernel: "test", PID: os.Getpid()}}
	done := make(chan error, 1)
	go func() {
		if len(noise) > 0 {
			guest.Write(noise)
		}
		done <- srv.Serve(context.Background(), guest)
	}()
	a, err := newAgent(host, time.Now().Add(10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	stop := func() {
		a.Close()
		if err := <-done; err == nil {
			t.Error("Serve returned nil after the host closed")
		}
		guest.Close()
	}
	return a, stop
}

func countFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// checkLeaks fails the test if goroutines or fds grew by the end.
func checkLeaks(t *testing.T) {
	g0, f0 := runtime.NumGoroutine(), countFDs(t)
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for {
			g, f := runtime.NumGoroutine(), countFDs(t)
			if g <= g0 && f <= f0 {
				return
			}
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<16)
				t.Errorf("leak: goroutines %d -> %d, fds %d -> %d\n%s", g0, g, f0, f, buf[:runtime.Stack(buf, true)])
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}

func TestAgentProtocol(t *testing.T) {
	checkLeaks(t)
	a, stop := inProcessAgent(t, []byte("boot noise VSD\x00VSDAxx"))
	defer stop()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	if h := a.Hello(); h.Kernel != "test" || h.Version != proto.Version {
		t.Errorf("hello %+v", h)
	}
	t.Run("output", func(t *testing.T) {
		r, err := a.Exec(ctx, Cmd{Args: []string{"sh", "-c", "cat; echo E >&2; exit 4"}, Stdin: []byte("in"), Env: []string{"X=1"}})
		if err != nil {
			t.Fatal(err)
		}
		if string(r.Stdout) != "in" || string(r.Stderr) != "E\n" || r.ExitCode != 4 {
			t.Errorf("result %+v", r)
		}
		var ee *ExitError
		if !errors.As(r.Err(), &ee) || !strings.Contains(ee.Error(), "exit status 4") {
			t.Errorf("Err() = %v", r.Err())
		}
		if r, err := a.Exec(ctx, Cmd{Args: []string{"sh", "-c", "echo $X"}, Env: []string{"X=42"}}); err != nil || string(r.Stdout) != "42\n" {
			t.Errorf("env: %v %v", r, err)
		}
	})
	t.Run("truncated", func(t *testing.T) {
		r, err := a.Exec(ctx, Cmd{Args: []string{"sh", "-c", "head -c 100000 /dev/zero"}, MaxOutput: 1000})
		if err != nil {
			t.Fatal(err)
		}
		if len(r.Stdout) != 1000 || !r.Truncated || r.ExitCode != 0 {
			t.Errorf("got %d bytes, truncated %v, exit %d", len(r.Stdout), r.Truncated, r.ExitCode)
		}
	})
	t.Run("missing", func(t *testing.T) {
		var ae *AgentError
		if _, err := a.Run(ctx, "/no/such/program"); !errors.As(err, &ae) {
			t.Errorf("err %v, want *AgentError", err)
		}
	})
	t.Run("invalid", func(t *testing.T) {
		var ae *AgentError
		if _, err := a.Exec(ctx, Cmd{}); !errors.As(err, &ae) {
			t.Errorf("empty argv: err %v, want *AgentError", err)
		}
		if err := a.WriteFile(ctx, "relative", nil, 0); !errors.As(err, &ae) {
			t.Errorf("relative path: err %v, want *AgentError", err)
		}
	})
	t.Run("timeout", func(t *testing.T) {
		start := time.Now()
		r, err := a.Exec(ctx, Cmd{Args: []string{"sh", "-c", "sleep 20 & sleep 30"}, Timeout: 200 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		if !r.TimedOut || r.Signal == "" || r.Err() == nil || time.Since(start) > 5*time.Second {
			t.Errorf("result %+v after %v", r, time.Since(start))
		}
	})
	t.Run("stop", func(t *testing.T) {
		p, err := a.Start(ctx, Cmd{Args: []string{"sh", "-c", "echo up; exec sleep 30"}})
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(200 * time.Millisecond)
		r, err := p.Stop(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if !r.Canceled || r.Err() == nil || string(r.Stdout) != "up\n" {
			t.Errorf("result %+v", r)
		}
	})
	t.Run("context", func(t *testing.T) {
		cctx, ccancel := context.WithTimeout(ctx, 200*time.Millisecond)
		defer ccancel()
		if _, err := a.Run(cctx, "sleep", "30"); !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("err %v, want deadline exceeded", err)
		}
	})
	t.Run("concurrent", func(t *testing.T) {
		var wg sync.WaitGroup
		errs := make(chan error, 20)
		for i := range 20 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r, err := a.Run(ctx, "sh", "-c", fmt.Sprintf("sleep 0.1; echo %d", i))
				if err == nil && string(r.Stdout) != fmt.Sprintf("%d\n", i) {
					err = fmt.Errorf("request %d got %q", i, r.Stdout)
				}
				errs <- err
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Error(err)
			}
		}
	})
	t.Run("files", func(t *testing.T) {
		p := t.TempDir() + "/sub/blob"
		data := make([]byte, 3<<20)
		rand.Read(data)
		if err := a.WriteFile(ctx, p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		back, err := a.ReadFile(ctx, p)
		if err != nil {
			t.Fatal(err)
		}
		if sha256.Sum256(back) != sha256.Sum256(data) {
			t.Errorf("read back %d bytes with another hash", len(back))
		}
		if st, err := os.Stat(p); err != nil || st.Mode().Perm() != 0o600 {
			t.Errorf("mode %v, %v", st.Mode(), err)
		}
		var ae *AgentError
		if _, err := a.ReadFile(ctx, p+".missing"); !errors.As(err, &ae) {
			t.Errorf("missing file: err %v", err)
		}
	})
	t.Run("poweroff refused", func(t *testing.T) {
		var ae *AgentError
		if err := a.Poweroff(ctx); !errors.As(err, &ae) {
			t.Errorf("err %v, want *AgentError (no Poweroff hook)", err)
		}
	})
}

// TestAgentConnectionLoss: a pending request fails, quickly, when the
// guest end goes away; so do later ones.
func TestAgentConnectionLoss(t *testing.T) {
	checkLeaks(t)
	host, guest := socketPair(t)
	defer guest.Close()
	go proto.WriteFrame(guest, proto.Frame{Type: proto.TypeHello, Payload: []byte(`{"version":1}`)})
	a, err := newAgent(host, time.Now().Add(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	errc := make(chan error, 1)
	go func() {
		_, err := a.Run(context.Background(), "sleep", "10")
		errc <- err
	}()
	// Swallow the request, then drop the connection.
	if _, err := proto.ReadFrame(guest); err != nil {
		t.Fatal(err)
	}
	guest.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, ErrAgent) {
			t.Errorf("err %v, want ErrAgent", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("pending request not failed after the connection dropped")
	}
	if _, err := a.Run(context.Background(), "true"); !errors.Is(err, ErrAgent) {
		t.Errorf("later request: err %v, want ErrAgent", err)
	}
}

// TestAgentRestart: a second Hello (the agent restarted) fails what was
// pending and the connection goes on.
func TestAgentRestart(t *testing.T) {
	checkLeaks(t)
	host, guest := socketPair(t)
	defer guest.Close()
	go proto.WriteFrame(guest, proto.Frame{Type: proto.TypeHello, Payload: []byte(`{"version":1,"pid":1}`)})
	a, err := newAgent(host, time.Now().Add(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	errc := make(chan error, 1)
	go func() {
		_, err := a.Run(context.Background(), "sleep", "10")
		errc <- err
	}()
	if _, err := proto.ReadFrame(guest); err != nil {
		t.Fatal(err)
	}
	proto.WriteFrame(guest, proto.Frame{Type: proto.TypeHello, Payload: []byte(`{"version":1,"pid":2}`)})
	select {
	case err := <-errc:
		if !errors.Is(err, ErrAgent) || !strings.Contains(err.Error(), "restarted") {
			t.Errorf("err %v, want a restart error", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("pending request not failed after the agent restarted")
	}
	if a.Hello().PID != 2 {
		t.Errorf("hello pid %d, want 2", a.Hello().PID)
	}
}

// TestAgentHandshake covers the hello wait: a wrong version, and silence
// until the deadline.
func TestAgentHandshake(t *testing.T) {
	checkLeaks(t)
	for _, tt := range []struct {
		name  string
		hello []byte
	}{
		{"wrong version", []byte(`{"version":99}`)},
		{"bad json", []byte(`{`)},
		{"silence", nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			host, guest := socketPair(t)
			defer guest.Close()
			if tt.hello != nil {
				go proto.WriteFrame(guest, proto.Frame{Type: proto.TypeHello, Payload: tt.hello})
			}
			start := time.Now()
			_, err := newAgent(host, time.Now().Add(300*time.Millisecond))
			if !errors.Is(err, ErrAgent) {
				t.Errorf("err %v, want ErrAgent", err)
			}
			if time.Since(start) > 3*time.Second {
				t.Errorf("handshake took %v", time.Since(start))
			}
		})
	}
}

func TestResultErr(t *testing.T) {
	for _, tt := range []struct {
		r    Result
		want string
	}{
		{Result{Args: []string{"true"}}, ""},
		{Result{Args: []string{"x"}, ExitCode: 2, Stderr: []byte("bad\n")}, "exit status 2: bad"},
		{Result{Args: []string{"x"}, ExitCode: -1, Signal: "killed"}, "killed by killed"},
		{Result{Args: []string{"x"}, ExitCode: -1, Signal: "killed", TimedOut: true}, "timed out"},
		{Result{Args: []string{"x"}, ExitCode: -1, Canceled: true}, "canceled"},
	} {
		err := tt.r.Err()
		if tt.want == "" {
			if err != nil {
				t.Errorf("%+v: Err() = %v", tt.r, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%+v: Err() = %v, want %q", tt.r, err, tt.want)
		}
	}
}
