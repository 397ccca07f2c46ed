/* backend.c -- allocator backends (system, jemalloc, mimalloc) and their statistics.
 *
 * A backend is a table of functions found at run time: libc's for system, and
 * dlopen'd libjemalloc.so.2 / libmimalloc.so.2 for the others. Libraries are
 * loaded once and never unloaded, so a block stays valid after the selected
 * backend changes; it must only go back to the backend that allocated it.
 *
 * Statistics live in per-thread slots, each on its own cache line. The owning
 * thread updates its slot with a relaxed load and store (no lock prefix, no
 * shared line), a reader sums all slots. When more threads exist than slots,
 * the late ones share one overflow slot and update it with atomic adds.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <gnu/libc-version.h>
#include <limits.h>
#include <link.h>
#include <malloc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <strings.h>

#include "knhk_internal.h"

#define STAT_SLOTS 64
#define OVERFLOW_SLOT (STAT_SLOTS - 1)

enum { SLOT_FREE = 0, SLOT_OWNED = 1, SLOT_SHARED = 2 };

typedef struct __attribute__((aligned(KNHK_CACHE_LINE))) {
    _Atomic uint64_t allocations;
    _Atomic uint64_t frees;
    _Atomic uint64_t reallocations;
    _Atomic uint64_t bytes_allocated;
    _Atomic int64_t live;
    _Atomic int64_t own_peak;
    _Atomic int state;
} stat_slot;

struct knhk_backend {
    int id;
    const char *name;
    const char *soname;
    char path[PATH_MAX];
    char version[64];
    void *handle;
    _knhk_once once;

    void *(*fn_malloc)(size_t);
    void *(*fn_calloc)(size_t, size_t);
    void *(*fn_realloc)(void *, size_t);
    void (*fn_free)(void *);
    size_t (*fn_usable)(void *);
    /* aligned calls differ in argument order per library: see the wrappers */
    void *(*fn_aligned)(size_t, size_t);
    void *(*fn_realloc_aligned)(void *, size_t, size_t);

    /* jemalloc */
    int (*je_mallctl)(const char *, void *, size_t *, void *, size_t);
    void *(*je_rallocx)(void *, size_t, int);
    /* mimalloc */
    void (*mi_process_info)(size_t *, size_t *, size_t *, size_t *, size_t *, size_t *, size_t *, size_t *);
    void (*mi_collect)(bool);
    int (*mi_version)(void);

    _Atomic int slots_used;
    _Atomic int64_t peak;
    _Atomic uint64_t retired_allocations, retired_frees, retired_reallocations, retired_bytes;
    _Atomic int64_t retired_live;
    stat_slot slots[STAT_SLOTS];
};

static knhk_backend backends[KNHK_BACKEND_COUNT] = {
    [KNHK_BACKEND_SYSTEM] = {.id = KNHK_BACKEND_SYSTEM, .name = "system", .soname = NULL},
    [KNHK_BACKEND_JEMALLOC] = {.id = KNHK_BACKEND_JEMALLOC, .name = "jemalloc", .soname = "libjemalloc.so.2"},
    [KNHK_BACKEND_MIMALLOC] = {.id = KNHK_BACKEND_MIMALLOC, .name = "mimalloc", .soname = "libmimalloc.so.2"},
};

/* ------------------------------------------------------------------ loading */

/* Wrappers that give every library the (align, size) / (ptr, size, align) order. */
static void *(*mi_malloc_aligned_p)(size_t, size_t);
static void *mi_aligned(size_t align, size_t size) { return mi_malloc_aligned_p(size, align); }

static void *(*je_rallocx_p)(void *, size_t, int);
static void *je_realloc_aligned_w(void *p, size_t size, size_t align) {
    /* MALLOCX_ALIGN(a) is log2(a) in the low bits of the flags. */
    return je_rallocx_p(p, size, ffs((int)align) - 1);
}

static size_t libc_usable(void *p) { return malloc_usable_size(p); }

typedef struct {
    knhk_backend *b;
    const char *library;
    char *errbuf;
    size_t errlen;
} load_args;

