/* arena.c -- bump allocation from chunks taken from a knhk backend.
 *
 * An allocation aligns a cursor and moves it (see _knhk_arena_bump in
 * knhk_internal.h); only when the current chunk is full does the slow path
 * take the next chunk: a spare one kept from before the last reset when one
 * is large enough, else a new one from the backend, each new chunk twice the
 * size of the previous up to a cap. A request larger than a quarter of the
 * next chunk size gets a chunk of its own, so it neither wastes the room left
 * in the current chunk nor inflates the growth sequence.
 *
 * Every chunk counts the counted blocks alive in it. reset() never waits for
 * them: a chunk that still holds a live block is *pinned* -- set aside, never
 * bumped into, its bytes untouched -- and every other chunk is recycled; a
 * pinned chunk goes back to the spares (or to the backend, past the retention
 * below) once its last block is freed, which the owner notices at its next
 * slow-path allocation, reset or statistics call. So a straggler array pins
 * its own chunk, not the arena (one such array used to stop every reset and
 * let resident memory grow without bound).
 *
 * reset() keeps the memory for the next batch. When the batch took several
 * chunks and its bytes fit under the growth cap, they are consolidated into
 * one chunk sized for the whole batch (as Zig's ArenaAllocator does with
 * retain_capacity), so the arena settles on a single chunk and the next batch
 * of the same size makes no backend call. Otherwise the chunks are kept in
 * the order they were taken and the next batch takes them first-fit, which
 * replays the same choices for a batch of the same shape. close() drops the owner's reference; the memory goes back to
 * the backend when the last reference (numpy handlers, counted blocks) goes.
 *
 * Counted blocks carry a 16-byte header (their size) so numpy's realloc,
 * which passes no old size, can copy exactly the block's bytes.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "knhk_internal.h"

/* Bytes at the start of a chunk for its header; keeps the data 64-aligned. */
#define CHUNK_HEADER 64
#define CHUNK_ALIGN 64
#define BLOCK_MAGIC 0x6b6e6862u /* "knhb" */

typedef struct chunk {
    struct chunk *next;
    size_t size;          /* whole chunk, header included */
    _Atomic int64_t live; /* counted blocks alive in it (freed from any thread) */
} chunk;

/* 16 bytes in front of every counted block. The chunk is found from the
   block: `chunk_off` is the header's distance from its chunk in 16-byte
   units, split over two fields (48 bits: chunks are at most 2**40 bytes). */
typedef struct {
    uint64_t size : 44;      /* the size asked for (<= KNHK_ARENA_MAX_REQUEST = 2**44) */
    uint64_t align_log2 : 4; /* log2 of the alignment (<= KNHK_MAX_ALIGN = 2**12) */
    uint64_t chunk_off_hi : 16;
    uint32_t magic;          /* BLOCK_MAGIC while live: a stray or repeated free is ignored */
    uint32_t chunk_off_lo;
} block_header;

_Static_assert(sizeof(block_header) == KNHK_ARENA_BLOCK_HEADER, "block header size");
_Static_assert(sizeof(chunk) <= CHUNK_HEADER, "chunk header size");

struct knhk_arena {
    _knhk_arena_head head; /* first: the fast path touches one cache line */
    chunk *current;        /* the chunk head.cur points into, or NULL */
    chunk *last_taken;     /* the chunk alloc_slow served its last request from */
    chunk *taken;          /* every chunk taken this batch (current included), in order */
    chunk **taken_tail;
    chunk *spare;  /* chunks kept by reset for the next batch */
    chunk *pinned; /* chunks set aside by reset while blocks in them live */
    const knhk_backend *backend;
    pthread_t owner;
    size_t chunk_size, max_chunk_size, next_chunk_size;
    uint64_t used_before; /* bytes bumped this batch in chunks that are not current */
    uint64_t batch_high;  /* the most bytes in use at once this batch (blocks given back included) */
    uint64_t reserved, chunks, backend_calls, high_water, reallocations, resets, huge_page_chunks;
    uint64_t pinned_chunks, pinned_bytes; /* the pinned list's length and bytes */
    int huge_pages;
    int numa_mode; /* KNHK_NUMA_*: the placement of new chunks (issue 19) */
    size_t numa_words;
    uint64_t numa_mask[KNHK_NUMA_MAX_NODES / 64];
    uint64_t numa_placed, numa_refused;
    _Atomic int closed;
    _Atomic int64_t refs; /* owner + numpy handlers + live counted blocks */
    _Atomic int64_t live; /* live counted blocks */
};

