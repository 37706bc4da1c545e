package vmtest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vsdp/vsdp/images"
	"github.com/vsdp/vsdp/vhost"
	"github.com/vsdp/vsdp/vhost/vsock"
	"github.com/vsdp/vsdp/vhost/vsock/vsocktest"
)

// Test vsock service: host port 7 echoes, every other port is refused.
const (
	echoPort  = 7
	vsockCID  = 42
	vsockProg = "github.com/vsdp/vsdp/vmtest/vsockcat"
)

type echoBackend struct {
	mu      sync.Mutex
	streams []*echoStream
	refused int
}

func (b *echoBackend) Connect(r *vsock.Request) {
	if r.HostPort != echoPort {
		b.mu.Lock()
		b.refused++
		b.mu.Unlock()
		r.Refuse()
		return
	}
	s := &echoStream{}
	s.mu.Lock() // Deliver may come as soon as Accept sent RESPONSE
	c, err := r.Accept(s)
	s.conn = c
	s.mu.Unlock()
	if err == nil {
		b.mu.Lock()
		b.streams = append(b.streams, s)
		b.mu.Unlock()
	}
}

// echoStream sends back what the guest sends, and EOF after the guest's
// SHUTDOWN(send) once everything went back.
type echoStream struct {
	mu      sync.Mutex
	conn    *vsock.Conn
	pending vsocktest.Queue
	echoed  int
	eof     bool
	err     error
}

func (s *echoStream) Deliver(p *vsock.Payload) {
	s.mu.Lock()
	s.pending.Append(p.Segs...)
	c := s.conn
	s.mu.Unlock()
	p.Release()
	c.Notify()
}

func (s *echoStream) Pull(dst [][]byte) (int, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := s.pending.Fill(dst)
	s.echoed += n
	return n, s.eof && s.pending.Len() == 0
}

func (s *echoStream) Shutdown(rcv, send, abortive bool) {
	s.mu.Lock()
	s.eof = s.eof || send
	c := s.conn
	s.mu.Unlock()
	c.Notify()
}

func (s *echoStream) Reset(err error) {
	s.mu.Lock()
	s.err = err
	s.mu.Unlock()
}

