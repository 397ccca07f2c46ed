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
 * slow path serialises initialisers on a mutex; a failed initialiser leaves
 * the cell empty so a later call retries. */
typedef struct {
    _Atomic int ready; /* 0 empty, 1 full */
} _knhk_once;

static inline bool _knhk_once_ready(const _knhk_once *o) {
    return _knhk_likely(atomic_load_explicit(&o->ready, memory_order_acquire) == 1);
}
/* Run init(arg) once; returns its status, KNHK_OK once the cell is full. */
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

/* ticks.c: the median of v[0..n) (sorts v in place; the mean of the middle
   two when n is even). */
double _knhk_median_of(double *v, size_t n);

/* ---- NUMA (numa.c): knhk_numa_mbind with mbind(2) flags (MPOL_MF_MOVE = 2). */
int _knhk_numa_mbind_flags(void *addr, size_t len, int mode, const uint64_t *mask, size_t mask_words, unsigned flags);

#endif /* KNHK_INTERNAL_H */
