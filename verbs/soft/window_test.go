package soft

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/vsdp/vsdp/verbs"
)

// TestKeyTags: a key is valid only with its current tag (the low byte), for
// lkeys, rkeys and windows rebound with a new tag.
func TestKeyTags(t *testing.T) {
	a, p := connectPair(t, "inproc", Options{}, verbs.ConnParam{}, verbs.ConnParam{}, 4)
	bad := a.sge(0, 8)
	bad.LKey ^= 1
	if err := a.qp.PostSend([]verbs.SendWR{{ID: 1, Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{bad}}}); err != nil {
		t.Fatal(err)
	}
	if got := a.wait(t, 1); got[0].Status != verbs.StatusLocalProtection {
		t.Fatalf("lkey with another tag: %+v", got[0])
	}

	a, p = connectPair(t, "inproc", Options{}, verbs.ConnParam{}, verbs.ConnParam{}, 4)
	if err := a.qp.PostSend([]verbs.SendWR{{ID: 1, Op: verbs.OpWrite, Flags: verbs.SendSignaled, SGL: []verbs.SGE{a.sge(0, 8)}, RemoteAddr: p.mr.Addr(), RKey: p.mr.RKey() ^ 1}}); err != nil {
		t.Fatal(err)
	}
	if got := a.wait(t, 1); got[0].Status != verbs.StatusRemoteAccess {
		t.Fatalf("rkey with another tag: %+v", got[0])
	}

	// A bound type-2 window cannot be bound again before it is invalidated.
	_, p = connectPair(t, "inproc", Options{}, verbs.ConnParam{}, verbs.ConnParam{}, 0)
	reg, err := p.pd.RegMR(p.dma.Bytes()[:4096], verbs.AccessLocalWrite|verbs.AccessMWBind)
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	mw, _ := p.pd.AllocMW()
	defer mw.Close()
	bind := func(id uint64, key uint32) verbs.Status {
		if err := p.qp.PostSend([]verbs.SendWR{{ID: id, Op: verbs.OpBindMW, Flags: verbs.SendSignaled, Bind: verbs.Bind{
			MW: mw, RKey: key, MR: reg, Addr: reg.Addr(), Length: 64, Access: verbs.AccessRemoteRead}}}); err != nil {
			t.Fatal(err)
		}
		return p.wait(t, 1)[0].Status
	}
	if st := bind(1, verbs.IncRKey(mw.RKey())); st != verbs.StatusSuccess {
		t.Fatalf("bind: %v", st)
	}
	if st := bind(2, verbs.IncRKey(mw.RKey())); st != verbs.StatusMWBind {
		t.Fatalf("bind of a bound window: %v", st)
	}
}

// windowRig: one passive device with one PD, region and window, and two
// connections to it from another device.
func TestWindowScopedToQP(t *testing.T) {
	defer checkLeaks(t)()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tab, n := NewTable(), NewNetwork()
	pa, aa := netip.MustParseAddr("10.6.0.1"), netip.MustParseAddr("10.6.0.2")
	pd_, err := Open(Options{Name: "p", Addrs: []netip.Addr{pa}, Table: tab, Network: n})
	if err != nil {
		t.Fatal(err)
	}
	ad, err := Open(Options{Name: "a", Addrs: []netip.Addr{aa}, Table: tab, Network: n})
	if err != nil {
		t.Fatal(err)
	}
	tab.Set(pa, pd_.Endpoint())
	tab.Set(aa, ad.Endpoint())
	var closers []func() error
	defer func() {
		for i := len(closers) - 1; i >= 0; i-- {
			if err := closers[i](); err != nil {
				t.Error(err)
			}
		}
	}()
	closers = append(closers, pd_.Close, ad.Close)
	ppd, _ := pd_.AllocPD()
	pcq, _ := pd_.CreateCQ(verbs.CQOptions{})
	apd, _ := ad.AllocPD()
	acq, _ := ad.CreateCQ(verbs.CQOptions{})
	closers = append(closers, ppd.Close, pcq.Close, apd.Close, acq.Close)
	pmem, _ := verbs.AllocDMA(8192)
	amem, _ := verbs.AllocDMA(8192)
	closers = append(closers, pmem.Close, amem.Close)
	pmr, err := ppd.RegMR(pmem.Bytes(), verbs.AccessLocalWrite|verbs.AccessMWBind)
	if err != nil {
		t.Fatal(err)
	}
	amr, _ := apd.RegMR(amem.Bytes(), verbs.AccessLocalWrite)
	closers = append(closers, pmr.Close, amr.Close)
	mw, _ := ppd.AllocMW()
	closers = append(closers, mw.Close)
	ln, _ := pd_.Listen(verbs.ListenOptions{ServiceID: 9})
	closers = append(closers, ln.Close)

	var pconns, aconns []verbs.Conn
	for i := 0; i < 2; i++ {
		done := make(chan error, 1)
		go func() {
			c, err := ln.Accept(ctx)
			if err != nil {
				done <- err
				return
			}
			pconns = append(pconns, c)
			done <- verbs.AcceptConn(ctx, c, verbs.AcceptConfig{PD: ppd, QP: verbs.QPOptions{SendCQ: pcq, RecvCQ: pcq}})
		}()
		c, _, err := verbs.Dial(ctx, ad, verbs.DialConfig{Resolve: verbs.ResolveOptions{Addr: pa, ServiceID: 9}, PD: apd, QP: verbs.QPOptions{SendCQ: acq, RecvCQ: acq}})
		if err != nil {
			t.Fatal(err)
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		aconns = append(aconns, c)
	}
	for _, c := range append(append([]verbs.Conn(nil), pconns...), aconns...) {
		c := c
		closers = append(closers, c.Close, c.QP().Close)
	}
	wait := func(cq verbs.CQ) verbs.Completion {
		t.Helper()
		wc := make([]verbs.Completion, 1)
		if _, err := verbs.PollWait(ctx, cq, wc); err != nil {
			t.Fatal(err)
		}
		return wc[0]
	}
	key := verbs.IncRKey(mw.RKey())
	if err := pconns[0].QP().PostSend([]verbs.SendWR{{ID: 1, Op: verbs.OpBindMW, Flags: verbs.SendSignaled, Bind: verbs.Bind{
		MW: mw, RKey: key, MR: pmr, Addr: pmr.Addr(), Length: 4096, Access: verbs.AccessRemoteRead}}}); err != nil {
		t.Fatal(err)
	}
	if c := wait(pcq); c.Status != verbs.StatusSuccess {
		t.Fatalf("bind %+v", c)
	}
	read := func(c verbs.Conn, k uint32) verbs.Status {
		if err := c.QP().PostSend([]verbs.SendWR{{ID: 3, Op: verbs.OpRead, Flags: verbs.SendSignaled, SGL: []verbs.SGE{{Addr: amr.Addr(), Length: 8, LKey: amr.LKey()}}, RemoteAddr: pmr.Addr(), RKey: k}}); err != nil {
			t.Fatal(err)
		}
		return wait(acq).Status
	}
	if st := read(aconns[0], key); st != verbs.StatusSuccess {
		t.Fatalf("read through the window's own QP: %v", st)
	}
	if st := read(aconns[0], mw.RKey()^1); st != verbs.StatusRemoteAccess {
		t.Errorf("window key with a stale tag: %v", st)
	}
	if st := read(aconns[1], key); st != verbs.StatusRemoteAccess {
		t.Errorf("window used through another QP: %v", st)
	}
	if mw.RKey() != key || !mw.Bound() {
		t.Fatalf("window key %#x bound %v after refused accesses", mw.RKey(), mw.Bound())
	}
}
