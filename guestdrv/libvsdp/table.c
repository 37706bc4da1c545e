/*
 * table.c - the fd table: one entry per descriptor number, in chunks
 * allocated on first use (so the table grows with the program's descriptors,
 * whatever RLIMIT_NOFILE says), and a pool of socket records shared by
 * duplicated descriptors. Nothing here calls malloc or free: chunks and
 * records come from mmap and are recycled, so close() from a signal handler
 * cannot re-enter the allocator.
 */
#include "vsdp.h"

#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define CHUNK_BITS 12
#define CHUNK_SIZE (1 << CHUNK_BITS)
#define NCHUNKS 1024 /* 4 Mi descriptors */
#define POOL_CHUNK 256

struct fdent {
	_Atomic uint8_t kind;
	_Atomic uint32_t gen; /* bumped at every close of the number */
	struct vsock *s;
};

struct pool_chunk {
	struct pool_chunk *next;
	struct vsock objs[POOL_CHUNK];
};

static struct fdent *_Atomic chunks[NCHUNKS];
static pthread_mutex_t tab_mu = PTHREAD_MUTEX_INITIALIZER;
static struct vsock *free_list;
static struct pool_chunk *pool;

void tab_lock(sigset_t *old)
{
	sigset_t all;

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, old);
	pthread_mutex_lock(&tab_mu);
}

void tab_unlock(const sigset_t *old)
{
	pthread_mutex_unlock(&tab_mu);
	pthread_sigmask(SIG_SETMASK, old, NULL);
}

static struct fdent *ent(int fd, int create)
{
	struct fdent *c;
	unsigned i;

	if (fd < 0 || (unsigned)fd >= (unsigned)NCHUNKS * CHUNK_SIZE)
		return NULL;
	i = (unsigned)fd >> CHUNK_BITS;
	c = atomic_load_explicit(&chunks[i], memory_order_acquire);
	if (c == NULL && create) {
		void *m = mmap(NULL, sizeof(struct fdent) * CHUNK_SIZE, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (m == MAP_FAILED)
			return NULL;
		c = m;
		atomic_store_explicit(&chunks[i], c, memory_order_release);
	}
	return c == NULL ? NULL : &c[fd & (CHUNK_SIZE - 1)];
}

int tab_kind(int fd)
{
	struct fdent *e = ent(fd, 0);

	return e == NULL ? FD_NONE : atomic_load_explicit(&e->kind, memory_order_acquire);
}

struct vsock *tab_get(int fd)
{
	struct fdent *e = ent(fd, 0);

	return e == NULL ? NULL : e->s;
}

uint32_t tab_gen(int fd)
{
	struct fdent *e = ent(fd, 1);

	return e == NULL ? 0 : atomic_load(&e->gen);
}

void tab_bump(int fd)
{
	struct fdent *e = ent(fd, 0);

	if (e != NULL)
		atomic_fetch_add(&e->gen, 1);
}

int tab_next_used(int fd, int last)
{
	/* the next number >= fd, <= last, in an allocated chunk; -1 if none */
	while (fd >= 0 && fd <= last && (unsigned)fd < (unsigned)NCHUNKS * CHUNK_SIZE) {
		if (atomic_load_explicit(&chunks[(unsigned)fd >> CHUNK_BITS], memory_order_acquire) != NULL)
			return fd;
		fd = (int)(((unsigned)fd >> CHUNK_BITS) + 1) << CHUNK_BITS;
	}
	return -1;
}

int tab_set(int fd, int kind, struct vsock *s)
{
	struct fdent *e = ent(fd, 1);

	if (e == NULL)
		return -1;
	e->s = s;
	atomic_store_explicit(&e->kind, (uint8_t)kind, memory_order_release);
	return 0;
}

struct vsock *tab_detach(int fd)
{
	struct fdent *e = ent(fd, 0);
	struct vsock *s;

	if (e == NULL)
		return NULL;
	s = e->s;
	e->s = NULL;
	atomic_fetch_add(&e->gen, 1);
	atomic_store_explicit(&e->kind, FD_NONE, memory_order_release);
	return s;
}

struct vsock *sock_new(int family)
{
	struct vsock *s;

	if (free_list == NULL) {
		struct pool_chunk *c = mmap(NULL, sizeof(*c), PROT_READ | PROT_WRITE,
					    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		int i;

		if (c == MAP_FAILED)
			return NULL;
		c->next = pool;
		pool = c;
		for (i = POOL_CHUNK - 1; i >= 0; i--) {
			c->objs[i].next_free = free_list;
			c->objs[i].refs = 0;
			free_list = &c->objs[i];
		}
	}
	s = free_list;
	free_list = s->next_free;
	memset(s, 0, sizeof(*s));
	s->refs = 1;
	s->family = family;
	s->owner = getpid();
	return s;
}

void sock_identify(struct vsock *s, int fd)
{
	struct stat st;

	if (s != NULL && fstat(fd, &st) == 0) {
		s->dev = st.st_dev;
		s->ino = st.st_ino;
	}
}

void sock_put(struct vsock *s)
{
	if (s == NULL || --s->refs > 0)
		return;
	s->refs = 0;
	s->next_free = free_list;
	free_list = s;
}

void tab_mark_forked(void)
{
	struct pool_chunk *c;
	int i;

	for (c = pool; c != NULL; c = c->next)
		for (i = 0; i < POOL_CHUNK; i++)
			if (c->objs[i].refs > 0)
				c->objs[i].forked = 1;
}

void tab_atfork_prepare(void)
{
	pthread_mutex_lock(&tab_mu);
}

void tab_atfork_parent(void)
{
	tab_mark_forked();
	pthread_mutex_unlock(&tab_mu);
}

void tab_atfork_child(void)
{
	tab_mark_forked();
	pthread_mutex_unlock(&tab_mu);
}

/* view_of snapshots fd's record. A record whose file is no longer the
 * one at fd (closed behind the library's back, e.g. by fclose(), and the
 * number reused) is dropped: the call then goes to the kernel as if the
 * library had never seen fd. */
int view_of(int fd, struct sock_view *v)
{
	sigset_t old;
	struct vsock *s;
	struct stat st;
	int have = fstat(fd, &st) == 0;

	memset(v, 0, sizeof(*v));
	tab_lock(&old);
	v->kind = tab_kind(fd);
	s = tab_get(fd);
	if (s != NULL && s->ino != 0 && (!have || st.st_ino != s->ino || st.st_dev != s->dev)) {
		sock_put(tab_detach(fd));
		s = NULL;
		v->kind = FD_NONE;
	}
	if (s != NULL) {
		v->family = s->family;
		v->state = s->state;
		v->adopted = s->adopted;
		v->forked = s->forked;
		v->linger_abort = s->linger_abort;
		v->gport = s->gport;
		v->hport = s->hport;
	}
	tab_unlock(&old);
	return s != NULL ? 0 : -1;
}
