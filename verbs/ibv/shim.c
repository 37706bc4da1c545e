//go:build linux && cgo

#include "shim.h"

#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <infiniband/ib.h>

// Work requests and completions cross in chunks of this many, built on the C
// stack (about 4 KiB of ibv_send_wr).
#define VSDP_CHUNK 32

static int vsdp_min(int a, int b) { return a < b ? a : b; }

int vsdp_post_send(struct ibv_qp *qp, const struct vsdp_swr *wrs, int n,
		   const struct ibv_sge *sges, int *bad)
{
	struct ibv_send_wr w[VSDP_CHUNK];

	*bad = -1;
	for (int base = 0; base < n; base += VSDP_CHUNK) {
		int m = vsdp_min(n - base, VSDP_CHUNK);
		memset(w, 0, sizeof(w[0]) * m);
		for (int i = 0; i < m; i++) {
			const struct vsdp_swr *s = &wrs[base + i];
			struct ibv_send_wr *d = &w[i];

			d->wr_id = s->wr_id;
			d->next = i + 1 < m ? &w[i + 1] : NULL;
			d->sg_list = s->num_sge ? (struct ibv_sge *)&sges[s->first_sge] : NULL;
			d->num_sge = (int)s->num_sge;
			d->opcode = (enum ibv_wr_opcode)s->opcode;
			d->send_flags = s->flags;
			switch (s->opcode) {
			case IBV_WR_SEND_WITH_IMM:
			case IBV_WR_RDMA_WRITE_WITH_IMM:
				d->imm_data = htonl(s->imm);
				break;
			case IBV_WR_SEND_WITH_INV:
			case IBV_WR_LOCAL_INV:
				d->invalidate_rkey = s->imm;
				break;
			}
			switch (s->opcode) {
			case IBV_WR_RDMA_WRITE:
			case IBV_WR_RDMA_WRITE_WITH_IMM:
			case IBV_WR_RDMA_READ:
				d->wr.rdma.remote_addr = s->remote_addr;
				d->wr.rdma.rkey = s->rkey;
				break;
			case IBV_WR_BIND_MW:
				d->bind_mw.mw = (struct ibv_mw *)s->mw;
				d->bind_mw.rkey = s->rkey;
				d->bind_mw.bind_info.mr = (struct ibv_mr *)s->mr;
				d->bind_mw.bind_info.addr = s->remote_addr;
				d->bind_mw.bind_info.length = s->length;
				d->bind_mw.bind_info.mw_access_flags = s->access;
				break;
			}
		}
		struct ibv_send_wr *badwr = NULL;
		int rc = ibv_post_send(qp, w, &badwr);
		if (rc) {
			int at = 0;
			if (badwr >= w && badwr < w + m)
				at = (int)(badwr - w);
			*bad = base + at;
			return rc;
		}
	}
	return 0;
}

int vsdp_post_recv(struct ibv_qp *qp, const struct vsdp_rwr *wrs, int n,
		   const struct ibv_sge *sges, int *bad)
{
	struct ibv_recv_wr w[VSDP_CHUNK];

	*bad = -1;
	for (int base = 0; base < n; base += VSDP_CHUNK) {
		int m = vsdp_min(n - base, VSDP_CHUNK);
		for (int i = 0; i < m; i++) {
			const struct vsdp_rwr *s = &wrs[base + i];
			w[i].wr_id = s->wr_id;
			w[i].next = i + 1 < m ? &w[i + 1] : NULL;
			w[i].sg_list = s->num_sge ? (struct ibv_sge *)&sges[s->first_sge] : NULL;
			w[i].num_sge = (int)s->num_sge;
		}
		struct ibv_recv_wr *badwr = NULL;
		int rc = ibv_post_recv(qp, w, &badwr);
		if (rc) {
			int at = 0;
			if (badwr >= w && badwr < w + m)
				at = (int)(badwr - w);
			*bad = base + at;
			return rc;
		}
	}
	return 0;
}

