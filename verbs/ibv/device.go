//go:build linux && cgo

package ibv

/*
#include <stdlib.h>
#include "shim.h"
*/
import "C"

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/vsdp/vsdp/verbs"
)

// Defaults and bounds.
const (
	defaultCQEntries = 256
	defaultQPWR      = 128
	defaultSGE       = 4
	defaultInline    = 64
	defaultBacklog   = 128
	maxBacklog       = 4096
	defaultRDAtom    = 16   // RDMA READs in flight per direction, when ConnParam says 0
	resolveTimeoutMS = 2000 // per step, as SDP gen2 (ref/sdp-protocol.md §3.2)
	ackBatch         = 32   // CQ events acknowledged at once
)

// Device is an opened rdma-core device with its connection manager. It
// implements verbs.Device.
type Device struct {
	info verbs.DeviceInfo
	lim  limits
	rxe  bool                   // soft-RoCE: see completion
	list **C.struct_ibv_context // rdma_get_devices, freed by Close
	ctx  *C.struct_ibv_context  // librdmacm's context of this device
	hub  *hub

	ch     *C.struct_rdma_event_channel
	cmfd   *verbs.PollFD // a duplicate of ch's fd, on the netpoller
	cmDone chan struct{}

	closeMu sync.Mutex // serialises Close

	mu      sync.Mutex // guards everything below; innermost lock
	closed  bool
	broken  error // the CM event loop failed
	res     verbs.Resources
	targets map[uintptr]cmTarget // CM identifiers by context value
	next    uintptr
	windows map[uint32]*mw // windows by current rkey
}

var _ verbs.Device = (*Device)(nil)

// cmTarget receives the connection manager events of one identifier.
type cmTarget interface {
	cmEvent(ev *cmEvent)
}

// cmEvent is a connection manager event, copied out of C.
type cmEvent struct {
	id       *C.struct_rdma_cm_id
	listenID *C.struct_rdma_cm_id
	typ      C.int
	status   int
	pdata    []byte
	param    reqParam
}

// reqParam are the connection parameters a REQ or REP carried.
type reqParam struct {
	responderResources, initiatorDepth, retryCount, rnrRetryCount uint8
}

// Open opens the named device through librdmacm, whose device context every
// connection manager identifier uses, so queue pairs can be created on them.
func Open(name string) (*Device, error) {
	var n C.int
	list, err := C.rdma_get_devices(&n)
	if list == nil {
		if errors.Is(err, syscall.ENOSYS) || errors.Is(err, syscall.ENODEV) || err == nil {
			return nil, fmt.Errorf("%w: no RDMA device %q (this host has none)", verbs.ErrInvalid, name)
		}
		return nil, callErr("rdma_get_devices", err)
	}
	var ctx *C.struct_ibv_context
	for _, c := range unsafe.Slice(list, int(n)) {
		if c != nil && C.GoString(&c.device.name[0]) == name {
			ctx = c
			break
		}
	}
	if ctx == nil {
		C.rdma_free_devices(list)
		return nil, fmt.Errorf("%w: no RDMA device %q", verbs.ErrInvalid, name)
	}
	info, lim, err := queryDevice(ctx)
	if err != nil {
		C.rdma_free_devices(list)
		return nil, err
	}
	d := &Device{
		info:    info,
		lim:     lim,
		rxe:     lim.vendorID == rxeVendorID,
		list:    list,
		ctx:     ctx,
		cmDone:  make(chan struct{}),
		targets: make(map[uintptr]cmTarget),
		windows: make(map[uint32]*mw),
	}
	ch, err := C.rdma_create_event_channel()
	if ch == nil {
		C.rdma_free_devices(list)
		return nil, callErr("rdma_create_event_channel", err)
	}
	d.ch = ch
	d.cmfd, err = pollDup(int(ch.fd), "rdma_cm")
	if err != nil {
		C.rdma_destroy_event_channel(ch)
		C.rdma_free_devices(list)
		return nil, err
	}
	d.hub, err = acquireHub(ctx)
	if err != nil {
		d.cmfd.Close()
		C.rdma_destroy_event_channel(ch)
		C.rdma_free_devices(list)
		return nil, err
	}
	go d.cmLoop()
	return d, nil
}

// pollDup puts a duplicate of a descriptor that a C library owns on the
// netpoller. The duplicate shares the open file description, so making it
// non-blocking makes the library's reads non-blocking too; closing it leaves
// the library's descriptor open.
func pollDup(fd int, name string) (*verbs.PollFD, error) {
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, callErr("fcntl(F_DUPFD_CLOEXEC)", err)
	}
	p, err := verbs.NewPollFD(dup, name)
	if err != nil {
		unix.Close(dup)
		return nil, err
	}
	return p, nil
}

// cmLoop reads connection manager events whenever the channel is readable and
// dispatches them. It never blocks in C: the channel is non-blocking and the
// goroutine parks on the netpoller.
func (d *Device) cmLoop() {
	defer close(d.cmDone)
	ev := new(C.struct_vsdp_cm_event)
	err := d.cmfd.Wait(context.Background(), func(int) (bool, error) {
		for {
			r, err := C.vsdp_get_cm_event(d.ch, ev)
			if r != 0 {
				switch {
				case errors.Is(err, syscall.EAGAIN):
					return false, nil
				case errors.Is(err, syscall.EINTR):
					continue
				}
				return false, callErr("rdma_get_cm_event", err)
			}
			d.dispatch(ev)
		}
	})
	d.mu.Lock()
	closed := d.closed
	d.mu.Unlock()
	if err != nil && !closed {
		d.fail(err)
	}
}

