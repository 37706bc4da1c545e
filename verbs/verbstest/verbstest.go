package verbstest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vsdp/vsdp/verbs"
)

// Side is one end of a conformance run: an opened device and its fabric
// address.
type Side struct {
	Device verbs.Device
	Addr   netip.Addr
}

// Fabric yields a fresh pair of sides for one case: the passive side
// (listens) and the active side (connects to passive.Addr). It registers the
// devices' Close with t.Cleanup; Close fails if a case leaked an object.
type Fabric func(t testing.TB) (passive, active Side)

// Config tunes a run. The zero value uses SDP service IDs from port 18000,
// 192.0.2.1 (TEST-NET-1) as the unreachable address and 30 s per case.
type Config struct {
	// ServiceID maps a case's port to a service ID: verbs.SDPServiceID by
	// default; the rdma-core provider passes verbs.TCPServiceID.
	ServiceID func(port uint16) verbs.ServiceID
	// BasePort is the first case's port; case i uses BasePort+i.
	BasePort uint16
	// Unreachable is a fabric address with no route.
	Unreachable netip.Addr
	// Timeout bounds each case.
	Timeout time.Duration
	// Provider names the provider under test (ProviderSoft, ProviderRXE)
	// for its list of known deviations (Deviations). A known deviation is
	// reported as a skip whose message starts with KnownDeviationPrefix
	// and gives the documented reason. Empty: no deviations are known.
	Provider string
	// CheckDeviations runs the known deviations too and inverts them: a
	// deviation that passes is an error (the list is stale), one that
	// fails is logged with its reason. Costly: a deviating case often
	// waits out its Timeout.
	CheckDeviations bool
}

func (c Config) withDefaults() Config {
	if c.ServiceID == nil {
		c.ServiceID = verbs.SDPServiceID
	}
	if c.BasePort == 0 {
		c.BasePort = 18000
	}
	if !c.Unreachable.IsValid() {
		c.Unreachable = netip.MustParseAddr("192.0.2.1")
	}
	if c.Timeout <= 0 {
		c.Timeout = 30 * time.Second
	}
	return c
}

// Case is one conformance case: a passive and an active half that meet only
// through the connection manager (service ID, private data) and the verbs
// themselves, so the halves may run in different processes or guests.
type Case struct {
	Name    string
	Passive func(ctx context.Context, p *Peer) error
	Active  func(ctx context.Context, p *Peer) error
}

// Peer is what a half gets: its device, the addresses and the case's
// service ID.
type Peer struct {
	Dev    verbs.Device
	Addr   netip.Addr // this side's fabric address
	Remote netip.Addr // the passive side's address (active half only)
	SID    verbs.ServiceID
	Cfg    Config

	readyOnce sync.Once
	readyCh   chan struct{}
}

// Ready tells an in-process runner that the passive half listens; the active
// half starts only then. Two-process runs instead retry connecting while the
// service ID has no listener.
func (p *Peer) Ready() {
	p.readyOnce.Do(func() {
		if p.readyCh != nil {
			close(p.readyCh)
		}
	})
}

// Names lists the cases in the order they run.
func Names() []string {
	var out []string
	for _, c := range Cases() {
		out = append(out, c.Name)
	}
	return out
}

// Run runs every case with both halves in this process.
func Run(t *testing.T, f Fabric, cfg Config) {
	cfg = cfg.withDefaults()
	for i, tc := range Cases() {
		t.Run(tc.Name, func(t *testing.T) {
			rep := cfg.reporter(t, tc.Name)
			defer rep.done()
			passive, active := f(t)
			sid := cfg.ServiceID(cfg.BasePort + uint16(i))
			ctx, cancel := context.WithTimeout(context.Background(), cfg.Timeout)
			defer cancel()
			pp := &Peer{Dev: passive.Device, Addr: passive.Addr, SID: sid, Cfg: cfg, readyCh: make(chan struct{})}
			ap := &Peer{Dev: active.Device, Addr: active.Addr, Remote: passive.Addr, SID: sid, Cfg: cfg}
			perr := make(chan error, 1)
			go func() {
				err := tc.Passive(ctx, pp)
				if err != nil {
					cancel() // unblock the active half
				}
				pp.Ready()
				perr <- err
			}()
			select {
			case <-pp.readyCh:
			case <-ctx.Done():
			}
			if err := tc.Active(ctx, ap); err != nil {
				rep.errorf("active: %v", err)
				cancel() // unblock the passive half
			}
			if err := <-perr; err != nil {
				rep.errorf("passive: %v", err)
			}
			for _, s := range []struct {
				name string
				d    verbs.Device
			}{{"passive", passive.Device}, {"active", active.Device}} {
				if r := s.d.Resources(); !r.Zero() {
					t.Errorf("%s side leaked objects: %v", s.name, r)
				}
			}
		})
	}
}