static void *need_symbol(load_args *a, const char *sym, int *missing) {
    void *p = dlsym(a->b->handle, sym);
    if (p == NULL && !*missing) {
        char msg[256];
        snprintf(msg, sizeof msg, "%s has no symbol %s", a->library, sym);
        _knhk_copy_message(a->errbuf, a->errlen, msg);
        *missing = 1;
    }
    return p;
}

static void library_path(knhk_backend *b, const char *library) {
    struct link_map *lm = NULL;
    if (b->handle != NULL && dlinfo(b->handle, RTLD_DI_LINKMAP, &lm) == 0 && lm != NULL && lm->l_name[0])
        _knhk_copy_message(b->path, sizeof b->path, lm->l_name);
    else
        _knhk_copy_message(b->path, sizeof b->path, library);
}

static int load_backend(void *arg) {
    load_args *a = arg;
    knhk_backend *b = a->b;
    int missing = 0;

    if (b->id == KNHK_BACKEND_SYSTEM) {
        b->fn_malloc = malloc;
        b->fn_calloc = calloc;
        b->fn_realloc = realloc;
        b->fn_free = free;
        b->fn_usable = libc_usable;
        b->fn_aligned = aligned_alloc;
        b->fn_realloc_aligned = NULL; /* libc has none: allocate, copy, free */
        Dl_info info;
        if (dladdr((void *)malloc, &info) != 0 && info.dli_fname != NULL)
            _knhk_copy_message(b->path, sizeof b->path, info.dli_fname);
        snprintf(b->version, sizeof b->version, "glibc %s", gnu_get_libc_version());
    } else {
        dlerror();
        b->handle = _knhk_dlopen(a->library, RTLD_NOW | RTLD_LOCAL);
        if (b->handle == NULL) {
            const char *e = dlerror();
            _knhk_copy_message(a->errbuf, a->errlen, e ? e : "dlopen failed");
            return KNHK_ERR_UNAVAILABLE;
        }
        if (b->id == KNHK_BACKEND_JEMALLOC) {
            b->fn_malloc = need_symbol(a, "malloc", &missing);
            b->fn_calloc = need_symbol(a, "calloc", &missing);
            b->fn_realloc = need_symbol(a, "realloc", &missing);
            b->fn_free = need_symbol(a, "free", &missing);
            b->fn_usable = need_symbol(a, "malloc_usable_size", &missing);
            b->fn_aligned = need_symbol(a, "aligned_alloc", &missing);
            b->je_mallctl = need_symbol(a, "mallctl", &missing);
            b->je_rallocx = need_symbol(a, "rallocx", &missing);
            je_rallocx_p = b->je_rallocx;
            b->fn_realloc_aligned = je_realloc_aligned_w;
            if (!missing) {
                const char *v = NULL;
                size_t sz = sizeof v;
                if (b->je_mallctl("version", &v, &sz, NULL, 0) == 0 && v != NULL)
                    _knhk_copy_message(b->version, sizeof b->version, v);
            }
        } else {
            b->fn_malloc = need_symbol(a, "mi_malloc", &missing);
            b->fn_calloc = need_symbol(a, "mi_calloc", &missing);
            b->fn_realloc = need_symbol(a, "mi_realloc", &missing);
            b->fn_free = need_symbol(a, "mi_free", &missing);
            b->fn_usable = need_symbol(a, "mi_usable_size", &missing);
            mi_malloc_aligned_p = need_symbol(a, "mi_malloc_aligned", &missing);
            b->fn_aligned = mi_aligned;
            /* mi_realloc_aligned keeps the old block's offset (mimalloc issue
               #603), so aligned reallocs take the allocate-copy-free path. */
            b->fn_realloc_aligned = NULL;
            b->mi_process_info = need_symbol(a, "mi_process_info", &missing);
            b->mi_collect = need_symbol(a, "mi_collect", &missing);
            b->mi_version = need_symbol(a, "mi_version", &missing);
            if (!missing) {
                int v = b->mi_version(); /* e.g. 209 for 2.0.9 */
                snprintf(b->version, sizeof b->version, "%d.%d.%d", v / 100, (v / 10) % 10, v % 10);
            }
        }
        if (missing) return KNHK_ERR_UNAVAILABLE; /* the handle stays: unloading is never safe */
        library_path(b, a->library);
    }
    atomic_store_explicit(&b->slots[OVERFLOW_SLOT].state, SLOT_SHARED, memory_order_relaxed);
    return KNHK_OK;
}

