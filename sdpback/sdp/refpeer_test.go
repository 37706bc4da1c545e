package sdp_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"io"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"github.com/vsdp/vsdp/sdpback/internal/refpeer"
	"github.com/vsdp/vsdp/sdpback/internal/refpeer/ibsdp"
	"github.com/vsdp/vsdp/sdpback/sdp"
)

// refPair connects an engine connection on A with a reference peer (an
// ib_sdp stand-in) on B; peerDials chooses who connects.
func refPair(t *testing.T, f *fabric, port uint16, peerDials bool, po ibsdp.Options) (*sdp.Conn, *ibsdp.Conn) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if peerDials {
		// The peer on B dials the engine's listener on A.
		l, err := f.a.Listen(port, 4)
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		ch := make(chan *sdp.Conn, 1)
		go func() { c, _ := l.AcceptSDP(ctx); ch <- c }()
		po.Device, po.Addr = f.db, addrB
		p, err := ibsdp.Dial(ctx, po, netip.AddrPortFrom(addrA, port))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { p.Close() })
		c := <-ch
		if c == nil {
			t.Fatal("engine accepted nothing")
		}
		return c, p
	}
	po.Device, po.Addr = f.db, addrB
	l, err := ibsdp.Listen(po, port)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	type res struct {
		p   *ibsdp.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() { p, err := l.Accept(ctx); ch <- res{p, err} }()
	c, err := f.a.Dial(ctx, netip.AddrPortFrom(addrB, port))
	r := <-ch
	if r.p != nil {
		t.Cleanup(func() { r.p.Close() })
	}
	if err != nil || r.err != nil {
		t.Fatalf("dial %v, peer accept %v", err, r.err)
	}
	return c, r.p
}

// TestRefPeerInterop: the engine and an ib_sdp-like reference peer move
// data both ways at once, each direction checked by hash, and close
// gracefully, with the engine dialing and with the peer dialing, with
// gen2's 32 KiB buffers against the engine's default and small ones. The
// peer checks every engine message against gen2's rules (sequence numbers,
// the two-credit reserve, nothing after DisConn) and finds no breach.
func TestRefPeerInterop(t *testing.T) {
	for _, tc := range []struct {
		name      string
		peerDials bool
		cfg       sdp.Config
		po        ibsdp.Options
	}{
		{"engine-dials", false, sdp.Config{}, ibsdp.Options{}},
		{"peer-dials", true, sdp.Config{}, ibsdp.Options{}},
		{"engine-dials/small-engine-buffers", false, sdp.Config{RecvBufs: 4, RecvBufSize: 512 + 16, SendBufs: 2}, ibsdp.Options{}},
		{"peer-dials/small-peer-buffers", true, sdp.Config{}, ibsdp.Options{Bufs: 4, BufSize: 700 + 16}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFabric(t, "inproc", tc.cfg)
			c, p := refPair(t, f, 5600, tc.peerDials, tc.po)
			const n = 512 << 10
			rng := rand.New(rand.NewPCG(11, 12))
			toPeer, toEngine := make([]byte, n), make([]byte, n)
			for i := range n {
				toPeer[i], toEngine[i] = byte(rng.Uint32()), byte(rng.Uint32())
			}
			// The engine writes in random sizes and reads, concurrently.
			werr := make(chan error, 1)
			go func() {
				r := rand.New(rand.NewPCG(13, 14))
				b := toPeer
				for len(b) > 0 {
					k := min(len(b), 1+r.IntN(100000))
					if _, err := c.Write(b[:k]); err != nil {
						werr <- err
						return
					}
					b = b[k:]
				}
				werr <- c.CloseWrite()
			}()
			got := make(chan []byte, 1)
			go func() {
				c.SetReadDeadline(time.Now().Add(10 * time.Second))
				h := sha256.New()
				io.Copy(h, c)
				got <- h.Sum(nil)
			}()
			fatal := func(format string, args ...any) {
				t.Helper()
				t.Fatalf(format+" (peer saw these breaches of gen2's rules: %q)", append(args, p.Violations())...)
			}
			// The peer (one goroutine) writes everything, buffering what
			// arrives meanwhile, then half-closes and reads to EOF.
			if err := p.Write(toEngine, 10*time.Second); err != nil {
				fatal("peer write: %v", err)
			}
			if err := p.CloseWrite(5 * time.Second); err != nil {
				fatal("peer DisConn: %v", err)
			}
			recv, err := p.ReadAll(10 * time.Second)
			if err != nil {
				fatal("peer read %d bytes: %v", len(recv), err)
			}
			if !bytes.Equal(recv, toPeer) {
				fatal("peer read %d bytes, want %d; content differs", len(recv), n)
			}
			if err := <-werr; err != nil {
				t.Fatalf("engine write: %v", err)
			}
			if h := <-got; !bytes.Equal(h, sha256Sum(toEngine)) {
				t.Fatal("engine read differs from what the peer sent")
			}
			c.Close()
			if err := p.WaitState("TIME_WAIT", 5*time.Second); err != nil {
				t.Fatalf("peer close: %v", err)
			}
			select {
			case <-c.Done():
			case <-time.After(5 * time.Second):
				t.Fatalf("engine connection not released (state %s)", c.State())
			}
			if v := p.Violations(); len(v) > 0 {
				t.Fatalf("the engine broke gen2's rules: %q", v)
			}
			if st := c.Stats(); st.Overdrafts != 0 {
				t.Fatalf("engine stats %+v", st)
			}
		})
	}
}

// TestRefPeerControl: what a gen2 host sends beside data — a ChRcvBuf
// asking for bigger buffers, a SrcAvail with inline bytes, a MID gen2
// would discard — gets the answers it expects from the engine: ChRcvBufAck
// with the unchanged size (without the BSDH), SendSM, and a reset.
func TestRefPeerControl(t *testing.T) {
	f := newFabric(t, "inproc", sdp.Config{RecvBufSize: 4096 + 16})
	c, p := refPair(t, f, 5610, true, ibsdp.Options{})
	defer c.Close()
	if err := p.Send(refpeer.Packet{BSDH: refpeer.BSDH{Mid: refpeer.MidChRcvBuf}, CRBSize: 32768}, time.Second); err != nil {
		t.Fatal(err)
	}
	if err := p.Send(refpeer.Packet{BSDH: refpeer.BSDH{Mid: refpeer.MidSrcAvail},
		SrcAH: &refpeer.SrcAH{Len: 1 << 20, Rkey: 9, Vaddr: 0x10000}, Data: []byte("inline")}, time.Second); err != nil {
		t.Fatal(err)
	}
	if err := p.WaitMessages(2, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	log := p.Log()
	var acks, sendSMs int
	for _, pk := range log {
		switch pk.Mid {
		case refpeer.MidChRcvBufAck:
			acks++
			if pk.CRBSize != 4096 {
				t.Fatalf("ChRcvBufAck size %d, want 4096 (the engine keeps its size; BSDH excluded)", pk.CRBSize)
			}
		case refpeer.MidSendSM:
			sendSMs++
		}
	}
	if acks != 1 || sendSMs != 1 {
		t.Fatalf("%d ChRcvBufAcks, %d SendSMs; log %+v", acks, sendSMs, log)
	}
	buf := make([]byte, 16)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if k, err := c.Read(buf); err != nil || string(buf[:k]) != "inline" {
		t.Fatalf("engine read %q, %v: the inline bytes of a SrcAvail are stream data", buf[:k], err)
	}
	if v := p.Violations(); len(v) > 0 {
		t.Fatalf("violations %q", v)
	}
}