// reporter routes a case's failures: to t, or, for a known deviation run
// under CheckDeviations, into a list that done inverts.
type reporter struct {
	t      *testing.T
	reason string // the deviation's reason; "" for an ordinary case
	errs   []string
}

// reporter returns the case's reporter. A known deviation is skipped here
// with its reason unless cfg.CheckDeviations.
func (c Config) reporter(t *testing.T, name string) *reporter {
	t.Helper()
	reason, dev := Deviation(c.Provider, name)
	if !dev {
		return &reporter{t: t}
	}
	if !c.CheckDeviations {
		t.Skipf("%s%s: %s", KnownDeviationPrefix, c.Provider, reason)
	}
	return &reporter{t: t, reason: reason}
}

func (r *reporter) errorf(format string, a ...any) {
	r.t.Helper()
	if r.reason == "" {
		r.t.Errorf(format, a...)
		return
	}
	r.errs = append(r.errs, fmt.Sprintf(format, a...))
}

// done checks a deviation's outcome: it must have failed.
func (r *reporter) done() {
	r.t.Helper()
	if r.reason == "" {
		return
	}
	msg, stale := verdict(r.reason, r.errs)
	if stale {
		r.t.Error(msg)
		return
	}
	r.t.Log(msg)
}

// verdict judges a known deviation that ran: stale when it passed.
func verdict(reason string, errs []string) (msg string, stale bool) {
	if len(errs) == 0 {
		return fmt.Sprintf("listed as a known deviation (%s) but passed: remove it from the list", reason), true
	}
	return fmt.Sprintf("known deviation confirmed (%s): %s", reason, strings.Join(errs, "; ")), false
}

// RunPassive runs the passive halves, in order, for a two-process run: start
// it on one machine, RunActive on the other.
func RunPassive(t *testing.T, s Side, cfg Config) {
	runHalf(t, s, netip.Addr{}, cfg, false)
}

// RunActive runs the active halves against the passive side at peer.
func RunActive(t *testing.T, s Side, peer netip.Addr, cfg Config) {
	runHalf(t, s, peer, cfg, true)
}

func runHalf(t *testing.T, s Side, peer netip.Addr, cfg Config, active bool) {
	cfg = cfg.withDefaults()
	for i, tc := range Cases() {
		t.Run(tc.Name, func(t *testing.T) {
			rep := cfg.reporter(t, tc.Name)
			defer rep.done()
			ctx, cancel := context.WithTimeout(context.Background(), cfg.Timeout)
			defer cancel()
			p := &Peer{Dev: s.Device, Addr: s.Addr, Remote: peer, SID: cfg.ServiceID(cfg.BasePort + uint16(i)), Cfg: cfg}
			half := tc.Passive
			if active {
				half = tc.Active
			}
			if err := half(ctx, p); err != nil {
				rep.errorf("%v", err)
			}
			if r := s.Device.Resources(); !r.Zero() {
				t.Errorf("leaked objects: %v", r)
			}
		})
	}
}

// ---- endpoints ----

// endpoint is one connection's worth of objects on one side.
type endpoint struct {
	dev      verbs.Device
	pd       verbs.PD
	scq, rcq verbs.CQ
	conn     verbs.Conn
	qp       verbs.QP
	qpo      verbs.QPOptions
	dmas     []*verbs.DMA
	mrs      []verbs.MR
	mws      []verbs.MW
}