int knhk_backend_load(int id, const char *library, const knhk_backend **out, char *errbuf, size_t errlen) {
    if (out != NULL) *out = NULL;
    if (id < 0 || id >= KNHK_BACKEND_COUNT) {
        char msg[96];
        snprintf(msg, sizeof msg, "backend id %d is not in [0, %d)", id, KNHK_BACKEND_COUNT);
        _knhk_copy_message(errbuf, errlen, msg);
        return KNHK_ERR_INVALID;
    }
    knhk_backend *b = &backends[id];
    load_args a = {b, library != NULL ? library : b->soname, errbuf, errlen};
    int rc = _knhk_once_run(&b->once, load_backend, &a);
    if (rc == KNHK_OK && out != NULL) *out = b;
    return rc;
}

const knhk_backend *knhk_backend_get(int id) {
    if (id < 0 || id >= KNHK_BACKEND_COUNT) return NULL;
    return _knhk_once_ready(&backends[id].once) ? &backends[id] : NULL;
}

int knhk_backend_id_of(const knhk_backend *b) { return b->id; }
const char *knhk_backend_name(const knhk_backend *b) { return b->name; }
const char *knhk_backend_path(const knhk_backend *b) { return b->path; }
const char *knhk_backend_version(const knhk_backend *b) { return b->version; }

/* ------------------------------------------------------------------ statistics */

static pthread_key_t slot_key;
static _knhk_once slot_key_once;
static __thread stat_slot *tls_slot[KNHK_BACKEND_COUNT];

/* Runs in an exiting thread: fold its slots into the retired totals and free
   them for the next thread. Fields are zeroed before they are added to the
   totals, so a concurrent reader may briefly miss them but never counts twice. */
static void release_slots(void *unused) {
    (void)unused;
    for (int id = 0; id < KNHK_BACKEND_COUNT; id++) {
        stat_slot *s = tls_slot[id];
        if (s == NULL) continue;
        tls_slot[id] = NULL;
        if (atomic_load_explicit(&s->state, memory_order_relaxed) == SLOT_SHARED) continue;
        knhk_backend *b = &backends[id];
        uint64_t al = atomic_exchange_explicit(&s->allocations, 0, memory_order_relaxed);
        uint64_t fr = atomic_exchange_explicit(&s->frees, 0, memory_order_relaxed);
        uint64_t re = atomic_exchange_explicit(&s->reallocations, 0, memory_order_relaxed);
        uint64_t by = atomic_exchange_explicit(&s->bytes_allocated, 0, memory_order_relaxed);
        int64_t lv = atomic_exchange_explicit(&s->live, 0, memory_order_relaxed);
        atomic_store_explicit(&s->own_peak, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&b->retired_allocations, al, memory_order_relaxed);
        atomic_fetch_add_explicit(&b->retired_frees, fr, memory_order_relaxed);
        atomic_fetch_add_explicit(&b->retired_reallocations, re, memory_order_relaxed);
        atomic_fetch_add_explicit(&b->retired_bytes, by, memory_order_relaxed);
        atomic_fetch_add_explicit(&b->retired_live, lv, memory_order_relaxed);
        atomic_store_explicit(&s->state, SLOT_FREE, memory_order_release);
    }
}

static int make_slot_key(void *unused) {
    (void)unused;
    return pthread_key_create(&slot_key, release_slots) == 0 ? KNHK_OK : KNHK_ERR_NOMEM;
}

static void raise_used(knhk_backend *b, int n) {
    int used = atomic_load_explicit(&b->slots_used, memory_order_relaxed);
    while (used < n && !atomic_compare_exchange_weak_explicit(&b->slots_used, &used, n, memory_order_release,
                                                              memory_order_relaxed)) {
    }
}

static __attribute__((noinline)) stat_slot *claim_slot(knhk_backend *b) {
    stat_slot *s = &b->slots[OVERFLOW_SLOT];
    /* Without a key the slot could not be handed back at thread exit: share. */
    if (_knhk_once_run(&slot_key_once, make_slot_key, NULL) == KNHK_OK) {
        for (int i = 0; i < OVERFLOW_SLOT; i++) {
            int expected = SLOT_FREE;
            if (atomic_compare_exchange_strong_explicit(&b->slots[i].state, &expected, SLOT_OWNED, memory_order_acquire,
                                                        memory_order_relaxed)) {
                s = &b->slots[i];
                pthread_setspecific(slot_key, (void *)1); /* non-NULL, so the destructor runs */
                raise_used(b, i + 1);
                break;
            }
        }
    }
    if (s == &b->slots[OVERFLOW_SLOT]) raise_used(b, STAT_SLOTS);
    tls_slot[b->id] = s;
    return s;
}

