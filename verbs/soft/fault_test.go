package soft

import (
	"context"
	"crypto/sha256"
	"errors"
	"net/netip"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/vsdp/vsdp/verbs"
)

// end is one side of a connected test pair.
type end struct {
	dev  *Device
	pd   verbs.PD
	cq   verbs.CQ
	dma  *verbs.DMA
	mr   verbs.MR
	conn verbs.Conn
	qp   verbs.QP
}

func (e *end) sge(off, n int) verbs.SGE {
	return verbs.SGE{Addr: e.mr.Addr() + uint64(off), Length: uint32(n), LKey: e.mr.LKey()}
}

func (e *end) recvs(n int) error {
	for i := 0; i < n; i++ {
		if err := e.qp.PostRecv([]verbs.RecvWR{{ID: uint64(1000 + i), SGL: []verbs.SGE{e.sge(i*4096, 4096)}}}); err != nil {
			return err
		}
	}
	return nil
}

// wait collects n completions.
func (e *end) wait(t testing.TB, n int) []verbs.Completion {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out := make([]verbs.Completion, n)
	for k := 0; k < n; {
		got, err := verbs.PollWait(ctx, e.cq, out[k:])
		if err != nil {
			t.Fatalf("after %d of %d completions: %v", k, n, err)
		}
		k += got
	}
	return out
}

func (e *end) event(t testing.TB, want verbs.EventType) verbs.Event {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case ev := <-e.conn.Events():
			if ev.Type == want {
				return ev
			}
		case <-timeout:
			t.Fatalf("no %v event", want)
		}
	}
}

func (e *end) close() error {
	var errs []error
	if e.qp != nil {
		errs = append(errs, e.qp.Close())
	}
	if e.conn != nil {
		errs = append(errs, e.conn.Close())
	}
	for _, c := range []interface{ Close() error }{e.mr, e.cq, e.pd} {
		if c != nil {
			errs = append(errs, c.Close())
		}
	}
	if e.dma != nil {
		errs = append(errs, e.dma.Close())
	}
	return errors.Join(errs...)
}

// connectPair opens two soft devices over transport and connects them. The
// passive side posts recvs receives before accepting.
func connectPair(t testing.TB, transport string, o Options, ap, pp verbs.ConnParam, recvs int) (a, p *end) {
	t.Helper()
	return connectPairSized(t, transport, o, ap, pp, recvs, 64*4096)
}

