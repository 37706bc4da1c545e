//go:build linux && cgo

package ibv

/*
#include "shim.h"
*/
import "C"

import (
	"context"
	"errors"
	"sync"
	"syscall"
	"unsafe"

	"github.com/vsdp/vsdp/verbs"
)

// hub reads the asynchronous events of one device context. librdmacm keeps
// one context per device for the whole process, shared by every Device opened
// on it, so the hub is shared too: reference-counted, one goroutine per
// context, parked on the netpoller.
type hub struct {
	ctx  *C.struct_ibv_context
	fd   *verbs.PollFD
	done chan struct{}
	refs int // guarded by hubs.mu

	mu  sync.Mutex // guards the maps; taken after no other lock of this package
	qps map[uint32]*qp
	cqs map[uintptr]*cq // by struct ibv_cq address
}

var hubs struct {
	mu sync.Mutex
	m  map[*C.struct_ibv_context]*hub
}

func acquireHub(ctx *C.struct_ibv_context) (*hub, error) {
	hubs.mu.Lock()
	defer hubs.mu.Unlock()
	if h := hubs.m[ctx]; h != nil {
		h.refs++
		return h, nil
	}
	fd, err := pollDup(int(ctx.async_fd), "ibv_async")
	if err != nil {
		return nil, err
	}
	h := &hub{
		ctx:  ctx,
		fd:   fd,
		done: make(chan struct{}),
		refs: 1,
		qps:  make(map[uint32]*qp),
		cqs:  make(map[uintptr]*cq),
	}
	if hubs.m == nil {
		hubs.m = make(map[*C.struct_ibv_context]*hub)
	}
	hubs.m[ctx] = h
	go h.loop()
	return h, nil
}

func releaseHub(h *hub) {
	hubs.mu.Lock()
	h.refs--
	last := h.refs == 0
	if last {
		delete(hubs.m, h.ctx)
	}
	hubs.mu.Unlock()
	if last {
		h.fd.Close()
		<-h.done
	}
}

func (h *hub) loop() {
	defer close(h.done)
	ev := new(C.struct_vsdp_async_event)
	h.fd.Wait(context.Background(), func(int) (bool, error) { //nolint:errcheck // ends with ErrClosed
		for {
			r, err := C.vsdp_get_async_event(h.ctx, ev)
			if r != 0 {
				if errors.Is(err, syscall.EINTR) {
					continue
				}
				// EAGAIN: drained. Anything else: the context is gone;
				// wait for Close.
				return false, nil
			}
			h.dispatch(ev)
		}
	})
}

func (h *hub) dispatch(ev *C.struct_vsdp_async_event) {
	switch ev._type {
	case C.IBV_EVENT_CQ_ERR:
		h.mu.Lock()
		c := h.cqs[uintptr(ev.cq)]
		var users []*qp
		if c != nil {
			for _, q := range h.qps {
				if q.scq == c || q.rcq == c {
					users = append(users, q)
				}
			}
		}
		h.mu.Unlock()
		if c == nil {
			return
		}
		c.overflow.Store(true)
		for _, q := range users {
			q.asyncEvent(ev._type)
		}
	default:
		h.mu.Lock()
		q := h.qps[uint32(ev.qp_num)]
		h.mu.Unlock()
		if q != nil {
			q.asyncEvent(ev._type)
		}
	}
}

func (h *hub) addQP(q *qp) {
	h.mu.Lock()
	h.qps[q.num] = q
	h.mu.Unlock()
}

func (h *hub) removeQP(q *qp) {
	h.mu.Lock()
	if h.qps[q.num] == q {
		delete(h.qps, q.num)
	}
	h.mu.Unlock()
}

func (h *hub) addCQ(c *cq) {
	h.mu.Lock()
	h.cqs[uintptr(unsafe.Pointer(c.cq))] = c
	h.mu.Unlock()
}

func (h *hub) removeCQ(c *cq) {
	h.mu.Lock()
	delete(h.cqs, uintptr(unsafe.Pointer(c.cq)))
	h.mu.Unlock()
}

// qpFailed notes that a queue pair had a failed completion, so it may be in
// the error state (see qp.flushRecv).
func (h *hub) qpFailed(qpn uint32) {
	h.mu.Lock()
	q := h.qps[qpn]
	h.mu.Unlock()
	if q != nil {
		q.maybeErr.Store(true)
	}
}