func newEndpoint(dev verbs.Device, qpo verbs.QPOptions) (*endpoint, error) {
	e := &endpoint{dev: dev}
	var err error
	if e.pd, err = dev.AllocPD(); err != nil {
		return nil, err
	}
	if e.scq, err = dev.CreateCQ(verbs.CQOptions{Entries: 512}); err != nil {
		return nil, errors.Join(err, e.close())
	}
	if e.rcq, err = dev.CreateCQ(verbs.CQOptions{Entries: 512}); err != nil {
		return nil, errors.Join(err, e.close())
	}
	qpo.SendCQ, qpo.RecvCQ = e.scq, e.rcq
	e.qpo = qpo
	return e, nil
}

// region is registered DMA memory.
type region struct {
	b  []byte
	mr verbs.MR
}

func (r *region) sge(off, n int) verbs.SGE {
	return verbs.SGE{Addr: r.mr.Addr() + uint64(off), Length: uint32(n), LKey: r.mr.LKey()}
}

func (e *endpoint) region(n int, access verbs.Access) (*region, error) {
	d, err := verbs.AllocDMA(n)
	if err != nil {
		return nil, err
	}
	mr, err := e.pd.RegMR(d.Bytes(), access)
	if err != nil {
		return nil, errors.Join(err, d.Close())
	}
	e.dmas = append(e.dmas, d)
	e.mrs = append(e.mrs, mr)
	return &region{b: d.Bytes(), mr: mr}, nil
}

func (e *endpoint) mw() (verbs.MW, error) {
	w, err := e.pd.AllocMW()
	if err == nil {
		e.mws = append(e.mws, w)
	}
	return w, err
}

// close closes everything, children first, and reports every failure.
func (e *endpoint) close() error {
	var errs []error
	add := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}
	if e.qp != nil {
		add(e.qp.Close())
	}
	if e.conn != nil {
		add(e.conn.Close())
	}
	for _, w := range e.mws {
		add(w.Close())
	}
	for _, m := range e.mrs {
		add(m.Close())
	}
	for _, d := range e.dmas {
		add(d.Close())
	}
	for _, c := range []verbs.CQ{e.scq, e.rcq} {
		if c != nil {
			add(c.Close())
		}
	}
	if e.pd != nil {
		add(e.pd.Close())
	}
	return errors.Join(errs...)
}

// connect connects e to the passive half. retry retries while the service
// ID has no listener yet (two-process runs).
func (p *Peer) connect(ctx context.Context, e *endpoint, param verbs.ConnParam, prepare func(verbs.QP) error, retry bool) ([]byte, error) {
	param = withTransportRetries(param)
	for {
		c, rep, err := verbs.Dial(ctx, p.Dev, verbs.DialConfig{
			Resolve: verbs.ResolveOptions{Addr: p.Remote, ServiceID: p.SID},
			PD:      e.pd, QP: e.qpo, Param: param, Prepare: prepare,
		})
		if err == nil {
			e.conn, e.qp = c, c.QP()
			return rep, nil
		}
		var rj *verbs.RejectError
		if retry && errors.As(err, &rj) && rj.Reason == verbs.RejectInvalidServiceID {
			// The refused attempt's QP flushed what prepare posted into
			// the endpoint's CQs (as the RDMA CM does on a REJ); its QP is
			// closed now, so drop those completions before retrying.
			if derr := errors.Join(drain(e.scq), drain(e.rcq)); derr != nil {
				return nil, derr
			}
			select {
			case <-time.After(20 * time.Millisecond):
				continue
			case <-ctx.Done():
			}
		}
		return nil, fmt.Errorf("connect: %w", err)
	}
}

// connectDesc connects e like connect (retrying while there is no
// listener) and parses the reply's private data as a region descriptor.
func (p *Peer) connectDesc(ctx context.Context, e *endpoint, param verbs.ConnParam, prepare func(verbs.QP) error) (desc, error) {
	rep, err := p.connect(ctx, e, param, prepare, true)
	if err != nil {
		return desc{}, err
	}
	return parseDesc(rep)
}