// connectPairSized is connectPair with regions of size bytes.
func connectPairSized(t testing.TB, transport string, o Options, ap, pp verbs.ConnParam, recvs, size int) (a, p *end) {
	t.Helper()
	done := checkLeaks(t)
	tab, n := NewTable(), NewNetwork()
	devs := map[string]*Device{}
	for i, name := range []string{"pa", "ac"} {
		opts := o
		addr := netip.AddrFrom4([4]byte{10, 8, 0, byte(i + 1)})
		opts.Name, opts.Addrs, opts.Table = name, []netip.Addr{addr}, tab
		switch transport {
		case "inproc":
			opts.Network = n
		case "tcp":
			opts.Listen = Endpoint{Net: "tcp", Addr: "127.0.0.7:0"}
		case "unix":
			opts.Listen = Endpoint{Net: "unix", Addr: filepath.Join(t.TempDir(), name)}
		}
		d, err := Open(opts)
		if err != nil {
			t.Fatal(err)
		}
		tab.Set(addr, d.Endpoint())
		devs[name] = d
	}
	mk := func(d *Device) *end {
		e := &end{dev: d}
		var err error
		e.pd, _ = d.AllocPD()
		e.cq, _ = d.CreateCQ(verbs.CQOptions{Entries: 256})
		if e.dma, err = verbs.AllocDMA(size); err != nil {
			t.Fatal(err)
		}
		if e.mr, err = e.pd.RegMR(e.dma.Bytes(), verbs.AccessLocalWrite|verbs.AccessRemoteWrite|verbs.AccessRemoteRead); err != nil {
			t.Fatal(err)
		}
		return e
	}
	a, p = mk(devs["ac"]), mk(devs["pa"])
	t.Cleanup(func() {
		if err := errors.Join(a.close(), p.close(), a.dev.Close(), p.dev.Close()); err != nil {
			t.Error(err)
		}
		done()
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ln, err := p.dev.Listen(verbs.ListenOptions{ServiceID: 42})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var wg sync.WaitGroup
	wg.Add(1)
	var perr error
	go func() {
		defer wg.Done()
		c, err := ln.Accept(ctx)
		if err != nil {
			perr = err
			return
		}
		p.conn = c
		perr = verbs.AcceptConn(ctx, c, verbs.AcceptConfig{PD: p.pd, QP: verbs.QPOptions{SendCQ: p.cq, RecvCQ: p.cq}, Param: pp,
			Prepare: func(qp verbs.QP) error {
				p.qp = qp
				return p.recvs(recvs)
			}})
	}()
	c, _, err := verbs.Dial(ctx, a.dev, verbs.DialConfig{Resolve: verbs.ResolveOptions{Addr: netip.AddrFrom4([4]byte{10, 8, 0, 1}), ServiceID: 42},
		PD: a.pd, QP: verbs.QPOptions{SendCQ: a.cq, RecvCQ: a.cq}, Param: ap})
	wg.Wait()
	if err != nil || perr != nil {
		t.Fatalf("connect: %v / %v", err, perr)
	}
	a.conn, a.qp = c, c.QP()
	return a, p
}

var transports = []string{"inproc", "tcp"}

func TestDropLink(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr, func(t *testing.T) {
			a, p := connectPair(t, tr, Options{}, verbs.ConnParam{RNRRetry: 7}, verbs.ConnParam{}, 2)
			inj, err := Inject(p.conn)
			if err != nil {
				t.Fatal(err)
			}
			inj.WithholdReceives(true) // keep the active side's SEND outstanding
			if err := a.qp.PostSend([]verbs.SendWR{
				{ID: 1, Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{a.sge(0, 100)}},
				{ID: 2, Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{a.sge(0, 100)}},
			}); err != nil {
				t.Fatal(err)
			}
			for i := 0; i < 400 && p.dev.Stats().RNRNaksSent == 0; i++ {
				time.Sleep(5 * time.Millisecond)
			}
			ai, _ := Inject(a.conn)
			ai.DropLink()
			ev := a.event(t, verbs.EventDisconnected)
			if !errors.Is(ev.Err, errLinkDropped) {
				t.Errorf("active disconnect cause %v", ev.Err)
			}
			if ev := p.event(t, verbs.EventDisconnected); !errors.Is(ev.Err, verbs.ErrDisconnected) {
				t.Errorf("passive disconnect cause %v", ev.Err)
			}
			got := a.wait(t, 2)
			if got[0].Status != verbs.StatusRetryExceeded || got[1].Status != verbs.StatusFlushed {
				t.Errorf("active completions %+v, want RETRY_EXC_ERR then a flush", got)
			}
			got = p.wait(t, 2)
			if got[0].Status != verbs.StatusFlushed || got[1].Status != verbs.StatusFlushed {
				t.Errorf("passive completions %+v, want two flushes", got)
			}
		})
	}
}

func TestRNRRetryCount(t *testing.T) {
	for _, retry := range []uint8{0, 1, 3} {
		a, p := connectPair(t, "inproc", Options{}, verbs.ConnParam{RNRRetry: retry}, verbs.ConnParam{}, 0)
		if err := a.qp.PostSend([]verbs.SendWR{{ID: 1, Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{a.sge(0, 8)}}}); err != nil {
			t.Fatal(err)
		}
		if got := a.wait(t, 1); got[0].Status != verbs.StatusRNRRetryExceeded {
			t.Fatalf("retry %d: completion %+v", retry, got[0])
		}
		if sent, recv := p.dev.Stats().RNRNaksSent, a.dev.Stats().RNRNaksReceived; sent != uint64(retry)+1 || recv != sent {
			t.Errorf("retry %d: %d RNR NAKs sent, %d received, want %d", retry, sent, recv, retry+1)
		}
	}
}

