package vsock_test

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"

	"github.com/vsdp/vsdp/vhost/guestmem"
	"github.com/vsdp/vsdp/vhost/vhosttest"
	"github.com/vsdp/vsdp/vhost/virtq"
	"github.com/vsdp/vsdp/vhost/vsock"
	"github.com/vsdp/vsdp/vhost/vsock/vsocktest"
)

const guestCID = 5

// guest is a minimal virtio-vsock driver over vhosttest rings, driving the
// device directly (no vhost-user socket): enough to exercise every op.
type guest struct {
	t        testing.TB
	gm       *vhosttest.GuestMemory
	rxr, txr *vhosttest.Ring
	rxq, txq *virtq.Queue
	dev      *vsock.Device
	layout61 bool // rx buffers as Linux 6.1 posts them: 44-byte header + 4096 payload
}

func newGuest(t testing.TB, cfg vsock.Config, b vsock.Backend, layout61 bool) *guest {
	t.Helper()
	gm, err := vhosttest.NewGuestMemory(64 << 20)
	if err != nil {
		t.Fatal(err)
	}
	mem := guestmem.NewMemory(0)
	if err := mem.SetTable([]guestmem.RegionSpec{gm.Spec()}, []int{gm.Fd()}); err != nil {
		t.Fatal(err)
	}
	if cfg.CID == 0 {
		cfg.CID = guestCID
	}
	dev, err := vsock.New(cfg, b)
	if err != nil {
		t.Fatal(err)
	}
	g := &guest{t: t, gm: gm, dev: dev, layout61: layout61}
	mk := func(i int) (*vhosttest.Ring, *virtq.Queue) {
		r, err := vhosttest.NewRing(gm, 128, vhosttest.RingOptions{EventIdx: true, Indirect: true})
		if err != nil {
			t.Fatal(err)
		}
		d, a, u := r.UVAs()
		q, err := virtq.New(mem, virtq.Config{Index: i, Size: 128, Desc: d, Avail: a, Used: u, EventIdx: true, Indirect: true})
		if err != nil {
			t.Fatal(err)
		}
		if err := dev.QueueStart(i, q); err != nil {
			t.Fatal(err)
		}
		return r, q
	}
	g.rxr, g.rxq = mk(vsock.RxQueue)
	g.txr, g.txq = mk(vsock.TxQueue)
	t.Cleanup(func() {
		dev.QueueStop(0)
		dev.QueueStop(1)
		dev.Close()
		g.rxq.Close()
		g.txq.Close()
		mem.Close()
		gm.Close()
	})
	return g
}

func hdrBytes(h vsock.Header) []byte {
	b := make([]byte, vsock.HeaderSize)
	h.Encode(b)
	return b
}

// send queues one packet on tx and kicks.
func (g *guest) send(h vsock.Header, payload []byte) {
	g.t.Helper()
	h.Len = uint32(len(payload))
	out := [][]byte{hdrBytes(h)}
	if len(payload) > 0 {
		out = append(out, payload)
	}
	if _, err := g.txr.Add(out, nil); err != nil {
		g.t.Fatalf("tx add: %v", err)
	}
	if _, err := g.dev.Kick(vsock.TxQueue); err != nil {
		g.t.Fatalf("tx kick: %v", err)
	}
	for {
		_, ok, err := g.txr.Used()
		if err != nil {
			g.t.Fatal(err)
		}
		if !ok {
			break
		}
	}
}

// postRx makes n receive buffers available.
func (g *guest) postRx(n int) {
	g.t.Helper()
	for i := 0; i < n; i++ {
		var err error
		if g.layout61 {
			_, err = g.rxr.Add(nil, []int{vsock.HeaderSize, 4096})
		} else {
			_, err = g.rxr.Add(nil, []int{3776})
		}
		if errors.Is(err, vhosttest.ErrRingFull) {
			break
		}
		if err != nil {
			g.t.Fatal(err)
		}
	}
	g.dev.Kick(vsock.RxQueue)
}

type pkt struct {
	vsock.Header
	data []byte
}

