//go:build linux && cgo

// The C side of package ibv: flat, pointer-free structures that Go fills in
// its own memory, and helpers that turn them into libibverbs and librdmacm
// calls. Nothing here keeps a pointer into Go memory after it returns: work
// request lists are built on the C stack for the duration of one post, and
// events are copied out (and acknowledged) before the helper returns.
#ifndef VSDP_IBV_SHIM_H
#define VSDP_IBV_SHIM_H

#include <stdint.h>
#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

// A send work request. SGEs live in a separate flat array; a request uses
// num_sge of them from first_sge on.
struct vsdp_swr {
	uint64_t wr_id;
	uint64_t remote_addr; // RDMA: the peer's address; bind: the window's start
	uint64_t length;      // bind: the window's length
	uintptr_t mw;         // bind: struct ibv_mw *
	uintptr_t mr;         // bind: struct ibv_mr *
	uint32_t rkey;        // RDMA: the peer's key; bind: the window's new key
	uint32_t imm;         // immediate data in host order, or the key to invalidate
	uint32_t access;      // bind: the window's access
	uint32_t first_sge;
	uint32_t num_sge;
	uint32_t opcode;      // enum ibv_wr_opcode
	uint32_t flags;       // enum ibv_send_flags
	uint32_t pad;
};

// A receive work request.
struct vsdp_rwr {
	uint64_t wr_id;
	uint32_t first_sge;
	uint32_t num_sge;
};

// A work completion. imm is the immediate data in host order when
// IBV_WC_WITH_IMM is set; raw is the union as stored (the invalidated key
// when IBV_WC_WITH_INV is set).
struct vsdp_wc {
	uint64_t wr_id;
	uint32_t status;
	uint32_t opcode;
	uint32_t vendor_err;
	uint32_t byte_len;
	uint32_t imm;
	uint32_t qp_num;
	uint32_t flags;
	uint32_t raw;
};

// A connection manager event, copied out of librdmacm's event and
// acknowledged. ctx and listen_ctx are the identifiers' context values.
#define VSDP_MAX_PDATA 256
struct vsdp_cm_event {
	struct rdma_cm_id *id;
	struct rdma_cm_id *listen_id;
	uintptr_t ctx;
	uintptr_t listen_ctx;
	int32_t event;
	int32_t status;
	uint8_t pdata_len;
	uint8_t responder_resources;
	uint8_t initiator_depth;
	uint8_t retry_count;
	uint8_t rnr_retry_count;
	uint8_t pad[3];
	uint8_t pdata[VSDP_MAX_PDATA];
};

// An asynchronous verbs event, copied out and acknowledged.
struct vsdp_async_event {
	int32_t type;
	uint32_t qp_num;
	uintptr_t cq;
	uintptr_t qp;
};

// The addresses of a connection manager identifier. family is AF_INET,
// AF_INET6 or AF_IB (0 when unset); addresses are in network order, ports in
// host order.
struct vsdp_addrs {
	int32_t src_family;
	int32_t dst_family;
	uint8_t src[16];
	uint8_t dst[16];
	uint16_t src_port;
	uint16_t dst_port;
	uint16_t pkey;
	uint16_t pad;
	uint8_t sgid[16];
	uint8_t dgid[16];
};

int vsdp_post_send(struct ibv_qp *qp, const struct vsdp_swr *wrs, int n,
		   const struct ibv_sge *sges, int *bad);
int vsdp_post_recv(struct ibv_qp *qp, const struct vsdp_rwr *wrs, int n,
		   const struct ibv_sge *sges, int *bad);
int vsdp_poll_cq(struct ibv_cq *cq, struct vsdp_wc *out, int n);
// vsdp_spin_cq busy-polls: up to polls empty polls in C, returning the first
// non-empty result (or error) or 0.
int vsdp_spin_cq(struct ibv_cq *cq, struct vsdp_wc *out, int n, int polls);
int vsdp_req_notify_cq(struct ibv_cq *cq, int solicited_only);
int vsdp_get_cq_events(struct ibv_comp_channel *ch, struct ibv_cq *want);
int vsdp_get_cm_event(struct rdma_event_channel *ch, struct vsdp_cm_event *out);
int vsdp_get_async_event(struct ibv_context *ctx, struct vsdp_async_event *out);
int vsdp_set_nonblock(int fd);

int vsdp_create_id(struct rdma_event_channel *ch, struct rdma_cm_id **id,
		   uintptr_t ctx, int ps);
void vsdp_set_context(struct rdma_cm_id *id, uintptr_t ctx);
int vsdp_bind_ip(struct rdma_cm_id *id, int family, const uint8_t *addr, uint16_t port);
int vsdp_resolve_ip(struct rdma_cm_id *id, int family, int has_src, const uint8_t *src,
		    const uint8_t *dst, uint16_t port, int timeout_ms);
int vsdp_resolve_ib(struct rdma_cm_id *id, const uint8_t *sgid, const uint8_t *dgid,
		    uint16_t pkey, uint64_t sid, int timeout_ms);
void vsdp_id_addrs(struct rdma_cm_id *id, struct vsdp_addrs *out);
int vsdp_connect(struct rdma_cm_id *id, uint32_t qp_num, const uint8_t *pdata, int len,
		 int resp_res, int init_depth, int retry, int rnr_retry);
int vsdp_accept(struct rdma_cm_id *id, uint32_t qp_num, const uint8_t *pdata, int len,
		int resp_res, int init_depth, int rnr_retry);
int vsdp_reject(struct rdma_cm_id *id, const uint8_t *pdata, int len);

// Attributes a transition takes from the caller instead of the CM; a
// negative value keeps the CM's.
struct vsdp_qp_over {
	int32_t max_dest_rd_atomic; // RTR
	int32_t min_rnr_timer;      // RTR
	int32_t max_rd_atomic;      // RTS
	int32_t retry_cnt;          // RTS
	int32_t rnr_retry;          // RTS
};
struct ibv_qp *vsdp_create_qp(struct rdma_cm_id *id, struct ibv_pd *pd, struct ibv_cq *scq,
			      struct ibv_cq *rcq, struct ibv_qp_cap *cap, int sig_all);
int vsdp_qp_transition(struct rdma_cm_id *id, struct ibv_qp *qp, int state,
		       const struct vsdp_qp_over *over);

int vsdp_query_qp_state(struct ibv_qp *qp, int *state);
int vsdp_query_qp_retry(struct ibv_qp *qp, int *retry, int *rnr_retry, int *min_rnr_timer,
			int *timeout);
int vsdp_modify_qp_state(struct ibv_qp *qp, int state);
int vsdp_probe_inline(struct ibv_context *ctx);
int vsdp_port_link_layer(struct ibv_context *ctx, int port);

struct ibv_mr *vsdp_reg_mr(struct ibv_pd *pd, uintptr_t addr, size_t len, int access);
struct ibv_mw *vsdp_alloc_mw(struct ibv_pd *pd);
int vsdp_dealloc_mw(struct ibv_mw *mw);
struct ibv_device **vsdp_get_device_list(int *n);

#endif
