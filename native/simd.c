/* simd.c -- byte-pattern search and id scans, one kernel per SIMD level.
 *
 * Every operation has a serial kernel (<op>_serial: the fallback on any CPU
 * and the reference the tests hold the others to) and AVX2 / AVX-512BW
 * kernels (<op>_avx2, <op>_avx512). The instruction set is enabled per
 * function with target attributes, never with -march, so the module runs on
 * any x86_64 and the scalar path builds on any architecture. One dispatch
 * table per level; the active one is chosen once (CPU features, KNHK_SIMD)
 * and can be forced at run time for tests.
 *
 * No kernel reads outside its buffer: AVX2 kernels finish with scalar tails,
 * AVX-512 kernels with masked loads (masked-off lanes never fault).
 */
#include <stdio.h>
#include <stdlib.h>
#include <strings.h>

#include "knhk_internal.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(KNHK_PORTABLE)
#define KNHK_SIMD_X86 1
#include <immintrin.h>
#include <x86intrin.h>
#define ATTR_AVX2 __attribute__((target("avx2,popcnt")))
#define ATTR_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,popcnt,bmi,bmi2")))
#else
#define KNHK_SIMD_X86 0
#endif

typedef int64_t (*find_fn)(const uint8_t *, size_t, const uint8_t *, size_t);
typedef uint64_t (*count_eq_fn)(const void *, size_t, uint64_t);
typedef size_t (*find_eq_fn)(const void *, size_t, uint64_t, size_t, int64_t *, size_t, size_t *);
typedef void (*mask_eq_fn)(const void *, size_t, uint64_t, uint8_t *);
typedef void (*isin_fn)(const void *, size_t, const uint64_t *, size_t, uint8_t *);
typedef void (*reduce_fn)(const void *, size_t, knhk_simd_reduction *);

/* Width index: 0..3 for 1, 2, 4, 8-byte elements. */
typedef struct {
    int level;
    find_fn find, rfind;
    knhk_simd_needle_fn needle_find;
    count_eq_fn count_eq[4];
    find_eq_fn find_eq[4];
    mask_eq_fn mask_eq[4];
    isin_fn isin[4];
    reduce_fn reduce[4];
} simd_table;

static inline int width_index(int width) {
    switch (width) {
    case 1: return 0;
    case 2: return 1;
    case 4: return 2;
    case 8: return 3;
    default: return -1;
    }
}

/* Verify a candidate without a library call: overlapping 8-byte words (the
   compiler turns the memcpys into plain loads), never past a + m. */
static inline bool same_bytes(const uint8_t *a, const uint8_t *b, size_t m) {
    if (m >= 8) {
        uint64_t x, y;
        size_t i = 0;
        for (; i + 8 < m; i += 8) {
            memcpy(&x, a + i, 8), memcpy(&y, b + i, 8);
            if (x != y) return false;
        }
        memcpy(&x, a + m - 8, 8), memcpy(&y, b + m - 8, 8);
        return x == y;
    }
    if (m >= 4) {
        uint32_t x0, y0, x1, y1;
        memcpy(&x0, a, 4), memcpy(&y0, b, 4), memcpy(&x1, a + m - 4, 4), memcpy(&y1, b + m - 4, 4);
        return x0 == y0 && x1 == y1;
    }
    for (size_t i = 0; i < m; i++)
        if (a[i] != b[i]) return false;
    return true;
}

/* ==================================================================== serial kernels */

/* The reference: a plain scan, first and last byte before the memcmp. */
static int64_t find_serial(const uint8_t *h, size_t n, const uint8_t *s, size_t m) {
    if (m == 0) return 0;
    if (m > n) return -1;
    const uint8_t first = s[0], last = s[m - 1];
    for (size_t i = 0; i + m <= n; i++)
        if (h[i] == first && h[i + m - 1] == last && memcmp(h + i, s, m) == 0) return (int64_t)i;
    return -1;
}

static int64_t rfind_serial(const uint8_t *h, size_t n, const uint8_t *s, size_t m) {
    if (m == 0) return (int64_t)n;
    if (m > n) return -1;
    const uint8_t first = s[0], last = s[m - 1];
    for (size_t i = n - m + 1; i-- > 0;)
        if (h[i] == first && h[i + m - 1] == last && memcmp(h + i, s, m) == 0) return (int64_t)i;
    return -1;
}

static int64_t needle_find_serial(const knhk_simd_needle *nd, const uint8_t *h, size_t n) {
    return find_serial(h, n, nd->bytes, nd->len);
}

/* The empty needle matches at 0, whatever the level. */
static int64_t needle_find_empty(const knhk_simd_needle *nd, const uint8_t *h, size_t n) {
    (void)nd, (void)h, (void)n;
    return 0;
}

#define SERIAL_ID_KERNELS(T, W)                                                                                        \
    static uint64_t count_eq_serial_u##W(const void *base, size_t n, uint64_t v64) {                                   \
        const T *a = base;                                                                                             \
        const T v = (T)v64;                                                                                            \
        uint64_t c = 0;                                                                                                \
        for (size_t i = 0; i < n; i++) c += a[i] == v;                                                                 \
        return c;                                                                                                      \
    }                                                                                                                  \
    static size_t find_eq_serial_u##W(const void *base, size_t n, uint64_t v64, size_t from, int64_t *out, size_t cap, \
                                      size_t *next) {                                                                  \
        const T *a = base;                                                                                             \
        const T v = (T)v64;                                                                                            \
        size_t k = 0, i = from;                                                                                        \
        for (; i < n && k < cap; i++)                                                                                  \
            if (a[i] == v) out[k++] = (int64_t)i;                                                                      \
        *next = i;                                                                                                     \
        return k;                                                                                                      \
    }                                                                                                                  \
    static void mask_eq_serial_u##W(const void *base, size_t n, uint64_t v64, uint8_t *out) {                          \
        const T *a = base;                                                                                             \
        const T v = (T)v64;                                                                                            \
        for (size_t i = 0; i < n; i++) out[i] = a[i] == v;                                                             \
    }                                                                                                                  \
    static void isin_serial_u##W(const void *base, size_t n, const uint64_t *set, size_t k, uint8_t *out) {            \
        const T *a = base;                                                                                             \
        for (size_t i = 0; i < n; i++) {                                                                               \
            uint8_t r = 0;                                                                                             \
            for (size_t j = 0; j < k; j++) r |= a[i] == (T)set[j];                                                     \
            out[i] = r;                                                                                                \
        }                                                                                                              \
    }                                                                                                                  \
    static void reduce_serial_u##W(const void *base, size_t n, knhk_simd_reduction *r) {                               \
        const T *a = base;                                                                                             \
        T mn = (T) ~(T)0, mx = 0;                                                                                      \
        uint64_t sum = 0;                                                                                              \
        for (size_t i = 0; i < n; i++) {                                                                               \
            mn = a[i] < mn ? a[i] : mn;                                                                                \
            mx = a[i] > mx ? a[i] : mx;                                                                                \
            sum += a[i];                                                                                               \
        }                                                                                                              \
        r->min = mn, r->max = mx, r->sum = sum;                                                                        \
    }

SERIAL_ID_KERNELS(uint8_t, 8)
SERIAL_ID_KERNELS(uint16_t, 16)
SERIAL_ID_KERNELS(uint32_t, 32)
SERIAL_ID_KERNELS(uint64_t, 64)

/* ==================================================================== loops the compiler vectorises
 * mask_eq, isin and reduce are element-wise or plain reductions: GCC and
 * clang vectorise them well once the ISA is enabled, so the AVX2 and AVX-512
 * kernels are these bodies compiled under each target attribute. */

#define VECTORISED_ID_KERNELS(ISA, ATTR, T, W)                                                               \
    ATTR static void mask_eq_##ISA##_u##W(const void *base, size_t n, uint64_t v64, uint8_t *restrict out) { \
        const T *restrict a = base;                                                                          \
        const T v = (T)v64;                                                                                  \
        for (size_t i = 0; i < n; i++) out[i] = a[i] == v;                                                   \
    }                                                                                                        \
    /* Chunked so each set value sweeps a block that stays in L1. */                                         \
    ATTR static void isin_##ISA##_u##W(const void *base, size_t n, const uint64_t *set, size_t k,            \
                                       uint8_t *restrict out) {                                              \
        const T *restrict a = base;                                                                          \
        for (size_t c = 0; c < n; c += 2048) {                                                               \
            size_t len = n - c < 2048 ? n - c : 2048;                                                        \
            const T *restrict ac = a + c;                                                                    \
            uint8_t *restrict oc = out + c;                                                                  \
            for (size_t i = 0; i < len; i++) oc[i] = 0;                                                      \
            for (size_t j = 0; j < k; j++) {                                                                 \
                const T v = (T)set[j];                                                                       \
                for (size_t i = 0; i < len; i++) oc[i] |= ac[i] == v;                                        \
            }                                                                                                \
        }                                                                                                    \
    }                                                                                                        \
    ATTR static void reduce_##ISA##_u##W(const void *base, size_t n, knhk_simd_reduction *r) {               \
        const T *restrict a = base;                                                                          \
        T mn = (T) ~(T)0, mx = 0;                                                                            \
        uint64_t sum = 0;                                                                                    \
        for (size_t i = 0; i < n; i++) {                                                                     \
            mn = a[i] < mn ? a[i] : mn;                                                                      \
            mx = a[i] > mx ? a[i] : mx;                                                                      \
            sum += a[i];                                                                                     \
        }                                                                                                    \
        r->min = mn, r->max = mx, r->sum = sum;                                                              \
    }

/* ==================================================================== explicit SIMD kernels */

#if KNHK_SIMD_X86

/* ---- equality masks: one bit per element of a 64-byte block. */

