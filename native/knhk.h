/*
 * knhk.h -- the public C API of knhk-memory.
 *
 * One header, one prefix (knhk_), no Python: what an engine written in C, or
 * any language's FFI, calls. The text between the KNHK_CDEF markers is read
 * verbatim by native/build_native.py as the cffi cdef, so it must stay plain
 * declarations: no preprocessor conditionals, no inline functions. Internal
 * helpers live in knhk_internal.h with the _knhk_ prefix; the tick harness's
 * operations and the benchmarks' fixtures in knhk_hotops.h. The CPython
 * fast-path module (knhk_memory._fast, native/cpython/) uses this API only.
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

/* KNHK_PORTABLE (defined by the build with KNHK_PORTABLE=1, see
   native/build_native.py) compiles the core as for an architecture it has no
   special case for: every x86_64/i386/aarch64 branch in native/ takes its
   portable fallback (no intrinsics, no instruction-emitting asm, no cpuid or
   counter reads: scalar SIMD only, clock_gettime ticks, no CPU features).
   Every such architecture test honours it; tests/test_portable.py checks. */
#ifdef KNHK_PORTABLE
#define KNHK_PORTABLE_BUILD 1
#else
#define KNHK_PORTABLE_BUILD 0
#endif

/* Destructive-interference size: striped cells are padded to it. 128 on
   x86_64 (adjacent-line prefetch pairs lines) and aarch64, as folly and
   crossbeam's CachePadded use; 64 elsewhere (and in a portable build). */
#if (defined(__x86_64__) || defined(__aarch64__)) && !defined(KNHK_PORTABLE)
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

/* ---- ticks (native/ticks.c) */
/* Tick sources; KNHK_TICKS_AUTO picks the best one this machine has. */
#define KNHK_TICKS_AUTO 0
#define KNHK_TICKS_RDTSCP 1
#define KNHK_TICKS_RDTSC_LFENCE 2
#define KNHK_TICKS_CNTVCT 3
#define KNHK_TICKS_CLOCK_GETTIME 4
/* How a counter's rate (ticks per second) was found. */
#define KNHK_TICKS_HZ_UNKNOWN 0
#define KNHK_TICKS_HZ_CPUID_15 1
#define KNHK_TICKS_HZ_CPUID_16 2
#define KNHK_TICKS_HZ_HYPERVISOR 3
#define KNHK_TICKS_HZ_CALIBRATED 4
#define KNHK_TICKS_HZ_CNTFRQ 5
#define KNHK_TICKS_HZ_NANOSECONDS 6
/* Harness limits and defaults. */
#define KNHK_TICKS_MAX_BATCHES 100000
#define KNHK_TICKS_MAX_ITERATIONS 1048576
#define KNHK_TICKS_DEFAULT_BATCH_NS 8000
/* Once-cell states (knhk_once.state). Any other value is the id of the
   thread running the initialiser. */
#define KNHK_ONCE_EMPTY 0
#define KNHK_ONCE_READY 1
/* Largest pattern number a knhk_registry table accepts (ids are direct indexes). */
#define KNHK_REGISTRY_MAX_ID 4095
/* Counter blocks (native/counters.c). A block holds KNHK_COUNTERS_SLOTS writer
   slots of cache-line-padded cells; the last slot is shared (atomic adds),
   the others are each owned by one writer thread at a time. */
#define KNHK_COUNTERS_MAGIC 0x3152544E43484E4BULL /* "KNHCNTR1" little-endian */
#define KNHK_COUNTERS_VERSION 1
#define KNHK_COUNTERS_SLOTS 64
#define KNHK_COUNTERS_MAX 65536
#define KNHK_COUNTERS_NAMES_MAX 1048576
/* The overflow rule (issue 16): a slot's cell for a counter stays within
   [-KNHK_COUNTERS_SLOT_LIMIT, KNHK_COUNTERS_SLOT_LIMIT] (2^56). An add that
   would take it out returns KNHK_ERR_OVERFLOW and changes nothing. So the sum
   of the 64 slots and its reset baseline each stay within +-2^62, and a
   counter's value (sum minus baseline) always fits int64 exactly: no read
   ever wraps. */
#define KNHK_COUNTERS_SLOT_LIMIT (1LL << 56)
/* Block flavours: plain sum counters, or per-pattern executor statistics
   (four cells per pattern: executions, total ticks, min ticks, max ticks). */
#define KNHK_COUNTERS_FLAVOR_SUM 1
#define KNHK_COUNTERS_FLAVOR_PATTERNS 2
/* Workflow control-flow patterns are numbered 1..KNHK_PATTERN_COUNT. */
#define KNHK_PATTERN_COUNT 43
/* Arenas: chunk sizes accepted by knhk_arena_create, the largest single
   request (anything above is a caller's error, not a memory shortage), and
   the chunk size from which a chunk gets the transparent-huge-page hint. */
#define KNHK_ARENA_MIN_CHUNK 4096
#define KNHK_ARENA_MAX_CHUNK ((size_t)1 << 40)
#define KNHK_ARENA_MAX_REQUEST ((size_t)1 << 44)
#define KNHK_ARENA_HUGE_MIN ((size_t)2 << 20)
/* Bytes in front of every counted block (its size, for realloc). */
#define KNHK_ARENA_BLOCK_HEADER 16
/* Workflow store (native/store.c, docs/store.md). */
#define KNHK_STORE_HEADER_SIZE 128
#define KNHK_STORE_VERSION 2
/* The oldest format version this reader still reads (1: XXH64 key hash). */
#define KNHK_STORE_MIN_VERSION 1
/* Header flag: values are zstd frames (optionally with the file's dictionary). */
#define KNHK_STORE_FLAG_ZSTD 1
/* Index entries covered by one block checksum (4 KiB of index). */
#define KNHK_STORE_BLOCK_ENTRIES 512
/* What is wrong with a store file (the *problem out-parameter). */
#define KNHK_STORE_OK 0
#define KNHK_STORE_EMPTY 1
#define KNHK_STORE_TRUNCATED 2
#define KNHK_STORE_BAD_MAGIC 3
#define KNHK_STORE_NEWER_VERSION 4
#define KNHK_STORE_CORRUPT 5
/* The mapping faulted while it was being opened (truncated meanwhile). */
#define KNHK_STORE_CHANGED_WHILE_OPENING 6
/* knhk_store_find results other than a packed span. */
#define KNHK_STORE_ABSENT (-1)
#define KNHK_STORE_WIDE (-2)
#define KNHK_STORE_BROKEN (-3)
/* The file changed under a watched reader (rewritten in place, truncated). */
#define KNHK_STORE_CHANGED (-5)
/* SIMD scans (simd.c). Largest id set knhk_simd_isin takes, the number of
   histogram bins kept in on-stack sub-tables (more bins use one table), and
   the bytes of haystack knhk_simd_find_many has every needle search while
   they are in L1. */
#define KNHK_SIMD_ISIN_MAX 256
#define KNHK_SIMD_HIST_FAST_BINS 1024
#define KNHK_SIMD_FIND_MANY_CHUNK 16384

