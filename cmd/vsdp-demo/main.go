package main

import (
	"crypto/sha256"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vsdp/vsdp/guestdrv/ctl"
	"github.com/vsdp/vsdp/internal/daemon"
	"github.com/vsdp/vsdp/vhost/vhosttest"
	"github.com/vsdp/vsdp/vhost/vsock/vsocktest"
)

const (
	hostFabric = "10.77.0.1"
	vmFabric   = "10.77.0.3"
	exportPort = 80
	echoPort   = 7
	rawPort    = 81 // the same bytes as /blob, raw: for the shell in stage 3
	vmCID      = 3
)

func main() {
	size := flag.Int("size", 32<<20, "bytes to fetch")
	vm := flag.Bool("vm", true, "also boot a real guest (stage 2) when QEMU and the kernel are present")
	flag.Parse()
	if err := run(*size, *vm); err != nil {
		fmt.Fprintln(os.Stderr, "vsdp-demo:", err)
		os.Exit(1)
	}
}

// blob is the exported payload, served over HTTP by the host.
type blob struct {
	data []byte
	sum  [32]byte
}

func newBlob(n int) *blob {
	b := &blob{data: make([]byte, n)}
	rng := rand.New(rand.NewPCG(42, 42))
	for i := range b.data {
		b.data[i] = byte(rng.Uint32())
	}
	b.sum = sha256.Sum256(b.data)
	return b
}

