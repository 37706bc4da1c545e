//go:build linux && cgo

package ibv

// Tests that need an RDMA device. They run inside the soft-RoCE guests that
// TestVMIbv boots (the host has no RDMA device): TestVMIbv runs this
// package's test binary in the guests with the environment below, checks
// that every TestGuest test ran and passed, and fails otherwise. Run
// directly on a host with a device, they use it:
//
//	VSDP_IBV_DEVICE=rxe0 VSDP_IBV_ADDR=10.9.0.1 go test -run TestGuest ./verbs/ibv

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vsdp/vsdp/verbs"
	"github.com/vsdp/vsdp/verbs/verbstest"
)

// The guest tests' environment.
const (
	envDevice = "VSDP_IBV_DEVICE" // the RDMA device
	envAddr   = "VSDP_IBV_ADDR"   // this machine's fabric address on it
	envPeer   = "VSDP_IBV_PEER"   // the other guest's address (TestGuestPeer)
	envRole   = "VSDP_IBV_ROLE"   // "server" or "client" (TestGuestPeer)
	envPort   = 7471              // TestGuestPeer's port
)

// guestEnv opens the device named by the environment, or skips: these tests
// run in the soft-RoCE guests of TestVMIbv, which checks that none skipped.
func guestEnv(t *testing.T) (*Device, netip.Addr) {
	t.Helper()
	name := os.Getenv(envDevice)
	if name == "" {
		t.Skipf("needs an RDMA device: runs inside TestVMIbv's soft-RoCE guests (or set %s and %s)", envDevice, envAddr)
	}
	addr, err := netip.ParseAddr(os.Getenv(envAddr))
	if err != nil {
		t.Fatalf("%s: %v", envAddr, err)
	}
	// librdmacm opens every device's context at its first use and keeps
	// the descriptors for the life of the process: count after that.
	warmOnce.Do(func() {
		if d, err := Open(name); err == nil {
			d.Close()
		}
	})
	fds, gs := countFDs(t), runtime.NumGoroutine()
	d, err := Open(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if r := d.Resources(); !r.Zero() {
			t.Errorf("resources left: %v", r)
		}
		if err := d.Close(); err != nil {
			t.Errorf("device Close: %v", err)
		}
		if got := countFDs(t); got != fds {
			t.Errorf("descriptors: %d before, %d after", fds, got)
		}
		if got := settle(gs); got > gs {
			buf := make([]byte, 1<<16)
			t.Errorf("goroutines: %d before, %d after\n%s", gs, got, buf[:runtime.Stack(buf, true)])
		}
	})
	return d, addr
}

var (
	nextPort atomic.Uint32
	warmOnce sync.Once
)

// isRXE reports whether d is soft-RoCE, whose deviations from the IBA the
// tests name where they meet them.
func isRXE(d *Device) bool { return strings.HasPrefix(d.Info().Name, "rxe") }

func init() { nextPort.Store(18600) }

func port() uint16 { return uint16(nextPort.Add(1)) }

// side is one end of a connection with its objects.
type side struct {
	conn verbs.Conn
	qp   verbs.QP
	pd   verbs.PD
	cq   verbs.CQ
	dma  *verbs.DMA
	mr   verbs.MR
}

// buf returns the registered memory.
func (s *side) buf() []byte { return s.mr.Bytes() }

// sge describes [off, off+n) of the side's region.
func (s *side) sge(off, n int) verbs.SGE {
	return verbs.SGE{Addr: s.mr.Addr() + uint64(off), Length: uint32(n), LKey: s.mr.LKey()}
}

type pairOpts struct {
	qp       verbs.QPOptions
	cqSize   int
	bufSize  int
	access   verbs.Access
	req, rep []byte
	cparam   verbs.ConnParam
	sparam   verbs.ConnParam
	// prepare runs on each side once its queue pair exists, before the
	// REQ (client) or REP (server).
	prepare func(s *side, server bool) error
}

// newSide allocates a side's PD, CQ and registered memory; Cleanup closes
// them after the queue pair and the connection.
func newSide(t *testing.T, d *Device, o *pairOpts) *side {
	t.Helper()
	if o.access == 0 {
		o.access = verbs.AccessLocalWrite | verbs.AccessRemoteWrite | verbs.AccessRemoteRead | verbs.AccessMWBind
	}
	s := &side{}
	var err error
	if s.pd, err = d.AllocPD(); err != nil {
		t.Fatal(err)
	}
	if s.cq, err = d.CreateCQ(verbs.CQOptions{Entries: o.cqSize}); err != nil {
		t.Fatal(err)
	}
	if s.dma, err = verbs.AllocDMA(o.bufSize); err != nil {
		t.Fatal(err)
	}
	if s.mr, err = s.pd.RegMR(s.dma.Bytes(), o.access); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, c := range []interface{ Close() error }{s.qp, s.conn, s.mr, s.cq, s.pd} {
			if c == nil {
				continue
			}
			if err := c.Close(); err != nil {
				t.Errorf("close %T: %v", c, err)
			}
		}
		s.dma.Close()
	})
	return s
}

// connectPair connects a client and a server on d (loopback through addr).
func connectPair(t *testing.T, d *Device, addr netip.Addr, o pairOpts) (srv, cli *side) {
	t.Helper()
	if o.bufSize == 0 {
		o.bufSize = 1 << 20
	}
	if o.access == 0 {
		o.access = verbs.AccessLocalWrite | verbs.AccessRemoteWrite | verbs.AccessRemoteRead | verbs.AccessMWBind
	}
	srv, cli = newSide(t, d, &o), newSide(t, d, &o)
	sid := verbs.TCPServiceID(port())
	ln, err := d.Listen(verbs.ListenOptions{Addr: addr, ServiceID: sid})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	errc := make(chan error, 1)
	go func() {
		c, err := ln.Accept(ctx)
		if err != nil {
			errc <- err
			return
		}
		srv.conn = c
		qo := o.qp
		qo.SendCQ, qo.RecvCQ = srv.cq, srv.cq
		if srv.qp, err = c.CreateQP(srv.pd, qo); err != nil {
			errc <- err
			return
		}
		if o.prepare != nil {
			if err := o.prepare(srv, true); err != nil {
				errc <- err
				return
			}
		}
		p := o.sparam
		p.PrivateData = o.rep
		errc <- c.Accept(ctx, p)
	}()

	c, err := d.Resolve(ctx, verbs.ResolveOptions{Addr: addr, ServiceID: sid})
	if err != nil {
		t.Fatal(err)
	}
	cli.conn = c
	qo := o.qp
	qo.SendCQ, qo.RecvCQ = cli.cq, cli.cq
	if cli.qp, err = c.CreateQP(cli.pd, qo); err != nil {
		t.Fatal(err)
	}
	if o.prepare != nil {
		if err := o.prepare(cli, false); err != nil {
			t.Fatal(err)
		}
	}
	p := o.cparam
	p.PrivateData = o.req
	if _, err := c.Connect(ctx, p); err != nil {
		t.Fatalf("Connect: %v (server: %v)", err, <-errc)
	}
	if err := <-errc; err != nil {
		t.Fatalf("server: %v", err)
	}
	return srv, cli
}

