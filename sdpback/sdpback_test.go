package sdpback_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vsdp/vsdp/guestdrv/ctl"
	"github.com/vsdp/vsdp/sdpback"
	"github.com/vsdp/vsdp/sdpback/internal/fabric"
	"github.com/vsdp/vsdp/sdpback/sdp"
)

var (
	hostAddr = netip.MustParseAddr("10.8.0.1") // exports
	vmAddr   = netip.MustParseAddr("10.8.0.10")
	peerAddr = netip.MustParseAddr("10.8.0.20") // a remote SDP host
)

// world is a soft fabric with three stacks (host exports, the VM, a remote
// peer) and a VM host side driven by a fake guest device.
type world struct {
	t                  *testing.T
	host, vmSt, peerSt *sdp.Stack
	vm                 *sdpback.VM
	dev                *fakeDevice
}

func newWorld(t *testing.T, policy sdpback.Policy) *world {
	t.Helper()
	st := fabric.Stacks(t,
		fabric.Host{Name: "host", Addr: hostAddr}, fabric.Host{Name: "vm", Addr: vmAddr}, fabric.Host{Name: "peer", Addr: peerAddr})
	w := &world{t: t, host: st[0], vmSt: st[1], peerSt: st[2], dev: &fakeDevice{}}
	w.vm = sdpback.NewVM(sdpback.VMConfig{Name: "vm1", Addr: vmAddr, Policy: policy, DialTimeout: 3 * time.Second}, w.vmSt, w.dev)
	t.Cleanup(func() { w.vm.Close() }) // before the stacks close
	return w
}

// fakeStream plays the vsock device's side of one guest stream.
type fakeStream struct {
	h          sdpback.Handler
	gp, hp     uint32
	wake       chan struct{}
	reset      atomic.Bool
	refused    atomic.Bool
	accepted   atomic.Bool
	answerOnce sync.Once
}

func newFakeStream(gp, hp uint32) *fakeStream {
	return &fakeStream{gp: gp, hp: hp, wake: make(chan struct{}, 1)}
}

func (s *fakeStream) Notify() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}
func (s *fakeStream) Reset()            { s.reset.Store(true); s.Notify() }
func (s *fakeStream) GuestPort() uint32 { return s.gp }
func (s *fakeStream) HostPort() uint32  { return s.hp }

// Accept and Refuse make fakeStream an Answer too.
func (s *fakeStream) Accept(h sdpback.Handler) (sdpback.Stream, error) {
	s.h = h
	s.accepted.Store(true)
	s.Notify()
	return s, nil
}
func (s *fakeStream) Refuse() { s.refused.Store(true); s.Notify() }

// send delivers guest bytes.
func (s *fakeStream) send(b []byte) {
	cp := append([]byte(nil), b...)
	s.h.Deliver(&sdpback.Payload{Segs: [][]byte{cp}, Len: len(cp), Release: func() {}})
}

// pull reads whatever is pending, waiting up to d for something.
func (s *fakeStream) pull(d time.Duration) ([]byte, bool) {
	buf := make([]byte, 64<<10)
	deadline := time.After(d)
	for {
		n, eof := s.h.Pull([][]byte{buf})
		if n > 0 || eof {
			return buf[:n], eof
		}
		if s.reset.Load() {
			return nil, false
		}
		select {
		case <-s.wake:
		case <-deadline:
			return nil, false
		case <-time.After(5 * time.Millisecond):
		}
	}
}

type fakeDevice struct {
	mu      sync.Mutex
	streams []*fakeStream
	next    uint32
}

func (d *fakeDevice) Dial(guestPort uint32, h sdpback.Handler, announce func(sdpback.Stream), done func(error)) (sdpback.Stream, error) {
	d.mu.Lock()
	d.next++
	s := newFakeStream(guestPort, 1<<30+d.next)
	s.h = h
	d.streams = append(d.streams, s)
	d.mu.Unlock()
	announce(s)
	go done(nil)
	return s, nil
}

// guestCtl is a guest process's control connection.
type guestCtl struct {
	t  *testing.T
	s  *fakeStream
	in []byte
}

