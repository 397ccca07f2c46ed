/*
 * knhk.h -- the public C API of knhk-memory.
 *
 * One header, one prefix (knhk_). The text between the KNHK_CDEF markers is
 * read verbatim by native/build_native.py as the cffi cdef, so it must stay
 * plain declarations: no preprocessor conditionals, no inline functions.
 * Internal helpers live in knhk_internal.h with the _knhk_ prefix.
 */
#ifndef KNHK_H
#define KNHK_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Constants. Every KNHK_ macro here is exported to Python by the build
   (as `#define NAME ...`, so the compiler supplies the value). */

/* Destructive-interference size: striped cells are padded to it. 128 on
   x86_64 (adjacent-line prefetch pairs lines) and aarch64, as folly and
   crossbeam's CachePadded use; 64 elsewhere. */
#if defined(__x86_64__) || defined(__aarch64__)
#define KNHK_CACHE_LINE 128
#else
#define KNHK_CACHE_LINE 64
#endif
/* Number of striped cells per statistic block (a power of two). */
#define KNHK_STRIPES 16

/* Alignment accepted by the aligned calls: powers of two in [8, 4096]. */
#define KNHK_MIN_ALIGN 8
#define KNHK_MAX_ALIGN 4096
/* Alignment every plain malloc/calloc/realloc result has. */
#define KNHK_DEFAULT_ALIGN 16

/* SIMD scans (simd.c). Largest id set knhk_simd_isin takes, and the number of
   histogram bins kept in on-stack sub-tables (more bins use one table). */
#define KNHK_SIMD_ISIN_MAX 256
#define KNHK_SIMD_HIST_FAST_BINS 1024

/* KNHK_CDEF_BEGIN */

/* ---------------------------------------------------------------- status */

typedef enum {
    KNHK_OK = 0,
    KNHK_ERR_NOMEM = 1,        /* the backend returned NULL */
    KNHK_ERR_INVALID = 2,      /* an argument is out of its documented range */
    KNHK_ERR_UNAVAILABLE = 3,  /* a library or CPU feature is not present */
    KNHK_ERR_UNSUPPORTED = 4,  /* the backend has no such operation */
    KNHK_ERR_PYTHON = 5,       /* a Python C-API call failed (numpy glue) */
    KNHK_ERR_STATE = 6         /* the object is in the wrong state for the call */
} knhk_status;

const char *knhk_status_name(int status);
const char *knhk_version(void);
/* The message of the calling thread's last failed call, or "". */
const char *knhk_last_error(void);

/* ---------------------------------------------------------------- hot-path operations */

/* A hot-path operation runs its real code path `iterations` times on the state
   behind ctx. The tick harness times batches of calls; every capability
   exports its operations with this signature, named knhk_<concern>_hotop_<op>. */
typedef void (*knhk_hotop_fn)(void *ctx, uint64_t iterations);

/* ---------------------------------------------------------------- cpu */

typedef enum {
    KNHK_CPU_SSE42 = 1,
    KNHK_CPU_POPCNT = 2,
    KNHK_CPU_AVX2 = 4,
    KNHK_CPU_BMI2 = 8,
    KNHK_CPU_AVX512F = 16,
    KNHK_CPU_AVX512BW = 32,
    KNHK_CPU_AVX512VL = 64,
    KNHK_CPU_NEON = 128
} knhk_cpu_feature;

/* Bit set of knhk_cpu_feature the CPU and the OS both support. */
uint64_t knhk_cpu_features(void);

/* ---------------------------------------------------------------- allocator backends */

typedef enum {
    KNHK_BACKEND_SYSTEM = 0,
    KNHK_BACKEND_JEMALLOC = 1,
    KNHK_BACKEND_MIMALLOC = 2,
    KNHK_BACKEND_COUNT = 3
} knhk_backend_id;

typedef struct knhk_backend knhk_backend;

/* Statistics count usable bytes (what the allocator really set aside, as
   knhk_usable_size reports), so they stay exact whatever size a caller
   remembers: numpy's realloc, for one, does not pass the old size. */
typedef struct {
    uint64_t allocations;     /* malloc, calloc, aligned alloc, and realloc(NULL, n) */
    uint64_t frees;           /* free of a non-NULL block */
    uint64_t reallocations;   /* successful realloc of a live block */
    int64_t live_bytes;       /* usable bytes of live blocks */
    int64_t peak_live_bytes;  /* exact for one thread; a lower bound across threads */
    uint64_t bytes_allocated; /* usable bytes handed out over the backend's life */
} knhk_alloc_stats;