func TestWithholdThenRelease(t *testing.T) {
	a, p := connectPair(t, "inproc", Options{}, verbs.ConnParam{RNRRetry: 7}, verbs.ConnParam{}, 1)
	inj, _ := Inject(p.conn)
	inj.WithholdReceives(true)
	copy(a.dma.Bytes(), "withheld")
	if err := a.qp.PostSend([]verbs.SendWR{{ID: 1, Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{a.sge(0, 8)}}}); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 400 && p.dev.Stats().RNRNaksSent < 3; i++ {
		time.Sleep(5 * time.Millisecond)
	}
	inj.WithholdReceives(false)
	if got := a.wait(t, 1); got[0].Status != verbs.StatusSuccess {
		t.Fatalf("send %+v", got[0])
	}
	got := p.wait(t, 1)
	if got[0].Status != verbs.StatusSuccess || string(p.dma.Bytes()[:8]) != "withheld" {
		t.Fatalf("receive %+v %q", got[0], p.dma.Bytes()[:8])
	}
	if n := p.dev.Stats().RNRNaksSent; n < 3 {
		t.Errorf("%d RNR NAKs, want at least 3", n)
	}
}

func TestForceErrorAndAckTimeout(t *testing.T) {
	a, p := connectPair(t, "inproc", Options{AckTimeout: 200 * time.Millisecond}, verbs.ConnParam{}, verbs.ConnParam{}, 2)
	inj, _ := Inject(p.conn)
	inj.ForceError()
	if ev := p.event(t, verbs.EventQPFatal); !errors.Is(ev.Err, errInjected) {
		t.Errorf("fatal event cause %v", ev.Err)
	}
	if got := p.wait(t, 2); got[0].Status != verbs.StatusFlushed || got[1].Status != verbs.StatusFlushed {
		t.Errorf("passive completions %+v", got)
	}
	// The peer is not told: its request goes unanswered and times out.
	start := time.Now()
	if err := a.qp.PostSend([]verbs.SendWR{{ID: 1, Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{a.sge(0, 8)}}}); err != nil {
		t.Fatal(err)
	}
	if got := a.wait(t, 1); got[0].Status != verbs.StatusRetryExceeded {
		t.Fatalf("completion %+v, want RETRY_EXC_ERR", got[0])
	}
	if el := time.Since(start); el < 150*time.Millisecond {
		t.Errorf("timed out after %v, before the ack timeout", el)
	}
}

func TestDelay(t *testing.T) {
	a, p := connectPair(t, "tcp", Options{}, verbs.ConnParam{}, verbs.ConnParam{}, 1)
	inj, _ := Inject(a.conn)
	inj.SetDelay(100 * time.Millisecond)
	start := time.Now()
	if err := a.qp.PostSend([]verbs.SendWR{{ID: 1, Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{a.sge(0, 8)}}}); err != nil {
		t.Fatal(err)
	}
	a.wait(t, 1)
	if el := time.Since(start); el < 90*time.Millisecond {
		t.Errorf("delayed send completed after %v", el)
	}
	p.wait(t, 1)
}

