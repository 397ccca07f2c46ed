/* pool.c -- fixed-capacity block pools: FixedPool, LockFreePool, ThreadLocalPool.
 *
 * All three carve `capacity` blocks of one size class from one anonymous
 * mapping made at creation (placed on NUMA nodes before the first touch when
 * asked) and never grow. Blocks are handed out lazily: a pool that has never
 * been full has touched only the pages of the blocks it gave out, so a large
 * capacity costs address space, not memory.
 *
 * Size classes are 2^k and 3 * 2^k (8, 16, 24, 32, 48, 64, 96, ...): above 16
 * bytes at most a third of a block is padding, and turning a pointer back into a block number is a shift, a mask
 * test and (for the 3 * 2^k classes) a division by the constant 3, which the
 * compiler turns into a multiply. No `div` on the free path.
 *
 * Every free is checked in release builds too (the issue asks for a cheap
 * check in both): the pointer must be a block start inside the region, and
 * the block's state byte (kept in a side table, so a write after free cannot
 * forge it) must say allocated. Use after close and use in a forked child are
 * caught by comparing a closed flag and a fork generation that a
 * pthread_atfork child handler bumps.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "knhk_internal.h"

/* ------------------------------------------------------------------ fork generation, thread token */

static _Atomic uint64_t fork_generation = 1;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void on_fork_child(void) { atomic_fetch_add_explicit(&fork_generation, 1, memory_order_relaxed); }
static void register_atfork(void) { pthread_atfork(NULL, NULL, on_fork_child); }

static inline uint64_t current_generation(void) { return atomic_load_explicit(&fork_generation, memory_order_relaxed); }

/* The address of a thread-local byte identifies the thread: one TLS address
   computation, no call (pthread_self is a call into libc). */
static __thread char thread_marker;
static inline uintptr_t thread_token(void) { return (uintptr_t)&thread_marker; }

/* ------------------------------------------------------------------ geometry */

typedef struct {
    char *base;
    uint64_t stride;
    uint64_t capacity;
    uint64_t region_bytes;
    uint64_t limit; /* capacity * stride: offsets at or past it are outside */
    uint64_t block_size;
    uint64_t align;
    uint32_t shift; /* stride = 2^shift or 3 * 2^shift */
    uint32_t three;
    int numa_mode;
} geometry;

uint64_t knhk_pool_size_class(size_t block_size, size_t align) {
    if (block_size == 0 || block_size > KNHK_POOL_MAX_BLOCK) {
        _knhk_set_error("pool block_size must be from 1 to %zu bytes, got %zu", KNHK_POOL_MAX_BLOCK, block_size);
        return 0;
    }
    if (!_knhk_is_pow2(align) || align > KNHK_MAX_ALIGN) {
        _knhk_set_error("pool alignment must be a power of two from 1 to %d, got %zu", KNHK_MAX_ALIGN, align);
        return 0;
    }
    uint64_t need = block_size < KNHK_POOL_MIN_BLOCK ? KNHK_POOL_MIN_BLOCK : block_size;
    /* In increasing order: 2^k, then 3 * 2^(k-1) (between 2^k and 2^(k+1)). */
    for (uint32_t k = 3; k < 62; k++) {
        uint64_t two = (uint64_t)1 << k;
        if (two >= need && two % align == 0) return two;
        uint64_t three = (uint64_t)3 << (k - 1);
        if (k >= 4 && three >= need && three % align == 0) return three;
    }
    return 0;
}

static int geometry_init(geometry *g, size_t block_size, uint64_t capacity, size_t align, const knhk_numa_spec *numa,
                         const char *what) {
    memset(g, 0, sizeof *g);
    uint64_t stride = knhk_pool_size_class(block_size, align);
    if (stride == 0) return KNHK_ERR_INVALID;
    if (capacity == 0 || capacity > KNHK_POOL_MAX_CAPACITY) {
        _knhk_set_error("%s capacity must be from 1 to %llu blocks, got %llu", what,
                        (unsigned long long)KNHK_POOL_MAX_CAPACITY, (unsigned long long)capacity);
        return KNHK_ERR_INVALID;
    }
    if (capacity > KNHK_POOL_MAX_BYTES / stride) {
        _knhk_set_error("%s of %llu blocks of %llu bytes (size class of %zu) needs more than the %zu-byte limit", what,
                        (unsigned long long)capacity, (unsigned long long)stride, block_size, KNHK_POOL_MAX_BYTES);
        return KNHK_ERR_INVALID;
    }
    long page = sysconf(_SC_PAGESIZE);
    uint64_t ps = page > 0 ? (uint64_t)page : 4096;
    uint64_t bytes = (capacity * stride + ps - 1) / ps * ps;
    void *base = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) {
        _knhk_set_error("%s: mmap of %llu bytes failed: %s", what, (unsigned long long)bytes, strerror(errno));
        return KNHK_ERR_NOMEM;
    }
    if (numa != NULL && numa->mode != KNHK_NUMA_DEFAULT) {
        int st = knhk_numa_mbind(base, bytes, numa->mode, numa->mask, numa->mask_words);
        if (st != KNHK_OK) {
            munmap(base, bytes);
            return st;
        }
        g->numa_mode = numa->mode;
    }
    g->base = base;
    g->stride = stride;
    g->capacity = capacity;
    g->region_bytes = bytes;
    g->limit = capacity * stride;
    g->block_size = block_size;
    g->align = align;
    g->three = (stride & (stride - 1)) != 0;
    uint64_t two = g->three ? stride / 3 : stride;
    g->shift = (uint32_t)__builtin_ctzll(two);
    pthread_once(&atfork_once, register_atfork);
    return KNHK_OK;
}

static void geometry_release(geometry *g) {
    if (g->base != NULL) munmap(g->base, g->region_bytes);
    g->base = NULL;
}

/* The block number of ptr, or -1 when ptr is not a block start of the region. */
static inline int64_t geometry_index(const geometry *g, const void *ptr) {
    uint64_t off = (uint64_t)((uintptr_t)ptr - (uintptr_t)g->base); /* wraps for ptr < base */
    if (_knhk_unlikely(off >= g->limit)) return -1;
    if (_knhk_unlikely(off & (((uint64_t)1 << g->shift) - 1))) return -1;
    uint64_t q = off >> g->shift;
    if (g->three) {
        if (_knhk_unlikely(q % 3 != 0)) return -1;
        q /= 3;
    }
    return (int64_t)q;
}

static void *side_table(uint64_t bytes, const char *what) {
    void *t = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (t == MAP_FAILED) {
        _knhk_set_error("%s: mmap of a %llu-byte side table failed: %s", what, (unsigned long long)bytes,
                        strerror(errno));
        return NULL;
    }
    return t;
}

static void fill_stats(const geometry *g, knhk_pool_stats *out) {
    memset(out, 0, sizeof *out);
    out->block_size = g->block_size;
    out->stride = g->stride;
    out->align = g->align;
    out->capacity = g->capacity;
    out->region_bytes = g->region_bytes;
    out->numa_mode = g->numa_mode;
}

static const char *problem_text(int problem) {
    switch (problem) {
    case KNHK_POOL_EXHAUSTED: return "every block is in use";
    case KNHK_POOL_DOUBLE_FREE: return "the block is not allocated (freed twice, or never handed out)";
    case KNHK_POOL_FOREIGN: return "the pointer is not the start of a block of this pool";
    case KNHK_POOL_CLOSED: return "the pool is closed";
    case KNHK_POOL_FORKED: return "the pool was created before a fork() and is used in the child";
    case KNHK_POOL_WRONG_THREAD: return "a FixedPool belongs to the thread that created it";
    case KNHK_POOL_CORRUPT: return "a free-list link was overwritten (a write to a freed block)";
    default: return "unknown problem";
    }
}

static __attribute__((noinline, cold)) int report(const char *what, int problem, const void *ptr) {
    if (ptr != NULL)
        _knhk_set_error("%s of %p: %s", what, ptr, problem_text(problem));
    else
        _knhk_set_error("%s: %s", what, problem_text(problem));
    return problem;
}

/* ------------------------------------------------------------------ FixedPool */

struct knhk_pool {
    /* What alloc and free touch, first. */
    char *base;
    uint64_t head;  /* block number + 1 of the first free block; 0: the list is empty */
    uint64_t fresh; /* blocks below this have been handed out at least once */
    uint64_t stride;
    uint64_t capacity;
    uint8_t *state; /* per block: 1 allocated, 0 free */
    uint64_t in_use, high_water, frees, failed, bad_frees; /* allocations = frees + in_use */
    uintptr_t owner;
    uint64_t generation; /* the fork generation at creation; 0 once closed (never current) */
    int closed;
    int corrupt; /* a bad link was found: the pool hands out no more blocks */
    geometry g;
};