/* Spare bytes reset() keeps for the next batch beyond what that batch is
   expected to need: twice the batch's peak (or the first chunk size); the
   rest goes back to the backend. */
#define RETAIN_FACTOR 2

/* The cursor stays a multiple of 16 (see _knhk_arena_bump). */
static inline uintptr_t round16(uintptr_t x) { return (x + 15) & ~(uintptr_t)15; }

static inline bool is_owner(const knhk_arena *a) { return pthread_equal(pthread_self(), a->owner); }

bool _knhk_arena_is_owner(const knhk_arena *a) { return is_owner(a); }

static int not_owner(const char *what) {
    _knhk_set_error("%s: the arena belongs to the thread that created it; use one arena per thread "
                    "(ThreadLocalArena)",
                    what);
    return KNHK_ERR_STATE;
}

/* ------------------------------------------------------------------ chunks */

static int thp_available(void) {
#ifdef MADV_HUGEPAGE
    static _Atomic int cached = -1;
    int v = atomic_load_explicit(&cached, memory_order_relaxed);
    if (v >= 0) return v;
    v = 0;
    FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    if (f != NULL) {
        char buf[128] = {0};
        if (fgets(buf, sizeof buf, f) != NULL) v = strstr(buf, "[never]") == NULL;
        fclose(f);
    }
    atomic_store_explicit(&cached, v, memory_order_relaxed);
    return v;
#else
    return 0;
#endif
}

int knhk_arena_huge_pages_available(void) { return thp_available(); }

/* Hint the kernel to back a large chunk with huge pages. Advisory: a refusal
   costs only the hint, and shows as a chunk not counted in huge_page_chunks. */
static void advise_huge(knhk_arena *a, chunk *c) {
#ifdef MADV_HUGEPAGE
    if (!a->huge_pages || c->size < KNHK_ARENA_HUGE_MIN || !thp_available()) return;
    uintptr_t start = ((uintptr_t)c + 4095) & ~(uintptr_t)4095;
    uintptr_t stop = ((uintptr_t)c + c->size) & ~(uintptr_t)4095;
    if (stop > start && madvise((void *)start, stop - start, MADV_HUGEPAGE) == 0) a->huge_page_chunks++;
#else
    (void)a;
    (void)c;
#endif
}

/* Put the chunk's whole pages under the arena's NUMA policy. A refusal is
   counted (knhk_arena_numa_counts), not fatal: the memory is still good. */
static void place_numa(knhk_arena *a, chunk *c) {
    if (a->numa_mode == KNHK_NUMA_DEFAULT) return;
    uintptr_t start = ((uintptr_t)c + 4095) & ~(uintptr_t)4095;
    uintptr_t stop = ((uintptr_t)c + c->size) & ~(uintptr_t)4095;
    if (stop <= start) return;
    if (_knhk_numa_mbind_flags((void *)start, stop - start, a->numa_mode, a->numa_words ? a->numa_mask : NULL,
                               a->numa_words, 2u /* MPOL_MF_MOVE */) == KNHK_OK)
        a->numa_placed++;
    else
        a->numa_refused++;
}

static chunk *new_chunk(knhk_arena *a, size_t size, int *status) {
    /* Large chunks are page-aligned so the huge-page hint covers all of them. */
    size_t align = size >= KNHK_ARENA_HUGE_MIN ? 4096 : CHUNK_ALIGN;
    int st = KNHK_OK;
    chunk *c = knhk_aligned_alloc(a->backend, align, size, &st);
    a->backend_calls++;
    if (c == NULL) {
        _knhk_set_error("the %s backend could not provide an arena chunk of %zu bytes", knhk_backend_name(a->backend),
                        size);
        *status = st == KNHK_OK ? KNHK_ERR_NOMEM : st;
        return NULL;
    }
    c->next = NULL;
    c->size = size;
    atomic_init(&c->live, 0);
    a->reserved += size;
    a->chunks++;
    place_numa(a, c);
    advise_huge(a, c);
    return c;
}