typedef struct {
    int64_t allocated;     /* bytes the allocator reports handed out, or -1 */
    int64_t active;        /* bytes in active pages, or -1 */
    int64_t resident;      /* bytes resident for the allocator (or process RSS), or -1 */
    int64_t mapped;        /* bytes mapped or committed, or -1 */
    int64_t peak_resident; /* peak RSS / peak commit, or -1 */
} knhk_native_stats;

/* Load a backend once and for all (libraries are never unloaded, so a block
   outlives any later switch of the selected backend). `library` names the
   shared object to dlopen (NULL: libjemalloc.so.2 / libmimalloc.so.2; unused
   for system); once a backend has loaded, later calls return it whatever
   they name. On failure *out is NULL and errbuf holds the loader's message.
   Thread-safe. */
int knhk_backend_load(int id, const char *library, const knhk_backend **out, char *errbuf, size_t errlen);
/* The loaded backend, or NULL when it has not been loaded successfully. */
const knhk_backend *knhk_backend_get(int id);
int knhk_backend_id_of(const knhk_backend *b);
const char *knhk_backend_name(const knhk_backend *b);
const char *knhk_backend_path(const knhk_backend *b);
const char *knhk_backend_version(const knhk_backend *b);

/* A size of 0 is served as 1 byte, so a non-NULL result is always unique.
   Every block must go back to the backend that allocated it. */
void *knhk_malloc(const knhk_backend *b, size_t size);
/* NULL on overflow of count * size. */
void *knhk_calloc(const knhk_backend *b, size_t count, size_t size);
/* NULL with *status = KNHK_ERR_INVALID on a bad alignment, KNHK_ERR_NOMEM
   when the backend fails (status may be NULL). */
void *knhk_aligned_alloc(const knhk_backend *b, size_t align, size_t size, int *status);
/* align <= KNHK_DEFAULT_ALIGN is a plain realloc; a larger power of two up to
   KNHK_MAX_ALIGN keeps that alignment. On failure (or a bad align) the old
   block is untouched and NULL is returned. ptr NULL allocates. */
void *knhk_realloc(const knhk_backend *b, void *ptr, size_t new_size, size_t align);
void knhk_free(const knhk_backend *b, void *ptr);
size_t knhk_usable_size(const knhk_backend *b, const void *ptr);

void knhk_backend_stats(const knhk_backend *b, knhk_alloc_stats *out);
/* The allocator's own figures (jemalloc mallctl, mimalloc mi_process_info,
   glibc mallinfo2). Fields the allocator does not have are -1. */
int knhk_backend_native_stats(const knhk_backend *b, knhk_native_stats *out);
/* Return unused memory to the OS: malloc_trim, jemalloc purge, mi_collect. */
int knhk_backend_release_unused(const knhk_backend *b);

/* Hot-path operation: one 64-byte knhk_malloc + knhk_free pair.
   ctx: the const knhk_backend *. */
void knhk_backend_hotop_malloc_free(void *ctx, uint64_t iterations);

/* ---------------------------------------------------------------- numpy (NEP 49) */

/* Make `b` numpy's data-memory handler in the calling thread's context
   (numpy keeps it in a contextvar). Returns a token holding the previous
   handler, to give to knhk_numpy_handler_restore, or NULL with *status set.
   Takes the GIL itself. */
void *knhk_numpy_handler_push(const knhk_backend *b, int *status);
/* Put back the handler a token holds, and release the token. */
int knhk_numpy_handler_restore(void *token);
/* Release a token without restoring it. */
void knhk_numpy_handler_discard(void *token);
/* The handler name numpy reports for arrays allocated through `b`. */
const char *knhk_numpy_handler_name(const knhk_backend *b);

/* ---------------------------------------------------------------- simd */

/* Levels of the SIMD dispatch table. Every operation has a kernel per level;
   the scalar one is the reference the others are tested against. */
typedef enum {
    KNHK_SIMD_SCALAR = 0,
    KNHK_SIMD_AVX2 = 1,   /* AVX2 + POPCNT */
    KNHK_SIMD_AVX512 = 2, /* AVX-512 F + BW + VL (and the AVX2 level) */
    KNHK_SIMD_LEVELS = 3
} knhk_simd_level_id;

/* Fill the dispatch table once: the best level the CPU and OS support, or the
   one the environment variable KNHK_SIMD names (scalar, avx2, avx512, auto).
   KNHK_ERR_INVALID for an unknown name, KNHK_ERR_UNAVAILABLE for a level this
   machine lacks: a forced level never falls back silently. A failed init is
   retried by the next call. */
int knhk_simd_init(void);
/* The active level, or -1 when knhk_simd_init has failed. (Operations called
   in that state run the scalar kernels; the Python layer refuses them.) */
