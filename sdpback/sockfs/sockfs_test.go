package sockfs_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/vsdp/vsdp/sdpback"
	"github.com/vsdp/vsdp/sdpback/sdp"
	"github.com/vsdp/vsdp/sdpback/sockfs"
)

// TestDialExportedService: clone, connect, write a request and read the
// reply from a host TCP service exported over SDP.
func TestDialExportedService(t *testing.T) {
	noLeaks(t)
	w := newWorld(t, sdpback.Policy{rule(t, "sdp 10.9.0.0/24")}, sockfs.Options{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() { // a line-oriented service: one request line, one reply line
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		line, _ := bufio.NewReader(c).ReadString('\n')
		fmt.Fprintf(c, "reply to %s", strings.ToUpper(line))
	}()
	ex := sdpback.NewExporter(w.host)
	defer ex.Close()
	if err := ex.Add(sdpback.Export{Port: 80, Target: ln.Addr().String()}); err != nil {
		t.Fatal(err)
	}

	g := w.as(1000)
	ctl, n := g.clone()
	defer ctl.release()
	if n != "0" {
		t.Fatalf("first clone is %q", n)
	}
	if s := g.cat("tcp/0/status"); s != "Idle\n" {
		t.Fatalf("status %q", s)
	}
	if errno := ctl.write("connect 10.9.0.1!80\n"); errno != 0 {
		t.Fatalf("connect: %v", errno)
	}
	data := g.mustOpen("tcp/0/data", syscall.O_RDWR)
	defer data.release()
	if errno := data.write("hello\n"); errno != 0 {
		t.Fatalf("write: %v", errno)
	}
	reply, errno := data.readAll()
	if errno != 0 || reply != "reply to HELLO\n" {
		t.Fatalf("reply %q %v", reply, errno)
	}
	if s := g.cat("tcp/0/status"); s != "Established(SDP)\n" {
		t.Fatalf("status %q", s)
	}
	if s := g.cat("tcp/0/remote"); s != "10.9.0.1!80\n" {
		t.Fatalf("remote %q", s)
	}
	local := strings.TrimSpace(g.cat("tcp/0/local"))
	if !strings.HasPrefix(local, "10.9.0.10!") || local == "10.9.0.10!0" {
		t.Fatalf("local %q", local)
	}
	st := g.cat("tcp/0/stats")
	if !strings.Contains(st, "path sdp\nout 6\nin 15\n") {
		t.Fatalf("stats %q", st)
	}
	top := g.cat("stats")
	want := fmt.Sprintf("stream sdp %s 10.9.0.1!80 out 6 in 15 file\n", local)
	if !strings.Contains(top, want) || !strings.Contains(top, "streams 1\n") || !strings.Contains(top, "vm vm1\n") {
		t.Fatalf("top-level stats lack %q:\n%s", want, top)
	}
	if pol := g.cat("policy"); pol != "sdp 10.9.0.0/24:*\ndeny *:* EACCES (default)\n" {
		t.Fatalf("policy %q", pol)
	}
	// The ctl file reads its number at any time.
	ctl.off = 0
	if s, _ := ctl.readAll(); s != "0\n" {
		t.Fatalf("ctl reads %q", s)
	}
}

// TestAnnounceListen: announce, then a parked listen open accepts a host
// SDP client and returns the new connection's ctl.
func TestAnnounceListen(t *testing.T) {
	noLeaks(t)
	w := newWorld(t, nil, sockfs.Options{})
	g := w.as(1000)
	ctl, n := g.clone()
	defer ctl.release()
	if errno := ctl.write("announce *!5000"); errno != 0 {
		t.Fatalf("announce: %v", errno)
	}
	if s := g.cat("tcp/" + n + "/status"); s != "Announced 10.9.0.10!5000\n" {
		t.Fatalf("status %q", s)
	}
	// The port is taken in the VM's listener registry.
	other, _ := g.clone()
	if errno := other.write("announce *!5000"); errno != syscall.EADDRINUSE {
		t.Fatalf("second announce: %v, want EADDRINUSE", errno)
	}
	other.release()

	type res struct {
		f     *file
		errno syscall.Errno
	}
	got := make(chan res, 1)
	go func() {
		f, errno := g.open("tcp/"+n+"/listen", syscall.O_RDWR)
		got <- res{f, errno}
	}()
	select {
	case r := <-got:
		t.Fatalf("listen returned before a call: %v", r.errno)
	case <-time.After(50 * time.Millisecond):
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	peer, err := w.peerSt.Dial(ctx, netip.AddrPortFrom(vmAddr, 5000))
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	r := <-got
	if r.errno != 0 {
		t.Fatalf("listen: %v", r.errno)
	}
	defer r.f.release()
	m, _ := r.f.readAll()
	m = strings.TrimSpace(m)
	if m == n || m == "" {
		t.Fatalf("listen gave connection %q (announced on %s)", m, n)
	}
	wantRemote := sockfs.FormatAddr(peer.LocalAddr().(sdp.Addr).AddrPort) + "\n"
	if s := g.cat("tcp/" + m + "/remote"); s != wantRemote {
		t.Fatalf("remote %q, want %q", s, wantRemote)
	}
	if s := g.cat("tcp/" + m + "/local"); s != "10.9.0.10!5000\n" {
		t.Fatalf("local %q", s)
	}
	data := g.mustOpen("tcp/"+m+"/data", syscall.O_RDWR)
	defer data.release()
	peer.Write([]byte("ping"))
	if b, errno := data.read(100); string(b) != "ping" {
		t.Fatalf("guest read %q %v", b, errno)
	}
	data.write("pong")
	buf := make([]byte, 4)
	peer.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(peer, buf); err != nil || string(buf) != "pong" {
		t.Fatalf("peer read %q %v", buf, err)
	}
}

// TestBulk: 16 MiB each way through data (an echo), checked by sha256,
// with the counters in tcp/N/stats and vm.Streams() agreeing.
func TestBulk(t *testing.T) {
	noLeaks(t)
	w := newWorld(t, sdpback.Policy{rule(t, "sdp 10.9.0.20:7")}, sockfs.Options{})
	dialServe(t, w.peerSt, 7, echo)
	g := w.as(1000)
	ctl, n := g.dial("10.9.0.20!7")
	defer ctl.release()
	const size = 16 << 20
	want := make([]byte, size)
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range want {
		want[i] = byte(rng.Uint32())
	}
	wr := g.mustOpen("tcp/"+n+"/data", syscall.O_WRONLY)
	defer wr.release()
	rd := g.mustOpen("tcp/"+n+"/data", syscall.O_RDONLY)
	defer rd.release()
	werr := make(chan error, 1)
	go func() {
		// FUSE writes of up to 128 KiB, some split over several
		// segments as a guest's pages would be.
		for p := want; len(p) > 0; {
			k := min(len(p), 1+rng.IntN(128<<10))
			var segs [][]byte
			for q := p[:k]; len(q) > 0; {
				s := min(len(q), 4096)
				segs = append(segs, q[:s])
				q = q[s:]
			}
			m, errno := wr.writev(segs...)
			if errno != 0 || m != k {
				werr <- fmt.Errorf("write %d: %d %v", k, m, errno)
				return
			}
			p = p[k:]
		}
		if errno := ctl.write("shutdown"); errno != 0 {
			werr <- errno
			return
		}
		werr <- nil
	}()
	h := sha256.New()
	total := 0
	for {
		b, errno := rd.read(128 << 10)
		if errno != 0 {
			t.Fatalf("read after %d bytes: %v", total, errno)
		}
		if len(b) == 0 {
			break
		}
		h.Write(b)
		total += len(b)
	}
	if err := <-werr; err != nil {
		t.Fatal(err)
	}
	if total != size || !bytes.Equal(h.Sum(nil), sha256Of(want)) {
		t.Fatalf("echo of %d bytes: got %d bytes, hash differs=%v", size, total, !bytes.Equal(h.Sum(nil), sha256Of(want)))
	}
	st := g.cat("tcp/" + n + "/stats")
	if !strings.Contains(st, fmt.Sprintf("out %d\nin %d\n", size, size)) {
		t.Fatalf("stats %q", st)
	}
	var found bool
	for _, s := range w.vm.Streams() {
		if s.Remote == netip.MustParseAddrPort("10.9.0.20:7") && s.FromGuest == size && s.ToGuest == size && s.Path == sdpback.PathSDP {
			found = true
		}
	}
	if !found {
		t.Fatalf("vm.Streams() %+v lacks the stream", w.vm.Streams())
	}
	if vs := w.vm.Stats(); vs.FromGuest != size || vs.ToGuest != size {
		t.Fatalf("VM stats %+v", vs)
	}
}

func sha256Of(b []byte) []byte { s := sha256.Sum256(b); return s[:] }

// TestCtlErrors: malformed and out-of-state ctl writes.
func TestCtlErrors(t *testing.T) {
	noLeaks(t)
	w := echoWorld(t, sockfs.Options{})
	g := w.as(1000)
	ctl, n := g.clone()
	defer ctl.release()
	for _, tc := range []struct {
		cmd  string
		want syscall.Errno
	}{
		{"bogus", syscall.EINVAL},
		{"connect 10.9.0.20:7", syscall.EINVAL},
		{"connect 10.9.0.20!99999", syscall.EINVAL},
		{strings.Repeat("x", 300), syscall.EINVAL},
		{"announce 10.9.0.99!5000", syscall.EADDRNOTAVAIL}, // not the VM's address
		{"shutdown", syscall.ENOTCONN},
		{"nodelay on", 0}, // remembered for the connect
		{"keepalive 30", 0},
		{"connect 10.9.0.20!7", 0},
		{"connect 10.9.0.20!7", syscall.EISCONN},
		{"announce *!6000", syscall.EISCONN},
		{"hangup", 0},
		{"hangup", 0},
		{"connect 10.9.0.20!7", syscall.EINVAL}, // a hung-up connection stays so
	} {
		if errno := ctl.write(tc.cmd); errno != tc.want {
			t.Errorf("%q: %v, want %v", tc.cmd, errno, tc.want)
		}
	}
	if s := g.cat("tcp/" + n + "/stats"); !strings.Contains(s, "nodelay on\nkeepalive 30\n") {
		t.Errorf("stats %q", s)
	}
	if s := g.cat("tcp/" + n + "/status"); s != "Closed\n" {
		t.Errorf("status %q", s)
	}
	// Writes to read-only files and reads of write-only handles.
	for _, f := range []string{"tcp/" + n + "/status", "tcp/" + n + "/stats", "stats", "policy"} {
		if _, errno := g.open(f, syscall.O_WRONLY); errno != syscall.EACCES {
			t.Errorf("open %s for writing: %v, want EACCES", f, errno)
		}
	}
	wo := g.mustOpen("tcp/"+n+"/data", syscall.O_WRONLY)
	if _, errno := wo.read(10); errno != syscall.EBADF {
		t.Errorf("read of a write-only handle: %v", errno)
	}
	wo.release()
	ro := g.mustOpen("tcp/"+n+"/status", syscall.O_RDONLY)
	if errno := ro.write("x"); errno != syscall.EBADF {
		t.Errorf("write of a read-only handle: %v", errno)
	}
	ro.release()
}

// TestDialFailures: refused, denied by policy, sent local by policy,
// unreachable — each errno on the ctl write, and status says why.
func TestDialFailures(t *testing.T) {
	noLeaks(t)
	w := newWorld(t, sdpback.Policy{
		rule(t, "deny 10.9.0.20:22 ENETUNREACH"),
		rule(t, "local 192.168.0.0/16"),
		rule(t, "sdp 10.9.0.0/24"),
	}, sockfs.Options{})
	g := w.as(1000)
	for _, tc := range []struct {
		dst    string
		errno  syscall.Errno
		status string
	}{
		{"10.9.0.20!99", syscall.ECONNREFUSED, "Refused: connection refused\n"},
		{"10.9.0.20!22", syscall.ENETUNREACH, `Unreachable: network is unreachable (sdpback: denied by policy (rule "deny 10.9.0.20/32:22 ENETUNREACH"))` + "\n"},
		{"172.16.0.1!80", syscall.EACCES, "Denied: permission denied (sdpback: denied by policy (no rule matches))\n"},
		{"192.168.1.1!80", syscall.ENETUNREACH, "Unreachable: network is unreachable (" + sdpback.ErrLocal.Error() + ")\n"},
		{"10.9.0.99!80", syscall.ENETUNREACH, "Unreachable: network is unreachable\n"},
	} {
		ctl, n := g.clone()
		if errno := ctl.write("connect " + tc.dst); errno != tc.errno {
			t.Errorf("connect %s: %v, want %v", tc.dst, errno, tc.errno)
		}
		if s := g.cat("tcp/" + n + "/status"); s != tc.status {
			t.Errorf("connect %s: status %q, want %q", tc.dst, s, tc.status)
		}
		data := g.mustOpen("tcp/"+n+"/data", syscall.O_RDWR)
		if _, errno := data.read(10); errno != syscall.ENOTCONN {
			t.Errorf("read after a failed connect: %v", errno)
		}
		data.release()
		ctl.release()
	}
	if st := w.vm.Stats(); st.Denied != 2 || st.Locals != 1 || st.DialFailures != 2 || st.Streams != 0 {
		t.Errorf("VM stats %+v", st)
	}
}

// TestReset: a stream the peer aborts reads ECONNRESET; status says so.
func TestReset(t *testing.T) {
	noLeaks(t)
	w := newWorld(t, sdpback.Policy{rule(t, "sdp 10.9.0.0/24")}, sockfs.Options{})
	accepted := make(chan *sdp.Conn, 1)
	dialServe(t, w.peerSt, 12, func(c *sdp.Conn) { accepted <- c })
	g := w.as(1000)
	ctl, n := g.dial("10.9.0.20!12")
	defer ctl.release()
	data := g.mustOpen("tcp/"+n+"/data", syscall.O_RDWR)
	defer data.release()
	peer := <-accepted
	go func() {
		time.Sleep(20 * time.Millisecond) // let the read park first
		peer.Abort()
	}()
	if _, errno := data.read(100); errno != syscall.ECONNRESET {
		t.Fatalf("read: %v, want ECONNRESET", errno)
	}
	if errno := data.write("x"); errno != syscall.ECONNRESET {
		t.Fatalf("write after reset: %v, want ECONNRESET", errno)
	}
	if s := g.cat("tcp/" + n + "/status"); !strings.HasPrefix(s, "Reset: connection reset by peer") {
		t.Fatalf("status %q", s)
	}
}

// TestHangupUnparks: hangup completes a parked read (EOF) and a parked
// listen open (an error); later writes get EPIPE.
func TestHangupUnparks(t *testing.T) {
	noLeaks(t)
	w := echoWorld(t, sockfs.Options{})
	g := w.as(1000)
	ctl, n := g.dial("10.9.0.20!7")
	defer ctl.release()
	data := g.mustOpen("tcp/"+n+"/data", syscall.O_RDWR)
	defer data.release()
	type res struct {
		b     []byte
		errno syscall.Errno
	}
	got := make(chan res, 1)
	go func() { b, errno := data.read(100); got <- res{b, errno} }()
	time.Sleep(20 * time.Millisecond)
	select {
	case r := <-got:
		t.Fatalf("read returned with nothing sent: %q %v", r.b, r.errno)
	default:
	}
	// Another file of the same connection hangs up.
	other := g.mustOpen("tcp/"+n+"/ctl", syscall.O_WRONLY)
	if errno := other.write("hangup"); errno != 0 {
		t.Fatal(errno)
	}
	other.release()
	select {
	case r := <-got:
		if r.errno != 0 || len(r.b) != 0 {
			t.Fatalf("parked read after hangup: %q %v, want EOF", r.b, r.errno)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("hangup left the read parked")
	}
	if errno := data.write("x"); errno != syscall.EPIPE {
		t.Fatalf("write after hangup: %v, want EPIPE", errno)
	}

	// A parked listen.
	actl, an := g.clone()
	defer actl.release()
	if errno := actl.write("announce *!0"); errno != 0 {
		t.Fatal(errno)
	}
	lerr := make(chan syscall.Errno, 1)
	go func() { _, errno := g.open("tcp/"+an+"/listen", syscall.O_RDWR); lerr <- errno }()
	time.Sleep(20 * time.Millisecond)
	actl.write("hangup")
	select {
	case errno := <-lerr:
		if errno != syscall.ECONNABORTED {
			t.Fatalf("parked listen after hangup: %v, want ECONNABORTED", errno)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("hangup left the listen parked")
	}
	if st := w.vm.Stats(); st.Listeners != 0 {
		t.Fatalf("listener survived hangup: %+v", st)
	}
}

// TestCloseUnparks: Close completes every parked request at once.
func TestCloseUnparks(t *testing.T) {
	noLeaks(t)
	w := echoWorld(t, sockfs.Options{})
	g := w.as(1000)
	var files []*file
	defer func() {
		for _, f := range files {
			f.release()
		}
	}()
	done := make(chan string, 8)
	for i := 0; i < 3; i++ {
		ctl, n := g.dial("10.9.0.20!7")
		files = append(files, ctl)
		data := g.mustOpen("tcp/"+n+"/data", syscall.O_RDWR)
		files = append(files, data)
		go func() {
			b, errno := data.read(100)
			done <- fmt.Sprintf("read %q %v", b, errno)
		}()
	}
	actl, an := g.clone()
	files = append(files, actl)
	actl.write("announce *!0")
	go func() {
		_, errno := g.open("tcp/"+an+"/listen", syscall.O_RDWR)
		done <- fmt.Sprintf("listen %v", errno)
	}()
	time.Sleep(30 * time.Millisecond)
	w.fs.Close()
	var got []string
	for range 4 {
		select {
		case s := <-done:
			got = append(got, s)
		case <-time.After(5 * time.Second):
			t.Fatalf("Close left requests parked; completed: %q", got)
		}
	}
	slices.Sort(got)
	want := []string{"listen " + syscall.ECONNABORTED.Error(), `read "" errno 0`, `read "" errno 0`, `read "" errno 0`}
	if !slices.Equal(got, want) {
		t.Fatalf("after Close: %q, want %q", got, want)
	}
	if _, errno := g.open("tcp/clone", syscall.O_RDWR); errno != syscall.ENXIO {
		t.Fatalf("clone after Close: %v, want ENXIO", errno)
	}
	w.fs.Close() // idempotent
}

// TestOwnership: a connection directory is its creator's; another uid
// gets EACCES for every file even holding the node IDs; root may enter.
func TestOwnership(t *testing.T) {
	noLeaks(t)
	w := newWorld(t, nil, sockfs.Options{})
	alice, bob, root := w.as(1000), w.as(1001), w.as(0)
	ctl, n := alice.clone()
	defer ctl.release()
	_, attr, errno := bob.lookup("tcp/" + n)
	if errno != 0 || attr.Uid != 1000 || attr.Gid != 1000 || attr.Mode != syscall.S_IFDIR|0700 {
		t.Fatalf("bob stats tcp/%s: %+v %v", n, attr, errno)
	}
	for _, f := range []string{"ctl", "data", "listen", "local", "remote", "status", "stats"} {
		if _, _, errno := bob.lookup("tcp/" + n + "/" + f); errno != syscall.EACCES {
			t.Errorf("bob looks up %s: %v, want EACCES", f, errno)
		}
		node, attr, errno := alice.lookup("tcp/" + n + "/" + f)
		if errno != 0 || attr.Uid != 1000 || attr.Mode&0077 != 0 {
			t.Fatalf("alice looks up %s: %+v %v", f, attr, errno)
		}
		// Holding the node ID is not enough.
		if _, errno := bob.openNode(node, syscall.O_RDONLY); errno != syscall.EACCES {
			t.Errorf("bob opens %s by node: %v, want EACCES", f, errno)
		}
		// Root may (listen is not announced: EINVAL, past the check).
		rf, errno := root.openNode(node, syscall.O_RDONLY)
		switch {
		case f == "listen" && errno != syscall.EINVAL, f != "listen" && errno != 0:
			t.Errorf("root opens %s: %v", f, errno)
		case rf != nil:
			rf.release()
		}
	}
	if _, errno := bob.readDir("tcp/"+n, false); errno != syscall.EACCES {
		t.Errorf("bob lists tcp/%s: %v", n, errno)
	}
	names, errno := alice.readDir("tcp/"+n, false)
	if errno != 0 || !slices.Equal(names, []string{".", "..", "ctl", "data", "listen", "local", "remote", "status", "stats"}) {
		t.Errorf("alice lists tcp/%s: %q %v", n, names, errno)
	}
}

// TestLifetime: the last close hangs up and releases the directory; a
// number is reused only after release, with new node IDs; idle
// directories are bounded.
func TestLifetime(t *testing.T) {
	noLeaks(t)
	w := echoWorld(t, sockfs.Options{MaxIdle: 2})
	g := w.as(1000)
	ctl0, n0 := g.clone()
	ctl1, n1 := g.clone()
	if n0 != "0" || n1 != "1" {
		t.Fatalf("numbers %s %s", n0, n1)
	}
	if _, errno := g.open("tcp/clone", syscall.O_RDWR); errno != syscall.ENFILE {
		t.Fatalf("third idle clone: %v, want ENFILE", errno)
	}
	for _, plus := range []bool{false, true} {
		names, errno := g.readDir("tcp", plus)
		if errno != 0 || !slices.Equal(names, []string{".", "..", "clone", "0", "1"}) {
			t.Fatalf("tcp lists %q %v (plus=%v)", names, errno, plus)
		}
	}
	// A live stream is not idle.
	if errno := ctl1.write("connect 10.9.0.20!7"); errno != 0 {
		t.Fatal(errno)
	}
	ctl2, n2 := g.clone()
	if n2 != "2" {
		t.Fatalf("number %s", n2)
	}
	ctl2.release()
	// The directory lives while any file is open.
	data := g.mustOpen("tcp/1/data", syscall.O_RDWR)
	oldNode, _, _ := g.lookup("tcp/1/data")
	ctl1.release()
	if errno := data.write("still here"); errno != 0 {
		t.Fatalf("write with the ctl closed: %v", errno)
	}
	if b, _ := data.read(100); string(b) != "still here" {
		t.Fatalf("echo %q", b)
	}
	data.release() // the last file: hang up, release
	if _, _, errno := g.lookup("tcp/1"); errno != syscall.ENOENT {
		t.Fatalf("released directory: %v, want ENOENT", errno)
	}
	deadline := time.Now().Add(5 * time.Second)
	for w.vm.Stats().Streams != 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if st := w.vm.Stats(); st.Streams != 0 {
		t.Fatalf("stream survived the last close: %+v", st)
	}
	ctl1, n1 = g.clone()
	if n1 != "1" {
		t.Fatalf("number 1 not reused: %s", n1)
	}
	defer ctl1.release()
	node, _, _ := g.lookup("tcp/1/data")
	if node == oldNode {
		t.Fatal("a reused number kept its node IDs")
	}
	in := fuse.GetAttrIn{InHeader: g.hdr(oldNode)}
	var out fuse.AttrOut
	if st := syscall.Errno(g.fs.GetAttr(nil, &in, &out)); st != syscall.ESTALE {
		t.Fatalf("getattr of a released node: %v, want ESTALE", st)
	}
	ctl0.release()
}

// TestInterruptListen: an interrupt (a /dev/fuse transport's
// FUSE_INTERRUPT closes the request's cancel channel) aborts a parked
// listen open with EINTR and leaves the announcement in place.
func TestInterruptListen(t *testing.T) {
	noLeaks(t)
	w := newWorld(t, nil, sockfs.Options{})
	g := w.as(1000)
	ctl, n := g.clone()
	defer ctl.release()
	if errno := ctl.write("announce *!0"); errno != 0 {
		t.Fatal(errno)
	}
	node, _, _ := g.lookup("tcp/" + n + "/listen")
	cancel := make(chan struct{})
	got := make(chan fuse.Status, 1)
	go func() {
		in := fuse.OpenIn{InHeader: g.hdr(node), Flags: syscall.O_RDWR}
		var out fuse.OpenOut
		got <- g.fs.Open(cancel, &in, &out)
	}()
	time.Sleep(20 * time.Millisecond)
	close(cancel)
	select {
	case st := <-got:
		if syscall.Errno(st) != syscall.EINTR {
			t.Fatalf("interrupted listen: %v, want EINTR", st)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the interrupt left the listen parked")
	}
	if s := g.cat("tcp/" + n + "/status"); !strings.HasPrefix(s, "Announced ") {
		t.Fatalf("status after the interrupt %q", s)
	}
}

// TestResetSession: Reset (a new FUSE session) completes parked requests
// like Close, makes the old session's nodes and handles stale, and leaves
// the filesystem serving: a new clone works and gets number 0 again.
func TestResetSession(t *testing.T) {
	noLeaks(t)
	w := echoWorld(t, sockfs.Options{})
	g := w.as(1000)
	ctl, n := g.dial("10.9.0.20!7")
	data := g.mustOpen("tcp/"+n+"/data", syscall.O_RDWR)
	old, _, errno := g.lookup("tcp/" + n + "/status")
	if errno != 0 {
		t.Fatal(errno)
	}
	done := make(chan syscall.Errno, 1)
	go func() {
		_, errno := data.read(100)
		done <- errno
	}()
	time.Sleep(30 * time.Millisecond)
	w.fs.Reset()
	select {
	case errno := <-done:
		if errno != 0 {
			t.Fatalf("parked read after Reset: %v, want EOF", errno)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Reset left a read parked")
	}
	if _, errno := g.openNode(old, syscall.O_RDONLY); errno != syscall.ESTALE {
		t.Fatalf("old session's node after Reset: %v, want ESTALE", errno)
	}
	if _, errno := data.read(1); errno != syscall.EBADF {
		t.Fatalf("old session's handle after Reset: %v, want EBADF", errno)
	}
	ctl2, n2 := g.clone()
	defer ctl2.release()
	if n2 != "0" {
		t.Fatalf("first clone after Reset is %q, want 0", n2)
	}
	if errno := ctl2.write("connect 10.9.0.20!7"); errno != 0 {
		t.Fatalf("connect after Reset: %v", errno)
	}
	data2 := g.mustOpen("tcp/"+n2+"/data", syscall.O_RDWR)
	defer data2.release()
	if _, errno := data2.writev([]byte("again")); errno != 0 {
		t.Fatal(errno)
	}
	if b, errno := data2.read(5); errno != 0 || string(b) != "again" {
		t.Fatalf("echo after Reset: %q %v", b, errno)
	}
	ctl.release() // stale handles: released without effect
	data.release()
}