/* ---- metrics (native/metrics.c, issue 17): labelled families and
   histograms in one shared block (table of label sets + a counter block). */
#define KNHK_METRICS_MAGIC 0x3152544D48484E4BULL /* "KNHHMTR1" little-endian */
#define KNHK_METRICS_VERSION 1
/* Largest label-set bound a block takes; families per block. */
#define KNHK_METRICS_SETS_MAX 1048576
#define KNHK_METRICS_FAMILIES_MAX 256
/* Arena bytes per label set (key bytes; a family gets 1024). */
#define KNHK_METRICS_SET_BYTES 256
/* Largest key + payload of one entry. */
#define KNHK_METRICS_ENTRY_BYTES_MAX 65536
/* Entry kinds. */
#define KNHK_METRICS_KIND_FAMILY 1
#define KNHK_METRICS_KIND_SET 2
/* Which bound knhk_metrics_intern hit (its *full). */
#define KNHK_METRICS_FULL_SETS 1
#define KNHK_METRICS_FULL_FAMILIES 2
#define KNHK_METRICS_FULL_CELLS 3
#define KNHK_METRICS_FULL_BYTES 4
#define KNHK_METRICS_FULL_TABLE 5
/* ---- end metrics constants */

/* ---- pools, memory-mapped vectors, NUMA (issue 19: native/pool.c, numa.c;
   knhk_memory/pools.py, mmapvec.py, numa.py). */
/* Blocks: at least KNHK_POOL_MIN_BLOCK bytes (the intrusive free link), at
   most KNHK_POOL_MAX_BLOCK; capacity 1..KNHK_POOL_MAX_CAPACITY; the region
   (capacity x block stride) at most KNHK_POOL_MAX_BYTES. */
#define KNHK_POOL_MIN_BLOCK 8
#define KNHK_POOL_MAX_BLOCK ((size_t)1 << 30)
#define KNHK_POOL_MAX_CAPACITY 4294967294ULL
#define KNHK_POOL_MAX_BYTES ((size_t)1 << 40)
/* What a pool call found wrong (the return value of alloc/free calls; 0 is fine). */
#define KNHK_POOL_OK 0
#define KNHK_POOL_EXHAUSTED 1  /* every block is in use */
#define KNHK_POOL_DOUBLE_FREE 2 /* the block is not allocated (freed twice, or never handed out) */
#define KNHK_POOL_FOREIGN 3    /* the pointer is not a block start of this pool */
#define KNHK_POOL_CLOSED 4     /* the pool was closed */
#define KNHK_POOL_FORKED 5     /* the pool was made before a fork(), used in the child */
#define KNHK_POOL_WRONG_THREAD 6 /* a FixedPool used from a thread other than its owner */
#define KNHK_POOL_CORRUPT 7    /* a free-list link was overwritten (a write after free) */
/* Thread-local pools: the most threads with a cache of their own (others use
   the shared free list directly) and the largest per-thread cache. */
#define KNHK_TLPOOL_MAX_THREADS 256
#define KNHK_TLPOOL_MAX_CACHE 65536
/* knhk_pool_bench kinds: a mutex-guarded free list, the three pools, a backend's malloc/free. */
#define KNHK_POOL_BENCH_MUTEX 0
#define KNHK_POOL_BENCH_FIXED 1
#define KNHK_POOL_BENCH_LOCKFREE 2
#define KNHK_POOL_BENCH_THREADLOCAL 3
#define KNHK_POOL_BENCH_BACKEND 4
#define KNHK_POOL_BENCH_EMPTY 5
/* NUMA placement modes (knhk_numa_mbind; the kernel's MPOL_* values). */
#define KNHK_NUMA_DEFAULT 0
#define KNHK_NUMA_PREFERRED 1
#define KNHK_NUMA_BIND 2
#define KNHK_NUMA_INTERLEAVE 3
#define KNHK_NUMA_LOCAL 4
/* Most nodes a mask passed to the NUMA calls may name (64-bit words x 64). */
#define KNHK_NUMA_MAX_NODES 1024

/* Everything declared between the markers is exported from the core's shared
   library; everything else in native/ is built hidden (-fvisibility=hidden). */
#pragma GCC visibility push(default)
/* KNHK_CDEF_BEGIN */

/* ---------------------------------------------------------------- status */