// recv returns every packet the device delivered.
func (g *guest) recv() []pkt {
	g.t.Helper()
	var out []pkt
	for {
		u, ok, err := g.rxr.Used()
		if err != nil {
			g.t.Fatal(err)
		}
		if !ok {
			return out
		}
		if len(u.Data) < vsock.HeaderSize {
			g.t.Fatalf("rx packet of %d bytes", len(u.Data))
		}
		var h vsock.Header
		h.Decode(u.Data)
		if int(h.Len) != len(u.Data)-vsock.HeaderSize {
			g.t.Fatalf("rx header %v but %d payload bytes (used len %d, layout61 %v)", h, len(u.Data)-vsock.HeaderSize, u.Len, g.layout61)
		}
		out = append(out, pkt{h, u.Data[vsock.HeaderSize:]})
	}
}

func (g *guest) hdr(op vsock.Op, src, dst uint32) vsock.Header {
	return vsock.Header{SrcCID: guestCID, DstCID: vsock.HostCID, SrcPort: src, DstPort: dst, Type: vsock.TypeStream, Op: op, BufAlloc: 256 << 10}
}

// echo accepts port 7 and echoes; it refuses every other port.
type echo struct {
	mu      sync.Mutex
	streams []*echoStream
}

func (e *echo) Connect(r *vsock.Request) {
	if r.HostPort != 7 {
		r.Refuse()
		return
	}
	s := &echoStream{}
	s.mu.Lock() // no Deliver before conn is set
	c, err := r.Accept(s)
	s.c = c
	s.mu.Unlock()
	if err == nil {
		e.mu.Lock()
		e.streams = append(e.streams, s)
		e.mu.Unlock()
	}
}

type echoStream struct {
	mu       sync.Mutex
	c        *vsock.Conn
	buf      vsocktest.Queue
	got      int
	eof      bool
	shut     [3]bool // rcv, send, abortive
	resetErr error
	holdAll  bool // keep payloads unreleased (to test credit)
	held     []*vsock.Payload
	copied   int
}

func (s *echoStream) Deliver(p *vsock.Payload) {
	s.mu.Lock()
	s.buf.Append(p.Segs...)
	s.got += p.Len
	if p.Copied {
		s.copied += p.Len
	}
	hold := s.holdAll
	if hold {
		s.held = append(s.held, p)
	}
	c := s.c
	s.mu.Unlock()
	if !hold {
		p.Release()
	}
	c.Notify()
}

func (s *echoStream) Pull(dst [][]byte) (int, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := s.buf.Fill(dst)
	return n, s.eof && s.buf.Len() == 0
}

func (s *echoStream) Shutdown(rcv, send, abortive bool) {
	s.mu.Lock()
	s.shut = [3]bool{rcv || s.shut[0], send || s.shut[1], abortive || s.shut[2]}
	if send {
		s.eof = true
	}
	c := s.c
	s.mu.Unlock()
	c.Notify()
}

func (s *echoStream) Reset(err error) {
	s.mu.Lock()
	s.resetErr = err
	s.mu.Unlock()
}

func findOp(ps []pkt, op vsock.Op) *pkt {
	for i := range ps {
		if ps[i].Op == op {
			return &ps[i]
		}
	}
	return nil
}

func TestConnectAndRefuse(t *testing.T) {
	g := newGuest(t, vsock.Config{}, &echo{}, false)
	g.postRx(8)
	g.send(g.hdr(vsock.OpRequest, 1000, 7), nil)
	ps := g.recv()
	if len(ps) != 1 || ps[0].Op != vsock.OpResponse || ps[0].SrcPort != 7 || ps[0].DstPort != 1000 || ps[0].DstCID != guestCID || ps[0].SrcCID != vsock.HostCID {
		t.Fatalf("want RESPONSE 7->1000, got %+v", ps)
	}
	if ps[0].BufAlloc != vsock.DefaultBufAlloc {
		t.Fatalf("buf_alloc %d", ps[0].BufAlloc)
	}
	g.send(g.hdr(vsock.OpRequest, 1001, 8), nil)
	if ps = g.recv(); len(ps) != 1 || ps[0].Op != vsock.OpRST || ps[0].DstPort != 1001 {
		t.Fatalf("want RST for refused port, got %+v", ps)
	}
	if g.dev.Conns() != 1 {
		t.Fatalf("%d conns, want 1", g.dev.Conns())
	}
	st := g.dev.Stats()
	if st.Accepted != 1 || st.Refused != 1 || st.Connects != 2 {
		t.Fatalf("stats %+v", st)
	}
}