int knhk_pool_create(size_t block_size, uint64_t capacity, size_t align, const knhk_numa_spec *numa, knhk_pool **out) {
    if (out == NULL) return KNHK_ERR_INVALID;
    *out = NULL;
    knhk_pool *p = calloc(1, sizeof *p);
    if (p == NULL) {
        _knhk_set_error("no memory for a pool");
        return KNHK_ERR_NOMEM;
    }
    int st = geometry_init(&p->g, block_size, capacity, align, numa, "FixedPool");
    if (st != KNHK_OK) {
        free(p);
        return st;
    }
    p->state = side_table(capacity, "FixedPool");
    if (p->state == NULL) {
        geometry_release(&p->g);
        free(p);
        return KNHK_ERR_NOMEM;
    }
    p->base = p->g.base;
    p->stride = p->g.stride;
    p->capacity = capacity;
    p->owner = thread_token();
    p->generation = current_generation();
    *out = p;
    return KNHK_OK;
}

void knhk_pool_close(knhk_pool *p) {
    if (p == NULL) return;
    /* close() may come from another thread than the owner's (issue 22): relaxed
       atomic stores and loads, which cost the owner's fast path nothing on x86
       and aarch64. An owner call that read the old values completes; the next
       one fails the compare and the slow path says why. */
    __atomic_store_n(&p->closed, 1, __ATOMIC_RELAXED);
    __atomic_store_n(&p->generation, 0, __ATOMIC_RELAXED); /* the fast path's one compare now fails */
}

void knhk_pool_destroy(knhk_pool *p) {
    if (p == NULL) return;
    geometry_release(&p->g);
    munmap(p->state, p->capacity);
    free(p);
}

/* Two compares on the fast path: closed is folded into the generation. */
static inline int fixed_usable(const knhk_pool *p) {
    uint64_t gen = __atomic_load_n(&p->generation, __ATOMIC_RELAXED);
    if (_knhk_likely(gen == current_generation() && p->owner == thread_token())) return KNHK_POOL_OK;
    if (__atomic_load_n(&p->closed, __ATOMIC_RELAXED)) return KNHK_POOL_CLOSED;
    if (gen != current_generation()) return KNHK_POOL_FORKED;
    return KNHK_POOL_WRONG_THREAD;
}

/* Slow half of alloc: the list is empty, or its head link is bad. */
static __attribute__((noinline)) void *fixed_alloc_slow(knhk_pool *p, int *problem) {
    uint64_t h = p->head, i;
    if (h != 0) {
        i = h - 1;
        p->head = 0;
        p->fresh = p->capacity; /* stop handing out untouched blocks after a corruption too */
        p->corrupt = 1;
        *problem = report("FixedPool alloc", KNHK_POOL_CORRUPT, p->base + i * p->stride);
        return NULL;
    }
    if (p->fresh < p->capacity) {
        i = p->fresh++;
    } else {
        if (p->corrupt) {
            *problem = report("FixedPool alloc", KNHK_POOL_CORRUPT, NULL);
            return NULL;
        }
        p->failed++;
        *problem = KNHK_POOL_EXHAUSTED; /* no message: the caller names the pool and its key */
        return NULL;
    }
    p->state[i] = 1;
    uint64_t n = ++p->in_use;
    if (n > p->high_water) p->high_water = n;
    *problem = KNHK_POOL_OK;
    return p->base + i * p->stride;
}

static inline void *fixed_alloc(knhk_pool *p, int *problem) {
    int u = fixed_usable(p);
    if (_knhk_unlikely(u != KNHK_POOL_OK)) {
        *problem = report("FixedPool alloc", u, NULL);
        return NULL;
    }
    /* Every field is read before anything is stored: the stores go through
       char pointers, which the compiler must assume alias the pool. */
    char *base = p->base;
    uint8_t *state = p->state;
    uint64_t h = p->head, stride = p->stride, cap = p->capacity;
    uint64_t n = p->in_use + 1, hw = p->high_water;
    if (_knhk_unlikely(h == 0)) return fixed_alloc_slow(p, problem);
    /* Fast allocation: pop the free list. The link is checked (in range
       here, and the block it names is checked free when it is popped), so a
       write after free can at worst cost the rest of the list, never hand a
       block out twice or point outside the region. */
    uint64_t i = h - 1;
    char *b = base + i * stride;
    uint32_t next;
    memcpy(&next, b, sizeof next);
    if (_knhk_unlikely(next > cap || state[i] != 0)) return fixed_alloc_slow(p, problem);
    p->head = next;
    p->in_use = n;
    p->high_water = n > hw ? n : hw;
    state[i] = 1;
    *problem = KNHK_POOL_OK;
    return b;
}

void *knhk_pool_alloc(knhk_pool *p, int *problem) {
    int local;
    return fixed_alloc(p, problem != NULL ? problem : &local);
}

static inline int fixed_free(knhk_pool *p, void *ptr) {
    int u = fixed_usable(p);
    if (_knhk_unlikely(u != KNHK_POOL_OK)) {
        if (u != KNHK_POOL_WRONG_THREAD) p->bad_frees++;
        return report("FixedPool free", u, ptr);
    }
    uint8_t *state = p->state;
    uint64_t head = p->head, in_use = p->in_use, frees = p->frees;
    int64_t i = geometry_index(&p->g, ptr);
    if (_knhk_unlikely(i < 0)) {
        p->bad_frees++;
        return report("FixedPool free", KNHK_POOL_FOREIGN, ptr);
    }
    if (_knhk_unlikely(state[i] != 1)) {
        p->bad_frees++;
        return report("FixedPool free", KNHK_POOL_DOUBLE_FREE, ptr);
    }
    /* Push on the free list: the link goes in the block's first 4 bytes. */
    uint32_t link = (uint32_t)head;
    p->head = (uint64_t)i + 1;
    p->in_use = in_use - 1;
    p->frees = frees + 1;
    state[i] = 0;
    memcpy(ptr, &link, sizeof link);
    return KNHK_POOL_OK;
}

int knhk_pool_free(knhk_pool *p, void *ptr) { return fixed_free(p, ptr); }

uint64_t knhk_pool_alloc_many(knhk_pool *p, uint64_t *out, uint64_t n, int *problem) {
    int local;
    if (problem == NULL) problem = &local;
    *problem = KNHK_POOL_OK;
    for (uint64_t k = 0; k < n; k++) {
        void *b = fixed_alloc(p, problem);
        if (b == NULL) return k;
        out[k] = (uint64_t)(uintptr_t)b;
    }
    return n;
}

uint64_t knhk_pool_free_many(knhk_pool *p, const uint64_t *addrs, uint64_t n, int *problem) {
    int local;
    if (problem == NULL) problem = &local;
    *problem = KNHK_POOL_OK;
    for (uint64_t k = 0; k < n; k++) {
        int r = fixed_free(p, (void *)(uintptr_t)addrs[k]);
        if (r != KNHK_POOL_OK) {
            *problem = r;
            return k;
        }
    }
    return n;
}

uint64_t knhk_pool_alloc_many_index(knhk_pool *p, int64_t *out, uint64_t n, int *problem) {
    int local;
    if (problem == NULL) problem = &local;
    *problem = KNHK_POOL_OK;
    for (uint64_t k = 0; k < n; k++) {
        char *b = fixed_alloc(p, problem);
        if (b == NULL) return k;
        out[k] = (int64_t)((uint64_t)(b - p->base) / p->stride);
    }
    return n;
}

uint64_t knhk_pool_free_many_index(knhk_pool *p, const int64_t *index, uint64_t n, int *problem) {
    int local;
    if (problem == NULL) problem = &local;
    *problem = KNHK_POOL_OK;
    for (uint64_t k = 0; k < n; k++) {
        /* An index out of range becomes an address outside the region: FOREIGN. */
        uint64_t i = (uint64_t)index[k];
        void *ptr = i < p->capacity ? (void *)(p->base + i * p->stride) : (void *)(p->base - 1);
        int r = fixed_free(p, ptr);
        if (r != KNHK_POOL_OK) {
            *problem = r;
            return k;
        }
    }
    return n;
}

int64_t knhk_pool_index(const knhk_pool *p, const void *ptr) { return geometry_index(&p->g, ptr); }

int knhk_pool_is_allocated(const knhk_pool *p, uint64_t i) {
    if (i >= p->capacity) return -1;
    return p->state[i] == 1;
}

void *knhk_pool_base(const knhk_pool *p) { return p->base; }

void knhk_pool_stats_get(const knhk_pool *p, knhk_pool_stats *out) {
    fill_stats(&p->g, out);
    out->in_use = p->in_use;
    out->high_water = p->high_water;
    out->allocations = p->frees + p->in_use;
    out->frees = p->frees;
    out->failed = p->failed;
    out->bad_frees = p->bad_frees;
    out->closed = __atomic_load_n(&p->closed, __ATOMIC_RELAXED);
}