static inline stat_slot *my_slot(knhk_backend *b) {
    stat_slot *s = tls_slot[b->id];
    return _knhk_likely(s != NULL) ? s : claim_slot(b);
}

/* The owner is the only writer of an owned slot: a plain load and store
   suffices. The shared overflow slot needs the atomic add. */
#define SLOT_ADD(s, field, v)                                                                                 \
    (_knhk_unlikely(atomic_load_explicit(&(s)->state, memory_order_relaxed) == SLOT_SHARED)                   \
         ? atomic_fetch_add_explicit(&(s)->field, (v), memory_order_relaxed) + (v)                            \
         : (atomic_store_explicit(&(s)->field, atomic_load_explicit(&(s)->field, memory_order_relaxed) + (v), \
                                  memory_order_relaxed),                                                      \
            atomic_load_explicit(&(s)->field, memory_order_relaxed)))

static int64_t total_live(knhk_backend *b) {
    int used = atomic_load_explicit(&b->slots_used, memory_order_acquire);
    int64_t live = atomic_load_explicit(&b->retired_live, memory_order_relaxed);
    for (int i = 0; i < used; i++) live += atomic_load_explicit(&b->slots[i].live, memory_order_relaxed);
    return live;
}

/* A new high for this thread may be a new high for the process: sum and
   record. A process-wide high reached while every thread stays under its own
   high is not seen, hence "lower bound across threads". */
static __attribute__((noinline)) void note_peak(knhk_backend *b, stat_slot *s, int64_t live) {
    atomic_store_explicit(&s->own_peak, live, memory_order_relaxed);
    int64_t total = total_live(b);
    int64_t p = atomic_load_explicit(&b->peak, memory_order_relaxed);
    while (total > p &&
           !atomic_compare_exchange_weak_explicit(&b->peak, &p, total, memory_order_relaxed, memory_order_relaxed)) {
    }
}

static inline void account_alloc(knhk_backend *b, void *p) {
    stat_slot *s = my_slot(b);
    uint64_t n = b->fn_usable(p);
    SLOT_ADD(s, allocations, 1);
    SLOT_ADD(s, bytes_allocated, n);
    int64_t live = SLOT_ADD(s, live, (int64_t)n);
    if (_knhk_unlikely(live > atomic_load_explicit(&s->own_peak, memory_order_relaxed))) note_peak(b, s, live);
}

static inline void account_resize(knhk_backend *b, size_t old_usable, void *p) {
    stat_slot *s = my_slot(b);
    int64_t delta = (int64_t)b->fn_usable(p) - (int64_t)old_usable;
    SLOT_ADD(s, reallocations, 1);
    if (delta > 0) SLOT_ADD(s, bytes_allocated, (uint64_t)delta);
    int64_t live = SLOT_ADD(s, live, delta);
    if (delta > 0 && live > atomic_load_explicit(&s->own_peak, memory_order_relaxed)) note_peak(b, s, live);
}

void knhk_backend_stats(const knhk_backend *cb, knhk_alloc_stats *out) {
    knhk_backend *b = (knhk_backend *)cb;
    knhk_alloc_stats st = {
        .allocations = atomic_load_explicit(&b->retired_allocations, memory_order_relaxed),
        .frees = atomic_load_explicit(&b->retired_frees, memory_order_relaxed),
        .reallocations = atomic_load_explicit(&b->retired_reallocations, memory_order_relaxed),
        .bytes_allocated = atomic_load_explicit(&b->retired_bytes, memory_order_relaxed),
        .live_bytes = atomic_load_explicit(&b->retired_live, memory_order_relaxed),
    };
    int used = atomic_load_explicit(&b->slots_used, memory_order_acquire);
    for (int i = 0; i < used; i++) {
        stat_slot *s = &b->slots[i];
        st.allocations += atomic_load_explicit(&s->allocations, memory_order_relaxed);
        st.frees += atomic_load_explicit(&s->frees, memory_order_relaxed);
        st.reallocations += atomic_load_explicit(&s->reallocations, memory_order_relaxed);
        st.bytes_allocated += atomic_load_explicit(&s->bytes_allocated, memory_order_relaxed);
        st.live_bytes += atomic_load_explicit(&s->live, memory_order_relaxed);
    }
    int64_t peak = atomic_load_explicit(&b->peak, memory_order_relaxed);
    st.peak_live_bytes = peak > st.live_bytes ? peak : st.live_bytes;
    *out = st;
}