int vsdp_poll_cq(struct ibv_cq *cq, struct vsdp_wc *out, int n)
{
	struct ibv_wc wc[VSDP_CHUNK];
	int total = 0;

	while (total < n) {
		int want = vsdp_min(n - total, VSDP_CHUNK);
		int got = ibv_poll_cq(cq, want, wc);
		if (got < 0)
			return total ? total : got;
		for (int i = 0; i < got; i++) {
			struct vsdp_wc *d = &out[total + i];
			d->wr_id = wc[i].wr_id;
			d->status = wc[i].status;
			d->opcode = wc[i].opcode;
			d->vendor_err = wc[i].vendor_err;
			d->byte_len = wc[i].byte_len;
			d->qp_num = wc[i].qp_num;
			d->flags = wc[i].wc_flags;
			d->imm = 0;
			if (wc[i].wc_flags & IBV_WC_WITH_IMM)
				d->imm = ntohl(wc[i].imm_data);
			d->raw = wc[i].invalidated_rkey;
		}
		total += got;
		if (got < want)
			break;
	}
	return total;
}

int vsdp_spin_cq(struct ibv_cq *cq, struct vsdp_wc *out, int n, int polls)
{
	for (int i = 0; i < polls; i++) {
		int got = vsdp_poll_cq(cq, out, n);
		if (got != 0)
			return got;
#if defined(__x86_64__) || defined(__i386__)
		__builtin_ia32_pause();
#endif
	}
	return 0;
}

int vsdp_req_notify_cq(struct ibv_cq *cq, int solicited_only)
{
	return ibv_req_notify_cq(cq, solicited_only);
}

// vsdp_get_cq_events reads every pending event of a non-blocking completion
// channel and returns how many there were (to be acknowledged), or -1 with
// errno set. Each channel serves one CQ, want.
int vsdp_get_cq_events(struct ibv_comp_channel *ch, struct ibv_cq *want)
{
	int n = 0;

	for (;;) {
		struct ibv_cq *cq;
		void *ctx;
		if (ibv_get_cq_event(ch, &cq, &ctx)) {
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return n;
			if (errno == EINTR)
				continue;
			return n ? n : -1;
		}
		(void)want;
		n++;
	}
}

int vsdp_get_cm_event(struct rdma_event_channel *ch, struct vsdp_cm_event *out)
{
	struct rdma_cm_event *ev;

	if (rdma_get_cm_event(ch, &ev))
		return -1;
	memset(out, 0, sizeof(*out));
	out->id = ev->id;
	out->listen_id = ev->listen_id;
	out->ctx = ev->id ? (uintptr_t)ev->id->context : 0;
	out->listen_ctx = ev->listen_id ? (uintptr_t)ev->listen_id->context : 0;
	out->event = ev->event;
	out->status = ev->status;
	switch (ev->event) {
	case RDMA_CM_EVENT_CONNECT_REQUEST:
	case RDMA_CM_EVENT_CONNECT_RESPONSE:
	case RDMA_CM_EVENT_ESTABLISHED:
	case RDMA_CM_EVENT_REJECTED: {
		const struct rdma_conn_param *p = &ev->param.conn;
		out->responder_resources = p->responder_resources;
		out->initiator_depth = p->initiator_depth;
		out->retry_count = p->retry_count;
		out->rnr_retry_count = p->rnr_retry_count;
		if (p->private_data && p->private_data_len) {
			out->pdata_len = p->private_data_len;
			memcpy(out->pdata, p->private_data, p->private_data_len);
		}
		break;
	}
	default:
		break;
	}
	rdma_ack_cm_event(ev);
	return 0;
}

int vsdp_get_async_event(struct ibv_context *ctx, struct vsdp_async_event *out)
{
	struct ibv_async_event ev;

	if (ibv_get_async_event(ctx, &ev))
		return -1;
	memset(out, 0, sizeof(*out));
	out->type = ev.event_type;
	switch (ev.event_type) {
	case IBV_EVENT_QP_FATAL:
	case IBV_EVENT_QP_REQ_ERR:
	case IBV_EVENT_QP_ACCESS_ERR:
	case IBV_EVENT_COMM_EST:
	case IBV_EVENT_SQ_DRAINED:
	case IBV_EVENT_PATH_MIG:
	case IBV_EVENT_PATH_MIG_ERR:
	case IBV_EVENT_QP_LAST_WQE_REACHED:
		out->qp = (uintptr_t)ev.element.qp;
		out->qp_num = ev.element.qp ? ev.element.qp->qp_num : 0;
		break;
	case IBV_EVENT_CQ_ERR:
		out->cq = (uintptr_t)ev.element.cq;
		break;
	default:
		break;
	}
	ibv_ack_async_event(&ev);
	return 0;
}