ATTR_AVX2 static inline uint64_t eqmask_avx2_u8(const uint8_t *p, uint8_t v) {
    __m256i vv = _mm256_set1_epi8((char)v);
    uint32_t lo = (uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(_mm256_loadu_si256((const void *)p), vv));
    uint32_t hi = (uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(_mm256_loadu_si256((const void *)(p + 32)), vv));
    return (uint64_t)lo | ((uint64_t)hi << 32);
}
ATTR_AVX2 static inline uint64_t eqmask_avx2_u16(const uint16_t *p, uint16_t v) {
    __m256i vv = _mm256_set1_epi16((short)v);
    __m256i a = _mm256_cmpeq_epi16(_mm256_loadu_si256((const void *)p), vv);
    __m256i b = _mm256_cmpeq_epi16(_mm256_loadu_si256((const void *)(p + 16)), vv);
    /* packs interleaves 128-bit lanes; the permute puts elements back in order. */
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi16(a, b), 0xD8);
    return (uint32_t)_mm256_movemask_epi8(packed);
}
ATTR_AVX2 static inline uint64_t eqmask_avx2_u32(const uint32_t *p, uint32_t v) {
    __m256i vv = _mm256_set1_epi32((int)v);
    unsigned lo =
        (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_loadu_si256((const void *)p), vv)));
    unsigned hi = (unsigned)_mm256_movemask_ps(
        _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_loadu_si256((const void *)(p + 8)), vv)));
    return lo | (hi << 8);
}
ATTR_AVX2 static inline uint64_t eqmask_avx2_u64(const uint64_t *p, uint64_t v) {
    __m256i vv = _mm256_set1_epi64x((long long)v);
    unsigned lo =
        (unsigned)_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(_mm256_loadu_si256((const void *)p), vv)));
    unsigned hi = (unsigned)_mm256_movemask_pd(
        _mm256_castsi256_pd(_mm256_cmpeq_epi64(_mm256_loadu_si256((const void *)(p + 4)), vv)));
    return lo | (hi << 4);
}
/* AVX2 tails: the last partial block, element by element. */
#define AVX2_TAIL(T, W)                                                                 \
    ATTR_AVX2 static inline uint64_t eqmask_tail_avx2_u##W(const T *p, size_t r, T v) { \
        uint64_t m = 0;                                                                 \
        for (size_t j = 0; j < r; j++) m |= (uint64_t)(p[j] == v) << j;                 \
        return m;                                                                       \
    }
AVX2_TAIL(uint8_t, 8)
AVX2_TAIL(uint16_t, 16)
AVX2_TAIL(uint32_t, 32)
AVX2_TAIL(uint64_t, 64)

/* AVX-512: one compare into a mask register; the tail is a masked load. */
ATTR_AVX512 static inline uint64_t eqmask_avx512_u8(const uint8_t *p, uint8_t v) {
    return _mm512_cmpeq_epi8_mask(_mm512_loadu_si512((const void *)p), _mm512_set1_epi8((char)v));
}
ATTR_AVX512 static inline uint64_t eqmask_tail_avx512_u8(const uint8_t *p, size_t r, uint8_t v) {
    __mmask64 k = _bzhi_u64(~0ULL, (unsigned)r);
    return _mm512_mask_cmpeq_epi8_mask(k, _mm512_maskz_loadu_epi8(k, p), _mm512_set1_epi8((char)v));
}
ATTR_AVX512 static inline uint64_t eqmask_avx512_u16(const uint16_t *p, uint16_t v) {
    return _mm512_cmpeq_epi16_mask(_mm512_loadu_si512((const void *)p), _mm512_set1_epi16((short)v));
}
ATTR_AVX512 static inline uint64_t eqmask_tail_avx512_u16(const uint16_t *p, size_t r, uint16_t v) {
    __mmask32 k = (__mmask32)_bzhi_u32(~0U, (unsigned)r);
    return _mm512_mask_cmpeq_epi16_mask(k, _mm512_maskz_loadu_epi16(k, p), _mm512_set1_epi16((short)v));
}
ATTR_AVX512 static inline uint64_t eqmask_avx512_u32(const uint32_t *p, uint32_t v) {
    return _mm512_cmpeq_epi32_mask(_mm512_loadu_si512((const void *)p), _mm512_set1_epi32((int)v));
}
ATTR_AVX512 static inline uint64_t eqmask_tail_avx512_u32(const uint32_t *p, size_t r, uint32_t v) {
    __mmask16 k = (__mmask16)_bzhi_u32(~0U, (unsigned)r);
    return _mm512_mask_cmpeq_epi32_mask(k, _mm512_maskz_loadu_epi32(k, p), _mm512_set1_epi32((int)v));
}
ATTR_AVX512 static inline uint64_t eqmask_avx512_u64(const uint64_t *p, uint64_t v) {
    return _mm512_cmpeq_epi64_mask(_mm512_loadu_si512((const void *)p), _mm512_set1_epi64((long long)v));
}
ATTR_AVX512 static inline uint64_t eqmask_tail_avx512_u64(const uint64_t *p, size_t r, uint64_t v) {
    __mmask8 k = (__mmask8)_bzhi_u32(~0U, (unsigned)r);
    return _mm512_mask_cmpeq_epi64_mask(k, _mm512_maskz_loadu_epi64(k, p), _mm512_set1_epi64((long long)v));
}

/* count_eq and find_eq over 64-byte blocks of equality masks. count_eq keeps
   four independent counters so the popcount chain is not the bottleneck. */