// fail breaks the device after its event loop stopped: every waiter fails.
func (d *Device) fail(err error) {
	d.mu.Lock()
	d.broken = err
	ts := make([]cmTarget, 0, len(d.targets))
	for _, t := range d.targets {
		ts = append(ts, t)
	}
	d.mu.Unlock()
	for _, t := range ts {
		t.cmEvent(&cmEvent{typ: C.RDMA_CM_EVENT_DEVICE_REMOVAL, status: -int(syscall.EIO)})
	}
}

func (d *Device) dispatch(e *C.struct_vsdp_cm_event) {
	ev := &cmEvent{
		id:       e.id,
		listenID: e.listen_id,
		typ:      C.int(e.event),
		status:   int(e.status),
		param: reqParam{
			responderResources: uint8(e.responder_resources),
			initiatorDepth:     uint8(e.initiator_depth),
			retryCount:         uint8(e.retry_count),
			rnrRetryCount:      uint8(e.rnr_retry_count),
		},
	}
	if e.pdata_len > 0 {
		ev.pdata = C.GoBytes(unsafe.Pointer(&e.pdata[0]), C.int(e.pdata_len))
	}
	key := uintptr(e.ctx)
	if ev.typ == C.RDMA_CM_EVENT_CONNECT_REQUEST {
		key = uintptr(e.listen_ctx)
	}
	d.mu.Lock()
	t := d.targets[key]
	d.mu.Unlock()
	if t != nil {
		t.cmEvent(ev)
		return
	}
	if ev.typ == C.RDMA_CM_EVENT_CONNECT_REQUEST && ev.id != nil {
		// Its listener is gone: refuse the request.
		C.rdma_reject(ev.id, nil, 0)
		C.rdma_destroy_id(ev.id)
	}
}

// register gives t a context value for its identifier.
func (d *Device) register(t cmTarget) (uintptr, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.usable(); err != nil {
		return 0, err
	}
	for {
		d.next++
		if d.next != 0 && d.targets[d.next] == nil {
			break
		}
	}
	d.targets[d.next] = t
	return d.next, nil
}

func (d *Device) unregister(h uintptr) {
	d.mu.Lock()
	delete(d.targets, h)
	d.mu.Unlock()
}

// Info describes the device.
func (d *Device) Info() verbs.DeviceInfo { return d.info }

// Resources counts the live objects of the device.
func (d *Device) Resources() verbs.Resources {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.res
}

// PrivateDataLimits returns the CM private data sizes of a service ID. With
// IP addressing (RDMA_PS_TCP) the RDMA CM's 36-byte header leaves 56 bytes of
// the REQ's 92. An SDP service ID is reached only by an active connect with
// native IB addressing (AF_IB, private data at offset 0), which needs an IB
// link layer; on RoCE and iWARP it is not supported.
func (d *Device) PrivateDataLimits(s verbs.ServiceID) (verbs.PrivateDataLimits, error) {
	switch {
	case s.IsTCP():
		return verbs.PrivateDataLimits{
			Req: verbs.IBReqPrivateData - verbs.RDMACMHeaderLen,
			Rep: verbs.IBRepPrivateData,
			Rej: verbs.IBRejPrivateData,
		}, nil
	case s.IsSDP() && d.info.Transport == "ib":
		return verbs.PrivateDataLimits{
			Req: verbs.IBReqPrivateData,
			Rep: verbs.IBRepPrivateData,
			Rej: verbs.IBRejPrivateData,
		}, nil
	case s.IsSDP():
		return verbs.PrivateDataLimits{}, fmt.Errorf("%w: service ID %v needs native IB addressing (AF_IB), which %s (%s) lacks",
			verbs.ErrNotSupported, s, d.info.Name, d.info.Transport)
	}
	return verbs.PrivateDataLimits{}, fmt.Errorf("%w: service ID %v is neither RDMA_PS_TCP nor SDP", verbs.ErrNotSupported, s)
}

// usable fails once the device is closed or broken. The caller holds d.mu.
func (d *Device) usable() error {
	if d.closed {
		return verbs.ErrClosed
	}
	if d.broken != nil {
		return fmt.Errorf("%w: device event loop failed: %w", verbs.ErrDisconnected, d.broken)
	}
	return nil
}

// AllocPD allocates a protection domain.
func (d *Device) AllocPD() (verbs.PD, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.usable(); err != nil {
		return nil, err
	}
	p, err := C.ibv_alloc_pd(d.ctx)
	if p == nil {
		return nil, callErr("ibv_alloc_pd", err)
	}
	d.res.PDs++
	return &pd{dev: d, pd: p}, nil
}

// Close releases the device. It fails with ErrBusy while any object of the
// device is open. Idempotent.
func (d *Device) Close() error {
	d.closeMu.Lock()
	defer d.closeMu.Unlock()
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	if !d.res.Zero() {
		r := d.res
		d.mu.Unlock()
		return &verbs.BusyError{Object: "device", Children: r.String()}
	}
	d.closed = true
	d.mu.Unlock()

	err := d.cmfd.Close()
	<-d.cmDone
	C.rdma_destroy_event_channel(d.ch)
	releaseHub(d.hub)
	C.rdma_free_devices(d.list)
	return err
}