func (w *world) ctl(guestPort uint32) *guestCtl {
	s := newFakeStream(guestPort, ctl.DefaultPort)
	w.vm.GuestConnect(ctl.DefaultPort, guestPort, s)
	if !s.accepted.Load() {
		w.t.Fatal("control connection refused")
	}
	return &guestCtl{t: w.t, s: s}
}

func (g *guestCtl) send(m ctl.Msg) {
	b, err := m.Append(nil)
	if err != nil {
		g.t.Fatal(err)
	}
	g.s.send(b)
}

func (g *guestCtl) recv() ctl.Msg {
	g.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if m, n, err := ctl.Decode(g.in); err == nil {
			g.in = g.in[n:]
			return m
		} else if err != io.ErrUnexpectedEOF {
			g.t.Fatal(err)
		}
		b, _ := g.s.pull(time.Until(deadline))
		g.in = append(g.in, b...)
	}
	g.t.Fatal("no control message")
	return ctl.Msg{}
}

// echoServer accepts on the peer stack and echoes until EOF.
func echoServer(t *testing.T, st *sdp.Stack, port uint16) {
	l, err := st.Listen(port, 8)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.AcceptSDP(context.Background())
			if err != nil {
				return
			}
			go func() {
				io.Copy(c, c)
				c.CloseWrite()
				io.Copy(io.Discard, c)
				c.Close()
			}()
		}
	}()
}