func run(size int, withVM bool) error {
	fmt.Println("vsdp demo: an unmodified program's TCP traffic from a VM, carried over SDP")
	fmt.Println()
	b := newBlob(size)
	httpLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer httpLn.Close()
	mux := http.NewServeMux()
	mux.HandleFunc("/blob", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Write(b.data)
	})
	go http.Serve(httpLn, mux)
	echoLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer echoLn.Close()
	go func() {
		for {
			c, err := echoLn.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()

	rawLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer rawLn.Close()
	go func() {
		for {
			c, err := rawLn.Accept()
			if err != nil {
				return
			}
			go func() { c.Write(b.data); c.Close() }()
		}
	}()

	dir, err := os.MkdirTemp("", "vsdp-demo")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	sock, fsSock := filepath.Join(dir, "vm.sock"), filepath.Join(dir, "fs.sock")
	cfg := &daemon.Config{
		Provider: "auto",
		Fabric:   daemon.Fabric{Addr: hostFabric},
		Exports: []daemon.ExportConfig{
			{Port: exportPort, Target: httpLn.Addr().String()},
			{Port: echoPort, Target: echoLn.Addr().String()},
			{Port: rawPort, Target: rawLn.Addr().String()},
		},
		VMs: []daemon.VMConfig{{Name: "demo", Socket: sock, FSSocket: fsSock, CID: vmCID, Addr: vmFabric,
			Policy: []string{fmt.Sprintf("sdp %s:*", hostFabric)}}},
	}
	log := logrus.New()
	log.SetOutput(io.Discard)
	d, err := daemon.Start(cfg, log)
	if err != nil {
		return err
	}
	defer d.Close()
	fmt.Printf("vsdpd: provider soft (no HCA on this host), host fabric address %s\n", hostFabric)
	fmt.Printf("       export %s:%d -> host HTTP %s (a %d MiB file), %s:%d -> host echo, %s:%d -> the same file raw\n",
		hostFabric, exportPort, httpLn.Addr(), size>>20, hostFabric, echoPort, hostFabric, rawPort)
	fmt.Printf("       VM %q: CID %d, fabric address %s, vhost-user sockets %s (vsock), %s (socket filesystem)\n\n",
		"demo", vmCID, vmFabric, sock, fsSock)

	if err := stage1(d, sock, b); err != nil {
		return fmt.Errorf("stage 1: %w", err)
	}
	fmt.Println()
	if !withVM {
		fmt.Println("stage 2 (a real guest under QEMU) skipped: -vm=false")
		return nil
	}
	return stage2(d, sock, fsSock, b)
}

// stage1 plays QEMU and the guest's vsock driver in process.
func stage1(d *daemon.Daemon, sock string, b *blob) error {
	fmt.Println("stage 1: guest simulated by the fake vhost-user front-end (no VM)")
	f, err := vhosttest.Dial(sock)
	if err != nil {
		return err
	}
	defer f.Close()
	dev, err := f.Init(vhosttest.DeviceOptions{MemSize: 64 << 20, EventIdx: true, Indirect: true, ConfigSize: 8})
	if err != nil {
		return err
	}
	defer dev.Close()
	if err := dev.Start(); err != nil {
		return err
	}
	g, err := vsocktest.New(dev, vmCID)
	if err != nil {
		return err
	}
	defer g.Close()
	cc, err := g.Dial(ctl.DefaultPort, 5*time.Second)
	if err != nil {
		return fmt.Errorf("control connection: %w", err)
	}
	defer cc.Close()
	c := &ctlClient{c: cc}
	open := func(port uint16) (*vsocktest.Conn, error) {
		if err := c.send(ctl.Msg{Type: ctl.TypeDial, ID: 1, Remote: netip.AddrPortFrom(netip.MustParseAddr(hostFabric), port)}); err != nil {
			return nil, err
		}
		tk, err := c.recv()
		if err != nil || tk.Type != ctl.TypeTicket {
			return nil, fmt.Errorf("DIAL answered %v (%v)", tk.Type, err)
		}
		s, err := g.Dial(tk.Port, 10*time.Second)
		if err != nil {
			return nil, err
		}
		res, err := c.recv()
		if err != nil || res.Type != ctl.TypeResult || res.Errno != 0 {
			return nil, fmt.Errorf("RESULT %v errno %d (%v)", res.Type, res.Errno, err)
		}
		return s, nil
	}
	// Latency: 64-byte round trips through the echo export.
	e, err := open(echoPort)
	if err != nil {
		return err
	}
	msg := make([]byte, 64)
	const rounds = 200
	t0 := time.Now()
	for i := 0; i < rounds; i++ {
		if _, err := e.Write(msg); err != nil {
			return err
		}
		if _, err := io.ReadFull(e, msg); err != nil {
			return err
		}
	}
	rtt := time.Since(t0) / rounds
	e.Close()
	// Throughput: an HTTP GET of the blob.
	s, err := open(exportPort)
	if err != nil {
		return err
	}
	t0 = time.Now()
	fmt.Fprintf(s, "GET /blob HTTP/1.0\r\nHost: %s\r\n\r\n", hostFabric)
	resp, err := io.ReadAll(s)
	el := time.Since(t0)
	if err != nil {
		return err
	}
	body := resp
	if i := indexHeaderEnd(resp); i >= 0 {
		body = resp[i:]
	}
	ok := sha256.Sum256(body) == b.sum
	report(d, len(body), el, rtt, ok)
	if !ok {
		return fmt.Errorf("fetched %d bytes, content differs", len(body))
	}
	return nil
}

func indexHeaderEnd(b []byte) int {
	for i := 0; i+3 < len(b); i++ {
		if b[i] == '\r' && b[i+1] == '\n' && b[i+2] == '\r' && b[i+3] == '\n' {
			return i + 4
		}
	}
	return -1
}

func report(d *daemon.Daemon, n int, el, rtt time.Duration, ok bool) {
	v := d.VMs()[0]
	st := v.Back.Stats()
	es := v.Back.EngineStats()
	verdict := "sha256 matches"
	if !ok {
		verdict = "CONTENT DIFFERS"
	}
	fmt.Printf("  path                 SDP (vsock stream -> sdpback -> SDP over soft RC QPs -> export -> host TCP)\n")
	fmt.Printf("  fetched              %d bytes, %s\n", n, verdict)
	fmt.Printf("  throughput           %.1f MiB/s (HTTP GET, %v)\n", float64(n)/(1<<20)/el.Seconds(), el.Round(time.Millisecond))
	fmt.Printf("  64-byte round trip   %v (echo export)\n", rtt.Round(time.Microsecond))
	fmt.Printf("  VM counters          %d dials, %d denied; %d bytes from guest, %d to guest\n", st.Dials, st.Denied, st.FromGuest, st.ToGuest)
	if es.BytesRecv > 0 {
		fmt.Printf("  host copies per byte fabric->guest %.2f (receive buffer -> guest rx buffer)\n", float64(es.ReadCopiedBytes)/float64(es.BytesRecv))
	}
	if es.BytesSent > 0 {
		fmt.Printf("                       guest->fabric %.2f (%d of %d bytes gathered straight from guest memory)\n",
			float64(es.CopiedBytes)/float64(es.BytesSent), es.GatherBytes, es.BytesSent)
	}
}

type ctlClient struct {
	c  *vsocktest.Conn
	in []byte
}

func (c *ctlClient) send(m ctl.Msg) error {
	b, err := m.Append(nil)
	if err != nil {
		return err
	}
	_, err = c.c.Write(b)
	return err
}

func (c *ctlClient) recv() (ctl.Msg, error) {
	buf := make([]byte, 512)
	for {
		if m, n, err := ctl.Decode(c.in); err == nil {
			c.in = c.in[n:]
			return m, nil
		} else if err != io.ErrUnexpectedEOF {
			return ctl.Msg{}, err
		}
		k, err := c.c.Read(buf)
		if err != nil {
			return ctl.Msg{}, err
		}
		c.in = append(c.in, buf[:k]...)
	}
}

var _ = syscall.EACCES