#define MASK_ID_KERNELS(ISA, ATTR, T, W)                                                                              \
    ATTR static uint64_t count_eq_pop_##ISA##_u##W(const void *base, size_t n, uint64_t v64) {                        \
        const T *a = base;                                                                                            \
        const T v = (T)v64;                                                                                           \
        enum { E = 64 / sizeof(T) };                                                                                  \
        uint64_t c0 = 0, c1 = 0, c2 = 0, c3 = 0;                                                                      \
        size_t i = 0;                                                                                                 \
        for (; i + 4 * E <= n; i += 4 * E) {                                                                          \
            c0 += (uint64_t)__builtin_popcountll(eqmask_##ISA##_u##W(a + i, v));                                      \
            c1 += (uint64_t)__builtin_popcountll(eqmask_##ISA##_u##W(a + i + E, v));                                  \
            c2 += (uint64_t)__builtin_popcountll(eqmask_##ISA##_u##W(a + i + 2 * E, v));                              \
            c3 += (uint64_t)__builtin_popcountll(eqmask_##ISA##_u##W(a + i + 3 * E, v));                              \
        }                                                                                                             \
        for (; i + E <= n; i += E) c0 += (uint64_t)__builtin_popcountll(eqmask_##ISA##_u##W(a + i, v));               \
        if (i < n) c0 += (uint64_t)__builtin_popcountll(eqmask_tail_##ISA##_u##W(a + i, n - i, v));                   \
        return c0 + c1 + c2 + c3;                                                                                     \
    }                                                                                                                 \
    ATTR static size_t find_eq_bits_##ISA##_u##W(const void *base, size_t n, uint64_t v64, size_t from, int64_t *out, \
                                                 size_t cap, size_t *next) {                                          \
        const T *a = base;                                                                                            \
        const T v = (T)v64;                                                                                           \
        enum { E = 64 / sizeof(T) };                                                                                  \
        size_t k = 0, i = from;                                                                                       \
        /* While a whole block's results fit, write four positions per block \
           unconditionally and advance by the popcount: at the id densities of \
           workflow logs a "while (mask)" loop mispredicts on most blocks. */                                        \
        while (i + E <= n && k + E <= cap) {                                                                          \
            uint64_t m = eqmask_##ISA##_u##W(a + i, v);                                                               \
            size_t cnt = (size_t)__builtin_popcountll(m);                                                             \
            int64_t *o = out + k;                                                                                     \
            for (int j = 0; j < 4; j++) {                                                                             \
                o[j] = (int64_t)(i + (size_t)(m ? __builtin_ctzll(m) : 0));                                           \
                m &= m - 1;                                                                                           \
            }                                                                                                         \
            for (int j = 4; _knhk_unlikely(m != 0); j++) {                                                            \
                o[j] = (int64_t)(i + (size_t)__builtin_ctzll(m));                                                     \
                m &= m - 1;                                                                                           \
            }                                                                                                         \
            k += cnt;                                                                                                 \
            i += E;                                                                                                   \
        }                                                                                                             \
        while (i < n) {                                                                                               \
            size_t r = n - i;                                                                                         \
            uint64_t m = r >= E ? eqmask_##ISA##_u##W(a + i, v) : eqmask_tail_##ISA##_u##W(a + i, r, v);              \
            while (m) {                                                                                               \
                if (k == cap) {                                                                                       \
                    *next = i + (size_t)__builtin_ctzll(m);                                                           \
                    return k;                                                                                         \
                }                                                                                                     \
                out[k++] = (int64_t)(i + (size_t)__builtin_ctzll(m));                                                 \
                m &= m - 1;                                                                                           \
            }                                                                                                         \
            i += r >= E ? (size_t)E : r;                                                                              \
        }                                                                                                             \
        *next = n;                                                                                                    \
        return k;                                                                                                     \
    }

MASK_ID_KERNELS(avx2, ATTR_AVX2, uint8_t, 8)
MASK_ID_KERNELS(avx2, ATTR_AVX2, uint16_t, 16)
MASK_ID_KERNELS(avx2, ATTR_AVX2, uint32_t, 32)
MASK_ID_KERNELS(avx2, ATTR_AVX2, uint64_t, 64)
MASK_ID_KERNELS(avx512, ATTR_AVX512, uint8_t, 8)
MASK_ID_KERNELS(avx512, ATTR_AVX512, uint16_t, 16)
MASK_ID_KERNELS(avx512, ATTR_AVX512, uint32_t, 32)
MASK_ID_KERNELS(avx512, ATTR_AVX512, uint64_t, 64)

/* count_eq for 8- and 16-bit ids: a 64-byte block gives 32 or 64 mask bits,
   a popcount a block is cheap. */
#define count_eq_avx2_u8 count_eq_pop_avx2_u8
#define count_eq_avx2_u16 count_eq_pop_avx2_u16
#define count_eq_avx512_u8 count_eq_pop_avx512_u8
#define count_eq_avx512_u16 count_eq_pop_avx512_u16

/* count_eq for 32- and 64-bit ids: a block gives only 16 or 8 mask bits, and
   moving each mask to a general register for a popcount costs more than the
   compare. Instead every lane counts its own matches in a vector accumulator
   (AVX2: subtract the all-ones compare result; AVX-512: a masked add of 1),
   two uops per block, reduced once per chunk of at most 2^24 blocks (a lane
   counter cannot overflow). Four blocks per iteration into one accumulator:
   the add has a latency of one cycle, the compare port is the limit anyway,
   and GCC copies merge-masked accumulators when there are several. The rest
   (< 4 blocks) goes to the popcount kernel. (Inside the x86 section.) */
#define LANE_COUNT_KERNEL(ISA, ATTR, T, W, VEC, SET1, LOAD, STEP, HSUM)                                        \
    ATTR static uint64_t count_eq_##ISA##_u##W(const void *base, size_t n, uint64_t v64) {                     \
        const T *a = base;                                                                                     \
        enum { E = 64 / sizeof(T), CHUNK = E << 24 };                                                          \
        const VEC vv = SET1(v64);                                                                              \
        uint64_t total = 0;                                                                                    \
        size_t i = 0;                                                                                          \
        while (n - i >= 4 * E) {                                                                               \
            const size_t stop = n - i > CHUNK ? i + CHUNK : n;                                                 \
            VEC c = SET1(0);                                                                                   \
            /* Large inputs come from DRAM: prefetch 2 KiB ahead (lines inside \
               the array only). Small ones are in cache, where the hints cost. */                               \
            if (stop - i >= PREFETCH_MIN / sizeof(T))                                                          \
                for (; i + 4 * E + PREFETCH_AHEAD / sizeof(T) <= stop; i += 4 * E) {                           \
                    for (int q = 0; q < 4; q++)                                                                \
                        _mm_prefetch((const char *)(a + i + PREFETCH_AHEAD / sizeof(T) + q * E), _MM_HINT_T0); \
                    c = STEP(c, LOAD(a + i), vv);                                                              \
                    c = STEP(c, LOAD(a + i + E), vv);                                                          \
                    c = STEP(c, LOAD(a + i + 2 * E), vv);                                                      \
                    c = STEP(c, LOAD(a + i + 3 * E), vv);                                                      \
                }                                                                                              \
            for (; i + 4 * E <= stop; i += 4 * E) {                                                            \
                c = STEP(c, LOAD(a + i), vv);                                                                  \
                c = STEP(c, LOAD(a + i + E), vv);                                                              \
                c = STEP(c, LOAD(a + i + 2 * E), vv);                                                          \
                c = STEP(c, LOAD(a + i + 3 * E), vv);                                                          \
            }                                                                                                  \
            total += HSUM(c);                                                                                  \
        }                                                                                                      \
        return total + count_eq_pop_##ISA##_u##W(a + i, n - i, v64);                                           \
    }

/* Software prefetch for the streaming id scans: with several uops per block
   the out-of-order window holds too few loads to cover DRAM latency on this
   class of VM (find_eq on 64 MiB: 12.2 -> 7.4 ms). Only lines inside the
   array are prefetched. */
#define PREFETCH_AHEAD 2048
#define PREFETCH_MIN (64 * 1024)

/* One 64-byte block = two 32-byte halves for AVX2. */
typedef struct {
    __m256i lo, hi;
} v2x256;
ATTR_AVX2 static inline v2x256 v2_set1_32(uint64_t v) {
    return (v2x256){_mm256_set1_epi32((int)(uint32_t)v), _mm256_set1_epi32((int)(uint32_t)v)};
}
ATTR_AVX2 static inline v2x256 v2_set1_64(uint64_t v) {
    return (v2x256){_mm256_set1_epi64x((long long)v), _mm256_set1_epi64x((long long)v)};
}
ATTR_AVX2 static inline v2x256 v2_load(const void *p) {
    return (v2x256){_mm256_loadu_si256((const void *)p), _mm256_loadu_si256((const void *)((const char *)p + 32))};
}
ATTR_AVX2 static inline v2x256 v2_step32(v2x256 c, v2x256 x, v2x256 v) {
    return (v2x256){_mm256_sub_epi32(c.lo, _mm256_cmpeq_epi32(x.lo, v.lo)),
                    _mm256_sub_epi32(c.hi, _mm256_cmpeq_epi32(x.hi, v.hi))};
}
ATTR_AVX2 static inline v2x256 v2_step64(v2x256 c, v2x256 x, v2x256 v) {
    return (v2x256){_mm256_sub_epi64(c.lo, _mm256_cmpeq_epi64(x.lo, v.lo)),
                    _mm256_sub_epi64(c.hi, _mm256_cmpeq_epi64(x.hi, v.hi))};
}
ATTR_AVX2 static inline uint64_t v2_hsum32(v2x256 c) {
    /* A chunk is at most 2^24 blocks: the 32-bit sum of the lanes fits. */
    __m256i s = _mm256_add_epi32(c.lo, c.hi);
    __m128i x = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0x4E));
    x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0xB1));
    return (uint32_t)_mm_cvtsi128_si32(x);
}
ATTR_AVX2 static inline uint64_t v2_hsum64(v2x256 c) {
    __m256i s = _mm256_add_epi64(c.lo, c.hi);
    __m128i x = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    return (uint64_t)_mm_cvtsi128_si64(x) + (uint64_t)_mm_extract_epi64(x, 1);
}
ATTR_AVX512 static inline __m512i z_set1_32(uint64_t v) { return _mm512_set1_epi32((int)(uint32_t)v); }
ATTR_AVX512 static inline __m512i z_set1_64(uint64_t v) { return _mm512_set1_epi64((long long)v); }
ATTR_AVX512 static inline __m512i z_load(const void *p) { return _mm512_loadu_si512(p); }
ATTR_AVX512 static inline __m512i z_step32(__m512i c, __m512i x, __m512i v) {
    return _mm512_mask_sub_epi32(c, _mm512_cmpeq_epi32_mask(x, v), c, _mm512_set1_epi32(-1));
}
ATTR_AVX512 static inline __m512i z_step64(__m512i c, __m512i x, __m512i v) {
    return _mm512_mask_sub_epi64(c, _mm512_cmpeq_epi64_mask(x, v), c, _mm512_set1_epi64(-1));
}
ATTR_AVX512 static inline uint64_t z_hsum32(__m512i c) { return (uint32_t)_mm512_reduce_add_epi32(c); }
ATTR_AVX512 static inline uint64_t z_hsum64(__m512i c) { return (uint64_t)_mm512_reduce_add_epi64(c); }

LANE_COUNT_KERNEL(avx2, ATTR_AVX2, uint32_t, 32, v2x256, v2_set1_32, v2_load, v2_step32, v2_hsum32)
LANE_COUNT_KERNEL(avx2, ATTR_AVX2, uint64_t, 64, v2x256, v2_set1_64, v2_load, v2_step64, v2_hsum64)
LANE_COUNT_KERNEL(avx512, ATTR_AVX512, uint32_t, 32, __m512i, z_set1_32, z_load, z_step32, z_hsum32)
LANE_COUNT_KERNEL(avx512, ATTR_AVX512, uint64_t, 64, __m512i, z_set1_64, z_load, z_step64, z_hsum64)

/* find_eq for 8- and 16-bit ids: the bit loop above (a block holds 32 or 64
   ids, of which few match). */
#define find_eq_avx2_u8 find_eq_bits_avx2_u8
#define find_eq_avx2_u16 find_eq_bits_avx2_u16
#define find_eq_avx512_u8 find_eq_bits_avx512_u8
#define find_eq_avx512_u16 find_eq_bits_avx512_u16

/* find_eq for 32- and 64-bit ids without a bit loop: the positions of one
   block are written as whole vectors and the output advances by the number
   of matches, so no branch depends on the data.
   - AVX-512: vpcompressq packs the matching lanes of an index vector
     (base + 0..7) to the front; one full 64-byte store, most of it
     overwritten by the next.
   - AVX2: a lookup table gives, for each 4-bit piece of the mask, the
     offsets of its set bits (plus the piece's place in the block); one
     32-byte store of base + offsets per piece.
   While a whole block's positions fit (k + E <= cap) every store stays inside
   out[0, cap); the rest, and a full buffer, go to the bit loop. */