// drain polls cq empty.
func drain(cq verbs.CQ) error {
	wc := make([]verbs.Completion, 16)
	for {
		n, err := cq.Poll(wc)
		if n == 0 || err != nil {
			return err
		}
	}
}

// listen binds the case's service ID and tells the runner.
func (p *Peer) listen() (verbs.Listener, error) {
	ln, err := p.Dev.Listen(verbs.ListenOptions{ServiceID: p.SID})
	if err != nil {
		return nil, fmt.Errorf("listen: %w", err)
	}
	p.Ready()
	return ln, nil
}

// serve starts a passive half: it listens on the case's service ID and
// makes an endpoint with options qpo. The caller closes both with closeAll.
func (p *Peer) serve(qpo verbs.QPOptions) (verbs.Listener, *endpoint, error) {
	ln, err := p.listen()
	if err != nil {
		return nil, nil, err
	}
	e, err := newEndpoint(p.Dev, qpo)
	if err != nil {
		return nil, nil, closeAll(err, ln)
	}
	return ln, e, nil
}

// accept takes the next request on ln into e and accepts it. It returns the
// REQ's private data.
func accept(ctx context.Context, ln verbs.Listener, e *endpoint, param verbs.ConnParam, prepare func(verbs.QP) error) ([]byte, error) {
	param = withTransportRetries(param)
	c, err := ln.Accept(ctx)
	if err != nil {
		return nil, fmt.Errorf("listener accept: %w", err)
	}
	e.conn = c
	req := c.PrivateData()
	if err := verbs.AcceptConn(ctx, c, verbs.AcceptConfig{PD: e.pd, QP: e.qpo, Param: param, Prepare: prepare}); err != nil {
		return req, fmt.Errorf("accept: %w", err)
	}
	e.qp = c.QP()
	return req, nil
}

// ---- completions and events ----

// collect waits for exactly n completions.
func collect(ctx context.Context, cq verbs.CQ, n int) ([]verbs.Completion, error) {
	out := make([]verbs.Completion, 0, n)
	wc := make([]verbs.Completion, 32)
	for len(out) < n {
		k, err := verbs.PollWait(ctx, cq, wc[:min(len(wc), n-len(out))])
		out = append(out, wc[:k]...)
		if err != nil {
			return out, fmt.Errorf("after %d of %d completions: %w", len(out), n, err)
		}
	}
	return out, nil
}

// expectOn waits for len(want) completions on cq and checks them with
// expect. It returns what it collected.
func expectOn(ctx context.Context, cq verbs.CQ, want ...verbs.Completion) ([]verbs.Completion, error) {
	got, err := collect(ctx, cq, len(want))
	if err != nil {
		return got, err
	}
	return got, expect(got, want...)
}

// postExpect posts wrs on e's QP and checks the send completions with
// expectOn.
func postExpect(ctx context.Context, e *endpoint, wrs []verbs.SendWR, want ...verbs.Completion) error {
	if err := e.qp.PostSend(wrs); err != nil {
		return err
	}
	_, err := expectOn(ctx, e.scq, want...)
	return err
}

// expect checks completions against wanted (ID, status) pairs in order.
func expect(got []verbs.Completion, want ...verbs.Completion) error {
	if len(got) != len(want) {
		return fmt.Errorf("%d completions, want %d: %+v", len(got), len(want), got)
	}
	for i := range want {
		if got[i].ID != want[i].ID || got[i].Status != want[i].Status {
			return fmt.Errorf("completion %d: id %d status %v, want id %d status %v", i, got[i].ID, got[i].Status, want[i].ID, want[i].Status)
		}
		if want[i].Op != 0 && got[i].Status == verbs.StatusSuccess && got[i].Op != want[i].Op {
			return fmt.Errorf("completion %d: opcode %v, want %v", i, got[i].Op, want[i].Op)
		}
	}
	return nil
}

func wc(id uint64, st verbs.Status, op verbs.CompletionOp) verbs.Completion {
	return verbs.Completion{ID: id, Status: st, Op: op}
}