typedef enum {
    KNHK_OK = 0,
    KNHK_ERR_NOMEM = 1,        /* the backend returned NULL */
    KNHK_ERR_INVALID = 2,      /* an argument is out of its documented range */
    KNHK_ERR_UNAVAILABLE = 3,  /* a library or CPU feature is not present */
    KNHK_ERR_UNSUPPORTED = 4,  /* the backend has no such operation */
    KNHK_ERR_PYTHON = 5,       /* a Python C-API call failed (numpy glue) */
    KNHK_ERR_STATE = 6,        /* the object is in the wrong state for the call */
    KNHK_ERR_OVERFLOW = 7      /* the result would leave its range; nothing was changed */
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
    KNHK_CPU_NEON = 128,
    /* Not an instruction set: an Intel Skylake-SP, Cascade Lake or Cooper
       Lake core, which lowers its clock for a while after any 512-bit
       instruction, slowing every instruction the program runs next. */
    KNHK_CPU_AVX512_DOWNCLOCK = 256
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
    int64_t metadata;      /* bytes of the allocator's own bookkeeping (jemalloc stats.metadata), or -1 */
    int64_t retained;      /* bytes of address space kept but given back to the OS (jemalloc stats.retained), or -1 */
    int64_t free_bytes;    /* bytes free inside the allocator's heaps, not given back (glibc fordblks), or -1 */
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


/* ---------------------------------------------------------------- ticks */

/* The tick counter the harness uses, and what is known about the machine's. */
typedef struct {
    int source;            /* KNHK_TICKS_RDTSCP ... KNHK_TICKS_CLOCK_GETTIME, the counter in use */
    int invariant;         /* 1: the counter in use keeps one rate whatever the power state */
    double hz;             /* its ticks per second */
    int hz_method;         /* how hz was found: KNHK_TICKS_HZ_* */
    int has_tsc;           /* x86: CPUID 1 EDX bit 4 */
    int has_rdtscp;        /* x86: CPUID 0x80000001 EDX bit 27 */
    int invariant_tsc;     /* x86: CPUID 0x80000007 EDX bit 8 */
    int hypervisor;        /* x86: CPUID 1 ECX bit 31 (running in a VM) */
    double tsc_hz;         /* the TSC's rate (0: no TSC) */
    int tsc_hz_method;     /* KNHK_TICKS_HZ_CPUID_15/16, _HYPERVISOR or _CALIBRATED */
    double tsc_calibrated_hz; /* the TSC measured against CLOCK_MONOTONIC_RAW, as a cross-check */
    int has_cntvct;        /* aarch64: the generic timer's virtual counter */
    double cntvct_hz;      /* cntfrq_el0 */
} knhk_tick_counter;

typedef struct {
    uint64_t iterations;   /* operations per batch; 0: grow until a batch takes batch_ns */
    uint64_t batch_ns;     /* target batch length when iterations is 0; 0: KNHK_TICKS_DEFAULT_BATCH_NS */
    uint32_t batches;      /* timed batches, 3..KNHK_TICKS_MAX_BATCHES */
    uint32_t warmup;       /* untimed batches first */
} knhk_ticks_params;

typedef struct {
    double median;         /* ticks per operation, median over batches, harness overhead taken off */
    double min;            /* ticks per operation in the fastest batch, less `overhead` (so min <= median) */
    double raw_median;     /* median before the overhead is taken off */
    double raw_min;
    double overhead;       /* the empty operation: median ticks per iteration */
    uint64_t iterations;   /* operations per batch */
    uint32_t batches;      /* batches kept */
    uint32_t discarded;    /* batches dropped: moved to another CPU mid-batch, or the counter went back */
    int source;            /* the counter used */
} knhk_ticks_result;

/* Fill *out with the counter in use and the machine's counters (detected once). */
int knhk_ticks_counter(knhk_tick_counter *out);
/* Use `source` from now on (process-wide). KNHK_ERR_UNAVAILABLE when this
   machine lacks it, KNHK_ERR_INVALID for an unknown number. */
int knhk_ticks_select(int source);
const char *knhk_ticks_source_name(int source);
/* One read of the counter in use. */
uint64_t knhk_ticks_now(void);
/* Time fn(ctx, iterations) in params->batches batches; see knhk_ticks_result. */
int knhk_ticks_measure(knhk_hotop_fn fn, void *ctx, const knhk_ticks_params *params, knhk_ticks_result *out);
/* Hot-path operation: nothing, in the loop every hot op has (the harness's baseline). */
/* ---------------------------------------------------------------- once */

/* A once-cell: a value set exactly once, read with one acquire load.
   Zero-initialise it (static storage, or knhk_once_init). `state` is read and
   written only with atomic operations; it is KNHK_ONCE_EMPTY, KNHK_ONCE_READY,
   or the id of the thread running the initialiser. */
typedef struct {
    uint64_t state;
    void *value;
} knhk_once;

/* An initialiser: store the cell's value in *value and return KNHK_OK, or
   return an error status to leave the cell empty (a later run retries). */
typedef int (*knhk_once_init_fn)(void *arg, void **value);

void knhk_once_init(knhk_once *o);
/* The value, or NULL while the cell is empty or being initialised. Never blocks. */
void *knhk_once_get(const knhk_once *o);
/* 1 when full, else 0. */
int knhk_once_is_set(const knhk_once *o);
/* Fill an empty cell with value: KNHK_OK, or KNHK_ERR_STATE when it is full or
   being initialised (the cell is unchanged). */
int knhk_once_set(knhk_once *o, void *value);
/* Run init(arg, &value) once among racing threads; the others wait. On
   KNHK_OK *value_out (may be NULL) is the cell's value. An initialiser's error
   status is returned to its caller and the cell stays empty. A call from
   inside the same cell's initialiser returns KNHK_ERR_STATE instead of
   deadlocking. A cell whose initialiser ran in a thread that fork() left
   behind is reset in the child, so the child does not hang. */
int knhk_once_run(knhk_once *o, knhk_once_init_fn init, void *arg, void **value_out);

/* ---------------------------------------------------------------- registry */

/* One workflow pattern: canonical number, name, group, and an opaque executor
   handle the engine attached (0: none). */
typedef struct {
    uint32_t id;
    uint32_t group;
    const char *name;
    uint64_t executor;
} knhk_pattern;

/* A table of patterns indexed directly by number, in [1, max_id]. */
typedef struct knhk_registry knhk_registry;

/* NULL with *status KNHK_ERR_INVALID (max_id outside [1, KNHK_REGISTRY_MAX_ID])
   or KNHK_ERR_NOMEM. */
knhk_registry *knhk_registry_new(uint32_t max_id, int *status);
void knhk_registry_free(knhk_registry *r);
/* Add a pattern (name copied): KNHK_ERR_INVALID for an id outside [1, max_id]
   or a NULL name, KNHK_ERR_STATE when the id is taken or the table is frozen. */
int knhk_registry_put(knhk_registry *r, uint32_t id, uint32_t group, const char *name);
/* Attach an executor handle: KNHK_ERR_INVALID for an unknown id,
   KNHK_ERR_STATE once frozen. */
int knhk_registry_set_executor(knhk_registry *r, uint32_t id, uint64_t executor);
/* After this, put and set_executor fail with KNHK_ERR_STATE; lookups need no lock. */
void knhk_registry_freeze(knhk_registry *r);
int knhk_registry_is_frozen(const knhk_registry *r);
uint32_t knhk_registry_count(const knhk_registry *r);
/* The pattern numbered id, or NULL (unknown or out of range). */
const knhk_pattern *knhk_registry_lookup(const knhk_registry *r, uint32_t id);
/* ---------------------------------------------------------------- counters */

/* A counter block lives in memory the caller provides (private, a file or
   POSIX shared memory): a header (magic, version, cache line, flavour, the
   counter names), per-counter reset baselines, the slot owner table and the
   slots. Any process that maps the memory can open it. */
typedef struct knhk_counters knhk_counters;

/* Bytes a block of `count` counters with `names_len` bytes of names needs;
   0 when count or names_len is out of range. */
size_t knhk_counters_layout_size(uint32_t flavor, uint32_t count, size_t names_len);
/* Write an empty block into mem (which must be zeroed and at least
   knhk_counters_layout_size bytes, aligned to KNHK_CACHE_LINE). names holds
   `count` names, each ended by a NUL, names_len bytes in all. */
int knhk_counters_format(void *mem, size_t size, uint32_t flavor, uint32_t count, const char *names, size_t names_len);
/* Check the header of the block at mem and return a process-local handle.
   KNHK_ERR_INVALID names what does not match (magic, version, cache line,
   size, names checksum) in knhk_last_error(). */
int knhk_counters_open(void *mem, size_t size, knhk_counters **out);
/* Hand back the slots this handle's threads own, and free the handle. The
   counts stay in the block. No call may use the handle concurrently. */
void knhk_counters_close(knhk_counters *c);
uint32_t knhk_counters_flavor(const knhk_counters *c);
uint32_t knhk_counters_count(const knhk_counters *c);
/* The names region: `count` NUL-ended names; *len receives its size. */
const char *knhk_counters_names(const knhk_counters *c, size_t *len);

/* Add n (two's complement, so negative n subtracts) to counter `index`.
   Finds the calling thread's writer through a thread-local cache on every
   call; a hot loop does better with a writer handle (below). */
int knhk_counters_add(knhk_counters *c, uint32_t index, int64_t n);

/* Writer handles: the calling thread's claim on a block, fetched once, so
   that an add is one ownership compare and a plain load+add+store on the
   thread's own cell (no thread-local lookup, no lock prefix; a thread that
   found every slot taken adds atomically to the shared slot instead).
   - Made on the thread's first write to the block (by either add); the
     same thread asking again gets the same handle.
   - Valid for its owner thread until the thread exits or the block handle
     is closed. Then it is dead: its slot goes back, the counts stay, and a
     call through it returns KNHK_ERR_STATE (dead writers are pooled, never
     freed, so the pointer stays safe to call with). A forked child's
     writers are all dead; the child gets its own.
   - Used from any thread but its owner: KNHK_ERR_STATE, nothing added.
   - knhk_counters_close must not run while a thread adds (as for c). */
typedef struct knhk_counters_writer knhk_counters_writer;
/* The calling thread's writer for block c into *out. KNHK_ERR_NOMEM when
   none can be made (the thread's adds through c still count, atomically). */
int knhk_counters_writer_get(knhk_counters *c, knhk_counters_writer **out);
/* Add n to counter `index` through the calling thread's writer:
   KNHK_ERR_STATE when w is dead or another thread's, KNHK_ERR_INVALID for an
   index out of range, KNHK_ERR_OVERFLOW past KNHK_COUNTERS_SLOT_LIMIT
   (nothing added in each case). */
int knhk_counters_writer_add(knhk_counters_writer *w, uint32_t index, int64_t n);
/* Add n to the counter of every index in indices[0..len): all indices are
   checked before anything is added, so a bad one changes nothing; an add
   past KNHK_COUNTERS_SLOT_LIMIT returns KNHK_ERR_OVERFLOW after undoing the
   batch's earlier adds (a concurrent read may see them for that moment). */
int knhk_counters_add_indices(knhk_counters *c, const int64_t *indices, size_t len, int64_t n);
/* The counter's value since its last reset: the sum over all slots minus
   its baseline. */
int64_t knhk_counters_get(const knhk_counters *c, uint32_t index);
/* Every counter's value into out[0..count). */
int knhk_counters_snapshot(const knhk_counters *c, int64_t *out, size_t count);
/* Start every counter again from zero (sum cells: a new baseline; pattern
   min/max cells: cleared). */
void knhk_counters_reset(knhk_counters *c);
/* Read and reset (issue 16): every counter's value since its last reset into
   out[0..count), each counter re-based at exactly the value returned. Each
   slot's cell is read once, atomically, and the baseline moves to the sum of
   those reads with a compare-and-swap (retried if another reset moved it), so
   an add running meanwhile lands either in the value returned or in the next
   one, never in neither, and two exporters never return the same add twice.
   (Owners add with a plain load and store, so no reader may write their cells:
   the baseline is what moves.) Sum blocks only. */
int knhk_counters_get_and_reset(knhk_counters *c, int64_t *out, size_t count);
/* Slots owned now (by any process), and the number of slots taken back
   from processes that no longer exist. */
uint32_t knhk_counters_slots_owned(const knhk_counters *c);
uint32_t knhk_counters_reclaim_dead(knhk_counters *c);

/* Per-pattern executor statistics, on a KNHK_COUNTERS_FLAVOR_PATTERNS block. */
/* Timestamp counter: rdtsc on x86_64, cntvct_el0 on aarch64, else (and in a
   KNHK_PORTABLE build) clock_gettime ns. */
uint64_t knhk_counters_ticks(void);
/* Ticks per second of knhk_counters_ticks (measured once, about 20 ms). */
double knhk_counters_ticks_per_second(void);
/* Record one execution of `pattern` (1..KNHK_PATTERN_COUNT) that took `ticks`. */
int knhk_counters_pattern_record(knhk_counters *c, int64_t pattern, uint64_t ticks);
/* Record the execution that started at `start_ticks` and ends now. */
int knhk_counters_pattern_stop(knhk_counters *c, int64_t pattern, uint64_t start_ticks);
/* Record len executions: patterns[i] took ticks[i]. All checked first. */
int knhk_counters_pattern_record_many(knhk_counters *c, const int64_t *patterns, const uint64_t *ticks, size_t len);
/* out[4*(p-1) + 0..3] = executions, total, min, max ticks of pattern p; min
   is 0 for a pattern never recorded. out must hold 4*KNHK_PATTERN_COUNT. */
int knhk_counters_pattern_snapshot(const knhk_counters *c, uint64_t *out, size_t len);

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
    uint64_t pinned_chunks;    /* chunks a reset set aside because blocks in them live */
    uint64_t pinned_bytes;     /* their bytes */
} knhk_arena_stats;