ATTR_AVX512 static size_t find_eq_avx512_u32(const void *base, size_t n, uint64_t v64, size_t from, int64_t *out,
                                             size_t cap, size_t *next) {
    const uint32_t *a = base;
    const __m512i vv = _mm512_set1_epi32((int)(uint32_t)v64), step = _mm512_set1_epi64(16);
    __m512i lo = _mm512_add_epi64(_mm512_set1_epi64((long long)from), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
    __m512i hi = _mm512_add_epi64(lo, _mm512_set1_epi64(8));
    size_t k = 0, i = from;
    for (; i + 16 <= n && k + 16 <= cap; i += 16) {
        _mm_prefetch((const char *)(a + (i + PREFETCH_AHEAD / 4 < n ? i + PREFETCH_AHEAD / 4 : i)), _MM_HINT_T0);
        const unsigned m = _mm512_cmpeq_epi32_mask(_mm512_loadu_si512((const void *)(a + i)), vv);
        _mm512_storeu_si512((void *)(out + k), _mm512_maskz_compress_epi64((__mmask8)m, lo));
        k += (size_t)__builtin_popcount(m & 0xFF);
        _mm512_storeu_si512((void *)(out + k), _mm512_maskz_compress_epi64((__mmask8)(m >> 8), hi));
        k += (size_t)__builtin_popcount(m >> 8);
        lo = _mm512_add_epi64(lo, step);
        hi = _mm512_add_epi64(hi, step);
    }
    return k + find_eq_bits_avx512_u32(base, n, v64, i, out + k, cap - k, next);
}

ATTR_AVX512 static size_t find_eq_avx512_u64(const void *base, size_t n, uint64_t v64, size_t from, int64_t *out,
                                             size_t cap, size_t *next) {
    const uint64_t *a = base;
    const __m512i vv = _mm512_set1_epi64((long long)v64), step = _mm512_set1_epi64(8);
    __m512i idx = _mm512_add_epi64(_mm512_set1_epi64((long long)from), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
    size_t k = 0, i = from;
    for (; i + 8 <= n && k + 8 <= cap; i += 8) {
        _mm_prefetch((const char *)(a + (i + PREFETCH_AHEAD / 8 < n ? i + PREFETCH_AHEAD / 8 : i)), _MM_HINT_T0);
        const __mmask8 m = _mm512_cmpeq_epi64_mask(_mm512_loadu_si512((const void *)(a + i)), vv);
        _mm512_storeu_si512((void *)(out + k), _mm512_maskz_compress_epi64(m, idx));
        k += (size_t)__builtin_popcount(m);
        idx = _mm512_add_epi64(idx, step);
    }
    return k + find_eq_bits_avx512_u64(base, n, v64, i, out + k, cap - k, next);
}

/* nibble_offsets[j][b]: the offsets in a block of the set bits of 4-bit
   piece b at place j (4j + bit), lowest first; unused entries are 0.
   (Generated: [4 * j + bit for bit in range(4) if b >> bit & 1].) */
/* clang-format off: four rows of four entries read as the table they are */
static const int64_t nibble_offsets[4][16][4] __attribute__((aligned(32))) = {
    {
        {0, 0, 0, 0},
        {0, 0, 0, 0},
        {1, 0, 0, 0},
        {0, 1, 0, 0},
        {2, 0, 0, 0},
        {0, 2, 0, 0},
        {1, 2, 0, 0},
        {0, 1, 2, 0},
        {3, 0, 0, 0},
        {0, 3, 0, 0},
        {1, 3, 0, 0},
        {0, 1, 3, 0},
        {2, 3, 0, 0},
        {0, 2, 3, 0},
        {1, 2, 3, 0},
        {0, 1, 2, 3},
    },
    {
        {0, 0, 0, 0},
        {4, 0, 0, 0},
        {5, 0, 0, 0},
        {4, 5, 0, 0},
        {6, 0, 0, 0},
        {4, 6, 0, 0},
        {5, 6, 0, 0},
        {4, 5, 6, 0},
        {7, 0, 0, 0},
        {4, 7, 0, 0},
        {5, 7, 0, 0},
        {4, 5, 7, 0},
        {6, 7, 0, 0},
        {4, 6, 7, 0},
        {5, 6, 7, 0},
        {4, 5, 6, 7},
    },
    {
        {0, 0, 0, 0},
        {8, 0, 0, 0},
        {9, 0, 0, 0},
        {8, 9, 0, 0},
        {10, 0, 0, 0},
        {8, 10, 0, 0},
        {9, 10, 0, 0},
        {8, 9, 10, 0},
        {11, 0, 0, 0},
        {8, 11, 0, 0},
        {9, 11, 0, 0},
        {8, 9, 11, 0},
        {10, 11, 0, 0},
        {8, 10, 11, 0},
        {9, 10, 11, 0},
        {8, 9, 10, 11},
    },
    {
        {0, 0, 0, 0},
        {12, 0, 0, 0},
        {13, 0, 0, 0},
        {12, 13, 0, 0},
        {14, 0, 0, 0},
        {12, 14, 0, 0},
        {13, 14, 0, 0},
        {12, 13, 14, 0},
        {15, 0, 0, 0},
        {12, 15, 0, 0},
        {13, 15, 0, 0},
        {12, 13, 15, 0},
        {14, 15, 0, 0},
        {12, 14, 15, 0},
        {13, 14, 15, 0},
        {12, 13, 14, 15},
    },
};
/* clang-format on */

#define NIBBLE_FIND_EQ(T, W, PIECES)                                                                                 \
    ATTR_AVX2 static size_t find_eq_avx2_u##W(const void *base, size_t n, uint64_t v64, size_t from, int64_t *out,   \
                                              size_t cap, size_t *next) {                                            \
        const T *a = base;                                                                                           \
        enum { E = 4 * PIECES };                                                                                     \
        size_t k = 0, i = from;                                                                                      \
        for (; i + E <= n && k + E <= cap; i += E) {                                                                 \
            _mm_prefetch((const char *)(a + (i + PREFETCH_AHEAD / W * 8 < n ? i + PREFETCH_AHEAD / W * 8 : i)),      \
                         _MM_HINT_T0);                                                                               \
            const unsigned m = (unsigned)eqmask_avx2_u##W(a + i, (T)v64);                                            \
            const __m256i b = _mm256_set1_epi64x((long long)i);                                                      \
            for (int j = 0; j < PIECES; j++) {                                                                       \
                const unsigned piece = (m >> (4 * j)) & 15;                                                          \
                _mm256_storeu_si256((void *)(out + k),                                                               \
                                    _mm256_add_epi64(b, _mm256_load_si256((const void *)nibble_offsets[j][piece]))); \
                k += (size_t)__builtin_popcount(piece);                                                              \
            }                                                                                                        \
        }                                                                                                            \
        return k + find_eq_bits_avx2_u##W(base, n, v64, i, out + k, cap - k, next);                                  \
    }
NIBBLE_FIND_EQ(uint32_t, 32, 4)
NIBBLE_FIND_EQ(uint64_t, 64, 2)

VECTORISED_ID_KERNELS(avx2, ATTR_AVX2, uint8_t, 8)
VECTORISED_ID_KERNELS(avx2, ATTR_AVX2, uint16_t, 16)
VECTORISED_ID_KERNELS(avx2, ATTR_AVX2, uint32_t, 32)
VECTORISED_ID_KERNELS(avx2, ATTR_AVX2, uint64_t, 64)
VECTORISED_ID_KERNELS(avx512, ATTR_AVX512, uint8_t, 8)
VECTORISED_ID_KERNELS(avx512, ATTR_AVX512, uint16_t, 16)
VECTORISED_ID_KERNELS(avx512, ATTR_AVX512, uint32_t, 32)
VECTORISED_ID_KERNELS(avx512, ATTR_AVX512, uint64_t, 64)

/* ---- substring search (the filter of Wojciech Mula's "SIMD-friendly
 * algorithms for substring searching", as StringZilla uses it): compare the
 * needle's first, middle and last bytes at 32 / 64 candidate positions at
 * once, and memcmp only where all three agree. Three probes rather than two
 * keep the false-positive rate low on text with skewed byte frequencies. */

/* Candidates of one block, lowest first. Out of line so the scanning loops
   keep few registers live (no spills, no frame) while masks come back empty. */
__attribute__((noinline)) static int64_t verify_forward(const uint8_t *h, size_t i, uint64_t mask, const uint8_t *s,
                                                        size_t m) {
    do {
        size_t p = i + (size_t)__builtin_ctzll(mask);
        if (same_bytes(h + p, s, m)) return (int64_t)p;
        mask &= mask - 1;
    } while (mask);
    return -1;
}

/* The 32 candidates from i: bit j is set when candidate i + j agrees with the
   needle at its first, middle and last byte. */
ATTR_AVX2 static inline uint32_t probe_avx2(const uint8_t *h, size_t i, size_t mid, size_t m, __m256i f, __m256i c,
                                            __m256i l) {
    __m256i x = _mm256_and_si256(_mm256_cmpeq_epi8(f, _mm256_loadu_si256((const void *)(h + i))),
                                 _mm256_cmpeq_epi8(l, _mm256_loadu_si256((const void *)(h + i + m - 1))));
    x = _mm256_and_si256(x, _mm256_cmpeq_epi8(c, _mm256_loadu_si256((const void *)(h + i + mid))));
    return (uint32_t)_mm256_movemask_epi8(x);
}

/* find for 0 < m <= n and at least 32 candidates, with the probe bytes
   already broadcast (by the caller per call, or once in a prepared needle).
   Two 32-candidate blocks per iteration, so two loads per probe are in
   flight and the loop branch is taken half as often; the remaining 1..63
   candidates take at most two more blocks, the last one re-loaded over the
   final 32 candidates (candidate cands - 1 ends at h[n - 1]: no read past the
   end). */
ATTR_AVX2 static inline __attribute__((always_inline)) int64_t find_avx2_core(const uint8_t *h, size_t n,
                                                                              const uint8_t *s, size_t m, __m256i f,
                                                                              __m256i c, __m256i l) {
    const size_t mid = m / 2, cands = n - m + 1;
    size_t i = 0;
#define FIND_AVX2_TWO_BLOCKS()                                                                                      \
    do {                                                                                                            \
        uint64_t mask = probe_avx2(h, i, mid, m, f, c, l) | (uint64_t)probe_avx2(h, i + 32, mid, m, f, c, l) << 32; \
        if (_knhk_unlikely(mask != 0)) {                                                                            \
            int64_t p = verify_forward(h, i, mask, s, m);                                                           \
            if (p >= 0) return p;                                                                                   \
        }                                                                                                           \
    } while (0)
    if (n >= PREFETCH_MIN) /* from DRAM: prefetch ahead, as the AVX-512 loop */
        for (; i + 64 + PREFETCH_AHEAD <= cands; i += 64) {
            _mm_prefetch((const char *)(h + i + PREFETCH_AHEAD), _MM_HINT_T0);
            FIND_AVX2_TWO_BLOCKS();
        }
    for (; i + 64 <= cands; i += 64) FIND_AVX2_TWO_BLOCKS();
#undef FIND_AVX2_TWO_BLOCKS
    if (i < cands) {
        const size_t r = cands - i; /* 1..63 candidates left */
        const uint32_t tail = probe_avx2(h, cands - 32, mid, m, f, c, l); /* candidates i + r - 32 + t */
        uint64_t mask =
            r > 32 ? probe_avx2(h, i, mid, m, f, c, l) | (uint64_t)tail << (r - 32) : (uint64_t)(tail >> (32 - r));
        if (mask) return verify_forward(h, i, mask, s, m);
    }
    return -1;
}

/* Fewer than 32 candidates: too few for a block without reading past the end. */
__attribute__((noinline)) static int64_t find_few(const uint8_t *h, size_t n, const uint8_t *s, size_t m) {
    return find_serial(h, n, s, m);
}

/* 32..64 candidates (a 64-byte window): two blocks, no loop, no frame. Two
   probes (first and last byte), not three: over at most 64 candidates the
   third compare costs more uops (2 loads, 2 compares, 2 ANDs) than the
   verifications it saves, each two 8-byte compares. */
ATTR_AVX2 static inline uint32_t probe2_avx2(const uint8_t *h, size_t i, size_t m, __m256i f, __m256i l) {
    return (uint32_t)_mm256_movemask_epi8(
        _mm256_and_si256(_mm256_cmpeq_epi8(f, _mm256_loadu_si256((const void *)(h + i))),
                         _mm256_cmpeq_epi8(l, _mm256_loadu_si256((const void *)(h + i + m - 1)))));
}

ATTR_AVX2 static inline __attribute__((always_inline)) int64_t find_avx2_window(const uint8_t *h, size_t cands,
                                                                                const uint8_t *s, size_t m, __m256i f,
                                                                                __m256i l) {
    const uint32_t tail = probe2_avx2(h, cands - 32, m, f, l); /* candidates cands - 32 + t */
    const uint64_t mask = cands > 32 ? probe2_avx2(h, 0, m, f, l) | (uint64_t)tail << (cands - 32) : tail;
    return mask ? verify_forward(h, 0, mask, s, m) : -1;
}

ATTR_AVX2 __attribute__((noinline)) static int64_t find_avx2_long(const uint8_t *h, size_t n, const uint8_t *s,
                                                                  size_t m) {
    return find_avx2_core(h, n, s, m, _mm256_set1_epi8((char)s[0]), _mm256_set1_epi8((char)s[m / 2]),
                          _mm256_set1_epi8((char)s[m - 1]));
}

ATTR_AVX2 __attribute__((noinline)) static int64_t needle_find_avx2_long(const knhk_simd_needle *nd, const uint8_t *h,
                                                                         size_t n) {
    return find_avx2_core(h, n, nd->bytes, nd->len, _mm256_loadu_si256((const void *)nd->first),
                          _mm256_loadu_si256((const void *)nd->middle), _mm256_loadu_si256((const void *)nd->last));
}

ATTR_AVX2 static int64_t find_avx2(const uint8_t *h, size_t n, const uint8_t *s, size_t m) {
    if (m == 0) return 0;
    if (m > n) return -1;
    const size_t cands = n - m + 1;
    if (cands < 32) return find_few(h, n, s, m);
    if (cands > 64) return find_avx2_long(h, n, s, m);
    return find_avx2_window(h, cands, s, m, _mm256_set1_epi8((char)s[0]), _mm256_set1_epi8((char)s[m - 1]));
}

ATTR_AVX2 static int64_t needle_find_avx2(const knhk_simd_needle *nd, const uint8_t *h, size_t n) {
    const size_t m = nd->len;
    if (m > n) return -1;
    const size_t cands = n - m + 1;
    if (cands < 32) return find_few(h, n, nd->bytes, m);
    if (cands > 64) return needle_find_avx2_long(nd, h, n);
    return find_avx2_window(h, cands, nd->bytes, m, _mm256_loadu_si256((const void *)nd->first),
                            _mm256_loadu_si256((const void *)nd->last));
}

ATTR_AVX2 static int64_t rfind_avx2(const uint8_t *h, size_t n, const uint8_t *s, size_t m) {
    if (m == 0) return (int64_t)n;
    if (m > n) return -1;
    const size_t mid = m / 2;
    const __m256i f = _mm256_set1_epi8((char)s[0]), c = _mm256_set1_epi8((char)s[mid]),
                  l = _mm256_set1_epi8((char)s[m - 1]);
    size_t end = n - m + 1; /* candidates [0, end) still to look at */
    for (; end >= 32; end -= 32) {
        size_t i = end - 32;
        __m256i x = _mm256_and_si256(_mm256_cmpeq_epi8(f, _mm256_loadu_si256((const void *)(h + i))),
                                     _mm256_cmpeq_epi8(l, _mm256_loadu_si256((const void *)(h + i + m - 1))));
        x = _mm256_and_si256(x, _mm256_cmpeq_epi8(c, _mm256_loadu_si256((const void *)(h + i + mid))));
        uint32_t mask = (uint32_t)_mm256_movemask_epi8(x);
        while (mask) {
            unsigned b = 31u - (unsigned)__builtin_clz(mask);
            if (same_bytes(h + i + b, s, m)) return (int64_t)(i + b);
            mask ^= 1u << b;
        }
    }
    if (end > 0 && n - m + 1 >= 32) {
        /* The first partial block: re-load the first 32 candidates, keep [0, end). */
        __m256i x = _mm256_and_si256(_mm256_cmpeq_epi8(f, _mm256_loadu_si256((const void *)h)),
                                     _mm256_cmpeq_epi8(l, _mm256_loadu_si256((const void *)(h + m - 1))));
        x = _mm256_and_si256(x, _mm256_cmpeq_epi8(c, _mm256_loadu_si256((const void *)(h + mid))));
        uint32_t mask = (uint32_t)_mm256_movemask_epi8(x) & (uint32_t)((1ULL << end) - 1);
        while (mask) {
            unsigned b = 31u - (unsigned)__builtin_clz(mask);
            if (same_bytes(h + b, s, m)) return (int64_t)b;
            mask ^= 1u << b;
        }
        return -1;
    }
    while (end-- > 0)
        if (h[end] == s[0] && h[end + m - 1] == s[m - 1] && same_bytes(h + end, s, m)) return (int64_t)end;
    return -1;
}

ATTR_AVX512 static inline uint64_t probe_avx512(const uint8_t *h, size_t i, size_t mid, size_t m, __mmask64 k,
                                                __m512i f, __m512i c, __m512i l) {
    /* Three independent compares, then one AND: no chain through the masks.
       The compares are masked too: a masked-off lane loads 0, which may
       equal a needle byte. */
    __mmask64 x = _mm512_mask_cmpeq_epi8_mask(k, _mm512_maskz_loadu_epi8(k, h + i), f);
    __mmask64 y = _mm512_mask_cmpeq_epi8_mask(k, _mm512_maskz_loadu_epi8(k, h + i + m - 1), l);
    __mmask64 z = _mm512_mask_cmpeq_epi8_mask(k, _mm512_maskz_loadu_epi8(k, h + i + mid), c);
    return x & y & z;
}

/* More than 64 candidates, or a needle longer than 64 bytes (0 < m <= n).
   Out of line (the two callers below), so the one-block paths keep no frame. */
ATTR_AVX512 static inline __attribute__((always_inline)) int64_t find_avx512_long_core(const uint8_t *h, size_t n,
                                                                                       const uint8_t *s, size_t m,
                                                                                       __m512i f, __m512i c,
                                                                                       __m512i l) {
    const size_t mid = m / 2, cands = n - m + 1;
    size_t i = 0;
    /* Whole blocks: plain loads, two blocks per iteration so two cache lines
       are in flight and the loop branch is taken half as often. A haystack
       large enough to come from DRAM is prefetched PREFETCH_AHEAD bytes
       ahead (lines inside it only). */
#define FIND_AVX512_TWO_BLOCKS()                                       \
    do {                                                               \
        uint64_t m0 = probe_avx512(h, i, mid, m, ~0ULL, f, c, l);      \
        uint64_t m1 = probe_avx512(h, i + 64, mid, m, ~0ULL, f, c, l); \
        if (_knhk_unlikely((m0 | m1) != 0)) {                          \
            int64_t p = m0 ? verify_forward(h, i, m0, s, m) : -1;      \
            if (p < 0 && m1) p = verify_forward(h, i + 64, m1, s, m);  \
            if (p >= 0) return p;                                      \
        }                                                              \
    } while (0)
    if (n >= PREFETCH_MIN)
        for (; i + 128 + PREFETCH_AHEAD <= cands; i += 128) {
            _mm_prefetch((const char *)(h + i + PREFETCH_AHEAD), _MM_HINT_T0);
            _mm_prefetch((const char *)(h + i + PREFETCH_AHEAD + 64), _MM_HINT_T0);
            FIND_AVX512_TWO_BLOCKS();
        }
    for (; i + 128 <= cands; i += 128) FIND_AVX512_TWO_BLOCKS();
#undef FIND_AVX512_TWO_BLOCKS
    for (; i < cands; i += 64) {
        size_t r = cands - i;
        /* The last block loads only the lanes of real candidates. */
        __mmask64 k = r >= 64 ? ~0ULL : _bzhi_u64(~0ULL, (unsigned)r);
        uint64_t mask = probe_avx512(h, i, mid, m, k, f, c, l);
        if (mask) {
            int64_t p = verify_forward(h, i, mask, s, m);
            if (p >= 0) return p;
        }
    }
    return -1;
}

ATTR_AVX512 __attribute__((noinline)) static int64_t find_avx512_long(const uint8_t *h, size_t n, const uint8_t *s,
                                                                      size_t m) {
    return find_avx512_long_core(h, n, s, m, _mm512_set1_epi8((char)s[0]), _mm512_set1_epi8((char)s[m / 2]),
                                 _mm512_set1_epi8((char)s[m - 1]));
}

ATTR_AVX512 __attribute__((noinline)) static int64_t needle_find_avx512_long(const knhk_simd_needle *nd,
                                                                             const uint8_t *h, size_t n) {
    return find_avx512_long_core(h, n, nd->bytes, nd->len, _mm512_loadu_si512((const void *)nd->first),
                                 _mm512_loadu_si512((const void *)nd->middle),
                                 _mm512_loadu_si512((const void *)nd->last));
}

/* Windows of up to 64 candidates (a 64-byte window and a 16-byte needle,
   say) take one masked block: no loop, and a frame small enough that the
   call costs little more than the compares. */
ATTR_AVX512 static int64_t find_avx512(const uint8_t *h, size_t n, const uint8_t *s, size_t m) {
    if (m == 0) return 0;
    if (m > n) return -1;
    const size_t cands = n - m + 1, mid = m / 2;
    if (cands > 64 || m > 64) return find_avx512_long(h, n, s, m);
    /* At most 64 candidates and a needle of at most 64 bytes: one masked
       block, and each candidate verified with one masked compare. */
    const __mmask64 k = _bzhi_u64(~0ULL, (unsigned)cands);
    __mmask64 x = _mm512_mask_cmpeq_epi8_mask(k, _mm512_maskz_loadu_epi8(k, h), _mm512_set1_epi8((char)s[0]));
    x = _mm512_mask_cmpeq_epi8_mask(x, _mm512_maskz_loadu_epi8(k, h + m - 1), _mm512_set1_epi8((char)s[m - 1]));
    x = _mm512_mask_cmpeq_epi8_mask(x, _mm512_maskz_loadu_epi8(k, h + mid), _mm512_set1_epi8((char)s[mid]));
    uint64_t mask = _cvtmask64_u64(x);
    if (mask == 0) return -1;
    const __mmask64 km = _bzhi_u64(~0ULL, (unsigned)m);
    const __m512i needle = _mm512_maskz_loadu_epi8(km, s);
    for (; mask; mask &= mask - 1) {
        size_t p = (size_t)__builtin_ctzll(mask);
        if (_mm512_mask_cmpneq_epi8_mask(km, _mm512_maskz_loadu_epi8(km, h + p), needle) == 0) return (int64_t)p;
    }
    return -1;
}

/* The prepared needle, the 64-byte-window hot path: the broadcasts are
   memory operands of the compares, the three compares are chained through
   their masks (one mask move instead of three and two ANDs: fewer uops, which
   is what bounds a caller searching window after window), and a needle of up
   to 64 bytes is verified with one masked compare against nd->head. */
ATTR_AVX512 static int64_t needle_find_avx512(const knhk_simd_needle *nd, const uint8_t *h, size_t n) {
    const size_t m = nd->len;
    if (m > n) return -1;
    const size_t cands = n - m + 1;
    if (cands > 64 || m > 64) return needle_find_avx512_long(nd, h, n);
    const __mmask64 k = _bzhi_u64(~0ULL, (unsigned)cands);
    __mmask64 x =
        _mm512_mask_cmpeq_epi8_mask(k, _mm512_maskz_loadu_epi8(k, h), _mm512_loadu_si512((const void *)nd->first));
    x = _mm512_mask_cmpeq_epi8_mask(x, _mm512_maskz_loadu_epi8(k, h + m - 1),
                                    _mm512_loadu_si512((const void *)nd->last));
    x = _mm512_mask_cmpeq_epi8_mask(x, _mm512_maskz_loadu_epi8(k, h + nd->mid),
                                    _mm512_loadu_si512((const void *)nd->middle));
    const __mmask64 km = nd->head_mask;
    for (uint64_t mask = _cvtmask64_u64(x); mask; mask &= mask - 1) {
        size_t p = (size_t)__builtin_ctzll(mask);
        if (_mm512_cmpneq_epi8_mask(_mm512_maskz_loadu_epi8(km, h + p), _mm512_loadu_si512((const void *)nd->head)) ==
            0)
            return (int64_t)p;
    }
    return -1;
}

ATTR_AVX512 static int64_t rfind_avx512(const uint8_t *h, size_t n, const uint8_t *s, size_t m) {
    if (m == 0) return (int64_t)n;
    if (m > n) return -1;
    const size_t mid = m / 2;
    const __m512i f = _mm512_set1_epi8((char)s[0]), c = _mm512_set1_epi8((char)s[mid]),
                  l = _mm512_set1_epi8((char)s[m - 1]);
    size_t end = n - m + 1;
    while (end > 0) {
        size_t r = end >= 64 ? 64 : end, i = end - r;
        __mmask64 k = r == 64 ? ~0ULL : _bzhi_u64(~0ULL, (unsigned)r);
        uint64_t mask = probe_avx512(h, i, mid, m, k, f, c, l);
        while (mask) {
            unsigned b = 63u - (unsigned)__builtin_clzll(mask);
            if (same_bytes(h + i + b, s, m)) return (int64_t)(i + b);
            mask ^= 1ULL << b;
        }
        end = i;
    }
    return -1;
}

#endif /* KNHK_SIMD_X86 */

/* ==================================================================== dispatch tables */

#define ID_TABLE(FIELD, ISA) {FIELD##_##ISA##_u8, FIELD##_##ISA##_u16, FIELD##_##ISA##_u32, FIELD##_##ISA##_u64}

static const simd_table table_serial = {
    KNHK_SIMD_SCALAR,
    find_serial,
    rfind_serial,
    needle_find_serial,
    ID_TABLE(count_eq, serial),
    ID_TABLE(find_eq, serial),
    ID_TABLE(mask_eq, serial),
    ID_TABLE(isin, serial),
    ID_TABLE(reduce, serial),
};
#if KNHK_SIMD_X86
static const simd_table table_avx2 = {
    KNHK_SIMD_AVX2,
    find_avx2,
    rfind_avx2,
    needle_find_avx2,
    ID_TABLE(count_eq, avx2),
    ID_TABLE(find_eq, avx2),
    ID_TABLE(mask_eq, avx2),
    ID_TABLE(isin, avx2),
    ID_TABLE(reduce, avx2),
};
static const simd_table table_avx512 = {
    KNHK_SIMD_AVX512,
    find_avx512,
    rfind_avx512,
    needle_find_avx512,
    ID_TABLE(count_eq, avx512),
    ID_TABLE(find_eq, avx512),
    ID_TABLE(mask_eq, avx512),
    ID_TABLE(isin, avx512),
    ID_TABLE(reduce, avx512),
};
static const simd_table *const tables[KNHK_SIMD_LEVELS] = {&table_serial, &table_avx2, &table_avx512};
#else
static const simd_table *const tables[KNHK_SIMD_LEVELS] = {&table_serial, NULL, NULL};
#endif

static const char *const level_names[KNHK_SIMD_LEVELS] = {"scalar", "avx2", "avx512"};

/* Why a level in range cannot run, after `prefix` ("what: " or ""): the CPU (or OS) lacks its
   instructions, or this build has no kernels for it at all. */
static void set_unsupported_error(const char *prefix, int level) {
    if (tables[level] != NULL) {
        _knhk_set_error("%sthis CPU (or OS) does not support the %s level", prefix, level_names[level]);
        return;
    }
#ifdef KNHK_PORTABLE
    _knhk_set_error("%sthis build has no %s kernels (built with KNHK_PORTABLE=1: portable C only)", prefix,
                    level_names[level]);
#else
    _knhk_set_error("%sthis build has no %s kernels (they are built on x86_64 only)", prefix, level_names[level]);
#endif
}

static _knhk_once simd_once;
static _Atomic(const simd_table *) active;

int knhk_simd_level_supported(int level) {
    if (level < 0 || level >= KNHK_SIMD_LEVELS || tables[level] == NULL) return 0;
    uint64_t f = knhk_cpu_features();
    const uint64_t avx2 = KNHK_CPU_AVX2 | KNHK_CPU_POPCNT;
    const uint64_t avx512 = avx2 | KNHK_CPU_AVX512F | KNHK_CPU_AVX512BW | KNHK_CPU_AVX512VL | KNHK_CPU_BMI2;
    switch (level) {
    case KNHK_SIMD_SCALAR: return 1;
    case KNHK_SIMD_AVX2: return (f & avx2) == avx2;
    case KNHK_SIMD_AVX512: return (f & avx512) == avx512;
    default: return 0;
    }
}

const char *knhk_simd_level_name(int level) {
    return level >= 0 && level < KNHK_SIMD_LEVELS ? level_names[level] : "unknown";
}

int knhk_simd_auto_level(void) {
    /* On these cores the interpreter code around a call ran ~16% slower at
       avx512 than at avx2 (docs/simd.md): the licence outlasts the scan. */
    int level = knhk_cpu_features() & KNHK_CPU_AVX512_DOWNCLOCK ? KNHK_SIMD_AVX2 : KNHK_SIMD_AVX512;
    while (level > 0 && !knhk_simd_level_supported(level)) level--;
    return level;
}

static int simd_choose(void *unused) {
    (void)unused;
    const char *env = getenv("KNHK_SIMD");
    int level = -1;
    if (env == NULL || *env == '\0' || strcasecmp(env, "auto") == 0) {
        level = knhk_simd_auto_level();
    } else {
        for (int i = 0; i < KNHK_SIMD_LEVELS; i++)
            if (strcasecmp(env, level_names[i]) == 0) level = i;
        if (level < 0) {
            _knhk_set_error("KNHK_SIMD=%.64s is not a SIMD level; accepted: auto, scalar, avx2, avx512", env);
            return KNHK_ERR_INVALID;
        }
        if (!knhk_simd_level_supported(level)) {
            char prefix[96];
            snprintf(prefix, sizeof prefix, "KNHK_SIMD=%.64s: ", env);
            set_unsupported_error(prefix, level);
            return KNHK_ERR_UNAVAILABLE;
        }
    }
    /* A level forced by knhk_simd_set_level before init wins. */
    const simd_table *expected = NULL;
    atomic_compare_exchange_strong_explicit(&active, &expected, tables[level], memory_order_acq_rel,
                                            memory_order_acquire);
    return KNHK_OK;
}

int knhk_simd_init(void) {
    if (_knhk_once_ready(&simd_once)) return KNHK_OK;
    /* Detect features first (nesting cells is fine: no lock is held across an initialiser). */
    (void)knhk_cpu_features();
    return _knhk_once_run(&simd_once, simd_choose, NULL);
}

int knhk_simd_level(void) {
    if (knhk_simd_init() != KNHK_OK && atomic_load_explicit(&active, memory_order_acquire) == NULL) return -1;
    return atomic_load_explicit(&active, memory_order_acquire)->level;
}

int knhk_simd_set_level(int level) {
    if (level < 0 || level >= KNHK_SIMD_LEVELS) {
        _knhk_set_error("SIMD level %d is out of range; accepted: 0 (scalar), 1 (avx2), 2 (avx512)", level);
        return KNHK_ERR_INVALID;
    }
    if (!knhk_simd_level_supported(level)) {
        set_unsupported_error("", level);
        return KNHK_ERR_UNAVAILABLE;
    }
    atomic_store_explicit(&active, tables[level], memory_order_release);
    return KNHK_OK;
}

int knhk_simd_ready(void) { return atomic_load_explicit(&active, memory_order_acquire) != NULL; }

__attribute__((noinline, cold)) static const simd_table *table_slow(void) {
    knhk_simd_init();
    const simd_table *t = atomic_load_explicit(&active, memory_order_acquire);
    return t != NULL ? t : &table_serial;
}

/* The fast path is one acquire load of the table pointer; the first call's
   initialisation is out of line, so callers keep no frame for it. */
static inline const simd_table *table(void) {
    const simd_table *t = atomic_load_explicit(&active, memory_order_acquire);
    return _knhk_likely(t != NULL) ? t : table_slow();
}

/* ==================================================================== byte patterns */

int64_t knhk_simd_find(const uint8_t *hay, size_t n, const uint8_t *needle, size_t m) {
    return table()->find(hay, n, needle, m);
}

int64_t knhk_simd_rfind(const uint8_t *hay, size_t n, const uint8_t *needle, size_t m) {
    return table()->rfind(hay, n, needle, m);
}

/* count and find_all repeat one find per match, through the dispatch table
   or through a prepared needle: one loop serves all four entry points. */
typedef struct {
    find_fn find;                  /* dispatched kernel, when nd is NULL */
    const uint8_t *needle;
    const knhk_simd_needle *nd;    /* the prepared needle, or NULL */
    size_t m;
} finder;

static inline int64_t finder_find(const finder *f, const uint8_t *h, size_t n) {
    return f->nd ? f->nd->find(f->nd, h, n) : f->find(h, n, f->needle, f->m);
}

static uint64_t count_matches(const finder *f, const uint8_t *hay, size_t n, int overlapping) {
    const size_t m = f->m;
    if (m == 0) return (uint64_t)n + 1;
    const size_t step = overlapping ? 1 : m;
    uint64_t c = 0;
    size_t pos = 0;
    while (pos + m <= n) {
        int64_t p = finder_find(f, hay + pos, n - pos);
        if (p < 0) break;
        c++;
        pos += (size_t)p + step;
    }
    return c;
}

static size_t list_matches(const finder *f, const uint8_t *hay, size_t n, int overlapping, size_t from, int64_t *out,
                           size_t cap, size_t *next) {
    const size_t m = f->m;
    size_t k = 0, pos = from;
    if (m == 0) {
        for (; pos <= n && k < cap; pos++) out[k++] = (int64_t)pos;
    } else {
        const size_t step = overlapping ? 1 : m;
        while (k < cap && pos <= n && n - pos >= m) {
            int64_t p = finder_find(f, hay + pos, n - pos);
            if (p < 0) {
                pos = n + 1;
                break;
            }
            out[k++] = (int64_t)(pos + (size_t)p);
            pos += (size_t)p + step;
        }
    }
    if (next) *next = pos;
    return k;
}

uint64_t knhk_simd_count(const uint8_t *hay, size_t n, const uint8_t *needle, size_t m, int overlapping) {
    const finder f = {table()->find, needle, NULL, m};
    return count_matches(&f, hay, n, overlapping);
}

size_t knhk_simd_find_all(const uint8_t *hay, size_t n, const uint8_t *needle, size_t m, int overlapping, size_t from,
                          int64_t *out, size_t cap, size_t *next) {
    const finder f = {table()->find, needle, NULL, m};
    return list_matches(&f, hay, n, overlapping, from, out, cap, next);
}

/* find_many reads the haystack once, in chunks of KNHK_SIMD_FIND_MANY_CHUNK
   bytes that stay in L1: every needle searches a chunk before the next one is
   read, so k needles cost one pass over memory and k over cache, where a
   find and a count per needle would be 2k passes over memory. A needle
   searching chunk [c0, c1) looks for the matches that start there (its window
   runs on to c1 + m - 1); its next allowed start carries the non-overlapping
   count from chunk to chunk. Needles go sixteen at a time (their state is on
   the stack). With counts == NULL a needle stops at its first match, and the
   scan stops at the first chunk past the best match. */
#define FIND_MANY_GROUP 16

int knhk_simd_find_many(const uint8_t *hay, size_t n, const uint8_t *const *needles, const size_t *lens, size_t k,
                        int64_t *first, int64_t *which, uint64_t *counts) {
    if (k > 0 && (needles == NULL || lens == NULL)) {
        _knhk_set_error("find_many: needles and lens must not be NULL when k = %zu", k);
        return KNHK_ERR_INVALID;
    }
    const find_fn find = table()->find;
    int64_t best = -1, best_j = -1;
#define FIND_MANY_TAKE(pos, j)                                                                      \
    do {                                                                                            \
        if (best < 0 || (int64_t)(pos) < best || ((int64_t)(pos) == best && (int64_t)(j) < best_j)) \
            best = (int64_t)(pos), best_j = (int64_t)(j);                                           \
    } while (0)
    for (size_t g = 0; g < k; g += FIND_MANY_GROUP) {
        const size_t gk = k - g < FIND_MANY_GROUP ? k - g : FIND_MANY_GROUP;
        size_t next[FIND_MANY_GROUP]; /* where the needle's next match may start; SIZE_MAX: done */
        uint64_t found[FIND_MANY_GROUP];
        for (size_t j = 0; j < gk; j++) {
            const size_t m = lens[g + j];
            found[j] = 0;
            next[j] = m > n ? SIZE_MAX : 0;
            if (m == 0) { /* as bytes: an empty needle matches at 0, n + 1 times */
                found[j] = (uint64_t)n + 1;
                next[j] = SIZE_MAX;
                FIND_MANY_TAKE(0, g + j);
            }
        }
        for (size_t c0 = 0; c0 < n; c0 += KNHK_SIMD_FIND_MANY_CHUNK) {
            if (counts == NULL && best >= 0 && (size_t)best <= c0) break; /* nothing here can come first */
            const size_t c1 = n - c0 > KNHK_SIMD_FIND_MANY_CHUNK ? c0 + KNHK_SIMD_FIND_MANY_CHUNK : n;
            for (size_t j = 0; j < gk; j++) {
                if (next[j] >= c1) continue; /* done, or its next start is in a later chunk */
                const size_t m = lens[g + j];
                const size_t end = n - c1 >= m - 1 ? c1 + m - 1 : n; /* 1 <= m <= n */
                size_t pos = next[j] > c0 ? next[j] : c0;
                while (pos < c1 && end - pos >= m) {
                    const int64_t p = find(hay + pos, end - pos, needles[g + j], m);
                    if (p < 0) break;
                    const size_t at = pos + (size_t)p;
                    if (found[j]++ == 0) FIND_MANY_TAKE(at, g + j);
                    if (counts == NULL) {
                        pos = SIZE_MAX;
                        break;
                    }
                    pos = at + m;
                }
                next[j] = pos > c1 ? pos : c1;
            }
        }
        if (counts)
            for (size_t j = 0; j < gk; j++) counts[g + j] = found[j];
    }
#undef FIND_MANY_TAKE
    if (first) *first = best;
    if (which) *which = best_j;
    return KNHK_OK;
}

/* ==================================================================== prepared needles */

int knhk_simd_needle_new(const uint8_t *needle, size_t m, int level, knhk_simd_needle **out) {
    if (out == NULL) {
        _knhk_set_error("knhk_simd_needle_new: out must not be NULL");
        return KNHK_ERR_INVALID;
    }
    *out = NULL;
    if (m > 0 && needle == NULL) {
        _knhk_set_error("knhk_simd_needle_new: needle is NULL but m = %zu", m);
        return KNHK_ERR_INVALID;
    }
    const simd_table *t;
    if (level == -1) {
        t = table();
    } else {
        if (level < 0 || level >= KNHK_SIMD_LEVELS) {
            _knhk_set_error("knhk_simd_needle_new: SIMD level %d is out of range; accepted: -1 (the active "
                            "level), 0 (scalar), 1 (avx2), 2 (avx512)",
                            level);
            return KNHK_ERR_INVALID;
        }
        if (!knhk_simd_level_supported(level)) {
            set_unsupported_error("knhk_simd_needle_new: ", level);
            return KNHK_ERR_UNAVAILABLE;
        }
        t = tables[level];
    }
    if (m > SIZE_MAX / 2) {
        _knhk_set_error("knhk_simd_needle_new: a needle of %zu bytes is too large", m);
        return KNHK_ERR_NOMEM;
    }
    /* The copy of the needle follows the struct; aligned_alloc wants a
       multiple of the alignment. */
    const size_t size = (sizeof(knhk_simd_needle) + m + 63) & ~(size_t)63;
    knhk_simd_needle *nd = aligned_alloc(64, size);
    if (nd == NULL) {
        _knhk_set_error("knhk_simd_needle_new: no memory for a %zu-byte needle", m);
        return KNHK_ERR_NOMEM;
    }
    memset(nd, 0, sizeof *nd);
    uint8_t *copy = (uint8_t *)(nd + 1);
    if (m) memcpy(copy, needle, m);
    nd->bytes = copy;
    nd->len = m;
    nd->mid = m / 2;
    nd->level = t->level;
    if (m > 0) {
        memset(nd->first, copy[0], 64);
        memset(nd->middle, copy[m / 2], 64);
        memset(nd->last, copy[m - 1], 64);
        memcpy(nd->head, copy, m < 64 ? m : 64);
    }
    nd->head_mask = m >= 64 ? ~0ULL : (1ULL << m) - 1;
    nd->find = m == 0 ? needle_find_empty : t->needle_find;
    *out = nd;
    return KNHK_OK;
}

void knhk_simd_needle_free(knhk_simd_needle *nd) { free(nd); }

int64_t knhk_simd_needle_find(const knhk_simd_needle *nd, const uint8_t *hay, size_t n) { return nd->find(nd, hay, n); }

uint64_t knhk_simd_needle_count(const knhk_simd_needle *nd, const uint8_t *hay, size_t n, int overlapping) {
    const finder f = {NULL, nd->bytes, nd, nd->len};
    return count_matches(&f, hay, n, overlapping);
}

size_t knhk_simd_needle_find_all(const knhk_simd_needle *nd, const uint8_t *hay, size_t n, int overlapping, size_t from,
                                 int64_t *out, size_t cap, size_t *next) {
    const finder f = {NULL, nd->bytes, nd, nd->len};
    return list_matches(&f, hay, n, overlapping, from, out, cap, next);
}

/* ==================================================================== id scans */

#define WIDTH_OR_FAIL(wi, width, what)                                                                     \
    int wi = width_index(width);                                                                           \
    if (wi < 0) {                                                                                          \
        _knhk_set_error("%s: element width %d bytes is not supported; accepted: 1, 2, 4, 8", what, width); \
        return KNHK_ERR_INVALID;                                                                           \
    }

int knhk_simd_count_eq(const void *a, size_t n, int width, uint64_t v, uint64_t *count) {
    WIDTH_OR_FAIL(wi, width, "count_eq")
    *count = table()->count_eq[wi](a, n, v);
    return KNHK_OK;
}

int knhk_simd_find_eq(const void *a, size_t n, int width, uint64_t v, size_t from, int64_t *out, size_t cap,
                      size_t *written, size_t *next) {
    WIDTH_OR_FAIL(wi, width, "find_eq")
    size_t nx = from < n ? from : n;
    *written = from < n ? table()->find_eq[wi](a, n, v, from, out, cap, &nx) : 0;
    if (next) *next = nx;
    return KNHK_OK;
}

int knhk_simd_mask_eq(const void *a, size_t n, int width, uint64_t v, uint8_t *out) {
    WIDTH_OR_FAIL(wi, width, "mask_eq")
    table()->mask_eq[wi](a, n, v, out);
    return KNHK_OK;
}

int knhk_simd_isin(const void *a, size_t n, int width, const uint64_t *set, size_t k, uint8_t *out) {
    WIDTH_OR_FAIL(wi, width, "isin")
    if (k > KNHK_SIMD_ISIN_MAX) {
        _knhk_set_error("isin: %zu ids in the set; at most %d are accepted", k, KNHK_SIMD_ISIN_MAX);
        return KNHK_ERR_INVALID;
    }
    table()->isin[wi](a, n, set, k, out);
    return KNHK_OK;
}

int knhk_simd_reduce(const void *a, size_t n, int width, knhk_simd_reduction *out) {
    WIDTH_OR_FAIL(wi, width, "reduce")
    if (n == 0) {
        out->min = out->max = out->sum = 0;
        _knhk_set_error("reduce: the array is empty, it has no minimum or maximum");
        return KNHK_ERR_INVALID;
    }
    table()->reduce[wi](a, n, out);
    return KNHK_OK;
}

/* Histogram: the same kernel at every level. A SIMD histogram needs
   gather/scatter with conflict detection (vpconflict), which is slower than
   this on the CPUs we measured; what makes a histogram fast is breaking the
   store-to-load chain on repeated ids, so four sub-tables take turns.
   For 8-bit ids we also measured per-bin lane counters (AVX-512: a compare
   to a mask and a masked byte subtract per bin and block, bins 8-15 at a
   time over an L1-sized chunk; AVX2 the same with vector compares): for 43
   bins they ran 0.9-1.3x the 8-bit kernel below on Cascade Lake, where the
   compares all queue on one port, so they are not kept. */
#define HIST_KERNEL(T, W)                                                                             \
    static void histogram_u##W(const T *a, size_t n, uint64_t *counts, size_t nbins, uint64_t *oor) { \
        uint64_t bad = 0;                                                                             \
        if (nbins <= KNHK_SIMD_HIST_FAST_BINS) {                                                      \
            uint32_t sub[4][KNHK_SIMD_HIST_FAST_BINS];                                                \
            size_t i = 0;                                                                             \
            while (i < n) {                                                                           \
                /* uint32 sub-counts: flush before any can overflow. */                               \
                size_t stop = n - i > ((size_t)1 << 30) ? i + ((size_t)1 << 30) : n;                  \
                for (int s = 0; s < 4; s++) memset(sub[s], 0, nbins * sizeof(uint32_t));              \
                for (; i + 4 <= stop; i += 4) {                                                       \
                    T x0 = a[i], x1 = a[i + 1], x2 = a[i + 2], x3 = a[i + 3];                         \
                    if (_knhk_likely(x0 < nbins))                                                     \
                        sub[0][x0]++;                                                                 \
                    else                                                                              \
                        bad++;                                                                        \
                    if (_knhk_likely(x1 < nbins))                                                     \
                        sub[1][x1]++;                                                                 \
                    else                                                                              \
                        bad++;                                                                        \
                    if (_knhk_likely(x2 < nbins))                                                     \
                        sub[2][x2]++;                                                                 \
                    else                                                                              \
                        bad++;                                                                        \
                    if (_knhk_likely(x3 < nbins))                                                     \
                        sub[3][x3]++;                                                                 \
                    else                                                                              \
                        bad++;                                                                        \
                }                                                                                     \
                for (; i < stop; i++) {                                                               \
                    if (a[i] < nbins)                                                                 \
                        sub[0][a[i]]++;                                                               \
                    else                                                                              \
                        bad++;                                                                        \
                }                                                                                     \
                for (size_t b = 0; b < nbins; b++)                                                    \
                    counts[b] += (uint64_t)sub[0][b] + sub[1][b] + sub[2][b] + sub[3][b];             \
            }                                                                                         \
        } else {                                                                                      \
            for (size_t i = 0; i < n; i++) {                                                          \
                if (a[i] < nbins)                                                                     \
                    counts[a[i]]++;                                                                   \
                else                                                                                  \
                    bad++;                                                                            \
            }                                                                                         \
        }                                                                                             \
        *oor = bad;                                                                                   \
    }
