//go:build linux && cgo

package ibv

/*
#cgo LDFLAGS: -libverbs -lrdmacm
#include <stdlib.h>
#include "shim.h"
*/
import "C"

import (
	"encoding/binary"
	"errors"
	"fmt"
	"syscall"
	"unsafe"

	"github.com/vsdp/vsdp/verbs"
)

// Provider lists and opens the host's RDMA devices through rdma-core. It
// implements verbs.Provider. The zero value is ready to use.
type Provider struct{}

var _ verbs.Provider = (*Provider)(nil)

// New returns the rdma-core provider.
func New() *Provider { return &Provider{} }

// Name returns "ibv".
func (*Provider) Name() string { return "ibv" }

// Devices lists the RDMA devices with their limits (each is opened briefly to
// query it). A host whose kernel has no RDMA support makes
// ibv_get_device_list fail with ENOSYS: that is zero devices, not an error.
func (*Provider) Devices() ([]verbs.DeviceInfo, error) {
	var n C.int
	list, err := C.vsdp_get_device_list(&n)
	if list == nil {
		if errors.Is(err, syscall.ENOSYS) || err == nil {
			return nil, nil
		}
		return nil, callErr("ibv_get_device_list", err)
	}
	defer C.ibv_free_device_list(list)
	devs := unsafe.Slice(list, int(n))
	out := make([]verbs.DeviceInfo, 0, len(devs))
	for _, dev := range devs {
		ctx, err := C.ibv_open_device(dev)
		if ctx == nil {
			return nil, fmt.Errorf("ibv: open %s: %w", C.GoString(C.ibv_get_device_name(dev)), callErr("ibv_open_device", err))
		}
		info, _, err := queryDevice(ctx)
		C.ibv_close_device(ctx)
		if err != nil {
			return nil, err
		}
		out = append(out, info)
	}
	return out, nil
}

// Open opens the named device with its connection manager. The name is the
// kernel's (rxe0, mlx5_0), as Devices reports it.
func (*Provider) Open(name string) (verbs.Device, error) {
	return Open(name)
}

// limits are the device attributes the provider needs beyond DeviceAttr.
type limits struct {
	maxRDAtom     int    // max_qp_rd_atom: RDMA READs a responder keeps
	maxInitRDAtom int    // max_qp_init_rd_atom: RDMA READs an initiator keeps
	vendorID      uint32 // vendor_id
}

// rxeVendorID is the vendor ID the rxe (soft-RoCE) driver reports.
const rxeVendorID = 0xffffff

// queryDevice describes an opened context.
func queryDevice(ctx *C.struct_ibv_context) (verbs.DeviceInfo, limits, error) {
	var a C.struct_ibv_device_attr
	if rc := C.ibv_query_device(ctx, &a); rc != 0 {
		return verbs.DeviceInfo{}, limits{}, rcErr("ibv_query_device", int(rc))
	}
	info := verbs.DeviceInfo{
		Name:     C.GoString(&ctx.device.name[0]),
		Provider: "ibv",
		GUID:     beToHost64(uint64(C.ibv_get_device_guid(ctx.device))),
		Attr: verbs.DeviceAttr{
			MaxQP:      int(a.max_qp),
			MaxQPWR:    int(a.max_qp_wr),
			MaxSGE:     int(a.max_sge),
			MaxCQ:      int(a.max_cq),
			MaxCQE:     int(a.max_cqe),
			MaxMR:      int(a.max_mr),
			MaxMW:      int(a.max_mw),
			MaxPD:      int(a.max_pd),
			MaxMsgSize: 1 << 31, // IBA: an RC message is at most 2^31 bytes
		},
	}
	switch ctx.device.transport_type {
	case C.IBV_TRANSPORT_IB:
		info.Transport = "ib"
		if C.vsdp_port_link_layer(ctx, 1) == C.IBV_LINK_LAYER_ETHERNET {
			info.Transport = "roce"
		}
	case C.IBV_TRANSPORT_IWARP:
		info.Transport = "iwarp"
	default:
		info.Transport = "unknown"
	}
	if in, _ := C.vsdp_probe_inline(ctx); in > 0 {
		info.Attr.MaxInline = int(in)
	}
	return info, limits{maxRDAtom: int(a.max_qp_rd_atom), maxInitRDAtom: int(a.max_qp_init_rd_atom), vendorID: uint32(a.vendor_id)}, nil
}

// beToHost64 converts a big-endian 64-bit value read as host order.
func beToHost64(v uint64) uint64 {
	var b [8]byte
	binary.NativeEndian.PutUint64(b[:], v)
	return binary.BigEndian.Uint64(b[:])
}