/* chunk_size: first chunk, in [KNHK_ARENA_MIN_CHUNK, KNHK_ARENA_MAX_CHUNK];
   each new chunk doubles it up to max_chunk_size (>= chunk_size, same range).
   huge_pages: madvise(MADV_HUGEPAGE) chunks of KNHK_ARENA_HUGE_MIN or more.
   The calling thread becomes the owner. No backend call is made yet. */
int knhk_arena_create(const knhk_backend *b, size_t chunk_size, size_t max_chunk_size, int huge_pages,
                      knhk_arena **out);
/* Drop the owner's reference: no allocation succeeds afterwards. Called by
   the owner, chunks without a live counted block go back to the backend at
   once (uncounted blocks die with the close); the rest, and the arena, when
   the last numpy handler and counted block are gone too. */
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
/* Start the next batch: every chunk without a live counted block is
   recycled (spares beyond twice the batch's need go back to the backend);
   a chunk with live blocks is pinned -- kept, untouched, never bumped into
   -- until its last block is freed. Uncounted blocks (knhk_arena_alloc) are
   dead after a reset. KNHK_ERR_STATE from another thread than the owner or
   on a closed arena. */
int knhk_arena_reset(knhk_arena *a);
int knhk_arena_stats_get(knhk_arena *a, knhk_arena_stats *out);
/* Take a reference on an open arena for a holder other than its owner (a
   numpy data handler, say): owner thread only, KNHK_ERR_STATE once closed.
   The arena's memory stays until every reference is released. */
int knhk_arena_retain(knhk_arena *a);
/* Drop a reference taken with knhk_arena_retain; any thread. */
void knhk_arena_release(knhk_arena *a);
/* Whether the kernel offers madvise(MADV_HUGEPAGE) (THP not "never"). */
int knhk_arena_huge_pages_available(void);

/* ---------------------------------------------------------------- workflow store */

/* A read-only view of a store file the caller has mapped (or read) at
   base[0, size). The caller keeps the bytes alive and unchanged until
   knhk_store_close. Every offset and length read from the file is checked
   against size before use: no input makes these functions read outside it. */
typedef struct knhk_store knhk_store;

typedef struct {
    uint32_t version;
    uint32_t flags;
    uint64_t count;          /* live records (keys) */
    uint64_t records_total;  /* records written, including superseded ones */
    uint64_t slots;          /* index slots */
    uint64_t max_disp;       /* longest probe distance of any key */
    uint64_t records_offset;
    uint64_t records_end;
    uint64_t dict_offset;
    uint64_t dict_length;
    uint64_t index_offset;
    uint64_t blocksum_offset;
    uint64_t file_size;
    uint64_t seed;
    uint64_t hash_key; /* version 2: k0 of the SipHash-1-3 key hash (k1 = seed); version 1: 0 */
    uint64_t header_sum; /* the header checksum: identifies this build of the file */
} knhk_store_info;


