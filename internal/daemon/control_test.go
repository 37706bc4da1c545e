package daemon_test

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vsdp/vsdp/guestdrv/ctl"
	"github.com/vsdp/vsdp/internal/daemon"
	"github.com/vsdp/vsdp/vhost/vsock/vsocktest"
)

// ctlCall sends one request to the control socket and fails the test if
// it cannot get a reply.
func ctlCall(t *testing.T, path string, req daemon.ControlRequest) *daemon.ControlReply {
	t.Helper()
	r, err := daemon.ControlCall(path, req, 20*time.Second)
	if err != nil {
		t.Fatalf("control %s: %v", req.Op, err)
	}
	return r
}

// streamAcross has src (fabric address srcAddr) dial dst's fabric port
// (dst listens on it, its guest on vsock port gport), checks the bound and
// peer addresses dst is told, and sends a blob across; dst checks its hash.
func streamAcross(t *testing.T, src, dst *simGuest, id uint32, srcAddr, dstAddr string, port uint16, gport uint32) {
	t.Helper()
	accepted := dst.g.Listen(gport)
	remote := netip.AddrPortFrom(netip.MustParseAddr(dstAddr), port)
	dst.gc.send(ctl.Msg{Type: ctl.TypeListen, ID: id, Local: netip.AddrPortFrom(netip.IPv4Unspecified(), port), Backlog: 4, Port: gport})
	if m := dst.gc.recv(); m.Type != ctl.TypeListenOK || m.Local != remote {
		t.Fatalf("LISTEN %d: %+v", port, m)
	}
	cs := src.dial(t, id, remote.String())
	if peer := dst.gc.recv(); peer.Type != ctl.TypePeer || peer.Port != gport || peer.Remote.Addr() != netip.MustParseAddr(srcAddr) {
		t.Fatalf("PEER: %+v", peer)
	}
	var cd *vsocktest.Conn
	select {
	case cd = <-accepted:
	case <-time.After(10 * time.Second):
		t.Fatalf("no connection reached %s", remote)
	}
	msg := bytes.Repeat([]byte("from one worker process to another "), 4096)
	go func() { cs.Write(msg); cs.CloseWrite() }()
	h := sha256.New()
	if _, err := io.Copy(h, cd); err != nil {
		t.Fatal(err)
	}
	if [32]byte(h.Sum(nil)) != sha256.Sum256(msg) {
		t.Fatalf("%s received different bytes from %s", remote, srcAddr)
	}
	cs.Close()
	cd.Close()
}

// dialFails asks the host for a stream to dst and expects a refusal (a
// DENY, or a RESULT with an errno).
func (s *simGuest) dialFails(t *testing.T, id uint32, dst string) {
	t.Helper()
	s.gc.send(ctl.Msg{Type: ctl.TypeDial, ID: id, Remote: netip.MustParseAddrPort(dst)})
	m := s.gc.recv()
	switch m.Type {
	case ctl.TypeDeny:
		return
	case ctl.TypeTicket:
		c, err := s.g.Dial(m.Port, 10*time.Second)
		if err == nil {
			defer c.Close()
		}
		if res := s.gc.recv(); res.Type != ctl.TypeResult || res.Errno == 0 {
			t.Fatalf("DIAL %s after remove: %+v, want a refusal", dst, res)
		}
	default:
		t.Fatalf("DIAL %s: %+v", dst, m)
	}
}

