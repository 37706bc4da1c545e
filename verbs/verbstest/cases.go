package verbstest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/vsdp/vsdp/verbs"
)

// Cases returns the conformance cases in the order they run.
func Cases() []Case {
	return []Case{
		{"Info", infoPassive, infoActive},
		{"SendRecv", sendRecvPassive, sendRecvActive},
		{"Write", writePassive, writeActive},
		{"Read", readPassive, readActive},
		{"Window", windowPassive, windowActive},
		{"RNRRetry0", rnr0Passive, rnr0Active},
		{"RNRRetry7", rnr7Passive, rnr7Active},
		{"RemoteAccessWrite", accessPassive(verbs.AccessLocalWrite | verbs.AccessRemoteRead), accessActive(verbs.OpWrite, 0, false)},
		{"RemoteAccessRead", accessPassive(verbs.AccessLocalWrite | verbs.AccessRemoteWrite), accessActive(verbs.OpRead, 0, false)},
		{"RemoteBounds", accessPassive(verbs.AccessLocalWrite | verbs.AccessRemoteRead | verbs.AccessRemoteWrite), accessActive(verbs.OpRead, 8, false)},
		{"RemoteBadRKey", accessPassive(verbs.AccessLocalWrite | verbs.AccessRemoteRead | verbs.AccessRemoteWrite), accessActive(verbs.OpWrite, 0, true)},
		{"BadLKey", badLKeyPassive, badLKeyActive},
		{"LocalLength", lengthPassive, lengthActive},
		{"RecvProtection", recvProtPassive, recvProtActive},
		{"QPErrorFlush", idlePassive, flushActive},
		{"CQOverflow", idlePassive, overflowActive},
		{"Disconnect", disconnectPassive, disconnectActive},
		{"Reject", rejectPassive, rejectActive},
		{"NoListener", nothingPassive, noListenerActive},
		{"Unreachable", nothingPassive, unreachableActive},
		{"Timeout", timeoutPassive, timeoutActive},
		{"PrivateDataLimits", limitsPassive, limitsActive},
		{"Notify", notifyPassive, notifyActive},
		{"Ordering", orderingPassive, orderingActive},
	}
}

func nothingPassive(context.Context, *Peer) error { return nil }

// idlePassive accepts one connection with a few receives posted and waits
// for the active side to disconnect.
func idlePassive(ctx context.Context, p *Peer) (err error) {
	ln, e, err := p.serve(verbs.QPOptions{})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, ln, e) }()
	m, err := newMsgBox(e)
	if err != nil {
		return err
	}
	if _, err := accept(ctx, ln, e, verbs.ConnParam{}, func(qp verbs.QP) error { return m.postRecv(qp, 0, 1) }); err != nil {
		return err
	}
	_, err = waitEvent(ctx, e.conn, verbs.EventDisconnected)
	return err
}

// ---- Info: device description and object lifetimes ----

func checkInfo(p *Peer) error {
	info := p.Dev.Info()
	a := info.Attr
	if info.Name == "" || info.Provider == "" {
		return fmt.Errorf("device info without name or provider: %+v", info)
	}
	if a.MaxQPWR < 16 || a.MaxSGE < 2 || a.MaxCQE < 64 || a.MaxMsgSize < 1<<20 || a.MaxQP < 1 || a.MaxMR < 1 {
		return fmt.Errorf("device limits too small for the suite: %+v", a)
	}
	l, err := p.Dev.PrivateDataLimits(p.SID)
	if err != nil {
		return fmt.Errorf("private data limits of %v: %w", p.SID, err)
	}
	if l.Req < 56 || l.Req > verbs.IBReqPrivateData || l.Rep != verbs.IBRepPrivateData || l.Rej < 1 || l.Rej > verbs.IBRejPrivateData {
		return fmt.Errorf("private data limits %+v outside the IB CM sizes", l)
	}
	return nil
}

func infoPassive(_ context.Context, p *Peer) error { return checkInfo(p) }

func infoActive(ctx context.Context, p *Peer) error {
	if err := checkInfo(p); err != nil {
		return err
	}
	d := p.Dev
	busy := func(what string, err error) error {
		if !errors.Is(err, verbs.ErrBusy) {
			return fmt.Errorf("%s: got %v, want ErrBusy", what, err)
		}
		return nil
	}
	pd, err := d.AllocPD()
	if err != nil {
		return err
	}
	buf, err := verbs.AllocDMA(8192)
	if err != nil {
		return errors.Join(err, pd.Close())
	}
	defer buf.Close()
	for _, bad := range []verbs.Access{verbs.AccessRemoteWrite, verbs.AccessRemoteAtomic | verbs.AccessRemoteRead, 1 << 20} {
		if mr, err := pd.RegMR(buf.Bytes(), bad); !errors.Is(err, verbs.ErrInvalid) {
			if mr != nil {
				mr.Close()
			}
			return errors.Join(fmt.Errorf("RegMR with access %v: got %v, want ErrInvalid", bad, err), pd.Close())
		}
	}
	mr, err := pd.RegMR(buf.Bytes(), verbs.AccessLocalWrite|verbs.AccessRemoteRead)
	if err != nil {
		return errors.Join(err, pd.Close())
	}
	if mr.Addr() == 0 || mr.Len() != 8192 || mr.Access() != verbs.AccessLocalWrite|verbs.AccessRemoteRead {
		return fmt.Errorf("MR addr %#x len %d access %v", mr.Addr(), mr.Len(), mr.Access())
	}
	mw, err := pd.AllocMW()
	if err != nil {
		return errors.Join(err, mr.Close(), pd.Close())
	}
	if mw.Bound() {
		return errors.New("a new memory window is bound")
	}
	cq, err := d.CreateCQ(verbs.CQOptions{Entries: 16})
	if err != nil {
		return errors.Join(err, mw.Close(), mr.Close(), pd.Close())
	}
	if cq.Cap() < 16 {
		return fmt.Errorf("CQ capacity %d below the 16 asked for", cq.Cap())
	}
	c, err := d.Resolve(ctx, verbs.ResolveOptions{Addr: p.Remote, ServiceID: p.SID})
	if err != nil {
		return errors.Join(err, cq.Close(), mw.Close(), mr.Close(), pd.Close())
	}
	qp, err := c.CreateQP(pd, verbs.QPOptions{SendCQ: cq, RecvCQ: cq, MaxSendWR: 8, MaxRecvWR: 8})
	if err != nil {
		return errors.Join(err, c.Close(), cq.Close(), mw.Close(), mr.Close(), pd.Close())
	}
	var errs []error
	if s := qp.State(); s != verbs.QPInit {
		errs = append(errs, fmt.Errorf("new QP in state %v, want INIT", s))
	}
	if caps := qp.Caps(); caps.MaxSendWR < 8 || caps.MaxRecvWR < 8 {
		errs = append(errs, fmt.Errorf("QP caps %+v below what was asked", caps))
	}
	var pe *verbs.PostError
	err = qp.PostSend([]verbs.SendWR{{ID: 1, Op: verbs.OpSend}})
	if !errors.As(err, &pe) || pe.Index != 0 || !errors.Is(err, verbs.ErrQPState) {
		errs = append(errs, fmt.Errorf("PostSend in INIT: got %v, want a PostError at 0 with ErrQPState", err))
	}
	if err := qp.PostRecv([]verbs.RecvWR{{ID: 2, SGL: []verbs.SGE{{Addr: mr.Addr(), Length: 64, LKey: mr.LKey()}}}}); err != nil {
		errs = append(errs, fmt.Errorf("PostRecv in INIT: %w", err))
	}
	errs = append(errs,
		busy("PD close with children", pd.Close()),
		busy("CQ close with a QP", cq.Close()),
		busy("conn close with a QP", c.Close()),
		busy("device close with children", d.Close()),
	)
	// Children first, each Close twice (idempotent).
	for _, f := range []func() error{qp.Close, qp.Close, c.Close, c.Close, cq.Close, cq.Close, mw.Close, mw.Close, mr.Close, mr.Close, pd.Close, pd.Close} {
		if err := f(); err != nil {
			errs = append(errs, err)
		}
	}
	if r := d.Resources(); !r.Zero() {
		errs = append(errs, fmt.Errorf("objects left after closing: %v", r))
	}
	return errors.Join(errs...)
}

// ---- SendRecv: SEND, SEND with immediate, inline, solicited, several SGEs ----

var sendSizes = []int{0, 1, 63, 64, 4096, 4097, 65536, 100000}