// poll waits for n completions through PollWait (Notify and the completion
// channel on the netpoller).
func poll(t *testing.T, cq verbs.CQ, n int) []verbs.Completion {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out := make([]verbs.Completion, 0, n)
	wc := make([]verbs.Completion, 64)
	for len(out) < n {
		k, err := verbs.PollWait(ctx, cq, wc[:min(len(wc), n-len(out))])
		if err != nil {
			t.Fatalf("after %d of %d completions: %v", len(out), n, err)
		}
		out = append(out, wc[:k]...)
	}
	return out
}

func want(t *testing.T, c verbs.Completion, id uint64, st verbs.Status, op verbs.CompletionOp) {
	t.Helper()
	if c.ID != id || c.Status != st || (st == verbs.StatusSuccess && c.Op != op) {
		t.Errorf("completion %+v; want id %d %v %v", c, id, st, op)
	}
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// TestGuestConnect: private data at the limits of RDMA_PS_TCP both ways,
// addresses and service ID, ESTABLISHED and DISCONNECTED events on both
// sides, and the error state after Disconnect.
func TestGuestConnect(t *testing.T) {
	d, addr := guestEnv(t)
	lim, err := d.PrivateDataLimits(verbs.TCPServiceID(1))
	if err != nil || lim.Req != 56 || lim.Rep != 196 || lim.Rej != 148 {
		t.Fatalf("limits %+v, %v", lim, err)
	}
	req, rep := randomBytes(lim.Req), randomBytes(lim.Rep)
	srv, cli := connectPair(t, d, addr, pairOpts{req: req, rep: rep})
	if got := srv.conn.PrivateData(); !bytes.HasPrefix(got, req) {
		t.Errorf("server saw REQ data %x, want %x", got, req)
	}
	if got := cli.conn.PrivateData(); !bytes.HasPrefix(got, rep) {
		t.Errorf("client saw REP data %x, want %x", got, rep)
	}
	t.Logf("REQ private data delivered as %d bytes, REP as %d", len(srv.conn.PrivateData()), len(cli.conn.PrivateData()))
	if cli.conn.RemoteAddr() != addr || srv.conn.LocalAddr() != addr || !cli.conn.LocalAddr().IsValid() {
		t.Errorf("addresses: client %v→%v, server %v←%v", cli.conn.LocalAddr(), cli.conn.RemoteAddr(), srv.conn.LocalAddr(), srv.conn.RemoteAddr())
	}
	if !cli.conn.ServiceID().IsTCP() || srv.conn.ServiceID() != cli.conn.ServiceID() {
		t.Errorf("service IDs %v, %v", cli.conn.ServiceID(), srv.conn.ServiceID())
	}
	for _, s := range []*side{srv, cli} {
		if st := s.qp.State(); st != verbs.QPRTS {
			t.Errorf("state %v after connect", st)
		}
		if e := nextEvent(t, s.conn); e.Type != verbs.EventEstablished || e.QPN != s.qp.Num() {
			t.Errorf("event %v, want ESTABLISHED on qp %d", e, s.qp.Num())
		}
	}
	if err := cli.conn.Disconnect(); err != nil {
		t.Fatal(err)
	}
	for _, s := range []*side{cli, srv} {
		if e := nextEvent(t, s.conn); e.Type != verbs.EventDisconnected {
			t.Errorf("event %v, want DISCONNECTED", e)
		}
		if st := s.qp.State(); st != verbs.QPError {
			t.Errorf("state %v after disconnect, want ERR", st)
		}
	}
	if err := cli.conn.Disconnect(); err != nil {
		t.Errorf("second Disconnect: %v", err)
	}
	if err := srv.conn.Disconnect(); err != nil {
		t.Errorf("Disconnect after the peer's: %v", err)
	}
	// Busy rules: a conn with a QP, a PD with children, a CQ with queue
	// pairs, a device with objects.
	for _, c := range []interface{ Close() error }{cli.conn, cli.pd, cli.cq, d} {
		if err := c.Close(); !errors.Is(err, verbs.ErrBusy) {
			t.Errorf("%T.Close with children = %v, want ErrBusy", c, err)
		}
	}
}

func nextEvent(t *testing.T, c verbs.Conn) verbs.Event {
	t.Helper()
	select {
	case e := <-c.Events():
		return e
	case <-time.After(10 * time.Second):
		t.Fatal("no connection event within 10 s")
	}
	return verbs.Event{}
}

// TestGuestPrivateDataLimits: over-long private data fails before anything
// is sent.
func TestGuestPrivateDataLimits(t *testing.T) {
	d, addr := guestEnv(t)
	sid := verbs.TCPServiceID(port())
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ln, err := d.Listen(verbs.ListenOptions{Addr: addr, ServiceID: sid})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	o := pairOpts{bufSize: 4096}
	cli := newSide(t, d, &o)
	c, err := d.Resolve(ctx, verbs.ResolveOptions{Addr: addr, ServiceID: sid})
	if err != nil {
		t.Fatal(err)
	}
	cli.conn = c
	if cli.qp, err = c.CreateQP(cli.pd, verbs.QPOptions{SendCQ: cli.cq, RecvCQ: cli.cq}); err != nil {
		t.Fatal(err)
	}
	_, err = c.Connect(ctx, verbs.ConnParam{PrivateData: make([]byte, 57)})
	var pe *verbs.PrivateDataError
	if !errors.As(err, &pe) || pe.Limit != 56 || pe.Msg != "REQ" {
		t.Errorf("Connect with 57 bytes = %v, want a REQ PrivateDataError", err)
	}
	if _, err := c.Connect(ctx, verbs.ConnParam{RNRRetry: 8}); !errors.Is(err, verbs.ErrInvalid) {
		t.Errorf("Connect with RNRRetry 8 = %v", err)
	}
	// The failed attempts sent nothing: the same Conn still connects.
	done := make(chan error, 1)
	go func() {
		pc, err := ln.Accept(ctx)
		if err != nil {
			done <- err
			return
		}
		if err := pc.Accept(ctx, verbs.ConnParam{PrivateData: make([]byte, 197)}); !errors.As(err, &pe) || pe.Limit != 196 {
			done <- errors.Join(fmt.Errorf("Accept with 197 bytes = %v", err), pc.Close())
			return
		}
		if err := pc.Reject(make([]byte, 149)); !errors.As(err, &pe) || pe.Limit != 148 {
			done <- errors.Join(fmt.Errorf("Reject with 149 bytes = %v", err), pc.Close())
			return
		}
		done <- errors.Join(pc.Reject([]byte("no")), pc.Close())
	}()
	_, err = c.Connect(ctx, verbs.ConnParam{})
	var re *verbs.RejectError
	if !errors.As(err, &re) || re.Reason != verbs.RejectConsumer || !bytes.HasPrefix(re.PrivateData, []byte("no")) {
		t.Errorf("Connect = %v, want a consumer REJ with \"no\"", err)
	}
	if err := <-done; err != nil {
		t.Error(err)
	}
}

// TestGuestRefused: a REJ with private data, and no listener at all.
func TestGuestRefused(t *testing.T) {
	d, addr := guestEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	o := pairOpts{bufSize: 4096}
	dial := func(sid verbs.ServiceID) error {
		s := newSide(t, d, &o)
		c, err := d.Resolve(ctx, verbs.ResolveOptions{Addr: addr, ServiceID: sid})
		if err != nil {
			return err
		}
		s.conn = c
		if s.qp, err = c.CreateQP(s.pd, verbs.QPOptions{SendCQ: s.cq, RecvCQ: s.cq}); err != nil {
			return err
		}
		_, err = c.Connect(ctx, verbs.ConnParam{PrivateData: []byte("hello")})
		return err
	}

	// No listener.
	err := dial(verbs.TCPServiceID(port()))
	var re *verbs.RejectError
	if !errors.Is(err, verbs.ErrRefused) || !errors.As(err, &re) {
		t.Fatalf("no listener: %v, want ErrRefused", err)
	}
	t.Logf("no listener: %v (reason %d)", err, re.Reason)
	if re.Reason != verbs.RejectInvalidServiceID {
		t.Errorf("no listener: reason %v, want %v", re.Reason, verbs.RejectInvalidServiceID)
	}

	// A consumer reject with 148 bytes.
	sid := verbs.TCPServiceID(port())
	ln, err := d.Listen(verbs.ListenOptions{ServiceID: sid})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if ln.Addr().IsValid() || ln.ServiceID() != sid {
		t.Errorf("listener %v %v", ln.Addr(), ln.ServiceID())
	}
	rej := randomBytes(148)
	go func() {
		c, err := ln.Accept(ctx)
		if err != nil {
			return
		}
		if !bytes.HasPrefix(c.PrivateData(), []byte("hello")) {
			t.Errorf("REQ data %q", c.PrivateData())
		}
		c.Reject(rej)
		c.Close()
	}()
	err = dial(sid)
	if !errors.As(err, &re) || re.Reason != verbs.RejectConsumer || !bytes.HasPrefix(re.PrivateData, rej) {
		t.Errorf("reject: %v (%+v), want CONSUMER_DEFINED with the data", err, re)
	}

	// Closing a listener rejects what it had not handed out.
	sid2 := verbs.TCPServiceID(port())
	ln2, err := d.Listen(verbs.ListenOptions{Addr: addr, ServiceID: sid2})
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		l := ln2.(*listener)
		for ctx.Err() == nil {
			l.mu.Lock()
			n := len(l.queue)
			l.mu.Unlock()
			if n > 0 {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		ln2.Close()
	}()
	err = dial(sid2)
	t.Logf("request pending at listener Close: %v", err)
	if !errors.As(err, &re) || re.Reason != verbs.RejectConsumer {
		t.Errorf("request pending at listener Close: %v, want a consumer REJ", err)
	}

	// Resolving an address no one has.
	_, err = d.Resolve(ctx, verbs.ResolveOptions{Addr: netip.MustParseAddr("192.168.255.254"), ServiceID: sid})
	t.Logf("unroutable address: %v", err)
	if !errors.Is(err, verbs.ErrUnreachable) && !errors.Is(err, verbs.ErrTimeout) {
		t.Errorf("unroutable address: %v, want ErrUnreachable", err)
	}
}

// TestGuestTransfer: SEND with several SGEs (checked by hash), SEND with
// immediate, RDMA WRITE and WRITE with immediate, RDMA READ, inline sends, a
// 64-request list in one post, and solicited notification.
func TestGuestTransfer(t *testing.T) {
	d, addr := guestEnv(t)
	const chunk = 64 << 10
	o := pairOpts{
		bufSize: 4 << 20,
		cqSize:  512,
		qp:      verbs.QPOptions{MaxSendWR: 128, MaxRecvWR: 128, MaxSendSGE: 4, MaxRecvSGE: 4, MaxInline: 64},
	}
	srv, cli := connectPair(t, d, addr, o)
	if c := cli.qp.Caps(); c.MaxSendWR < 128 || c.MaxSendSGE < 4 || c.MaxInline < 64 {
		t.Errorf("caps %+v", c)
	}

	// SEND: 3 SGEs out, received into 2 SGEs.
	src := cli.buf()[:3*chunk]
	rand.Read(src)
	if err := srv.qp.PostRecv([]verbs.RecvWR{{ID: 1, SGL: []verbs.SGE{srv.sge(0, 2*chunk), srv.sge(3*chunk, 2*chunk)}}}); err != nil {
		t.Fatal(err)
	}
	if err := cli.qp.PostSend([]verbs.SendWR{{ID: 2, Op: verbs.OpSend, Flags: verbs.SendSignaled,
		SGL: []verbs.SGE{cli.sge(0, chunk), cli.sge(chunk, chunk), cli.sge(2*chunk, chunk)}}}); err != nil {
		t.Fatal(err)
	}
	want(t, poll(t, cli.cq, 1)[0], 2, verbs.StatusSuccess, verbs.CompSend)
	rc := poll(t, srv.cq, 1)[0]
	want(t, rc, 1, verbs.StatusSuccess, verbs.CompRecv)
	got := append(append([]byte(nil), srv.buf()[:2*chunk]...), srv.buf()[3*chunk:4*chunk]...)
	if rc.ByteLen != 3*chunk || sha256.Sum256(got) != sha256.Sum256(src) {
		t.Errorf("SEND: %d bytes, hash mismatch %v", rc.ByteLen, sha256.Sum256(got) != sha256.Sum256(src))
	}

	// SEND with immediate and a zero-length SEND.
	if err := srv.qp.PostRecv([]verbs.RecvWR{{ID: 3, SGL: []verbs.SGE{srv.sge(0, 64)}}, {ID: 4, SGL: []verbs.SGE{srv.sge(64, 64)}}}); err != nil {
		t.Fatal(err)
	}
	if err := cli.qp.PostSend([]verbs.SendWR{
		{ID: 5, Op: verbs.OpSendImm, Imm: 0xc0ffee01, SGL: []verbs.SGE{cli.sge(0, 10)}},
		{ID: 6, Op: verbs.OpSend, Flags: verbs.SendSignaled},
	}); err != nil {
		t.Fatal(err)
	}
	want(t, poll(t, cli.cq, 1)[0], 6, verbs.StatusSuccess, verbs.CompSend) // 5 unsignaled
	rcs := poll(t, srv.cq, 2)
	want(t, rcs[0], 3, verbs.StatusSuccess, verbs.CompRecv)
	if rcs[0].Flags != verbs.WithImm || rcs[0].Imm != 0xc0ffee01 || rcs[0].ByteLen != 10 {
		t.Errorf("SEND_IMM completion %+v", rcs[0])
	}
	want(t, rcs[1], 4, verbs.StatusSuccess, verbs.CompRecv)
	if rcs[1].ByteLen != 0 || rcs[1].Flags != 0 {
		t.Errorf("empty SEND completion %+v", rcs[1])
	}

	// RDMA WRITE 1 MiB, then WRITE with immediate (consumes a receive).
	rand.Read(cli.buf()[:1<<20])
	if err := srv.qp.PostRecv([]verbs.RecvWR{{ID: 7}}); err != nil {
		t.Fatal(err)
	}
	if err := cli.qp.PostSend([]verbs.SendWR{
		{ID: 8, Op: verbs.OpWrite, SGL: []verbs.SGE{cli.sge(0, 1<<20)}, RemoteAddr: srv.mr.Addr() + 1<<20, RKey: srv.mr.RKey()},
		{ID: 9, Op: verbs.OpWriteImm, Flags: verbs.SendSignaled, Imm: 42, SGL: []verbs.SGE{cli.sge(0, 100)}, RemoteAddr: srv.mr.Addr() + 3<<20, RKey: srv.mr.RKey()},
	}); err != nil {
		t.Fatal(err)
	}
	want(t, poll(t, cli.cq, 1)[0], 9, verbs.StatusSuccess, verbs.CompWrite)
	rc = poll(t, srv.cq, 1)[0]
	want(t, rc, 7, verbs.StatusSuccess, verbs.CompRecvWriteImm)
	if rc.Imm != 42 || rc.Flags != verbs.WithImm || rc.ByteLen != 100 {
		t.Errorf("WRITE_IMM completion %+v", rc)
	}
	if sha256.Sum256(srv.buf()[1<<20:2<<20]) != sha256.Sum256(cli.buf()[:1<<20]) || !bytes.Equal(srv.buf()[3<<20:3<<20+100], cli.buf()[:100]) {
		t.Error("RDMA WRITE data differ")
	}

	// RDMA READ it back into another place.
	if err := cli.qp.PostSend([]verbs.SendWR{{ID: 10, Op: verbs.OpRead, Flags: verbs.SendSignaled,
		SGL: []verbs.SGE{cli.sge(2<<20, 1<<20)}, RemoteAddr: srv.mr.Addr() + 1<<20, RKey: srv.mr.RKey()}}); err != nil {
		t.Fatal(err)
	}
	rc = poll(t, cli.cq, 1)[0]
	want(t, rc, 10, verbs.StatusSuccess, verbs.CompRead)
	if sha256.Sum256(cli.buf()[2<<20:3<<20]) != sha256.Sum256(cli.buf()[:1<<20]) {
		t.Error("RDMA READ data differ")
	}
	t.Logf("READ completion byte_len %d", rc.ByteLen)

	// Inline: the source may change right after the post.
	if err := srv.qp.PostRecv([]verbs.RecvWR{{ID: 11, SGL: []verbs.SGE{srv.sge(0, 64)}}}); err != nil {
		t.Fatal(err)
	}
	copy(cli.buf(), "inline payload")
	if err := cli.qp.PostSend([]verbs.SendWR{{ID: 12, Op: verbs.OpSend, Flags: verbs.SendSignaled | verbs.SendInline, SGL: []verbs.SGE{cli.sge(0, 14)}}}); err != nil {
		t.Fatal(err)
	}
	copy(cli.buf(), "XXXXXXXXXXXXXX")
	want(t, poll(t, cli.cq, 1)[0], 12, verbs.StatusSuccess, verbs.CompSend)
	want(t, poll(t, srv.cq, 1)[0], 11, verbs.StatusSuccess, verbs.CompRecv)
	if string(srv.buf()[:14]) != "inline payload" {
		t.Errorf("inline data %q", srv.buf()[:14])
	}

	// 64 sends in one post, 64 receives in one post, polled in batches;
	// each carries its index, checked by content.
	const n = 64
	rw := make([]verbs.RecvWR, n)
	sw := make([]verbs.SendWR, n)
	for i := range n {
		rw[i] = verbs.RecvWR{ID: uint64(100 + i), SGL: []verbs.SGE{srv.sge(i*1024, 1024)}}
		copy(cli.buf()[i*1024:], fmt.Sprintf("message %03d", i))
		sw[i] = verbs.SendWR{ID: uint64(200 + i), Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{cli.sge(i*1024, 11)}}
	}
	if err := srv.qp.PostRecv(rw); err != nil {
		t.Fatal(err)
	}
	if err := cli.qp.PostSend(sw); err != nil {
		t.Fatal(err)
	}
	for i, c := range poll(t, cli.cq, n) {
		want(t, c, uint64(200+i), verbs.StatusSuccess, verbs.CompSend)
	}
	for i, c := range poll(t, srv.cq, n) {
		want(t, c, uint64(100+i), verbs.StatusSuccess, verbs.CompRecv)
		if got := string(srv.buf()[i*1024 : i*1024+11]); got != fmt.Sprintf("message %03d", i) {
			t.Errorf("message %d = %q", i, got)
		}
	}

	// Solicited-only notification: an unsolicited message does not wake
	// the waiter, a solicited one does.
	if err := srv.qp.PostRecv([]verbs.RecvWR{{ID: 13, SGL: []verbs.SGE{srv.sge(0, 64)}}, {ID: 14, SGL: []verbs.SGE{srv.sge(64, 64)}}}); err != nil {
		t.Fatal(err)
	}
	if err := srv.cq.Notify(true); err != nil {
		t.Fatal(err)
	}
	if err := cli.qp.PostSend([]verbs.SendWR{{ID: 15, Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{cli.sge(0, 8)}}}); err != nil {
		t.Fatal(err)
	}
	want(t, poll(t, cli.cq, 1)[0], 15, verbs.StatusSuccess, verbs.CompSend)
	wctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	if err := srv.cq.Wait(wctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Wait after an unsolicited message = %v, want the deadline", err)
	}
	cancel()
	if err := cli.qp.PostSend([]verbs.SendWR{{ID: 16, Op: verbs.OpSend, Flags: verbs.SendSignaled | verbs.SendSolicited, SGL: []verbs.SGE{cli.sge(0, 8)}}}); err != nil {
		t.Fatal(err)
	}
	wctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	if err := srv.cq.Wait(wctx); err != nil {
		t.Errorf("Wait after a solicited message: %v", err)
	}
	cancel()
	want(t, poll(t, cli.cq, 1)[0], 16, verbs.StatusSuccess, verbs.CompSend)
	rcs = poll(t, srv.cq, 2)
	want(t, rcs[0], 13, verbs.StatusSuccess, verbs.CompRecv)
	want(t, rcs[1], 14, verbs.StatusSuccess, verbs.CompRecv)

	// A waiter is woken by Close of... its context; Wait on a closed CQ.
	wctx, cancel = context.WithCancel(context.Background())
	go func() { time.Sleep(50 * time.Millisecond); cancel() }()
	if err := cli.cq.Wait(wctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Wait canceled = %v", err)
	}
}

// TestGuestErrors: a bad rkey (remote access error, then everything
// flushes), a receive too small (local length error), a send with no
// receive posted and RNR retry 0, and posting before the connection exists.
func TestGuestErrors(t *testing.T) {
	d, addr := guestEnv(t)

	t.Run("rkey", func(t *testing.T) {
		srv, cli := connectPair(t, d, addr, pairOpts{bufSize: 1 << 16})
		if err := cli.qp.PostSend([]verbs.SendWR{
			{ID: 1, Op: verbs.OpWrite, Flags: verbs.SendSignaled, SGL: []verbs.SGE{cli.sge(0, 64)}, RemoteAddr: srv.mr.Addr(), RKey: srv.mr.RKey() ^ 0xff00},
			{ID: 2, Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{cli.sge(0, 8)}},
		}); err != nil {
			t.Fatal(err)
		}
		cs := poll(t, cli.cq, 2)
		want(t, cs[0], 1, verbs.StatusRemoteAccess, 0)
		want(t, cs[1], 2, verbs.StatusFlushed, 0)
		if st := cli.qp.State(); st != verbs.QPError {
			t.Errorf("requester state %v, want ERR", st)
		}
		var ce *verbs.CompletionError
		if err := cs[0].Err(); !errors.As(err, &ce) || !errors.Is(err, verbs.ErrCompletion) {
			t.Errorf("Err() = %v", err)
		}
		// Requests posted in the error state flush.
		if err := cli.qp.PostSend([]verbs.SendWR{{ID: 3, Op: verbs.OpSend, Flags: verbs.SendSignaled}}); err != nil {
			t.Errorf("post in ERR: %v", err)
		} else {
			want(t, poll(t, cli.cq, 1)[0], 3, verbs.StatusFlushed, 0)
		}
		// A receive posted in the error state flushes too (on rxe only
		// thanks to qp.flushRecv).
		if err := cli.qp.PostRecv([]verbs.RecvWR{{ID: 4}}); err != nil {
			t.Errorf("post recv in ERR: %v", err)
		} else {
			want(t, poll(t, cli.cq, 1)[0], 4, verbs.StatusFlushed, 0)
		}
		// The responder is in the error state. IBA: with the affiliated
		// asynchronous error IBV_EVENT_QP_ACCESS_ERR. rxe deviation: its
		// responder moves the QP to the error state without the event
		// (rxe_resp.c: do_class_ac_error, rxe_qp_error).
		var sawAccess bool
		for e := range drainEvents(srv.conn, 2*time.Second) {
			t.Logf("responder event: %v", e)
			sawAccess = sawAccess || e.Type == verbs.EventQPAccessError
		}
		if st := srv.qp.State(); st != verbs.QPError {
			t.Errorf("responder state %v, want ERR", st)
		}
		if sawAccess == isRXE(d) {
			t.Errorf("responder QP_ACCESS_ERR event seen: %v (rxe: %v)", sawAccess, isRXE(d))
		}
	})

	t.Run("length", func(t *testing.T) {
		srv, cli := connectPair(t, d, addr, pairOpts{bufSize: 1 << 16})
		if err := srv.qp.PostRecv([]verbs.RecvWR{{ID: 1, SGL: []verbs.SGE{srv.sge(0, 16)}}}); err != nil {
			t.Fatal(err)
		}
		if err := cli.qp.PostSend([]verbs.SendWR{{ID: 2, Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{cli.sge(0, 17)}}}); err != nil {
			t.Fatal(err)
		}
		// IBA: LOC_LEN_ERR at the responder, REM_INV_REQ_ERR at the
		// requester. rxe deviation (Linux 6.1): its responder reports
		// every failed copy as a malformed WQE, LOC_QP_OP_ERR, and NAKs
		// with a remote operational error, REM_OP_ERR.
		wantRecv, wantSend := verbs.StatusLocalLength, verbs.StatusRemoteInvalidReq
		if isRXE(d) {
			wantRecv, wantSend = verbs.StatusLocalQPOp, verbs.StatusRemoteOp
		}
		rc := poll(t, srv.cq, 1)[0]
		c := poll(t, cli.cq, 1)[0]
		t.Logf("too-long message: responder %v, requester %v", rc.Status, c.Status)
		want(t, rc, 1, wantRecv, 0)
		want(t, c, 2, wantSend, 0)
	})

	t.Run("rnr", func(t *testing.T) {
		// RNRRetry 0 on both sides: whichever side's value reaches the
		// client's QP, it does not retry.
		_, cli := connectPair(t, d, addr, pairOpts{bufSize: 1 << 16, cparam: verbs.ConnParam{RNRRetry: 0}, sparam: verbs.ConnParam{RNRRetry: 0}})
		start := time.Now()
		if err := cli.qp.PostSend([]verbs.SendWR{{ID: 1, Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{cli.sge(0, 8)}}}); err != nil {
			t.Fatal(err)
		}
		want(t, poll(t, cli.cq, 1)[0], 1, verbs.StatusRNRRetryExceeded, 0)
		t.Logf("RNR retry exceeded after %v", time.Since(start))
	})

	t.Run("init", func(t *testing.T) {
		// Before Connect the QP is in INIT: receives may be posted, sends
		// may not.
		sid := verbs.TCPServiceID(port())
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		ln, err := d.Listen(verbs.ListenOptions{Addr: addr, ServiceID: sid})
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		o := pairOpts{bufSize: 4096}
		s := newSide(t, d, &o)
		if s.conn, err = d.Resolve(ctx, verbs.ResolveOptions{Addr: addr, ServiceID: sid}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.conn.Connect(ctx, verbs.ConnParam{}); !errors.Is(err, verbs.ErrQPState) {
			t.Errorf("Connect before CreateQP = %v, want ErrQPState", err)
		}
		if s.qp, err = s.conn.CreateQP(s.pd, verbs.QPOptions{SendCQ: s.cq, RecvCQ: s.cq}); err != nil {
			t.Fatal(err)
		}
		if s.conn.QP() != s.qp {
			t.Error("Conn.QP is not the created QP")
		}
		if _, err := s.conn.CreateQP(s.pd, verbs.QPOptions{SendCQ: s.cq, RecvCQ: s.cq}); !errors.Is(err, verbs.ErrBusy) {
			t.Errorf("second CreateQP = %v", err)
		}
		if st := s.qp.State(); st != verbs.QPInit {
			t.Errorf("state %v, want INIT", st)
		}
		if err := s.qp.PostRecv([]verbs.RecvWR{{ID: 1, SGL: []verbs.SGE{s.sge(0, 64)}}}); err != nil {
			t.Errorf("PostRecv in INIT: %v", err)
		}
		err = s.qp.PostSend([]verbs.SendWR{{ID: 2, Op: verbs.OpSend, SGL: []verbs.SGE{s.sge(0, 8)}}})
		t.Logf("PostSend in INIT: %v", err)
		var pe *verbs.PostError
		if !errors.As(err, &pe) || pe.Index != 0 || !errors.Is(err, verbs.ErrQPState) {
			t.Errorf("PostSend in INIT = %v, want PostError 0 with ErrQPState", err)
		}
		// Invalid requests stop the list at their index.
		err = s.qp.PostSend([]verbs.SendWR{{ID: 3, Op: 0}})
		if !errors.As(err, &pe) || pe.Index != 0 || !errors.Is(err, verbs.ErrInvalid) {
			t.Errorf("opcode 0: %v", err)
		}
		if err := s.qp.Modify(verbs.QPRTR); !errors.Is(err, verbs.ErrQPState) {
			t.Errorf("Modify to RTR = %v, want ErrQPState", err)
		}
		if err := s.qp.Modify(verbs.QPError); err != nil {
			t.Errorf("Modify to ERR: %v", err)
		}
		want(t, poll(t, s.cq, 1)[0], 1, verbs.StatusFlushed, 0)
		if err := s.qp.Modify(verbs.QPReset); err != nil || s.qp.State() != verbs.QPReset {
			t.Errorf("Modify to RESET: %v, state %v", err, s.qp.State())
		}
	})
}

func drainEvents(c verbs.Conn, d time.Duration) <-chan verbs.Event {
	out := make(chan verbs.Event, verbs.EventQueueLen)
	go func() {
		defer close(out)
		timer := time.NewTimer(d)
		defer timer.Stop()
		for {
			select {
			case e, ok := <-c.Events():
				if !ok {
					return
				}
				out <- e
			case <-timer.C:
				return
			}
		}
	}()
	return out
}

// TestGuestMW: a type-2 window bound through the QP gives the peer exactly
// its range; a local invalidate and a SEND with invalidate revoke it.
func TestGuestMW(t *testing.T) {
	d, addr := guestEnv(t)
	srv, cli := connectPair(t, d, addr, pairOpts{bufSize: 1 << 16})
	mw, err := srv.pd.AllocMW()
	if err != nil {
		t.Fatal(err)
	}
	defer mw.Close()
	if mw.Bound() {
		t.Error("new window bound")
	}
	bind := func(id uint64, off, n int, acc verbs.Access) uint32 {
		t.Helper()
		key := verbs.IncRKey(mw.RKey())
		if err := srv.qp.PostSend([]verbs.SendWR{{ID: id, Op: verbs.OpBindMW, Flags: verbs.SendSignaled,
			Bind: verbs.Bind{MW: mw, RKey: key, MR: srv.mr, Addr: srv.mr.Addr() + uint64(off), Length: uint64(n), Access: acc}}}); err != nil {
			t.Fatal(err)
		}
		want(t, poll(t, srv.cq, 1)[0], id, verbs.StatusSuccess, verbs.CompBindMW)
		return key
	}
	key := bind(1, 4096, 4096, verbs.AccessRemoteWrite|verbs.AccessRemoteRead)
	if !mw.Bound() || mw.RKey() != key {
		t.Errorf("after bind: bound %v key %#x, want %#x", mw.Bound(), mw.RKey(), key)
	}
	if err := srv.mr.Close(); !errors.Is(err, verbs.ErrBusy) {
		t.Errorf("MR Close with a bound window = %v", err)
	}
	// The peer writes through the window.
	copy(cli.buf(), "through the window")
	if err := cli.qp.PostSend([]verbs.SendWR{{ID: 2, Op: verbs.OpWrite, Flags: verbs.SendSignaled, SGL: []verbs.SGE{cli.sge(0, 18)},
		RemoteAddr: srv.mr.Addr() + 4096 + 100, RKey: key}}); err != nil {
		t.Fatal(err)
	}
	want(t, poll(t, cli.cq, 1)[0], 2, verbs.StatusSuccess, verbs.CompWrite)
	if got := string(srv.buf()[4196 : 4196+18]); got != "through the window" {
		t.Errorf("window write landed as %q", got)
	}
	// Local invalidate.
	if err := srv.qp.PostSend([]verbs.SendWR{{ID: 3, Op: verbs.OpLocalInv, Flags: verbs.SendSignaled, InvRKey: key}}); err != nil {
		t.Fatal(err)
	}
	want(t, poll(t, srv.cq, 1)[0], 3, verbs.StatusSuccess, verbs.CompLocalInv)
	if mw.Bound() {
		t.Error("bound after LOCAL_INV")
	}
	// Rebind, then the peer invalidates it with SEND_WITH_INV.
	key = bind(4, 0, 1024, verbs.AccessRemoteRead)
	if err := srv.qp.PostRecv([]verbs.RecvWR{{ID: 5, SGL: []verbs.SGE{srv.sge(8192, 64)}}}); err != nil {
		t.Fatal(err)
	}
	if err := cli.qp.PostSend([]verbs.SendWR{{ID: 6, Op: verbs.OpSendInv, Flags: verbs.SendSignaled, InvRKey: key, SGL: []verbs.SGE{cli.sge(0, 4)}}}); err != nil {
		t.Fatal(err)
	}
	want(t, poll(t, cli.cq, 1)[0], 6, verbs.StatusSuccess, verbs.CompSend)
	rc := poll(t, srv.cq, 1)[0]
	want(t, rc, 5, verbs.StatusSuccess, verbs.CompRecv)
	if rc.Flags != verbs.WithInv || rc.InvalidatedRKey != key {
		t.Errorf("SEND_WITH_INV completion %+v, want WithInv %#x", rc, key)
	}
	if mw.Bound() {
		t.Error("bound after the peer's SEND_WITH_INV")
	}
	// The stale key is refused: a remote access error.
	if err := cli.qp.PostSend([]verbs.SendWR{{ID: 7, Op: verbs.OpRead, Flags: verbs.SendSignaled, SGL: []verbs.SGE{cli.sge(0, 8)},
		RemoteAddr: srv.mr.Addr(), RKey: key}}); err != nil {
		t.Fatal(err)
	}
	want(t, poll(t, cli.cq, 1)[0], 7, verbs.StatusRemoteAccess, 0)
}

// TestGuestRXEWindowBounds pins a soft-RoCE deviation: rxe checks an access
// through a type-2 window against the region's bounds, not the window's
// (rxe_resp.c check_rkey calls mr_check_range only), so a READ that starts
// inside the window and ends past it succeeds. IBA 10.6.7.2: it must fail
// with a remote access error. On other devices the test expects the IBA
// behaviour.
func TestGuestRXEWindowBounds(t *testing.T) {
	d, addr := guestEnv(t)
	srv, cli := connectPair(t, d, addr, pairOpts{bufSize: 1 << 16})
	mw, err := srv.pd.AllocMW()
	if err != nil {
		t.Fatal(err)
	}
	defer mw.Close()
	key := verbs.IncRKey(mw.RKey())
	if err := srv.qp.PostSend([]verbs.SendWR{{ID: 1, Op: verbs.OpBindMW, Flags: verbs.SendSignaled,
		Bind: verbs.Bind{MW: mw, RKey: key, MR: srv.mr, Addr: srv.mr.Addr() + 4096, Length: 8192, Access: verbs.AccessRemoteRead}}}); err != nil {
		t.Fatal(err)
	}
	want(t, poll(t, srv.cq, 1)[0], 1, verbs.StatusSuccess, verbs.CompBindMW)
	if err := cli.qp.PostSend([]verbs.SendWR{{ID: 2, Op: verbs.OpRead, Flags: verbs.SendSignaled, SGL: []verbs.SGE{cli.sge(0, 16)},
		RemoteAddr: srv.mr.Addr() + 4096 + 8192 - 8, RKey: key}}); err != nil {
		t.Fatal(err)
	}
	c := poll(t, cli.cq, 1)[0]
	t.Logf("READ of 16 bytes crossing the window's end: %v", c.Status)
	if isRXE(d) {
		want(t, c, 2, verbs.StatusSuccess, verbs.CompRead)
	} else {
		want(t, c, 2, verbs.StatusRemoteAccess, 0)
	}
}

// TestGuestQueueDepth measures how many requests a send queue really takes:
// a list longer than that fails with ErrQueueFull at the first request that
// does not fit. rxe deviation: its rings hold more than the depth it reports
// (librxe rounds the ring up to a power of two), so posting one more than
// QPCaps.MaxSendWR succeeds.
func TestGuestQueueDepth(t *testing.T) {
	d, addr := guestEnv(t)
	_, cli := connectPair(t, d, addr, pairOpts{bufSize: 4096, cqSize: 512, qp: verbs.QPOptions{MaxSendWR: 16}})
	depth := cli.qp.Caps().MaxSendWR
	wrs := make([]verbs.SendWR, 256)
	for i := range wrs {
		wrs[i] = verbs.SendWR{ID: uint64(i), Op: verbs.OpWrite} // zero-length: no key needed
	}
	err := cli.qp.PostSend(wrs)
	var pe *verbs.PostError
	if !errors.As(err, &pe) || !errors.Is(err, verbs.ErrQueueFull) {
		t.Fatalf("posting %d on a queue of %d: %v, want a PostError with ErrQueueFull", len(wrs), depth, err)
	}
	t.Logf("send queue asked 16, reported %d, took %d", depth, pe.Index)
	if pe.Index < depth || (!isRXE(d) && pe.Index != depth) {
		t.Errorf("the queue took %d requests; it reports %d", pe.Index, depth)
	}
	// Let the unsignaled writes finish before the QP is destroyed.
	if err := cli.qp.PostSend([]verbs.SendWR{{ID: 999, Op: verbs.OpWrite, Flags: verbs.SendSignaled}}); err == nil {
		poll(t, cli.cq, 1)
	}
}

// TestGuestRetryAttrs: each side's ConnParam retry counts and QPOptions
// MinRNRTimer reach its own queue pair (the IB CM alone would give each side
// the counts the peer's message carried).
func TestGuestRetryAttrs(t *testing.T) {
	d, addr := guestEnv(t)
	srv, cli := connectPair(t, d, addr, pairOpts{
		bufSize: 4096,
		qp:      verbs.QPOptions{MinRNRTimer: 2 * time.Millisecond},
		cparam:  verbs.ConnParam{RNRRetry: 3, RetryCount: 5},
		sparam:  verbs.ConnParam{RNRRetry: 6, RetryCount: 2},
	})
	ca, err := QueryRetry(cli.qp)
	if err != nil {
		t.Fatal(err)
	}
	sa, err := QueryRetry(srv.qp)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("client (RNRRetry 3, RetryCount 5): %+v", ca)
	t.Logf("server (RNRRetry 6, RetryCount 2): %+v", sa)
	if ca.MinRNRTimer != 2560*time.Microsecond || sa.MinRNRTimer != 2560*time.Microsecond {
		t.Errorf("min RNR timer %v / %v, want 2.56 ms", ca.MinRNRTimer, sa.MinRNRTimer)
	}
	if ca.RNRRetry != 3 || ca.RetryCount != 5 {
		t.Errorf("client retry counts %d/%d, want RNR 3, transport 5", ca.RNRRetry, ca.RetryCount)
	}
	if sa.RNRRetry != 6 || sa.RetryCount != 2 {
		t.Errorf("server retry counts %d/%d, want RNR 6, transport 2", sa.RNRRetry, sa.RetryCount)
	}
}

// TestGuestSDP: no listener on an SDP service ID; an active connect with
// AF_IB on this device.
func TestGuestSDP(t *testing.T) {
	d, addr := guestEnv(t)
	sid := verbs.SDPServiceID(port())
	_, err := d.Listen(verbs.ListenOptions{Addr: addr, ServiceID: sid})
	if !errors.Is(err, verbs.ErrNotSupported) {
		t.Errorf("Listen(%v) = %v, want ErrNotSupported", sid, err)
	}
	lim, lerr := d.PrivateDataLimits(sid)
	t.Logf("transport %s; PrivateDataLimits(%v) = %+v, %v", d.Info().Transport, sid, lim, lerr)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := d.Resolve(ctx, verbs.ResolveOptions{Addr: addr, ServiceID: sid})
	t.Logf("Resolve with AF_IB and %v: %v", sid, err)
	if err == nil {
		defer c.Close()
	}
	if d.Info().Transport == "roce" {
		if !errors.Is(lerr, verbs.ErrNotSupported) {
			t.Errorf("PrivateDataLimits on RoCE: %v, want ErrNotSupported", lerr)
		}
		if !errors.Is(err, verbs.ErrNotSupported) {
			t.Errorf("AF_IB Resolve on RoCE: %v, want ErrNotSupported", err)
		}
	}
}

// TestGuestCQOverflow: a CQ smaller than the completions it receives.
func TestGuestCQOverflow(t *testing.T) {
	d, addr := guestEnv(t)
	srv, cli := connectPair(t, d, addr, pairOpts{bufSize: 4096, cqSize: 4, qp: verbs.QPOptions{MaxSendWR: 32, MaxRecvWR: 32}})
	t.Logf("CQ of 4 holds %d", cli.cq.Cap())
	n := cli.cq.Cap() + 4
	sw := make([]verbs.SendWR, n)
	rw := make([]verbs.RecvWR, n)
	for i := range sw {
		sw[i] = verbs.SendWR{ID: uint64(i), Op: verbs.OpSend, Flags: verbs.SendSignaled}
		rw[i] = verbs.RecvWR{ID: uint64(i)}
	}
	if err := srv.qp.PostRecv(rw[:srv.cq.Cap()]); err != nil {
		t.Fatal(err)
	}
	if err := cli.qp.PostSend(sw); err != nil {
		t.Fatal(err)
	}
	var got int
	var perr error
	deadline := time.Now().Add(10 * time.Second)
	wc := make([]verbs.Completion, 64)
	time.Sleep(500 * time.Millisecond) // let the sends complete into the small CQ
	for time.Now().Before(deadline) {
		k, err := cli.cq.Poll(wc)
		got += k
		if err != nil {
			perr = err
			break
		}
		if k == 0 {
			time.Sleep(20 * time.Millisecond)
		}
	}
	t.Logf("polled %d completions of %d; error %v; events:", got, n, perr)
	for e := range drainEvents(cli.conn, time.Second) {
		t.Logf("  %v", e)
	}
	if !errors.Is(perr, verbs.ErrCQOverflow) {
		t.Errorf("Poll after overflow: %v, want ErrCQOverflow", perr)
	}
}

// nextEventOf waits for an event of type typ, skipping others.
func nextEventOf(t *testing.T, c verbs.Conn, typ verbs.EventType, d time.Duration) verbs.Event {
	t.Helper()
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		select {
		case e, ok := <-c.Events():
			if !ok || e.Type == typ {
				return e
			}
		case <-timer.C:
			return verbs.Event{}
		}
	}
}

func putU64(b []byte, v uint64) {
	for i := range 8 {
		b[i] = byte(v >> (56 - 8*i))
	}
}

func putU32(b []byte, v uint32) {
	for i := range 4 {
		b[i] = byte(v >> (24 - 8*i))
	}
}

func getU64(b []byte) uint64 {
	var v uint64
	for i := range 8 {
		v = v<<8 | uint64(b[i])
	}
	return v
}

func getU32(b []byte) uint32 {
	var v uint32
	for i := range 4 {
		v = v<<8 | uint32(b[i])
	}
	return v
}

// TestGuestConcurrentClose: posts and polls racing with QP.Close get
// ErrClosed rather than touching a destroyed queue pair, and Close of a CQ
// wakes its waiter.
func TestGuestConcurrentClose(t *testing.T) {
	d, addr := guestEnv(t)
	srv, cli := connectPair(t, d, addr, pairOpts{bufSize: 1 << 16})
	var wg sync.WaitGroup
	var posted, closedSeen atomic.Int64
	stop := make(chan struct{})
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			wc := make([]verbs.Completion, 8)
			for {
				select {
				case <-stop:
					return
				default:
				}
				err := cli.qp.PostSend([]verbs.SendWR{{Op: verbs.OpWrite, Flags: verbs.SendSignaled, SGL: []verbs.SGE{cli.sge(0, 8)}, RemoteAddr: srv.mr.Addr(), RKey: srv.mr.RKey()}})
				switch {
				case err == nil:
					posted.Add(1)
				case errors.Is(err, verbs.ErrClosed):
					closedSeen.Add(1)
				}
				cli.cq.Poll(wc)
			}
		}()
	}
	time.Sleep(300 * time.Millisecond)
	if err := cli.qp.Close(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	close(stop)
	wg.Wait()
	t.Logf("%d posts before Close, %d refused after", posted.Load(), closedSeen.Load())
	if posted.Load() == 0 || closedSeen.Load() == 0 {
		t.Error("the race did not happen: no post before or none after Close")
	}
	if err := cli.qp.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if cli.conn.QP() != nil || cli.qp.State() != verbs.QPReset {
		t.Errorf("after Close: Conn.QP %v, state %v", cli.conn.QP(), cli.qp.State())
	}
	cli.qp = nil

	cq, err := d.CreateCQ(verbs.CQOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := cq.Notify(false); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cq.Wait(context.Background()) }()
	time.Sleep(50 * time.Millisecond)
	if err := cq.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, verbs.ErrClosed) {
			t.Errorf("Wait woken by Close = %v, want ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not wake the waiter")
	}
	if _, err := cq.Poll(make([]verbs.Completion, 1)); !errors.Is(err, verbs.ErrClosed) {
		t.Errorf("Poll after Close = %v", err)
	}
}