HIST_KERNEL(uint16_t, 16)
HIST_KERNEL(uint32_t, 32)
HIST_KERNEL(uint64_t, 64)

/* 8-bit ids: every id has a slot (256 per sub-table), so there is no range
   check in the loop; ids >= nbins are the counts of the slots past nbins.
   Eight ids per 8-byte load, two to each sub-table. */
static void histogram_u8(const uint8_t *a, size_t n, uint64_t *counts, size_t nbins, uint64_t *oor) {
    uint32_t sub[4][256];
    uint64_t bad = 0;
    size_t i = 0;
    while (i < n) {
        /* uint32 sub-counts: each sub-table takes about a quarter of a chunk. */
        const size_t stop = n - i > ((size_t)1 << 30) ? i + ((size_t)1 << 30) : n;
        memset(sub, 0, sizeof sub);
        for (; i + 8 <= stop; i += 8) {
            uint64_t w;
            memcpy(&w, a + i, 8);
            sub[0][w & 255]++;
            sub[1][(w >> 8) & 255]++;
            sub[2][(w >> 16) & 255]++;
            sub[3][(w >> 24) & 255]++;
            sub[0][(w >> 32) & 255]++;
            sub[1][(w >> 40) & 255]++;
            sub[2][(w >> 48) & 255]++;
            sub[3][w >> 56]++;
        }
        for (; i < stop; i++) sub[0][a[i]]++;
        for (size_t b = 0; b < 256; b++) {
            const uint64_t c = (uint64_t)sub[0][b] + sub[1][b] + sub[2][b] + sub[3][b];
            if (b < nbins)
                counts[b] += c;
            else
                bad += c;
        }
    }
    *oor = bad;
}

