//go:build linux && cgo

package ibv

/*
#include "shim.h"
*/
import "C"

import "github.com/vsdp/vsdp/verbs"

// castPair is one value that crosses the cgo boundary by cast: the package
// verbs constant and the C enumerator it must equal. Tests cannot use cgo,
// so the C side of the comparison is collected here.
type castPair struct {
	name string
	goV  uint64
	cV   uint64
}

func castPairs() []castPair {
	return []castPair{
		{"IBV_ACCESS_LOCAL_WRITE", uint64(verbs.AccessLocalWrite), C.IBV_ACCESS_LOCAL_WRITE},
		{"IBV_ACCESS_REMOTE_WRITE", uint64(verbs.AccessRemoteWrite), C.IBV_ACCESS_REMOTE_WRITE},
		{"IBV_ACCESS_REMOTE_READ", uint64(verbs.AccessRemoteRead), C.IBV_ACCESS_REMOTE_READ},
		{"IBV_ACCESS_REMOTE_ATOMIC", uint64(verbs.AccessRemoteAtomic), C.IBV_ACCESS_REMOTE_ATOMIC},
		{"IBV_ACCESS_MW_BIND", uint64(verbs.AccessMWBind), C.IBV_ACCESS_MW_BIND},

		{"IBV_SEND_FENCE", uint64(verbs.SendFence), C.IBV_SEND_FENCE},
		{"IBV_SEND_SIGNALED", uint64(verbs.SendSignaled), C.IBV_SEND_SIGNALED},
		{"IBV_SEND_SOLICITED", uint64(verbs.SendSolicited), C.IBV_SEND_SOLICITED},
		{"IBV_SEND_INLINE", uint64(verbs.SendInline), C.IBV_SEND_INLINE},

		{"IBV_QPS_RESET", uint64(verbs.QPReset), C.IBV_QPS_RESET},
		{"IBV_QPS_INIT", uint64(verbs.QPInit), C.IBV_QPS_INIT},
		{"IBV_QPS_RTR", uint64(verbs.QPRTR), C.IBV_QPS_RTR},
		{"IBV_QPS_RTS", uint64(verbs.QPRTS), C.IBV_QPS_RTS},
		{"IBV_QPS_SQD", uint64(verbs.QPSQD), C.IBV_QPS_SQD},
		{"IBV_QPS_SQE", uint64(verbs.QPSQE), C.IBV_QPS_SQE},
		{"IBV_QPS_ERR", uint64(verbs.QPError), C.IBV_QPS_ERR},

		{"IBV_WC_SUCCESS", uint64(verbs.StatusSuccess), C.IBV_WC_SUCCESS},
		{"IBV_WC_LOC_LEN_ERR", uint64(verbs.StatusLocalLength), C.IBV_WC_LOC_LEN_ERR},
		{"IBV_WC_LOC_QP_OP_ERR", uint64(verbs.StatusLocalQPOp), C.IBV_WC_LOC_QP_OP_ERR},
		{"IBV_WC_LOC_EEC_OP_ERR", uint64(verbs.StatusLocalEECOp), C.IBV_WC_LOC_EEC_OP_ERR},
		{"IBV_WC_LOC_PROT_ERR", uint64(verbs.StatusLocalProtection), C.IBV_WC_LOC_PROT_ERR},
		{"IBV_WC_WR_FLUSH_ERR", uint64(verbs.StatusFlushed), C.IBV_WC_WR_FLUSH_ERR},
		{"IBV_WC_MW_BIND_ERR", uint64(verbs.StatusMWBind), C.IBV_WC_MW_BIND_ERR},
		{"IBV_WC_BAD_RESP_ERR", uint64(verbs.StatusBadResponse), C.IBV_WC_BAD_RESP_ERR},
		{"IBV_WC_LOC_ACCESS_ERR", uint64(verbs.StatusLocalAccess), C.IBV_WC_LOC_ACCESS_ERR},
		{"IBV_WC_REM_INV_REQ_ERR", uint64(verbs.StatusRemoteInvalidReq), C.IBV_WC_REM_INV_REQ_ERR},
		{"IBV_WC_REM_ACCESS_ERR", uint64(verbs.StatusRemoteAccess), C.IBV_WC_REM_ACCESS_ERR},
		{"IBV_WC_REM_OP_ERR", uint64(verbs.StatusRemoteOp), C.IBV_WC_REM_OP_ERR},
		{"IBV_WC_RETRY_EXC_ERR", uint64(verbs.StatusRetryExceeded), C.IBV_WC_RETRY_EXC_ERR},
		{"IBV_WC_RNR_RETRY_EXC_ERR", uint64(verbs.StatusRNRRetryExceeded), C.IBV_WC_RNR_RETRY_EXC_ERR},
		{"IBV_WC_LOC_RDD_VIOL_ERR", uint64(verbs.StatusLocalRDDViolation), C.IBV_WC_LOC_RDD_VIOL_ERR},
		{"IBV_WC_REM_INV_RD_REQ_ERR", uint64(verbs.StatusRemoteInvalidRdReq), C.IBV_WC_REM_INV_RD_REQ_ERR},
		{"IBV_WC_REM_ABORT_ERR", uint64(verbs.StatusRemoteAbort), C.IBV_WC_REM_ABORT_ERR},
		{"IBV_WC_INV_EECN_ERR", uint64(verbs.StatusInvalidEECN), C.IBV_WC_INV_EECN_ERR},
		{"IBV_WC_INV_EEC_STATE_ERR", uint64(verbs.StatusInvalidEECState), C.IBV_WC_INV_EEC_STATE_ERR},
		{"IBV_WC_FATAL_ERR", uint64(verbs.StatusFatal), C.IBV_WC_FATAL_ERR},
		{"IBV_WC_RESP_TIMEOUT_ERR", uint64(verbs.StatusResponseTimeout), C.IBV_WC_RESP_TIMEOUT_ERR},
		{"IBV_WC_GENERAL_ERR", uint64(verbs.StatusGeneral), C.IBV_WC_GENERAL_ERR},

		// The CM reports a REJ's reason as the event status (IB CM,
		// enum ib_cm_rej_reason); these are the ones verbs names.
		{"IB_CM_REJ_NO_QP", uint64(verbs.RejectNoQP), 1},
		{"IB_CM_REJ_NO_RESOURCES", uint64(verbs.RejectNoResources), 3},
		{"IB_CM_REJ_INVALID_SERVICE_ID", uint64(verbs.RejectInvalidServiceID), 8},
		{"IB_CM_REJ_CONSUMER_DEFINED", uint64(verbs.RejectConsumer), 28},

		{"RDMA_PS_TCP<<16", uint64(verbs.TCPServiceID(0)), C.RDMA_PS_TCP << 16},
		{"RDMA_PS_SDP<<16", uint64(verbs.SDPServiceID(0)), 0x0001 << 16},
	}
}

