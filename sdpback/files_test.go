package sdpback_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/vsdp/vsdp/guestdrv/ctl"
	"github.com/vsdp/vsdp/sdpback"
	"github.com/vsdp/vsdp/sdpback/sdp"
)

// TestFileStreams: a file dial and a file listener share the VM's stream
// table, limits and listener registry with the vsock path.
func TestFileStreams(t *testing.T) {
	w := newWorld(t, sdpback.Policy{mustRule(t, "sdp 10.8.0.0/24"), mustRule(t, "local 192.168.0.0/16")})
	echoServer(t, w.peerSt, 7)
	ctx := context.Background()

	c, err := w.vm.DialFile(ctx, netip.MustParseAddrPort("10.8.0.20:7"))
	if err != nil {
		t.Fatal(err)
	}
	if c.Path() != sdpback.PathSDP || c.LocalAddr().Addr() != vmAddr {
		t.Fatalf("path %v local %v", c.Path(), c.LocalAddr())
	}
	c.Write([]byte("ping"))
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo %q %v", buf, err)
	}
	if st := w.vm.Streams(); len(st) != 1 || st[0].FromGuest != 4 || st[0].ToGuest != 4 || st[0].Remote != c.RemoteAddr() {
		t.Fatalf("streams %+v", st)
	}

	// Errors a TCP user expects.
	for _, tc := range []struct {
		dst   string
		errno syscall.Errno
		cause error
	}{
		{"10.8.0.20:99", syscall.ECONNREFUSED, nil},
		{"10.8.0.99:99", syscall.ENETUNREACH, nil},
		{"172.16.0.1:80", syscall.EACCES, sdpback.ErrDenied},
		{"192.168.0.1:80", syscall.ENETUNREACH, sdpback.ErrLocal},
	} {
		_, err := w.vm.DialFile(ctx, netip.MustParseAddrPort(tc.dst))
		var fe *sdpback.FileError
		if !errors.As(err, &fe) || fe.Errno != tc.errno || !errors.Is(err, tc.errno) || (tc.cause != nil && !errors.Is(err, tc.cause)) {
			t.Errorf("dial %s: %v, want %v", tc.dst, err, tc.errno)
		}
	}

	// A port taken by a file listener is taken for the control protocol's
	// LISTEN, and the other way round.
	l, err := w.vm.ListenFile(9000, 4)
	if err != nil {
		t.Fatal(err)
	}
	g := w.ctl(5000)
	g.send(ctl.Msg{Type: ctl.TypeListen, ID: 1, Local: netip.AddrPortFrom(netip.IPv4Unspecified(), 9000), Port: 7777})
	if m := g.recv(); m.Type != ctl.TypeDeny || syscall.Errno(m.Errno) != syscall.EADDRINUSE {
		t.Fatalf("LISTEN on a file listener's port: %+v", m)
	}
	g.send(ctl.Msg{Type: ctl.TypeListen, ID: 2, Local: netip.AddrPortFrom(netip.IPv4Unspecified(), 9001), Port: 7778})
	if m := g.recv(); m.Type != ctl.TypeListenOK {
		t.Fatalf("LISTEN: %+v", m)
	}
	if _, err := w.vm.ListenFile(9001, 4); !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("file listen on a LISTEN port: %v", err)
	}
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	peer, err := w.peerSt.Dial(dctx, netip.AddrPortFrom(vmAddr, 9000))
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	a, err := l.Accept(dctx)
	if err != nil {
		t.Fatal(err)
	}
	if a.RemoteAddr() != peer.LocalAddr().(sdp.Addr).AddrPort || a.LocalAddr() != netip.AddrPortFrom(vmAddr, 9000) {
		t.Fatalf("accepted %v -> %v", a.RemoteAddr(), a.LocalAddr())
	}
	if st := w.vm.Stats(); st.Streams != 2 || st.Listeners != 2 {
		t.Fatalf("stats %+v", st)
	}
	// Close withdraws the port and unparks Accept.
	acc := make(chan error, 1)
	go func() { _, err := l.Accept(ctx); acc <- err }()
	time.Sleep(10 * time.Millisecond)
	l.Close()
	if err := <-acc; err == nil {
		t.Fatal("Accept after Close succeeded")
	}
	l2, err := w.vm.ListenFile(9000, 4)
	if err != nil {
		t.Fatalf("port not withdrawn: %v", err)
	}
	l2.Close()

	// VM close ends file streams: a parked read returns.
	rd := make(chan error, 1)
	go func() { _, err := a.Read(buf); rd <- err }()
	time.Sleep(10 * time.Millisecond)
	w.vm.Close()
	if err := <-rd; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("read after VM close: %v", err)
	}
	if _, err := w.vm.DialFile(ctx, netip.MustParseAddrPort("10.8.0.20:7")); !errors.Is(err, syscall.ENETDOWN) {
		t.Fatalf("dial after VM close: %v", err)
	}
	c.Close()
	a.Close()
}

// TestFileStreamLimit: file streams and dials count against MaxStreams.
func TestFileStreamLimit(t *testing.T) {
	w := newWorld(t, sdpback.Policy{mustRule(t, "sdp 10.8.0.0/24")})
	vm := sdpback.NewVM(sdpback.VMConfig{Name: "small", Addr: vmAddr, Policy: w.vm.Config().Policy, MaxStreams: 1}, w.vmSt, w.dev)
	defer vm.Close()
	echoServer(t, w.peerSt, 7)
	c, err := vm.DialFile(context.Background(), netip.MustParseAddrPort("10.8.0.20:7"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := vm.DialFile(context.Background(), netip.MustParseAddrPort("10.8.0.20:7")); !errors.Is(err, syscall.EAGAIN) || !errors.Is(err, sdpback.ErrLimit) {
		t.Fatalf("second stream: %v, want EAGAIN", err)
	}
	c.Close()
	c.Close() // idempotent
	c, err = vm.DialFile(context.Background(), netip.MustParseAddrPort("10.8.0.20:7"))
	if err != nil {
		t.Fatalf("slot not freed by Close: %v", err)
	}
	c.Close()
}
