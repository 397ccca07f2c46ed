/*
 * knhk_hotops.h -- the tick harness's operations and the benchmarks' fixtures.
 *
 * Not for engines: each knhk_<concern>_hotop_<op> runs a real code path of
 * the core `iterations` times on the state behind ctx (knhk_hotop_fn; the
 * harness itself, knhk_ticks_measure, is in knhk.h), for the hot-path
 * budgets (knhk_memory.budgets) and benches/. Same prefix and export rules
 * as knhk.h; the region between the markers joins the cffi cdef.
 */
#ifndef KNHK_HOTOPS_H
#define KNHK_HOTOPS_H

#include "knhk.h"

#ifdef __cplusplus
extern "C" {
#endif

#pragma GCC visibility push(default)
/* KNHK_CDEF_BEGIN */

/* Hot-path operation: one 64-byte knhk_malloc + knhk_free pair.
   ctx: the const knhk_backend *. */
void knhk_backend_hotop_malloc_free(void *ctx, uint64_t iterations);

void knhk_ticks_hotop_empty(void *ctx, uint64_t iterations);

/* Hot-path operation: one knhk_once_get of a full cell. ctx: the knhk_once *. */
void knhk_once_hotop_read(void *ctx, uint64_t iterations);

/* Hot-path operation: knhk_registry_lookup of ids cycling over [1, max_id].
   ctx: a frozen knhk_registry *. */
void knhk_registry_hotop_lookup(void *ctx, uint64_t iterations);

/* Hot-path operation: knhk_counters_add(ctx, 0, 1). ctx: a knhk_counters *. */
void knhk_counters_hotop_add(void *ctx, uint64_t iterations);
/* Hot-path operations: knhk_counters_writer_add(w, 0, 1) with w the calling
   thread's writer for ctx (a knhk_counters *), fetched once per call; the
   add inlined as in a caller inside the library, and (_call) through a
   function pointer, as a caller in another shared object pays for it. */
void knhk_counters_hotop_writer_add(void *ctx, uint64_t iterations);
void knhk_counters_hotop_writer_add_call(void *ctx, uint64_t iterations);
/* False-sharing benchmark: two threads each add 1 `iterations` times to
   their own counter, the two counters KNHK_CACHE_LINE apart (padded != 0)
   or adjacent. atomic_rmw != 0 uses lock-prefixed adds instead of the
   owner's load+store. Wall time in ns into *elapsed_ns. */
int knhk_counters_bench_false_sharing(uint64_t iterations, int padded, int atomic_rmw, uint64_t *elapsed_ns);

/* Hot-path operation: one 64-byte, 16-aligned allocation from an arena with
   room (a reset, amortised, whenever the current chunk is full).
   ctx: a knhk_arena * owned by the calling thread. */
void knhk_arena_hotop_alloc(void *ctx, uint64_t iterations);

/* For knhk_store_hotop_probe: one present key of an open store. */
typedef struct {
    knhk_store *store;
    const char *key;
    size_t key_len;
} knhk_store_probe_ctx;

/* Hot-path operation: one lookup of a present key (hash, probe, bounds
   check, key compare). ctx: a knhk_store_probe_ctx *. */
void knhk_store_hotop_probe(void *ctx, uint64_t iterations);

/* Hot-path operations (knhk_hotop_fn). search_64: a 16-byte needle in a
   64-byte window (match in the last candidate) through a needle prepared at
   setup (`prepared`, from knhk_simd_needle_new on `needle`): the kernel
   pointer is fetched once per batch, every iteration is a full search. */
typedef struct {
    uint8_t window[64];
    uint8_t needle[16];
    int64_t result;
    knhk_simd_needle *prepared;
} knhk_simd_search64_ctx;
void knhk_simd_hotop_search_64(void *ctx, uint64_t iterations);
/* The same search through the dispatched knhk_simd_find (needle not
   prepared), for comparison; same ctx (`prepared` unused). */
void knhk_simd_hotop_search_64_dispatch(void *ctx, uint64_t iterations);

/* count_eq_4k: knhk_simd_count_eq over 1024 uint32 ids (4 KiB). */
typedef struct {
    uint32_t ids[1024];
    uint32_t value;
    uint64_t result;
} knhk_simd_count4k_ctx;
void knhk_simd_hotop_count_eq_4k(void *ctx, uint64_t iterations);

/* The median over `reps` batches of the ticks one call of fn(ctx, 1) costs,
   each batch timing fn(ctx, batch) with knhk_ticks_now (the TSC on x86_64,
   nanoseconds in a KNHK_PORTABLE build). reps is clamped to [1, 1001];
   batch 0 counts as 1. */
double knhk_simd_median_ticks(knhk_hotop_fn fn, void *ctx, uint64_t batch, uint32_t reps);

/* ---- pools (issue 19, native/pool.c) */

/* Hot-path operation: one knhk_pool_alloc + knhk_pool_free pair. ctx: knhk_pool * (owner thread). */
void knhk_pool_hotop_alloc_free(void *ctx, uint64_t iterations);

/* Throughput comparison in C (benches/bench_pools.py): `threads` pthreads
   each run `iterations` rounds of 8 allocations then 8 frees of block_size
   bytes from one shared allocator of `kind` (KNHK_POOL_BENCH_*; `backend`
   for KNHK_POOL_BENCH_BACKEND), capacity blocks for the pools. *seconds gets
   the wall time from the first thread's start to the last one's end. */
int knhk_pool_bench(int kind, const knhk_backend *backend, uint32_t threads, uint64_t iterations, size_t block_size,
                    uint64_t capacity, double *seconds);
/* Latency of single allocations (benches: the "deterministic" figure):
   `rounds` times, allocate n blocks of block_size one at a time from a fresh
   FixedPool (kind KNHK_POOL_BENCH_FIXED, capacity n) or the backend (kind
   KNHK_POOL_BENCH_BACKEND), reading knhk_ticks_now() before and after each,
   then free them all (untimed). ticks[r * n + i] gets each allocation's
   ticks, timer included; kind KNHK_POOL_BENCH_EMPTY times nothing, which
   gives the timer's own cost. */
int knhk_pool_latency(int kind, const knhk_backend *backend, size_t block_size, uint64_t n, uint32_t rounds,
                      uint64_t *ticks);

/* KNHK_CDEF_END */
#pragma GCC visibility pop

#ifdef __cplusplus
}
#endif

#endif /* KNHK_HOTOPS_H */
