/*
 * knhk_internal.h -- helpers shared by the .c files of the C core.
 * Not part of the public API: names carry the _knhk_ prefix.
 */
#ifndef KNHK_INTERNAL_H
#define KNHK_INTERNAL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "knhk.h"
#include "knhk_hotops.h"

#define _knhk_likely(x) __builtin_expect(!!(x), 1)
#define _knhk_unlikely(x) __builtin_expect(!!(x), 0)

/* Asserts in tiers: _knhk_assert is on only in KNHK_DEBUG builds, so the
   release hot path carries no checks it does not need. */
#if defined(KNHK_DEBUG) && KNHK_DEBUG
#include <assert.h>
#define _knhk_assert(x) assert(x)
#else
#define _knhk_assert(x) ((void)0)
#endif

#define _knhk_cache_aligned __attribute__((aligned(KNHK_CACHE_LINE)))

static inline bool _knhk_is_pow2(size_t x) { return x != 0 && (x & (x - 1)) == 0; }

static inline void _knhk_copy_message(char *buf, size_t len, const char *msg) {
    if (buf == NULL || len == 0) return;
    size_t n = strlen(msg);
    if (n >= len) n = len - 1;
    memcpy(buf, msg, n);
    buf[n] = '\0';
}

/* Record a message for knhk_last_error() in the calling thread. */
void _knhk_set_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- striping
 * A thread gets a stripe index on first use, round-robin, and keeps it. Cells
 * indexed by it sit on their own cache line, so two threads with different
 * stripes never write the same line. Threads beyond KNHK_STRIPES share
 * stripes; the adds are atomic, so sharing costs speed, never exactness. */
unsigned _knhk_thread_stripe_slow(void);
extern __thread int _knhk_tls_stripe;

static inline unsigned _knhk_thread_stripe(void) {
    int s = _knhk_tls_stripe;
    if (_knhk_likely(s >= 0)) return (unsigned)s;
    return _knhk_thread_stripe_slow();
}

/* ---- once
 * A once-cell for the native side: the fast path is one acquire load. The
 * state word is KNHK_ONCE_EMPTY, KNHK_ONCE_READY or the id of the thread
 * running the initialiser (once.c, the same protocol as knhk_once): the
 * initialiser runs with no lock held, so a slow one (a 20 ms measurement, a
 * dlopen) blocks only callers of the same cell, and a fork() child whose
 * initialiser thread was not copied takes the cell over instead of waiting
 * forever. A failed initialiser leaves the cell empty so a later call retries.
 * Initialisers must be safe to run again from the start in a forked child. */
typedef struct {
    uint64_t state; /* KNHK_ONCE_EMPTY, KNHK_ONCE_READY, or the owner's thread id; __atomic builtins only */
} _knhk_once;

static inline bool _knhk_once_ready(const _knhk_once *o) {
    return _knhk_likely(__atomic_load_n(&o->state, __ATOMIC_ACQUIRE) == KNHK_ONCE_READY);
}
/* Run init(arg) once; returns its status, KNHK_OK once the cell is full.
   Re-entrant use of one cell returns KNHK_ERR_STATE. */
int _knhk_once_run(_knhk_once *o, int (*init)(void *), void *arg);

/* ---- arena fast path
 * The head of every knhk_arena (arena.c): what one bump touches. Kept here so
 * any file can inline the fast path. */
typedef struct {
    uintptr_t cur; /* next free byte of the current chunk */
    uintptr_t end; /* one past its last byte */
    uint64_t allocations;
    uint64_t bytes_requested;
} _knhk_arena_head;

/* Fast allocation: bump the cursor, or NULL when the current chunk has no
   room. The cursor and the chunk end are always multiples of
   KNHK_DEFAULT_ALIGN, so a request aligned to 16 or less needs no padding and
   the cursor's dependency chain is one add. align must be a power of two up
   to KNHK_MAX_ALIGN and size at most KNHK_ARENA_MAX_REQUEST (no sum wraps). */
static inline void *_knhk_arena_bump(_knhk_arena_head *h, size_t size, size_t align) {
    uintptr_t cur = h->cur;
    uintptr_t pad = align <= KNHK_DEFAULT_ALIGN ? 0 : (0 - cur) & (uintptr_t)(align - 1);
    uintptr_t need = pad + ((size + (KNHK_DEFAULT_ALIGN - 1)) & ~(uintptr_t)(KNHK_DEFAULT_ALIGN - 1));
    if (_knhk_unlikely(need > h->end - cur)) return NULL;
    h->cur = cur + need;
    h->allocations++;
    h->bytes_requested += size;
    return (void *)(cur + pad);
}

/* arena.c: whether the calling thread owns a; the size of a live counted
   block (0 when p is not one). For arena_scope.c. */
bool _knhk_arena_is_owner(const knhk_arena *a);
size_t _knhk_arena_block_size(const void *p);

/* ticks.c: the median of v[0..n) (sorts v in place; the mean of the middle
   two when n is even). */
double _knhk_median_of(double *v, size_t n);

/* fork.c: dlopen() under the lock knhk_fork_prepare waits for. */
void *_knhk_dlopen(const char *file, int mode);

/* ---- fault guard (store_guard.c, issue 15): the SIGBUS handler siglongjmps
 * to the calling thread's buffer when one is set, else chains to the handler
 * it replaced. _knhk_fault_guard_install is idempotent and re-installs on top
 * of a handler installed since. */
#include <setjmp.h>
extern _Thread_local sigjmp_buf *_knhk_fault_jmp;
int _knhk_fault_guard_install(void);
/* Register base[0, size) as a watched mapping: a fault there outside a
 * guarded read maps zeros over the page and sets *changed. Returns the slot
 * (for knhk_store_unwatch), or -1 when every slot is taken. */
int _knhk_watch_range(const void *base, uint64_t size, _Atomic int **changed);

/* ---- NUMA (numa.c): knhk_numa_mbind with mbind(2) flags (MPOL_MF_MOVE = 2). */
int _knhk_numa_mbind_flags(void *addr, size_t len, int mode, const uint64_t *mask, size_t mask_words, unsigned flags);

#endif /* KNHK_INTERNAL_H */
