//go:build linux && cgo

package ibv

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/vsdp/vsdp/verbs"
)

// The transfer TestGuestPeer runs, shared with TestVMIbv so that perftest
// runs the same sizes and counts.
const (
	peerBig      = 64 << 10 // the large message size
	peerSmall    = 4 << 10  // the small message size
	peerTotal    = 8 << 20  // bytes moved per operation at peerBig
	peerSmallTot = 1 << 20  // bytes moved per operation at peerSmall
	peerSlots    = 64       // server receive buffers; client READ targets
	peerWindow   = 16       // requests in flight
	peerLatSize  = 64       // the ping-pong message
	peerLatWarm  = 20       // ping-pongs not timed, per mode
	peerLatIters = 300      // ping-pongs timed, per mode
)

// peerCount is the number of messages an operation moves at size.
func peerCount(size int) int {
	if size == peerSmall {
		return peerSmallTot / size
	}
	return peerTotal / size
}

// TestGuestPeer is one half of a two-guest transfer (TestVMIbv runs the
// server in one guest and the client in the other). The client sends 8 MiB
// with 64 KiB SENDs and 1 MiB with 4 KiB SENDs, writes the server's area
// with 64 KiB RDMA WRITEs (blocks reversed) and rewrites its first MiB with
// the same bytes in 4 KiB WRITEs, then reads it back with 64 KiB and 4 KiB
// RDMA READs; each phase is a pipeline with a window of 16, and both sides
// check SHA-256 digests. Then 64-byte SEND ping-pongs, first with both
// sides busy-polling their CQ, then with both sides waiting on the
// completion channel (events); the echo is checked. The client prints
// "RATE op size MiB/s" per phase and "LAT mode size µs" (half the average
// round trip, perftest's convention) for TestVMIbv's table.
func TestGuestPeer(t *testing.T) {
	d, addr := guestEnv(t)
	role := os.Getenv(envRole)
	if role == "" {
		t.Skipf("needs %s and %s: runs in TestVMIbv's two guests", envRole, envPeer)
	}
	o := pairOpts{bufSize: peerTotal + peerSlots*peerBig, cqSize: 256}
	s := newSide(t, d, &o)
	qo := verbs.QPOptions{SendCQ: s.cq, RecvCQ: s.cq, MaxSendWR: 64, MaxRecvWR: peerSlots,
		MinRNRTimer: time.Millisecond} // a sender that outruns the reposts waits 1.28 ms, not 655
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	sid := verbs.TCPServiceID(envPort)
	// The REP carries the server's region (address, rkey); the last SEND
	// carries the client's digests.
	switch role {
	case "server":
		peerServer(ctx, t, d, addr, s, qo, sid)
	case "client":
		peer, err := netip.ParseAddr(os.Getenv(envPeer))
		if err != nil {
			t.Fatal(err)
		}
		peerClient(ctx, t, d, peer, s, qo, sid)
	default:
		t.Fatalf("%s=%q", envRole, role)
	}
}

// slotSGE describes receive slot i of the side's region.
func (s *side) slotSGE(i int) verbs.SGE {
	return s.sge(peerTotal+i%peerSlots*peerBig, peerBig)
}

func (s *side) slot(i int) []byte { return s.buf()[peerTotal+i%peerSlots*peerBig:][:peerBig] }