void knhk_pool_hotop_alloc_free(void *ctx, uint64_t iterations) {
    knhk_pool *p = ctx;
    int problem;
    for (uint64_t i = 0; i < iterations; i++) {
        void *b = fixed_alloc(p, &problem);
        __asm__ volatile("" : : "r"(b) : "memory");
        if (_knhk_unlikely(b == NULL)) return;
        fixed_free(p, b);
    }
}

/* ------------------------------------------------------------------ LockFreePool */

/* A virtual thread of the randomised-schedule check: the push and pop below
   call yield_point(y) between shared-memory steps; y is NULL in the pool
   itself, and the inlined call folds away. */
typedef struct sched sched;
typedef struct {
    sched *s;
    int me;
} vthread;
static void yield_point(vthread *y);
#define YIELD(y)                         \
    do {                                 \
        if ((y) != NULL) yield_point(y); \
    } while (0)

/* The Treiber stack: head = tag << 32 | (block + 1), links in a side array. */
typedef struct {
    _Alignas(KNHK_CACHE_LINE) _Atomic uint64_t head;
    char pad0[KNHK_CACHE_LINE - sizeof(uint64_t)];
    _Alignas(KNHK_CACHE_LINE) _Atomic uint64_t fresh;
    char pad1[KNHK_CACHE_LINE - sizeof(uint64_t)];
    _Atomic uint32_t *next;
    uint64_t capacity;
} treiber;

static inline __attribute__((always_inline)) int64_t treiber_pop(treiber *t, vthread *y, uint64_t taginc) {
    uint64_t h = atomic_load_explicit(&t->head, memory_order_acquire);
    YIELD(y);
    for (;;) {
        uint32_t top = (uint32_t)h;
        if (top == 0) return -1;
        uint32_t nx = atomic_load_explicit(&t->next[top - 1], memory_order_relaxed);
        YIELD(y);
        uint64_t nh = (((h >> 32) + taginc) << 32) | nx;
        if (atomic_compare_exchange_strong_explicit(&t->head, &h, nh, memory_order_acq_rel, memory_order_acquire))
            return (int64_t)top - 1;
        YIELD(y);
    }
}

static inline __attribute__((always_inline)) void treiber_push(treiber *t, uint64_t i, vthread *y, uint64_t taginc) {
    uint64_t h = atomic_load_explicit(&t->head, memory_order_relaxed);
    YIELD(y);
    for (;;) {
        atomic_store_explicit(&t->next[i], (uint32_t)h, memory_order_relaxed);
        YIELD(y);
        uint64_t nh = (((h >> 32) + taginc) << 32) | (i + 1);
        if (atomic_compare_exchange_strong_explicit(&t->head, &h, nh, memory_order_release, memory_order_relaxed))
            return;
        YIELD(y);
    }
}

/* Counters of the thread-safe pools: allocations and frees striped per
   thread (cells on their own lines), in_use one atomic so that every value it
   takes is seen by exactly one call and the high-water mark is exact. */
typedef struct {
    _Alignas(KNHK_CACHE_LINE) _Atomic uint64_t allocations;
    _Atomic uint64_t frees;
    _Atomic uint64_t failed;
    _Atomic uint64_t bad_frees;
} stripe_cell;

struct knhk_lfpool {
    treiber t;
    _Alignas(KNHK_CACHE_LINE) _Atomic int64_t in_use;
    _Atomic uint64_t high_water;
    _Alignas(KNHK_CACHE_LINE) stripe_cell cells[KNHK_STRIPES];
    _Atomic uint8_t *state;
    _Atomic int closed;
    uint64_t generation;
    geometry g;
};

static inline stripe_cell *my_cell(knhk_lfpool *p) { return &p->cells[_knhk_thread_stripe() & (KNHK_STRIPES - 1)]; }

int knhk_lfpool_create(size_t block_size, uint64_t capacity, size_t align, const knhk_numa_spec *numa,
                       knhk_lfpool **out) {
    if (out == NULL) return KNHK_ERR_INVALID;
    *out = NULL;
    knhk_lfpool *p = aligned_alloc(KNHK_CACHE_LINE, (sizeof *p + KNHK_CACHE_LINE - 1) & ~(size_t)(KNHK_CACHE_LINE - 1));
    if (p == NULL) {
        _knhk_set_error("no memory for a pool");
        return KNHK_ERR_NOMEM;
    }
    memset(p, 0, sizeof *p);
    int st = geometry_init(&p->g, block_size, capacity, align, numa, "LockFreePool");
    if (st != KNHK_OK) {
        free(p);
        return st;
    }
    p->state = side_table(capacity, "LockFreePool");
    p->t.next = p->state ? side_table(capacity * sizeof(uint32_t), "LockFreePool") : NULL;
    if (p->t.next == NULL) {
        if (p->state) munmap((void *)p->state, capacity);
        geometry_release(&p->g);
        free(p);
        return KNHK_ERR_NOMEM;
    }
    p->t.capacity = capacity;
    atomic_init(&p->t.head, 0);
    atomic_init(&p->t.fresh, 0);
    atomic_init(&p->in_use, 0);
    atomic_init(&p->high_water, 0);
    atomic_init(&p->closed, 0);
    p->generation = current_generation();
    *out = p;
    return KNHK_OK;
}

void knhk_lfpool_close(knhk_lfpool *p) {
    if (p != NULL) atomic_store_explicit(&p->closed, 1, memory_order_release);
}

void knhk_lfpool_destroy(knhk_lfpool *p) {
    if (p == NULL) return;
    munmap((void *)p->t.next, p->g.capacity * sizeof(uint32_t));
    munmap((void *)p->state, p->g.capacity);
    geometry_release(&p->g);
    free(p);
}

static inline int lf_usable(const knhk_lfpool *p) {
    if (_knhk_unlikely(p->generation != current_generation())) return KNHK_POOL_FORKED;
    if (_knhk_unlikely(atomic_load_explicit(&p->closed, memory_order_relaxed))) return KNHK_POOL_CLOSED;
    return KNHK_POOL_OK;
}

static inline void note_in_use(knhk_lfpool *p, int64_t delta) {
    int64_t n = atomic_fetch_add_explicit(&p->in_use, delta, memory_order_relaxed) + delta;
    if (delta > 0) {
        uint64_t hw = atomic_load_explicit(&p->high_water, memory_order_relaxed);
        while ((uint64_t)n > hw && !atomic_compare_exchange_weak_explicit(&p->high_water, &hw, (uint64_t)n,
                                                                          memory_order_relaxed, memory_order_relaxed)) {
        }
    }
}

/* Take a block number off the shared list (or a never-used one): -1 when none. */
static inline int64_t lf_take(knhk_lfpool *p) {
    int64_t i = treiber_pop(&p->t, NULL, 1);
    if (_knhk_likely(i >= 0)) return i;
    if (atomic_load_explicit(&p->t.fresh, memory_order_relaxed) >= p->g.capacity) return -1;
    uint64_t f = atomic_fetch_add_explicit(&p->t.fresh, 1, memory_order_relaxed);
    return f < p->g.capacity ? (int64_t)f : -1;
}

/* Mark block i allocated and count it. */
static inline int lf_claim(knhk_lfpool *p, int64_t i) {
    uint8_t was = atomic_exchange_explicit(&p->state[i], 1, memory_order_relaxed);
    if (_knhk_unlikely(was != 0)) return KNHK_POOL_CORRUPT;
    note_in_use(p, 1); /* allocations are frees + in_use: one locked operation fewer */
    return KNHK_POOL_OK;
}

void *knhk_lfpool_alloc(knhk_lfpool *p, int *problem) {
    int local;
    if (problem == NULL) problem = &local;
    int u = lf_usable(p);
    if (_knhk_unlikely(u != KNHK_POOL_OK)) {
        *problem = report("LockFreePool alloc", u, NULL);
        return NULL;
    }
    int64_t i = lf_take(p);
    if (_knhk_unlikely(i < 0)) {
        atomic_fetch_add_explicit(&my_cell(p)->failed, 1, memory_order_relaxed);
        *problem = KNHK_POOL_EXHAUSTED;
        return NULL;
    }
    if (_knhk_unlikely(lf_claim(p, i) != KNHK_POOL_OK)) {
        *problem = report("LockFreePool alloc", KNHK_POOL_CORRUPT, p->g.base + (uint64_t)i * p->g.stride);
        return NULL;
    }
    *problem = KNHK_POOL_OK;
    return p->g.base + (uint64_t)i * p->g.stride;
}