// TestEchoIntegrity pushes random-sized writes through an echo stream in
// both rx buffer layouts, obeying and checking vsock credit on both sides.
func TestEchoIntegrity(t *testing.T) {
	for _, layout61 := range []bool{false, true} {
		e := &echo{}
		g := newGuest(t, vsock.Config{}, e, layout61)
		g.postRx(128)
		g.send(g.hdr(vsock.OpRequest, 2000, 7), nil)
		if ps := g.recv(); findOp(ps, vsock.OpResponse) == nil {
			t.Fatal("no RESPONSE")
		}
		rng := rand.New(rand.NewPCG(3, 4))
		want := make([]byte, 3<<20)
		for i := range want {
			want[i] = byte(rng.Uint32())
		}
		var got []byte
		sent := 0
		hostBuf, hostFwd := uint32(vsock.DefaultBufAlloc), uint32(0)
		const guestBuf = 256 << 10
		fwd := uint32(0) // bytes the guest app consumed
		for iter := 0; len(got) < len(want); iter++ {
			if iter > 100000 {
				t.Fatalf("stalled: sent %d got %d", sent, len(got))
			}
			// Send as credit allows, in writes of random size ≤ 64 KiB.
			for sent < len(want) {
				credit := int(hostBuf) - (sent - int(hostFwd))
				n := min(len(want)-sent, 1+rng.IntN(64<<10), credit)
				if n <= 0 {
					break
				}
				h := g.hdr(vsock.OpRW, 2000, 7)
				h.FwdCnt = fwd
				h.BufAlloc = guestBuf
				g.send(h, want[sent:sent+n])
				sent += n
			}
			g.postRx(128)
			for _, p := range g.recv() {
				switch p.Op {
				case vsock.OpRW:
					got = append(got, p.data...)
					if len(got)-int(fwd) > guestBuf {
						t.Fatalf("host exceeded the guest's buf_alloc: %d unconsumed", len(got)-int(fwd))
					}
					if len(p.data) > 3776-vsock.HeaderSize && !layout61 {
						t.Fatalf("payload %d larger than the rx buffer", len(p.data))
					}
				case vsock.OpCreditUpdate, vsock.OpCreditRequest:
				default:
					t.Fatalf("unexpected %v", p.Op)
				}
				hostBuf, hostFwd = p.BufAlloc, p.FwdCnt
			}
			// The application reads everything; tell the host.
			if uint32(len(got)) != fwd {
				fwd = uint32(len(got))
				h := g.hdr(vsock.OpCreditUpdate, 2000, 7)
				h.FwdCnt = fwd
				h.BufAlloc = guestBuf
				g.send(h, nil)
			}
		}
		if sha256.Sum256(got) != sha256.Sum256(want) {
			t.Fatalf("layout61=%v: echoed data differs", layout61)
		}
		st := g.dev.Stats()
		if st.TxBytes != uint64(len(want)) || st.RxBytes != uint64(len(want)) {
			t.Fatalf("byte counters %+v", st)
		}
		// Orderly close: SHUTDOWN both ways → the stream hears it, RST back.
		h := g.hdr(vsock.OpShutdown, 2000, 7)
		h.Flags = vsock.ShutdownRcv | vsock.ShutdownSend
		h.FwdCnt = fwd
		g.send(h, nil)
		ps := g.recv()
		if findOp(ps, vsock.OpRST) == nil {
			t.Fatalf("no RST completing the close: %+v", ps)
		}
		s := e.streams[0]
		s.mu.Lock()
		if !s.shut[0] || !s.shut[1] || s.shut[2] {
			t.Fatalf("stream shutdown %v, want rcv+send, not abortive", s.shut)
		}
		s.mu.Unlock()
		if g.dev.Conns() != 0 {
			t.Fatal("closed stream still in the table")
		}
	}
}