int vsdp_set_nonblock(int fd)
{
	int fl = fcntl(fd, F_GETFL);
	if (fl < 0)
		return -1;
	return fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

int vsdp_create_id(struct rdma_event_channel *ch, struct rdma_cm_id **id,
		   uintptr_t ctx, int ps)
{
	return rdma_create_id(ch, id, (void *)ctx, (enum rdma_port_space)ps);
}

void vsdp_set_context(struct rdma_cm_id *id, uintptr_t ctx)
{
	id->context = (void *)ctx;
}

// vsdp_sockaddr fills an AF_INET or AF_INET6 address; addr is 4 or 16 bytes
// in network order.
static socklen_t vsdp_sockaddr(struct sockaddr_storage *ss, int family,
			       const uint8_t *addr, uint16_t port)
{
	memset(ss, 0, sizeof(*ss));
	if (family == AF_INET) {
		struct sockaddr_in *in = (struct sockaddr_in *)ss;
		in->sin_family = AF_INET;
		in->sin_port = htons(port);
		memcpy(&in->sin_addr, addr, 4);
		return sizeof(*in);
	}
	struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
	in6->sin6_family = AF_INET6;
	in6->sin6_port = htons(port);
	memcpy(&in6->sin6_addr, addr, 16);
	return sizeof(*in6);
}

int vsdp_bind_ip(struct rdma_cm_id *id, int family, const uint8_t *addr, uint16_t port)
{
	struct sockaddr_storage ss;

	vsdp_sockaddr(&ss, family, addr, port);
	return rdma_bind_addr(id, (struct sockaddr *)&ss);
}

int vsdp_resolve_ip(struct rdma_cm_id *id, int family, int has_src, const uint8_t *src,
		    const uint8_t *dst, uint16_t port, int timeout_ms)
{
	struct sockaddr_storage s, d;

	vsdp_sockaddr(&d, family, dst, port);
	if (has_src)
		vsdp_sockaddr(&s, family, src, 0);
	return rdma_resolve_addr(id, has_src ? (struct sockaddr *)&s : NULL,
				 (struct sockaddr *)&d, timeout_ms);
}

int vsdp_resolve_ib(struct rdma_cm_id *id, const uint8_t *sgid, const uint8_t *dgid,
		    uint16_t pkey, uint64_t sid, int timeout_ms)
{
	struct sockaddr_ib s, d;

	memset(&s, 0, sizeof(s));
	memset(&d, 0, sizeof(d));
	s.sib_family = AF_IB;
	s.sib_pkey = htons(pkey);
	memcpy(&s.sib_addr, sgid, 16);
	d.sib_family = AF_IB;
	d.sib_pkey = htons(pkey);
	memcpy(&d.sib_addr, dgid, 16);
	d.sib_sid = htobe64(sid);
	d.sib_sid_mask = htobe64(~0ULL);
	return rdma_resolve_addr(id, (struct sockaddr *)&s, (struct sockaddr *)&d, timeout_ms);
}

static void vsdp_copy_addr(const struct sockaddr *sa, int32_t *family, uint8_t *out)
{
	*family = 0;
	if (!sa)
		return;
	switch (sa->sa_family) {
	case AF_INET:
		*family = AF_INET;
		memcpy(out, &((const struct sockaddr_in *)sa)->sin_addr, 4);
		break;
	case AF_INET6:
		*family = AF_INET6;
		memcpy(out, &((const struct sockaddr_in6 *)sa)->sin6_addr, 16);
		break;
	case AF_IB:
		*family = AF_IB;
		memcpy(out, &((const struct sockaddr_ib *)sa)->sib_addr, 16);
		break;
	}
}

void vsdp_id_addrs(struct rdma_cm_id *id, struct vsdp_addrs *out)
{
	memset(out, 0, sizeof(*out));
	vsdp_copy_addr(rdma_get_local_addr(id), &out->src_family, out->src);
	vsdp_copy_addr(rdma_get_peer_addr(id), &out->dst_family, out->dst);
	if (out->src_family == AF_INET || out->src_family == AF_INET6)
		out->src_port = ntohs(rdma_get_src_port(id));
	if (out->dst_family == AF_INET || out->dst_family == AF_INET6)
		out->dst_port = ntohs(rdma_get_dst_port(id));
	out->pkey = id->route.addr.addr.ibaddr.pkey;
	memcpy(out->sgid, &id->route.addr.addr.ibaddr.sgid, 16);
	memcpy(out->dgid, &id->route.addr.addr.ibaddr.dgid, 16);
}

int vsdp_connect(struct rdma_cm_id *id, uint32_t qp_num, const uint8_t *pdata, int len,
		 int resp_res, int init_depth, int retry, int rnr_retry)
{
	struct rdma_conn_param p;

	memset(&p, 0, sizeof(p));
	p.private_data = len ? pdata : NULL;
	p.private_data_len = (uint8_t)len;
	p.responder_resources = (uint8_t)resp_res;
	p.initiator_depth = (uint8_t)init_depth;
	p.flow_control = 1;
	p.retry_count = (uint8_t)retry;
	p.rnr_retry_count = (uint8_t)rnr_retry;
	p.qp_num = qp_num;
	return rdma_connect(id, &p);
}

int vsdp_accept(struct rdma_cm_id *id, uint32_t qp_num, const uint8_t *pdata, int len,
		int resp_res, int init_depth, int rnr_retry)
{
	struct rdma_conn_param p;

	memset(&p, 0, sizeof(p));
	p.private_data = len ? pdata : NULL;
	p.private_data_len = (uint8_t)len;
	p.responder_resources = (uint8_t)resp_res;
	p.initiator_depth = (uint8_t)init_depth;
	p.flow_control = 1;
	p.rnr_retry_count = (uint8_t)rnr_retry;
	p.qp_num = qp_num;
	return rdma_accept(id, &p);
}

int vsdp_reject(struct rdma_cm_id *id, const uint8_t *pdata, int len)
{
	return rdma_reject(id, len ? pdata : NULL, (uint8_t)len);
}

// vsdp_qp_transition moves qp to state with the attributes the connection
// manager computes for id (rdma_init_qp_attr), except those the caller
// overrides. Returns 0 or -1 with errno set.
int vsdp_qp_transition(struct rdma_cm_id *id, struct ibv_qp *qp, int state,
		       const struct vsdp_qp_over *over)
{
	struct ibv_qp_attr attr;
	int mask = 0;

	memset(&attr, 0, sizeof(attr));
	attr.qp_state = (enum ibv_qp_state)state;
	if (rdma_init_qp_attr(id, &attr, &mask))
		return -1;
	if (over) {
		if (state == IBV_QPS_RTR) {
			if (over->max_dest_rd_atomic >= 0)
				attr.max_dest_rd_atomic = (uint8_t)over->max_dest_rd_atomic;
			if (over->min_rnr_timer >= 0) {
				attr.min_rnr_timer = (uint8_t)over->min_rnr_timer;
				mask |= IBV_QP_MIN_RNR_TIMER;
			}
		}
		if (state == IBV_QPS_RTS) {
			if (over->max_rd_atomic >= 0)
				attr.max_rd_atomic = (uint8_t)over->max_rd_atomic;
			if (over->retry_cnt >= 0) {
				attr.retry_cnt = (uint8_t)over->retry_cnt;
				mask |= IBV_QP_RETRY_CNT;
			}
			if (over->rnr_retry >= 0) {
				attr.rnr_retry = (uint8_t)over->rnr_retry;
				mask |= IBV_QP_RNR_RETRY;
			}
		}
	}
	int rc = ibv_modify_qp(qp, &attr, mask);
	if (rc) {
		errno = rc;
		return -1;
	}
	return 0;
}

// vsdp_create_qp creates an RC queue pair that the identifier does not own
// (id->qp stays NULL, so librdmacm leaves its transitions to the caller) and
// moves it to INIT with the CM's attributes. Returns NULL with errno set.
struct ibv_qp *vsdp_create_qp(struct rdma_cm_id *id, struct ibv_pd *pd, struct ibv_cq *scq,
			      struct ibv_cq *rcq, struct ibv_qp_cap *cap, int sig_all)
{
	struct ibv_qp_init_attr a;

	memset(&a, 0, sizeof(a));
	a.send_cq = scq;
	a.recv_cq = rcq;
	a.cap = *cap;
	a.qp_type = IBV_QPT_RC;
	a.sq_sig_all = sig_all;
	struct ibv_qp *qp = ibv_create_qp(pd, &a);
	if (!qp)
		return NULL;
	if (vsdp_qp_transition(id, qp, IBV_QPS_INIT, NULL)) {
		int err = errno;
		ibv_destroy_qp(qp);
		errno = err;
		return NULL;
	}
	*cap = a.cap;
	return qp;
}

int vsdp_query_qp_state(struct ibv_qp *qp, int *state)
{
	struct ibv_qp_attr attr;
	struct ibv_qp_init_attr init;

	memset(&attr, 0, sizeof(attr));
	int rc = ibv_query_qp(qp, &attr, IBV_QP_STATE, &init);
	if (rc)
		return rc;
	*state = attr.qp_state;
	return 0;
}

int vsdp_query_qp_retry(struct ibv_qp *qp, int *retry, int *rnr_retry, int *min_rnr_timer,
			int *timeout)
{
	struct ibv_qp_attr attr;
	struct ibv_qp_init_attr init;

	memset(&attr, 0, sizeof(attr));
	int rc = ibv_query_qp(qp, &attr,
			      IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_MIN_RNR_TIMER | IBV_QP_TIMEOUT,
			      &init);
	if (rc)
		return rc;
	*retry = attr.retry_cnt;
	*rnr_retry = attr.rnr_retry;
	*min_rnr_timer = attr.min_rnr_timer;
	*timeout = attr.timeout;
	return 0;
}

int vsdp_modify_qp_state(struct ibv_qp *qp, int state)
{
	struct ibv_qp_attr attr;
	int mask = IBV_QP_STATE;

	memset(&attr, 0, sizeof(attr));
	attr.qp_state = (enum ibv_qp_state)state;
	if (state == IBV_QPS_SQD) {
		attr.en_sqd_async_notify = 1;
		mask |= IBV_QP_EN_SQD_ASYNC_NOTIFY;
	}
	return ibv_modify_qp(qp, &attr, mask);
}

// vsdp_probe_inline finds the largest inline size an RC queue pair of ctx
// accepts, trying sizes from 1024 down; it returns -1 with errno set when no
// queue pair could be created at all.
int vsdp_probe_inline(struct ibv_context *ctx)
{
	static const int sizes[] = {1024, 512, 256, 128, 64, 32, 0};
	int best = -1, err = 0;
	struct ibv_pd *pd = ibv_alloc_pd(ctx);
	if (!pd)
		return -1;
	struct ibv_cq *cq = ibv_create_cq(ctx, 2, NULL, NULL, 0);
	if (!cq) {
		err = errno;
		ibv_dealloc_pd(pd);
		errno = err;
		return -1;
	}
	for (unsigned i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		struct ibv_qp_init_attr a;
		memset(&a, 0, sizeof(a));
		a.send_cq = cq;
		a.recv_cq = cq;
		a.qp_type = IBV_QPT_RC;
		a.cap.max_send_wr = 1;
		a.cap.max_recv_wr = 1;
		a.cap.max_send_sge = 1;
		a.cap.max_recv_sge = 1;
		a.cap.max_inline_data = sizes[i];
		struct ibv_qp *qp = ibv_create_qp(pd, &a);
		if (!qp) {
			err = errno;
			continue;
		}
		best = (int)a.cap.max_inline_data;
		ibv_destroy_qp(qp);
		break;
	}
	ibv_destroy_cq(cq);
	ibv_dealloc_pd(pd);
	if (best < 0)
		errno = err;
	return best;
}

int vsdp_port_link_layer(struct ibv_context *ctx, int port)
{
	struct ibv_port_attr attr;

	memset(&attr, 0, sizeof(attr));
	if (ibv_query_port(ctx, (uint8_t)port, &attr))
		return -1;
	return attr.link_layer;
}

struct ibv_mr *vsdp_reg_mr(struct ibv_pd *pd, uintptr_t addr, size_t len, int access)
{
	return ibv_reg_mr(pd, (void *)addr, len, access);
}

struct ibv_mw *vsdp_alloc_mw(struct ibv_pd *pd)
{
	return ibv_alloc_mw(pd, IBV_MW_TYPE_2);
}

int vsdp_dealloc_mw(struct ibv_mw *mw)
{
	return ibv_dealloc_mw(mw);
}

struct ibv_device **vsdp_get_device_list(int *n)
{
	return ibv_get_device_list(n);
}