// wantError checks that qp is in the error state after what is said by
// after.
func wantError(qp verbs.QP, after string) error {
	if s := qp.State(); s != verbs.QPError {
		return fmt.Errorf("QP in %v after %s, want ERR", s, after)
	}
	return nil
}

// quiet checks that no completion arrives on cq for d.
func quiet(cq verbs.CQ, d time.Duration) error {
	wc := make([]verbs.Completion, 4)
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		n, err := cq.Poll(wc)
		if err != nil {
			return err
		}
		if n > 0 {
			return fmt.Errorf("unexpected completions %+v", wc[:n])
		}
		time.Sleep(5 * time.Millisecond)
	}
	return nil
}

// waitEvent reads events until want arrives and returns the ones before it.
func waitEvent(ctx context.Context, c verbs.Conn, want verbs.EventType) ([]verbs.Event, error) {
	var seen []verbs.Event
	for {
		select {
		case ev, ok := <-c.Events():
			if !ok {
				return seen, fmt.Errorf("event channel closed waiting for %v (saw %v)", want, seen)
			}
			if ev.Type == want {
				return seen, nil
			}
			seen = append(seen, ev)
		case <-ctx.Done():
			return seen, fmt.Errorf("waiting for %v (saw %v): %w", want, seen, ctx.Err())
		}
	}
}

func hasEvent(evs []verbs.Event, t verbs.EventType) bool {
	for _, e := range evs {
		if e.Type == t {
			return true
		}
	}
	return false
}

// ---- data ----

// pattern returns n deterministic bytes for seed, the same in every process.
func pattern(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := 0; i < n; i += 8 {
		var w [8]byte
		binary.LittleEndian.PutUint64(w[:], r.Uint64())
		copy(b[i:], w[:])
	}
	return b
}

func sum(b []byte) [32]byte { return sha256.Sum256(b) }

// sameBytes compares by content hash.
func sameBytes(what string, got, want []byte) error {
	if len(got) != len(want) {
		return fmt.Errorf("%s: %d bytes, want %d", what, len(got), len(want))
	}
	if sum(got) != sum(want) {
		return fmt.Errorf("%s: sha256 %x, want %x", what, sum(got), sum(want))
	}
	return nil
}

// privateData checks received private data: sent bytes first, then at most
// zero padding up to limit (the IB CM delivers fixed-size fields).
func privateData(what string, got, sent []byte, limit int) error {
	if len(got) < len(sent) || len(got) > max(limit, len(sent)) {
		return fmt.Errorf("%s private data: %d bytes, sent %d, limit %d", what, len(got), len(sent), limit)
	}
	if !bytes.Equal(got[:len(sent)], sent) {
		return fmt.Errorf("%s private data differs from what was sent", what)
	}
	for _, b := range got[len(sent):] {
		if b != 0 {
			return fmt.Errorf("%s private data padding is not zero", what)
		}
	}
	return nil
}

// desc describes a remote buffer in private data or a message.
type desc struct {
	Addr uint64
	Len  uint32
	RKey uint32
}

const descLen = 16

func (d desc) bytes() []byte {
	b := make([]byte, descLen)
	binary.BigEndian.PutUint64(b, d.Addr)
	binary.BigEndian.PutUint32(b[8:], d.Len)
	binary.BigEndian.PutUint32(b[12:], d.RKey)
	return b
}

func parseDesc(b []byte) (desc, error) {
	if len(b) < descLen {
		return desc{}, fmt.Errorf("buffer description of %d bytes", len(b))
	}
	return desc{Addr: binary.BigEndian.Uint64(b), Len: binary.BigEndian.Uint32(b[8:]), RKey: binary.BigEndian.Uint32(b[12:])}, nil
}

func describe(r *region, off, n int) desc {
	return desc{Addr: r.mr.Addr() + uint64(off), Len: uint32(n), RKey: r.mr.RKey()}
}

// ---- messages ----

// msgBox is a small region for control messages between the halves.
type msgBox struct {
	e   *endpoint
	r   *region
	nid uint64
}