func TestHostileTx(t *testing.T) {
	open := func(t *testing.T, cfg vsock.Config) (*guest, *echo) {
		e := &echo{}
		g := newGuest(t, cfg, e, false)
		g.postRx(64)
		g.send(g.hdr(vsock.OpRequest, 3000, 7), nil)
		if ps := g.recv(); findOp(ps, vsock.OpResponse) == nil {
			t.Fatal("no RESPONSE")
		}
		return g, e
	}
	t.Run("wrong source CID is dropped silently", func(t *testing.T) {
		g, _ := open(t, vsock.Config{})
		h := g.hdr(vsock.OpRW, 3000, 7)
		h.SrcCID = 99
		g.send(h, []byte("spoof"))
		if ps := g.recv(); len(ps) != 0 {
			t.Fatalf("answered a spoofed packet: %+v", ps)
		}
		if g.dev.Stats().BadPackets != 1 || g.dev.Stats().TxBytes != 0 {
			t.Fatalf("stats %+v", g.dev.Stats())
		}
	})
	t.Run("wrong destination CID", func(t *testing.T) {
		g, _ := open(t, vsock.Config{})
		h := g.hdr(vsock.OpRequest, 3001, 7)
		h.DstCID = 7
		g.send(h, nil)
		if ps := g.recv(); len(ps) != 0 || g.dev.Conns() != 1 {
			t.Fatalf("packet to another CID handled: %+v", ps)
		}
	})
	t.Run("seqpacket gets RST", func(t *testing.T) {
		g, _ := open(t, vsock.Config{})
		h := g.hdr(vsock.OpRequest, 3002, 7)
		h.Type = vsock.TypeSeqpacket
		g.send(h, nil)
		if ps := g.recv(); len(ps) != 1 || ps[0].Op != vsock.OpRST || ps[0].Type != vsock.TypeSeqpacket {
			t.Fatalf("want RST, got %+v", ps)
		}
	})
	t.Run("length beyond buffer resets stream", func(t *testing.T) {
		g, e := open(t, vsock.Config{})
		h := g.hdr(vsock.OpRW, 3000, 7)
		h.Len = 100
		if _, err := g.txr.Add([][]byte{hdrBytes(h), make([]byte, 10)}, nil); err != nil {
			t.Fatal(err)
		}
		g.dev.Kick(vsock.TxQueue)
		if ps := g.recv(); findOp(ps, vsock.OpRST) == nil {
			t.Fatalf("want RST, got %+v", ps)
		}
		if !errors.Is(e.streams[0].resetErr, vsock.ErrProtocol) || g.dev.Conns() != 0 {
			t.Fatalf("stream not reset: %v", e.streams[0].resetErr)
		}
	})
	t.Run("credit violation resets stream", func(t *testing.T) {
		g, e := open(t, vsock.Config{BufAlloc: 8192})
		e.streams[0].holdAll = true // nothing consumed: credit never returns
		g.send(g.hdr(vsock.OpRW, 3000, 7), make([]byte, 8192))
		g.send(g.hdr(vsock.OpRW, 3000, 7), []byte{1})
		if ps := g.recv(); findOp(ps, vsock.OpRST) == nil {
			t.Fatalf("want RST, got %+v", ps)
		}
		st := g.dev.Stats()
		if st.CreditViolations != 1 || !errors.Is(e.streams[0].resetErr, vsock.ErrProtocol) {
			t.Fatalf("stats %+v err %v", st, e.streams[0].resetErr)
		}
		for _, p := range e.streams[0].held {
			p.Release() // after the reset: must be harmless
		}
	})
	t.Run("data on unknown stream gets RST", func(t *testing.T) {
		g, _ := open(t, vsock.Config{})
		g.send(g.hdr(vsock.OpRW, 4444, 7), []byte("x"))
		if ps := g.recv(); len(ps) != 1 || ps[0].Op != vsock.OpRST || ps[0].DstPort != 4444 {
			t.Fatalf("want RST, got %+v", ps)
		}
		// An RST for an unknown stream is never answered.
		g.send(g.hdr(vsock.OpRST, 4445, 7), nil)
		if ps := g.recv(); len(ps) != 0 {
			t.Fatalf("answered an RST: %+v", ps)
		}
	})
	t.Run("duplicate REQUEST resets", func(t *testing.T) {
		g, e := open(t, vsock.Config{})
		g.send(g.hdr(vsock.OpRequest, 3000, 7), nil)
		if ps := g.recv(); findOp(ps, vsock.OpRST) == nil || e.streams[0].resetErr == nil {
			t.Fatalf("duplicate REQUEST not reset: %+v", ps)
		}
	})
	t.Run("unknown op resets", func(t *testing.T) {
		g, e := open(t, vsock.Config{})
		g.send(g.hdr(vsock.Op(42), 3000, 7), nil)
		if ps := g.recv(); findOp(ps, vsock.OpRST) == nil || !errors.Is(e.streams[0].resetErr, vsock.ErrProtocol) {
			t.Fatalf("unknown op not reset: %+v", ps)
		}
	})
	t.Run("REQUEST flood is bounded", func(t *testing.T) {
		g, _ := open(t, vsock.Config{MaxConns: 4})
		for p := uint32(0); p < 600; p++ {
			g.send(g.hdr(vsock.OpRequest, 5000+p, 7), nil)
		}
		if n := g.dev.Conns(); n != 4 {
			t.Fatalf("%d conns, want the limit 4", n)
		}
		// Without rx buffers the orphan RSTs queue up to a bound, then drop.
		st := g.dev.Stats()
		if st.OrphanRSTDropped == 0 {
			t.Fatalf("no drops counted: %+v", st)
		}
		var rsts int
		for i := 0; i < 10; i++ {
			g.postRx(128)
			for _, p := range g.recv() {
				if p.Op == vsock.OpRST {
					rsts++
				}
			}
		}
		if rsts == 0 || rsts > 600 {
			t.Fatalf("%d RSTs", rsts)
		}
	})
	t.Run("header split across descriptors", func(t *testing.T) {
		g, e := open(t, vsock.Config{})
		h := hdrBytes(g.hdr(vsock.OpRW, 3000, 7))
		h[24] = 5 // len
		if _, err := g.txr.Add([][]byte{h[:10], h[10:30], append(h[30:], 'h', 'e'), []byte("llo")}, nil); err != nil {
			t.Fatal(err)
		}
		g.dev.Kick(vsock.TxQueue)
		e.streams[0].mu.Lock()
		got := e.streams[0].got
		e.streams[0].mu.Unlock()
		if got != 5 {
			t.Fatalf("delivered %d bytes, want 5", got)
		}
	})
}

