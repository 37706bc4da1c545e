//go:build linux && cgo

package ibv

/*
#include "shim.h"
*/
import "C"

import (
	"time"

	"github.com/vsdp/vsdp/verbs"
)

// Conversions between package verbs and the libibverbs enums. Access,
// SendFlags, Status and QPState share libibverbs' values and convert by cast
// (consts_test.go proves it against the C constants); the others go through
// tables built from the C constants themselves.

// wrOpcodes maps verbs.Opcode to enum ibv_wr_opcode; entry 0 is unused.
var wrOpcodes = [...]uint32{
	verbs.OpSend:     C.IBV_WR_SEND,
	verbs.OpSendImm:  C.IBV_WR_SEND_WITH_IMM,
	verbs.OpSendInv:  C.IBV_WR_SEND_WITH_INV,
	verbs.OpWrite:    C.IBV_WR_RDMA_WRITE,
	verbs.OpWriteImm: C.IBV_WR_RDMA_WRITE_WITH_IMM,
	verbs.OpRead:     C.IBV_WR_RDMA_READ,
	verbs.OpBindMW:   C.IBV_WR_BIND_MW,
	verbs.OpLocalInv: C.IBV_WR_LOCAL_INV,
}

// wrOpcode returns the libibverbs opcode of o; ok is false for an invalid
// opcode.
func wrOpcode(o verbs.Opcode) (uint32, bool) {
	if !o.Valid() || int(o) >= len(wrOpcodes) {
		return 0, false
	}
	return wrOpcodes[o], true
}

// compOp converts enum ibv_wc_opcode; opcodes this API does not use (atomics,
// TSO, driver-specific) become 0.
func compOp(op uint32) verbs.CompletionOp {
	switch op {
	case C.IBV_WC_SEND:
		return verbs.CompSend
	case C.IBV_WC_RDMA_WRITE:
		return verbs.CompWrite
	case C.IBV_WC_RDMA_READ:
		return verbs.CompRead
	case C.IBV_WC_BIND_MW:
		return verbs.CompBindMW
	case C.IBV_WC_LOCAL_INV:
		return verbs.CompLocalInv
	case C.IBV_WC_RECV:
		return verbs.CompRecv
	case C.IBV_WC_RECV_RDMA_WITH_IMM:
		return verbs.CompRecvWriteImm
	}
	return 0
}

// compFlags converts enum ibv_wc_flags to the two flags this API reports.
func compFlags(f uint32) verbs.CompletionFlags {
	var out verbs.CompletionFlags
	if f&C.IBV_WC_WITH_IMM != 0 {
		out |= verbs.WithImm
	}
	if f&C.IBV_WC_WITH_INV != 0 {
		out |= verbs.WithInv
	}
	return out
}

// completion converts one flat work completion. Where the status is not
// success only the identifying fields are defined (libibverbs), so the
// others are left zero. rxeFlags corrects soft-RoCE's completion flags: the
// rxe kernel driver writes the kernel's IB_WC_WITH_INVALIDATE (1<<2) into the
// user-mapped completion, and librxe passes it on as it is, where libibverbs
// reads 1<<2 as IBV_WC_IP_CSUM_OK and expects IBV_WC_WITH_INV (1<<3). A
// checksum flag means nothing on an RC receive, so with rxeFlags it is read
// as WITH_INV.
func completion(w *C.struct_vsdp_wc, rxeFlags bool) verbs.Completion {
	c := verbs.Completion{
		ID:        uint64(w.wr_id),
		Status:    verbs.Status(w.status),
		QPN:       uint32(w.qp_num),
		VendorErr: uint32(w.vendor_err),
	}
	if w.status > 0xff {
		c.Status = verbs.StatusGeneral // never truncated into success
	}
	if c.Status != verbs.StatusSuccess {
		return c
	}
	c.Op = compOp(uint32(w.opcode))
	flags := uint32(w.flags)
	if rxeFlags && c.Op == verbs.CompRecv && flags&C.IBV_WC_IP_CSUM_OK != 0 {
		flags = flags&^C.IBV_WC_IP_CSUM_OK | C.IBV_WC_WITH_INV
	}
	c.Flags = compFlags(flags)
	c.ByteLen = uint32(w.byte_len)
	switch {
	case c.Flags&verbs.WithImm != 0:
		c.Imm = uint32(w.imm)
	case c.Flags&verbs.WithInv != 0:
		c.InvalidatedRKey = uint32(w.raw)
	}
	return c
}

// asyncEvent converts the QP- and CQ-affiliated enum ibv_event_type values
// this API reports; ok is false for the others.
func asyncEvent(t int32) (verbs.EventType, bool) {
	switch t {
	case C.IBV_EVENT_QP_FATAL:
		return verbs.EventQPFatal, true
	case C.IBV_EVENT_QP_REQ_ERR:
		return verbs.EventQPRequestError, true
	case C.IBV_EVENT_QP_ACCESS_ERR:
		return verbs.EventQPAccessError, true
	case C.IBV_EVENT_SQ_DRAINED:
		return verbs.EventSQDrained, true
	case C.IBV_EVENT_CQ_ERR:
		return verbs.EventCQError, true
	}
	return 0, false
}

// rnrTimerUsec lists the IB RNR NAK timer encodings (IBA table 45) in
// microseconds by code; code 0 is the longest, 655.36 ms.
var rnrTimerUsec = [32]uint32{
	655360, 10, 20, 30, 40, 60, 80, 120, 160, 240, 320, 480, 640, 960, 1280, 1920,
	2560, 3840, 5120, 7680, 10240, 15360, 20480, 30720, 40960, 61440, 81920,
	122880, 163840, 245760, 327680, 491520,
}

// rnrTimerCode returns the code of the shortest RNR NAK timer that is at
// least d (codes 1–31 ascend; 0 is 655.36 ms, beyond every other). A
// non-positive d has no code: ok is false and the connection manager's
// default stays.
func rnrTimerCode(d time.Duration) (code uint8, ok bool) {
	if d <= 0 {
		return 0, false
	}
	us := d.Microseconds()
	if d%time.Microsecond != 0 {
		us++
	}
	for c := 1; c < len(rnrTimerUsec); c++ {
		if int64(rnrTimerUsec[c]) >= us {
			return uint8(c), true
		}
	}
	return 0, true
}

// rnrTimerDuration returns the time an RNR NAK timer code stands for.
func rnrTimerDuration(code uint8) time.Duration {
	return time.Duration(rnrTimerUsec[code&31]) * time.Microsecond
}

// ackTimeoutDuration decodes a local ACK timeout (IBA 9.7.6.1.3):
// 4.096 µs × 2^code, where 0 means no timeout (returned as 0).
func ackTimeoutDuration(code int) time.Duration {
	if code <= 0 || code > 31 {
		return 0
	}
	return time.Duration(4096<<code) * time.Nanosecond
}