int knhk_simd_histogram(const void *a, size_t n, int width, uint64_t *counts, size_t nbins, uint64_t *out_of_range) {
    WIDTH_OR_FAIL(wi, width, "histogram")
    if (nbins == 0) {
        _knhk_set_error("histogram: nbins is 0; it must be at least 1");
        return KNHK_ERR_INVALID;
    }
    memset(counts, 0, nbins * sizeof *counts);
    uint64_t oor = 0;
    switch (wi) {
    case 0: histogram_u8(a, n, counts, nbins, &oor); break;
    case 1: histogram_u16(a, n, counts, nbins, &oor); break;
    case 2: histogram_u32(a, n, counts, nbins, &oor); break;
    default: histogram_u64(a, n, counts, nbins, &oor); break;
    }
    if (out_of_range) *out_of_range = oor;
    return KNHK_OK;
}

/* ==================================================================== hot-path operations */

/* The kernel pointer is read once per batch, as a caller searching many
   windows would; each iteration is a complete search of the window. Without
   a prepared needle it falls back to the dispatched call. */
void knhk_simd_hotop_search_64(void *ctx, uint64_t iterations) {
    knhk_simd_search64_ctx *c = ctx;
    const knhk_simd_needle *nd = c->prepared;
    if (_knhk_unlikely(nd == NULL)) {
        knhk_simd_hotop_search_64_dispatch(ctx, iterations);
        return;
    }
    const knhk_simd_needle_fn find = nd->find;
    int64_t r = 0;
    for (uint64_t i = 0; i < iterations; i++) {
        /* The barrier makes every iteration search again. */
        __asm__ volatile("" : : : "memory");
        r = find(nd, c->window, sizeof c->window);
    }
    c->result = r;
}