/* Check ptr and mark its block free: its number, or -(problem). */
static inline int64_t lf_release(knhk_lfpool *p, void *ptr, const char *what) {
    int u = lf_usable(p);
    if (_knhk_unlikely(u != KNHK_POOL_OK)) {
        atomic_fetch_add_explicit(&my_cell(p)->bad_frees, 1, memory_order_relaxed);
        return -report(what, u, ptr);
    }
    int64_t i = geometry_index(&p->g, ptr);
    if (_knhk_unlikely(i < 0)) {
        atomic_fetch_add_explicit(&my_cell(p)->bad_frees, 1, memory_order_relaxed);
        return -report(what, KNHK_POOL_FOREIGN, ptr);
    }
    uint8_t expect = 1;
    if (_knhk_unlikely(!atomic_compare_exchange_strong_explicit(&p->state[i], &expect, 0, memory_order_relaxed,
                                                                memory_order_relaxed))) {
        atomic_fetch_add_explicit(&my_cell(p)->bad_frees, 1, memory_order_relaxed);
        return -report(what, KNHK_POOL_DOUBLE_FREE, ptr);
    }
    atomic_fetch_add_explicit(&my_cell(p)->frees, 1, memory_order_relaxed);
    note_in_use(p, -1);
    return i;
}

int knhk_lfpool_free(knhk_lfpool *p, void *ptr) {
    int64_t i = lf_release(p, ptr, "LockFreePool free");
    if (_knhk_unlikely(i < 0)) return (int)-i;
    treiber_push(&p->t, (uint64_t)i, NULL, 1);
    return KNHK_POOL_OK;
}

int64_t knhk_lfpool_index(const knhk_lfpool *p, const void *ptr) { return geometry_index(&p->g, ptr); }
void *knhk_lfpool_base(const knhk_lfpool *p) { return p->g.base; }

void knhk_lfpool_stats_get(const knhk_lfpool *p, knhk_pool_stats *out) {
    fill_stats(&p->g, out);
    for (int s = 0; s < KNHK_STRIPES; s++) {
        out->allocations += atomic_load_explicit(&p->cells[s].allocations, memory_order_relaxed);
        out->frees += atomic_load_explicit(&p->cells[s].frees, memory_order_relaxed);
        out->failed += atomic_load_explicit(&p->cells[s].failed, memory_order_relaxed);
        out->bad_frees += atomic_load_explicit(&p->cells[s].bad_frees, memory_order_relaxed);
    }
    int64_t n = atomic_load_explicit(&p->in_use, memory_order_relaxed);
    out->in_use = n > 0 ? (uint64_t)n : 0;
    out->allocations = out->frees + out->in_use;
    out->high_water = atomic_load_explicit(&p->high_water, memory_order_relaxed);
    out->closed = atomic_load_explicit(&p->closed, memory_order_relaxed);
}

/* ------------------------------------------------------------------ stress (real threads) */

typedef struct {
    knhk_lfpool *lf;
    knhk_tlpool *tl;
    uint32_t id, hold, threads;
    uint64_t iterations;
    uint64_t allocs, frees, exhausted;
    char fault[200];
    struct stress_arg *all;
} stress_arg;

static void *lf_stress_thread(void *arg) {
    stress_arg *a = arg;
    void *held[64];
    for (uint64_t r = 0; r < a->iterations && !a->fault[0]; r++) {
        uint32_t n = 0;
        for (; n < a->hold; n++) {
            int problem;
            void *b = knhk_lfpool_alloc(a->lf, &problem);
            if (b == NULL) {
                if (problem != KNHK_POOL_EXHAUSTED)
                    snprintf(a->fault, sizeof a->fault, "thread %u: alloc failed: %s", a->id, problem_text(problem));
                a->exhausted++;
                break;
            }
            a->allocs++;
            uint64_t stamp = ((uint64_t)a->id << 48) | (r << 8) | n;
            memcpy(b, &stamp, sizeof stamp);
            held[n] = b;
        }
        for (uint32_t k = 0; k < n; k++) {
            uint64_t stamp, want = ((uint64_t)a->id << 48) | (r << 8) | k;
            memcpy(&stamp, held[k], sizeof stamp);
            if (stamp != want && !a->fault[0])
                snprintf(a->fault, sizeof a->fault,
                         "thread %u round %llu: block %p was overwritten while held (stamp %llx, expected %llx): "
                         "handed to two threads at once",
                         a->id, (unsigned long long)r, held[k], (unsigned long long)stamp, (unsigned long long)want);
            int rc = knhk_lfpool_free(a->lf, held[k]);
            if (rc != KNHK_POOL_OK && !a->fault[0])
                snprintf(a->fault, sizeof a->fault, "thread %u: free failed: %s", a->id, problem_text(rc));
            else
                a->frees++;
        }
    }
    return NULL;
}

static int run_threads(void *(*fn)(void *), stress_arg *args, uint32_t threads) {
    pthread_t tid[64];
    uint32_t started = 0;
    for (; started < threads; started++)
        if (pthread_create(&tid[started], NULL, fn, &args[started]) != 0) break;
    for (uint32_t k = 0; k < started; k++) pthread_join(tid[k], NULL);
    if (started != threads) {
        _knhk_set_error("could only start %u of %u threads", started, threads);
        return KNHK_ERR_UNAVAILABLE;
    }
    return KNHK_OK;
}

int knhk_lfpool_stress(knhk_lfpool *p, uint32_t threads, uint64_t iterations, uint32_t hold, uint64_t *ops) {
    if (p == NULL || ops == NULL || threads == 0 || threads > 64 || hold == 0 || hold > 64) {
        _knhk_set_error("knhk_lfpool_stress: threads must be 1..64 and hold 1..64, got %u and %u", threads, hold);
        return KNHK_ERR_INVALID;
    }
    knhk_pool_stats before, after;
    knhk_lfpool_stats_get(p, &before);
    stress_arg args[64];
    memset(args, 0, sizeof args);
    for (uint32_t k = 0; k < threads; k++) {
        args[k].lf = p;
        args[k].id = k;
        args[k].hold = hold;
        args[k].iterations = iterations;
    }
    int st = run_threads(lf_stress_thread, args, threads);
    if (st != KNHK_OK) return st;
    ops[0] = ops[1] = ops[2] = 0;
    for (uint32_t k = 0; k < threads; k++) {
        if (args[k].fault[0]) {
            _knhk_set_error("%s", args[k].fault);
            return KNHK_ERR_STATE;
        }
        ops[0] += args[k].allocs;
        ops[1] += args[k].frees;
        ops[2] += args[k].exhausted;
    }
    knhk_lfpool_stats_get(p, &after);
    if (after.allocations - before.allocations != ops[0] || after.frees - before.frees != ops[1] ||
        after.in_use != before.in_use || after.failed - before.failed != ops[2]) {
        _knhk_set_error("accounting: the pool counted %llu allocations, %llu frees, %llu failed and %llu in use; "
                        "the threads made %llu, %llu and %llu (in use before: %llu)",
                        (unsigned long long)(after.allocations - before.allocations),
                        (unsigned long long)(after.frees - before.frees),
                        (unsigned long long)(after.failed - before.failed), (unsigned long long)after.in_use,
                        (unsigned long long)ops[0], (unsigned long long)ops[1], (unsigned long long)ops[2],
                        (unsigned long long)before.in_use);
        return KNHK_ERR_STATE;
    }
    return KNHK_OK;
}

/* ------------------------------------------------------------------ randomised-schedule check */

struct sched {
    _Alignas(KNHK_CACHE_LINE) _Atomic int turn; /* the virtual thread allowed to run, -1: none */
    uint64_t rng;
    uint64_t steps;
    int n;
    int alive[16];
};

static uint64_t splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Called by the running virtual thread: choose who runs next (maybe itself). */
static int pick_next(sched *s) {
    int live[16], k = 0;
    for (int i = 0; i < s->n; i++)
        if (s->alive[i]) live[k++] = i;
    if (k == 0) return -1;
    return live[splitmix(&s->rng) % (uint64_t)k];
}

static void wait_turn(sched *s, int me) {
    while (atomic_load_explicit(&s->turn, memory_order_acquire) != me) sched_yield();
}

static void yield_point(vthread *y) {
    sched *s = y->s;
    s->steps++;
    int next = pick_next(s);
    if (next == y->me) return;
    atomic_store_explicit(&s->turn, next, memory_order_release);
    wait_turn(s, y->me);
}

typedef struct {
    vthread v;
    treiber *t;
    uint32_t ops;
    uint64_t taginc;
    _Atomic int *holder; /* per block: the virtual thread holding it + 1, 0 free */
    char fault[160];
} model_arg;

static void *model_thread(void *arg) {
    model_arg *a = arg;
    sched *s = a->v.s;
    wait_turn(s, a->v.me);
    for (uint32_t k = 0; k < a->ops && !a->fault[0]; k++) {
        int64_t i = treiber_pop(a->t, &a->v, a->taginc);
        if (i < 0) {
            yield_point(&a->v);
            continue;
        }
        int h = atomic_load_explicit(&a->holder[i], memory_order_relaxed);
        if (h != 0) {
            snprintf(a->fault, sizeof a->fault,
                     "block %lld handed to virtual thread %d while thread %d held it "
                     "(step %llu)",
                     (long long)i, a->v.me, h - 1, (unsigned long long)s->steps);
            break;
        }
        atomic_store_explicit(&a->holder[i], a->v.me + 1, memory_order_relaxed);
        yield_point(&a->v); /* hold the block across a switch */
        atomic_store_explicit(&a->holder[i], 0, memory_order_relaxed);
        treiber_push(a->t, (uint64_t)i, &a->v, a->taginc);
    }
    s->alive[a->v.me] = 0;
    atomic_store_explicit(&s->turn, pick_next(s), memory_order_release);
    return NULL;
}