// cSizes are C structure sizes the Go side relies on.
func cSizes() map[string]uintptr {
	return map[string]uintptr{
		"struct ibv_sge": C.sizeof_struct_ibv_sge,
		"verbs.SGE":      16,
		"struct vsdp_wc": C.sizeof_struct_vsdp_wc,
	}
}

// wcFlagValues returns the C values of IBV_WC_WITH_IMM and IBV_WC_WITH_INV.
func wcFlagValues() (imm, inv uint32) { return C.IBV_WC_WITH_IMM, C.IBV_WC_WITH_INV }

// wcOpcodeValues returns the C enum ibv_wc_opcode values by verbs op.
func wcOpcodeValues() map[verbs.CompletionOp]uint32 {
	return map[verbs.CompletionOp]uint32{
		verbs.CompSend:         C.IBV_WC_SEND,
		verbs.CompWrite:        C.IBV_WC_RDMA_WRITE,
		verbs.CompRead:         C.IBV_WC_RDMA_READ,
		verbs.CompBindMW:       C.IBV_WC_BIND_MW,
		verbs.CompLocalInv:     C.IBV_WC_LOCAL_INV,
		verbs.CompRecv:         C.IBV_WC_RECV,
		verbs.CompRecvWriteImm: C.IBV_WC_RECV_RDMA_WITH_IMM,
	}
}

// newWC builds a flat completion for tests of completion(), as the C helper
// fills it: imm only with IBV_WC_WITH_IMM, raw always.
func newWC(id uint64, status, opcode, flags, data, byteLen, qpn uint32) C.struct_vsdp_wc {
	w := C.struct_vsdp_wc{
		wr_id: C.uint64_t(id), status: C.uint32_t(status), opcode: C.uint32_t(opcode),
		flags: C.uint32_t(flags), raw: C.uint32_t(data), byte_len: C.uint32_t(byteLen),
		qp_num: C.uint32_t(qpn),
	}
	if flags&C.IBV_WC_WITH_IMM != 0 {
		w.imm = C.uint32_t(data)
	}
	return w
}

// csumFlag returns IBV_WC_IP_CSUM_OK.
func csumFlag() uint32 { return C.IBV_WC_IP_CSUM_OK }

// asyncEventValues returns the C enum ibv_event_type values by verbs event.
func asyncEventValues() map[verbs.EventType]int32 {
	return map[verbs.EventType]int32{
		verbs.EventQPFatal:        C.IBV_EVENT_QP_FATAL,
		verbs.EventQPRequestError: C.IBV_EVENT_QP_REQ_ERR,
		verbs.EventQPAccessError:  C.IBV_EVENT_QP_ACCESS_ERR,
		verbs.EventSQDrained:      C.IBV_EVENT_SQ_DRAINED,
		verbs.EventCQError:        C.IBV_EVENT_CQ_ERR,
	}
}