func TestSQD(t *testing.T) {
	a, p := connectPair(t, "inproc", Options{}, verbs.ConnParam{}, verbs.ConnParam{}, 4)
	if err := a.qp.Modify(verbs.QPSQD); err != nil {
		t.Fatal(err)
	}
	a.event(t, verbs.EventSQDrained)
	if err := a.qp.PostSend([]verbs.SendWR{{ID: 1, Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{a.sge(0, 8)}}}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(30 * time.Millisecond)
	if n, _ := a.cq.Poll(make([]verbs.Completion, 1)); n != 0 {
		t.Fatal("a send went out in SQD")
	}
	if err := a.qp.Modify(verbs.QPRTS); err != nil {
		t.Fatal(err)
	}
	if got := a.wait(t, 1); got[0].Status != verbs.StatusSuccess {
		t.Fatalf("completion %+v", got[0])
	}
	p.wait(t, 1)
	if err := a.qp.Modify(verbs.QPInit); !errors.Is(err, verbs.ErrQPState) {
		t.Errorf("modify RTS -> INIT: %v", err)
	}
}

func TestCQOverflowFatal(t *testing.T) {
	a, _ := connectPair(t, "inproc", Options{}, verbs.ConnParam{}, verbs.ConnParam{}, 0)
	wrs := make([]verbs.SendWR, 64)
	for i := range wrs {
		wrs[i] = verbs.SendWR{ID: uint64(i), Op: verbs.OpWrite, Flags: verbs.SendSignaled}
	}
	// Keep posting without polling until the 256-entry CQ overflows.
	for i := 0; i < 100 && a.dev.Stats().CQOverflows == 0; i++ {
		if err := a.qp.PostSend(wrs); err != nil && !errors.Is(err, verbs.ErrQueueFull) {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Millisecond)
	}
	a.event(t, verbs.EventCQError)
	if ev := a.event(t, verbs.EventQPFatal); !errors.Is(ev.Err, verbs.ErrCQOverflow) {
		t.Errorf("fatal cause %v", ev.Err)
	}
	n, err := a.cq.Poll(make([]verbs.Completion, 512))
	if n != 256 || !errors.Is(err, verbs.ErrCQOverflow) {
		t.Errorf("poll: %d, %v; want 256 and ErrCQOverflow", n, err)
	}
	if err := a.cq.Notify(false); !errors.Is(err, verbs.ErrCQOverflow) {
		t.Errorf("notify on an overflowed CQ: %v", err)
	}
	if a.dev.Stats().CQOverflows != 1 {
		t.Errorf("overflows counted: %d", a.dev.Stats().CQOverflows)
	}
}

// TestTouches checks the copy instrumentation: every copy to or from
// registered memory is reported, and the stream transport's staging copies
// are counted apart.
func TestTouches(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr, func(t *testing.T) {
			var mu sync.Mutex
			var touches []Touch
			o := Options{Touch: func(x Touch) { mu.Lock(); touches = append(touches, x); mu.Unlock() }}
			a, p := connectPair(t, tr, o, verbs.ConnParam{}, verbs.ConnParam{}, 1)
			mu.Lock()
			touches = nil
			mu.Unlock()
			wrs := []verbs.SendWR{
				{ID: 1, Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{a.sge(0, 1000), a.sge(5000, 500)}},
				{ID: 2, Op: verbs.OpWrite, Flags: verbs.SendSignaled, SGL: []verbs.SGE{a.sge(0, 300)}, RemoteAddr: p.mr.Addr() + 8192, RKey: p.mr.RKey()},
				{ID: 3, Op: verbs.OpRead, Flags: verbs.SendSignaled, SGL: []verbs.SGE{a.sge(16384, 200)}, RemoteAddr: p.mr.Addr() + 8192, RKey: p.mr.RKey()},
			}
			if err := a.qp.PostSend(wrs); err != nil {
				t.Fatal(err)
			}
			a.wait(t, 3)
			p.wait(t, 1)
			mu.Lock()
			defer mu.Unlock()
			var localRead, localWrite, remoteRead, remoteWrite uint64
			for _, x := range touches {
				switch {
				case x.Remote && x.Write:
					remoteWrite += x.Len
				case x.Remote:
					remoteRead += x.Len
				case x.Write:
					localWrite += x.Len
				default:
					localRead += x.Len
				}
			}
			// Gathered: SEND 1500 + WRITE 300; scattered: receive 1500 +
			// READ result 200; on the peer's behalf: WRITE 300, READ 200.
			if localRead != 1800 || localWrite != 1700 || remoteWrite != 300 || remoteRead != 200 {
				t.Errorf("touched: local read %d write %d, remote read %d write %d", localRead, localWrite, remoteRead, remoteWrite)
			}
			as, _ := RegionStats(a.mr)
			ps, _ := RegionStats(p.mr)
			if as.Read != 1800 || as.Written != 200 || ps.Read != 200 || ps.Written != 1800 {
				t.Errorf("region stats: active %+v, passive %+v", as, ps)
			}
			staged := a.dev.Stats().StagedBytes + p.dev.Stats().StagedBytes
			if tr == "inproc" && staged != 0 {
				t.Errorf("in-process transport staged %d bytes", staged)
			}
			if tr == "tcp" && staged != 2*(1500+300+200) {
				t.Errorf("stream transport staged %d bytes, want %d", staged, 2*(1500+300+200))
			}
		})
	}
}