func mustRule(t *testing.T, s string) sdpback.Rule {
	r, err := sdpback.ParseRule(s)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestPolicyDecisions(t *testing.T) {
	w := newWorld(t, sdpback.Policy{
		mustRule(t, "deny 10.8.0.20:22 ENETUNREACH"),
		mustRule(t, "local 192.168.0.0/16"),
		mustRule(t, "sdp 10.8.0.0/24"),
	})
	g := w.ctl(5000)
	g.send(ctl.Msg{Type: ctl.TypeHello, PID: 1, Ver: ctl.Version})
	if m := g.recv(); m.Type != ctl.TypeHelloOK {
		t.Fatalf("got %v", m.Type)
	}
	for _, tc := range []struct {
		dst   string
		typ   ctl.Type
		errno syscall.Errno
	}{
		{"10.8.0.20:22", ctl.TypeDeny, syscall.ENETUNREACH},
		{"192.168.4.4:80", ctl.TypeLocal, 0},
		{"172.16.0.1:80", ctl.TypeDeny, syscall.EACCES},
		{"10.8.0.20:7", ctl.TypeTicket, 0},
	} {
		g.send(ctl.Msg{Type: ctl.TypeDial, ID: 9, Remote: netip.MustParseAddrPort(tc.dst)})
		m := g.recv()
		if m.Type != tc.typ || m.ID != 9 || syscall.Errno(m.Errno) != tc.errno {
			t.Errorf("DIAL %s: got %v errno %d, want %v errno %d", tc.dst, m.Type, m.Errno, tc.typ, tc.errno)
		}
	}
}

// dialThrough runs the whole DIAL → TICKET → vsock connect → RESULT flow
// and returns the guest's stream (nil when refused) and the RESULT.
func (w *world) dialThrough(g *guestCtl, dst string, guestPort uint32) (*fakeStream, ctl.Msg) {
	w.t.Helper()
	g.send(ctl.Msg{Type: ctl.TypeDial, ID: 1, Remote: netip.MustParseAddrPort(dst)})
	tk := g.recv()
	if tk.Type != ctl.TypeTicket {
		w.t.Fatalf("want TICKET, got %v (errno %d)", tk.Type, tk.Errno)
	}
	s := newFakeStream(guestPort, tk.Port)
	w.vm.GuestConnect(tk.Port, guestPort, s) // the guest's vsock connect to the ticket port
	res := g.recv()
	if res.Type != ctl.TypeResult || res.ID != tk.Port {
		w.t.Fatalf("want RESULT for %d, got %+v", tk.Port, res)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !s.accepted.Load() && !s.refused.Load() && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if res.Errno == 0 && !s.accepted.Load() {
		w.t.Fatal("RESULT ok but the vsock connection was not accepted")
	}
	if res.Errno != 0 && !s.refused.Load() {
		w.t.Fatal("RESULT failed but the vsock connection was not refused")
	}
	if res.Errno != 0 {
		return nil, res
	}
	return s, res
}

func TestDialEchoIntegrity(t *testing.T) {
	w := newWorld(t, sdpback.Policy{mustRule(t, "sdp 10.8.0.0/24")})
	echoServer(t, w.peerSt, 7)
	g := w.ctl(5000)
	s, res := w.dialThrough(g, "10.8.0.20:7", 6000)
	if res.Remote != netip.MustParseAddrPort("10.8.0.20:7") || res.Local.Addr() != vmAddr {
		t.Fatalf("RESULT addresses %v -> %v", res.Local, res.Remote)
	}
	rng := rand.New(rand.NewPCG(1, 1))
	want := make([]byte, 1<<20)
	for i := range want {
		want[i] = byte(rng.Uint32())
	}
	go func() {
		for p := want; len(p) > 0; {
			k := min(len(p), 1+rng.IntN(60000))
			s.send(p[:k])
			p = p[k:]
		}
		s.h.Shutdown(false, true, false) // guest half-closes
	}()
	var got []byte
	for {
		b, eof := s.pull(5 * time.Second)
		got = append(got, b...)
		if eof {
			break
		}
		if len(b) == 0 && !eof {
			t.Fatalf("stalled after %d bytes", len(got))
		}
	}
	if sha256.Sum256(got) != sha256.Sum256(want) {
		t.Fatalf("echo of %d bytes differs (got %d)", len(want), len(got))
	}
	st := w.vm.Streams()
	if len(st) != 1 || st[0].Path != sdpback.PathSDP || st[0].FromGuest != uint64(len(want)) || st[0].ToGuest != uint64(len(want)) {
		t.Fatalf("stream stats %+v", st)
	}
}

func TestDialRefused(t *testing.T) {
	w := newWorld(t, sdpback.Policy{mustRule(t, "sdp 10.8.0.0/24")})
	g := w.ctl(5000)
	_, res := w.dialThrough(g, "10.8.0.20:99", 6001)
	if syscall.Errno(res.Errno) != syscall.ECONNREFUSED {
		t.Fatalf("RESULT errno %d, want ECONNREFUSED", res.Errno)
	}
	_, res = w.dialThrough(g, "10.8.0.99:99", 6002)
	if syscall.Errno(res.Errno) != syscall.ENETUNREACH {
		t.Fatalf("RESULT errno %d, want ENETUNREACH", res.Errno)
	}
	if st := w.vm.Stats(); st.DialFailures != 2 || st.Streams != 0 {
		t.Fatalf("stats %+v", st)
	}
}

func TestExportReachesHostTCP(t *testing.T) {
	w := newWorld(t, sdpback.Policy{mustRule(t, "sdp 10.8.0.1:8080")})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		b, _ := io.ReadAll(c)
		c.Write(bytes.ToUpper(b))
		c.Close()
	}()
	ex := sdpback.NewExporter(w.host)
	defer ex.Close()
	if err := ex.Add(sdpback.Export{Port: 8080, Target: ln.Addr().String()}); err != nil {
		t.Fatal(err)
	}
	g := w.ctl(5000)
	s, _ := w.dialThrough(g, "10.8.0.1:8080", 6003)
	s.send([]byte("hello export"))
	s.h.Shutdown(false, true, false)
	var got []byte
	for {
		b, eof := s.pull(5 * time.Second)
		got = append(got, b...)
		if eof || len(b) == 0 {
			break
		}
	}
	if string(got) != "HELLO EXPORT" {
		t.Fatalf("got %q", got)
	}
	if st := ex.Stats(); st.Conns != 1 || st.ToTarget != 12 || st.ToPeer != 12 {
		t.Fatalf("export stats %+v", st)
	}
}

func TestGuestListener(t *testing.T) {
	w := newWorld(t, nil)
	g := w.ctl(5000)
	g.send(ctl.Msg{Type: ctl.TypeListen, ID: 3, Local: netip.AddrPortFrom(netip.IPv4Unspecified(), 9000), Backlog: 4, Port: 7777})
	m := g.recv()
	if m.Type != ctl.TypeListenOK || m.Local != netip.AddrPortFrom(vmAddr, 9000) {
		t.Fatalf("LISTEN: %+v", m)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := w.peerSt.Dial(ctx, netip.AddrPortFrom(vmAddr, 9000))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	peer := g.recv()
	if peer.Type != ctl.TypePeer || peer.Port != 7777 || peer.Remote.Addr() != peerAddr {
		t.Fatalf("PEER: %+v", peer)
	}
	w.dev.mu.Lock()
	if len(w.dev.streams) != 1 || w.dev.streams[0].gp != 7777 || w.dev.streams[0].hp != peer.ID {
		t.Fatalf("device dial %+v", w.dev.streams)
	}
	s := w.dev.streams[0]
	w.dev.mu.Unlock()
	c.Write([]byte("to the guest"))
	b, _ := s.pull(5 * time.Second)
	if string(b) != "to the guest" {
		t.Fatalf("guest got %q", b)
	}
	// WHO names the stream's addresses.
	g.send(ctl.Msg{Type: ctl.TypeWho, ID: 4, GuestPort: 7777, HostPort: peer.ID})
	if who := g.recv(); who.Type != ctl.TypeWhoOK || who.Remote != peer.Remote {
		t.Fatalf("WHO: %+v", who)
	}
	// A second LISTEN on the same port is refused.
	g.send(ctl.Msg{Type: ctl.TypeListen, ID: 5, Local: netip.AddrPortFrom(netip.IPv4Unspecified(), 9000), Port: 7778})
	if m := g.recv(); m.Type != ctl.TypeDeny || syscall.Errno(m.Errno) != syscall.EADDRINUSE {
		t.Fatalf("duplicate LISTEN: %+v", m)
	}
	// Closing the control connection withdraws the export.
	g.s.h.Shutdown(true, true, false)
	if n := w.vm.Stats().Listeners; n != 0 {
		t.Fatalf("%d listeners after the control connection closed", n)
	}
}

func TestResetReachesGuest(t *testing.T) {
	for _, halfClosed := range []bool{false, true} {
		t.Run(fmt.Sprintf("half-closed=%v", halfClosed), func(t *testing.T) { testResetReachesGuest(t, halfClosed) })
	}
}

func testResetReachesGuest(t *testing.T, halfClosed bool) {
	w := newWorld(t, sdpback.Policy{mustRule(t, "sdp 10.8.0.0/24")})
	l, err := w.peerSt.Listen(12, 4)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan *sdp.Conn, 1)
	go func() {
		c, err := l.AcceptSDP(context.Background())
		if err == nil {
			accepted <- c
		}
	}()
	g := w.ctl(5000)
	s, _ := w.dialThrough(g, "10.8.0.20:12", 6010)
	remote := <-accepted
	if halfClosed { // socat -u shuts its write side at once
		s.h.Shutdown(false, true, false)
		time.Sleep(50 * time.Millisecond)
	}
	go func() { // the device pulls whenever it is notified
		for !s.reset.Load() {
			s.pull(10 * time.Millisecond)
		}
	}()
	remote.Abort() // the remote application dies mid-stream
	m := g.recv()
	if m.Type != ctl.TypeReset || syscall.Errno(m.Errno) != syscall.ECONNRESET || m.GuestPort != 6010 || m.HostPort != s.hp {
		t.Fatalf("want RESET ECONNRESET for the stream, got %+v", m)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !s.reset.Load() && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if !s.reset.Load() {
		t.Fatal("the guest stream was not reset")
	}
}

func TestMalformedControlDropsOnlyThatConnection(t *testing.T) {
	w := newWorld(t, nil)
	good, bad := w.ctl(5000), w.ctl(5001)
	bad.s.send([]byte{9, 9, 9, 9, 9, 9, 9, 9, 9})
	if !bad.s.reset.Load() {
		t.Fatal("malformed control connection not reset")
	}
	good.send(ctl.Msg{Type: ctl.TypeHello})
	if m := good.recv(); m.Type != ctl.TypeHelloOK {
		t.Fatalf("the other control connection broke: %v", m.Type)
	}
	// Host-to-guest types from the guest are malformed too.
	good.send(ctl.Msg{Type: ctl.TypeTicket})
	if !good.s.reset.Load() || w.vm.Stats().BadControl != 2 {
		t.Fatalf("stats %+v", w.vm.Stats())
	}
}

func TestParseRule(t *testing.T) {
	for _, tc := range []struct {
		in   string
		dst  string
		want sdpback.Action
		ok   bool
	}{
		{"sdp 10.1.0.0/16:5000-6000", "10.1.2.3:5500", sdpback.SDP, true},
		{"sdp 10.1.0.0/16:5000-6000", "10.1.2.3:6001", sdpback.Deny, true},
		{"tcp 192.0.2.7:80", "192.0.2.7:80", sdpback.HostTCP, true},
		{"local *", "1.2.3.4:1", sdpback.Local, true},
		{"sdp [fd00::/8]:*", "[fd00::1]:9", sdpback.SDP, true},
		{"deny *:* ENETUNREACH", "1.1.1.1:1", sdpback.Deny, true},
		{"sdp 10.0.0.0/33", "", 0, false},
		{"sdp 10.0.0.1:0", "", 0, false},
		{"sdp 10.0.0.1:9-3", "", 0, false},
		{"sdp 10.0.0.1 EACCES", "", 0, false},
		{"fly *", "", 0, false},
		{"deny * EWHATEVER", "", 0, false},
		{"sdp", "", 0, false},
	} {
		r, err := sdpback.ParseRule(tc.in)
		if (err == nil) != tc.ok {
			t.Errorf("%q: err %v", tc.in, err)
			continue
		}
		if !tc.ok {
			continue
		}
		got, _ := sdpback.Policy{r}.Decide(netip.MustParseAddrPort(tc.dst))
		if got != tc.want {
			t.Errorf("%q for %s: %v, want %v", tc.in, tc.dst, got, tc.want)
		}
	}
}

// TestTicketRetry: a guest whose connect was interrupted connects to the
// same ticket again; the newest attempt gets the stream, the older one RST.
func TestTicketRetry(t *testing.T) {
	w := newWorld(t, sdpback.Policy{mustRule(t, "sdp 10.8.0.0/24")})
	echoServer(t, w.peerSt, 7)
	g := w.ctl(5000)
	g.send(ctl.Msg{Type: ctl.TypeDial, ID: 1, Remote: netip.MustParseAddrPort("10.8.0.20:7")})
	tk := g.recv()
	first, second := newFakeStream(6100, tk.Port), newFakeStream(6101, tk.Port)
	w.vm.GuestConnect(tk.Port, 6100, first)
	w.vm.GuestConnect(tk.Port, 6101, second)
	if res := g.recv(); res.Type != ctl.TypeResult || res.Errno != 0 {
		t.Fatalf("RESULT %+v", res)
	}
	// While the dial is in flight the newest attempt wins; if the dial
	// finished before the retry arrived, the first attempt already has the
	// stream and the retry is refused. Exactly one gets it either way.
	deadline := time.Now().Add(5 * time.Second)
	for !(first.accepted.Load() || second.accepted.Load()) || !(first.refused.Load() || second.refused.Load()) {
		if time.Now().After(deadline) {
			t.Fatalf("first refused=%v accepted=%v, second refused=%v accepted=%v", first.refused.Load(), first.accepted.Load(), second.refused.Load(), second.accepted.Load())
		}
		time.Sleep(time.Millisecond)
	}
	if first.accepted.Load() == second.accepted.Load() {
		t.Fatalf("both or neither attempt got the stream")
	}
	if first.accepted.Load() {
		second, first = first, second
	}
	if !first.refused.Load() {
		t.Fatal("the losing attempt was not refused")
	}
	second.send([]byte("ping"))
	if b, _ := second.pull(5 * time.Second); string(b) != "ping" {
		t.Fatalf("echo %q", b)
	}
}