const (
	recvA   = 1000   // first receive SGE
	recvB   = 100000 // second receive SGE
	recvLen = recvA + recvB
)

func sendRecvPassive(ctx context.Context, p *Peer) (err error) {
	ln, e, err := p.serve(verbs.QPOptions{MaxRecvWR: 16})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, ln, e) }()
	r, err := e.region(len(sendSizes)*recvLen, verbs.AccessLocalWrite)
	if err != nil {
		return err
	}
	m, err := newMsgBox(e)
	if err != nil {
		return err
	}
	post := func(qp verbs.QP) error {
		for i := range sendSizes {
			// Two SGEs, the second first in memory order, to check scatter order.
			base := i * recvLen
			if err := qp.PostRecv([]verbs.RecvWR{{ID: uint64(100 + i), SGL: []verbs.SGE{r.sge(base+recvB, recvA), r.sge(base, recvB)}}}); err != nil {
				return err
			}
		}
		return nil
	}
	if _, err := accept(ctx, ln, e, verbs.ConnParam{}, post); err != nil {
		return err
	}
	got, err := collect(ctx, e.rcq, len(sendSizes))
	if err != nil {
		return err
	}
	all := make([]byte, 0)
	for i, c := range got {
		n := sendSizes[i]
		if c.ID != uint64(100+i) || c.Status != verbs.StatusSuccess || c.Op != verbs.CompRecv || int(c.ByteLen) != n {
			return fmt.Errorf("receive %d: %+v, want id %d, %d bytes", i, c, 100+i, n)
		}
		wantImm := i%3 == 1
		if (c.Flags&verbs.WithImm != 0) != wantImm || (wantImm && c.Imm != uint32(i)*0x01010101) {
			return fmt.Errorf("receive %d: flags %v imm %#x", i, c.Flags, c.Imm)
		}
		base := i * recvLen
		data := append(append([]byte(nil), r.b[base+recvB:base+recvB+recvA]...), r.b[base:base+recvB]...)[:n]
		if err := sameBytes(fmt.Sprintf("message %d", i), data, pattern(uint64(i), n)); err != nil {
			return err
		}
		all = append(all, data...)
	}
	digest := sum(all)
	if err := m.send(ctx, digest[:], 0); err != nil {
		return err
	}
	_, err = waitEvent(ctx, e.conn, verbs.EventDisconnected)
	return err
}

func sendRecvActive(ctx context.Context, p *Peer) (err error) {
	e, err := newEndpoint(p.Dev, verbs.QPOptions{MaxSendWR: 32, MaxInline: 64})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, nil, e) }()
	r, err := e.region(len(sendSizes)*(recvLen+64), verbs.AccessLocalWrite)
	if err != nil {
		return err
	}
	m, err := newMsgBox(e)
	if err != nil {
		return err
	}
	if _, err := p.connect(ctx, e, verbs.ConnParam{RNRRetry: 7}, func(qp verbs.QP) error { return m.postRecv(qp, 0, 1) }, true); err != nil {
		return err
	}
	maxInline := e.qp.Caps().MaxInline
	var wrs []verbs.SendWR
	var want []verbs.Completion
	var all []byte
	var inlined [][]byte
	for i, n := range sendSizes {
		// Place the message at an odd offset, split in up to three SGEs.
		base := i*(recvLen+64) + 13
		data := pattern(uint64(i), n)
		copy(r.b[base:], data)
		all = append(all, data...)
		var sgl []verbs.SGE
		for off, k := 0, (n+2)/3; off < n; off += k {
			sgl = append(sgl, r.sge(base+off, min(k, n-off)))
		}
		wr := verbs.SendWR{ID: uint64(i), Op: verbs.OpSend, SGL: sgl}
		switch i % 3 {
		case 1:
			wr.Op, wr.Imm = verbs.OpSendImm, uint32(i)*0x01010101
		case 2:
			if n <= maxInline {
				wr.Flags |= verbs.SendInline
				inlined = append(inlined, r.b[base:base+n])
			}
			wr.Flags |= verbs.SendSolicited
		}
		if i%2 == 0 || i == len(sendSizes)-1 {
			wr.Flags |= verbs.SendSignaled
			want = append(want, wc(uint64(i), verbs.StatusSuccess, verbs.CompSend))
		}
		wrs = append(wrs, wr)
	}
	if err := e.qp.PostSend(wrs); err != nil {
		return err
	}
	// Inline data was copied at post time: its buffers may be reused at once.
	for _, b := range inlined {
		clear(b)
	}
	if _, err := expectOn(ctx, e.scq, want...); err != nil {
		return err
	}
	if err := quiet(e.scq, 20*time.Millisecond); err != nil {
		return fmt.Errorf("unsignaled sends completed: %w", err)
	}
	reply, err := m.recv(ctx, 0, 1)
	if err != nil {
		return err
	}
	digest := sum(all)
	if !bytes.Equal(reply, digest[:]) {
		return fmt.Errorf("peer's digest of the messages differs")
	}
	return finish(ctx, e)
}

// ---- Write: RDMA WRITE, WRITE with immediate, zero-length WRITE ----

const writeRegion = 256 << 10

func writePassive(ctx context.Context, p *Peer) (err error) {
	ln, e, err := p.serve(verbs.QPOptions{})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, ln, e) }()
	r, err := e.region(writeRegion, verbs.AccessLocalWrite|verbs.AccessRemoteWrite)
	if err != nil {
		return err
	}
	m, err := newMsgBox(e)
	if err != nil {
		return err
	}
	post := func(qp verbs.QP) error {
		return errors.Join(qp.PostRecv([]verbs.RecvWR{{ID: 1}}), m.postRecv(qp, 0, 2))
	}
	if _, err := acceptWith(ctx, ln, e, describe(r, 0, writeRegion).bytes(), post); err != nil {
		return err
	}
	got, err := expectOn(ctx, e.rcq, wc(1, verbs.StatusSuccess, verbs.CompRecvWriteImm), wc(2, verbs.StatusSuccess, verbs.CompRecv))
	if err != nil {
		return err
	}
	if got[0].Flags&verbs.WithImm == 0 || got[0].Imm != 0xfeedbeef || got[0].ByteLen != 4096 {
		return fmt.Errorf("WRITE with immediate completion %+v", got[0])
	}
	want := make([]byte, writeRegion)
	copy(want, pattern(1, 100000))
	copy(want[150000:], pattern(2, 4096))
	if err := sameBytes("written region", r.b, want); err != nil {
		return err
	}
	_, err = waitEvent(ctx, e.conn, verbs.EventDisconnected)
	return err
}

// acceptWith accepts with private data.
func acceptWith(ctx context.Context, ln verbs.Listener, e *endpoint, priv []byte, prepare func(verbs.QP) error) ([]byte, error) {
	return accept(ctx, ln, e, verbs.ConnParam{PrivateData: priv}, prepare)
}

func writeActive(ctx context.Context, p *Peer) (err error) {
	e, err := newEndpoint(p.Dev, verbs.QPOptions{})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, nil, e) }()
	r, err := e.region(110000, verbs.AccessLocalWrite)
	if err != nil {
		return err
	}
	m, err := newMsgBox(e)
	if err != nil {
		return err
	}
	rd, err := p.connectDesc(ctx, e, verbs.ConnParam{}, nil)
	if err != nil {
		return err
	}
	copy(r.b, pattern(1, 100000))
	copy(r.b[100000:], pattern(2, 4096))
	copy(m.r.b[8*msgSize:], "done")
	wrs := []verbs.SendWR{
		{ID: 1, Op: verbs.OpWrite, Flags: verbs.SendSignaled, SGL: []verbs.SGE{r.sge(0, 30000), r.sge(30000, 1), r.sge(30001, 69999)}, RemoteAddr: rd.Addr, RKey: rd.RKey},
		{ID: 2, Op: verbs.OpWriteImm, Flags: verbs.SendSignaled, SGL: []verbs.SGE{r.sge(100000, 4096)}, RemoteAddr: rd.Addr + 150000, RKey: rd.RKey, Imm: 0xfeedbeef},
		// Zero-length RDMA WRITE: no rkey is checked (IBA C9-88).
		{ID: 3, Op: verbs.OpWrite, Flags: verbs.SendSignaled},
		{ID: 4, Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{m.r.sge(8*msgSize, 4)}},
	}
	if err := postExpect(ctx, e, wrs, wc(1, verbs.StatusSuccess, verbs.CompWrite), wc(2, verbs.StatusSuccess, verbs.CompWrite),
		wc(3, verbs.StatusSuccess, verbs.CompWrite), wc(4, verbs.StatusSuccess, verbs.CompSend)); err != nil {
		return err
	}
	return finish(ctx, e)
}