int knhk_lfpool_model_check(uint64_t seed, uint32_t threads, uint32_t ops, uint32_t capacity, int untagged,
                            uint64_t *steps) {
    if (threads < 1 || threads > 16 || capacity < 1 || capacity > 4096 || ops > 1000000) {
        _knhk_set_error("knhk_lfpool_model_check: threads 1..16, capacity 1..4096, ops <= 1000000; got %u, %u, %u",
                        threads, capacity, ops);
        return KNHK_ERR_INVALID;
    }
    treiber *t = aligned_alloc(KNHK_CACHE_LINE, sizeof *t);
    _Atomic uint32_t *next = calloc(capacity, sizeof *next);
    _Atomic int *holder = calloc(capacity, sizeof *holder);
    sched *s = aligned_alloc(KNHK_CACHE_LINE, sizeof *s);
    model_arg *args = calloc(threads, sizeof *args);
    int st = KNHK_OK;
    if (!t || !next || !holder || !s || !args) {
        _knhk_set_error("no memory for the model check");
        st = KNHK_ERR_NOMEM;
        goto done;
    }
    memset(t, 0, sizeof *t);
    memset(s, 0, sizeof *s);
    t->next = next;
    t->capacity = capacity;
    atomic_init(&t->head, 0);
    for (uint32_t i = 0; i < capacity; i++) treiber_push(t, capacity - 1 - i, NULL, 1);
    s->rng = seed;
    s->n = (int)threads;
    for (uint32_t k = 0; k < threads; k++) s->alive[k] = 1;
    atomic_init(&s->turn, pick_next(s));
    for (uint32_t k = 0; k < threads; k++) {
        args[k].v.s = s;
        args[k].v.me = (int)k;
        args[k].t = t;
        args[k].ops = ops;
        args[k].taginc = untagged ? 0 : 1;
        args[k].holder = holder;
    }
    pthread_t tid[16];
    uint32_t started = 0;
    for (; started < threads; started++)
        if (pthread_create(&tid[started], NULL, model_thread, &args[started]) != 0) break;
    if (started != threads) {
        /* cannot run the schedule with a thread missing: release the others */
        for (uint32_t k = started; k < threads; k++) s->alive[k] = 0;
        args[0].fault[0] = 0;
    }
    for (uint32_t k = 0; k < started; k++) pthread_join(tid[k], NULL);
    if (started != threads) {
        _knhk_set_error("could only start %u of %u threads", started, threads);
        st = KNHK_ERR_UNAVAILABLE;
        goto done;
    }
    if (steps != NULL) *steps = s->steps;
    for (uint32_t k = 0; k < threads; k++) {
        if (args[k].fault[0]) {
            _knhk_set_error("seed %llu: %s", (unsigned long long)seed, args[k].fault);
            st = KNHK_ERR_STATE;
            goto done;
        }
    }
    /* Every block is back on the list exactly once. */
    {
        uint8_t *seen = calloc(capacity, 1);
        uint64_t count = 0;
        uint32_t top = (uint32_t)atomic_load(&t->head);
        while (top != 0 && count <= capacity) {
            if (top > capacity || seen[top - 1]) {
                _knhk_set_error("seed %llu: the free list is corrupt at block %u after the run (a cycle or a "
                                "block listed twice)",
                                (unsigned long long)seed, top - 1);
                st = KNHK_ERR_STATE;
                break;
            }
            seen[top - 1] = 1;
            count++;
            top = atomic_load(&next[top - 1]);
        }
        if (st == KNHK_OK && count != capacity) {
            _knhk_set_error("seed %llu: %llu of %u blocks are on the free list after the run (blocks lost)",
                            (unsigned long long)seed, (unsigned long long)count, capacity);
            st = KNHK_ERR_STATE;
        }
        free(seen);
    }
done:
    free(t);
    free((void *)next);
    free((void *)holder);
    free(s);
    free(args);
    return st;
}

/* ------------------------------------------------------------------ ThreadLocalPool */

#define REMOTE_CLOSED UINT64_MAX

typedef struct tlcache {
    /* The owner's side: no atomic operation on the fast path. */
    uint32_t *items; /* block numbers of free blocks */
    uint32_t count;
    uint32_t slot;
    knhk_tlpool *pool;
    _Atomic uint64_t allocs, frees, remote_out; /* written by the owner only (load + store) */
    /* Other threads push here (one CAS); the owner takes the list whole. */
    _Alignas(KNHK_CACHE_LINE) _Atomic uint64_t remote; /* block + 1 of the first, 0 empty, REMOTE_CLOSED retired */
    _Atomic int active;
} tlcache;

struct knhk_tlpool {
    knhk_lfpool *shared;
    uint32_t cache_size;
    pthread_key_t key;
    _Atomic uint32_t *rnext;  /* links of the remote lists */
    _Atomic uint16_t *owner;  /* per block: the cache slot + 1 that allocated it */
    pthread_mutex_t slots_lock; /* taken when a thread gets or gives back a cache slot only */
    tlcache *caches[KNHK_TLPOOL_MAX_THREADS];
    _Atomic int64_t refs;
    _Atomic uint64_t retired_allocs, retired_frees, retired_remote, shared_allocs, shared_frees;
};

static void tl_unref(knhk_tlpool *p);

static inline void counter_add(_Atomic uint64_t *c, uint64_t n) {
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + n, memory_order_relaxed);
}

/* Give block i back to the shared list (its state is already free). */
static inline void to_shared(knhk_tlpool *p, uint32_t i) {
    treiber_push(&p->shared->t, i, NULL, 1);
    note_in_use(p->shared, -1);
}

/* A block off the shared list: -1 when it is empty and every block was used. */
static inline int64_t from_shared(knhk_tlpool *p) {
    int64_t i = lf_take(p->shared);
    if (i >= 0) note_in_use(p->shared, 1);
    return i;
}

static void cache_flush(tlcache *c) {
    knhk_tlpool *p = c->pool;
    for (uint32_t k = 0; k < c->count; k++) to_shared(p, c->items[k]);
    c->count = 0;
}

/* Take the remote-free list into the cache (overflow to the shared list). */
static void take_remote(tlcache *c, uint64_t replacement) {
    knhk_tlpool *p = c->pool;
    uint64_t h = atomic_exchange_explicit(&c->remote, replacement, memory_order_acquire);
    if (h == REMOTE_CLOSED) h = 0;
    while (h != 0) {
        uint32_t i = (uint32_t)(h - 1);
        h = atomic_load_explicit(&p->rnext[i], memory_order_relaxed);
        if (replacement == 0 && c->count < p->cache_size)
            c->items[c->count++] = i;
        else
            to_shared(p, i);
    }
}

static void cache_exit(void *arg) {
    tlcache *c = arg;
    knhk_tlpool *p = c->pool;
    take_remote(c, REMOTE_CLOSED); /* pushers that see REMOTE_CLOSED go to the shared list */
    cache_flush(c);
    atomic_fetch_add(&p->retired_allocs, atomic_load(&c->allocs));
    atomic_fetch_add(&p->retired_frees, atomic_load(&c->frees));
    atomic_fetch_add(&p->retired_remote, atomic_load(&c->remote_out));
    atomic_store(&c->allocs, 0);
    atomic_store(&c->frees, 0);
    atomic_store(&c->remote_out, 0);
    pthread_mutex_lock(&p->slots_lock);
    atomic_store(&c->active, 0);
    pthread_mutex_unlock(&p->slots_lock);
    tl_unref(p);
}

static __attribute__((noinline)) tlcache *cache_new(knhk_tlpool *p) {
    tlcache *c = NULL;
    pthread_mutex_lock(&p->slots_lock);
    for (uint32_t s = 0; s < KNHK_TLPOOL_MAX_THREADS; s++) {
        if (p->caches[s] == NULL) {
            c = aligned_alloc(KNHK_CACHE_LINE, (sizeof *c + KNHK_CACHE_LINE - 1) & ~(size_t)(KNHK_CACHE_LINE - 1));
            uint32_t *items = c ? malloc(sizeof(uint32_t) * p->cache_size) : NULL;
            if (c == NULL || items == NULL) {
                free(c);
                c = NULL;
                break;
            }
            memset(c, 0, sizeof *c);
            c->items = items;
            c->slot = s;
            c->pool = p;
            p->caches[s] = c;
            break;
        }
        if (!atomic_load(&p->caches[s]->active)) {
            c = p->caches[s];
            break;
        }
    }
    if (c != NULL) {
        c->count = 0;
        atomic_store(&c->remote, 0);
        atomic_store(&c->active, 1);
        atomic_fetch_add(&p->refs, 1);
    }
    pthread_mutex_unlock(&p->slots_lock);
    if (c != NULL) pthread_setspecific(p->key, c);
    return c; /* NULL: more threads than slots; this thread uses the shared list */
}