void knhk_simd_hotop_search_64_dispatch(void *ctx, uint64_t iterations) {
    knhk_simd_search64_ctx *c = ctx;
    int64_t r = 0;
    for (uint64_t i = 0; i < iterations; i++) {
        __asm__ volatile("" : : : "memory");
        r = knhk_simd_find(c->window, sizeof c->window, c->needle, sizeof c->needle);
    }
    c->result = r;
}

void knhk_simd_hotop_count_eq_4k(void *ctx, uint64_t iterations) {
    knhk_simd_count4k_ctx *c = ctx;
    uint64_t r = 0;
    for (uint64_t i = 0; i < iterations; i++) {
        __asm__ volatile("" : : : "memory");
        knhk_simd_count_eq(c->ids, 1024, 4, c->value, &r);
    }
    c->result = r;
}

double knhk_simd_median_ticks(knhk_hotop_fn fn, void *ctx, uint64_t batch, uint32_t reps) {
    double samples[1001];
    if (reps < 1) reps = 1;
    if (reps > 1001) reps = 1001;
    if (batch == 0) batch = 1;
    fn(ctx, batch); /* warm caches and branch predictors */
    for (uint32_t r = 0; r < reps; r++) {
        uint64_t t0 = knhk_ticks_now();
        fn(ctx, batch);
        uint64_t t1 = knhk_ticks_now();
        samples[r] = (double)(t1 - t0) / (double)batch;
    }
    return _knhk_median_of(samples, reps);
}