// ---- Read: RDMA READ, zero-length READ ----

func readPassive(ctx context.Context, p *Peer) (err error) {
	ln, e, err := p.serve(verbs.QPOptions{})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, ln, e) }()
	r, err := e.region(writeRegion, verbs.AccessLocalWrite|verbs.AccessRemoteRead)
	if err != nil {
		return err
	}
	src := pattern(3, writeRegion)
	copy(r.b, src)
	m, err := newMsgBox(e)
	if err != nil {
		return err
	}
	if _, err := acceptWith(ctx, ln, e, describe(r, 0, writeRegion).bytes(), func(qp verbs.QP) error { return m.postRecv(qp, 0, 1) }); err != nil {
		return err
	}
	if _, err := m.recv(ctx, 0, 1); err != nil {
		return err
	}
	if err := sameBytes("region read by the peer", r.b, src); err != nil {
		return err
	}
	_, err = waitEvent(ctx, e.conn, verbs.EventDisconnected)
	return err
}

func readActive(ctx context.Context, p *Peer) (err error) {
	e, err := newEndpoint(p.Dev, verbs.QPOptions{})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, nil, e) }()
	r, err := e.region(110000, verbs.AccessLocalWrite)
	if err != nil {
		return err
	}
	m, err := newMsgBox(e)
	if err != nil {
		return err
	}
	rd, err := p.connectDesc(ctx, e, verbs.ConnParam{}, nil)
	if err != nil {
		return err
	}
	wrs := []verbs.SendWR{
		{ID: 1, Op: verbs.OpRead, Flags: verbs.SendSignaled, SGL: []verbs.SGE{r.sge(50000, 50000), r.sge(0, 50000)}, RemoteAddr: rd.Addr + 1000, RKey: rd.RKey},
		{ID: 2, Op: verbs.OpRead, Flags: verbs.SendSignaled},
		{ID: 3, Op: verbs.OpRead, Flags: verbs.SendSignaled, SGL: []verbs.SGE{r.sge(100000, 4096)}, RemoteAddr: rd.Addr + uint64(rd.Len) - 4096, RKey: rd.RKey},
	}
	if err := postExpect(ctx, e, wrs, wc(1, verbs.StatusSuccess, verbs.CompRead), wc(2, verbs.StatusSuccess, verbs.CompRead), wc(3, verbs.StatusSuccess, verbs.CompRead)); err != nil {
		return err
	}
	src := pattern(3, writeRegion)
	first := append(append([]byte(nil), r.b[50000:100000]...), r.b[:50000]...)
	if err := errors.Join(sameBytes("READ across two SGEs", first, src[1000:101000]),
		sameBytes("READ of the region's end", r.b[100000:104096], src[writeRegion-4096:])); err != nil {
		return err
	}
	if err := m.send(ctx, []byte("done"), 0); err != nil {
		return err
	}
	return finish(ctx, e)
}

// ---- Window: type-2 memory windows ----

const (
	winRegion = 64 << 10
	winOff    = 4096
	winLen    = 8192
)

// windowPassive serves three connections over one region (local write and
// MW_BIND only: no remote rights of its own) and one window, rebound with a
// new key each time: (1) the peer reads and writes inside the window, then
// invalidates it with SEND_WITH_INV and finds it gone; (2) the peer reaches
// past the window's end; (3) this side invalidates it locally and the peer
// finds it gone.
func windowPassive(ctx context.Context, p *Peer) (err error) {
	ln, owner, err := p.serve(verbs.QPOptions{})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, ln, owner) }()
	r, err := owner.region(winRegion, verbs.AccessLocalWrite|verbs.AccessMWBind)
	if err != nil {
		return err
	}
	want := pattern(4, winRegion)
	copy(r.b, want)
	// Rounds 1 and 3 rebind one window with a new key each time; round 2
	// leaves its own window bound, to be deallocated while bound.
	w1, err := owner.mw()
	if err != nil {
		return err
	}
	w2, err := owner.mw()
	if err != nil {
		return err
	}
	// The MR and MWs belong to owner's PD; each connection's QP uses it too.
	for round := 1; round <= 3; round++ {
		w := w1
		if round == 2 {
			w = w2
		}
		if err := windowRound(ctx, ln, owner, r, w, round); err != nil {
			return fmt.Errorf("round %d: %w", round, err)
		}
		if round == 1 {
			copy(want[winOff:], pattern(5, 100))
		}
		if err := sameBytes("region behind the window", r.b, want); err != nil {
			return fmt.Errorf("round %d: %w", round, err)
		}
	}
	return nil
}

func windowRound(ctx context.Context, ln verbs.Listener, owner *endpoint, r *region, w verbs.MW, round int) (err error) {
	e := &endpoint{dev: owner.dev, pd: owner.pd}
	if e.scq, err = owner.dev.CreateCQ(verbs.CQOptions{Entries: 64}); err != nil {
		return err
	}
	if e.rcq, err = owner.dev.CreateCQ(verbs.CQOptions{Entries: 64}); err != nil {
		return closeAll(err, nil, &endpoint{scq: e.scq})
	}
	e.qpo = verbs.QPOptions{SendCQ: e.scq, RecvCQ: e.rcq}
	// e borrows owner's PD: close only its own objects.
	defer func() {
		pd := e.pd
		e.pd = nil
		err = closeAll(err, nil, e)
		e.pd = pd
	}()
	m, err := newMsgBox(e)
	if err != nil {
		return err
	}
	if _, err := accept(ctx, ln, e, verbs.ConnParam{}, func(qp verbs.QP) error {
		return m.postRecvs(qp, 2)
	}); err != nil {
		return err
	}
	key := verbs.IncRKey(w.RKey())
	bind := verbs.SendWR{ID: 10, Op: verbs.OpBindMW, Flags: verbs.SendSignaled, Bind: verbs.Bind{
		MW: w, RKey: key, MR: r.mr, Addr: r.mr.Addr() + winOff, Length: winLen, Access: verbs.AccessRemoteRead | verbs.AccessRemoteWrite,
	}}
	if err := postExpect(ctx, e, []verbs.SendWR{bind}, wc(10, verbs.StatusSuccess, verbs.CompBindMW)); err != nil {
		return err
	}
	if !w.Bound() || w.RKey() != key {
		return fmt.Errorf("window after bind: bound %v key %#x, want %#x", w.Bound(), w.RKey(), key)
	}
	if err := m.send(ctx, desc{Addr: r.mr.Addr() + winOff, Len: winLen, RKey: key}.bytes(), 0); err != nil {
		return err
	}
	switch round {
	case 1:
		got, err := expectOn(ctx, e.rcq, wc(1, verbs.StatusSuccess, verbs.CompRecv))
		if err != nil {
			return err
		}
		if got[0].Flags&verbs.WithInv == 0 || got[0].InvalidatedRKey != key {
			return fmt.Errorf("SEND_WITH_INV completion %+v, want WITH_INV of %#x", got[0], key)
		}
		if w.Bound() {
			return errors.New("window still bound after the peer invalidated it")
		}
	case 3:
		if _, err := m.recv(ctx, 0, 1); err != nil {
			return err
		}
		if err := postExpect(ctx, e, []verbs.SendWR{{ID: 11, Op: verbs.OpLocalInv, Flags: verbs.SendSignaled, InvRKey: key}}, wc(11, verbs.StatusSuccess, verbs.CompLocalInv)); err != nil {
			return err
		}
		if w.Bound() {
			return errors.New("window still bound after LOCAL_INV")
		}
		if err := m.send(ctx, []byte("invalidated"), 0); err != nil {
			return err
		}
	}
	// The peer's next access is refused: error state, access event, the
	// remaining receive flushed.
	evs, err := waitEvent(ctx, e.conn, verbs.EventQPAccessError)
	if err != nil {
		return err
	}
	if hasEvent(evs, verbs.EventDisconnected) {
		return errors.New("disconnected before the access error")
	}
	if err := wantError(e.qp, "a refused access"); err != nil {
		return err
	}
	flushed := []verbs.Completion{wc(2, verbs.StatusFlushed, 0)}
	if round != 1 && round != 3 {
		flushed = append([]verbs.Completion{wc(1, verbs.StatusFlushed, 0)}, flushed...)
	}
	if _, err := expectOn(ctx, e.rcq, flushed...); err != nil {
		return err
	}
	if round == 2 && !w.Bound() {
		return errors.New("a refused access unbound the window")
	}
	_, err = waitEvent(ctx, e.conn, verbs.EventDisconnected)
	return err
}