func TestZeroCopyHoldBounds(t *testing.T) {
	e := &echo{}
	g := newGuest(t, vsock.Config{MaxHeldPerConn: 2}, e, false)
	g.postRx(8)
	g.send(g.hdr(vsock.OpRequest, 6000, 7), nil)
	g.recv()
	s := e.streams[0]
	s.holdAll = true
	for i := 0; i < 5; i++ {
		g.send(g.hdr(vsock.OpRW, 6000, 7), bytes.Repeat([]byte{byte(i)}, 1000))
	}
	st := g.dev.Stats()
	if st.HeldChains != 2 || st.CopiedBytes != 3000 || s.copied != 3000 {
		t.Fatalf("held %d copied %d (stream saw %d), want 2 and 3000", st.HeldChains, st.CopiedBytes, s.copied)
	}
	if n := g.txr.Outstanding(); n != 2 {
		t.Fatalf("%d tx chains outstanding, want the 2 held", n)
	}
	for _, p := range s.held {
		p.Release()
	}
	for {
		_, ok, _ := g.txr.Used()
		if !ok {
			break
		}
	}
	if n := g.txr.Outstanding(); n != 0 {
		t.Fatalf("%d tx chains still held after release", n)
	}
}

type dialStream struct {
	echoStream
}

func TestHostDial(t *testing.T) {
	g := newGuest(t, vsock.Config{}, &echo{}, false)
	g.postRx(8)
	results := make(chan error, 2)
	s := &dialStream{}
	c, err := g.dev.Dial(9000, s, func(err error) { results <- err })
	if err != nil {
		t.Fatal(err)
	}
	s.c = c
	var req *pkt
	for i := 0; i < 1000 && req == nil; i++ {
		req = findOp(g.recv(), vsock.OpRequest)
	}
	if req == nil || req.DstPort != 9000 || req.SrcPort != c.HostPort() {
		t.Fatalf("no REQUEST to port 9000: %+v", req)
	}
	g.send(g.hdr(vsock.OpResponse, 9000, c.HostPort()), nil)
	if err := <-results; err != nil {
		t.Fatalf("dial result %v", err)
	}
	// A second dial refused by the guest.
	c2, err := g.dev.Dial(9001, &dialStream{}, func(err error) { results <- err })
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 1000 && findOp(g.recv(), vsock.OpRequest) == nil; i++ {
	}
	g.send(g.hdr(vsock.OpRST, 9001, c2.HostPort()), nil)
	if err := <-results; !errors.Is(err, vsock.ErrRefused) {
		t.Fatalf("refused dial: %v", err)
	}
}