int knhk_simd_level(void);
/* Force a level at run time (tests, benchmarks). KNHK_ERR_INVALID for an id
   out of range, KNHK_ERR_UNAVAILABLE when the machine lacks it. */
int knhk_simd_set_level(int level);
/* 1 when the CPU and OS support the level, else 0. */
int knhk_simd_level_supported(int level);
/* "scalar", "avx2", "avx512", or "unknown". */
const char *knhk_simd_level_name(int level);

/* Byte patterns. Positions are offsets into hay; -1 is "not found". An empty
   needle matches at every position 0..n (as bytes.find/count do). */
int64_t knhk_simd_find(const uint8_t *hay, size_t n, const uint8_t *needle, size_t m);
int64_t knhk_simd_rfind(const uint8_t *hay, size_t n, const uint8_t *needle, size_t m);
/* Non-overlapping (bytes.count) unless overlapping is non-zero. */
uint64_t knhk_simd_count(const uint8_t *hay, size_t n, const uint8_t *needle, size_t m, int overlapping);
/* Match positions >= from, in order, up to cap of them into out. Returns the
   number written; fewer than cap means the scan is complete, otherwise resume
   with from = *next. */
size_t knhk_simd_find_all(const uint8_t *hay, size_t n, const uint8_t *needle, size_t m, int overlapping,
                          size_t from, int64_t *out, size_t cap, size_t *next);
/* k needles at once: *first is the smallest match position of any needle
   (-1 if none) and *which the needle found there (the lowest index on a tie,
   -1 if none); counts (may be NULL) receives each needle's non-overlapping
   count. */
int knhk_simd_find_many(const uint8_t *hay, size_t n, const uint8_t *const *needles, const size_t *lens, size_t k,
                        int64_t *first, int64_t *which, uint64_t *counts);

/* Id scans over arrays of unsigned integers of `width` bytes (1, 2, 4 or 8);
   any other width is KNHK_ERR_INVALID. v is compared as the element type
   (callers pass a value that fits). */
int knhk_simd_count_eq(const void *a, size_t n, int width, uint64_t v, uint64_t *count);
/* Indices i >= from with a[i] == v, up to cap of them; *written receives how
   many (fewer than cap: complete, else resume with from = *next). */
int knhk_simd_find_eq(const void *a, size_t n, int width, uint64_t v, size_t from, int64_t *out, size_t cap,
                      size_t *written, size_t *next);
/* out[i] = (a[i] == v), one byte (0 or 1) per element. */
int knhk_simd_mask_eq(const void *a, size_t n, int width, uint64_t v, uint8_t *out);
/* out[i] = (a[i] is one of set[0..k)); k <= KNHK_SIMD_ISIN_MAX. */
int knhk_simd_isin(const void *a, size_t n, int width, const uint64_t *set, size_t k, uint8_t *out);
/* counts[id] += occurrences for id < nbins (counts is zeroed first); ids >=
   nbins are not stored, their number goes to *out_of_range. nbins >= 1. */
int knhk_simd_histogram(const void *a, size_t n, int width, uint64_t *counts, size_t nbins,
                        uint64_t *out_of_range);

/* One pass: min, max and the sum modulo 2**64. For n == 0, min and max are 0
   and the call returns KNHK_ERR_INVALID. */
typedef struct {
    uint64_t min;
    uint64_t max;
    uint64_t sum;
} knhk_simd_reduction;
int knhk_simd_reduce(const void *a, size_t n, int width, knhk_simd_reduction *out);

/* Hot-path operations (knhk_hotop_fn). search_64: knhk_simd_find of a
   16-byte needle in a 64-byte window, through the dispatch table. */
typedef struct {
    uint8_t window[64];
    uint8_t needle[16];
    int64_t result;
} knhk_simd_search64_ctx;
void knhk_simd_hotop_search_64(void *ctx, uint64_t iterations);

/* count_eq_4k: knhk_simd_count_eq over 1024 uint32 ids (4 KiB). */
typedef struct {
    uint32_t ids[1024];
    uint32_t value;
    uint64_t result;
} knhk_simd_count4k_ctx;
void knhk_simd_hotop_count_eq_4k(void *ctx, uint64_t iterations);

/* The median over `reps` batches of the time-stamp-counter ticks one call of
   fn(ctx, 1) costs, each batch timing fn(ctx, batch) (rdtsc on x86_64,
   nanoseconds elsewhere). reps is clamped to [1, 1001]; batch 0 counts as 1. */
double knhk_simd_median_ticks(knhk_hotop_fn fn, void *ctx, uint64_t batch, uint32_t reps);

/* KNHK_CDEF_END */

#ifdef __cplusplus
}
#endif

#endif /* KNHK_H */