// TestDeregisterWhileExposed: a region closed under a connection stops being
// reachable; the peer's access is refused and nothing touches the memory.
func TestDeregisterWhileExposed(t *testing.T) {
	a, p := connectPair(t, "inproc", Options{}, verbs.ConnParam{}, verbs.ConnParam{}, 0)
	addr, key := p.mr.Addr(), p.mr.RKey()
	if err := p.mr.Close(); err != nil {
		t.Fatal(err)
	}
	p.mr = nil
	if err := a.qp.PostSend([]verbs.SendWR{{ID: 1, Op: verbs.OpWrite, Flags: verbs.SendSignaled, SGL: []verbs.SGE{a.sge(0, 64)}, RemoteAddr: addr, RKey: key}}); err != nil {
		t.Fatal(err)
	}
	if got := a.wait(t, 1); got[0].Status != verbs.StatusRemoteAccess {
		t.Fatalf("completion %+v", got[0])
	}
	p.event(t, verbs.EventQPAccessError)
	for _, b := range p.dma.Bytes() {
		if b != 0 {
			t.Fatal("deregistered memory was written")
		}
	}
}

func TestOptionsAndTables(t *testing.T) {
	for _, o := range []Options{
		{Addrs: []netip.Addr{netip.MustParseAddr("::1")}},
		{MaxMsgSize: maxMaxMsgSize + 1},
		{Listen: Endpoint{Net: "inproc", Addr: "x"}},
		{Listen: Endpoint{Net: "tcp", Addr: "no-port"}},
		{Listen: Endpoint{Net: "sctp", Addr: "1.2.3.4:5"}},
	} {
		if d, err := Open(o); !errors.Is(err, verbs.ErrInvalid) {
			if d != nil {
				d.Close()
			}
			t.Errorf("Open(%+v): %v, want ErrInvalid", o, err)
		}
	}
	for s, ok := range map[string]bool{
		"inproc:a": true, "tcp:127.0.0.1:1": true, "unix:/x": true,
		"inproc:": false, "tcp:1.2.3.4": false, "udp:1.2.3.4:5": false, "nothing": false,
	} {
		if _, err := ParseEndpoint(s); (err == nil) != ok {
			t.Errorf("ParseEndpoint(%q): %v", s, err)
		}
	}
	tab := NewTable()
	if err := tab.Set(netip.MustParseAddr("fe80::1"), Endpoint{Net: "inproc", Addr: "a"}); !errors.Is(err, verbs.ErrInvalid) {
		t.Errorf("IPv6 fabric address: %v", err)
	}
	if err := tab.Set(netip.MustParseAddr("::ffff:10.0.0.1"), Endpoint{Net: "inproc", Addr: "a"}); err != nil {
		t.Errorf("mapped IPv4: %v", err)
	}
	if _, ok := tab.Lookup(netip.MustParseAddr("10.0.0.1")); !ok {
		t.Error("mapped address not found as IPv4")
	}
	tab.Delete(netip.MustParseAddr("10.0.0.1"))
	if _, ok := tab.Lookup(netip.MustParseAddr("10.0.0.1")); ok {
		t.Error("deleted address found")
	}

	pr := NewProvider(Options{Name: "x"}, Options{})
	infos, err := pr.Devices()
	if err != nil || len(infos) != 2 || infos[0].Name != "x" || infos[1].Name != defaultName || infos[0].Provider != "soft" {
		t.Fatalf("devices %+v %v", infos, err)
	}
	d, err := pr.Open("x")
	if err != nil {
		t.Fatal(err)
	}
	if d.Info().Name != "x" {
		t.Errorf("opened %q", d.Info().Name)
	}
	if err := errors.Join(d.Close(), d.Close()); err != nil {
		t.Error(err)
	}
	if _, err := pr.Open("nope"); !errors.Is(err, verbs.ErrInvalid) {
		t.Errorf("open unknown: %v", err)
	}
	if _, err := d.AllocPD(); !errors.Is(err, verbs.ErrClosed) {
		t.Errorf("AllocPD on a closed device: %v", err)
	}
}