/* ------------------------------------------------------------------ allocation */

void *knhk_malloc(const knhk_backend *cb, size_t size) {
    knhk_backend *b = (knhk_backend *)cb;
    void *p = b->fn_malloc(size ? size : 1);
    if (_knhk_likely(p != NULL)) account_alloc(b, p);
    return p;
}

void *knhk_calloc(const knhk_backend *cb, size_t count, size_t size) {
    knhk_backend *b = (knhk_backend *)cb;
    size_t total;
    if (__builtin_mul_overflow(count, size, &total)) return NULL;
    void *p = total ? b->fn_calloc(count, size) : b->fn_calloc(1, 1);
    if (_knhk_likely(p != NULL)) account_alloc(b, p);
    return p;
}

static bool align_ok(size_t align) {
    return _knhk_is_pow2(align) && align >= KNHK_MIN_ALIGN && align <= KNHK_MAX_ALIGN;
}

void *knhk_aligned_alloc(const knhk_backend *cb, size_t align, size_t size, int *status) {
    knhk_backend *b = (knhk_backend *)cb;
    if (!align_ok(align)) {
        if (status) *status = KNHK_ERR_INVALID;
        return NULL;
    }
    if (size == 0) size = 1;
    /* glibc's aligned_alloc wants nothing more, but C11 asks size to be a
       multiple of align; round up so every library sees a valid request. */
    size_t rounded = (size + align - 1) & ~(align - 1);
    if (rounded < size) {
        if (status) *status = KNHK_ERR_NOMEM;
        return NULL;
    }
    void *p = b->fn_aligned(align, rounded);
    if (p != NULL && ((uintptr_t)p & (align - 1)) != 0) {
        /* mimalloc 2.0.9 (Debian 12) returns 128-aligned blocks when the size
           is a multiple of an alignment of 256..1024 (mimalloc issue #700).
           One byte more takes its correct path. Never hand out a wrong one. */
        b->fn_free(p);
        p = b->fn_aligned(align, rounded + 1);
        if (p != NULL && ((uintptr_t)p & (align - 1)) != 0) {
            b->fn_free(p);
            _knhk_set_error("%s returned a block not aligned to %zu for %zu bytes", b->name, align, size);
            if (status) *status = KNHK_ERR_UNSUPPORTED;
            return NULL;
        }
    }
    if (p == NULL) {
        if (status) *status = KNHK_ERR_NOMEM;
        return NULL;
    }
    account_alloc(b, p);
    if (status) *status = KNHK_OK;
    return p;
}

void *knhk_realloc(const knhk_backend *cb, void *ptr, size_t new_size, size_t align) {
    knhk_backend *b = (knhk_backend *)cb;
    bool aligned = align > KNHK_DEFAULT_ALIGN;
    if (aligned && !align_ok(align)) return NULL;
    if (ptr == NULL) return aligned ? knhk_aligned_alloc(cb, align, new_size, NULL) : knhk_malloc(cb, new_size);
    if (new_size == 0) new_size = 1;
    size_t old_usable = b->fn_usable(ptr);
    void *p;
    if (!aligned) {
        p = b->fn_realloc(ptr, new_size);
    } else if (b->fn_realloc_aligned != NULL) {
        p = b->fn_realloc_aligned(ptr, new_size, align);
    } else if (((uintptr_t)ptr & (align - 1)) == 0 && old_usable >= new_size) {
        return ptr; /* already aligned and large enough */
    } else {
        /* A fresh aligned block (accounted as one), the old one freed; copy no
           more than the old block holds. */
        p = knhk_aligned_alloc(cb, align, new_size, NULL);
        if (p != NULL) {
            memcpy(p, ptr, old_usable < new_size ? old_usable : new_size);
            knhk_free(cb, ptr);
            stat_slot *s = my_slot(b);
            SLOT_ADD(s, reallocations, 1);
            SLOT_ADD(s, allocations, (uint64_t)-1); /* one realloc, not an alloc and a free */
            SLOT_ADD(s, frees, (uint64_t)-1);
        }
        return p;
    }
    if (p != NULL) account_resize(b, old_usable, p);
    return p;
}