static inline tlcache *my_cache(knhk_tlpool *p) {
    tlcache *c = pthread_getspecific(p->key);
    return _knhk_likely(c != NULL) ? c : cache_new(p);
}

int knhk_tlpool_create(size_t block_size, uint64_t capacity, size_t align, uint32_t cache_size,
                       const knhk_numa_spec *numa, knhk_tlpool **out) {
    if (out == NULL) return KNHK_ERR_INVALID;
    *out = NULL;
    if (cache_size < 2 || cache_size > KNHK_TLPOOL_MAX_CACHE) {
        _knhk_set_error("ThreadLocalPool cache_size must be from 2 to %d blocks, got %u", KNHK_TLPOOL_MAX_CACHE,
                        cache_size);
        return KNHK_ERR_INVALID;
    }
    knhk_tlpool *p = calloc(1, sizeof *p);
    if (p == NULL) {
        _knhk_set_error("no memory for a pool");
        return KNHK_ERR_NOMEM;
    }
    int st = knhk_lfpool_create(block_size, capacity, align, numa, &p->shared);
    if (st != KNHK_OK) {
        free(p);
        return st;
    }
    p->rnext = side_table(capacity * sizeof(uint32_t), "ThreadLocalPool");
    p->owner = p->rnext ? side_table(capacity * sizeof(uint16_t), "ThreadLocalPool") : NULL;
    if (p->owner == NULL || pthread_key_create(&p->key, cache_exit) != 0) {
        if (p->owner == NULL)
            _knhk_set_error("ThreadLocalPool: no memory for its side tables");
        else
            _knhk_set_error("ThreadLocalPool: no pthread key left (the process has too many)");
        if (p->rnext) munmap((void *)p->rnext, capacity * sizeof(uint32_t));
        if (p->owner) munmap((void *)p->owner, capacity * sizeof(uint16_t));
        knhk_lfpool_destroy(p->shared);
        free(p);
        return KNHK_ERR_NOMEM;
    }
    pthread_mutex_init(&p->slots_lock, NULL);
    p->cache_size = cache_size;
    atomic_init(&p->refs, 1);
    *out = p;
    return KNHK_OK;
}

static void tl_destroy(knhk_tlpool *p) {
    pthread_key_delete(p->key);
    for (uint32_t s = 0; s < KNHK_TLPOOL_MAX_THREADS; s++) {
        if (p->caches[s] != NULL) {
            free(p->caches[s]->items);
            free(p->caches[s]);
        }
    }
    uint64_t cap = p->shared->g.capacity;
    munmap((void *)p->rnext, cap * sizeof(uint32_t));
    munmap((void *)p->owner, cap * sizeof(uint16_t));
    pthread_mutex_destroy(&p->slots_lock);
    knhk_lfpool_destroy(p->shared);
    free(p);
}

static void tl_unref(knhk_tlpool *p) {
    if (atomic_fetch_sub_explicit(&p->refs, 1, memory_order_acq_rel) == 1) tl_destroy(p);
}

void knhk_tlpool_flush(knhk_tlpool *p) {
    tlcache *c = pthread_getspecific(p->key);
    if (c == NULL) return;
    take_remote(c, 0);
    cache_flush(c);
}

void knhk_tlpool_close(knhk_tlpool *p) {
    if (p == NULL) return;
    knhk_tlpool_flush(p);
    knhk_lfpool_close(p->shared);
}

void knhk_tlpool_destroy(knhk_tlpool *p) {
    if (p == NULL) return;
    /* The calling thread's cache goes now (its key destructor would not run
       after pthread_key_delete); other threads' caches keep the pool alive
       until they exit. */
    tlcache *c = pthread_getspecific(p->key);
    if (c != NULL) {
        pthread_setspecific(p->key, NULL);
        cache_exit(c);
    }
    tl_unref(p);
}

static __attribute__((noinline)) int64_t tl_refill(knhk_tlpool *p, tlcache *c) {
    take_remote(c, 0);
    if (c->count == 0) {
        uint32_t want = p->cache_size / 2;
        while (c->count < want) {
            int64_t i = from_shared(p);
            if (i < 0) break;
            c->items[c->count++] = (uint32_t)i;
        }
    }
    if (c->count == 0) return -1;
    return c->items[--c->count];
}

void *knhk_tlpool_alloc(knhk_tlpool *p, int *problem) {
    int local;
    if (problem == NULL) problem = &local;
    knhk_lfpool *lf = p->shared;
    int u = lf_usable(lf);
    if (_knhk_unlikely(u != KNHK_POOL_OK)) {
        *problem = report("ThreadLocalPool alloc", u, NULL);
        return NULL;
    }
    tlcache *c = my_cache(p);
    int64_t i;
    if (_knhk_likely(c != NULL && c->count != 0)) {
        i = c->items[--c->count]; /* fast path: pop the thread's own cache */
    } else if (c != NULL) {
        i = tl_refill(p, c);
    } else {
        i = from_shared(p);
    }
    if (_knhk_unlikely(i < 0)) {
        atomic_fetch_add_explicit(&my_cell(lf)->failed, 1, memory_order_relaxed);
        *problem = KNHK_POOL_EXHAUSTED;
        return NULL;
    }
    uint8_t was = atomic_load_explicit(&lf->state[i], memory_order_relaxed);
    if (_knhk_unlikely(was != 0)) {
        *problem = report("ThreadLocalPool alloc", KNHK_POOL_CORRUPT, lf->g.base + (uint64_t)i * lf->g.stride);
        return NULL;
    }
    atomic_store_explicit(&lf->state[i], 1, memory_order_relaxed);
    atomic_store_explicit(&p->owner[i], (uint16_t)(c != NULL ? c->slot + 1 : 0), memory_order_relaxed);
    if (c != NULL)
        counter_add(&c->allocs, 1);
    else
        atomic_fetch_add(&p->shared_allocs, 1);
    *problem = KNHK_POOL_OK;
    return lf->g.base + (uint64_t)i * lf->g.stride;
}

int knhk_tlpool_free(knhk_tlpool *p, void *ptr) {
    knhk_lfpool *lf = p->shared;
    int u = lf_usable(lf);
    int64_t i = u == KNHK_POOL_OK ? geometry_index(&lf->g, ptr) : -1;
    uint8_t expect = 1;
    if (_knhk_unlikely(u != KNHK_POOL_OK || i < 0 ||
                       !atomic_compare_exchange_strong_explicit(&lf->state[i], &expect, 0, memory_order_relaxed,
                                                                memory_order_relaxed))) {
        atomic_fetch_add_explicit(&my_cell(lf)->bad_frees, 1, memory_order_relaxed);
        return report("ThreadLocalPool free",
                      u != KNHK_POOL_OK ? u
                      : i < 0           ? KNHK_POOL_FOREIGN
                                        : KNHK_POOL_DOUBLE_FREE,
                      ptr);
    }
    tlcache *c = my_cache(p);
    uint16_t o = atomic_load_explicit(&p->owner[i], memory_order_relaxed);
    if (c == NULL) {
        atomic_fetch_add(&p->shared_frees, 1);
        to_shared(p, (uint32_t)i);
        return KNHK_POOL_OK;
    }
    counter_add(&c->frees, 1);
    if (_knhk_likely(o == c->slot + 1 || o == 0)) {
        /* The owner (or a block from the shared list): into this thread's cache. */
        if (_knhk_unlikely(c->count == p->cache_size)) {
            uint32_t keep = p->cache_size / 2;
            while (c->count > keep) to_shared(p, c->items[--c->count]);
        }
        c->items[c->count++] = (uint32_t)i;
        return KNHK_POOL_OK;
    }
    /* Another thread's block: onto its remote-free list, without a lock. */
    tlcache *owner = p->caches[o - 1];
    counter_add(&c->remote_out, 1);
    uint64_t h = atomic_load_explicit(&owner->remote, memory_order_relaxed);
    for (;;) {
        if (h == REMOTE_CLOSED) { /* the owner has exited */
            to_shared(p, (uint32_t)i);
            return KNHK_POOL_OK;
        }
        atomic_store_explicit(&p->rnext[i], (uint32_t)h, memory_order_relaxed);
        if (atomic_compare_exchange_weak_explicit(&owner->remote, &h, (uint64_t)i + 1, memory_order_release,
                                                  memory_order_relaxed))
            return KNHK_POOL_OK;
    }
}

int64_t knhk_tlpool_index(const knhk_tlpool *p, const void *ptr) { return geometry_index(&p->shared->g, ptr); }
void *knhk_tlpool_base(const knhk_tlpool *p) { return p->shared->g.base; }