func windowActive(ctx context.Context, p *Peer) error {
	return rounds(3, func(round int) error { return windowActiveRound(ctx, p, round) })
}

func windowActiveRound(ctx context.Context, p *Peer, round int) (err error) {
	e, err := newEndpoint(p.Dev, verbs.QPOptions{})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, nil, e) }()
	r, err := e.region(winLen+16, verbs.AccessLocalWrite)
	if err != nil {
		return err
	}
	m, err := newMsgBox(e)
	if err != nil {
		return err
	}
	if _, err := p.connect(ctx, e, verbs.ConnParam{}, func(qp verbs.QP) error { return m.postRecv(qp, 0, 1) }, true); err != nil {
		return err
	}
	b, err := m.recv(ctx, 0, 1)
	if err != nil {
		return err
	}
	win, err := parseDesc(b)
	if err != nil {
		return err
	}
	src := pattern(4, winRegion)
	read := func(id uint64, addr uint64, n int) error {
		return e.qp.PostSend([]verbs.SendWR{{ID: id, Op: verbs.OpRead, Flags: verbs.SendSignaled, SGL: []verbs.SGE{r.sge(0, n)}, RemoteAddr: addr, RKey: win.RKey}})
	}
	refused := func(id uint64) error {
		if _, err := expectOn(ctx, e.scq, wc(id, verbs.StatusRemoteAccess, 0)); err != nil {
			return err
		}
		return finish(ctx, e)
	}
	switch round {
	case 1:
		if err := read(1, win.Addr, winLen); err != nil {
			return err
		}
		got, err := collect(ctx, e.scq, 1)
		if err != nil {
			return err
		}
		if err := errors.Join(expect(got, wc(1, verbs.StatusSuccess, verbs.CompRead)), sameBytes("READ through the window", r.b[:winLen], src[winOff:winOff+winLen])); err != nil {
			return err
		}
		copy(r.b, pattern(5, 100))
		wrs := []verbs.SendWR{
			{ID: 2, Op: verbs.OpWrite, Flags: verbs.SendSignaled, SGL: []verbs.SGE{r.sge(0, 100)}, RemoteAddr: win.Addr, RKey: win.RKey},
			{ID: 3, Op: verbs.OpSendInv, Flags: verbs.SendSignaled, InvRKey: win.RKey},
		}
		if err := postExpect(ctx, e, wrs, wc(2, verbs.StatusSuccess, verbs.CompWrite), wc(3, verbs.StatusSuccess, verbs.CompSend)); err != nil {
			return err
		}
		if err := read(4, win.Addr, 16); err != nil {
			return err
		}
		return refused(4)
	case 2:
		// Inside the region, crossing the window's end.
		if err := read(1, win.Addr+uint64(win.Len)-8, 16); err != nil {
			return err
		}
		return refused(1)
	default:
		if err := read(1, win.Addr, 8); err != nil {
			return err
		}
		if _, err := expectOn(ctx, e.scq, wc(1, verbs.StatusSuccess, verbs.CompRead)); err != nil {
			return err
		}
		if err := m.postRecv(e.qp, 1, 2); err != nil {
			return err
		}
		if err := m.send(ctx, []byte("go"), 0); err != nil {
			return err
		}
		if _, err := m.recv(ctx, 1, 2); err != nil {
			return err
		}
		if err := read(3, win.Addr, 8); err != nil {
			return err
		}
		return refused(3)
	}
}

// ---- RNR ----

// rnr0Passive accepts without posting receives: the peer's SEND meets an
// RNR NAK, and nothing happens on this side.
func rnr0Passive(ctx context.Context, p *Peer) (err error) {
	ln, e, err := p.serve(verbs.QPOptions{})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, ln, e) }()
	if _, err := accept(ctx, ln, e, verbs.ConnParam{}, nil); err != nil {
		return err
	}
	evs, err := waitEvent(ctx, e.conn, verbs.EventDisconnected)
	if err != nil {
		return err
	}
	for _, ev := range evs {
		if ev.Type != verbs.EventEstablished {
			return fmt.Errorf("responder saw %v for an RNR", ev)
		}
	}
	return quiet(e.rcq, 20*time.Millisecond)
}

func rnr0Active(ctx context.Context, p *Peer) (err error) {
	e, err := newEndpoint(p.Dev, verbs.QPOptions{})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, nil, e) }()
	r, err := e.region(64, verbs.AccessLocalWrite)
	if err != nil {
		return err
	}
	if _, err := p.connect(ctx, e, verbs.ConnParam{RNRRetry: 0}, nil, true); err != nil {
		return err
	}
	wrs := []verbs.SendWR{
		{ID: 1, Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{r.sge(0, 64)}},
		{ID: 2, Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{r.sge(0, 64)}},
	}
	if err := postExpect(ctx, e, wrs, wc(1, verbs.StatusRNRRetryExceeded, 0), wc(2, verbs.StatusFlushed, 0)); err != nil {
		return err
	}
	if err := wantError(e.qp, "RNR_RETRY_EXC_ERR"); err != nil {
		return err
	}
	return finish(ctx, e)
}

// rnr7Passive posts its receive only after a while: with RNR retry 7 the
// peer keeps retrying and its SEND lands.
func rnr7Passive(ctx context.Context, p *Peer) (err error) {
	ln, e, err := p.serve(verbs.QPOptions{})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, ln, e) }()
	m, err := newMsgBox(e)
	if err != nil {
		return err
	}
	if _, err := accept(ctx, ln, e, verbs.ConnParam{}, nil); err != nil {
		return err
	}
	select {
	case <-time.After(300 * time.Millisecond):
	case <-ctx.Done():
		return ctx.Err()
	}
	if err := m.postRecv(e.qp, 0, 1); err != nil {
		return err
	}
	b, err := m.recv(ctx, 0, 1)
	if err != nil {
		return err
	}
	if err := sameBytes("message after RNR retries", b, pattern(7, 200)); err != nil {
		return err
	}
	_, err = waitEvent(ctx, e.conn, verbs.EventDisconnected)
	return err
}

func rnr7Active(ctx context.Context, p *Peer) (err error) {
	e, err := newEndpoint(p.Dev, verbs.QPOptions{})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, nil, e) }()
	m, err := newMsgBox(e)
	if err != nil {
		return err
	}
	if _, err := p.connect(ctx, e, verbs.ConnParam{RNRRetry: 7}, nil, true); err != nil {
		return err
	}
	if err := m.send(ctx, pattern(7, 200), 0); err != nil {
		return err
	}
	return finish(ctx, e)
}

// ---- remote access violations ----

const accessRegion = 4096

// accessPassive exposes a region with the given rights; the peer's access
// is refused, and this side must end in the error state with the access
// event, its receives flushed, its memory unchanged and no completion for
// the refused request.
func accessPassive(access verbs.Access) func(context.Context, *Peer) error {
	return func(ctx context.Context, p *Peer) (err error) {
		ln, e, err := p.serve(verbs.QPOptions{})
		if err != nil {
			return err
		}
		defer func() { err = closeAll(err, ln, e) }()
		r, err := e.region(accessRegion, access)
		if err != nil {
			return err
		}
		src := pattern(9, accessRegion)
		copy(r.b, src)
		m, err := newMsgBox(e)
		if err != nil {
			return err
		}
		post := func(qp verbs.QP) error { return m.postRecvs(qp, 2) }
		if _, err := acceptWith(ctx, ln, e, describe(r, 0, accessRegion).bytes(), post); err != nil {
			return err
		}
		evs, err := waitEvent(ctx, e.conn, verbs.EventQPAccessError)
		if err != nil {
			return err
		}
		if hasEvent(evs, verbs.EventDisconnected) {
			return errors.New("disconnected before the access error event")
		}
		if err := wantError(e.qp, "refusing an access"); err != nil {
			return err
		}
		if _, err := expectOn(ctx, e.rcq, wc(1, verbs.StatusFlushed, 0), wc(2, verbs.StatusFlushed, 0)); err != nil {
			return err
		}
		if err := sameBytes("region after a refused access", r.b, src); err != nil {
			return err
		}
		if _, err := waitEvent(ctx, e.conn, verbs.EventDisconnected); err != nil {
			return err
		}
		return quiet(e.scq, 10*time.Millisecond)
	}
}

