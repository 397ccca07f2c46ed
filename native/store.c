/*
 * store.c -- the workflow store: an immutable hash-indexed file of records.
 *
 * Layout (docs/store.md has the full table; everything little-endian):
 *   header (128 B) | records | dictionary | index (slots x 8 B) | block sums
 * An index entry is tag16 << 48 | record_offset48, 0 meaning empty; the
 * home slot of a key is the high part of hash * slots (multiply-shift, so
 * any slot count works), the tag its low 16 bits, and linear probing with
 * Robin Hood insertion keeps every key within max_disp slots of home.
 *
 * Trust nothing read from the file: every offset and length is checked
 * against the mapping with overflow-safe arithmetic before it is used.
 * Checks that cost O(n) are lazy: open hashes the header and the table of
 * block sums only; an index block is hashed the first time a probe touches
 * it and a record the first time it is read, and the flag that remembers
 * it is a relaxed atomic byte, so concurrent readers are fine.
 */
#include <stdlib.h>

#include "knhk_internal.h"

#define HDR KNHK_STORE_HEADER_SIZE
static const uint8_t MAGIC[8] = {'K', 'N', 'H', 'K', 'S', 'T', 'O', 'R'};
#define OFFSET_MASK ((UINT64_C(1) << 48) - 1)

/* ---- little-endian loads and stores (memcpy: no alignment assumed) */

static inline uint64_t ld64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}
static inline uint32_t ld32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}
static inline void st64(uint8_t *p, uint64_t v) {
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    memcpy(p, &v, 8);
}

/* ---- XXH64 (Yann Collet's specification), serial */

#define P1 UINT64_C(0x9E3779B185EBCA87)
#define P2 UINT64_C(0xC2B2AE3D27D4EB4F)
#define P3 UINT64_C(0x165667B19E3779F9)
#define P4 UINT64_C(0x85EBCA77C2B2AE63)
#define P5 UINT64_C(0x27D4EB2F165667C5)

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
static inline uint64_t xround(uint64_t acc, uint64_t in) { return rotl64(acc + in * P2, 31) * P1; }
static inline uint64_t xmerge(uint64_t acc, uint64_t v) { return (acc ^ xround(0, v)) * P1 + P4; }

uint64_t knhk_store_hash(const void *data, size_t len, uint64_t seed) {
    const uint8_t *p = (const uint8_t *)data, *end = p + len;
    uint64_t h;
    if (len >= 32) {
        uint64_t v1 = seed + P1 + P2, v2 = seed + P2, v3 = seed, v4 = seed - P1;
        const uint8_t *limit = end - 32;
        do {
            v1 = xround(v1, ld64(p));
            v2 = xround(v2, ld64(p + 8));
            v3 = xround(v3, ld64(p + 16));
            v4 = xround(v4, ld64(p + 24));
            p += 32;
        } while (p <= limit);
        h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
        h = xmerge(h, v1);
        h = xmerge(h, v2);
        h = xmerge(h, v3);
        h = xmerge(h, v4);
    } else {
        h = seed + P5;
    }
    h += (uint64_t)len;
    while (end - p >= 8) {
        h = rotl64(h ^ xround(0, ld64(p)), 27) * P1 + P4;
        p += 8;
    }
    if (end - p >= 4) {
        h = rotl64(h ^ ((uint64_t)ld32(p) * P1), 23) * P2 + P3;
        p += 4;
    }
    while (p < end) {
        h = rotl64(h ^ (*p * P5), 11) * P1;
        p++;
    }
    h ^= h >> 33;
    h *= P2;
    h ^= h >> 29;
    h *= P3;
    h ^= h >> 32;
    return h;
}

/* ---- SipHash-c-d (Aumasson and Bernstein, "SipHash: a fast short-input
   PRF", 2012). Version 2's key hash is SipHash-1-3 with a random per-file
   key, so an outsider who chooses keys cannot aim them at one index slot. */

#define SIPROUND             \
    do {                     \
        v0 += v1;            \
        v1 = rotl64(v1, 13); \
        v1 ^= v0;            \
        v0 = rotl64(v0, 32); \
        v2 += v3;            \
        v3 = rotl64(v3, 16); \
        v3 ^= v2;            \
        v0 += v3;            \
        v3 = rotl64(v3, 21); \
        v3 ^= v0;            \
        v2 += v1;            \
        v1 = rotl64(v1, 17); \
        v1 ^= v2;            \
        v2 = rotl64(v2, 32); \
    } while (0)

