package daemon_test

import (
	"crypto/sha256"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/vsdp/vsdp/guestdrv/ctl"
	"github.com/vsdp/vsdp/internal/daemon"
	"github.com/vsdp/vsdp/vhost/vhosttest"
	"github.com/vsdp/vsdp/vhost/vsock/vsocktest"
)

// serveBlob serves n pseudo-random bytes to every TCP client and returns
// its address and the bytes' hash.
func serveBlob(t *testing.T, n int) (string, [32]byte) {
	blob := make([]byte, n)
	rng := rand.New(rand.NewPCG(9, 9))
	for i := range blob {
		blob[i] = byte(rng.Uint32())
	}
	return serveTCP(t, func(c net.Conn) { c.Write(blob) }), sha256.Sum256(blob)
}

// startWithGuest starts vsdpd with cfg (its first VM is the guest's) and a
// simulated guest on that VM's socket: the fake front-end plays QEMU and
// vsocktest the guest's vsock driver.
func startWithGuest(t *testing.T, cfg *daemon.Config) (*daemon.Daemon, *vhosttest.Device, *vsocktest.Guest) {
	t.Helper()
	d := startDaemon(t, cfg)
	dev := frontEnd(t, cfg.VMs[0].Socket, vhosttest.DeviceOptions{MemSize: 64 << 20, EventIdx: true, Indirect: true, ConfigSize: 8})
	g, err := vsocktest.New(dev, cfg.VMs[0].CID)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	return d, dev, g
}

type guestCtl struct {
	t  *testing.T
	c  *vsocktest.Conn
	in []byte
}

func (g *guestCtl) send(m ctl.Msg) {
	b, _ := m.Append(nil)
	if _, err := g.c.Write(b); err != nil {
		g.t.Fatal(err)
	}
}

func (g *guestCtl) recv() ctl.Msg {
	g.t.Helper()
	buf := make([]byte, 512)
	for {
		if m, n, err := ctl.Decode(g.in); err == nil {
			g.in = g.in[n:]
			return m
		} else if err != io.ErrUnexpectedEOF {
			g.t.Fatal(err)
		}
		k, err := g.c.Read(buf)
		if err != nil {
			g.t.Fatalf("control read: %v", err)
		}
		g.in = append(g.in, buf[:k]...)
	}
}

// TestGuestFetchesExportedServiceOverSDP runs the whole host path without
// QEMU: a fake front-end plays QEMU and the guest's vsock driver, the
// guest's control connection dials a host TCP service exported on the
// fabric, and the bytes arrive intact through vhost-user, vsock, sdpback
// and the SDP engine on the soft provider.
func TestGuestFetchesExportedServiceOverSDP(t *testing.T) {
	copies := newCopyLog()
	const size = 8 << 20
	target, sum := serveBlob(t, size)
	dir := t.TempDir()
	sock := filepath.Join(dir, "vm1.sock")
	cfg := &daemon.Config{
		Fabric:  daemon.Fabric{Addr: "10.50.0.1"},
		Exports: []daemon.ExportConfig{{Port: 8080, Target: target}},
		VMs: []daemon.VMConfig{{Name: "vm1", Socket: sock, CID: 7, Addr: "10.50.0.7",
			Policy: []string{"sdp 10.50.0.1:8080", "deny 10.50.0.1:9 ENETUNREACH"}}},
		Touch: copies.touch,
	}
	d, dev, g := startWithGuest(t, cfg)
	if cid := uint64(dev.Config[0]) | uint64(dev.Config[1])<<8; cid != 7 {
		t.Fatalf("guest_cid %d, want 7", cid)
	}

	cc, err := g.Dial(ctl.DefaultPort, 5*time.Second)
	if err != nil {
		t.Fatalf("control connection: %v", err)
	}
	gc := &guestCtl{t: t, c: cc}
	gc.send(ctl.Msg{Type: ctl.TypeDial, ID: 1, Remote: netip.MustParseAddrPort("10.50.0.1:9")})
	if m := gc.recv(); m.Type != ctl.TypeDeny || syscall.Errno(m.Errno) != syscall.ENETUNREACH {
		t.Fatalf("denied dial: %+v", m)
	}
	gc.send(ctl.Msg{Type: ctl.TypeDial, ID: 2, Remote: netip.MustParseAddrPort("10.50.0.1:8080")})
	tk := gc.recv()
	if tk.Type != ctl.TypeTicket {
		t.Fatalf("want TICKET, got %+v", tk)
	}
	start := time.Now()
	s, err := g.Dial(tk.Port, 10*time.Second)
	if err != nil {
		t.Fatalf("vsock connect to ticket: %v", err)
	}
	if res := gc.recv(); res.Type != ctl.TypeResult || res.Errno != 0 || res.ID != tk.Port {
		t.Fatalf("RESULT %+v", res)
	}
	h := sha256.New()
	n, err := io.Copy(h, s)
	if err != nil {
		t.Fatal(err)
	}
	el := time.Since(start)
	if n != size || [32]byte(h.Sum(nil)) != sum {
		t.Fatalf("fetched %d bytes; content differs", n)
	}
	t.Logf("%d MiB through vhost-user/vsock/SDP in %v (%.0f MiB/s)", size>>20, el, float64(size)/(1<<20)/el.Seconds())
	st := d.VMs()[0].Back.Stats()
	if st.ToGuest != size || st.Dials != 2 || st.Denied != 1 {
		t.Fatalf("vm stats %+v", st)
	}
	if vs := d.VMs()[0].Device().Stats(); vs.RxBytes < size || vs.RxBytes > size+1024 { // plus the control replies
		t.Fatalf("vsock device rx bytes %d", vs.RxBytes)
	}
	// Exactly one host copy fabric-to-guest: the provider never wrote into
	// guest memory (no rkey over it), and the engine copied every byte
	// once, from its receive buffers into the guest's.
	if _, written := copies.guest(d.VMs()[0].GuestKeys()); written != 0 {
		t.Fatalf("provider wrote %d bytes into guest memory, want 0", written)
	}
	if es := d.VMs()[0].Back.EngineStats(); es.ReadCopiedBytes != size || es.BytesRecv < size {
		t.Fatalf("engine copied %d bytes to the guest of %d received, want %d", es.ReadCopiedBytes, es.BytesRecv, size)
	}
	s.Close()
	cc.Close()
}

