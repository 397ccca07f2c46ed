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

/* Arenas: chunk sizes accepted by knhk_arena_create, the largest single
   request (anything above is a caller's error, not a memory shortage), and
   the chunk size from which a chunk gets the transparent-huge-page hint. */
#define KNHK_ARENA_MIN_CHUNK 4096
#define KNHK_ARENA_MAX_CHUNK ((size_t)1 << 40)
#define KNHK_ARENA_MAX_REQUEST ((size_t)1 << 44)
#define KNHK_ARENA_HUGE_MIN ((size_t)2 << 20)
/* Bytes in front of every counted block (its size, for realloc). */
#define KNHK_ARENA_BLOCK_HEADER 16

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

/* ------------------------------------------------ arena */

/* A bump allocator over chunks taken from a backend. Allocation, reset and
   statistics belong to the thread that created the arena (its owner); blocks
   may be freed from any thread. The arena is reference counted: its owner,
   each numpy handler made for it, and each live counted block hold one, so
   memory goes back to the backend only when the last of them is gone. */
typedef struct knhk_arena knhk_arena;

typedef struct {
    uint64_t allocations;      /* blocks served, counted or not, since creation */
    uint64_t reallocations;    /* counted blocks resized (in place or by copy) */
    uint64_t bytes_requested;  /* sum of the sizes asked for, since creation */
    uint64_t bytes_reserved;   /* chunk bytes held now (in use or kept for reuse) */
    uint64_t bytes_used;       /* bytes bumped since the last reset, padding and headers included */
    uint64_t high_water;       /* the most bytes_used has ever been */
    uint64_t chunks;           /* chunks held now */
    uint64_t backend_calls;    /* knhk_aligned_alloc and knhk_free calls made on the backend */
    uint64_t live_blocks;      /* counted blocks not yet freed */
    uint64_t resets;
    uint64_t huge_page_chunks; /* chunks madvise(MADV_HUGEPAGE) accepted */
    uint64_t next_chunk_size;  /* size of the next chunk taken from the backend */
} knhk_arena_stats;

/* chunk_size: first chunk, in [KNHK_ARENA_MIN_CHUNK, KNHK_ARENA_MAX_CHUNK];
   each new chunk doubles it up to max_chunk_size (>= chunk_size, same range).
   huge_pages: madvise(MADV_HUGEPAGE) chunks of KNHK_ARENA_HUGE_MIN or more.
   The calling thread becomes the owner. No backend call is made yet. */
int knhk_arena_create(const knhk_backend *b, size_t chunk_size, size_t max_chunk_size, int huge_pages,
                      knhk_arena **out);
/* Drop the owner's reference: no allocation succeeds afterwards; the memory
   is returned when the last numpy handler and counted block are gone too. */
void knhk_arena_close(knhk_arena *a);
/* A block of size bytes (0 is served as 1) aligned to align (a power of two
   up to KNHK_MAX_ALIGN), or NULL with *status set (status may be NULL).
   Not counted as live: for C callers that reset or close when done. Owner only. */
void *knhk_arena_alloc(knhk_arena *a, size_t size, size_t align, int *status);
/* A counted block: live until knhk_arena_block_free. Checks the owner. */
void *knhk_arena_block_alloc(knhk_arena *a, size_t size, size_t align, int *status);
/* Resize a counted block (ptr NULL allocates): in place when it is the last
   block bumped and the chunk has room, else a new block with the contents
   copied. On failure the old block is untouched and NULL is returned. */
void *knhk_arena_block_realloc(knhk_arena *a, void *ptr, size_t size, int *status);
/* Release a counted block; any thread. May return the arena's memory. */
void knhk_arena_block_free(knhk_arena *a, void *ptr);
/* Make every byte available again, keeping the chunks (KNHK_ERR_STATE while
   counted blocks are live or from another thread than the owner). */
int knhk_arena_reset(knhk_arena *a);
int knhk_arena_stats_get(knhk_arena *a, knhk_arena_stats *out);
/* Whether the kernel offers madvise(MADV_HUGEPAGE) (THP not "never"). */
int knhk_arena_huge_pages_available(void);

/* Hot-path operation: one 64-byte, 16-aligned allocation from an arena with
   room (a reset, amortised, whenever the current chunk is full).
   ctx: a knhk_arena * owned by the calling thread. */
void knhk_arena_hotop_alloc(void *ctx, uint64_t iterations);

/* Make numpy allocate array data from the arena in the calling thread's
   context (a NEP 49 handler holding a reference on the arena). Returns the
   previous handler as a token for knhk_numpy_handler_restore, or NULL with
   *status set. Takes the GIL itself. */
void *knhk_numpy_arena_handler_push(knhk_arena *a, int *status);

/* KNHK_CDEF_END */

#ifdef __cplusplus
}
#endif

#endif /* KNHK_H */