func peerServer(ctx context.Context, t *testing.T, d *Device, addr netip.Addr, s *side, qo verbs.QPOptions, sid verbs.ServiceID) {
	ln, err := d.Listen(verbs.ListenOptions{Addr: addr, ServiceID: sid})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := ln.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	s.conn = c
	if s.qp, err = c.CreateQP(s.pd, qo); err != nil {
		t.Fatal(err)
	}
	rw := make([]verbs.RecvWR, peerSlots)
	for i := range rw {
		rw[i] = verbs.RecvWR{ID: uint64(i), SGL: []verbs.SGE{s.slotSGE(i)}}
	}
	if err := s.qp.PostRecv(rw); err != nil {
		t.Fatal(err)
	}
	rep := make([]byte, 12)
	putU64(rep, s.mr.Addr())
	putU32(rep[8:], s.mr.RKey())
	if err := c.Accept(ctx, verbs.ConnParam{PrivateData: rep, RNRRetry: 7, RetryCount: 7}); err != nil { // the link may drop packets
		t.Fatal(err)
	}

	// recv returns the next receive's bytes (a copy); its slot is reposted,
	// in a batch with others, before the next wait. Send completions (of
	// echoes) are checked and passed over.
	wc := make([]verbs.Completion, 32)
	var pending []verbs.Completion
	var repost []verbs.RecvWR
	recv := func(wait waitFunc) []byte {
		t.Helper()
		for {
			for len(pending) > 0 {
				c := pending[0]
				pending = pending[1:]
				if c.Err() != nil {
					t.Fatal(c.Err())
				}
				if c.Op != verbs.CompRecv {
					continue
				}
				repost = append(repost, verbs.RecvWR{ID: c.ID, SGL: []verbs.SGE{s.slotSGE(int(c.ID))}})
				return append([]byte(nil), s.slot(int(c.ID))[:c.ByteLen]...)
			}
			if len(repost) > 0 {
				if err := s.qp.PostRecv(repost); err != nil {
					t.Fatal(err)
				}
				repost = repost[:0]
			}
			k, err := wait(ctx, s.cq, wc)
			if err != nil {
				t.Fatal(err)
			}
			pending = append(pending[:0], wc[:k]...)
		}
	}

	// The SEND stream: the 64 KiB phase then the 4 KiB phase.
	const streamed = peerTotal + peerSmallTot
	h := sha256.New()
	start := time.Now()
	for n := 0; n < streamed; {
		data := recv(verbs.PollWait)
		h.Write(data)
		n += len(data)
	}
	t.Logf("received %d bytes by SEND in %v", streamed, time.Since(start))
	digest := recv(verbs.PollWait)
	if len(digest) != 64 {
		t.Fatalf("digest message of %d bytes", len(digest))
	}
	if !bytes.Equal(h.Sum(nil), digest[:32]) {
		t.Error("SEND stream digest differs")
	}
	if sum := sha256.Sum256(s.buf()[:peerTotal]); !bytes.Equal(sum[:], digest[32:]) {
		t.Error("RDMA WRITE area digest differs")
	}

	// Echo the ping-pongs, waiting and signalling as the client does.
	i := 0
	for _, b := range latSchedule() {
		for j := 0; j < b.n; j, i = j+1, i+1 {
			ping := recv(b.mode.wait)
			if len(ping) != peerLatSize {
				t.Fatalf("%s ping %d of %d bytes", b.mode.name, i, len(ping))
			}
			copy(s.buf(), ping)
			var flags verbs.SendFlags
			if b.mode.signaled(i) {
				flags = verbs.SendSignaled
			}
			if err := s.qp.PostSend([]verbs.SendWR{{ID: uint64(i), Op: verbs.OpSend, Flags: flags, SGL: []verbs.SGE{s.sge(0, peerLatSize)}}}); err != nil {
				t.Fatal(err)
			}
		}
	}
	if e := nextEventOf(t, c, verbs.EventDisconnected, 60*time.Second); e.Type != verbs.EventDisconnected {
		t.Errorf("no DISCONNECTED: %v", e)
	}
}