/* A chunk of at least min_size bytes for this batch: the first spare one
   that fits, else a new one of new_size bytes from the backend. */
static void reclaim_pinned(knhk_arena *a);

static chunk *take_chunk(knhk_arena *a, size_t min_size, size_t new_size, int *status) {
    chunk *c = NULL;
    reclaim_pinned(a);
    for (chunk **pp = &a->spare; *pp != NULL; pp = &(*pp)->next) {
        if ((*pp)->size >= min_size) {
            c = *pp;
            *pp = c->next;
            break;
        }
    }
    if (c == NULL && (c = new_chunk(a, new_size, status)) == NULL) return NULL;
    c->next = NULL;
    *a->taken_tail = c;
    a->taken_tail = &c->next;
    return c;
}

static void release_list(knhk_arena *a, chunk *c) {
    while (c != NULL) {
        chunk *next = c->next;
        a->reserved -= c->size;
        a->chunks--;
        knhk_free(a->backend, c);
        a->backend_calls++;
        c = next;
    }
}

static void destroy(knhk_arena *a) {
    release_list(a, a->taken);
    release_list(a, a->spare);
    release_list(a, a->pinned);
    free(a);
}

/* Owner only: pinned chunks whose blocks are all gone become spares. */
static void reclaim_pinned(knhk_arena *a) {
    chunk **pp = &a->pinned;
    while (*pp != NULL) {
        chunk *c = *pp;
        if (atomic_load_explicit(&c->live, memory_order_acquire) == 0) {
            *pp = c->next;
            a->pinned_chunks--;
            a->pinned_bytes -= c->size;
            c->next = a->spare;
            a->spare = c;
        } else {
            pp = &c->next;
        }
    }
}

/* Owner only: move the chunks of *list that hold live blocks to the pinned list. */
static void pin_live(knhk_arena *a, chunk **list) {
    chunk **pp = list;
    while (*pp != NULL) {
        chunk *c = *pp;
        if (atomic_load_explicit(&c->live, memory_order_acquire) != 0) {
            *pp = c->next;
            c->next = a->pinned;
            a->pinned = c;
            a->pinned_chunks++;
            a->pinned_bytes += c->size;
        } else {
            pp = &c->next;
        }
    }
}

/* Owner only: give spares beyond `keep` bytes back to the backend (the
   largest first kept: they serve any request the small ones do). */
static void trim_spares(knhk_arena *a, uint64_t keep) {
    uint64_t have = 0;
    for (chunk *c = a->spare; c != NULL; c = c->next) have += c->size;
    while (have > keep && a->spare != NULL) {
        chunk **smallest = &a->spare;
        for (chunk **pp = &a->spare; *pp != NULL; pp = &(*pp)->next)
            if ((*pp)->size < (*smallest)->size) smallest = pp;
        chunk *c = *smallest;
        *smallest = c->next;
        have -= c->size;
        c->next = NULL;
        release_list(a, c);
    }
}

static void unref(knhk_arena *a) {
    if (atomic_fetch_sub_explicit(&a->refs, 1, memory_order_acq_rel) == 1) destroy(a);
}

static inline uintptr_t data_start(const chunk *c) { return (uintptr_t)c + CHUNK_HEADER; }

static inline uint64_t bytes_used(const knhk_arena *a) {
    return a->used_before + (a->current ? a->head.cur - data_start(a->current) : 0);
}

static inline void note_high_water(knhk_arena *a) {
    uint64_t u = bytes_used(a);
    if (u > a->batch_high) {
        a->batch_high = u;
        if (u > a->high_water) a->high_water = u;
    }
}

/* ------------------------------------------------------------------ creation */

static bool chunk_size_ok(size_t n) { return n >= KNHK_ARENA_MIN_CHUNK && n <= KNHK_ARENA_MAX_CHUNK; }