// TestVMVhostVsock is the first real boot of vhost-user-vsock-pci: QEMU
// 7.2 connects to the vhost server, the guest driver starts the rings, the
// guest sees the CID from GET_CONFIG, and streams to host port 7 are echoed
// byte-exact (sha256 in the guest), one and several at once; a connect to
// another port is refused.
func TestVMVhostVsock(t *testing.T) {
	Require(t)
	checkLeaks(t)
	sock := filepath.Join(t.TempDir(), "vsock.sock")
	be := &echoBackend{}
	var (
		mu   sync.Mutex
		devs []*vsock.Device
	)
	srv := &vhost.Server{NewDevice: func() (vhost.Device, error) {
		d, err := vsock.New(vsock.Config{CID: vsockCID}, be)
		if err == nil {
			mu.Lock()
			devs = append(devs, d)
			mu.Unlock()
		}
		return d, err
	}}
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	t.Cleanup(func() {
		srv.Close()
		select {
		case <-served:
		case <-time.After(10 * time.Second):
			t.Error("vhost server did not stop")
		}
	})

	hostPort := freePort(t)
	v := Start(t, Options{
		Name:      "vsock",
		VhostUser: []VhostUser{{Kind: VhostVsock, Socket: sock}},
		// A second way in, to check slirp forwards on the same boot.
		NICs:  []NIC{{User: &UserNet{Forwards: []Forward{{HostPort: hostPort, GuestPort: 8080}}}}},
		Image: images.Spec{Programs: []images.Program{{Package: vsockProg, Path: "/bin/vsockcat"}}},
	})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	if got := strings.TrimSpace(v.Check(t, "vsockcat", "-local-cid")); got != fmt.Sprint(vsockCID) {
		t.Errorf("guest CID %s, want %d (from GET_CONFIG)", got, vsockCID)
	}

	echo := func(t *testing.T, script string) string {
		t.Helper()
		r, err := v.Exec(ctx, Cmd{Args: []string{"sh", "-c", script}, Timeout: time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		if err := r.Err(); err != nil {
			t.Fatal(err)
		}
		return string(r.Stdout)
	}
	t.Run("one stream", func(t *testing.T) {
		const n = 4 << 20
		start := time.Now()
		out := echo(t, fmt.Sprintf("set -e; head -c %d /dev/urandom > /tmp/in; "+
			"t0=$(cut -d' ' -f1 /proc/uptime); vsockcat 2 %d < /tmp/in > /tmp/out; t1=$(cut -d' ' -f1 /proc/uptime); "+
			"sha256sum /tmp/in /tmp/out; wc -c < /tmp/out; echo \"$t0 $t1\"", n, echoPort))
		checkEcho(t, out, 1, n)
		var t0, t1 float64
		lines := strings.Split(strings.TrimSpace(out), "\n")
		fmt.Sscanf(lines[len(lines)-1], "%f %f", &t0, &t1)
		if t1 > t0 {
			t.Logf("echoed %d MiB through vhost-user-vsock in %.2f s (guest clock): %.1f MiB/s each way (whole request %v)",
				n>>20, t1-t0, float64(n)/(1<<20)/(t1-t0), time.Since(start).Round(time.Millisecond))
		}
	})
	t.Run("concurrent streams", func(t *testing.T) {
		const k, n = 4, 256 << 10
		out := echo(t, fmt.Sprintf("set -e; for i in $(seq %d); do head -c %d /dev/urandom > /tmp/in$i; done; "+
			"for i in $(seq %d); do vsockcat 2 %d < /tmp/in$i > /tmp/out$i & done; wait; "+
			"for i in $(seq %d); do sha256sum /tmp/in$i /tmp/out$i; done", k, n, k, echoPort, k))
		checkEcho(t, out, k, -1)
	})
	t.Run("slirp forward", func(t *testing.T) {
		v.Check(t, "ip", "link", "set", "eth0", "up")
		// slirp forwards to 10.0.2.15, the first address its DHCP hands out.
		v.Check(t, "ip", "addr", "add", "10.0.2.15/24", "dev", "eth0")
		p, err := v.Start(ctx, Cmd{Args: []string{"nc", "-l", "-p", "8080"}, Timeout: 30 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		if err := waitListen(ctx, v, 8080, 10*time.Second); err != nil {
			t.Fatal(err)
		}
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", hostPort), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("through slirp\n"))
		c.Close()
		r, err := p.Wait(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if string(r.Stdout) != "through slirp\n" {
			t.Errorf("guest received %q (exit %d, %s)", r.Stdout, r.ExitCode, r.Stderr)
		}
	})
	t.Run("refused", func(t *testing.T) {
		r, err := v.Exec(ctx, Cmd{Args: []string{"vsockcat", "2", "8"}, Timeout: 30 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		if r.ExitCode == 0 || !strings.Contains(string(r.Stderr), "connection reset") {
			t.Errorf("connect to a refused port: exit %d, stderr %q; want ECONNRESET", r.ExitCode, r.Stderr)
		}
	})

	mu.Lock()
	nDev := len(devs)
	var st vsock.Stats
	if nDev > 0 {
		st = devs[nDev-1].Stats()
	}
	mu.Unlock()
	be.mu.Lock()
	nStreams, refused := len(be.streams), be.refused
	for _, s := range be.streams {
		s.mu.Lock()
		if s.err != nil && !errors.Is(s.err, vsock.ErrReset) {
			t.Errorf("stream ended with %v", s.err)
		}
		s.mu.Unlock()
	}
	be.mu.Unlock()
	t.Logf("device stats: %+v; server stats: %+v", st, srv.Stats())
	if nDev != 1 || nStreams != 5 || refused != 1 {
		t.Errorf("%d devices, %d echo streams, %d refused; want 1, 5, 1", nDev, nStreams, refused)
	}
	if want := uint64(4<<20 + 4*256<<10); st.TxBytes < want || st.RxBytes < want {
		t.Errorf("device moved %d bytes in, %d out; want at least %d each", st.TxBytes, st.RxBytes, want)
	}

	// QEMU going away ends the session.
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(srv.Sessions()) > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if n := len(srv.Sessions()); n != 0 {
		t.Errorf("%d vhost sessions left after QEMU exited", n)
	}
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// checkEcho checks sha256sum output pairs (/tmp/inX, /tmp/outX): k pairs
// with equal hashes, and when n ≥ 0 a following byte count of n.
func checkEcho(t *testing.T, out string, k, n int) {
	t.Helper()
	var sums []string
	var count int
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) == 2 && len(f[0]) == 64:
			sums = append(sums, f[0])
		case len(f) == 1 && count == 0:
			fmt.Sscanf(f[0], "%d", &count)
		}
	}
	if len(sums) != 2*k {
		t.Fatalf("want %d hashes, got output:\n%s", 2*k, out)
	}
	for i := 0; i < len(sums); i += 2 {
		if sums[i] != sums[i+1] {
			t.Errorf("stream %d: sent sha256 %s, received %s", i/2, sums[i], sums[i+1])
		}
	}
	if n >= 0 && count != n {
		t.Errorf("received %d bytes, want %d", count, n)
	}
}