/* XXH64 of data[0, len). The store's key hash and every checksum. */
uint64_t knhk_store_hash(const void *data, size_t len, uint64_t seed);

/* Check the header, the bounds of every region and the index block
   checksums (8 bytes per 512 slots), then return a handle. On failure *out
   is NULL, *problem is a KNHK_STORE_* code and knhk_last_error() says what. */
int knhk_store_open(const void *base, uint64_t size, knhk_store **out, int *problem);
void knhk_store_close(knhk_store *s);
void knhk_store_get_info(const knhk_store *s, knhk_store_info *out);

/* Look key up. Found: (value_offset << 24) | value_length, >= 0, when the
   offset is below 2^39 and the length below 2^24; KNHK_STORE_WIDE when it
   does not fit (call knhk_store_find_span); KNHK_STORE_ABSENT; or
   KNHK_STORE_BROKEN when the record or index block it touched fails its
   bounds or checksum (knhk_last_error() says where). A record's checksum is
   checked the first time it is read. Thread-safe. */
int64_t knhk_store_find(knhk_store *s, const char *key, size_t len);
/* As knhk_store_find, the span unpacked: 0 with *off and *vlen set (the value
   is base[*off, *off + *vlen)), or KNHK_STORE_ABSENT / KNHK_STORE_BROKEN, or
   KNHK_STORE_CHANGED on a watched handle whose file changed (knhk_store_watch). */
int64_t knhk_store_lookup(knhk_store *s, const char *key, size_t len, uint64_t *off, uint64_t *vlen);
/* The same, with the span in span[0] (offset) and span[1] (length). */
int64_t knhk_store_find_span(knhk_store *s, const char *key, size_t len, uint64_t *span);

/* Write the offsets of the live records (index order) into out[0, cap);
   returns how many there are, or KNHK_STORE_BROKEN. */
int64_t knhk_store_live_offsets(knhk_store *s, uint64_t *out, uint64_t cap);
/* The record at offset: spans[0..3] = key offset, key length, value offset,
   value length. Checks bounds and the record checksum. */
int knhk_store_record_at(knhk_store *s, uint64_t offset, uint64_t *spans);

/* Check everything: the index checksum chain, every index entry (bounds,
   checksum, key hash, displacement), and every record of the records
   region. KNHK_OK, or KNHK_ERR_INVALID with knhk_last_error() naming the
   first fault. *checked counts the records checked. */
int knhk_store_verify(knhk_store *s, uint64_t *checked);

/* Writer side. Encode one record into out[0, cap): header, key, value,
   checksum. Returns the encoded length (0 if cap is too small: the length
   needed is at most key_len + value_len + 28); *key_hash gets the key's hash. */
size_t knhk_store_encode_record(const char *key, size_t key_len, const char *value, size_t value_len, uint64_t seed,
                                uint8_t *out, size_t cap, uint64_t *key_hash);
/* Encode n records back to back into out[0, cap): record i has the key
   keys[sum of key_lens before i, + key_lens[i]) and likewise its value.
   hashes[i] gets its XXH64 key hash (hashes may be NULL: the version-2 writer
   hashes keys at commit, knhk_store_key_hashes), offsets[i] = base_offset +
   its position in out.
   Returns the bytes written, or 0 (with knhk_last_error()) when the lengths
   overrun keys_size / values_size or the records do not fit in cap. */
size_t knhk_store_encode_batch(const uint8_t *keys, uint64_t keys_size, const uint64_t *key_lens, const uint8_t *values,
                               uint64_t values_size, const uint64_t *value_lens, uint64_t n, uint64_t seed,
                               uint64_t base_offset, uint8_t *out, size_t cap, uint64_t *hashes, uint64_t *offsets);
/* Build the Robin Hood index of n records: table[0, slots) (zeroed by the
   caller) and blocksums[ceil(slots / 512)]. Returns KNHK_OK, or
   KNHK_ERR_INVALID when slots < n or an offset does not fit in 48 bits. */
int knhk_store_build_index(const uint64_t *hashes, const uint64_t *offsets, uint64_t n, uint64_t slots, uint64_t *table,
                           uint64_t *blocksums, uint64_t *max_disp);

/* ---- issue 15: keyed hash, watched readers (native/store.c, store_guard.c) */

/* SipHash-c-d (Aumasson and Bernstein, 2012) of data[0, len) under the
   128-bit key (k0, k1). The version-2 key hash is SipHash-1-3 with
   k0 = hash_key, k1 = seed (as CPython's and Rust's hash tables use it). */
uint64_t knhk_store_siphash(const void *data, size_t len, uint64_t k0, uint64_t k1, int c_rounds, int d_rounds);
/* out[i] = the version-2 key hash of key i (keys back to back, key_lens[i]
   bytes each). KNHK_OK, or KNHK_ERR_INVALID when the lengths overrun keys_size. */
int knhk_store_key_hashes(const uint8_t *keys, uint64_t keys_size, const uint64_t *key_lens, uint64_t n,
                          uint64_t hash_key, uint64_t seed, uint64_t *out);
/* Watch a handle whose bytes are a shared mapping of a file that someone may
   rewrite in place: every read through it runs under a SIGBUS guard (a
   process-wide handler, installed here, that chains to the one it replaced)
   and re-reads the header checksum afterwards; a fault or a changed header
   makes that read, and every later one, return KNHK_STORE_CHANGED. The
   mapping is also registered, so a read through a memoryview handed out
   earlier that faults past a new end of file sees a page of zeros instead
   of SIGBUS (and the handle reports the change). Returns the registration
   slot (>= 0; -1 when all 4,096 slots are taken: the guard still works) for
   knhk_store_unwatch, to be called when the mapping is unmapped; -2 when
   the SIGBUS handler cannot be installed (the handle is not watched). */
int knhk_store_watch(knhk_store *s);
/* Forget a watched mapping (its memory is being unmapped). */
void knhk_store_unwatch(int slot);
/* Copy base[offset, offset + len) into dst, under the guard of a watched
   handle. KNHK_OK, KNHK_ERR_INVALID (outside the file) or KNHK_STORE_CHANGED. */
int knhk_store_copy(knhk_store *s, uint64_t offset, uint64_t len, uint8_t *dst);
/* KNHK_OK while the header still reads as it did at open, else KNHK_STORE_CHANGED. */
int knhk_store_check_changed(knhk_store *s);
/* ---- end of issue 15 */

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
/* 1 once a level is active (scans may run), 0 while none is (a bad KNHK_SIMD). */
int knhk_simd_ready(void);
/* The level "auto" means here: the highest this machine supports, except
   that avx512 is passed over on a core with KNHK_CPU_AVX512_DOWNCLOCK (there
   a 512-bit kernel costs the rest of the program more than it saves; force
   it with KNHK_SIMD=avx512 or knhk_simd_set_level). */
int knhk_simd_auto_level(void);
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
size_t knhk_simd_find_all(const uint8_t *hay, size_t n, const uint8_t *needle, size_t m, int overlapping, size_t from,
                          int64_t *out, size_t cap, size_t *next);