// TestControlAddRemove runs the vsdpd command in worker mode with one VM,
// adds a second through the control socket (with the -ctl client), uses
// it (an export, guest to guest both ways: every worker learned the new
// address), lists both, removes it (its worker and files go, the first
// VM stays and forgets its address) and stops.
func TestControlAddRemove(t *testing.T) {
	bin := buildVsdpd(t)
	target, sum := serveBlob(t, 256<<10)
	dir := t.TempDir()
	pol := []string{"sdp 10.70.0.0/16:*"}
	cfg := daemon.Config{
		Fabric:  daemon.Fabric{Addr: "10.70.0.1"},
		Exports: []daemon.ExportConfig{{Port: 8080, Target: target}},
		VMs:     []daemon.VMConfig{{Name: "a", Socket: filepath.Join(dir, "a.sock"), CID: 20, Addr: "10.70.0.20", Policy: pol}},
	}
	ctlPath := filepath.Join(dir, "vsdpd.ctl")
	run := runVsdpd(t, bin, dir, cfg)
	pidA := waitPID(t, filepath.Join(dir, "a.pid"), 0)
	run.pids = append(run.pids, pidA)
	fi, err := os.Stat(ctlPath)
	if err != nil {
		t.Fatalf("control socket: %v", err)
	}
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Fatalf("control socket mode %v, want a 0600 socket", fi.Mode())
	}
	ga := attachGuest(t, cfg.VMs[0].Socket, 20)
	ga.fetch(t, 1, "10.70.0.1:8080", sum)

	// Add b with the command's client.
	vmB := daemon.VMConfig{Name: "b", Socket: filepath.Join(dir, "b.sock"), FSSocket: filepath.Join(dir, "b-fs.sock"), CID: 21, Addr: "10.70.0.21", Policy: pol}
	vb, _ := json.Marshal(vmB)
	vmPath := filepath.Join(dir, "b.json")
	if err := os.WriteFile(vmPath, vb, 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin, "-ctl", ctlPath, "add", vmPath).CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte(`"ok": true`)) {
		t.Fatalf("vsdpd -ctl add: %v\n%s", err, out)
	}
	pidB := waitPID(t, filepath.Join(dir, "b.pid"), 0)
	run.pids = append(run.pids, pidB)
	for _, f := range []string{"b.sock", "b-fs.sock", "b.fabric"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Fatalf("add answered before %s existed: %v", f, err)
		}
	}
	gb := attachGuest(t, vmB.Socket, 21)
	gb.fetch(t, 1, "10.70.0.1:8080", sum)
	streamAcross(t, ga, gb, 2, "10.70.0.20", "10.70.0.21", 9000, 7000) // a learned b's address
	streamAcross(t, gb, ga, 3, "10.70.0.21", "10.70.0.20", 9001, 7001) // b got the whole table

	out, err = exec.Command(bin, "-ctl", ctlPath, "list").Output()
	if err != nil {
		t.Fatalf("vsdpd -ctl list: %v", err)
	}
	var list daemon.ControlReply
	if err := json.Unmarshal(out, &list); err != nil {
		t.Fatalf("list output %q: %v", out, err)
	}
	want := map[string]int{"a": pidA, "b": pidB}
	if len(list.VMs) != 2 {
		t.Fatalf("list: %+v", list.VMs)
	}
	for _, v := range list.VMs {
		if want[v.Name] == 0 || v.PID != want[v.Name] || v.State != daemon.StateRunning || v.Restarts != 0 {
			t.Fatalf("list entry %+v, want PID %d running", v, want[v.Name])
		}
	}
	if list.VMs[1].CID != 21 || list.VMs[1].Addr != "10.70.0.21" || list.VMs[1].FSSocket != vmB.FSSocket {
		t.Fatalf("list entry %+v", list.VMs[1])
	}
	st := ctlCall(t, ctlPath, daemon.ControlRequest{Op: "stats"})
	if !st.OK || len(st.Stats) != 2 {
		t.Fatalf("stats: %+v", st)
	}
	for _, c := range st.Stats {
		if c.Error != "" || c.Counters.Dials < 2 || c.Counters.ToGuest == 0 {
			t.Fatalf("stats of %s: %+v (want two dials and bytes to the guest)", c.Name, c)
		}
	}

	// Remove b: its worker goes by PID, its files go, a forgets it.
	if r := ctlCall(t, ctlPath, daemon.ControlRequest{Op: "remove", Name: "b"}); !r.OK {
		t.Fatalf("remove: %+v", r)
	}
	if !gone(pidB) {
		t.Fatalf("worker %d still running after remove", pidB)
	}
	for _, f := range []string{"b.sock", "b-fs.sock", "b.fabric", "b.pid"} {
		if _, err := os.Stat(filepath.Join(dir, f)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind by remove (%v)", f, err)
		}
	}
	if r := ctlCall(t, ctlPath, daemon.ControlRequest{Op: "list"}); len(r.VMs) != 1 || r.VMs[0].Name != "a" || r.VMs[0].PID != pidA {
		t.Fatalf("list after remove: %+v", r.VMs)
	}
	ga.fetch(t, 4, "10.70.0.1:8080", sum)
	ga.dialFails(t, 5, "10.70.0.21:9000")
	out, err = exec.Command(bin, "-ctl", ctlPath, "remove", "b").Output()
	if code := exitCode(err); code != 1 || !bytes.Contains(out, []byte("no such VM")) {
		t.Fatalf("second remove: exit %d (%v)\n%s", code, err, out)
	}

	if err := run.stop(10 * time.Second); err != nil {
		t.Fatalf("vsdpd on SIGTERM: %v", err)
	}
	if !gone(pidA) {
		t.Errorf("worker %d still running after the supervisor exited", pidA)
	}
	if _, err := os.Stat(ctlPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("control socket left behind (%v)", err)
	}
}

