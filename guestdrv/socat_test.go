package guestdrv

import (
	"bytes"
	"context"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"testing"
	"time"
)

// socat is a real program we did not write: it reaches the device only
// through the library. Both directions are checked by sha256.
func socatPath(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("socat")
	if err != nil {
		t.Fatalf("socat is needed for this test (apt-get install socat): %v", err)
	}
	return p
}

func TestSocatClient(t *testing.T) {
	socat := socatPath(t)
	for _, tr := range transports {
		t.Run(tr.String(), func(t *testing.T) {
			h := newHost(t, tr)
			sums := serveEcho(h)
			in, sum := randomFile(t, 2<<20, 5)
			f, err := os.Open(in)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			var out, errb bytes.Buffer
			cmd := exec.CommandContext(ctx, socat, "-t", "30", "-", "TCP:10.1.0.7:5000")
			cmd.Env = guestEnv(h, writeConf(t, confAllDevice))
			cmd.Stdin, cmd.Stdout, cmd.Stderr = f, &out, &errb
			if err := cmd.Run(); err != nil {
				t.Fatalf("socat: %v\n%s", err, errb.String())
			}
			if got := <-sums; got != sum {
				t.Errorf("host received sha256 %s, want %s", short(got), short(sum))
			}
			if got := sha256Sum(out.Bytes()); got != sum {
				t.Errorf("socat received %d bytes, sha256 %s, want %s", out.Len(), short(got), short(sum))
			}
		})
	}
}

func TestSocatServer(t *testing.T) {
	socat := socatPath(t)
	for _, tr := range transports {
		t.Run(tr.String(), func(t *testing.T) {
			h := newHost(t, tr)
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			var errb bytes.Buffer
			// An echo server: socat forks and execs cat for the connection.
			// (socat's PIPE address would deadlock itself on large
			// transfers: it polls a pipe writable, then blocks writing more
			// than the one free page into a pipe only it drains.)
			cmd := exec.CommandContext(ctx, socat, "-t", "30", "TCP-LISTEN:7000,reuseaddr", "EXEC:cat")
			cmd.Env = guestEnv(h, writeConf(t, confAllDevice))
			cmd.Stderr = &errb
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer cmd.Wait()
			defer cmd.Process.Kill()
			l, err := h.WaitListener(0, 20*time.Second)
			if err != nil {
				t.Fatalf("%v\n%s", err, errb.String())
			}
			if l.Bind.Port() != 7000 {
				t.Errorf("LISTEN for %v, want port 7000", l.Bind)
			}
			s, err := h.Call(l, netip.MustParseAddrPort("10.2.0.1:40001"), true)
			if err != nil {
				t.Fatal(err)
			}
			in, sum := randomFile(t, 2<<20, 6)
			data, _ := os.ReadFile(in)
			go func() { s.Write(data); s.CloseWrite() }()
			back, err := io.ReadAll(s)
			s.Close()
			if err != nil {
				t.Fatal(err)
			}
			if got := sha256Sum(back); got != sum {
				t.Errorf("echoed %d bytes, sha256 %s, want %s", len(back), short(got), short(sum))
			}
			if err := cmd.Wait(); err != nil {
				t.Errorf("socat: %v\n%s", err, errb.String())
			}
		})
	}
}