// accessActive makes one refused access: op at offset past from the region's
// end (0: at its start), with a corrupted rkey if badKey. The request fails
// with REM_ACCESS_ERR, the next one flushes.
func accessActive(op verbs.Opcode, past int, badKey bool) func(context.Context, *Peer) error {
	return func(ctx context.Context, p *Peer) (err error) {
		e, err := newEndpoint(p.Dev, verbs.QPOptions{})
		if err != nil {
			return err
		}
		defer func() { err = closeAll(err, nil, e) }()
		r, err := e.region(64, verbs.AccessLocalWrite)
		if err != nil {
			return err
		}
		rd, err := p.connectDesc(ctx, e, verbs.ConnParam{}, nil)
		if err != nil {
			return err
		}
		addr, key := rd.Addr, rd.RKey
		if past > 0 {
			addr = rd.Addr + uint64(rd.Len) - uint64(past)
		}
		if badKey {
			key ^= 0x5a5a5a00
		}
		wrs := []verbs.SendWR{
			{ID: 1, Op: op, Flags: verbs.SendSignaled, SGL: []verbs.SGE{r.sge(0, 16)}, RemoteAddr: addr, RKey: key},
			{ID: 2, Op: verbs.OpWrite, Flags: verbs.SendSignaled},
		}
		if err := postExpect(ctx, e, wrs, wc(1, verbs.StatusRemoteAccess, 0), wc(2, verbs.StatusFlushed, 0)); err != nil {
			return err
		}
		if err := wantError(e.qp, "REM_ACCESS_ERR"); err != nil {
			return err
		}
		return finish(ctx, e)
	}
}

// ---- local errors ----

// badLKeyPassive serves two connections: (1) the peer sends with a bad
// lkey; (2) the peer reads from a region exposed here into its own region
// that lacks local write. Both fail at the peer; nothing reaches this side.
func badLKeyPassive(ctx context.Context, p *Peer) (err error) {
	ln, err := p.listen()
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, ln) }()
	return rounds(2, func(int) error { return badLKeyRound(ctx, ln, p) })
}

func badLKeyRound(ctx context.Context, ln verbs.Listener, p *Peer) (err error) {
	e, err := newEndpoint(p.Dev, verbs.QPOptions{})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, nil, e) }()
	r, err := e.region(4096, verbs.AccessRemoteRead)
	if err != nil {
		return err
	}
	m, err := newMsgBox(e)
	if err != nil {
		return err
	}
	if _, err := acceptWith(ctx, ln, e, describe(r, 0, 4096).bytes(), func(qp verbs.QP) error {
		return m.postRecvs(qp, 2)
	}); err != nil {
		return err
	}
	if _, err := waitEvent(ctx, e.conn, verbs.EventDisconnected); err != nil {
		return err
	}
	// Nothing arrived: both receives flush at the disconnect.
	_, err = expectOn(ctx, e.rcq, wc(1, verbs.StatusFlushed, 0), wc(2, verbs.StatusFlushed, 0))
	return err
}

func badLKeyActive(ctx context.Context, p *Peer) error {
	return rounds(2, func(round int) error { return badLKeyActiveRound(ctx, p, round) })
}

func badLKeyActiveRound(ctx context.Context, p *Peer, round int) (err error) {
	e, err := newEndpoint(p.Dev, verbs.QPOptions{})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, nil, e) }()
	r, err := e.region(4096, verbs.AccessLocalWrite)
	if err != nil {
		return err
	}
	ro, err := e.region(4096, 0) // local read only
	if err != nil {
		return err
	}
	rd, err := p.connectDesc(ctx, e, verbs.ConnParam{}, nil)
	if err != nil {
		return err
	}
	var first verbs.SendWR
	if round == 1 {
		bad := r.sge(0, 64)
		bad.LKey ^= 0x5a5a5a00
		first = verbs.SendWR{ID: 1, Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{bad}}
	} else {
		first = verbs.SendWR{ID: 1, Op: verbs.OpRead, Flags: verbs.SendSignaled, SGL: []verbs.SGE{ro.sge(0, 64)}, RemoteAddr: rd.Addr, RKey: rd.RKey}
	}
	wrs := []verbs.SendWR{
		first,
		{ID: 2, Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{r.sge(4090, 64)}}, // crosses the region's end
		{ID: 3, Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{r.sge(0, 64)}},
	}
	if err := postExpect(ctx, e, wrs, wc(1, verbs.StatusLocalProtection, 0), wc(2, verbs.StatusFlushed, 0), wc(3, verbs.StatusFlushed, 0)); err != nil {
		return err
	}
	if err := wantError(e.qp, "LOC_PROT_ERR"); err != nil {
		return err
	}
	return finish(ctx, e)
}

// recvProtPassive posts a receive into a region without local write: the
// peer's SEND fails here with LOC_PROT_ERR and there with REM_OP_ERR.
func recvProtPassive(ctx context.Context, p *Peer) (err error) {
	ln, e, err := p.serve(verbs.QPOptions{})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, ln, e) }()
	ro, err := e.region(64, 0)
	if err != nil {
		return err
	}
	if _, err := accept(ctx, ln, e, verbs.ConnParam{}, func(qp verbs.QP) error {
		return qp.PostRecv([]verbs.RecvWR{{ID: 1, SGL: []verbs.SGE{ro.sge(0, 64)}}, {ID: 2, SGL: []verbs.SGE{ro.sge(0, 64)}}})
	}); err != nil {
		return err
	}
	if _, err := expectOn(ctx, e.rcq, wc(1, verbs.StatusLocalProtection, 0), wc(2, verbs.StatusFlushed, 0)); err != nil {
		return err
	}
	for _, b := range ro.b {
		if b != 0 {
			return errors.New("data written into a region without local write")
		}
	}
	if err := wantError(e.qp, "LOC_PROT_ERR"); err != nil {
		return err
	}
	_, err = waitEvent(ctx, e.conn, verbs.EventDisconnected)
	return err
}

func recvProtActive(ctx context.Context, p *Peer) (err error) {
	e, err := newEndpoint(p.Dev, verbs.QPOptions{})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, nil, e) }()
	m, err := newMsgBox(e)
	if err != nil {
		return err
	}
	if _, err := p.connect(ctx, e, verbs.ConnParam{}, nil, true); err != nil {
		return err
	}
	copy(m.r.b[8*msgSize:], pattern(13, 16))
	if err := postExpect(ctx, e, []verbs.SendWR{{ID: 1, Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{m.r.sge(8*msgSize, 16)}}}, wc(1, verbs.StatusRemoteOp, 0)); err != nil {
		return err
	}
	return finish(ctx, e)
}

func lengthPassive(ctx context.Context, p *Peer) (err error) {
	ln, e, err := p.serve(verbs.QPOptions{})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, ln, e) }()
	r, err := e.region(64, verbs.AccessLocalWrite)
	if err != nil {
		return err
	}
	if _, err := accept(ctx, ln, e, verbs.ConnParam{}, func(qp verbs.QP) error {
		return qp.PostRecv([]verbs.RecvWR{{ID: 1, SGL: []verbs.SGE{r.sge(0, 16)}}, {ID: 2, SGL: []verbs.SGE{r.sge(16, 16)}}})
	}); err != nil {
		return err
	}
	if _, err := expectOn(ctx, e.rcq, wc(1, verbs.StatusLocalLength, 0), wc(2, verbs.StatusFlushed, 0)); err != nil {
		return err
	}
	if err := wantError(e.qp, "LOC_LEN_ERR"); err != nil {
		return err
	}
	_, err = waitEvent(ctx, e.conn, verbs.EventDisconnected)
	return err
}

func lengthActive(ctx context.Context, p *Peer) (err error) {
	e, err := newEndpoint(p.Dev, verbs.QPOptions{})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, nil, e) }()
	r, err := e.region(64, verbs.AccessLocalWrite)
	if err != nil {
		return err
	}
	if _, err := p.connect(ctx, e, verbs.ConnParam{}, nil, true); err != nil {
		return err
	}
	if err := postExpect(ctx, e, []verbs.SendWR{{ID: 1, Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{r.sge(0, 64)}}}, wc(1, verbs.StatusRemoteInvalidReq, 0)); err != nil {
		return err
	}
	return finish(ctx, e)
}

// ---- QP state machine: queue full, error, flush, reset ----