int knhk_arena_create(const knhk_backend *b, size_t chunk_size, size_t max_chunk_size, int huge_pages,
                      knhk_arena **out) {
    if (out != NULL) *out = NULL;
    if (b == NULL || out == NULL) {
        _knhk_set_error("knhk_arena_create needs a backend and an out pointer");
        return KNHK_ERR_INVALID;
    }
    if (!chunk_size_ok(chunk_size) || !chunk_size_ok(max_chunk_size) || max_chunk_size < chunk_size) {
        _knhk_set_error("arena chunk_size %zu and max_chunk_size %zu must lie in [%d, %zu] with "
                        "chunk_size <= max_chunk_size",
                        chunk_size, max_chunk_size, KNHK_ARENA_MIN_CHUNK, KNHK_ARENA_MAX_CHUNK);
        return KNHK_ERR_INVALID;
    }
    knhk_arena *a = calloc(1, sizeof *a);
    if (a == NULL) {
        _knhk_set_error("no memory for an arena");
        return KNHK_ERR_NOMEM;
    }
    a->taken_tail = &a->taken;
    a->backend = b;
    a->owner = pthread_self();
    /* Multiples of the chunk alignment, so every chunk end is 16-aligned as the cursor is. */
    chunk_size = (chunk_size + CHUNK_ALIGN - 1) & ~(size_t)(CHUNK_ALIGN - 1);
    max_chunk_size = (max_chunk_size + CHUNK_ALIGN - 1) & ~(size_t)(CHUNK_ALIGN - 1);
    a->chunk_size = a->next_chunk_size = chunk_size;
    a->max_chunk_size = max_chunk_size;
    a->huge_pages = huge_pages != 0;
    atomic_init(&a->closed, 0);
    atomic_init(&a->refs, 1);
    atomic_init(&a->live, 0);
    *out = a;
    return KNHK_OK;
}

void knhk_arena_close(knhk_arena *a) {
    if (a == NULL) return;
    /* Only the owner may touch the cursor; any later allocation then takes
       the slow path, which sees the flag. Another thread sets the flag only. */
    if (is_owner(a)) {
        a->head.end = a->head.cur;
        /* Chunks no live block uses go back now; the rest when their blocks go. */
        a->current = NULL;
        a->head.cur = a->head.end = 0;
        pin_live(a, &a->taken);
        release_list(a, a->taken);
        a->taken = NULL;
        a->taken_tail = &a->taken;
        reclaim_pinned(a);
        release_list(a, a->spare);
        a->spare = NULL;
    }
    atomic_store_explicit(&a->closed, 1, memory_order_relaxed);
    unref(a);
}

/* ------------------------------------------------------------------ allocation */

static bool request_ok(size_t size, size_t align, int *status) {
    if (_knhk_unlikely(!_knhk_is_pow2(align) || align > KNHK_MAX_ALIGN)) {
        _knhk_set_error("arena alignment must be a power of two up to %d, got %zu", KNHK_MAX_ALIGN, align);
        *status = KNHK_ERR_INVALID;
        return false;
    }
    if (_knhk_unlikely(size > KNHK_ARENA_MAX_REQUEST)) {
        _knhk_set_error("arena request of %zu bytes exceeds the limit of %zu bytes", size, KNHK_ARENA_MAX_REQUEST);
        *status = KNHK_ERR_INVALID;
        return false;
    }
    return true;
}

/* The current chunk has no room (or there is none): take another chunk and
   bump from it. `pre` bytes must precede the aligned block inside the chunk
   (a counted block's header). request_ok bounds the sizes: no sum overflows. */