// TestOverlongIndirectChain: a chain of more buffers than the ring has
// entries, built through an indirect table (which virtio 1.2 §2.7.5.3.1
// forbids a driver), breaks that ring with a ChainError and is never used:
// no used entry for it or for anything posted after it, on either ring.
// The session then stops the ring, which resets every stream.
func TestOverlongIndirectChain(t *testing.T) {
	for _, tc := range []struct {
		name string
		q    int
		n    int // buffers in the table
	}{
		{"tx of 129 buffers", vsock.TxQueue, 129},
		{"tx of 65535 one-byte buffers", vsock.TxQueue, 65535},
		{"rx of 129 buffers", vsock.RxQueue, 129},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := &echo{}
			g := newGuest(t, vsock.Config{}, e, false)
			// One rx buffer, for the RESPONSE: the rx chain under test is
			// then the next one the device pops.
			g.postRx(1)
			g.send(g.hdr(vsock.OpRequest, 3000, 7), nil)
			if ps := g.recv(); findOp(ps, vsock.OpResponse) == nil {
				t.Fatal("no RESPONSE")
			}
			r := g.txr
			if tc.q == vsock.RxQueue {
				r = g.rxr
			}
			buf, err := r.Buffer(4096)
			if err != nil {
				t.Fatal(err)
			}
			// A header, then one-byte pieces: a well-formed chain but for
			// its length.
			hb := hdrBytes(g.hdr(vsock.OpRW, 3000, 7))
			copy(g.gm.Bytes(buf, vsock.HeaderSize), hb)
			table := make([]vhosttest.RawDesc, tc.n)
			flags := uint16(0)
			if tc.q == vsock.RxQueue {
				flags = virtq.DescWrite
			}
			for i := range table {
				table[i] = vhosttest.RawDesc{Addr: buf + guestmem.GPA(i%64), Len: 1, Flags: flags | virtq.DescNext, Next: uint16(i + 1)}
			}
			table[0].Len = vsock.HeaderSize
			table[tc.n-1].Flags &^= virtq.DescNext
			usedTx, usedRx := g.txr.UsedIdx(), g.rxr.UsedIdx()
			if _, err := r.AddRawIndirect(table); err != nil {
				t.Fatal(err)
			}
			// A good packet after it must not be served either.
			if _, err := g.txr.Add([][]byte{hdrBytes(g.hdr(vsock.OpCreditRequest, 3000, 7))}, nil); err != nil {
				t.Fatal(err)
			}
			if tc.q == vsock.RxQueue {
				// The CREDIT_REQUEST is served (its CREDIT_UPDATE pops the
				// bad rx chain); the rx ring reports the break.
				if _, err := g.dev.Kick(vsock.TxQueue); err != nil {
					t.Fatalf("tx kick: %v", err)
				}
			}
			_, err = g.dev.Kick(tc.q)
			var ce *virtq.ChainError
			if !errors.As(err, &ce) || !errors.Is(err, virtq.ErrBroken) || !strings.Contains(err.Error(), "exceeds the queue size 128") {
				t.Fatalf("kick: %v; want a ChainError for the chain's length", err)
			}
			if _, err := g.dev.Kick(tc.q); !errors.Is(err, virtq.ErrBroken) {
				t.Fatalf("second kick: %v; the ring must stay broken", err)
			}
			if g.txr.UsedIdx() != usedTx+uint16(map[bool]int{true: 1}[tc.q == vsock.RxQueue]) || g.rxr.UsedIdx() != usedRx {
				t.Fatalf("used indices moved: tx %d→%d rx %d→%d", usedTx, g.txr.UsedIdx(), usedRx, g.rxr.UsedIdx())
			}
			// The session stops a broken ring: every stream is reset.
			g.dev.QueueStop(tc.q)
			e.mu.Lock()
			s := e.streams[0]
			e.mu.Unlock()
			s.mu.Lock()
			rerr := s.resetErr
			s.mu.Unlock()
			if !errors.Is(rerr, vsock.ErrReset) || g.dev.Conns() != 0 {
				t.Fatalf("stream after the break: %v, %d conns", rerr, g.dev.Conns())
			}
		})
	}
}