func peerClient(ctx context.Context, t *testing.T, d *Device, peer netip.Addr, s *side, qo verbs.QPOptions, sid verbs.ServiceID) {
	// The server may not listen yet: retry while refused.
	var c verbs.Conn
	var rep []byte
	var err error
	for attempt := 0; ; attempt++ {
		c, rep, err = verbs.Dial(ctx, d, verbs.DialConfig{
			Resolve: verbs.ResolveOptions{Addr: peer, ServiceID: sid},
			PD:      s.pd,
			QP:      qo,
			Param:   verbs.ConnParam{RNRRetry: 7, RetryCount: 7}, // the link may drop packets
		})
		if err == nil {
			break
		}
		if !errors.Is(err, verbs.ErrRefused) || attempt >= 300 {
			t.Fatalf("Dial (attempt %d): %v", attempt+1, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	s.conn, s.qp = c, c.QP()
	raddr, rkey := getU64(rep), getU32(rep[8:])

	// pump keeps the window full until n requests of size bytes have
	// completed; done runs for each completion, in order.
	pump := func(op string, size int, mk func(i int) verbs.SendWR, done func(i int)) {
		t.Helper()
		n := peerCount(size)
		wc := make([]verbs.Completion, peerWindow)
		batch := make([]verbs.SendWR, 0, peerWindow)
		posted, completed := 0, 0
		start := time.Now()
		for completed < n {
			batch = batch[:0]
			for posted < n && posted-completed < peerWindow {
				batch = append(batch, mk(posted))
				posted++
			}
			if err := s.qp.PostSend(batch); err != nil {
				t.Fatal(err)
			}
			k, err := verbs.PollWait(ctx, s.cq, wc)
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range wc[:k] {
				if c.Err() != nil {
					t.Fatal(c.Err())
				}
				if done != nil {
					done(completed)
				}
				completed++
			}
		}
		el := time.Since(start)
		t.Logf("%s %d x %d KiB, window %d: %v", op, n, size>>10, peerWindow, el.Round(time.Millisecond))
		fmt.Printf("RATE %s %d %.2f\n", op, size, float64(n*size)/(1<<20)/el.Seconds())
	}
	send := func(size int) func(i int) verbs.SendWR {
		return func(i int) verbs.SendWR {
			return verbs.SendWR{ID: uint64(i), Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{s.sge(i*size, size)}}
		}
	}
	// src is where the client keeps the bytes of the server area's offset
	// off: the 8 MiB in 64 KiB blocks, reversed.
	src := func(off int) int { return peerTotal - peerBig - off/peerBig*peerBig + off%peerBig }
	write := func(size int) func(i int) verbs.SendWR {
		return func(i int) verbs.SendWR {
			return verbs.SendWR{ID: uint64(i), Op: verbs.OpWrite, Flags: verbs.SendSignaled,
				SGL: []verbs.SGE{s.sge(src(i*size), size)}, RemoteAddr: raddr + uint64(i*size), RKey: rkey}
		}
	}
	read := func(size int) func(i int) verbs.SendWR {
		return func(i int) verbs.SendWR {
			sge := s.slotSGE(i)
			sge.Length = uint32(size)
			return verbs.SendWR{ID: uint64(i), Op: verbs.OpRead, Flags: verbs.SendSignaled,
				SGL: []verbs.SGE{sge}, RemoteAddr: raddr + uint64(i*size), RKey: rkey}
		}
	}

	rand.Read(s.buf()[:peerTotal])
	sh := sha256.New()
	sh.Write(s.buf()[:peerTotal])
	sh.Write(s.buf()[:peerSmallTot])
	sendSum := sh.Sum(nil)
	pump("send", peerBig, send(peerBig), nil)
	pump("send", peerSmall, send(peerSmall), nil)

	// RDMA WRITE the same bytes, reversed in 64 KiB blocks, so the
	// server's area differs from the SEND stream; the 4 KiB WRITEs then
	// rewrite its first MiB with what must already be there.
	pump("write", peerBig, write(peerBig), nil)
	pump("write", peerSmall, write(peerSmall), nil)
	wh := sha256.New()
	for off := 0; off < peerTotal; off += peerBig {
		wh.Write(s.buf()[src(off):][:peerBig])
	}
	writeSum := wh.Sum(nil)

	// READ it back through the slots, hashing each as it completes.
	for _, size := range []int{peerBig, peerSmall} {
		rh := sha256.New()
		pump("read", size, read(size), func(i int) { rh.Write(s.slot(i)[:size]) })
		want := sha256.New()
		for off := 0; off < peerCount(size)*size; off += peerBig {
			want.Write(s.buf()[src(off):][:min(peerBig, peerCount(size)*size-off)])
		}
		if !bytes.Equal(rh.Sum(nil), want.Sum(nil)) {
			t.Errorf("RDMA READ of %d-byte messages differs from what was written", size)
		}
	}

	copy(s.buf(), sendSum)
	copy(s.buf()[32:], writeSum)
	if err := s.qp.PostSend([]verbs.SendWR{{ID: 1, Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{s.sge(0, 64)}}}); err != nil {
		t.Fatal(err)
	}
	if c := poll(t, s.cq, 1)[0]; c.Err() != nil {
		t.Fatal(c.Err())
	}

	// 64-byte ping-pongs: receive posted first, then the SEND; a round
	// ends when the echo has arrived and matches. Send completions are
	// taken as they come (as perftest does), not waited for each round;
	// sent-covered bounds the send queue (a signaled completion covers
	// every SEND before it).
	wc := make([]verbs.Completion, 8)
	sent, covered := 0, 0
	take := func(m latMode, i int) (echo bool) {
		t.Helper()
		k, err := m.wait(ctx, s.cq, wc)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range wc[:k] {
			if c.Err() != nil {
				t.Fatal(c.Err())
			}
			switch c.Op {
			case verbs.CompSend:
				covered = int(c.ID) + 1
			case verbs.CompRecv:
				if c.ByteLen != peerLatSize || !bytes.Equal(s.slot(0)[:peerLatSize], s.buf()[:peerLatSize]) {
					t.Fatalf("%s ping-pong %d: echo of %d bytes differs", m.name, i, c.ByteLen)
				}
				echo = true
			}
		}
		return echo
	}
	rtts := map[string][]time.Duration{} // timed round trips per mode
	sched := latSchedule()
	for bi, b := range sched {
		for j := 0; j < b.n; j++ {
			r0 := time.Now()
			for sent-covered >= 32 { // bound the send queue
				take(b.mode, sent)
			}
			binary.BigEndian.PutUint64(s.buf(), uint64(sent)<<8|uint64(bi))
			if err := s.qp.PostRecv([]verbs.RecvWR{{ID: 1 << 32, SGL: []verbs.SGE{s.slotSGE(0)}}}); err != nil {
				t.Fatal(err)
			}
			var flags verbs.SendFlags
			if b.mode.signaled(sent) || (bi == len(sched)-1 && j == b.n-1) { // the last one covers all
				flags = verbs.SendSignaled
			}
			if err := s.qp.PostSend([]verbs.SendWR{{ID: uint64(sent), Op: verbs.OpSend, Flags: flags, SGL: []verbs.SGE{s.sge(0, peerLatSize)}}}); err != nil {
				t.Fatal(err)
			}
			sent++
			for !take(b.mode, sent-1) {
			}
			if j >= b.warm {
				rtts[b.mode.name] = append(rtts[b.mode.name], time.Since(r0))
			}
		}
	}
	for _, m := range latModes() {
		r := rtts[m.name]
		lat, err := perftestAvg(r)
		if err != nil {
			t.Fatalf("%s: %v", m.name, err)
		}
		slices.Sort(r)
		t.Logf("%s: %d ping-pongs of %d bytes, round trip min %v median %v max %v", m.name, len(r), peerLatSize,
			r[0].Round(time.Microsecond), r[len(r)/2].Round(time.Microsecond), r[len(r)-1].Round(time.Microsecond))
		fmt.Printf("LAT %s %d %.2f\n", m.name, peerLatSize, float64(lat.Nanoseconds())/1e3)
	}
	for covered < sent {
		take(latMode{name: "drain", wait: verbs.PollWait}, sent)
	}

	if err := c.Disconnect(); err != nil {
		t.Error(err)
	}
	if e := nextEventOf(t, c, verbs.EventDisconnected, 30*time.Second); e.Type != verbs.EventDisconnected {
		t.Errorf("no DISCONNECTED: %v", e)
	}
}

// waitFunc returns the next completions of cq into wc.
type waitFunc func(ctx context.Context, cq verbs.CQ, wc []verbs.Completion) (int, error)

// latMode is one way to run the ping-pongs: how each side waits for a
// completion and which SENDs ask for one.
type latMode struct {
	name   string
	wait   waitFunc
	signal int // every signal-th SEND is signaled; 0 or 1: all
}

func (m latMode) signaled(i int) bool { return m.signal <= 1 || (i+1)%m.signal == 0 }

// envLatProbe, set by the host, runs every latency variant, interleaved.
const envLatProbe = "VSDP_IBV_LATPROBE"

// latModes are the ways the ping-pongs run: polled (Spin: busy-polling in
// C) and on completion events (verbs.PollWait).
func latModes() []latMode {
	if os.Getenv(envLatProbe) == "" {
		return []latMode{{name: "poll", wait: Spin}, {name: "event", wait: verbs.PollWait}}
	}
	return []latMode{
		{name: "gopoll", wait: goPoll},
		{name: "poll", wait: Spin},
		{name: "gopoll-unsig", wait: goPoll, signal: 16},
		{name: "poll-unsig", wait: Spin, signal: 16},
		{name: "event", wait: verbs.PollWait},
		{name: "event-unsig", wait: verbs.PollWait, signal: 16},
	}
}

// latBlock is a run of n ping-pongs in one mode, the first warm untimed.
type latBlock struct {
	mode    latMode
	n, warm int
}

// latSchedule is the sequence of ping-pong blocks both sides follow: each
// mode once (peerLatWarm untimed, peerLatIters timed), or with the probe
// three interleaved rounds of every variant.
func latSchedule() []latBlock {
	var bs []latBlock
	if os.Getenv(envLatProbe) == "" {
		for _, m := range latModes() {
			bs = append(bs, latBlock{m, peerLatWarm + peerLatIters, peerLatWarm})
		}
		return bs
	}
	for r := 0; r < 3; r++ {
		for _, m := range latModes() {
			bs = append(bs, latBlock{m, 10 + peerLatIters/3, 10})
		}
	}
	return bs
}

// latTail is how many of the slowest round trips perftest's latency tools
// leave out of t_avg.
const latTail = 2

// perftestAvg is perftest's t_avg of round trips rtts: the average of all
// but the latTail slowest, halved.
func perftestAvg(rtts []time.Duration) (time.Duration, error) {
	if len(rtts) <= latTail {
		return 0, fmt.Errorf("%d round trips: too few for an average", len(rtts))
	}
	r := slices.Sorted(slices.Values(rtts))
	var sum time.Duration
	for _, d := range r[:len(r)-latTail] {
		sum += d
	}
	return sum / time.Duration(2*(len(r)-latTail)), nil
}

// goPoll busy-polls from Go, one cgo call per poll (checking ctx every
// 1024 empty polls): the loop Spin replaces.
func goPoll(ctx context.Context, cq verbs.CQ, wc []verbs.Completion) (int, error) {
	for i := 1; ; i++ {
		n, err := cq.Poll(wc)
		if n > 0 || err != nil {
			return n, err
		}
		if i%1024 == 0 && ctx.Err() != nil {
			return 0, ctx.Err()
		}
	}
}