void knhk_tlpool_stats_get(const knhk_tlpool *p, knhk_pool_stats *out) {
    knhk_lfpool_stats_get(p->shared, out);
    uint64_t allocs = atomic_load(&p->retired_allocs) + atomic_load(&p->shared_allocs);
    uint64_t frees = atomic_load(&p->retired_frees) + atomic_load(&p->shared_frees);
    uint64_t remote = atomic_load(&p->retired_remote), cached = 0;
    knhk_tlpool *mp = (knhk_tlpool *)p;
    pthread_mutex_lock(&mp->slots_lock);
    for (uint32_t s = 0; s < KNHK_TLPOOL_MAX_THREADS; s++) {
        tlcache *c = p->caches[s];
        if (c == NULL) break;
        allocs += atomic_load_explicit(&c->allocs, memory_order_relaxed);
        frees += atomic_load_explicit(&c->frees, memory_order_relaxed);
        remote += atomic_load_explicit(&c->remote_out, memory_order_relaxed);
        if (atomic_load(&c->active)) cached += c->count; /* racy read of another thread's count: a figure */
    }
    pthread_mutex_unlock(&mp->slots_lock);
    /* The shared pool's own cells count only refills; report the pool's calls. */
    /* in_use: blocks handed to callers and not freed (exact once threads are
       quiet); high_water: the most blocks out of the shared list at once,
       held in caches included (the memory the pool's users kept busy). */
    out->allocations = allocs;
    out->frees = frees;
    out->in_use = allocs >= frees ? allocs - frees : 0;
    out->remote_frees = remote;
    out->cached = cached;
}

typedef struct {
    knhk_tlpool *p;
    uint32_t id, threads;
    uint64_t iterations, allocs, frees;
    void **mailbox; /* per thread: blocks another thread frees */
    _Atomic int *ready;
    char fault[200];
} tl_arg;

static void *tl_stress_thread(void *arg) {
    tl_arg *a = arg;
    void *held[16];
    for (uint64_t r = 0; r < a->iterations && !a->fault[0]; r++) {
        uint32_t n = 0;
        for (; n < 16; n++) {
            int problem;
            void *b = knhk_tlpool_alloc(a->p, &problem);
            if (b == NULL) {
                if (problem != KNHK_POOL_EXHAUSTED)
                    snprintf(a->fault, sizeof a->fault, "thread %u: alloc failed: %s", a->id, problem_text(problem));
                break;
            }
            a->allocs++;
            uint64_t stamp = ((uint64_t)a->id << 48) | (r << 8) | n;
            memcpy(b, &stamp, sizeof stamp);
            held[n] = b;
        }
        for (uint32_t k = 0; k < n; k++) {
            uint64_t stamp, want = ((uint64_t)a->id << 48) | (r << 8) | k;
            memcpy(&stamp, held[k], sizeof stamp);
            if (stamp != want && !a->fault[0])
                snprintf(a->fault, sizeof a->fault, "thread %u: block %p overwritten while held: handed out twice",
                         a->id, held[k]);
        }
        /* Every other round, hand half the blocks to the next thread's mailbox
           (it frees them: cross-thread frees); take and free our own mailbox. */
        uint32_t k = 0;
        if (a->threads > 1 && (r & 1)) {
            uint32_t to = (a->id + 1) % a->threads;
            for (; k < n / 2; k++) {
                void *expected = NULL;
                /* one slot per (receiver, k): spin only if the receiver is behind */
                void **slot = &a->mailbox[to * 16 + k];
                while (!__atomic_compare_exchange_n(slot, &expected, held[k], 0, __ATOMIC_RELEASE, __ATOMIC_RELAXED)) {
                    expected = NULL;
                    sched_yield();
                }
            }
        }
        for (; k < n; k++) {
            if (knhk_tlpool_free(a->p, held[k]) != KNHK_POOL_OK && !a->fault[0])
                snprintf(a->fault, sizeof a->fault, "thread %u: free failed: %s", a->id, knhk_last_error());
            a->frees++;
        }
        for (uint32_t m = 0; m < 16; m++) {
            void *b = __atomic_exchange_n(&a->mailbox[a->id * 16 + m], NULL, __ATOMIC_ACQUIRE);
            if (b != NULL) {
                if (knhk_tlpool_free(a->p, b) != KNHK_POOL_OK && !a->fault[0])
                    snprintf(a->fault, sizeof a->fault, "thread %u: cross-thread free failed: %s", a->id,
                             knhk_last_error());
                a->frees++;
            }
        }
    }
    /* Keep emptying our mailbox until everyone is done sending, then once more. */
    atomic_fetch_add(a->ready, 1);
    while (atomic_load(a->ready) >= 0 && atomic_load(a->ready) < (int)a->threads) {
        for (uint32_t m = 0; m < 16; m++) {
            void *b = __atomic_exchange_n(&a->mailbox[a->id * 16 + m], NULL, __ATOMIC_ACQUIRE);
            if (b != NULL) {
                knhk_tlpool_free(a->p, b);
                a->frees++;
            }
        }
        sched_yield();
    }
    for (uint32_t m = 0; m < 16; m++) {
        void *b = __atomic_exchange_n(&a->mailbox[a->id * 16 + m], NULL, __ATOMIC_ACQUIRE);
        if (b != NULL) {
            if (knhk_tlpool_free(a->p, b) != KNHK_POOL_OK && !a->fault[0])
                snprintf(a->fault, sizeof a->fault, "thread %u: cross-thread free failed", a->id);
            a->frees++;
        }
    }
    return NULL;
}

int knhk_tlpool_stress(knhk_tlpool *p, uint32_t threads, uint64_t iterations, uint64_t *ops) {
    if (p == NULL || ops == NULL || threads == 0 || threads > 64) {
        _knhk_set_error("knhk_tlpool_stress: threads must be 1..64, got %u", threads);
        return KNHK_ERR_INVALID;
    }
    knhk_pool_stats before, after;
    knhk_tlpool_stats_get(p, &before);
    void **mailbox = calloc((size_t)threads * 16, sizeof(void *));
    tl_arg *args = calloc(threads, sizeof *args);
    _Atomic int ready = 0;
    if (!mailbox || !args) {
        free(mailbox);
        free(args);
        return KNHK_ERR_NOMEM;
    }
    for (uint32_t k = 0; k < threads; k++)
        args[k] = (tl_arg){
            .p = p, .id = k, .threads = threads, .iterations = iterations, .mailbox = mailbox, .ready = &ready};
    pthread_t tid[64];
    uint32_t started = 0;
    for (; started < threads; started++)
        if (pthread_create(&tid[started], NULL, tl_stress_thread, &args[started]) != 0) break;
    if (started != threads) atomic_store(&ready, -1000); /* nobody waits for the missing */
    for (uint32_t k = 0; k < started; k++) pthread_join(tid[k], NULL);
    int st = KNHK_OK;
    if (started != threads) {
        _knhk_set_error("could only start %u of %u threads", started, threads);
        st = KNHK_ERR_UNAVAILABLE;
    }
    ops[0] = ops[1] = 0;
    for (uint32_t k = 0; k < threads && st == KNHK_OK; k++) {
        if (args[k].fault[0]) {
            _knhk_set_error("%s", args[k].fault);
            st = KNHK_ERR_STATE;
        }
        ops[0] += args[k].allocs;
        ops[1] += args[k].frees;
    }
    free(mailbox);
    free(args);
    if (st != KNHK_OK) return st;
    /* The threads have exited: their caches are flushed, their counts retired. */
    knhk_tlpool_stats_get(p, &after);
    if (after.allocations - before.allocations != ops[0] || after.frees - before.frees != ops[1] ||
        after.in_use != before.in_use || ops[0] != ops[1]) {
        _knhk_set_error("accounting: the pool counted %llu allocations, %llu frees, %llu in use (before %llu); the "
                        "threads made %llu and %llu",
                        (unsigned long long)(after.allocations - before.allocations),
                        (unsigned long long)(after.frees - before.frees), (unsigned long long)after.in_use,
                        (unsigned long long)before.in_use, (unsigned long long)ops[0], (unsigned long long)ops[1]);
        return KNHK_ERR_STATE;
    }
    return KNHK_OK;
}

/* ------------------------------------------------------------------ throughput comparison */

typedef struct {
    pthread_mutex_t lock;
    knhk_pool *pool; /* a FixedPool used under the mutex (owner check bypassed below) */
} mutex_pool;

typedef struct {
    int kind;
    void *target;
    const knhk_backend *backend;
    size_t block_size;
    uint64_t iterations;
    _Atomic int *go;
    int failed;
} bench_arg;

static inline void *bench_alloc(bench_arg *a) {
    switch (a->kind) {
    case KNHK_POOL_BENCH_MUTEX: {
        mutex_pool *m = a->target;
        pthread_mutex_lock(&m->lock);
        uintptr_t saved = m->pool->owner;
        m->pool->owner = thread_token();
        void *b = knhk_pool_alloc(m->pool, NULL);
        m->pool->owner = saved;
        pthread_mutex_unlock(&m->lock);
        return b;
    }
    case KNHK_POOL_BENCH_FIXED: return knhk_pool_alloc(a->target, NULL);
    case KNHK_POOL_BENCH_LOCKFREE: return knhk_lfpool_alloc(a->target, NULL);
    case KNHK_POOL_BENCH_THREADLOCAL: return knhk_tlpool_alloc(a->target, NULL);
    default: return knhk_malloc(a->backend, a->block_size);
    }
}

