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

/* Workflow store (native/store.c, docs/store.md). */
#define KNHK_STORE_HEADER_SIZE 128
#define KNHK_STORE_VERSION 1
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
/* knhk_store_find results other than a packed span. */
#define KNHK_STORE_ABSENT (-1)
#define KNHK_STORE_WIDE (-2)
#define KNHK_STORE_BROKEN (-3)

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
} knhk_store_info;

/* For knhk_store_hotop_probe: one present key of an open store. */
typedef struct {
    knhk_store *store;
    const char *key;
    size_t key_len;
} knhk_store_probe_ctx;

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
size_t knhk_store_encode_record(const char *key, size_t key_len, const char *value, size_t value_len,
                                uint64_t seed, uint8_t *out, size_t cap, uint64_t *key_hash);
/* Encode n records back to back into out[0, cap): record i has the key
   keys[sum of key_lens before i, + key_lens[i]) and likewise its value.
   hashes[i] gets its key hash, offsets[i] = base_offset + its position in out.
   Returns the bytes written, or 0 (with knhk_last_error()) when the lengths
   overrun keys_size / values_size or the records do not fit in cap. */
size_t knhk_store_encode_batch(const uint8_t *keys, uint64_t keys_size, const uint64_t *key_lens,
                               const uint8_t *values, uint64_t values_size, const uint64_t *value_lens,
                               uint64_t n, uint64_t seed, uint64_t base_offset, uint8_t *out, size_t cap,
                               uint64_t *hashes, uint64_t *offsets);
/* Build the Robin Hood index of n records: table[0, slots) (zeroed by the
   caller) and blocksums[ceil(slots / 512)]. Returns KNHK_OK, or
   KNHK_ERR_INVALID when slots < n or an offset does not fit in 48 bits. */
int knhk_store_build_index(const uint64_t *hashes, const uint64_t *offsets, uint64_t n, uint64_t slots,
                           uint64_t *table, uint64_t *blocksums, uint64_t *max_disp);

/* Install the CPython fast path into the module knhk_memory.store (which must
   be importable): the builtins _make_getter(handle_address, view, slow, owner) and
   _detach(getter). A getter (which keeps owner alive) is a METH_FASTCALL builtin get(key, default=None)
   that runs the probe with the GIL held (it is shorter than a GIL round trip)
   and returns view[off:off + len]; misses on anything but an absent key go to
   slow(key, code, default). Takes the GIL itself. */
int knhk_store_py_install(void);

/* Hot-path operation: one lookup of a present key (hash, probe, bounds
   check, key compare). ctx: a knhk_store_probe_ctx *. */
void knhk_store_hotop_probe(void *ctx, uint64_t iterations);

/* KNHK_CDEF_END */

#ifdef __cplusplus
}
#endif

#endif /* KNHK_H */