void knhk_free(const knhk_backend *cb, void *ptr) {
    if (ptr == NULL) return;
    knhk_backend *b = (knhk_backend *)cb;
    stat_slot *s = my_slot(b);
    int64_t n = (int64_t)b->fn_usable(ptr);
    SLOT_ADD(s, frees, 1);
    SLOT_ADD(s, live, -n);
    b->fn_free(ptr);
}

size_t knhk_usable_size(const knhk_backend *b, const void *ptr) { return ptr ? b->fn_usable((void *)ptr) : 0; }

void knhk_backend_hotop_malloc_free(void *ctx, uint64_t iterations) {
    const knhk_backend *b = ctx;
    for (uint64_t i = 0; i < iterations; i++) {
        void *p = knhk_malloc(b, 64);
        /* Keep the pair from being folded away. */
        __asm__ volatile("" : : "r"(p) : "memory");
        knhk_free(b, p);
    }
}

/* ------------------------------------------------------------------ the allocators' own figures */

static int64_t je_size(knhk_backend *b, const char *name) {
    size_t v = 0, sz = sizeof v;
    return b->je_mallctl(name, &v, &sz, NULL, 0) == 0 ? (int64_t)v : -1;
}

int knhk_backend_native_stats(const knhk_backend *cb, knhk_native_stats *out) {
    knhk_backend *b = (knhk_backend *)cb;
    knhk_native_stats st = {-1, -1, -1, -1, -1, -1, -1, -1};
    switch (b->id) {
    case KNHK_BACKEND_JEMALLOC: {
        /* jemalloc caches its statistics; writing "epoch" refreshes them. */
        uint64_t epoch = 1;
        size_t sz = sizeof epoch;
        b->je_mallctl("epoch", &epoch, &sz, &epoch, sz);
        st.allocated = je_size(b, "stats.allocated");
        st.active = je_size(b, "stats.active");
        st.resident = je_size(b, "stats.resident");
        st.mapped = je_size(b, "stats.mapped");
        st.metadata = je_size(b, "stats.metadata");
        st.retained = je_size(b, "stats.retained");
        break;
    }
    case KNHK_BACKEND_MIMALLOC: {
        size_t elapsed, user, sys, rss, peak_rss, commit, peak_commit, faults;
        b->mi_process_info(&elapsed, &user, &sys, &rss, &peak_rss, &commit, &peak_commit, &faults);
        st.resident = (int64_t)rss;
        st.peak_resident = (int64_t)peak_rss;
        st.mapped = (int64_t)commit;
        break;
    }
    default: {
        struct mallinfo2 mi = mallinfo2();
        st.allocated = (int64_t)mi.uordblks + (int64_t)mi.hblkhd;
        st.mapped = (int64_t)mi.arena + (int64_t)mi.hblkhd;
        st.free_bytes = (int64_t)mi.fordblks;
        break;
    }
    }
    *out = st;
    return KNHK_OK;
}

int knhk_backend_release_unused(const knhk_backend *cb) {
    knhk_backend *b = (knhk_backend *)cb;
    switch (b->id) {
    case KNHK_BACKEND_JEMALLOC: {
        /* "arena.<MALLCTL_ARENAS_ALL>.purge": every arena. */
        int rc = b->je_mallctl("arena.4096.purge", NULL, NULL, NULL, 0);
        if (rc != 0) {
            _knhk_set_error("jemalloc mallctl arena.4096.purge failed: %s", strerror(rc));
            return KNHK_ERR_UNSUPPORTED;
        }
        return KNHK_OK;
    }
    case KNHK_BACKEND_MIMALLOC: b->mi_collect(true); return KNHK_OK;
    default: malloc_trim(0); return KNHK_OK;
    }
}