func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}

// TestControlHostile sends the control socket what it must refuse: each
// gets an error reply, and the supervisor goes on serving with nothing of
// a refused VM left behind.
func TestControlHostile(t *testing.T) {
	bin := buildVsdpd(t)
	dir := t.TempDir()
	ctlPath := filepath.Join(dir, "vsdpd.ctl")
	cfg := &daemon.Config{
		Fabric: daemon.Fabric{Addr: "10.71.0.1", Peers: map[string]string{"10.71.9.1": "tcp:127.0.0.1:1"}},
		VMs:    []daemon.VMConfig{{Name: "a", Socket: filepath.Join(dir, "a.sock"), CID: 20, Addr: "10.71.0.20"}},
	}
	noLeaks(t)
	s, err := daemon.Supervise(cfg, daemon.SupervisorOptions{RunDir: dir, Exe: bin, LogLevel: "error"}, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	pidA := s.PIDs()["a"]

	vm := func(f func(*daemon.VMConfig)) string {
		v := daemon.VMConfig{Name: "n", Socket: filepath.Join(dir, "n.sock"), CID: 30, Addr: "10.71.0.30"}
		f(&v)
		b, _ := json.Marshal(daemon.ControlRequest{Op: "add", VM: &v})
		return string(b)
	}
	cases := []struct{ name, line, want string }{
		{"not json", "not json", "bad control request"},
		{"truncated", `{"op":"li`, "bad control request"},
		{"unknown op", `{"op":"reboot"}`, "unknown op"},
		{"no op", `{}`, "unknown op"},
		{"unknown field", `{"op":"list","force":true}`, "unknown field"},
		{"two requests on a line", `{"op":"list"} {"op":"list"}`, "data after"},
		{"list with a vm", `{"op":"list","vm":{}}`, "takes no"},
		{"add without vm", `{"op":"add"}`, "add takes a vm"},
		{"add with null vm", `{"op":"add","vm":null}`, "add takes a vm"},
		{"vm unknown field", `{"op":"add","vm":{"name":"n","sockett":"x"}}`, "unknown field"},
		{"vm wrong type", `{"op":"add","vm":{"name":"n","cid":"thirty"}}`, "bad control request"},
		{"remove bad name", `{"op":"remove","name":"../a"}`, "remove takes"},
		{"remove unknown", `{"op":"remove","name":"ghost"}`, "no such VM"},
		{"duplicate name", vm(func(v *daemon.VMConfig) { v.Name = "a" }), "duplicate name"},
		{"duplicate cid", vm(func(v *daemon.VMConfig) { v.CID = 20 }), "duplicate cid"},
		{"duplicate addr", vm(func(v *daemon.VMConfig) { v.Addr = "10.71.0.20" }), "also vm a"},
		{"host addr", vm(func(v *daemon.VMConfig) { v.Addr = "10.71.0.1" }), "fabric.addr"},
		{"peer addr", vm(func(v *daemon.VMConfig) { v.Addr = "10.71.9.1" }), "fabric.peers"},
		{"duplicate socket", vm(func(v *daemon.VMConfig) { v.Socket = filepath.Join(dir, "a.sock") }), "also vm a"},
		{"fs socket is its socket", vm(func(v *daemon.VMConfig) { v.FSSocket = v.Socket }), "also vm n"},
		{"socket is the control socket", vm(func(v *daemon.VMConfig) { v.Socket = ctlPath }), "in use"},
		{"socket is a worker's endpoint", vm(func(v *daemon.VMConfig) { v.Socket = filepath.Join(dir, "a.fabric") }), "in use"},
		{"reserved cid", vm(func(v *daemon.VMConfig) { v.CID = 2 }), "reserved"},
		{"bad name", vm(func(v *daemon.VMConfig) { v.Name = "x/y" }), "vm name"},
		{"bad addr", vm(func(v *daemon.VMConfig) { v.Addr = "10.71.0" }), "addr"},
		{"ipv6 addr", vm(func(v *daemon.VMConfig) { v.Addr = "fd00::1" }), "IPv4"},
		{"no socket", vm(func(v *daemon.VMConfig) { v.Socket = "" }), "no socket"},
		{"bad policy", vm(func(v *daemon.VMConfig) { v.Policy = []string{"maybe 10.0.0.1:1"} }), "maybe"},
		{"bad listen", vm(func(v *daemon.VMConfig) { v.Listen = "carrier-pigeon" }), "listen"},
		{"worker cannot start", vm(func(v *daemon.VMConfig) { v.Socket = filepath.Join(dir, "missing", "n.sock") }), "worker failed"},
	}
	c, err := net.Dial("unix", ctlPath)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	for i, tc := range cases {
		if i > 0 && i%15 == 0 {
			time.Sleep(time.Second) // stay under the rate limit
		}
		t.Run(tc.name, func(t *testing.T) {
			c.SetDeadline(time.Now().Add(15 * time.Second))
			if _, err := c.Write([]byte(tc.line + "\n")); err != nil {
				t.Fatal(err)
			}
			line, err := br.ReadBytes('\n')
			if err != nil {
				t.Fatalf("no reply: %v", err)
			}
			var r daemon.ControlReply
			if err := json.Unmarshal(line, &r); err != nil {
				t.Fatalf("reply %q: %v", line, err)
			}
			if r.OK || !strings.Contains(r.Error, tc.want) {
				t.Fatalf("reply %+v, want an error with %q", r, tc.want)
			}
		})
	}
	for _, f := range []string{"n.pid", "n.fabric", "n.sock"} {
		if _, err := os.Stat(filepath.Join(dir, f)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("refused VM left %s (%v)", f, err)
		}
	}

	// An oversized line: an error, then the connection closes.
	big, err := net.Dial("unix", ctlPath)
	if err != nil {
		t.Fatal(err)
	}
	defer big.Close()
	big.SetDeadline(time.Now().Add(10 * time.Second))
	go big.Write(append(bytes.Repeat([]byte("x"), 100<<10), '\n'))
	bbr := bufio.NewReader(big)
	if line, err := bbr.ReadBytes('\n'); err != nil || !bytes.Contains(line, []byte("longer than")) {
		t.Fatalf("oversized line: %q, %v", line, err)
	}
	// The unread rest of the line makes the close a reset.
	if _, err := bbr.ReadBytes('\n'); err != io.EOF && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("connection after an oversized line: %v, want it closed", err)
	}

	// A flood: the first requests are served, the rest refused, in order.
	flood, err := net.Dial("unix", ctlPath)
	if err != nil {
		t.Fatal(err)
	}
	defer flood.Close()
	flood.SetDeadline(time.Now().Add(10 * time.Second))
	const n = 60
	go flood.Write(bytes.Repeat([]byte(`{"op":"list"}`+"\n"), n))
	fbr := bufio.NewReader(flood)
	served, limited := 0, 0
	for range n {
		line, err := fbr.ReadBytes('\n')
		if err != nil {
			t.Fatalf("flood reply: %v", err)
		}
		switch {
		case bytes.Contains(line, []byte(`"ok":true`)):
			served++
		case bytes.Contains(line, []byte("rate limit")):
			limited++
		default:
			t.Fatalf("flood reply %q", line)
		}
	}
	if served < 20 || limited == 0 {
		t.Fatalf("flood: %d served, %d rate-limited", served, limited)
	}

	// Too many connections: the one over the limit is told and closed.
	var conns []net.Conn
	for range 16 {
		cc, err := net.Dial("unix", ctlPath)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, cc)
	}
	extra, err := net.Dial("unix", ctlPath)
	if err != nil {
		t.Fatal(err)
	}
	extra.SetDeadline(time.Now().Add(10 * time.Second))
	if line, err := bufio.NewReader(extra).ReadBytes('\n'); err != nil || !bytes.Contains(line, []byte("too many")) {
		t.Fatalf("connection over the limit: %q, %v", line, err)
	}
	extra.Close()
	for _, cc := range conns {
		cc.Close()
	}
	c.Close()
	big.Close()
	flood.Close()

	// Still serving, nothing of the refused VMs, the first VM untouched.
	var r *daemon.ControlReply
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		r, err = daemon.ControlCall(ctlPath, daemon.ControlRequest{Op: "list"}, 5*time.Second)
		if err == nil && r.OK || time.Now().After(deadline) {
			break
		}
	}
	if err != nil || !r.OK || len(r.VMs) != 1 || r.VMs[0].Name != "a" || r.VMs[0].PID != pidA || gone(pidA) {
		t.Fatalf("list after the hostile input: %+v, %v", r, err)
	}
	s.Close()
	if !gone(pidA) {
		t.Errorf("worker %d running after Close", pidA)
	}
	if _, err := os.Stat(ctlPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("control socket left behind (%v)", err)
	}
}