static __attribute__((noinline)) void *alloc_slow(knhk_arena *a, size_t size, size_t align, size_t pre, int *status) {
    if (atomic_load_explicit(&a->closed, memory_order_relaxed)) {
        _knhk_set_error("allocation from a closed arena");
        *status = KNHK_ERR_STATE;
        return NULL;
    }
    /* data_start(c) is CHUNK_ALIGN-aligned, but data_start(c) + pre (a block
       header of 16) only 16-aligned: reaching the next `align` boundary can
       take align - 16 bytes, not align - CHUNK_ALIGN. The smaller slack let a
       4096-aligned block run 48 bytes past its chunk when the chunk sat at
       4032 mod 4096 (glibc then aborted: "free(): invalid next size"). */
    size_t need = CHUNK_HEADER + pre + size + (align > KNHK_DEFAULT_ALIGN ? align - KNHK_DEFAULT_ALIGN : 0);
    need = (need + CHUNK_ALIGN - 1) & ~(size_t)(CHUNK_ALIGN - 1);
    bool own = need > a->next_chunk_size / 4;
    uint64_t calls = a->backend_calls;
    chunk *c = take_chunk(a, need, own ? need : a->next_chunk_size, status);
    if (c == NULL) return NULL;
    uintptr_t p = (data_start(c) + pre + (align - 1)) & ~(uintptr_t)(align - 1);
    _knhk_assert(p + size <= (uintptr_t)c + c->size);
    a->last_taken = c;
    if (own) {
        /* A chunk of its own: the current chunk keeps its room. */
        a->used_before += p + size - data_start(c);
    } else {
        /* A new chunk: the next one is twice as large, up to the cap -- unless
           it is a batch's first chunk while chunks are pinned: taken because
           the spares are in use, it says nothing of the batch's size. */
        if (a->backend_calls != calls && (a->current != NULL || a->pinned == NULL)) {
            size_t grown = a->next_chunk_size * 2;
            a->next_chunk_size = grown < a->max_chunk_size ? grown : a->max_chunk_size;
        }
        if (a->current != NULL) a->used_before += a->head.cur - data_start(a->current);
        a->current = c;
        a->head.cur = round16(p + size);
        a->head.end = (uintptr_t)c + c->size;
    }
    a->head.allocations++;
    a->head.bytes_requested += size;
    note_high_water(a);
    return (void *)p;
}

void *knhk_arena_alloc(knhk_arena *a, size_t size, size_t align, int *status) {
    int st_local;
    if (status == NULL) status = &st_local;
    if (size == 0) size = 1;
    if (!request_ok(size, align, status)) return NULL;
    void *p = _knhk_arena_bump(&a->head, size, align);
    if (_knhk_likely(p != NULL)) {
        *status = KNHK_OK;
        return p;
    }
    p = alloc_slow(a, size, align, 0, status);
    if (p != NULL) *status = KNHK_OK;
    return p;
}

static inline block_header *header_of(void *p) { return (block_header *)((char *)p - sizeof(block_header)); }

static inline chunk *chunk_of(const block_header *h) {
    uint64_t off = ((uint64_t)h->chunk_off_hi << 32) | h->chunk_off_lo;
    return (chunk *)((uintptr_t)h - (off << 4));
}

void *knhk_arena_block_alloc(knhk_arena *a, size_t size, size_t align, int *status) {
    int st_local;
    if (status == NULL) status = &st_local;
    if (_knhk_unlikely(!is_owner(a))) {
        *status = not_owner("arena allocation");
        return NULL;
    }
    if (size == 0) size = 1;
    if (!request_ok(size, align, status)) return NULL;
    if (align < KNHK_DEFAULT_ALIGN) align = KNHK_DEFAULT_ALIGN;
    /* The fast path with room for the header in front of the block. */
    uintptr_t cur = a->head.cur, end = a->head.end;
    uintptr_t p = (cur + sizeof(block_header) + (align - 1)) & ~(uintptr_t)(align - 1);
    chunk *c;
    if (_knhk_likely(cur != 0 && p <= end && size <= end - p)) {
        a->head.cur = round16(p + size);
        a->head.allocations++;
        a->head.bytes_requested += size;
        c = a->current;
    } else {
        p = (uintptr_t)alloc_slow(a, size, align, sizeof(block_header), status);
        if (p == 0) return NULL;
        c = a->last_taken;
    }
    block_header *h = header_of((void *)p);
    uint64_t off = ((uintptr_t)h - (uintptr_t)c) >> 4;
    h->size = size;
    h->align_log2 = (uint64_t)__builtin_ctzll(align);
    h->chunk_off_hi = off >> 32;
    h->chunk_off_lo = (uint32_t)off;
    h->magic = BLOCK_MAGIC;
    atomic_fetch_add_explicit(&c->live, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&a->refs, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&a->live, 1, memory_order_relaxed);
    *status = KNHK_OK;
    return (void *)p;
}

size_t _knhk_arena_block_size(const void *ptr) {
    const block_header *h = (const block_header *)((const char *)ptr - sizeof(block_header));
    return h->magic == BLOCK_MAGIC ? (size_t)h->size : 0;
}