/* k needles at once: *first is the smallest match position of any needle
   (-1 if none) and *which the needle found there (the lowest index on a tie,
   -1 if none); counts (may be NULL) receives each needle's non-overlapping
   count. The haystack is read once, KNHK_SIMD_FIND_MANY_CHUNK bytes at a
   time, every needle searching each chunk while it is in cache. */
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
int knhk_simd_histogram(const void *a, size_t n, int width, uint64_t *counts, size_t nbins, uint64_t *out_of_range);

/* One pass: min, max and the sum modulo 2**64. For n == 0, min and max are 0
   and the call returns KNHK_ERR_INVALID. */
typedef struct {
    uint64_t min;
    uint64_t max;
    uint64_t sum;
} knhk_simd_reduction;
int knhk_simd_reduce(const void *a, size_t n, int width, knhk_simd_reduction *out);

/* A prepared needle, for searching one needle in many haystacks (a marker
   in 64-byte windows, say): the three probe bytes (first, middle, last) are
   broadcast once, the needle's first 64 bytes are kept as a vector for a
   one-compare verify, and the kernel of one level is chosen once. Calling
   nd->find(nd, hay, n) is then a direct call: no dispatch-table load, no
   broadcast. Semantics are knhk_simd_find's. The needle bytes are copied into
   the allocation (64-byte aligned); free it with knhk_simd_needle_free. */
typedef struct knhk_simd_needle knhk_simd_needle;
typedef int64_t (*knhk_simd_needle_fn)(const knhk_simd_needle *nd, const uint8_t *hay, size_t n);
struct knhk_simd_needle {
    uint8_t first[64];      /* needle[0] in every byte */
    uint8_t middle[64];     /* needle[len / 2] in every byte */
    uint8_t last[64];       /* needle[len - 1] in every byte */
    uint8_t head[64];       /* needle[0 .. min(len, 64)), zero padded */
    knhk_simd_needle_fn find; /* the kernel of `level` */
    const uint8_t *bytes;   /* the needle (a copy inside this allocation) */
    size_t len;
    size_t mid;             /* len / 2 */
    uint64_t head_mask;     /* low min(len, 64) bits set */
    int level;              /* the level whose kernel `find` is */
};
/* Prepare needle[0..m) (m may be 0) for `level`, or for the active level when
   level is -1. KNHK_ERR_INVALID for a level out of range, KNHK_ERR_UNAVAILABLE
   for a level this machine lacks, KNHK_ERR_NOMEM. */
int knhk_simd_needle_new(const uint8_t *needle, size_t m, int level, knhk_simd_needle **out);
void knhk_simd_needle_free(knhk_simd_needle *nd);
/* nd->find(nd, hay, n), for callers that cannot call through a pointer. */
int64_t knhk_simd_needle_find(const knhk_simd_needle *nd, const uint8_t *hay, size_t n);
/* As knhk_simd_count and knhk_simd_find_all, with a prepared needle. */
uint64_t knhk_simd_needle_count(const knhk_simd_needle *nd, const uint8_t *hay, size_t n, int overlapping);
size_t knhk_simd_needle_find_all(const knhk_simd_needle *nd, const uint8_t *hay, size_t n, int overlapping, size_t from,
                                 int64_t *out, size_t cap, size_t *next);


/* ---------------------------------------------------------------- the process allocator (issue 21) */

/* The path of the shared object whose malloc this process calls: an
   allocator preloaded by knhk-memory run (LD_PRELOAD), else libc. The path is
   as the loader recorded it (not resolved through symlinks), truncated to
   len - 1 bytes. KNHK_ERR_INVALID for a NULL or empty buffer,
   KNHK_ERR_UNSUPPORTED when the loader cannot say. */
int knhk_process_malloc_owner(char *buf, size_t len);
/* ---------------------------------------------------------------- end of issue 21 */

/* ---------------------------------------------------------------- fork (issue 16)

   A child forked at any moment, from any thread, can use every service: the
   core's once-cells hold no lock across an initialiser and its locks are
   reset by pthread_atfork handlers (docs/reliability.md). One hazard is the
   dynamic loader's: a fork during another thread's dlopen() leaves the
   child's loader inconsistent (glibc aborts its next dlopen). The core's own
   dlopen()s (allocator backends) wait for these hooks: call
   knhk_fork_prepare() just before fork() and knhk_fork_parent() /
   knhk_fork_child() just after it, outside any pthread_atfork handler (a
   library being dlopen'ed may call pthread_atfork, and glibc holds its
   atfork lock while prepare handlers run). The Python package registers them
   with os.register_at_fork. */
void knhk_fork_prepare(void);
void knhk_fork_parent(void);
void knhk_fork_child(void);

/* ---------------------------------------------------------------- arena scopes (issue 16)

   A scope over an arena allocates from the arena while it is open and the
   calling thread owns the arena, and from `fallback` otherwise (a 16-byte
   header marks those blocks, so free and realloc send them back there). Made
   for numpy's handler of an arena scope, which numpy copies into asyncio
   tasks and copied contexts, where it outlives the scope: after
   knhk_arena_scope_end, or from another thread, every allocation through the
   scope goes to the fallback, never into the arena. A block already in the
   arena that is grown after the arena closed, or from another thread, moves
   out (copied) instead of failing. The scope holds a reference on the arena.
   knhk_arena_scope_open: owner thread, open arena (KNHK_ERR_STATE otherwise);
   the caller holds one reference, dropped by knhk_arena_scope_end (which also
   closes the scope); knhk_arena_scope_retain/release for other holders (a
   numpy capsule). When the last goes, release(release_arg) is called (the
   fallback is no longer used) and the arena reference is dropped. */
typedef struct knhk_arena_scope knhk_arena_scope;
typedef struct {
    void *ctx;
    void *(*malloc)(void *ctx, size_t size);
    void *(*calloc)(void *ctx, size_t n, size_t size);
    void *(*realloc)(void *ctx, void *ptr, size_t size);
    void (*free)(void *ctx, void *ptr, size_t size);
} knhk_fallback_allocator;
int knhk_arena_scope_open(knhk_arena *a, const knhk_fallback_allocator *fallback, void (*release)(void *),
                          void *release_arg, knhk_arena_scope **out);
void knhk_arena_scope_retain(knhk_arena_scope *s);
void knhk_arena_scope_release(knhk_arena_scope *s);
void knhk_arena_scope_end(knhk_arena_scope *s);
void *knhk_arena_scope_alloc(knhk_arena_scope *s, size_t size, int zero);
void *knhk_arena_scope_realloc(knhk_arena_scope *s, void *ptr, size_t size);
void knhk_arena_scope_free(knhk_arena_scope *s, void *ptr);
/* Blocks sent to the fallback so far. */
uint64_t knhk_arena_scope_fallbacks(const knhk_arena_scope *s);

/* ---------------------------------------------------------------- metrics (issue 17) */
/* A metrics block (native/metrics.c has the layout and the insertion
   protocol): a shared table of families and label sets, each owning
   consecutive counters of an embedded KNHK_COUNTERS_FLAVOR_SUM block. */