func TestListenerRules(t *testing.T) {
	defer checkLeaks(t)()
	d, err := Open(Options{Addrs: []netip.Addr{netip.MustParseAddr("10.1.1.1")}})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	any1, err := d.Listen(verbs.ListenOptions{ServiceID: 5})
	if err != nil {
		t.Fatal(err)
	}
	defer any1.Close()
	for _, o := range []verbs.ListenOptions{
		{ServiceID: 5},
		{ServiceID: 5, Addr: netip.MustParseAddr("10.1.1.1")},
	} {
		if l, err := d.Listen(o); !errors.Is(err, verbs.ErrBusy) {
			if l != nil {
				l.Close()
			}
			t.Errorf("Listen(%+v): %v, want ErrBusy", o, err)
		}
	}
	for _, o := range []verbs.ListenOptions{
		{ServiceID: 6, Addr: netip.MustParseAddr("10.1.1.2")},
		{ServiceID: 6, Backlog: -1},
		{ServiceID: 6, Backlog: maxBacklog + 1},
	} {
		if l, err := d.Listen(o); !errors.Is(err, verbs.ErrInvalid) {
			if l != nil {
				l.Close()
			}
			t.Errorf("Listen(%+v): %v, want ErrInvalid", o, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := any1.Accept(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("accept with nothing pending: %v", err)
	}
	if _, err := d.Resolve(context.Background(), verbs.ResolveOptions{Addr: netip.MustParseAddr("10.1.1.9")}); !errors.Is(err, verbs.ErrUnreachable) {
		t.Errorf("resolve without a route: %v", err)
	}
}

// TestLargeTransferOutlastsAckTimeout: a transfer that takes longer than the
// ack timeout is not failed while its bytes are still moving.
func TestLargeTransferOutlastsAckTimeout(t *testing.T) {
	const size = 64 << 20
	// The ack timeout is short against the transfer but long against a
	// scheduling stall on a loaded 2-core machine with the race detector.
	const ackTimeout = 250 * time.Millisecond
	a, p := connectPairSized(t, "tcp", Options{AckTimeout: ackTimeout, MaxMsgSize: size}, verbs.ConnParam{}, verbs.ConnParam{}, 0, size)
	src := pattern(3, size)
	copy(a.dma.Bytes(), src)
	start := time.Now()
	if err := a.qp.PostSend([]verbs.SendWR{{ID: 1, Op: verbs.OpWrite, Flags: verbs.SendSignaled, SGL: []verbs.SGE{a.sge(0, size)}, RemoteAddr: p.mr.Addr(), RKey: p.mr.RKey()}}); err != nil {
		t.Fatal(err)
	}
	if got := a.wait(t, 1); got[0].Status != verbs.StatusSuccess {
		t.Fatalf("completion %+v after %v", got[0], time.Since(start))
	}
	if el := time.Since(start); el < ackTimeout {
		t.Logf("transfer took only %v: the test did not outlast the timeout", el)
	}
	if sha256.Sum256(p.dma.Bytes()) != sha256.Sum256(src) {
		t.Fatal("written data differs")
	}
}
