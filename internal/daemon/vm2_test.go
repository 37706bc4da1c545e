package daemon_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vsdp/vsdp/guestdrv/vsdpnet/cmd/vsdpstreams/streamcheck"
	"github.com/vsdp/vsdp/images"
	"github.com/vsdp/vsdp/internal/daemon"
	"github.com/vsdp/vsdp/sdpback"
	"github.com/vsdp/vsdp/sdpback/sdp"
	"github.com/vsdp/vsdp/vmtest"
)

// The stream-check programs in a guest image: the C epoll program (under
// libvsdp.so) and the Go one (through vsdpnet).
const (
	guestStreamsC  = "/bin/vsdpstreams"
	guestStreamsGo = "/bin/vsdpstreams-go"
)

// guestBuild returns the module root and checks that `make build` put the
// guest C programs in build/guest.
func guestBuild(t *testing.T) string {
	t.Helper()
	root, err := images.FindModuleRoot(".")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"libvsdp.so", "vsdptest", "vsdpstreams"} {
		if _, err := os.Stat(filepath.Join(root, "build", "guest", f)); err != nil {
			t.Fatalf("%v: run `make build` (guestdrv/build.sh) first", err)
		}
	}
	return root
}

// streamsImage is what a guest needs to run both stream-check programs.
func streamsImage(root, conf string) images.Spec {
	return images.Spec{
		Modules:  []string{"vmw_vsock_virtio_transport"},
		Programs: []images.Program{{Package: "./guestdrv/vsdpnet/cmd/vsdpstreams", Path: guestStreamsGo}},
		// Deps packs what libvsdp.so and the C program link (libc, the
		// loader).
		Files: []images.File{
			{Path: "/lib/libvsdp.so", Host: filepath.Join(root, "build", "guest", "libvsdp.so"), Mode: 0o755, Deps: true},
			{Path: guestStreamsC, Host: filepath.Join(root, "build", "guest", "vsdpstreams"), Mode: 0o755, Deps: true},
			{Path: "/etc/vsdp.conf", Data: conf},
		},
	}
}

// streamSeed is the seed of a run's random sizes: VSDP_STREAMS_SEED, or
// the clock (logged, so a failure can be replayed).
func streamSeed(t *testing.T) uint64 {
	t.Helper()
	if s := os.Getenv("VSDP_STREAMS_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 0, 64)
		if err != nil {
			t.Fatalf("VSDP_STREAMS_SEED: %v", err)
		}
		return v
	}
	seed := uint64(time.Now().UnixNano())
	t.Logf("stream sizes from seed %#x (replay with VSDP_STREAMS_SEED=%#x)", seed, seed)
	return seed
}

// bootAll boots guests concurrently (each vmtest.Start would wait for the
// one before) and closes them when the test ends.
func bootAll(t *testing.T, opts ...vmtest.Options) []*vmtest.VM {
	t.Helper()
	vms := make([]*vmtest.VM, len(opts))
	errs := make([]error, len(opts))
	var wg sync.WaitGroup
	for i := range opts {
		opts[i].LogDir = vmtest.TestLogDir(t)
		wg.Go(func() { vms[i], errs[i] = vmtest.Boot(context.Background(), opts[i]) })
	}
	wg.Wait()
	for _, v := range vms {
		if v == nil {
			continue
		}
		t.Cleanup(func() {
			if err := v.Close(); err != nil {
				t.Error(err)
			}
			if t.Failed() {
				t.Logf("---- %s console (%s), last lines:\n%s", v.Name, v.Console, fileTail(v.Console, 4<<10))
			}
		})
	}
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	return vms
}

func fileTail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	return string(b[max(0, len(b)-n):])
}

// hostService is the server side of the stream-check protocol on a
// daemon's own SDP stack: it serves n streams of a plan and keeps each open
// until released.
type hostService struct {
	plan    []streamcheck.Header
	ln      *sdp.Listener
	results chan served
	release chan struct{}
	relOnce sync.Once
	wg      sync.WaitGroup
}

type served struct {
	r   streamcheck.Report
	err error
}