void knhk_arena_block_free(knhk_arena *a, void *ptr) {
    if (ptr == NULL) return;
    block_header *h = header_of(ptr);
    if (_knhk_unlikely(h->magic != BLOCK_MAGIC)) return; /* not live: never count a block twice */
    h->magic = 0;
    chunk *c = chunk_of(h);
    if (is_owner(a) && a->current == c && round16((uintptr_t)ptr + h->size) == a->head.cur) {
        /* The last block bumped: give its bytes back, so temporaries made and
           dropped in a loop reuse the same memory. */
        note_high_water(a);
        a->head.cur = (uintptr_t)h;
    }
    /* Release: the owner that sees the chunk's count at 0 (acquire) reuses it. */
    atomic_fetch_sub_explicit(&c->live, 1, memory_order_release);
    atomic_fetch_sub_explicit(&a->live, 1, memory_order_relaxed);
    unref(a);
}

void *knhk_arena_block_realloc(knhk_arena *a, void *ptr, size_t size, int *status) {
    int st_local;
    if (status == NULL) status = &st_local;
    if (ptr == NULL) return knhk_arena_block_alloc(a, size, KNHK_DEFAULT_ALIGN, status);
    if (_knhk_unlikely(!is_owner(a))) {
        *status = not_owner("arena reallocation");
        return NULL;
    }
    if (atomic_load_explicit(&a->closed, memory_order_relaxed)) {
        _knhk_set_error("reallocation in a closed arena");
        *status = KNHK_ERR_STATE;
        return NULL;
    }
    block_header *h = header_of(ptr);
    if (h->magic != BLOCK_MAGIC) {
        _knhk_set_error("realloc of a pointer that is not a live block of this arena");
        *status = KNHK_ERR_INVALID;
        return NULL;
    }
    if (size == 0) size = 1;
    if (!request_ok(size, KNHK_DEFAULT_ALIGN, status)) return NULL;
    uintptr_t p = (uintptr_t)ptr;
    bool last = a->current != NULL && a->current == chunk_of(h) && round16(p + h->size) == a->head.cur;
    if (size <= h->size || (last && size <= a->head.end - p)) {
        /* In place: a shrink, or growth of the last block into the room after it. */
        if (last) {
            note_high_water(a);
            a->head.cur = round16(p + size);
        }
        if (size > h->size) a->head.bytes_requested += size - h->size;
        h->size = size;
        a->reallocations++;
        *status = KNHK_OK;
        return ptr;
    }
    void *q = knhk_arena_block_alloc(a, size, (size_t)1 << h->align_log2, status);
    if (q == NULL) return NULL;
    memcpy(q, ptr, h->size);
    a->reallocations++;
    knhk_arena_block_free(a, ptr); /* q holds a reference: the arena stays */
    return q;
}

/* ------------------------------------------------------------------ reset and statistics */

int knhk_arena_reset(knhk_arena *a) {
    if (!is_owner(a)) return not_owner("arena reset");
    if (atomic_load_explicit(&a->closed, memory_order_relaxed)) {
        _knhk_set_error("reset of a closed arena");
        return KNHK_ERR_STATE;
    }
    note_high_water(a);
    /* The batch's peak, not what is in use now: freed last blocks gave bytes back. */
    uint64_t used = a->batch_high;
    size_t ntaken = 0;
    /* Chunks with live blocks are set aside (pinned) with their bytes as they
       are; pinned chunks whose blocks have all gone come back as spares. */
    a->current = NULL;
    pin_live(a, &a->taken);
    reclaim_pinned(a);
    for (chunk *c = a->taken; c != NULL; c = c->next) ntaken++;
    /* Room for the batch plus an eighth: the same batch may pad differently
       in one chunk than it did across several. */
    uint64_t target = (used + used / 8 + CHUNK_HEADER + 4095) & ~(uint64_t)4095;
    if (target < a->chunk_size) target = a->chunk_size;
    chunk *taken = a->taken;
    a->taken = NULL;
    a->taken_tail = &a->taken;
    a->last_taken = NULL;
    if (ntaken > 1 && target <= a->max_chunk_size) {
        release_list(a, taken);
        release_list(a, a->spare);
        a->spare = NULL;
        int st;
        /* On failure the arena simply starts the next batch with no chunk. */
        a->spare = new_chunk(a, (size_t)target, &st);
    } else if (taken != NULL) {
        chunk *last = taken;
        while (last->next != NULL) last = last->next;
        last->next = a->spare;
        a->spare = taken;
    }
    /* What the next batch may need, twice over; the rest goes back. */
    uint64_t keep = RETAIN_FACTOR * (target > a->next_chunk_size ? target : a->next_chunk_size);
    trim_spares(a, keep);
    a->head.cur = a->head.end = 0;
    a->used_before = 0;
    a->batch_high = 0;
    a->resets++;
    return KNHK_OK;
}

