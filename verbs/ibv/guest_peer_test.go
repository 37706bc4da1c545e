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
	recv := func(spin bool) []byte {
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
			k, err := waitCQ(ctx, s.cq, wc, spin)
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
		data := recv(false)
		h.Write(data)
		n += len(data)
	}
	t.Logf("received %d bytes by SEND in %v", streamed, time.Since(start))
	digest := recv(false)
	if len(digest) != 64 {
		t.Fatalf("digest message of %d bytes", len(digest))
	}
	if !bytes.Equal(h.Sum(nil), digest[:32]) {
		t.Error("SEND stream digest differs")
	}
	if sum := sha256.Sum256(s.buf()[:peerTotal]); !bytes.Equal(sum[:], digest[32:]) {
		t.Error("RDMA WRITE area digest differs")
	}

	// Echo the ping-pongs: polling, then on events, as the client does.
	for i := 0; i < 2*(peerLatWarm+peerLatIters); i++ {
		spin := i < peerLatWarm+peerLatIters
		ping := recv(spin)
		if len(ping) != peerLatSize {
			t.Fatalf("ping %d of %d bytes", i, len(ping))
		}
		copy(s.buf(), ping)
		if err := s.qp.PostSend([]verbs.SendWR{{ID: uint64(i), Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{s.sge(0, peerLatSize)}}}); err != nil {
			t.Fatal(err)
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
	// taken as they come (as perftest does), not waited for each round.
	wc := make([]verbs.Completion, 8)
	sendsOut := 0
	take := func(spin bool, mode string, i int) (echo bool) {
		t.Helper()
		k, err := waitCQ(ctx, s.cq, wc, spin)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range wc[:k] {
			if c.Err() != nil {
				t.Fatal(c.Err())
			}
			switch c.Op {
			case verbs.CompSend:
				sendsOut--
			case verbs.CompRecv:
				if c.ByteLen != peerLatSize || !bytes.Equal(s.slot(0)[:peerLatSize], s.buf()[:peerLatSize]) {
					t.Fatalf("%s ping-pong %d: echo of %d bytes differs", mode, i, c.ByteLen)
				}
				echo = true
			}
		}
		return echo
	}
	for _, mode := range []string{"poll", "event"} {
		spin := mode == "poll"
		var start time.Time
		for i := 0; i < peerLatWarm+peerLatIters; i++ {
			if i == peerLatWarm {
				start = time.Now()
			}
			for sendsOut >= 32 { // bound the send queue
				take(spin, mode, i)
			}
			binary.BigEndian.PutUint64(s.buf(), uint64(i)<<8|uint64(len(mode)))
			if err := s.qp.PostRecv([]verbs.RecvWR{{ID: 1 << 32, SGL: []verbs.SGE{s.slotSGE(0)}}}); err != nil {
				t.Fatal(err)
			}
			if err := s.qp.PostSend([]verbs.SendWR{{ID: uint64(i), Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{s.sge(0, peerLatSize)}}}); err != nil {
				t.Fatal(err)
			}
			sendsOut++
			for !take(spin, mode, i) {
			}
		}
		el := time.Since(start)
		t.Logf("%s: %d ping-pongs of %d bytes in %v", mode, peerLatIters, peerLatSize, el.Round(time.Millisecond))
		fmt.Printf("LAT %s %d %.2f\n", mode, peerLatSize, float64(el.Microseconds())/peerLatIters/2)
	}
	for sendsOut > 0 {
		take(false, "drain", 0)
	}

	if err := c.Disconnect(); err != nil {
		t.Error(err)
	}
	if e := nextEventOf(t, c, verbs.EventDisconnected, 30*time.Second); e.Type != verbs.EventDisconnected {
		t.Errorf("no DISCONNECTED: %v", e)
	}
}

// waitCQ returns the next completions: by busy-polling when spin (checking
// ctx every 1024 empty polls), else as verbs.PollWait does (arm, then wait
// on the completion channel).
func waitCQ(ctx context.Context, cq verbs.CQ, wc []verbs.Completion, spin bool) (int, error) {
	if !spin {
		return verbs.PollWait(ctx, cq, wc)
	}
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