func newHostService(t *testing.T, ctx context.Context, st *sdp.Stack, port uint16, plan []streamcheck.Header) *hostService {
	t.Helper()
	ln, err := st.Listen(port, len(plan))
	if err != nil {
		t.Fatal(err)
	}
	s := &hostService{plan: plan, ln: ln, results: make(chan served, len(plan)), release: make(chan struct{})}
	var mu sync.Mutex
	seen := map[uint32]bool{}
	accept := func(h streamcheck.Header) error {
		mu.Lock()
		if h.Index >= uint32(len(plan)) || h != plan[h.Index] || seen[h.Index] {
			mu.Unlock()
			return fmt.Errorf("header %+v: not in the plan, or seen before", h)
		}
		seen[h.Index] = true
		mu.Unlock()
		if h.Index == 1 {
			time.Sleep(stallFor)
		}
		return nil
	}
	s.wg.Go(func() {
		for range plan {
			c, err := ln.AcceptSDP(ctx)
			if err != nil {
				s.results <- served{err: fmt.Errorf("accept: %w", err)}
				return
			}
			s.wg.Go(func() {
				defer c.Close()
				r, err := streamcheck.Serve(ctx, c, accept)
				s.results <- served{r, err}
				select { // the guest sees EOF only when the test has its counters
				case <-s.release:
				case <-ctx.Done():
				}
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		s.releaseAll()
		s.wg.Wait()
	})
	return s
}

// stallFor is how long the host service leaves stream 1 (2 MiB from the
// client) unread after its header: longer than the client needs to fill
// every buffer on the way (vsock credit, the SDP send and receive rings),
// so the client's writes meet back-pressure (EAGAIN, partial writes).
const stallFor = 1500 * time.Millisecond

func (s *hostService) releaseAll() { s.relOnce.Do(func() { close(s.release) }) }

// wait returns the report of every served stream, keyed by index. The
// guest program g must not end first.
func (s *hostService) wait(t *testing.T, ctx context.Context, g *guestRun) map[uint32]streamcheck.Report {
	t.Helper()
	out := map[uint32]streamcheck.Report{}
	for len(out) < len(s.plan) {
		select {
		case r := <-s.results:
			if r.err != nil {
				t.Fatalf("host service: %v", r.err)
			}
			out[r.r.Index] = r.r
		case <-g.done:
			t.Logf("%d of %d streams served", len(out), len(s.plan))
			g.mustRun(t)
		case <-ctx.Done():
			t.Fatalf("host service: %d of %d streams served: %v", len(out), len(s.plan), ctx.Err())
		}
	}
	return out
}

// guestRun is a guest program being waited for in the background.
type guestRun struct {
	args []string
	done chan struct{}
	r    *vmtest.Result
	err  error
}

func startGuest(t *testing.T, ctx context.Context, vm *vmtest.VM, c vmtest.Cmd) *guestRun {
	t.Helper()
	p, err := vm.Start(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	g := &guestRun{args: c.Args, done: make(chan struct{})}
	go func() {
		defer close(g.done)
		g.r, g.err = p.Wait(ctx)
	}()
	t.Cleanup(func() { p.Stop(ctx); <-g.done })
	return g
}

// mustRun fails the test if the program has ended.
func (g *guestRun) mustRun(t *testing.T) {
	t.Helper()
	select {
	case <-g.done:
	default:
		return
	}
	if g.err != nil {
		t.Fatalf("guest program %v: %v", g.args, g.err)
	}
	t.Fatalf("guest program %v ended too early (exit %d):\n%s\n%s", g.args, g.r.ExitCode, lastLines(string(g.r.Stdout), 10), g.r.Stderr)
}

// wait returns the program's result.
func (g *guestRun) wait(t *testing.T) *vmtest.Result {
	t.Helper()
	<-g.done
	if g.err != nil {
		t.Fatal(g.err)
	}
	return g.r
}

// planBytes is what a plan's streams carry each way, headers included:
// client to server (up) and server to client (down).
func planBytes(plan []streamcheck.Header) (up, down uint64) {
	for _, h := range plan {
		up += streamcheck.HeaderSize + h.Up
		down += h.Down
	}
	return up, down
}

// streamTable waits until a VM's stream table holds n streams carrying
// fromGuest and toGuest bytes in all (counters only grow, so the totals
// are reached when every stream is done), and returns it. Call it while
// the streams are held open (a closed stream leaves the table), by guest
// programs gs, none of which may end meanwhile.
func streamTable(t *testing.T, vm *sdpback.VM, n int, fromGuest, toGuest uint64, gs ...*guestRun) []sdpback.StreamStats {
	t.Helper()
	var last []sdpback.StreamStats
	for deadline := time.Now().Add(45 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		for _, g := range gs {
			g.mustRun(t)
		}
		last = vm.Streams()
		var from, to uint64
		for _, s := range last {
			from += s.FromGuest
			to += s.ToGuest
		}
		if len(last) == n && from == fromGuest && to == toGuest {
			return last
		}
	}
	sort.Slice(last, func(i, j int) bool { return last[i].Local.Port() < last[j].Local.Port() })
	var b strings.Builder
	var from, to uint64
	for _, s := range last {
		fmt.Fprintf(&b, "  %+v\n", s)
		from += s.FromGuest
		to += s.ToGuest
	}
	t.Fatalf("%s: stream table never reached %d streams, %d bytes from the guest, %d to it; last: %d streams, %d, %d:\n%s",
		vm.Config().Name, n, fromGuest, toGuest, len(last), from, to, b.String())
	return nil
}

// checkStream finds the one table entry with the given ends and checks it
// against what the stream carried.
func checkStream(t *testing.T, who string, table []sdpback.StreamStats, local, remote netip.AddrPort, fromGuest, toGuest uint64) {
	t.Helper()
	var st sdpback.StreamStats
	n := 0
	for _, s := range table {
		if s.Local == local && s.Remote == remote {
			st = s
			n++
		}
	}
	switch {
	case n != 1:
		t.Errorf("%s: %d entries %v -> %v in the daemon's stream table, want 1", who, n, local, remote)
	case st.Path != sdpback.PathSDP:
		t.Errorf("%s: path %q, want %q: %+v", who, st.Path, sdpback.PathSDP, st)
	case st.FromGuest != fromGuest || st.ToGuest != toGuest:
		t.Errorf("%s: counters %d from the guest, %d to it; the stream carried %d and %d", who, st.FromGuest, st.ToGuest, fromGuest, toGuest)
	}
}

// guestReports parses a guest program's report lines and checks them
// against the plan: sizes, and the content's sha256 each way.
func guestReports(t *testing.T, who string, r *vmtest.Result, plan []streamcheck.Header) map[uint32]streamcheck.Report {
	t.Helper()
	out := string(r.Stdout)
	if r.ExitCode != 0 || r.Signal != "" || r.TimedOut {
		t.Fatalf("%s: exit %d signal %q timed out %v\nstdout:\n%s\nstderr:\n%s", who, r.ExitCode, r.Signal, r.TimedOut, lastLines(out, 20), r.Stderr)
	}
	rs, err := streamcheck.ParseReports(out)
	if err != nil {
		t.Fatalf("%s: %v", who, err)
	}
	if len(rs) != len(plan) {
		t.Fatalf("%s: %d reports, want %d:\n%s", who, len(rs), len(plan), lastLines(out, 20))
	}
	for _, h := range plan {
		g, ok := rs[h.Index]
		if !ok || g.Up != h.Up || g.Down != h.Down ||
			g.UpSum != streamcheck.Sum(h.Seed, h.Index, streamcheck.Up, h.Up) ||
			g.DownSum != streamcheck.Sum(h.Seed, h.Index, streamcheck.Down, h.Down) {
			t.Fatalf("%s: stream %d report %+v does not match the plan %+v and its content", who, h.Index, g, h)
		}
	}
	return rs
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// summaryValue returns KEY's value from a program's key=value output.
func summaryValue(out, key string) (uint64, bool) {
	for _, f := range strings.Fields(out) {
		if k, v, ok := strings.Cut(f, "="); ok && k == key {
			n, err := strconv.ParseUint(v, 10, 64)
			return n, err == nil
		}
	}
	return 0, false
}

// TestVMStreams boots one guest whose only way out is vsdpd's device and
// runs our own programs through it, each stream checked by content (every
// byte against its generator), by sha256 at both ends, and by vsdpd's
// per-stream counters (path SDP, bytes each way), read while the stream is
// held open:
//   - the C epoll program under libvsdp.so: 50 concurrent non-blocking
//     streams of random sizes both ways to a host SDP service;
//   - the Go program through vsdpnet: Dial to a host service, and Listen
//     accepting host SDP clients, with the right peer address.
func TestVMStreams(t *testing.T) {
	vmtest.Require(t)
	root := guestBuild(t)
	const (
		hostAddr  = "10.62.0.1"
		guestAddr = "10.62.0.6"
	)
	cfg := &daemon.Config{
		Fabric: daemon.Fabric{Addr: hostAddr},
		VMs: []daemon.VMConfig{{Name: "guest", Socket: filepath.Join(t.TempDir(), "vm.sock"), CID: 6, Addr: guestAddr,
			Policy: []string{"sdp 10.62.0.0/24"}}},
	}
	d := startDaemon(t, cfg) // before the VM: QEMU goes before its back-end
	vm := vmtest.Start(t, vmtest.Options{
		Name:      "streams",
		Image:     streamsImage(root, "use sdp client * 10.62.0.0/24:*\nuse sdp server * *:*\n"),
		VhostUser: []vmtest.VhostUser{{Kind: vmtest.VhostVsock, Socket: cfg.VMs[0].Socket}},
	})
	back := d.VMs()[0].Back
	seed := streamSeed(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	host := netip.MustParseAddr(hostAddr)

	// dialTest runs a guest client program against a host service and
	// checks every stream three ways.
	dialTest := func(t *testing.T, port uint16, plan []streamcheck.Header, argv []string, env []string) string {
		svc := newHostService(t, ctx, d.HostStack(), port, plan)
		t0 := time.Now()
		g := startGuest(t, ctx, vm, vmtest.Cmd{Args: argv, Env: env, Timeout: 2 * time.Minute})
		hostSide := svc.wait(t, ctx, g)
		up, down := planBytes(plan)
		table := streamTable(t, back, len(plan), up, down, g)
		el := time.Since(t0)
		svc.releaseAll()
		r := g.wait(t)
		guest := guestReports(t, "guest client", r, plan)
		for _, h := range plan {
			g, s := guest[h.Index], hostSide[h.Index]
			who := fmt.Sprintf("stream %d (%d up, %d down)", h.Index, h.Up, h.Down)
			if g.UpSum != s.UpSum || g.DownSum != s.DownSum {
				t.Errorf("%s: sha256 differ: guest %+v, host %+v", who, g, s)
			}
			// The host saw the guest's fabric address, which the guest
			// itself reports (getsockname) and the table is keyed by.
			local, err := netip.ParseAddrPort(s.Remote)
			if err != nil || g.Local != s.Remote || local.Addr() != netip.MustParseAddr(guestAddr) {
				t.Errorf("%s: guest says it is %s, host sees %s", who, g.Local, s.Remote)
			}
			checkStream(t, who, table, local, netip.AddrPortFrom(host, port), streamcheck.HeaderSize+h.Up, h.Down)
		}
		t.Logf("%d streams, %d bytes up and %d down (headers included), in %v (TCG)", len(plan), up, down, el.Round(time.Millisecond))
		return string(r.Stdout)
	}

	t.Run("C epoll client, 50 streams through libvsdp.so", func(t *testing.T) {
		const n, budget = 50, 12 << 20
		plan, err := streamcheck.Plan(seed, n, budget)
		if err != nil {
			t.Fatal(err)
		}
		out := dialTest(t, 5000, plan, []string{guestStreamsC, "dial", hostAddr, "5000", strconv.FormatUint(seed, 10),
			strconv.Itoa(n), strconv.Itoa(budget)}, []string{"LD_PRELOAD=/lib/libvsdp.so"})
		// The library did the work: every socket swapped onto the device,
		// the 25 registered with epoll before connect() carried over,
		// connects in progress, and the stalled stream met back-pressure.
		for _, c := range []struct {
			key string
			min uint64
		}{{"preloaded", 1}, {"swaps", n}, {"tickets", n}, {"epoll_rereg", n / 2}, {"inprogress", 1}, {"eagain_w", 1}} {
			if v, ok := summaryValue(out, c.key); !ok || v < c.min {
				t.Errorf("guest program: %s=%d (found %v), want at least %d", c.key, v, ok, c.min)
			}
		}
		if v, ok := summaryValue(out, "protocol_errors"); !ok || v != 0 {
			t.Errorf("guest program: protocol_errors=%d (found %v)", v, ok)
		}
		t.Log(lastLines(out, 2))
	})
	t.Run("Go program dials through vsdpnet", func(t *testing.T) {
		const n, budget = 6, 4 << 20
		plan, err := streamcheck.Plan(seed+1, n, budget)
		if err != nil {
			t.Fatal(err)
		}
		dialTest(t, 5001, plan, []string{guestStreamsGo, "dial", hostAddr + ":5001", strconv.FormatUint(seed+1, 10),
			strconv.Itoa(n), strconv.Itoa(budget)}, nil)
	})
	t.Run("Go program listens through vsdpnet, host SDP clients", func(t *testing.T) {
		const n, budget, port = 4, 4 << 20, 6000
		plan, err := streamcheck.Plan(seed+2, n, budget)
		if err != nil {
			t.Fatal(err)
		}
		release := "/tmp/release-6000"
		g := startGuest(t, ctx, vm, vmtest.Cmd{Args: []string{guestStreamsGo, "serve", strconv.Itoa(port), strconv.FormatUint(seed+2, 10),
			strconv.Itoa(n), strconv.Itoa(budget), release}, Timeout: 2 * time.Minute})
		for deadline := time.Now().Add(30 * time.Second); back.Stats().Listeners == 0; time.Sleep(20 * time.Millisecond) {
			g.mustRun(t)
			if time.Now().After(deadline) {
				t.Fatal("the guest's listener was never exported")
			}
		}
		conns := make([]*sdp.Conn, n)
		reports := make([]streamcheck.Report, n)
		errs := make([]error, n)
		var wg sync.WaitGroup
		for i := range plan {
			wg.Go(func() {
				if conns[i], errs[i] = d.HostStack().Dial(ctx, netip.AddrPortFrom(netip.MustParseAddr(guestAddr), port)); errs[i] != nil {
					return
				}
				reports[i], errs[i] = streamcheck.Run(ctx, conns[i], plan[i])
			})
		}
		wg.Wait()
		defer func() {
			for _, c := range conns {
				if c != nil {
					c.Close()
				}
			}
		}()
		if err := errors.Join(errs...); err != nil {
			t.Fatal(err)
		}
		up, down := planBytes(plan)
		// The guest is the server here: the host's up is the guest's to.
		table := streamTable(t, back, n, down, up, g)
		if err := vm.Agent().WriteFile(ctx, release, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		for i, c := range conns {
			if err := streamcheck.ExpectEOF(c, plan[i], streamcheck.Down, plan[i].Down); err != nil {
				t.Fatal(err)
			}
		}
		guest := guestReports(t, "guest server", g.wait(t), plan)
		listenAt := netip.AddrPortFrom(netip.MustParseAddr(guestAddr), port)
		for i, h := range plan {
			g, c := guest[h.Index], reports[i]
			who := fmt.Sprintf("accepted stream %d (%d up, %d down)", h.Index, h.Up, h.Down)
			if g.UpSum != c.UpSum || g.DownSum != c.DownSum {
				t.Errorf("%s: sha256 differ: guest %+v, host %+v", who, g, c)
			}
			if g.Remote != c.Local {
				t.Errorf("%s: the guest's Accept gave peer %s; the host client is %s", who, g.Remote, c.Local)
			}
			peer, err := netip.ParseAddrPort(c.Local)
			if err != nil || peer.Addr() != host {
				t.Errorf("%s: host client at %q, want %v", who, c.Local, host)
			}
			checkStream(t, who, table, listenAt, peer, h.Down, streamcheck.HeaderSize+h.Up)
		}
	})
}

// guestToGuest runs on two guests of one daemon (TestVMListeners boots
// them): A serves, B dials A's fabric address, with the C program under
// libvsdp.so on one port and the Go program through vsdpnet on another,
// all streams at once. Every stream is checked by content and sha256 at
// both ends, and in both VMs' stream tables (path SDP, bytes each way, the
// ends' addresses), read while A holds the streams open; neither VM's
// table holds the other's ends.
func guestToGuest(t *testing.T, ctx context.Context, d *daemon.Daemon, a, b *vmtest.VM) {
	backA, backB := d.VMs()[0].Back, d.VMs()[1].Back
	addrA, addrB := backA.Config().Addr, backB.Config().Addr
	seed := streamSeed(t)
	type side struct {
		name     string
		prog     string
		port     uint16
		n        int
		budget   uint64
		env      []string
		plan     []streamcheck.Header
		srv, cli *guestRun
	}
	preload := []string{"LD_PRELOAD=/lib/libvsdp.so"}
	sides := []*side{
		{name: "C, libvsdp.so", prog: guestStreamsC, port: 9100, n: 20, budget: 4 << 20, env: preload},
		{name: "Go, vsdpnet", prog: guestStreamsGo, port: 9101, n: 4, budget: 2 << 20},
	}
	var upAll, downAll uint64
	for i, s := range sides {
		var err error
		if s.plan, err = streamcheck.Plan(seed+uint64(i), s.n, s.budget); err != nil {
			t.Fatal(err)
		}
		up, down := planBytes(s.plan)
		upAll += up
		downAll += down
		s.srv = startGuest(t, ctx, a, vmtest.Cmd{Args: []string{s.prog, "serve", strconv.Itoa(int(s.port)), strconv.FormatUint(seed+uint64(i), 10),
			strconv.Itoa(s.n), strconv.FormatUint(s.budget, 10), fmt.Sprintf("/tmp/release-%d", s.port)}, Env: s.env, Timeout: 2 * time.Minute})
	}
	for deadline := time.Now().Add(30 * time.Second); backA.Stats().Listeners < len(sides); time.Sleep(20 * time.Millisecond) {
		for _, s := range sides {
			s.srv.mustRun(t)
		}
		if time.Now().After(deadline) {
			t.Fatalf("guest A exported %d listeners, want %d", backA.Stats().Listeners, len(sides))
		}
	}
	t0 := time.Now()
	for i, s := range sides {
		dst := []string{addrA.String(), strconv.Itoa(int(s.port))}
		if s.prog == guestStreamsGo {
			dst = []string{netip.AddrPortFrom(addrA, s.port).String()}
		}
		args := append(append([]string{s.prog, "dial"}, dst...), strconv.FormatUint(seed+uint64(i), 10), strconv.Itoa(s.n), strconv.FormatUint(s.budget, 10))
		s.cli = startGuest(t, ctx, b, vmtest.Cmd{Args: args, Env: s.env, Timeout: 2 * time.Minute})
	}
	// B's streams carry up from the guest and down to it; A's the reverse.
	n := sides[0].n + sides[1].n
	progs := []*guestRun{sides[0].srv, sides[0].cli, sides[1].srv, sides[1].cli}
	tableB := streamTable(t, backB, n, upAll, downAll, progs...)
	tableA := streamTable(t, backA, n, downAll, upAll, progs...)
	el := time.Since(t0)
	for _, s := range sides {
		if err := a.Agent().WriteFile(ctx, fmt.Sprintf("/tmp/release-%d", s.port), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, e := range tableA {
		if e.Local.Addr() != addrA || e.Remote.Addr() != addrB {
			t.Errorf("guest A's table holds %v -> %v: not one of A's stream ends", e.Local, e.Remote)
		}
	}
	for _, e := range tableB {
		if e.Local.Addr() != addrB || e.Remote.Addr() != addrA {
			t.Errorf("guest B's table holds %v -> %v: not one of B's stream ends", e.Local, e.Remote)
		}
	}
	for _, s := range sides {
		server := guestReports(t, "guest A "+s.name+" server", s.srv.wait(t), s.plan)
		client := guestReports(t, "guest B "+s.name+" client", s.cli.wait(t), s.plan)
		listen := netip.AddrPortFrom(addrA, s.port)
		for _, h := range s.plan {
			sv, cl := server[h.Index], client[h.Index]
			who := fmt.Sprintf("%s stream %d (%d up, %d down)", s.name, h.Index, h.Up, h.Down)
			if sv.UpSum != cl.UpSum || sv.DownSum != cl.DownSum {
				t.Errorf("%s: sha256 differ: A %+v, B %+v", who, sv, cl)
			}
			local, err := netip.ParseAddrPort(cl.Local)
			if err != nil || local.Addr() != addrB || cl.Remote != listen.String() || sv.Remote != cl.Local || sv.Local != listen.String() {
				t.Errorf("%s: B says %s -> %s, A says %s <- %s; want B's fabric address and A's %v", who, cl.Local, cl.Remote, sv.Local, sv.Remote, listen)
				continue
			}
			checkStream(t, who+" in B's table", tableB, local, listen, streamcheck.HeaderSize+h.Up, h.Down)
			checkStream(t, who+" in A's table", tableA, listen, local, h.Down, streamcheck.HeaderSize+h.Up)
		}
	}
	t.Logf("%d streams guest to guest, %d bytes B->A and %d A->B (headers included), in %v (TCG)", n, upAll, downAll, el.Round(time.Millisecond))
}
