package sdp

import (
	"github.com/vsdp/vsdp/verbs"
)

// bufSet is one connection's registered memory: its receive slots (local
// write), send slots and control slots (local read). None of it is
// registered for remote access, so no peer can name it with an rkey; the
// keepalive's zero-length RDMA WRITE carries no memory at all.
//
// Registering the buffers is most of a connection's set-up cost on a
// kernel provider (on rxe in a TCG guest, pinning and registering the
// 1 MiB of a connection took about half of the dial), so the stack keeps a
// few sets of released connections registered and hands them to new ones
// (Config.BufferSets). A set is reused only after its connection's queue
// pair was destroyed — no device access to it can still be in flight —
// and after scrub zeroed every byte the connection may have used, so a
// later connection never sees an earlier one's data.
type bufSet struct {
	rx, tx, ctl       *verbs.DMA
	rxMR, txMR, ctlMR verbs.MR
	// txHi bounds what the engine wrote into tx: bytes [0, txHi) may hold
	// data. The receive and control buffers are zeroed whole (the device
	// writes them, and a receive in flight at the end has no completion
	// that would say how much it wrote).
	txHi int
}

// newSet allocates and registers a set sized by the stack's Config: the
// send slots at the stack's own receive size, the most setPeer may choose.
func (s *Stack) newSet() (*bufSet, error) {
	cfg := &s.cfg
	b := &bufSet{}
	var err error
	if b.rx, err = verbs.AllocDMA(cfg.RecvBufs * cfg.RecvBufSize); err != nil {
		return nil, err
	}
	if b.rxMR, err = s.pd.RegMR(b.rx.Bytes(), verbs.AccessLocalWrite); err != nil {
		b.close()
		return nil, err
	}
	if b.tx, err = verbs.AllocDMA(cfg.SendBufs * cfg.RecvBufSize); err != nil {
		b.close()
		return nil, err
	}
	if b.txMR, err = s.pd.RegMR(b.tx.Bytes(), 0); err != nil {
		b.close()
		return nil, err
	}
	if b.ctl, err = verbs.AllocDMA((cfg.SendBufs + ctlSlots) * ctlSlotSize); err != nil {
		b.close()
		return nil, err
	}
	if b.ctlMR, err = s.pd.RegMR(b.ctl.Bytes(), 0); err != nil {
		b.close()
		return nil, err
	}
	return b, nil
}

// close deregisters and unmaps the set: regions before their memory.
func (b *bufSet) close() {
	for _, m := range []verbs.MR{b.rxMR, b.txMR, b.ctlMR} {
		if m != nil {
			m.Close()
		}
	}
	for _, d := range []*verbs.DMA{b.rx, b.tx, b.ctl} {
		if d != nil {
			d.Close()
		}
	}
}

// scrub zeroes whatever a connection may have left in the set.
func (b *bufSet) scrub() {
	clear(b.rx.Bytes())
	clear(b.ctl.Bytes())
	clear(b.tx.Bytes()[:b.txHi])
	b.txHi = 0
}

// getSet takes an idle set, or allocates one when none is idle.
func (s *Stack) getSet() (*bufSet, error) {
	s.mu.Lock()
	if n := len(s.idle); n > 0 {
		b := s.idle[n-1]
		s.idle = s.idle[:n-1]
		s.reused++
		s.mu.Unlock()
		return b, nil
	}
	s.mu.Unlock()
	return s.newSet()
}

// putSet gives back a connection's set. A reusable one (the connection's
// queue pair is destroyed) is scrubbed and kept while fewer than
// Config.BufferSets are idle and the stack is open; any other is freed.
func (s *Stack) putSet(b *bufSet, reusable bool) {
	if b == nil {
		return
	}
	if reusable && s.cfg.BufferSets > 0 {
		b.scrub()
		s.mu.Lock()
		if !s.closed && len(s.idle) < s.cfg.BufferSets {
			s.idle = append(s.idle, b)
			s.mu.Unlock()
			return
		}
		s.mu.Unlock()
	}
	b.close()
}
