//go:build linux && cgo

package ibv

/*
#include "shim.h"
*/
import "C"

import (
	"fmt"
	"sync"
	"unsafe"

	"github.com/vsdp/vsdp/verbs"
)

// pd is a protection domain.
type pd struct {
	dev *Device
	pd  *C.struct_ibv_pd

	closeMu  sync.Mutex
	children int  // MRs, MWs and QPs; guarded by dev.mu
	closed   bool // guarded by dev.mu
}

var _ verbs.PD = (*pd)(nil)

// open fails when the PD or its device is closed; the caller holds dev.mu.
func (p *pd) open() error {
	if p.closed {
		return verbs.ErrClosed
	}
	return p.dev.usable()
}

// RegMR registers buf, which must not be Go heap memory: the kernel pins the
// pages and the device reads and writes them after RegMR returns. Use guest
// memory the caller mapped, or verbs.AllocDMA.
func (p *pd) RegMR(buf []byte, access verbs.Access) (verbs.MR, error) {
	if err := access.ValidateMR(); err != nil {
		return nil, err
	}
	if len(buf) == 0 {
		return nil, fmt.Errorf("%w: empty memory region", verbs.ErrInvalid)
	}
	// The address crosses as an integer: the memory is not Go's, and C
	// keeps it (cgo's pointer rules are about Go memory).
	addr := uintptr(unsafe.Pointer(unsafe.SliceData(buf)))
	if addr+uintptr(len(buf)) < addr {
		return nil, fmt.Errorf("%w: region wraps the address space", verbs.ErrInvalid)
	}
	// Registering pins every page, which takes a while for guest memory:
	// reserve the slot (so the PD stays open) and call without the lock.
	d := p.dev
	d.mu.Lock()
	if err := p.open(); err != nil {
		d.mu.Unlock()
		return nil, err
	}
	p.children++
	d.res.MRs++
	d.mu.Unlock()
	m, err := C.vsdp_reg_mr(p.pd, C.uintptr_t(addr), C.size_t(len(buf)), C.int(access))
	if m == nil {
		d.mu.Lock()
		p.children--
		d.res.MRs--
		d.mu.Unlock()
		return nil, callErr("ibv_reg_mr", err)
	}
	return &mr{
		dev:    d,
		pd:     p,
		mr:     m,
		buf:    buf[:len(buf):len(buf)],
		addr:   uint64(addr),
		access: access,
		lkey:   uint32(m.lkey),
		rkey:   uint32(m.rkey),
	}, nil
}

// AllocMW allocates a type-2 memory window.
func (p *pd) AllocMW() (verbs.MW, error) {
	d := p.dev
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := p.open(); err != nil {
		return nil, err
	}
	w, err := C.vsdp_alloc_mw(p.pd)
	if w == nil {
		return nil, callErr("ibv_alloc_mw", err)
	}
	win := &mw{dev: d, pd: p, mw: w, key: uint32(w.rkey)}
	d.windows[win.key] = win
	p.children++
	d.res.MWs++
	return win, nil
}

// Close deallocates the domain; it fails with ErrBusy while regions, windows
// or queue pairs of it are open. Idempotent.
func (p *pd) Close() error {
	p.closeMu.Lock()
	defer p.closeMu.Unlock()
	d := p.dev
	d.mu.Lock()
	defer d.mu.Unlock()
	if p.closed {
		return nil
	}
	if p.children > 0 {
		return &verbs.BusyError{Object: "pd", Children: fmt.Sprintf("%d MRs, MWs and QPs", p.children)}
	}
	if rc := C.ibv_dealloc_pd(p.pd); rc != 0 {
		return rcErr("ibv_dealloc_pd", int(rc))
	}
	p.closed = true
	d.res.PDs--
	return nil
}

// mr is a registered memory region.
type mr struct {
	dev    *Device
	pd     *pd
	mr     *C.struct_ibv_mr
	buf    []byte
	addr   uint64
	access verbs.Access
	lkey   uint32
	rkey   uint32

	closeMu sync.Mutex
	windows int  // windows bound to it, guarded by dev.mu
	closed  bool // guarded by dev.mu
}

var _ verbs.MR = (*mr)(nil)

func (m *mr) LKey() uint32         { return m.lkey }
func (m *mr) RKey() uint32         { return m.rkey }
func (m *mr) Addr() uint64         { return m.addr }
func (m *mr) Len() int             { return len(m.buf) }
func (m *mr) Access() verbs.Access { return m.access }
func (m *mr) Bytes() []byte        { return m.buf }

// Close deregisters the region; it fails with ErrBusy while windows posted
// for binding to it are bound. After Close the device no longer touches the
// memory (ibv_dereg_mr). Idempotent.
func (m *mr) Close() error {
	m.closeMu.Lock()
	defer m.closeMu.Unlock()
	d := m.dev
	d.mu.Lock()
	defer d.mu.Unlock()
	if m.closed {
		return nil
	}
	if m.windows > 0 {
		return &verbs.BusyError{Object: "mr", Children: fmt.Sprintf("%d bound memory windows", m.windows)}
	}
	if rc := C.ibv_dereg_mr(m.mr); rc != 0 {
		return rcErr("ibv_dereg_mr", int(rc))
	}
	m.closed = true
	m.pd.children--
	d.res.MRs--
	return nil
}

// mw is a type-2 memory window. The device cannot be asked whether a window
// is bound, so the provider keeps the state of what was posted: a bind
// posted successfully binds it (with its new key), a local invalidate posted
// or a received SEND with invalidate naming its key unbinds it, and so does
// destroying the queue pair it was bound through. A bind the device later
// fails (MW_BIND_ERR) is not seen here.
type mw struct {
	dev *Device
	pd  *pd
	mw  *C.struct_ibv_mw

	closeMu sync.Mutex
	// guarded by dev.mu:
	key    uint32
	bound  bool
	m      *mr
	q      *qp
	closed bool
}

var _ verbs.MW = (*mw)(nil)

func (w *mw) RKey() uint32 {
	w.dev.mu.Lock()
	defer w.dev.mu.Unlock()
	return w.key
}

func (w *mw) Bound() bool {
	w.dev.mu.Lock()
	defer w.dev.mu.Unlock()
	return w.bound
}

// unbind forgets a bind; the caller holds dev.mu.
func (w *mw) unbind() {
	if !w.bound {
		return
	}
	w.bound = false
	w.m.windows--
	w.m, w.q = nil, nil
}

// bind records a bind posted on q; the caller holds dev.mu.
func (w *mw) bind(q *qp, m *mr, key uint32) {
	w.unbind()
	if w.dev.windows[w.key] == w {
		delete(w.dev.windows, w.key)
	}
	w.key = key
	w.dev.windows[key] = w
	w.bound = true
	w.m, w.q = m, q
	m.windows++
}

// Close deallocates the window, invalidating any bind. Idempotent.
func (w *mw) Close() error {
	w.closeMu.Lock()
	defer w.closeMu.Unlock()
	d := w.dev
	d.mu.Lock()
	defer d.mu.Unlock()
	if w.closed {
		return nil
	}
	if rc := C.vsdp_dealloc_mw(w.mw); rc != 0 {
		return rcErr("ibv_dealloc_mw", int(rc))
	}
	w.closed = true
	w.unbind()
	if d.windows[w.key] == w {
		delete(d.windows, w.key)
	}
	w.pd.children--
	d.res.MWs--
	return nil
}

// remoteInvalidated unbinds the window a received SEND with invalidate named.
func (d *Device) remoteInvalidated(key uint32) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if w := d.windows[key]; w != nil {
		w.unbind()
	}
}
