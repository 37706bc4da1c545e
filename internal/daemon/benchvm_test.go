package daemon_test

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vsdp/vsdp/guestdrv/vsdpnet"
	"github.com/vsdp/vsdp/images"
	"github.com/vsdp/vsdp/internal/daemon"
	"github.com/vsdp/vsdp/internal/workload"
	"github.com/vsdp/vsdp/vmtest"
)

// The product-path benchmark's workload, the same over both paths.
const (
	benchPathEnv    = "VSDP_BENCH_PATH" // "device" or "slirp": the path TestGuestProductBench measures
	benchServiceEnv = "VSDP_BENCH_SERVICE"
	benchFabricAddr = "10.62.0.1"
	benchExportPort = 9
	benchBulk       = 8 << 20  // bytes the guest sends
	benchWrite      = 64 << 10 // bytes per write
	benchPing       = 64       // ping-pong message
	benchWarm       = 10       // ping-pongs not timed
	benchRounds     = 200      // ping-pongs timed
	benchConnects   = 10       // connections timed
)

// The host service's commands, the first byte a client sends.
const (
	cmdBulk  = 'B' // read to EOF, answer with the SHA-256 of what was read
	cmdEcho  = 'E' // echo until EOF
	cmdHello = 'H' // answer one byte, close
)

// benchService is the host TCP service both paths reach: a sink that
// answers with a digest, an echo, and a one-byte hello. It counts what it
// served per command.
type benchService struct {
	ln     net.Listener
	wg     sync.WaitGroup
	mu     sync.Mutex
	served map[byte]int
}

func startBenchService(t *testing.T) *benchService {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &benchService{ln: ln, served: map[byte]int{}}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer c.Close()
				c.SetDeadline(time.Now().Add(3 * time.Minute)) // bounded, whatever the client does
				var cmd [1]byte
				if _, err := io.ReadFull(c, cmd[:]); err != nil {
					return
				}
				switch cmd[0] {
				case cmdBulk:
					if _, err := workload.Digest(c); err != nil {
						return
					}
				case cmdEcho:
					io.Copy(c, c)
				case cmdHello:
					c.Write([]byte{'h'})
				default:
					return
				}
				s.mu.Lock()
				s.served[cmd[0]]++
				s.mu.Unlock()
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); s.wg.Wait() })
	return s
}

func (s *benchService) count(cmd byte) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.served[cmd]
}

// TestVMBenchProductPath measures the product path: a guest program
// reaching a host TCP service exported by vsdpd, through the vsock device,
// sdpback and the SDP engine on the soft provider, beside the same guest
// reaching the same service over virtio-net with slirp (restrict=on, a
// guest forward). One boot; the guest program (TestGuestProductBench)
// measures guest→service throughput, 64-byte round trips and connect plus
// first reply (the median of ten) on both paths. It prints a table for cmd/benchtab.
func TestVMBenchProductPath(t *testing.T) {
	vmtest.Require(t)
	svc := startBenchService(t)
	svcPort := svc.ln.Addr().(*net.TCPAddr).Port
	sock := filepath.Join(t.TempDir(), "vm.sock")
	cfg := &daemon.Config{
		Fabric:  daemon.Fabric{Addr: benchFabricAddr},
		Exports: []daemon.ExportConfig{{Port: benchExportPort, Target: svc.ln.Addr().String()}},
		VMs: []daemon.VMConfig{{Name: "bench", Socket: sock, CID: 5, Addr: "10.62.0.5",
			Policy: []string{"sdp 10.62.0.0/24"}}},
	}
	d := startDaemon(t, cfg) // before the VM: QEMU goes before its back-end
	const guestBinary = "/bin/daemon.test"
	start := time.Now()
	vm := vmtest.Start(t, vmtest.Options{
		Name: "benchpath",
		Image: images.Spec{
			Modules:  []string{"vmw_vsock_virtio_transport"},
			Programs: []images.Program{{Package: "./internal/daemon", Test: true, Path: guestBinary}},
		},
		VhostUser: []vmtest.VhostUser{{Kind: vmtest.VhostVsock, Socket: sock}},
		NICs: []vmtest.NIC{{User: &vmtest.UserNet{GuestForwards: []vmtest.GuestForward{
			{Port: benchExportPort, HostPort: svcPort},
		}}}},
	})
	t.Logf("guest up in %v", time.Since(start).Round(time.Millisecond))
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	if _, err := vm.Run(ctx, "sh", "-c", "set -e; ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0"); err != nil {
		t.Fatal(err)
	}

	figures := map[string]float64{}
	for _, path := range []string{"device", "slirp"} {
		addr := net.JoinHostPort(benchFabricAddr, strconv.Itoa(benchExportPort))
		if path == "slirp" {
			addr = net.JoinHostPort(vmtest.GuestForwardAddr, strconv.Itoa(benchExportPort))
		}
		before, bulkBefore := d.Exporter().Stats(), svc.count(cmdBulk)
		r, err := vm.Exec(ctx, vmtest.Cmd{
			Args:      []string{guestBinary, "-test.run", "^TestGuestProductBench$", "-test.v", "-test.count=1", "-test.timeout=3m"},
			Env:       []string{benchPathEnv + "=" + path, benchServiceEnv + "=" + addr},
			Timeout:   4 * time.Minute,
			MaxOutput: 1 << 20,
		})
		if err != nil {
			t.Fatal(err)
		}
		out := string(r.Stdout) + string(r.Stderr)
		t.Logf("%s path:\n%s", path, out)
		if r.Err() != nil || !strings.Contains(out, "--- PASS: TestGuestProductBench ") {
			t.Fatalf("%s path: the guest program did not pass (%v)", path, r.Err())
		}
		for _, m := range productRE.FindAllStringSubmatch(out, -1) {
			figures[m[1]], _ = strconv.ParseFloat(m[2], 64)
		}
		for _, k := range []string{"bulk", "rtt", "setup"} {
			if figures[path+" "+k] == 0 {
				t.Errorf("the guest printed no %s figure for the %s path", k, path)
			}
		}
		// Which path the bytes took: the export carried the bulk to the
		// service on the device path, nothing on slirp's.
		after := d.Exporter().Stats()
		toTarget := after.ToTarget - before.ToTarget
		if svc.count(cmdBulk) != bulkBefore+1 {
			t.Errorf("%s path: the service served %d bulk transfers, want 1", path, svc.count(cmdBulk)-bulkBefore)
		}
		switch {
		case path == "device" && toTarget < benchBulk:
			t.Errorf("device path: the export carried %d bytes to the service, want at least %d", toTarget, benchBulk)
		case path == "slirp" && toTarget != 0:
			t.Errorf("slirp path: the export carried %d bytes: the path was not slirp", toTarget)
		}
	}
	if t.Failed() {
		return
	}
	const table = "Product path: guest -> vsock device -> SDP (soft provider) -> exported host service, beside virtio-net/slirp"
	row := func(name, key, unit string) {
		fmt.Printf("BENCHVM %s|%s|vsock device + SDP|%.2f|virtio-net slirp (restrict=on, guestfwd)|%.2f|%s\n",
			table, name, figures["device "+key], figures["slirp "+key], unit)
	}
	row("guest -> service, 64 KiB writes", "bulk", "MiB/s")
	row("64-byte round trip", "rtt", "µs")
	row("connect + first reply (median)", "setup", "µs")
	fmt.Printf("BENCHVM-NOTE %s|one TCG guest (1 vCPU), one boot, the same guest program and host service over both paths; %d MiB until the service's SHA-256 is back, %d timed round trips, %d connections each until the service's first byte; slirp's guest forward spawns a socat relay per connection (QEMU 7.2)\n",
		table, benchBulk>>20, benchRounds, benchConnects)
}