typedef struct knhk_metrics knhk_metrics;
typedef struct {
    uint32_t kind;        /* KNHK_METRICS_KIND_FAMILY or _SET */
    uint32_t parent;      /* a set's family entry */
    uint32_t cell;        /* first counter of the embedded block */
    uint32_t ncells;
    const char *key;      /* into the block; checked to lie inside it */
    size_t key_len;
    const char *payload;
    size_t payload_len;
} knhk_metrics_entry_info;
/* Bytes a block of max_sets label sets and `cells` counters needs; 0 out of range. */
size_t knhk_metrics_layout_size(uint32_t max_sets, uint32_t cells);
/* Format zeroed, KNHK_CACHE_LINE-aligned memory of at least the layout size. */
int knhk_metrics_format(void *mem, size_t size, uint32_t max_sets, uint32_t cells);
/* Validate the block at mem[0..size) (every offset against size) and open it. */
int knhk_metrics_open(void *mem, size_t size, knhk_metrics **out);
void knhk_metrics_close(knhk_metrics *m);
/* The embedded counter block (owned by m: do not close it). */
knhk_counters *knhk_metrics_counters(const knhk_metrics *m);
uint32_t knhk_metrics_capacity(const knhk_metrics *m);
uint32_t knhk_metrics_max_sets(const knhk_metrics *m);
uint32_t knhk_metrics_cells(const knhk_metrics *m);
/* out: label sets, families, arena bytes and cells in use. */
void knhk_metrics_usage(const knhk_metrics *m, uint64_t out[4]);
/* Find the entry (kind, parent, key) or insert it with payload and ncells
   fresh cells. KNHK_ERR_STATE with *full = KNHK_METRICS_FULL_* past a bound. */
int knhk_metrics_intern(knhk_metrics *m, uint32_t kind, uint32_t parent, const void *key, size_t key_len,
                        const void *payload, size_t payload_len, uint32_t ncells, uint32_t *entry_out,
                        uint32_t *cell_out, int *created, int *full);
/* The indices of READY entries into out[0..cap); *n receives their number. */
int knhk_metrics_list(const knhk_metrics *m, uint32_t *out, size_t cap, size_t *n);
/* One READY entry, bounds-checked: KNHK_ERR_STATE if not ready, _INVALID if corrupt. */
int knhk_metrics_entry_get(const knhk_metrics *m, uint32_t index, knhk_metrics_entry_info *out);
/* The values of the cells handed out so far, [0, *n), into out[0..cap)
   (cap >= knhk_metrics_cells is always enough). */
int knhk_metrics_values(const knhk_metrics *m, int64_t *out, size_t cap, size_t *n);
/* Record one histogram observation: +1 to the bucket cell of value (le
   semantics over bounds[0..nbounds), then +Inf at cell + nbounds), and
   sum_units to the sum cell at cell + nbounds + 1. */
int knhk_metrics_observe(knhk_counters *c, uint32_t cell, const double *bounds, uint32_t nbounds, double value,
                         int64_t sum_units);
/* ---------------------------------------------------------------- end metrics */

/* ---------------------------------------------------------------- pools (issue 19, native/pool.c) */

/* Where a pool's region is placed: mode is KNHK_NUMA_* and mask (words of 64
   node bits, may be NULL when mode is DEFAULT or LOCAL) the nodes it names. */
typedef struct {
    int mode;
    const uint64_t *mask;
    size_t mask_words;
} knhk_numa_spec;

/* Geometry and figures of a pool (every pool kind). */
typedef struct {
    uint64_t block_size;    /* bytes asked for */
    uint64_t stride;        /* the size class: bytes between block starts */
    uint64_t align;
    uint64_t capacity;      /* blocks */
    uint64_t region_bytes;  /* capacity * stride rounded up to pages */
    uint64_t in_use;        /* blocks handed out and not freed (exact) */
    uint64_t high_water;    /* the most in use at once (exact for FixedPool; for the
                               thread-safe pools the largest in_use some call saw) */
    uint64_t allocations;   /* successful allocations */
    uint64_t frees;         /* successful frees */
    uint64_t failed;        /* allocations refused because the pool was exhausted */
    uint64_t bad_frees;     /* frees refused: double, foreign, after close, forked */
    uint64_t cached;        /* blocks held in per-thread caches (ThreadLocalPool) */
    uint64_t remote_frees;  /* frees handed to another thread's cache (ThreadLocalPool) */
    int numa_mode;          /* the placement applied to the region */
    int closed;
} knhk_pool_stats;

/* The size class a pool serves block_size bytes aligned to align from: the
   smallest of 2^k and 3 * 2^k (k >= 3) >= block_size and a multiple of align.
   0 when the arguments are out of range (knhk_last_error() says which). */
uint64_t knhk_pool_size_class(size_t block_size, size_t align);

/* FixedPool: capacity blocks carved from one anonymous mapping, handed out in
   O(1) from an intrusive free list (a free block's first 4 bytes hold the
   next free block's number); the pool never grows. It belongs to the thread
   that made it (use LockFreePool or ThreadLocalPool to share).

   Checks, in release and debug builds alike (each is a compare or two): the
   owner thread, closed, a fork since creation (a generation counter bumped by
   a pthread_atfork child handler), and on free that the pointer is a block
   start of the region and that the block is allocated (a one-byte state per
   block, kept beside the region so a write after free cannot forge it). */
typedef struct knhk_pool knhk_pool;

int knhk_pool_create(size_t block_size, uint64_t capacity, size_t align, const knhk_numa_spec *numa, knhk_pool **out);
/* Stop serving blocks (alloc and free then return KNHK_POOL_CLOSED). The
   memory stays until knhk_pool_destroy, so views into it never dangle. */
void knhk_pool_close(knhk_pool *p);
void knhk_pool_destroy(knhk_pool *p);
/* NULL with *problem = KNHK_POOL_* when no block is given (problem may be NULL). */
void *knhk_pool_alloc(knhk_pool *p, int *problem);
int knhk_pool_free(knhk_pool *p, void *ptr);
/* Up to n blocks into out (addresses); returns how many (fewer when exhausted,
   with *problem set). */
uint64_t knhk_pool_alloc_many(knhk_pool *p, uint64_t *out, uint64_t n, int *problem);
/* Frees addrs[0..n); stops at the first bad one: returns how many were freed,
   *problem says why it stopped. */
uint64_t knhk_pool_free_many(knhk_pool *p, const uint64_t *addrs, uint64_t n, int *problem);
/* The same by block number (0..capacity-1) instead of address: for callers
   that keep one record per block in an array over the region. */