int knhk_arena_stats_get(knhk_arena *a, knhk_arena_stats *out) {
    if (!is_owner(a)) return not_owner("arena statistics");
    note_high_water(a);
    reclaim_pinned(a);
    knhk_arena_stats st = {
        .allocations = a->head.allocations,
        .reallocations = a->reallocations,
        .bytes_requested = a->head.bytes_requested,
        .bytes_reserved = a->reserved,
        .bytes_used = bytes_used(a),
        .high_water = a->high_water,
        .chunks = a->chunks,
        .backend_calls = a->backend_calls,
        .live_blocks = (uint64_t)atomic_load_explicit(&a->live, memory_order_relaxed),
        .resets = a->resets,
        .huge_page_chunks = a->huge_page_chunks,
        .next_chunk_size = a->next_chunk_size,
        .pinned_chunks = a->pinned_chunks,
        .pinned_bytes = a->pinned_bytes,
    };
    *out = st;
    return KNHK_OK;
}

/* ------------------------------------------------------------------ hot path */

void knhk_arena_hotop_alloc(void *ctx, uint64_t iterations) {
    knhk_arena *a = ctx;
    for (uint64_t i = 0; i < iterations; i++) {
        /* The inline fast path, as a caller in this library would use it. */
        void *p = _knhk_arena_bump(&a->head, 64, 16);
        if (_knhk_unlikely(p == NULL)) {
            /* The chunk is full: start the next batch in it (amortised over
               a chunk's worth of allocations). */
            if (knhk_arena_reset(a) != KNHK_OK || (p = knhk_arena_alloc(a, 64, 16, NULL)) == NULL) return;
        }
        /* Keep the allocation from being folded away. */
        __asm__ volatile("" : : "r"(p) : "memory");
    }
}

/* ------------------------------------------------------------------ references for other holders */

int knhk_arena_retain(knhk_arena *a) {
    if (!is_owner(a)) return not_owner("arena numpy scope");
    if (atomic_load_explicit(&a->closed, memory_order_relaxed)) {
        _knhk_set_error("numpy scope on a closed arena");
        return KNHK_ERR_STATE;
    }
    atomic_fetch_add_explicit(&a->refs, 1, memory_order_relaxed);
    return KNHK_OK;
}

void knhk_arena_release(knhk_arena *a) { unref(a); }

/* ------------------------------------------------------------------ NUMA placement */

int knhk_arena_set_numa(knhk_arena *a, const knhk_numa_spec *spec) {
    if (!is_owner(a)) return not_owner("arena NUMA placement");
    if (spec == NULL || spec->mode == KNHK_NUMA_DEFAULT) {
        a->numa_mode = KNHK_NUMA_DEFAULT;
        a->numa_words = 0;
        return KNHK_OK;
    }
    if (spec->mode < KNHK_NUMA_DEFAULT || spec->mode > KNHK_NUMA_LOCAL || spec->mask_words > KNHK_NUMA_MAX_NODES / 64 ||
        (spec->mask_words && spec->mask == NULL)) {
        _knhk_set_error("arena NUMA placement: mode %d with %zu mask words is not a placement", spec->mode,
                        spec->mask_words);
        return KNHK_ERR_INVALID;
    }
    memset(a->numa_mask, 0, sizeof a->numa_mask);
    if (spec->mask_words) memcpy(a->numa_mask, spec->mask, spec->mask_words * sizeof(uint64_t));
    a->numa_words = spec->mask_words;
    a->numa_mode = spec->mode;
    return KNHK_OK;
}

int knhk_arena_numa_counts(knhk_arena *a, uint64_t *placed, uint64_t *refused) {
    if (!is_owner(a)) return not_owner("arena NUMA counts");
    *placed = a->numa_placed;
    *refused = a->numa_refused;
    return KNHK_OK;
}