var productRE = regexp.MustCompile(`(?m)^PRODUCT (\w+ \w+) ([0-9.]+)$`)

// TestGuestProductBench runs in TestVMBenchProductPath's guest: it reaches
// the host service through the path the environment names and prints
// "PRODUCT path metric value" lines (MiB/s, µs, median µs). Bulk data is checked by
// the service's SHA-256, echoes byte for byte.
func TestGuestProductBench(t *testing.T) {
	path, addr := os.Getenv(benchPathEnv), os.Getenv(benchServiceEnv)
	var dial func(ctx context.Context) (net.Conn, error)
	switch path {
	case "device":
		dial = func(ctx context.Context) (net.Conn, error) { return vsdpnet.DialContext(ctx, "tcp", addr) }
	case "slirp":
		dial = func(ctx context.Context) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", addr)
		}
	case "":
		t.Skipf("needs %s=device|slirp and %s: runs in TestVMBenchProductPath's guest", benchPathEnv, benchServiceEnv)
	default:
		t.Fatalf("%s=%q", benchPathEnv, path)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	open := func(cmd byte) net.Conn {
		t.Helper()
		c, err := dial(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write([]byte{cmd}); err != nil {
			t.Fatal(err)
		}
		return c
	}

	data := make([]byte, benchBulk)
	for i := range data {
		data[i] = byte(i*13 + i>>12)
	}
	start := time.Now()
	c := open(cmdBulk)
	digest, err := workload.Bulk(c, data, benchWrite)
	if err != nil {
		t.Fatal(err)
	}
	el := time.Since(start)
	c.Close()
	if digest != sha256.Sum256(data) {
		t.Fatal("bulk: the service's digest differs")
	}
	t.Logf("%s bulk: %d MiB in %v", path, benchBulk>>20, el.Round(time.Millisecond))
	fmt.Printf("PRODUCT %s bulk %.2f\n", path, float64(benchBulk)/(1<<20)/el.Seconds())

	c = open(cmdEcho)
	if tc, ok := c.(interface{ SetNoDelay(bool) error }); ok {
		tc.SetNoDelay(true)
	}
	if el, err = workload.PingPong(c, benchPing, benchWarm, benchRounds); err != nil {
		t.Fatal(err)
	}
	c.Close()
	fmt.Printf("PRODUCT %s rtt %.2f\n", path, float64(el.Microseconds())/benchRounds)

	setup := make([]time.Duration, benchConnects)
	for i := range setup {
		t0 := time.Now()
		c := open(cmdHello)
		var b [1]byte
		if _, err := io.ReadFull(c, b[:]); err != nil || b[0] != 'h' {
			t.Fatalf("connection %d: %q, %v", i, b, err)
		}
		setup[i] = time.Since(t0)
		c.Close()
	}
	slices.Sort(setup)
	t.Logf("%s connect + first reply: %v", path, setup)
	fmt.Printf("PRODUCT %s setup %.2f\n", path, float64(setup[len(setup)/2].Microseconds()))
}