const msgSize = 256

// newMsgBox registers room for 8 receive slots and a send slot.
func newMsgBox(e *endpoint) (*msgBox, error) {
	r, err := e.region(9*msgSize, verbs.AccessLocalWrite)
	if err != nil {
		return nil, err
	}
	return &msgBox{e: e, r: r, nid: 1 << 32}, nil
}

// postRecv posts receive slot i (0–7) with ID id.
func (m *msgBox) postRecv(qp verbs.QP, i int, id uint64) error {
	return qp.PostRecv([]verbs.RecvWR{{ID: id, SGL: []verbs.SGE{m.r.sge(i*msgSize, msgSize)}}})
}

// postRecvs posts receive slots 0 to n-1 with IDs 1 to n, each even if an
// earlier one failed.
func (m *msgBox) postRecvs(qp verbs.QP, n int) error {
	errs := make([]error, n)
	for i := range errs {
		errs[i] = m.postRecv(qp, i, uint64(i+1))
	}
	return errors.Join(errs...)
}

// slot returns the first n bytes of receive slot i.
func (m *msgBox) slot(i, n int) []byte { return m.r.b[i*msgSize : i*msgSize+n] }

// send sends b (at most msgSize) and waits for its completion.
func (m *msgBox) send(ctx context.Context, b []byte, flags verbs.SendFlags) error {
	off := 8 * msgSize
	copy(m.r.b[off:], b)
	m.nid++
	id := m.nid
	if err := m.e.qp.PostSend([]verbs.SendWR{{ID: id, Op: verbs.OpSend, Flags: verbs.SendSignaled | flags, SGL: []verbs.SGE{m.r.sge(off, len(b))}}}); err != nil {
		return fmt.Errorf("post message: %w", err)
	}
	got, err := collect(ctx, m.e.scq, 1)
	if err != nil {
		return fmt.Errorf("message completion: %w", err)
	}
	return expect(got, wc(id, verbs.StatusSuccess, verbs.CompSend))
}

// recv waits for the receive with ID id in slot i and returns its bytes.
func (m *msgBox) recv(ctx context.Context, i int, id uint64) ([]byte, error) {
	got, err := collect(ctx, m.e.rcq, 1)
	if err != nil {
		return nil, fmt.Errorf("message: %w", err)
	}
	if err := expect(got, wc(id, verbs.StatusSuccess, verbs.CompRecv)); err != nil {
		return nil, err
	}
	return append([]byte(nil), m.slot(i, int(got[0].ByteLen))...), nil
}

// rounds runs f for rounds 1 to n in order and stops at the first error,
// which it labels with its round.
func rounds(n int, f func(round int) error) error {
	for round := 1; round <= n; round++ {
		if err := f(round); err != nil {
			return fmt.Errorf("round %d: %w", round, err)
		}
	}
	return nil
}

// closeAll closes endpoints and a listener, joining errors with err.
func closeAll(err error, ln verbs.Listener, eps ...*endpoint) error {
	errs := []error{err}
	for _, e := range eps {
		if e != nil {
			errs = append(errs, e.close())
		}
	}
	if ln != nil {
		errs = append(errs, ln.Close())
	}
	return errors.Join(errs...)
}

// finish ends an active half: disconnect and wait for the event.
func finish(ctx context.Context, e *endpoint) error {
	if e.conn == nil {
		return nil
	}
	if err := e.conn.Disconnect(); err != nil {
		return fmt.Errorf("disconnect: %w", err)
	}
	if _, err := waitEvent(ctx, e.conn, verbs.EventDisconnected); err != nil {
		return err
	}
	return nil
}

// withTransportRetries gives the suite's queue pairs the full transport
// retry count: a case is about the verbs' semantics, and one late ACK
// under an emulated CPU (rxe in a TCG guest) must not end the QP. RNR
// retries stay as each case sets them.
func withTransportRetries(p verbs.ConnParam) verbs.ConnParam {
	if p.RetryCount == 0 {
		p.RetryCount = 7
	}
	return p
}