// TestGuestUploadIsZeroCopy sends guest data to an exported host service
// and checks, from the SDP engine's counters and the soft provider's
// records, that guest-to-fabric payload was gathered straight from guest
// memory: no host copy.
func TestGuestUploadIsZeroCopy(t *testing.T) {
	const size = 4 << 20
	sums := make(chan [32]byte, 1)
	sink := serveTCP(t, func(c net.Conn) {
		h := sha256.New()
		io.Copy(h, c)
		sums <- [32]byte(h.Sum(nil))
	})
	sock := filepath.Join(t.TempDir(), "vm.sock")
	copies := newCopyLog()
	cfg := &daemon.Config{
		Fabric:  daemon.Fabric{Addr: "10.51.0.1"},
		Exports: []daemon.ExportConfig{{Port: 9, Target: sink}},
		VMs:     []daemon.VMConfig{{Name: "vm", Socket: sock, CID: 8, Addr: "10.51.0.8", Policy: []string{"sdp 10.51.0.1:9"}}},
		Touch:   copies.touch,
	}
	d, _, g := startWithGuest(t, cfg)
	cc, err := g.Dial(ctl.DefaultPort, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	gc := &guestCtl{t: t, c: cc}
	gc.send(ctl.Msg{Type: ctl.TypeDial, ID: 1, Remote: netip.MustParseAddrPort("10.51.0.1:9")})
	tk := gc.recv()
	s, err := g.Dial(tk.Port, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if res := gc.recv(); res.Errno != 0 {
		t.Fatalf("RESULT %+v", res)
	}
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(i * 131)
	}
	for p := data; len(p) > 0; {
		k := min(len(p), 16<<10)
		if _, err := s.Write(p[:k]); err != nil {
			t.Fatal(err)
		}
		p = p[k:]
	}
	s.CloseWrite()
	select {
	case got := <-sums:
		if got != sha256.Sum256(data) {
			t.Fatal("the host service received different bytes")
		}
	case <-time.After(20 * time.Second):
		t.Fatal("upload did not finish")
	}
	es := d.VMs()[0].Back.EngineStats()
	vs := d.VMs()[0].Device().Stats()
	t.Logf("engine: %d bytes sent, %d gathered from guest memory, %d copied; vsock: %d held chains, %d bytes copied",
		es.BytesSent, es.GatherBytes, es.CopiedBytes, vs.HeldChains, vs.CopiedBytes)
	if es.BytesSent < size || es.GatherBytes+es.CopiedBytes != es.BytesSent {
		t.Fatalf("engine stats %+v", es)
	}
	// The guest's vsock credit (256 KiB) bounds its chains in flight below
	// the per-stream hold limit, so nothing is ever copied.
	if n := es.CopiedBytes + vs.CopiedBytes; n != 0 {
		t.Fatalf("%d bytes copied on the host guest-to-fabric, want zero", n)
	}
	// The provider's own records agree: it read every payload byte
	// straight from guest memory, and never wrote into it.
	if read, written := copies.guest(d.VMs()[0].GuestKeys()); read != size || written != 0 {
		t.Fatalf("provider read %d bytes from guest memory (want %d) and wrote %d into it (want 0)", read, size, written)
	}
}