static inline __attribute__((always_inline)) uint64_t siphash(const uint8_t *p, size_t len, uint64_t k0, uint64_t k1,
                                                              int c, int d) {
    uint64_t v0 = k0 ^ UINT64_C(0x736f6d6570736575), v1 = k1 ^ UINT64_C(0x646f72616e646f6d);
    uint64_t v2 = k0 ^ UINT64_C(0x6c7967656e657261), v3 = k1 ^ UINT64_C(0x7465646279746573);
    const uint8_t *end = p + (len & ~(size_t)7);
    for (; p != end; p += 8) {
        uint64_t m = ld64(p);
        v3 ^= m;
        for (int i = 0; i < c; i++) SIPROUND;
        v0 ^= m;
    }
    uint64_t b = (uint64_t)len << 56;
    for (size_t i = len & 7; i > 0; i--) b |= (uint64_t)p[i - 1] << (8 * (i - 1));
    v3 ^= b;
    for (int i = 0; i < c; i++) SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    for (int i = 0; i < d; i++) SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

uint64_t knhk_store_siphash(const void *data, size_t len, uint64_t k0, uint64_t k1, int c_rounds, int d_rounds) {
    return siphash((const uint8_t *)data, len, k0, k1, c_rounds, d_rounds);
}

static inline uint64_t siphash13(const void *data, size_t len, uint64_t k0, uint64_t k1) {
    return siphash((const uint8_t *)data, len, k0, k1, 1, 3);
}

int knhk_store_key_hashes(const uint8_t *keys, uint64_t keys_size, const uint64_t *key_lens, uint64_t n,
                          uint64_t hash_key, uint64_t seed, uint64_t *out) {
    uint64_t ko = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (key_lens[i] > keys_size - ko) {
            _knhk_set_error("key %llu: its length runs past the key bytes given", (unsigned long long)i);
            return KNHK_ERR_INVALID;
        }
        out[i] = siphash13(keys + ko, (size_t)key_lens[i], hash_key, seed);
        ko += key_lens[i];
    }
    return KNHK_OK;
}

/* ---- the handle */

struct knhk_store {
    const uint8_t *base;
    uint64_t size;
    knhk_store_info info;
    const uint8_t *index;      /* base + index_offset */
    uint64_t nblocks;
    uint64_t record_seed;
    _Atomic uint8_t *block_ok; /* [nblocks]: block sum checked */
    _Atomic uint8_t *record_ok;/* bit per slot: record behind the slot checked */
    int keyed;                 /* version >= 2: SipHash-1-3 key hash */
    int watched;               /* reads run under the SIGBUS guard, header re-checked */
    _Atomic int changed;       /* the file changed under a watched reader: sticky */
    _Atomic int *range_changed;/* the registered mapping's flag (a view faulted past the end) */
};

static inline uint64_t key_hash(const knhk_store *s, const void *key, size_t len) {
    return s->keyed ? siphash13(key, len, s->info.hash_key, s->info.seed) : knhk_store_hash(key, len, s->info.seed);
}

static inline uint64_t home_slot(uint64_t h, uint64_t slots) {
    return (uint64_t)(((unsigned __int128)h * slots) >> 64);
}
static inline uint64_t nblocks_of(uint64_t slots) {
    return slots / KNHK_STORE_BLOCK_ENTRIES + (slots % KNHK_STORE_BLOCK_ENTRIES != 0);
}
static inline uint64_t block_sum(const uint8_t *index, uint64_t slots, uint64_t b) {
    uint64_t first = b * KNHK_STORE_BLOCK_ENTRIES;
    uint64_t n = slots - first < KNHK_STORE_BLOCK_ENTRIES ? slots - first : KNHK_STORE_BLOCK_ENTRIES;
    return knhk_store_hash(index + first * 8, (size_t)(n * 8), b);
}

static int fail(int *problem, int code, const char *what) {
    if (problem) *problem = code;
    _knhk_set_error("%s", what);
    return KNHK_ERR_INVALID;
}

/* Read a LEB128 varint from [*p, end); false when it runs off the end or
   overflows 64 bits. */
static inline bool read_varint(const uint8_t **p, const uint8_t *end, uint64_t *out) {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (*p >= end) return false;
        uint8_t b = *(*p)++;
        if (shift == 63 && b > 1) return false;
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *out = v;
            return true;
        }
    }
    return false;
}