static inline void bench_free(bench_arg *a, void *b) {
    switch (a->kind) {
    case KNHK_POOL_BENCH_MUTEX: {
        mutex_pool *m = a->target;
        pthread_mutex_lock(&m->lock);
        uintptr_t saved = m->pool->owner;
        m->pool->owner = thread_token();
        knhk_pool_free(m->pool, b);
        m->pool->owner = saved;
        pthread_mutex_unlock(&m->lock);
        break;
    }
    case KNHK_POOL_BENCH_FIXED: knhk_pool_free(a->target, b); break;
    case KNHK_POOL_BENCH_LOCKFREE: knhk_lfpool_free(a->target, b); break;
    case KNHK_POOL_BENCH_THREADLOCAL: knhk_tlpool_free(a->target, b); break;
    default: knhk_free(a->backend, b);
    }
}

static void *bench_thread(void *arg) {
    bench_arg *a = arg;
    void *held[8];
    while (!atomic_load_explicit(a->go, memory_order_acquire)) sched_yield();
    for (uint64_t r = 0; r < a->iterations; r++) {
        for (int k = 0; k < 8; k++) {
            held[k] = bench_alloc(a);
            if (_knhk_unlikely(held[k] == NULL)) {
                a->failed = 1;
                for (int j = 0; j < k; j++) bench_free(a, held[j]);
                return NULL;
            }
            *(volatile char *)held[k] = (char)k;
        }
        for (int k = 0; k < 8; k++) bench_free(a, held[k]);
    }
    if (a->kind == KNHK_POOL_BENCH_THREADLOCAL) knhk_tlpool_flush(a->target);
    return NULL;
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int knhk_pool_bench(int kind, const knhk_backend *backend, uint32_t threads, uint64_t iterations, size_t block_size,
                    uint64_t capacity, double *seconds) {
    if (threads == 0 || threads > 64 || seconds == NULL || kind < 0 || kind > KNHK_POOL_BENCH_BACKEND ||
        (kind == KNHK_POOL_BENCH_BACKEND && backend == NULL) || (kind == KNHK_POOL_BENCH_FIXED && threads != 1)) {
        _knhk_set_error("knhk_pool_bench: kind 0..4 (a backend for 4; one thread for the FixedPool), threads 1..64");
        return KNHK_ERR_INVALID;
    }
    void *target = NULL;
    mutex_pool m;
    int st = KNHK_OK;
    switch (kind) {
    case KNHK_POOL_BENCH_MUTEX:
        st = knhk_pool_create(block_size, capacity, 8, NULL, &m.pool);
        pthread_mutex_init(&m.lock, NULL);
        target = &m;
        break;
    case KNHK_POOL_BENCH_FIXED: st = knhk_pool_create(block_size, capacity, 8, NULL, (knhk_pool **)&target); break;
    case KNHK_POOL_BENCH_LOCKFREE:
        st = knhk_lfpool_create(block_size, capacity, 8, NULL, (knhk_lfpool **)&target);
        break;
    case KNHK_POOL_BENCH_THREADLOCAL:
        st = knhk_tlpool_create(block_size, capacity, 8, 64, NULL, (knhk_tlpool **)&target);
        break;
    default: break;
    }
    if (st != KNHK_OK) return st;
    _Atomic int go = 0;
    bench_arg args[64];
    pthread_t tid[64];
    uint32_t started = 0;
    int fixed_inline = kind == KNHK_POOL_BENCH_FIXED; /* the FixedPool belongs to this thread: run it here */
    for (uint32_t k = 0; k < threads; k++)
        args[k] = (bench_arg){.kind = kind,
                              .target = target,
                              .backend = backend,
                              .block_size = block_size,
                              .iterations = iterations,
                              .go = &go};
    if (!fixed_inline)
        for (; started < threads; started++)
            if (pthread_create(&tid[started], NULL, bench_thread, &args[started]) != 0) break;
    double t0 = now_seconds();
    atomic_store_explicit(&go, 1, memory_order_release);
    if (fixed_inline) bench_thread(&args[0]);
    for (uint32_t k = 0; k < started; k++) pthread_join(tid[k], NULL);
    *seconds = now_seconds() - t0;
    int failed = 0;
    for (uint32_t k = 0; k < threads; k++) failed |= args[k].failed;
    switch (kind) {
    case KNHK_POOL_BENCH_MUTEX:
        pthread_mutex_destroy(&m.lock);
        knhk_pool_destroy(m.pool);
        break;
    case KNHK_POOL_BENCH_FIXED: knhk_pool_destroy(target); break;
    case KNHK_POOL_BENCH_LOCKFREE: knhk_lfpool_destroy(target); break;
    case KNHK_POOL_BENCH_THREADLOCAL: knhk_tlpool_destroy(target); break;
    default: break;
    }
    if (!fixed_inline && started != threads) {
        _knhk_set_error("could only start %u of %u threads", started, threads);
        return KNHK_ERR_UNAVAILABLE;
    }
    if (failed) {
        _knhk_set_error("knhk_pool_bench: an allocation failed (capacity %llu too small for %u threads x 8?)",
                        (unsigned long long)capacity, threads);
        return KNHK_ERR_NOMEM;
    }
    return KNHK_OK;
}

int knhk_pool_latency(int kind, const knhk_backend *backend, size_t block_size, uint64_t n, uint32_t rounds,
                      uint64_t *ticks) {
    if (ticks == NULL || n == 0 || n > KNHK_POOL_MAX_CAPACITY || rounds == 0 ||
        (kind != KNHK_POOL_BENCH_FIXED && kind != KNHK_POOL_BENCH_BACKEND && kind != KNHK_POOL_BENCH_EMPTY) ||
        (kind == KNHK_POOL_BENCH_BACKEND && backend == NULL)) {
        _knhk_set_error("knhk_pool_latency: kind fixed, backend (with a backend) or empty; n and rounds >= 1");
        return KNHK_ERR_INVALID;
    }
    void **held = malloc(n * sizeof *held);
    if (held == NULL) return KNHK_ERR_NOMEM;
    knhk_pool *pool = NULL;
    int st = KNHK_OK;
    for (uint32_t r = 0; r < rounds && st == KNHK_OK; r++) {
        if (kind == KNHK_POOL_BENCH_FIXED && (st = knhk_pool_create(block_size, n, 8, NULL, &pool)) != KNHK_OK) break;
        for (uint64_t i = 0; i < n; i++) {
            uint64_t t0 = knhk_ticks_now();
            void *b = kind == KNHK_POOL_BENCH_FIXED     ? knhk_pool_alloc(pool, NULL)
                      : kind == KNHK_POOL_BENCH_BACKEND ? knhk_malloc(backend, block_size)
                                                        : (void *)&held[i];
            uint64_t t1 = knhk_ticks_now();
            __asm__ volatile("" : : "r"(b) : "memory");
            ticks[(uint64_t)r * n + i] = t1 - t0;
            held[i] = b;
            if (b == NULL) st = KNHK_ERR_NOMEM;
        }
        for (uint64_t i = 0; i < n; i++) {
            if (held[i] == NULL) continue;
            if (kind == KNHK_POOL_BENCH_FIXED)
                knhk_pool_free(pool, held[i]);
            else if (kind == KNHK_POOL_BENCH_BACKEND)
                knhk_free(backend, held[i]);
        }
        if (pool != NULL) knhk_pool_destroy(pool);
        pool = NULL;
    }
    free(held);
    return st;
}

/* ------------------------------------------------------------------ integer-address forms */

uint64_t knhk_pool_alloc_addr(knhk_pool *p, int *problem) { return (uint64_t)(uintptr_t)knhk_pool_alloc(p, problem); }
int knhk_pool_free_addr(knhk_pool *p, uint64_t addr) { return fixed_free(p, (void *)(uintptr_t)addr); }
uint64_t knhk_lfpool_alloc_addr(knhk_lfpool *p, int *problem) {
    return (uint64_t)(uintptr_t)knhk_lfpool_alloc(p, problem);
}
int knhk_lfpool_free_addr(knhk_lfpool *p, uint64_t addr) { return knhk_lfpool_free(p, (void *)(uintptr_t)addr); }
uint64_t knhk_tlpool_alloc_addr(knhk_tlpool *p, int *problem) {
    return (uint64_t)(uintptr_t)knhk_tlpool_alloc(p, problem);
}
int knhk_tlpool_free_addr(knhk_tlpool *p, uint64_t addr) { return knhk_tlpool_free(p, (void *)(uintptr_t)addr); }