func flushActive(ctx context.Context, p *Peer) (err error) {
	e, err := newEndpoint(p.Dev, verbs.QPOptions{MaxSendWR: 16, MaxRecvWR: 16})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, nil, e) }()
	r, err := e.region(4096, verbs.AccessLocalWrite)
	if err != nil {
		return err
	}
	if _, err := p.connect(ctx, e, verbs.ConnParam{}, nil, true); err != nil {
		return err
	}
	qp := e.qp
	if s := qp.State(); s != verbs.QPRTS {
		return fmt.Errorf("connected QP in %v, want RTS", s)
	}
	// One more zero-length WRITE than the send queue holds: the post
	// fails at the first request that does not fit.
	depth := qp.Caps().MaxSendWR
	wrs := make([]verbs.SendWR, depth+1)
	for i := range wrs {
		wrs[i] = verbs.SendWR{ID: uint64(100 + i), Op: verbs.OpWrite}
	}
	wrs[depth-1].Flags = verbs.SendSignaled
	err = qp.PostSend(wrs)
	var pe *verbs.PostError
	if !errors.As(err, &pe) || pe.Index != depth || !errors.Is(err, verbs.ErrQueueFull) {
		return fmt.Errorf("posting %d requests on a queue of %d: got %v, want a PostError at %d with ErrQueueFull", depth+1, depth, err, depth)
	}
	if _, err := expectOn(ctx, e.scq, wc(uint64(100+depth-1), verbs.StatusSuccess, verbs.CompWrite)); err != nil {
		return err
	}
	// Error state: posted receives flush in order, new work flushes.
	for i := 0; i < 3; i++ {
		if err := qp.PostRecv([]verbs.RecvWR{{ID: uint64(10 + i), SGL: []verbs.SGE{r.sge(i*64, 64)}}}); err != nil {
			return err
		}
	}
	if err := qp.Modify(verbs.QPError); err != nil {
		return fmt.Errorf("modify to ERR: %w", err)
	}
	if s := qp.State(); s != verbs.QPError {
		return fmt.Errorf("QP in %v after modify to ERR", s)
	}
	if _, err := expectOn(ctx, e.rcq, wc(10, verbs.StatusFlushed, 0), wc(11, verbs.StatusFlushed, 0), wc(12, verbs.StatusFlushed, 0)); err != nil {
		return err
	}
	if err := qp.PostSend([]verbs.SendWR{{ID: 20, Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{r.sge(0, 8)}}}); err != nil {
		return fmt.Errorf("post send in ERR: %w", err)
	}
	if err := qp.PostRecv([]verbs.RecvWR{{ID: 21, SGL: []verbs.SGE{r.sge(0, 8)}}}); err != nil {
		return fmt.Errorf("post receive in ERR: %w", err)
	}
	for _, c := range []struct {
		cq verbs.CQ
		id uint64
	}{{e.scq, 20}, {e.rcq, 21}} {
		if _, err := expectOn(ctx, c.cq, wc(c.id, verbs.StatusFlushed, 0)); err != nil {
			return err
		}
	}
	if err := qp.Modify(verbs.QPRTS); !errors.Is(err, verbs.ErrQPState) {
		return fmt.Errorf("modify ERR -> RTS: got %v, want ErrQPState", err)
	}
	if err := qp.Modify(verbs.QPReset); err != nil {
		return fmt.Errorf("modify to RESET: %w", err)
	}
	if s := qp.State(); s != verbs.QPReset {
		return fmt.Errorf("QP in %v after modify to RESET", s)
	}
	if err := qp.PostSend([]verbs.SendWR{{ID: 30, Op: verbs.OpWrite}}); !errors.Is(err, verbs.ErrQPState) {
		return fmt.Errorf("post send in RESET: got %v, want ErrQPState", err)
	}
	if err := qp.PostRecv([]verbs.RecvWR{{ID: 31}}); !errors.Is(err, verbs.ErrQPState) {
		return fmt.Errorf("post receive in RESET: got %v, want ErrQPState", err)
	}
	if err := quiet(e.scq, 10*time.Millisecond); err != nil {
		return fmt.Errorf("RESET generated completions: %w", err)
	}
	return finish(ctx, e)
}

// ---- CQ overflow ----

func overflowActive(ctx context.Context, p *Peer) (err error) {
	e, err := newEndpoint(p.Dev, verbs.QPOptions{})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, nil, e) }()
	small, err := p.Dev.CreateCQ(verbs.CQOptions{Entries: 4})
	if err != nil {
		return err
	}
	c := small.Cap()
	if c+8 > p.Dev.Info().Attr.MaxQPWR {
		return errors.Join(fmt.Errorf("CQ of %d entries is too large for the test", c), small.Close())
	}
	old := e.scq
	e.scq = small
	e.qpo.SendCQ = small
	e.qpo.MaxSendWR = c + 8
	defer func() { err = errors.Join(err, old.Close()) }()
	if _, err := p.connect(ctx, e, verbs.ConnParam{}, nil, true); err != nil {
		return err
	}
	wrs := make([]verbs.SendWR, c+4)
	for i := range wrs {
		wrs[i] = verbs.SendWR{ID: uint64(i), Op: verbs.OpWrite, Flags: verbs.SendSignaled}
	}
	if err := e.qp.PostSend(wrs); err != nil {
		return err
	}
	// Do not poll until the writes had time to complete.
	select {
	case <-time.After(500 * time.Millisecond):
	case <-ctx.Done():
		return ctx.Err()
	}
	buf := make([]verbs.Completion, 1)
	for polled := 0; ; polled++ {
		n, err := small.Poll(buf)
		if errors.Is(err, verbs.ErrCQOverflow) {
			break
		}
		if err != nil {
			return err
		}
		if n == 0 || polled > c+4 {
			return fmt.Errorf("CQ of %d entries took %d completions without reporting an overflow", c, polled)
		}
	}
	return finish(ctx, e)
}

// ---- disconnect ----

// disconnectPassive: (1) the active side disconnects; (2) this side does.
func disconnectPassive(ctx context.Context, p *Peer) (err error) {
	ln, err := p.listen()
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, ln) }()
	return rounds(2, func(round int) error { return disconnectRound(ctx, ln, p, round == 2) })
}

func disconnectRound(ctx context.Context, ln verbs.Listener, p *Peer, initiate bool) (err error) {
	e, err := newEndpoint(p.Dev, verbs.QPOptions{})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, nil, e) }()
	m, err := newMsgBox(e)
	if err != nil {
		return err
	}
	if _, err := accept(ctx, ln, e, verbs.ConnParam{}, func(qp verbs.QP) error {
		return m.postRecvs(qp, 3)
	}); err != nil {
		return err
	}
	if initiate {
		if err := e.conn.Disconnect(); err != nil {
			return err
		}
	}
	return checkDisconnected(ctx, e, 3)
}

// checkDisconnected waits for EventDisconnected and checks its effects: the
// QP is in the error state, its n receives flushed, new sends flush.
func checkDisconnected(ctx context.Context, e *endpoint, n int) error {
	evs, err := waitEvent(ctx, e.conn, verbs.EventDisconnected)
	if err != nil {
		return err
	}
	for _, ev := range evs {
		if ev.Type != verbs.EventEstablished {
			return fmt.Errorf("unexpected event %v", ev)
		}
	}
	if err := wantError(e.qp, "the disconnect"); err != nil {
		return err
	}
	want := make([]verbs.Completion, n)
	for i := range want {
		want[i] = wc(uint64(i+1), verbs.StatusFlushed, 0)
	}
	if _, err := expectOn(ctx, e.rcq, want...); err != nil {
		return err
	}
	return postExpect(ctx, e, []verbs.SendWR{{ID: 9, Op: verbs.OpWrite, Flags: verbs.SendSignaled}}, wc(9, verbs.StatusFlushed, 0))
}

func disconnectActive(ctx context.Context, p *Peer) error {
	return rounds(2, func(round int) error { return disconnectActiveRound(ctx, p, round == 1) })
}

func disconnectActiveRound(ctx context.Context, p *Peer, initiate bool) (err error) {
	e, err := newEndpoint(p.Dev, verbs.QPOptions{})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, nil, e) }()
	m, err := newMsgBox(e)
	if err != nil {
		return err
	}
	if _, err := p.connect(ctx, e, verbs.ConnParam{}, func(qp verbs.QP) error {
		return m.postRecvs(qp, 3)
	}, true); err != nil {
		return err
	}
	if initiate {
		if err := e.conn.Disconnect(); err != nil {
			return err
		}
		if err := e.conn.Disconnect(); err != nil {
			return fmt.Errorf("second Disconnect: %w", err)
		}
	}
	return checkDisconnected(ctx, e, 3)
}