uint64_t knhk_pool_alloc_many_index(knhk_pool *p, int64_t *out, uint64_t n, int *problem);
uint64_t knhk_pool_free_many_index(knhk_pool *p, const int64_t *index, uint64_t n, int *problem);
/* The block number of ptr (0..capacity-1), or -1 when it is not a block start. */
int64_t knhk_pool_index(const knhk_pool *p, const void *ptr);
/* 1 when block i is allocated, 0 when free, -1 when i is out of range. */
int knhk_pool_is_allocated(const knhk_pool *p, uint64_t i);
void *knhk_pool_base(const knhk_pool *p);
void knhk_pool_stats_get(const knhk_pool *p, knhk_pool_stats *out);
/* The same calls with the block as an integer address (0: none), for the
   Python layer, where an integer converts faster than a pointer. */
uint64_t knhk_pool_alloc_addr(knhk_pool *p, int *problem);
int knhk_pool_free_addr(knhk_pool *p, uint64_t addr);

/* LockFreePool: the same geometry and checks (but any thread may use it), the
   free list a Treiber stack (R. K. Treiber, "Systems Programming: Coping with
   Parallelism", IBM RJ 5118, 1986) whose head packs a 32-bit block number
   with a 32-bit generation tag bumped on every change, so a stalled pop's CAS
   fails if the head went A -> B -> A meanwhile (ABA). The links live in a side
   array, not in the blocks, so a caller's writes never race with a pop. Head
   and counters sit on their own cache lines. */
typedef struct knhk_lfpool knhk_lfpool;

int knhk_lfpool_create(size_t block_size, uint64_t capacity, size_t align, const knhk_numa_spec *numa,
                       knhk_lfpool **out);
void knhk_lfpool_close(knhk_lfpool *p);
void knhk_lfpool_destroy(knhk_lfpool *p);
void *knhk_lfpool_alloc(knhk_lfpool *p, int *problem);
int knhk_lfpool_free(knhk_lfpool *p, void *ptr);
uint64_t knhk_lfpool_alloc_addr(knhk_lfpool *p, int *problem);
int knhk_lfpool_free_addr(knhk_lfpool *p, uint64_t addr);
int64_t knhk_lfpool_index(const knhk_lfpool *p, const void *ptr);
void *knhk_lfpool_base(const knhk_lfpool *p);
void knhk_lfpool_stats_get(const knhk_lfpool *p, knhk_pool_stats *out);

/* Stress: `threads` pthreads (1..64) each run `iterations` rounds of taking
   up to `hold` blocks (1..64), stamping each with (thread, round), checking
   the stamps, and freeing them. Returns KNHK_OK when every block was held by
   one thread at a time and the pool's counts add up exactly; else
   KNHK_ERR_STATE with knhk_last_error() naming the first fault. ops[0] gets
   the allocations made, ops[1] the frees, ops[2] the exhausted attempts. */
int knhk_lfpool_stress(knhk_lfpool *p, uint32_t threads, uint64_t iterations, uint32_t hold, uint64_t *ops);
/* Randomised-schedule check of the push and pop routines (the same code the
   pool runs, instantiated with a yield at every shared-memory step): threads
   virtual threads on real pthreads, one running at a time, the next chosen
   by a PRNG seeded with seed at every step, each doing ops alloc/free pairs
   on a fresh pool of capacity blocks. untagged != 0 checks a variant whose
   tag never changes (it must fail: the ABA the tag prevents). KNHK_OK, or
   KNHK_ERR_STATE naming the fault (a block handed out twice, a lost block). */
int knhk_lfpool_model_check(uint64_t seed, uint32_t threads, uint32_t ops, uint32_t capacity, int untagged,
                            uint64_t *steps);

/* ThreadLocalPool: a LockFreePool shared by every thread, plus a bounded
   cache of free blocks per thread (up to cache_size; refilled with
   cache_size / 2 blocks from the shared list, half returned when full). The
   owner's alloc and free touch only its cache (no atomic operation). A block
   freed by another thread is pushed onto its owner's remote-free list (one
   CAS, no lock), which the owner takes whole when its cache runs dry
   (mimalloc's thread-free list). At thread exit (a pthread key destructor)
   the cache and remote list go back to the shared list. */
typedef struct knhk_tlpool knhk_tlpool;

int knhk_tlpool_create(size_t block_size, uint64_t capacity, size_t align, uint32_t cache_size,
                       const knhk_numa_spec *numa, knhk_tlpool **out);
/* Close: the calling thread's cache is flushed; others flush at their exit.
   The memory goes when the last thread's cache is gone and destroy was called. */
void knhk_tlpool_close(knhk_tlpool *p);
void knhk_tlpool_destroy(knhk_tlpool *p);
void *knhk_tlpool_alloc(knhk_tlpool *p, int *problem);
int knhk_tlpool_free(knhk_tlpool *p, void *ptr);
uint64_t knhk_tlpool_alloc_addr(knhk_tlpool *p, int *problem);
int knhk_tlpool_free_addr(knhk_tlpool *p, uint64_t addr);
/* Return the calling thread's cache to the shared list now. */
void knhk_tlpool_flush(knhk_tlpool *p);
int64_t knhk_tlpool_index(const knhk_tlpool *p, const void *ptr);
void *knhk_tlpool_base(const knhk_tlpool *p);
void knhk_tlpool_stats_get(const knhk_tlpool *p, knhk_pool_stats *out);
/* threads pthreads each alloc/free iterations blocks, every other free going
   to the next thread's blocks (cross-thread); checks as knhk_lfpool_stress. */
int knhk_tlpool_stress(knhk_tlpool *p, uint32_t threads, uint64_t iterations, uint64_t *ops);

/* ---------------------------------------------------------------- NUMA (issue 19, native/numa.c) */

/* mbind(2) on [addr, addr + len) (addr page-aligned): mode KNHK_NUMA_*, mask
   words of node bits. Raw syscalls: no libnuma. KNHK_ERR_INVALID for a bad
   mode or mask, KNHK_ERR_UNAVAILABLE when the kernel refuses (ENOSYS, EPERM:
   no NUMA support or a seccomp filter), with the errno in the message. */
int knhk_numa_mbind(void *addr, size_t len, int mode, const uint64_t *mask, size_t mask_words);
/* set_mempolicy(2) for the calling thread. */
int knhk_numa_set_thread_policy(int mode, const uint64_t *mask, size_t mask_words);
/* get_mempolicy(2): the calling thread's mode, or with addr the node the page
   at addr is on (*node, -1 when it is not faulted in yet). */
int knhk_numa_thread_policy(int *mode);
int knhk_numa_node_of(void *addr, int *node);

/* NUMA placement of an arena's chunks (issue 19): every chunk taken from
   the backend after this call gets the policy on its whole pages (mbind with
   MPOL_MF_MOVE, so pages the allocator had touched before move too). spec
   NULL or mode KNHK_NUMA_DEFAULT turns it off. Owner thread only. */
int knhk_arena_set_numa(knhk_arena *a, const knhk_numa_spec *spec);
/* Chunks placed, and chunks whose placement the kernel refused (each refusal
   also leaves its message in knhk_last_error of the allocating thread). */
int knhk_arena_numa_counts(knhk_arena *a, uint64_t *placed, uint64_t *refused);

/* KNHK_CDEF_END */
#pragma GCC visibility pop

#ifdef __cplusplus
}
#endif

#endif /* KNHK_H */