// conformanceConfig is the verbstest configuration for rdma-core: IP
// addressing in RDMA_PS_TCP, and the provider whose known deviations the
// suite reports (soft-RoCE's for an rxe device).
func conformanceConfig(d *Device, base uint16) verbstest.Config {
	cfg := verbstest.Config{ServiceID: verbs.TCPServiceID, BasePort: base}
	if isRXE(d) {
		cfg.Provider = verbstest.ProviderRXE
	}
	return cfg
}

// TestGuestConformance runs the verbs conformance suite with both halves in
// this process: two Devices opened on the same RDMA device, connections
// looped back by it.
func TestGuestConformance(t *testing.T) {
	d, addr := guestEnv(t)
	name := d.Info().Name
	fabric := func(t testing.TB) (verbstest.Side, verbstest.Side) {
		t.Helper()
		var sides [2]verbstest.Side
		for i := range sides {
			dev, err := Open(name)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				if err := dev.Close(); err != nil {
					t.Errorf("close: %v", err)
				}
			})
			sides[i] = verbstest.Side{Device: dev, Addr: addr}
		}
		return sides[0], sides[1]
	}
	verbstest.Run(t, fabric, conformanceConfig(d, 19000))
}

// TestGuestConformancePeer runs one half of the conformance suite; TestVMIbv
// runs the passive half in one guest and the active half in the other.
func TestGuestConformancePeer(t *testing.T) {
	d, addr := guestEnv(t)
	cfg := conformanceConfig(d, 19100)
	switch role := os.Getenv(envRole); role {
	case "passive":
		verbstest.RunPassive(t, verbstest.Side{Device: d, Addr: addr}, cfg)
	case "active":
		peer, err := netip.ParseAddr(os.Getenv(envPeer))
		if err != nil {
			t.Fatal(err)
		}
		verbstest.RunActive(t, verbstest.Side{Device: d, Addr: addr}, peer, cfg)
	case "":
		t.Skipf("needs %s=passive|active and %s: runs in TestVMIbv's two guests", envRole, envPeer)
	default:
		t.Fatalf("%s=%q", envRole, role)
	}
}