static inline size_t write_varint(uint8_t *p, uint64_t v) {
    size_t n = 0;
    while (v >= 0x80) {
        p[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    p[n++] = (uint8_t)v;
    return n;
}

/* Parse the record at off into key (k, kl) and value (v, vl) spans and its end
   (after the checksum) rend. Bounds only; the checksum is check_record's. */
static bool parse_record(const knhk_store *s, uint64_t off, uint64_t *k, uint64_t *kl, uint64_t *v, uint64_t *vl,
                         uint64_t *rend) {
    const uint64_t lo = s->info.records_offset, hi = s->info.records_end;
    if (off < lo || off >= hi) {
        _knhk_set_error("record offset %llu is outside the records region [%llu, %llu)", (unsigned long long)off,
                        (unsigned long long)lo, (unsigned long long)hi);
        return false;
    }
    const uint8_t *p = s->base + off, *end = s->base + hi;
    uint64_t klen, vlen;
    if (!read_varint(&p, end, &klen) || !read_varint(&p, end, &vlen)) {
        _knhk_set_error("record at offset %llu: its length fields run past the records region",
                        (unsigned long long)off);
        return false;
    }
    uint64_t room = (uint64_t)(end - p);
    if (klen > room || vlen > room - klen || room - klen - vlen < 8) {
        _knhk_set_error("record at offset %llu: key length %llu and value length %llu run past the "
                        "records region",
                        (unsigned long long)off, (unsigned long long)klen, (unsigned long long)vlen);
        return false;
    }
    *k = (uint64_t)(p - s->base);
    *kl = klen;
    *v = *k + klen;
    *vl = vlen;
    *rend = *v + vlen + 8;
    return true;
}

static bool check_record(const knhk_store *s, uint64_t off, uint64_t vend) {
    uint64_t want = ld64(s->base + vend);
    if (_knhk_unlikely(knhk_store_hash(s->base + off, (size_t)(vend - off), s->record_seed) != want)) {
        _knhk_set_error("record at offset %llu: checksum mismatch (flipped bit or overwritten bytes)",
                        (unsigned long long)off);
        return false;
    }
    return true;
}

static bool check_block(knhk_store *s, uint64_t b) {
    if (_knhk_likely(atomic_load_explicit(&s->block_ok[b], memory_order_relaxed))) return true;
    uint64_t want = ld64(s->base + s->info.blocksum_offset + b * 8);
    if (block_sum(s->index, s->info.slots, b) != want) {
        _knhk_set_error("index block %llu (slots %llu..): checksum mismatch (flipped bit or overwritten "
                        "bytes)",
                        (unsigned long long)b, (unsigned long long)(b * KNHK_STORE_BLOCK_ENTRIES));
        return false;
    }
    atomic_store_explicit(&s->block_ok[b], 1, memory_order_relaxed);
    return true;
}

static int store_open(const void *base_, uint64_t size, knhk_store **out, int *problem);

/* Open reads the header, the block-sum table and the dictionary: under the
   SIGBUS guard, for a mapping truncated while it is being opened. */
int knhk_store_open(const void *base_, uint64_t size, knhk_store **out, int *problem) {
    if (out) *out = NULL;
    if (_knhk_fault_guard_install() != KNHK_OK) return store_open(base_, size, out, problem);
    sigjmp_buf jb;
    sigjmp_buf *prev = _knhk_fault_jmp;
    if (sigsetjmp(jb, 0)) {
        _knhk_fault_jmp = prev;
        if (out && *out) {
            knhk_store_close(*out);
            *out = NULL;
        }
        return fail(problem, KNHK_STORE_CHANGED_WHILE_OPENING,
                    "the file changed while it was being opened "
                    "(a read faulted with SIGBUS: it was truncated); try again once it is whole");
    }
    _knhk_fault_jmp = &jb;
    atomic_signal_fence(memory_order_seq_cst);
    int r = store_open(base_, size, out, problem);
    atomic_signal_fence(memory_order_seq_cst);
    _knhk_fault_jmp = prev;
    return r;
}

static int store_open(const void *base_, uint64_t size, knhk_store **out, int *problem) {
    const uint8_t *b = (const uint8_t *)base_;
    if (out) *out = NULL;
    if (problem) *problem = KNHK_STORE_OK;
    if (out == NULL || (b == NULL && size != 0)) return fail(problem, KNHK_STORE_CORRUPT, "NULL argument");
    if (size == 0) return fail(problem, KNHK_STORE_EMPTY, "the file is empty (0 bytes)");
    uint64_t m = size < 8 ? size : 8;
    if (memcmp(b, MAGIC, (size_t)m) != 0)
        return fail(problem, KNHK_STORE_BAD_MAGIC,
                    "wrong magic: not a knhk workflow store "
                    "(expected the bytes 'KNHKSTOR' at offset 0)");
    if (size < HDR) {
        _knhk_set_error("truncated: %llu bytes, shorter than the %d-byte header", (unsigned long long)size, HDR);
        if (problem) *problem = KNHK_STORE_TRUNCATED;
        return KNHK_ERR_INVALID;
    }
    knhk_store_info in;
    memset(&in, 0, sizeof in);
    in.version = ld32(b + 8);
    in.flags = ld32(b + 12);
    /* The header checksum first: every version keeps it at byte 120 over
       bytes 0..119, so a flipped bit in the version field reads as a corrupt
       header, not as a file from the future. */
    in.header_sum = ld64(b + HDR - 8);
    if (knhk_store_hash(b, HDR - 8, 0) != in.header_sum) {
        if (in.version > KNHK_STORE_VERSION)
            _knhk_set_error("corrupt header: header checksum mismatch (flipped bit or garbage in the first 128 bytes; "
                            "the version field reads %u, this reader reads versions %d to %d)",
                            in.version, KNHK_STORE_MIN_VERSION, KNHK_STORE_VERSION);
        else
            _knhk_set_error("corrupt header: header checksum mismatch (flipped bit or garbage in the first 128 bytes)");
        if (problem) *problem = KNHK_STORE_CORRUPT;
        return KNHK_ERR_INVALID;
    }
    if (in.version < KNHK_STORE_MIN_VERSION)
        return fail(problem, KNHK_STORE_CORRUPT, "corrupt header: format version 0 is not valid");
    if (in.version > KNHK_STORE_VERSION) {
        _knhk_set_error("format version %u is newer than this reader (reads versions %d to %d); upgrade "
                        "knhk-memory",
                        in.version, KNHK_STORE_MIN_VERSION, KNHK_STORE_VERSION);
        if (problem) *problem = KNHK_STORE_NEWER_VERSION;
        return KNHK_ERR_INVALID;
    }
    in.count = ld64(b + 16);
    in.records_total = ld64(b + 24);
    in.slots = ld64(b + 32);
    in.max_disp = ld64(b + 40);
    /* Version 1 stores records_offset (always 128) at byte 48; version 2 puts
       the key hash's k0 there. */
    if (in.version >= 2) {
        in.hash_key = ld64(b + 48);
        in.records_offset = HDR;
    } else {
        in.records_offset = ld64(b + 48);
    }
    in.records_end = ld64(b + 56);
    in.dict_offset = ld64(b + 64);
    in.dict_length = ld64(b + 72);
    in.index_offset = ld64(b + 80);
    uint64_t dict_sum = ld64(b + 88);
    in.file_size = ld64(b + 96);
    in.seed = ld64(b + 104);
    uint64_t index_sum = ld64(b + 112);
    if (in.file_size > size) {
        _knhk_set_error("truncated: %llu bytes, the header says %llu", (unsigned long long)size,
                        (unsigned long long)in.file_size);
        if (problem) *problem = KNHK_STORE_TRUNCATED;
        return KNHK_ERR_INVALID;
    }
    if (in.file_size < size) {
        _knhk_set_error("%llu bytes, the header says %llu: trailing garbage", (unsigned long long)size,
                        (unsigned long long)in.file_size);
        if (problem) *problem = KNHK_STORE_CORRUPT;
        return KNHK_ERR_INVALID;
    }
    if (in.flags & ~(uint32_t)KNHK_STORE_FLAG_ZSTD) return fail(problem, KNHK_STORE_CORRUPT, "unknown header flags");
    /* Regions in order, each inside the file; subtraction keeps it overflow-free. */
    bool ok = in.records_offset == HDR && in.records_end >= in.records_offset && in.records_end <= size &&
              in.dict_offset >= in.records_end && in.dict_offset <= size && in.dict_length <= size - in.dict_offset &&
              in.index_offset >= in.dict_offset + in.dict_length && in.index_offset <= size &&
              in.index_offset % 8 == 0 && in.slots >= 1 && in.slots <= (size - in.index_offset) / 8 &&
              in.count <= in.slots && in.count <= in.records_total && in.max_disp < in.slots &&
              (in.dict_length == 0 || (in.flags & KNHK_STORE_FLAG_ZSTD));
    uint64_t nblocks = ok ? nblocks_of(in.slots) : 0;
    if (ok) {
        in.blocksum_offset = in.index_offset + in.slots * 8;
        ok = size - in.blocksum_offset == nblocks * 8;
    }
    if (!ok)
        return fail(problem, KNHK_STORE_CORRUPT,
                    "header fields are inconsistent (regions out of "
                    "order or outside the file)");
    if (knhk_store_hash(b + in.blocksum_offset, (size_t)(nblocks * 8), in.seed) != index_sum)
        return fail(problem, KNHK_STORE_CORRUPT,
                    "index checksum mismatch (the table of index block "
                    "sums is damaged)");
    if (in.dict_length && knhk_store_hash(b + in.dict_offset, (size_t)in.dict_length, in.seed) != dict_sum)
        return fail(problem, KNHK_STORE_CORRUPT, "compression dictionary checksum mismatch");

    knhk_store *s = calloc(1, sizeof *s);
    if (s) {
        /* calloc of large arrays maps zero pages: O(1) until touched. */
        s->block_ok = calloc((size_t)nblocks, 1);
        s->record_ok = calloc((size_t)(in.slots / 8 + 1), 1);
    }
    if (!s || !s->block_ok || !s->record_ok) {
        if (s) {
            free((void *)s->block_ok);
            free((void *)s->record_ok);
            free(s);
        }
        _knhk_set_error("out of memory for the verification flags of %llu slots", (unsigned long long)in.slots);
        if (problem) *problem = KNHK_STORE_OK;
        return KNHK_ERR_NOMEM;
    }
    s->base = b;
    s->size = size;
    s->info = in;
    s->index = b + in.index_offset;
    s->nblocks = nblocks;
    s->record_seed = in.seed + 1;
    s->keyed = in.version >= 2;
    *out = s;
    return KNHK_OK;
}

void knhk_store_close(knhk_store *s) {
    if (s == NULL) return;
    free((void *)s->block_ok);
    free((void *)s->record_ok);
    free(s);
}

void knhk_store_get_info(const knhk_store *s, knhk_store_info *out) {
    if (s && out) *out = s->info;
}

/* The probe: hash, walk at most max_disp + 1 slots, compare tag then key. */
static inline int64_t lookup(knhk_store *s, const char *key, size_t len, uint64_t *voff, uint64_t *vlen) {
    const uint64_t slots = s->info.slots;
    const uint64_t h = key_hash(s, key, len);
    const uint64_t tag = h & 0xffff;
    uint64_t j = home_slot(h, slots);
    for (uint64_t d = 0; d <= s->info.max_disp; d++) {
        if (_knhk_unlikely(!check_block(s, j / KNHK_STORE_BLOCK_ENTRIES))) return KNHK_STORE_BROKEN;
        uint64_t e = ld64(s->index + j * 8);
        if (e == 0) return KNHK_STORE_ABSENT;
        if ((e >> 48) == tag) {
            uint64_t k, kl, v, vl, rend;
            if (_knhk_unlikely(!parse_record(s, e & OFFSET_MASK, &k, &kl, &v, &vl, &rend))) return KNHK_STORE_BROKEN;
            if (kl == len && memcmp(s->base + k, key, len) == 0) {
                const uint8_t bit = (uint8_t)(1u << (j & 7));
                if (_knhk_unlikely(!(atomic_load_explicit(&s->record_ok[j >> 3], memory_order_relaxed) & bit))) {
                    if (!check_record(s, e & OFFSET_MASK, v + vl)) return KNHK_STORE_BROKEN;
                    atomic_fetch_or_explicit(&s->record_ok[j >> 3], bit, memory_order_relaxed);
                }
                *voff = v;
                *vlen = vl;
                return 0;
            }
            /* The 16-bit tag says this slot's key hashes like ours, yet the
               key differs: 1 foreign probe in 65,536, or a damaged record
               (a flipped bit in its key or length). Check its checksum
               before moving on, so damage is an error, never a miss. */
            const uint8_t bit = (uint8_t)(1u << (j & 7));
            if (_knhk_unlikely(!(atomic_load_explicit(&s->record_ok[j >> 3], memory_order_relaxed) & bit))) {
                if (!check_record(s, e & OFFSET_MASK, v + vl)) return KNHK_STORE_BROKEN;
                atomic_fetch_or_explicit(&s->record_ok[j >> 3], bit, memory_order_relaxed);
            }
        }
        if (++j == slots) j = 0;
    }
    return KNHK_STORE_ABSENT;
}

/* ---- watched reads: a mapping someone may rewrite in place
 *
 * Each read of a watched handle runs with the thread's SIGBUS guard set (a
 * truncated file faults instead of killing the process) and re-reads the
 * header checksum when it is done: every build has a fresh random key, so
 * any other store (or anything else) written over the file changes those 8
 * bytes, and writers that rewrite a file from its start (cp, shell
 * redirection, truncate, dd) change them before anything else. A read that
 * saw new bytes therefore also sees the new header, after the acquire fence,
 * and reports KNHK_STORE_CHANGED instead of an answer. Once seen, the change
 * is sticky: the handle answers KNHK_STORE_CHANGED until it is replaced. */

static const char *const CHANGE_REASONS[] = {
    "",
    "a read past its end faulted (SIGBUS): it was truncated",
    "its header reads differently now: it was rewritten in place",
    "a memoryview read past its new end: it was truncated",
};

/* reason: an index into CHANGE_REASONS; 0: the one an earlier read recorded. */
static __attribute__((noinline, cold)) int64_t changed(knhk_store *s, int reason) {
    int first = 0;
    if (reason == 0) {
        first = atomic_load_explicit(&s->changed, memory_order_relaxed);
    } else if (!atomic_compare_exchange_strong(&s->changed, &first, reason)) {
        /* first: the reason recorded earlier */
    } else {
        first = reason;
    }
    if (first < 1 || first > 3) first = reason ? reason : 2;
    _knhk_set_error("the file changed under this reader (%s); call reopen() to read the file now at the path",
                    CHANGE_REASONS[first]);
    return KNHK_STORE_CHANGED;
}

static inline uint64_t header_now(const knhk_store *s) {
    uint64_t v = *(const volatile uint64_t *)(const void *)(s->base + HDR - 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

#define WATCHED(s, T, call)                                                                                       \
    do {                                                                                                          \
        if (_knhk_likely(!(s)->watched)) return call;                                                             \
        if (_knhk_unlikely(atomic_load_explicit(&(s)->changed, memory_order_relaxed))) return (T)changed((s), 0); \
        if (_knhk_unlikely((s)->range_changed && atomic_load_explicit((s)->range_changed, memory_order_acquire))) \
            return (T)changed((s), 3);                                                                            \
        sigjmp_buf jb_;                                                                                           \
        sigjmp_buf *prev_ = _knhk_fault_jmp;                                                                      \
        if (sigsetjmp(jb_, 0)) {                                                                                  \
            _knhk_fault_jmp = prev_;                                                                              \
            return (T)changed((s), 1);                                                                            \
        }                                                                                                         \
        _knhk_fault_jmp = &jb_;                                                                                   \
        atomic_signal_fence(memory_order_seq_cst);                                                                \
        T r_ = call;                                                                                              \
        atomic_thread_fence(memory_order_acquire);                                                                \
        uint64_t now_ = header_now(s);                                                                            \
        atomic_signal_fence(memory_order_seq_cst);                                                                \
        _knhk_fault_jmp = prev_;                                                                                  \
        if (_knhk_unlikely(now_ != (s)->info.header_sum)) return (T)changed((s), 2);                              \
        return r_;                                                                                                \
    } while (0)

int knhk_store_watch(knhk_store *s) {
    if (_knhk_fault_guard_install() != KNHK_OK) return -2;
    _Atomic int *flag = NULL;
    int slot = _knhk_watch_range(s->base, s->size, &flag);
    s->range_changed = flag;
    s->watched = 1;
    return slot;
}

int64_t knhk_store_lookup(knhk_store *s, const char *key, size_t len, uint64_t *voff, uint64_t *vlen) {
    WATCHED(s, int64_t, lookup(s, key, len, voff, vlen));
}

static inline int64_t find_packed(knhk_store *s, const char *key, size_t len) {
    uint64_t v, vl;
    int64_t r = lookup(s, key, len, &v, &vl);
    if (r < 0) return r;
    if (_knhk_unlikely(v >= (UINT64_C(1) << 39) || vl >= (UINT64_C(1) << 24))) return KNHK_STORE_WIDE;
    return (int64_t)((v << 24) | vl);
}

int64_t knhk_store_find(knhk_store *s, const char *key, size_t len) { WATCHED(s, int64_t, find_packed(s, key, len)); }

int64_t knhk_store_find_span(knhk_store *s, const char *key, size_t len, uint64_t *span) {
    span[0] = span[1] = 0;
    WATCHED(s, int64_t, lookup(s, key, len, &span[0], &span[1]));
}

static int copy_raw(const knhk_store *s, uint64_t offset, uint64_t len, uint8_t *dst) {
    if (offset > s->size || len > s->size - offset) {
        _knhk_set_error("bytes [%llu, +%llu) are outside the %llu-byte file", (unsigned long long)offset,
                        (unsigned long long)len, (unsigned long long)s->size);
        return KNHK_ERR_INVALID;
    }
    if (len) memcpy(dst, s->base + offset, (size_t)len);
    return KNHK_OK;
}

int knhk_store_copy(knhk_store *s, uint64_t offset, uint64_t len, uint8_t *dst) {
    WATCHED(s, int, copy_raw(s, offset, len, dst));
}

int knhk_store_check_changed(knhk_store *s) { WATCHED(s, int, KNHK_OK); }

static int64_t live_offsets(knhk_store *s, uint64_t *out, uint64_t cap);
static int record_at(knhk_store *s, uint64_t offset, uint64_t *spans);
static int verify(knhk_store *s, uint64_t *checked);

int64_t knhk_store_live_offsets(knhk_store *s, uint64_t *out, uint64_t cap) {
    WATCHED(s, int64_t, live_offsets(s, out, cap));
}

int knhk_store_record_at(knhk_store *s, uint64_t offset, uint64_t *spans) {
    WATCHED(s, int, record_at(s, offset, spans));
}

int knhk_store_verify(knhk_store *s, uint64_t *checked) { WATCHED(s, int, verify(s, checked)); }

static int64_t live_offsets(knhk_store *s, uint64_t *out, uint64_t cap) {
    uint64_t n = 0;
    for (uint64_t b = 0; b < s->nblocks; b++)
        if (!check_block(s, b)) return KNHK_STORE_BROKEN;
    for (uint64_t j = 0; j < s->info.slots; j++) {
        uint64_t e = ld64(s->index + j * 8);
        if (e == 0) continue;
        if (n < cap) out[n] = e & OFFSET_MASK;
        n++;
    }
    return (int64_t)n;
}

static int record_at(knhk_store *s, uint64_t offset, uint64_t *spans) {
    uint64_t k, kl, v, vl, rend;
    if (!parse_record(s, offset, &k, &kl, &v, &vl, &rend) || !check_record(s, offset, v + vl)) return KNHK_ERR_INVALID;
    spans[0] = k;
    spans[1] = kl;
    spans[2] = v;
    spans[3] = vl;
    return KNHK_OK;
}

static int verify(knhk_store *s, uint64_t *checked) {
    const knhk_store_info *in = &s->info;
    uint64_t n = 0, live = 0, maxd = 0;
    if (checked) *checked = 0;
    /* Header fields open cannot check without reading the data: the regions
       abut as the writer lays them out, and the padding is zeros. */
    uint64_t dict_end = in->dict_offset + in->dict_length;
    if (in->dict_offset != in->records_end || in->index_offset != dict_end + (-dict_end & 7)) {
        _knhk_set_error("header: the dictionary does not start where the records end (%llu, %llu) or the index "
                        "does not follow it (%llu)",
                        (unsigned long long)in->dict_offset, (unsigned long long)in->records_end,
                        (unsigned long long)in->index_offset);
        return KNHK_ERR_INVALID;
    }
    for (uint64_t o = dict_end; o < in->index_offset; o++) {
        if (s->base[o] != 0) {
            _knhk_set_error("padding byte at offset %llu is not zero", (unsigned long long)o);
            return KNHK_ERR_INVALID;
        }
    }
    for (uint64_t b = 0; b < s->nblocks; b++) {
        if (block_sum(s->index, in->slots, b) != ld64(s->base + in->blocksum_offset + b * 8)) {
            _knhk_set_error("index block %llu: checksum mismatch (flipped bit or overwritten bytes)",
                            (unsigned long long)b);
            return KNHK_ERR_INVALID;
        }
    }
    for (uint64_t j = 0; j < in->slots; j++) {
        uint64_t e = ld64(s->index + j * 8), k, kl, v, vl, rend;
        if (e == 0) continue;
        if (!parse_record(s, e & OFFSET_MASK, &k, &kl, &v, &vl, &rend) || !check_record(s, e & OFFSET_MASK, v + vl))
            return KNHK_ERR_INVALID;
        uint64_t h = key_hash(s, s->base + k, (size_t)kl);
        uint64_t home = home_slot(h, in->slots);
        uint64_t d = j >= home ? j - home : j + in->slots - home;
        if ((e >> 48) != (h & 0xffff) || d > in->max_disp) {
            _knhk_set_error("index slot %llu: its record's key does not hash there (tag or displacement "
                            "%llu > %llu wrong)",
                            (unsigned long long)j, (unsigned long long)d, (unsigned long long)in->max_disp);
            return KNHK_ERR_INVALID;
        }
        if (d > maxd) maxd = d;
        live++;
    }
    if (live != in->count) {
        _knhk_set_error("the index holds %llu keys, the header says %llu", (unsigned long long)live,
                        (unsigned long long)in->count);
        return KNHK_ERR_INVALID;
    }
    if (maxd != in->max_disp) {
        _knhk_set_error("header: max_disp is %llu, the index's longest displacement is %llu",
                        (unsigned long long)in->max_disp, (unsigned long long)maxd);
        return KNHK_ERR_INVALID;
    }
    uint64_t off = in->records_offset;
    while (off < in->records_end) {
        uint64_t k, kl, v, vl, rend;
        if (!parse_record(s, off, &k, &kl, &v, &vl, &rend) || !check_record(s, off, v + vl)) return KNHK_ERR_INVALID;
        off = rend;
        n++;
        if (checked) *checked = n;
    }
    if (n != in->records_total) {
        _knhk_set_error("the records region holds %llu records, the header says %llu", (unsigned long long)n,
                        (unsigned long long)in->records_total);
        return KNHK_ERR_INVALID;
    }
    return KNHK_OK;
}

size_t knhk_store_encode_record(const char *key, size_t key_len, const char *value, size_t value_len, uint64_t seed,
                                uint8_t *out, size_t cap, uint64_t *key_hash) {
    if (key_hash) *key_hash = knhk_store_hash(key, key_len, seed);
    if (key_len > SIZE_MAX - 28 || value_len > SIZE_MAX - 28 - key_len || cap < key_len + value_len + 28) return 0;
    size_t n = write_varint(out, key_len);
    n += write_varint(out + n, value_len);
    memcpy(out + n, key, key_len);
    n += key_len;
    if (value_len) memcpy(out + n, value, value_len);
    n += value_len;
    st64(out + n, knhk_store_hash(out, n, seed + 1));
    return n + 8;
}

size_t knhk_store_encode_batch(const uint8_t *keys, uint64_t keys_size, const uint64_t *key_lens, const uint8_t *values,
                               uint64_t values_size, const uint64_t *value_lens, uint64_t n, uint64_t seed,
                               uint64_t base_offset, uint8_t *out, size_t cap, uint64_t *hashes, uint64_t *offsets) {
    uint64_t ko = 0, vo = 0;
    size_t pos = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t kl = key_lens[i], vl = value_lens[i];
        if (kl > keys_size - ko || vl > values_size - vo) {
            _knhk_set_error("record %llu: lengths run past the key or value bytes given", (unsigned long long)i);
            return 0;
        }
        size_t w = knhk_store_encode_record((const char *)keys + ko, (size_t)kl, (const char *)values + vo, (size_t)vl,
                                            seed, out + pos, cap - pos, hashes ? &hashes[i] : NULL);
        if (w == 0) {
            _knhk_set_error("record %llu does not fit in the %zu-byte buffer", (unsigned long long)i, cap);
            return 0;
        }
        offsets[i] = base_offset + pos;
        pos += w;
        ko += kl;
        vo += vl;
    }
    return pos;
}

int knhk_store_build_index(const uint64_t *hashes, const uint64_t *offsets, uint64_t n, uint64_t slots, uint64_t *table,
                           uint64_t *blocksums, uint64_t *max_disp) {
    if (slots < n || slots == 0 || slots > SIZE_MAX / 8) {
        _knhk_set_error("slots %llu must be at least the record count %llu and nonzero", (unsigned long long)slots,
                        (unsigned long long)n);
        return KNHK_ERR_INVALID;
    }
    uint64_t *th = malloc((size_t)slots * 8); /* full hash of each placed entry */
    if (!th) {
        _knhk_set_error("out of memory for %llu index slots", (unsigned long long)slots);
        return KNHK_ERR_NOMEM;
    }
    uint64_t maxd = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (offsets[i] > OFFSET_MASK || offsets[i] == 0) {
            free(th);
            _knhk_set_error("record offset %llu does not fit the 48-bit index field", (unsigned long long)offsets[i]);
            return KNHK_ERR_INVALID;
        }
        uint64_t h = hashes[i], e = ((h & 0xffff) << 48) | offsets[i];
        uint64_t j = home_slot(h, slots), d = 0;
        for (;;) {
            if (table[j] == 0) {
                table[j] = e;
                th[j] = h;
                if (d > maxd) maxd = d;
                break;
            }
            uint64_t eh = home_slot(th[j], slots);
            uint64_t ed = j >= eh ? j - eh : j + slots - eh;
            if (ed < d) { /* Robin Hood: the richer entry moves on */
                uint64_t te = table[j], tt = th[j];
                table[j] = e;
                th[j] = h;
                if (d > maxd) maxd = d;
                e = te;
                h = tt;
                d = ed;
            }
            if (++j == slots) j = 0;
            d++;
        }
    }
    free(th);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    for (uint64_t j = 0; j < slots; j++) table[j] = __builtin_bswap64(table[j]);
#endif
    for (uint64_t b = 0; b < nblocks_of(slots); b++)
        st64((uint8_t *)&blocksums[b], block_sum((const uint8_t *)table, slots, b));
    *max_disp = maxd;
    return KNHK_OK;
}

void knhk_store_hotop_probe(void *ctx, uint64_t iterations) {
    const knhk_store_probe_ctx *c = (const knhk_store_probe_ctx *)ctx;
    int64_t acc = 0;
    for (uint64_t i = 0; i < iterations; i++) {
        acc += knhk_store_find(c->store, c->key, c->key_len);
        __asm__ volatile("" : "+r"(acc)); /* keep each lookup: no hoisting out of the loop */
    }
}