// ---- connection refusals ----

var (
	rejectReq = []byte("please")
	rejectRej = []byte("no thanks")
)

func rejectPassive(ctx context.Context, p *Peer) (err error) {
	ln, err := p.listen()
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, ln) }()
	c, err := ln.Accept(ctx)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, c.Close()) }()
	l, err := p.Dev.PrivateDataLimits(p.SID)
	if err != nil {
		return err
	}
	if err := privateData("REQ", c.PrivateData(), rejectReq, l.Req); err != nil {
		return err
	}
	if err := c.Reject(rejectRej); err != nil {
		return err
	}
	return nil
}

func rejectActive(ctx context.Context, p *Peer) (err error) {
	e, err := newEndpoint(p.Dev, verbs.QPOptions{})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, nil, e) }()
	_, err = p.connect(ctx, e, verbs.ConnParam{PrivateData: rejectReq}, nil, true)
	return checkReject(p, err, verbs.RejectConsumer, rejectRej)
}

func checkReject(p *Peer, err error, reason verbs.RejectReason, priv []byte) error {
	var rj *verbs.RejectError
	if !errors.Is(err, verbs.ErrRefused) || !errors.As(err, &rj) {
		return fmt.Errorf("connect: got %v, want a RejectError (ErrRefused)", err)
	}
	if rj.Reason != reason {
		return fmt.Errorf("reject reason %v, want %v", rj.Reason, reason)
	}
	if priv != nil {
		l, err := p.Dev.PrivateDataLimits(p.SID)
		if err != nil {
			return err
		}
		return privateData("REJ", rj.PrivateData, priv, l.Rej)
	}
	return nil
}

func noListenerActive(ctx context.Context, p *Peer) (err error) {
	e, err := newEndpoint(p.Dev, verbs.QPOptions{})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, nil, e) }()
	_, err = p.connect(ctx, e, verbs.ConnParam{}, nil, false)
	return checkReject(p, err, verbs.RejectInvalidServiceID, nil)
}

func unreachableActive(ctx context.Context, p *Peer) (err error) {
	e, err := newEndpoint(p.Dev, verbs.QPOptions{})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, nil, e) }()
	q := &Peer{Dev: p.Dev, Addr: p.Addr, Remote: p.Cfg.Unreachable, SID: p.SID, Cfg: p.Cfg}
	_, err = q.connect(ctx, e, verbs.ConnParam{}, nil, false)
	if !errors.Is(err, verbs.ErrUnreachable) {
		return fmt.Errorf("connect to %v: got %v, want ErrUnreachable", q.Remote, err)
	}
	if errors.Is(err, verbs.ErrRefused) || errors.Is(err, verbs.ErrTimeout) {
		return fmt.Errorf("unreachable reported as refused or timed out: %v", err)
	}
	return nil
}

const (
	connectTimeout = 400 * time.Millisecond
	holdRequest    = 1500 * time.Millisecond
)

// timeoutPassive takes the request and answers nothing until the peer has
// given up.
func timeoutPassive(ctx context.Context, p *Peer) (err error) {
	ln, err := p.listen()
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, ln) }()
	c, err := ln.Accept(ctx)
	if err != nil {
		return err
	}
	select {
	case <-time.After(holdRequest):
	case <-ctx.Done():
	}
	c.Reject(nil) //nolint:errcheck // the peer is gone; either answer is fine
	return c.Close()
}

func timeoutActive(ctx context.Context, p *Peer) (err error) {
	e, err := newEndpoint(p.Dev, verbs.QPOptions{})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, nil, e) }()
	start := time.Now()
	var cerr error
	for {
		cctx, cancel := context.WithTimeout(ctx, connectTimeout)
		start = time.Now()
		_, cerr = p.connect(cctx, e, verbs.ConnParam{}, nil, false)
		cancel()
		var rj *verbs.RejectError
		if errors.As(cerr, &rj) && rj.Reason == verbs.RejectInvalidServiceID && ctx.Err() == nil {
			time.Sleep(20 * time.Millisecond) // two-process run: not listening yet
			continue
		}
		break
	}
	if !errors.Is(cerr, verbs.ErrTimeout) || !errors.Is(cerr, context.DeadlineExceeded) {
		return fmt.Errorf("connect to a silent listener: got %v, want ErrTimeout and DeadlineExceeded", cerr)
	}
	if el := time.Since(start); el < connectTimeout*9/10 {
		return fmt.Errorf("timed out after %v, before the %v deadline", el, connectTimeout)
	}
	return nil
}

// ---- private data at the limits ----

func limitsPassive(ctx context.Context, p *Peer) (err error) {
	ln, err := p.listen()
	if err != nil {
		return err
	}
	l, err := p.Dev.PrivateDataLimits(p.SID)
	if err != nil {
		return closeAll(err, ln)
	}
	e, err := newEndpoint(p.Dev, verbs.QPOptions{})
	if err != nil {
		return closeAll(err, ln)
	}
	defer func() { err = closeAll(err, ln, e) }()
	c, err := ln.Accept(ctx)
	if err != nil {
		return err
	}
	e.conn = c
	if err := privateData("REQ", c.PrivateData(), pattern(10, l.Req), l.Req); err != nil {
		return err
	}
	if e.qp, err = c.CreateQP(e.pd, e.qpo); err != nil {
		return err
	}
	var pe *verbs.PrivateDataError
	if err := c.Accept(ctx, verbs.ConnParam{PrivateData: make([]byte, l.Rep+1)}); !errors.As(err, &pe) || !errors.Is(err, verbs.ErrInvalid) {
		return fmt.Errorf("accept with %d bytes: got %v, want a PrivateDataError", l.Rep+1, err)
	}
	if err := c.Accept(ctx, verbs.ConnParam{PrivateData: pattern(11, l.Rep)}); err != nil {
		return fmt.Errorf("accept with %d bytes: %w", l.Rep, err)
	}
	if _, err := waitEvent(ctx, c, verbs.EventDisconnected); err != nil {
		return err
	}
	// A REJ at its limit.
	c2, err := ln.Accept(ctx)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, c2.Close()) }()
	if err := c2.Reject(make([]byte, l.Rej+1)); !errors.As(err, &pe) {
		return fmt.Errorf("reject with %d bytes: got %v, want a PrivateDataError", l.Rej+1, err)
	}
	return c2.Reject(pattern(12, l.Rej))
}

func limitsActive(ctx context.Context, p *Peer) (err error) {
	l, err := p.Dev.PrivateDataLimits(p.SID)
	if err != nil {
		return err
	}
	e, err := newEndpoint(p.Dev, verbs.QPOptions{})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, nil, e) }()
	var pe *verbs.PrivateDataError
	if _, err := p.connect(ctx, e, verbs.ConnParam{PrivateData: make([]byte, l.Req+1)}, nil, true); !errors.As(err, &pe) || !errors.Is(err, verbs.ErrInvalid) {
		return fmt.Errorf("connect with %d bytes: got %v, want a PrivateDataError", l.Req+1, err)
	}
	rep, err := p.connect(ctx, e, verbs.ConnParam{PrivateData: pattern(10, l.Req)}, nil, true)
	if err != nil {
		return err
	}
	if err := privateData("REP", rep, pattern(11, l.Rep), l.Rep); err != nil {
		return err
	}
	if err := finish(ctx, e); err != nil {
		return err
	}
	if err := closeAll(nil, nil, e); err != nil {
		return err
	}
	if e, err = newEndpoint(p.Dev, verbs.QPOptions{}); err != nil {
		return err
	}
	_, err = p.connect(ctx, e, verbs.ConnParam{}, nil, true)
	return checkReject(p, err, verbs.RejectConsumer, pattern(12, l.Rej))
}

// ---- completion notification ----

func notifyPassive(ctx context.Context, p *Peer) (err error) {
	ln, e, err := p.serve(verbs.QPOptions{})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, ln, e) }()
	m, err := newMsgBox(e)
	if err != nil {
		return err
	}
	if _, err := accept(ctx, ln, e, verbs.ConnParam{}, func(qp verbs.QP) error {
		return m.postRecvs(qp, 3)
	}); err != nil {
		return err
	}
	// Solicited-only arming: the unsolicited message A arrives but does
	// not wake Wait.
	if err := e.rcq.Notify(true); err != nil {
		return err
	}
	if err := m.send(ctx, []byte("ready"), 0); err != nil {
		return err
	}
	buf := make([]verbs.Completion, 1)
	for {
		n, err := e.rcq.Poll(buf)
		if err != nil {
			return err
		}
		if n == 1 {
			if err := expect(buf, wc(1, verbs.StatusSuccess, verbs.CompRecv)); err != nil {
				return err
			}
			break
		}
		select {
		case <-time.After(2 * time.Millisecond):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	wctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	err = e.rcq.Wait(wctx)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("Wait after an unsolicited completion: got %v, want a timeout", err)
	}
	// The solicited message B wakes it.
	if err := m.send(ctx, []byte("go"), 0); err != nil {
		return err
	}
	if err := e.rcq.Wait(ctx); err != nil {
		return fmt.Errorf("Wait for a solicited completion: %w", err)
	}
	if _, err := expectOn(ctx, e.rcq, wc(2, verbs.StatusSuccess, verbs.CompRecv)); err != nil {
		return err
	}
	// Arming for any completion: the unsolicited C wakes it.
	if err := e.rcq.Notify(false); err != nil {
		return err
	}
	if err := m.send(ctx, []byte("go"), 0); err != nil {
		return err
	}
	if err := e.rcq.Wait(ctx); err != nil {
		return fmt.Errorf("Wait for any completion: %w", err)
	}
	if _, err := expectOn(ctx, e.rcq, wc(3, verbs.StatusSuccess, verbs.CompRecv)); err != nil {
		return err
	}
	_, err = waitEvent(ctx, e.conn, verbs.EventDisconnected)
	return err
}

func notifyActive(ctx context.Context, p *Peer) (err error) {
	e, err := newEndpoint(p.Dev, verbs.QPOptions{})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, nil, e) }()
	m, err := newMsgBox(e)
	if err != nil {
		return err
	}
	if _, err := p.connect(ctx, e, verbs.ConnParam{}, func(qp verbs.QP) error {
		return m.postRecvs(qp, 3)
	}, true); err != nil {
		return err
	}
	steps := []verbs.SendFlags{0, verbs.SendSolicited, 0}
	for i, f := range steps {
		if _, err := m.recv(ctx, i, uint64(i+1)); err != nil {
			return err
		}
		if err := m.send(ctx, []byte{byte('A' + i)}, f); err != nil {
			return err
		}
	}
	return finish(ctx, e)
}

// ---- ordering under load ----

const (
	orderN      = 600
	orderWindow = 16
	orderSlots  = 8
	orderMax    = 16384
	orderRecvs  = 32
)

// orderingPassive receives a bounded stream of SENDs of random sizes and,
// every tenth message, an RDMA WRITE followed by a SEND with immediate that
// must find the written data in place (a SEND is placed after an earlier
// WRITE on the same QP). It reposts receives as it goes and answers with a
// digest of everything received, in order.
func orderingPassive(ctx context.Context, p *Peer) (err error) {
	ln, e, err := p.serve(verbs.QPOptions{MaxRecvWR: orderRecvs})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, ln, e) }()
	rb, err := e.region(orderRecvs*orderMax, verbs.AccessLocalWrite)
	if err != nil {
		return err
	}
	wr, err := e.region(orderSlots*4096, verbs.AccessLocalWrite|verbs.AccessRemoteWrite)
	if err != nil {
		return err
	}
	m, err := newMsgBox(e)
	if err != nil {
		return err
	}
	post := func(qp verbs.QP, slot int) error {
		return qp.PostRecv([]verbs.RecvWR{{ID: uint64(slot), SGL: []verbs.SGE{rb.sge(slot*orderMax, orderMax)}}})
	}
	if _, err := acceptWith(ctx, ln, e, describe(wr, 0, orderSlots*4096).bytes(), func(qp verbs.QP) error {
		for s := 0; s < orderRecvs; s++ {
			if err := post(qp, s); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		return err
	}
	h := newDigest()
	for i := 0; i < orderN; i++ {
		got, err := collect(ctx, e.rcq, 1)
		if err != nil {
			return fmt.Errorf("message %d: %w", i, err)
		}
		c := got[0]
		if c.Status != verbs.StatusSuccess || c.ID != uint64(i%orderRecvs) {
			return fmt.Errorf("message %d: completion %+v, want id %d", i, c, i%orderRecvs)
		}
		slot := int(c.ID)
		if i%10 == 9 {
			if c.Flags&verbs.WithImm == 0 || c.Imm != uint32(i) || c.ByteLen != 0 {
				return fmt.Errorf("message %d: %+v, want an empty SEND with immediate %d", i, c, i)
			}
			s := (i / 10) % orderSlots
			if err := sameBytes(fmt.Sprintf("write before message %d", i), wr.b[s*4096:(s+1)*4096], pattern(uint64(1000+i), 4096)); err != nil {
				return err
			}
		} else {
			data := rb.b[slot*orderMax : slot*orderMax+int(c.ByteLen)]
			if err := sameBytes(fmt.Sprintf("message %d", i), data, pattern(uint64(i), orderSize(i))); err != nil {
				return err
			}
			h.add(data)
		}
		if err := post(e.qp, slot); err != nil {
			return err
		}
	}
	d := h.sum()
	if err := m.send(ctx, d[:], 0); err != nil {
		return err
	}
	_, err = waitEvent(ctx, e.conn, verbs.EventDisconnected)
	return err
}

// orderSize is message i's size, 1..orderMax, known to both halves.
func orderSize(i int) int {
	return 1 + int(pattern(uint64(1<<40+i), 8)[0])*int(pattern(uint64(1<<41+i), 8)[1])%orderMax
}

type digest struct{ b []byte }

func newDigest() *digest        { return &digest{} }
func (d *digest) add(p []byte)  { s := sum(append(d.b, p...)); d.b = s[:] }
func (d *digest) sum() [32]byte { return sum(d.b) }

func orderingActive(ctx context.Context, p *Peer) (err error) {
	e, err := newEndpoint(p.Dev, verbs.QPOptions{MaxSendWR: 2 * orderWindow})
	if err != nil {
		return err
	}
	defer func() { err = closeAll(err, nil, e) }()
	sb, err := e.region(orderWindow*orderMax, verbs.AccessLocalWrite)
	if err != nil {
		return err
	}
	m, err := newMsgBox(e)
	if err != nil {
		return err
	}
	rd, err := p.connectDesc(ctx, e, verbs.ConnParam{RNRRetry: 7}, func(qp verbs.QP) error { return m.postRecv(qp, 0, 1) })
	if err != nil {
		return err
	}
	h := newDigest()
	inflight := 0
	for i := 0; i < orderN; i++ {
		if inflight == orderWindow {
			got, err := collect(ctx, e.scq, 1)
			if err != nil {
				return err
			}
			if got[0].Status != verbs.StatusSuccess {
				return fmt.Errorf("send completion %+v", got[0])
			}
			inflight--
		}
		buf := (i % orderWindow) * orderMax
		var wrs []verbs.SendWR
		if i%10 == 9 {
			s := (i / 10) % orderSlots
			copy(sb.b[buf:], pattern(uint64(1000+i), 4096))
			wrs = []verbs.SendWR{
				{ID: uint64(i) << 1, Op: verbs.OpWrite, SGL: []verbs.SGE{sb.sge(buf, 4096)}, RemoteAddr: rd.Addr + uint64(s*4096), RKey: rd.RKey},
				{ID: uint64(i)<<1 | 1, Op: verbs.OpSendImm, Flags: verbs.SendSignaled, Imm: uint32(i)},
			}
		} else {
			data := pattern(uint64(i), orderSize(i))
			copy(sb.b[buf:], data)
			h.add(data)
			wrs = []verbs.SendWR{{ID: uint64(i) << 1, Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{sb.sge(buf, len(data))}}}
		}
		if err := e.qp.PostSend(wrs); err != nil {
			return err
		}
		inflight++
	}
	got, err := collect(ctx, e.scq, inflight)
	if err != nil {
		return err
	}
	for _, c := range got {
		if c.Status != verbs.StatusSuccess {
			return fmt.Errorf("send completion %+v", c)
		}
	}
	reply, err := m.recv(ctx, 0, 1)
	if err != nil {
		return err
	}
	d := h.sum()
	if !bytes.Equal(reply, d[:]) {
		return errors.New("the peer's digest of the stream differs")
	}
	return finish(ctx, e)
}
