/* metrics.c -- labelled metric families and histograms in one shared block.
 *
 * A metrics block is, in one piece of memory (private, a file or POSIX
 * shared memory):
 *
 *   header     magic, version, sizes and offsets, checksum (written once)
 *   hot line   the atomics inserters bump: label sets and families reserved,
 *              arena bytes used, cells handed out
 *   table      `capacity` entries (a power of two), open addressing with
 *              linear probing on a 64-bit FNV-1a hash of (kind, parent, key)
 *   arena      the entries' key and payload bytes, bump-allocated
 *   counters   a knhk_counters SUM block of `cells` counters (counters.c):
 *              the striped cells every label set counts into
 *
 * An entry is a family (kind 1: key = the family name, payload = its
 * definition) or a label set of one (kind 2: parent = the family's entry
 * index, key = the encoded label values). It owns `ncells` consecutive
 * counters of the embedded block from `cell`: one for a counter, one per
 * bucket plus one for the sum for a histogram.
 *
 * Insertion (knhk_metrics_intern) is lock-free across processes. An entry's
 * state word goes EMPTY -> WRITING (pid << 32 | 1, by CAS: the one inserter
 * that wins owns the entry) -> READY (a release store after the key, payload
 * and cells are written; readers load it with acquire). An entry never moves
 * or changes once READY, so a handle may cache what it decoded. An inserter
 * that finds WRITING waits (yielding) for READY; if the writing pid is dead
 * (it was killed mid-insert), or the entry stays WRITING for over 2 s (its
 * writer is stopped, or the pid was reused), it CASes the entry to DEAD, a
 * tombstone that probes step over and that is never reused. The writer goes
 * WRITING -> READY by CAS too, so a writer overtaken that way finds its entry
 * buried and inserts again: two inserters of one key always end at the same
 * entry, and no insert waits on another for more than 2 s. The arena bytes and cells of a dead insert
 * are lost (nothing was counted in them); the table is twice the number of
 * entries it may hold, so tombstones do not fill it in practice.
 *
 * Bounds: at most `max_sets` label sets (the config's [metrics]
 * max_label_sets) and KNHK_METRICS_FAMILIES_MAX families; a reservation is
 * taken (fetch_add) before the entry is claimed and given back if the key
 * turns out to exist. Past a bound, knhk_metrics_intern returns
 * KNHK_ERR_STATE and says which bound in *full.
 *
 * The block is untrusted input on open: every header offset and length is
 * checked against the mapped size, and every entry read checks its arena
 * span and cell range against the header copy this handle validated (not
 * the shared header, which another process could change).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "knhk_internal.h"

#define ST_EMPTY 0u
#define ST_WRITING 1u /* low 32 bits; the inserter's pid in the high 32 */
#define ST_READY 2u
#define ST_DEAD 3u
#define WAIT_NS (2ull * 1000 * 1000 * 1000) /* a live inserter takes microseconds */

typedef struct {
    uint64_t magic;
    uint32_t version;
    uint32_t cache_line;
    uint32_t capacity;  /* table entries, a power of two */
    uint32_t max_sets;  /* label sets allowed */
    uint32_t cells;     /* counters of the embedded block */
    uint32_t families_max;
    uint64_t hot_off, table_off, arena_off, arena_size, counters_off, counters_size, total_size;
    uint64_t checksum; /* FNV-1a over the fields above */
    _Atomic uint32_t ready;
} metrics_header;

typedef struct {
    _Atomic uint32_t sets;     /* label sets reserved */
    _Atomic uint32_t families; /* families reserved */
    _Atomic uint64_t arena_used;
    _Atomic uint64_t next_cell;
} metrics_hot;

typedef struct {
    _Atomic uint64_t state;
    uint64_t hash;
    uint64_t key_off; /* into the arena: key bytes, then payload bytes */
    uint32_t key_len;
    uint32_t payload_len;
    uint32_t kind;
    uint32_t parent;
    uint32_t cell;
    uint32_t ncells;
} metrics_entry;

struct knhk_metrics {
    metrics_header h; /* the validated copy: the only offsets this handle trusts */
    char *base;
    metrics_hot *hot;
    metrics_entry *table;
    const char *arena;
    knhk_counters *counters;
};

static uint64_t round_line(uint64_t n) { return (n + KNHK_CACHE_LINE - 1) & ~(uint64_t)(KNHK_CACHE_LINE - 1); }

static uint64_t fnv(uint64_t hash, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) hash = (hash ^ b[i]) * 0x100000001b3ULL;
    return hash;
}

static uint32_t capacity_for(uint32_t max_sets) {
    uint64_t want = 2 * ((uint64_t)max_sets + KNHK_METRICS_FAMILIES_MAX), cap = 64;
    while (cap < want) cap <<= 1;
    return (uint32_t)cap;
}

/* The empty names region of the embedded counter block: `cells` empty names. */
static size_t names_len_for(uint32_t cells) { return cells; }

static bool layout(metrics_header *h, uint32_t max_sets, uint32_t cells) {
    if (max_sets < 1 || max_sets > KNHK_METRICS_SETS_MAX || cells < 1 || cells > KNHK_COUNTERS_MAX) return false;
    size_t csize = knhk_counters_layout_size(KNHK_COUNTERS_FLAVOR_SUM, cells, names_len_for(cells));
    if (csize == 0) return false;
    memset(h, 0, sizeof *h);
    h->magic = KNHK_METRICS_MAGIC;
    h->version = KNHK_METRICS_VERSION;
    h->cache_line = KNHK_CACHE_LINE;
    h->capacity = capacity_for(max_sets);
    h->max_sets = max_sets;
    h->cells = cells;
    h->families_max = KNHK_METRICS_FAMILIES_MAX;
    h->hot_off = round_line(sizeof(metrics_header));
    h->table_off = round_line(h->hot_off + sizeof(metrics_hot));
    h->arena_off = round_line(h->table_off + (uint64_t)h->capacity * sizeof(metrics_entry));
    h->arena_size =
        round_line((uint64_t)max_sets * KNHK_METRICS_SET_BYTES + (uint64_t)KNHK_METRICS_FAMILIES_MAX * 1024);
    h->counters_off = round_line(h->arena_off + h->arena_size);
    h->counters_size = csize;
    h->total_size = h->counters_off + csize;
    return true;
}

static uint64_t header_checksum(const metrics_header *h) {
    return fnv(0xcbf29ce484222325ULL, h, offsetof(metrics_header, checksum));
}

size_t knhk_metrics_layout_size(uint32_t max_sets, uint32_t cells) {
    metrics_header h;
    return layout(&h, max_sets, cells) ? (size_t)h.total_size : 0;
}

int knhk_metrics_format(void *mem, size_t size, uint32_t max_sets, uint32_t cells) {
    metrics_header h;
    if (mem == NULL || ((uintptr_t)mem & (KNHK_CACHE_LINE - 1)) != 0) {
        _knhk_set_error("metrics block memory must be aligned to %d bytes", KNHK_CACHE_LINE);
        return KNHK_ERR_INVALID;
    }
    if (!layout(&h, max_sets, cells)) {
        _knhk_set_error("a metrics block of %u label sets and %u cells is out of range (label sets 1..%d, cells "
                        "1..%d)",
                        max_sets, cells, KNHK_METRICS_SETS_MAX, KNHK_COUNTERS_MAX);
        return KNHK_ERR_INVALID;
    }
    if (size < h.total_size) {
        _knhk_set_error("block of %zu bytes is smaller than the %llu bytes the layout needs", size,
                        (unsigned long long)h.total_size);
        return KNHK_ERR_INVALID;
    }
    metrics_header *dst = mem;
    if (atomic_load_explicit(&dst->ready, memory_order_acquire) != 0) {
        _knhk_set_error("the metrics block is already formatted");
        return KNHK_ERR_STATE;
    }
    char *names = calloc(1, names_len_for(cells));
    if (names == NULL) {
        _knhk_set_error("out of memory for the cell names");
        return KNHK_ERR_NOMEM;
    }
    int st = knhk_counters_format((char *)mem + h.counters_off, h.counters_size, KNHK_COUNTERS_FLAVOR_SUM, cells, names,
                                  names_len_for(cells));
    free(names);
    if (st != KNHK_OK) return st;
    h.checksum = header_checksum(&h);
    memcpy(dst, &h, offsetof(metrics_header, ready));
    atomic_store_explicit(&dst->ready, 1, memory_order_release);
    return KNHK_OK;
}

int knhk_metrics_open(void *mem, size_t size, knhk_metrics **out) {
    *out = NULL;
    if (mem == NULL || ((uintptr_t)mem & (KNHK_CACHE_LINE - 1)) != 0) {
        _knhk_set_error("metrics block memory must be aligned to %d bytes", KNHK_CACHE_LINE);
        return KNHK_ERR_INVALID;
    }
    if (size < sizeof(metrics_header)) {
        _knhk_set_error("%zu bytes cannot hold a metrics block header (%zu bytes)", size, sizeof(metrics_header));
        return KNHK_ERR_INVALID;
    }
    metrics_header *shared = mem;
    if (shared->magic != KNHK_METRICS_MAGIC) {
        _knhk_set_error("not a metrics block (magic 0x%016llx, expected 0x%016llx)", (unsigned long long)shared->magic,
                        (unsigned long long)KNHK_METRICS_MAGIC);
        return KNHK_ERR_INVALID;
    }
    if (atomic_load_explicit(&shared->ready, memory_order_acquire) != 1) {
        _knhk_set_error("the metrics block is not completely written (its creator may still be formatting it)");
        return KNHK_ERR_STATE;
    }
    metrics_header h;
    memcpy(&h, shared, sizeof h); /* from here on only the copy is trusted */
    if (h.version != KNHK_METRICS_VERSION) {
        _knhk_set_error("metrics block version %u, this build reads version %d", h.version, KNHK_METRICS_VERSION);
        return KNHK_ERR_INVALID;
    }
    if (h.cache_line != KNHK_CACHE_LINE) {
        _knhk_set_error("metrics block laid out for %u-byte cache lines, this build uses %d", h.cache_line,
                        KNHK_CACHE_LINE);
        return KNHK_ERR_INVALID;
    }
    if (header_checksum(&h) != h.checksum) {
        _knhk_set_error("metrics block header checksum does not match (corrupt block)");
        return KNHK_ERR_INVALID;
    }
    metrics_header want;
    if (!layout(&want, h.max_sets, h.cells) || memcmp(&want, &h, offsetof(metrics_header, checksum)) != 0) {
        _knhk_set_error("metrics block header is inconsistent (%u label sets, %u cells, capacity %u)", h.max_sets,
                        h.cells, h.capacity);
        return KNHK_ERR_INVALID;
    }
    if (size < h.total_size) {
        _knhk_set_error("metrics block needs %llu bytes, only %zu are mapped", (unsigned long long)h.total_size, size);
        return KNHK_ERR_INVALID;
    }
    knhk_counters *c;
    int st = knhk_counters_open((char *)mem + h.counters_off, (size_t)h.counters_size, &c);
    if (st != KNHK_OK) return st;
    if (knhk_counters_flavor(c) != KNHK_COUNTERS_FLAVOR_SUM || knhk_counters_count(c) != h.cells) {
        knhk_counters_close(c);
        _knhk_set_error("the metrics block's cell block does not hold %u sum counters", h.cells);
        return KNHK_ERR_INVALID;
    }
    knhk_metrics *m = calloc(1, sizeof *m);
    if (m == NULL) {
        knhk_counters_close(c);
        _knhk_set_error("out of memory for a metrics handle");
        return KNHK_ERR_NOMEM;
    }
    m->h = h;
    m->base = mem;
    m->hot = (metrics_hot *)(m->base + h.hot_off);
    m->table = (metrics_entry *)(m->base + h.table_off);
    m->arena = m->base + h.arena_off;
    m->counters = c;
    *out = m;
    return KNHK_OK;
}

void knhk_metrics_close(knhk_metrics *m) {
    if (m == NULL) return;
    knhk_counters_close(m->counters);
    free(m);
}

knhk_counters *knhk_metrics_counters(const knhk_metrics *m) { return m->counters; }
uint32_t knhk_metrics_capacity(const knhk_metrics *m) { return m->h.capacity; }
uint32_t knhk_metrics_max_sets(const knhk_metrics *m) { return m->h.max_sets; }
uint32_t knhk_metrics_cells(const knhk_metrics *m) { return m->h.cells; }

void knhk_metrics_usage(const knhk_metrics *m, uint64_t out[4]) {
    uint32_t sets = atomic_load_explicit(&m->hot->sets, memory_order_relaxed);
    uint32_t fams = atomic_load_explicit(&m->hot->families, memory_order_relaxed);
    uint64_t arena = atomic_load_explicit(&m->hot->arena_used, memory_order_relaxed);
    uint64_t cells = atomic_load_explicit(&m->hot->next_cell, memory_order_relaxed);
    out[0] = sets < m->h.max_sets ? sets : m->h.max_sets;
    out[1] = fams < m->h.families_max ? fams : m->h.families_max;
    out[2] = arena < m->h.arena_size ? arena : m->h.arena_size;
    out[3] = cells < m->h.cells ? cells : m->h.cells;
}

static uint64_t entry_hash(uint32_t kind, uint32_t parent, const void *key, size_t len) {
    uint64_t x = fnv(0xcbf29ce484222325ULL, &kind, sizeof kind);
    x = fnv(x, &parent, sizeof parent);
    return fnv(x, key, len);
}

/* A READY entry's fields, checked against this handle's header copy:
   true when they are in bounds. */
static bool entry_fields(const knhk_metrics *m, const metrics_entry *e, metrics_entry *out) {
    out->hash = e->hash;
    out->key_off = e->key_off;
    out->key_len = e->key_len;
    out->payload_len = e->payload_len;
    out->kind = e->kind;
    out->parent = e->parent;
    out->cell = e->cell;
    out->ncells = e->ncells;
    uint64_t span = (uint64_t)out->key_len + out->payload_len;
    return (out->kind == KNHK_METRICS_KIND_FAMILY || out->kind == KNHK_METRICS_KIND_SET) &&
           out->key_off <= m->h.arena_size && span <= m->h.arena_size - out->key_off && out->cell <= m->h.cells &&
           out->ncells <= m->h.cells - out->cell &&
           (out->kind == KNHK_METRICS_KIND_FAMILY || out->parent < m->h.capacity);
}

static bool pid_dead(uint32_t pid) { return pid != 0 && kill((pid_t)pid, 0) == -1 && errno == ESRCH; }

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Take n units of a bump counter, never past limit: false when they do not fit
   (the counter is left as it was, so a smaller request may still fit). */
static bool bump(_Atomic uint64_t *ctr, uint64_t n, uint64_t limit, uint64_t *at) {
    uint64_t cur = atomic_load_explicit(ctr, memory_order_relaxed);
    do {
        if (cur > limit || n > limit - cur) return false;
    } while (!atomic_compare_exchange_weak_explicit(ctr, &cur, cur + n, memory_order_relaxed, memory_order_relaxed));
    *at = cur;
    return true;
}

static void unreserve(knhk_metrics *m, uint32_t kind) {
    atomic_fetch_sub_explicit(kind == KNHK_METRICS_KIND_SET ? &m->hot->sets : &m->hot->families, 1,
                              memory_order_relaxed);
}

/* Reserve one label set or family: false (and *full set) past the bound. */
static bool reserve(knhk_metrics *m, uint32_t kind, int *full) {
    _Atomic uint32_t *ctr = kind == KNHK_METRICS_KIND_SET ? &m->hot->sets : &m->hot->families;
    uint32_t bound = kind == KNHK_METRICS_KIND_SET ? m->h.max_sets : m->h.families_max;
    uint32_t was = atomic_fetch_add_explicit(ctr, 1, memory_order_relaxed);
    if (was >= bound) {
        atomic_fetch_sub_explicit(ctr, 1, memory_order_relaxed);
        *full = kind == KNHK_METRICS_KIND_SET ? KNHK_METRICS_FULL_SETS : KNHK_METRICS_FULL_FAMILIES;
        return false;
    }
    return true;
}

int knhk_metrics_intern(knhk_metrics *m, uint32_t kind, uint32_t parent, const void *key, size_t key_len,
                        const void *payload, size_t payload_len, uint32_t ncells, uint32_t *entry_out,
                        uint32_t *cell_out, int *created, int *full) {
    *full = 0;
    *created = 0;
    if (kind != KNHK_METRICS_KIND_FAMILY && kind != KNHK_METRICS_KIND_SET) {
        _knhk_set_error("entry kind %u is not %d (family) or %d (label set)", kind, KNHK_METRICS_KIND_FAMILY,
                        KNHK_METRICS_KIND_SET);
        return KNHK_ERR_INVALID;
    }
    if (kind == KNHK_METRICS_KIND_SET && parent >= m->h.capacity) {
        _knhk_set_error("family entry %u is out of range [0, %u)", parent, m->h.capacity);
        return KNHK_ERR_INVALID;
    }
    if (key_len + payload_len > KNHK_METRICS_ENTRY_BYTES_MAX || key_len + payload_len < key_len) {
        _knhk_set_error("an entry of %zu key and %zu payload bytes is larger than the %d bytes accepted", key_len,
                        payload_len, KNHK_METRICS_ENTRY_BYTES_MAX);
        return KNHK_ERR_INVALID;
    }
    if (ncells > m->h.cells) {
        _knhk_set_error("an entry of %u cells cannot fit a block of %u cells", ncells, m->h.cells);
        return KNHK_ERR_INVALID;
    }
    uint64_t hash = entry_hash(kind, parent, key, key_len);
    uint32_t mask = m->h.capacity - 1, pid = (uint32_t)getpid();
    bool reserved = false;
    int restarts = 0;
restart:
    for (uint32_t probe = 0; probe < m->h.capacity; probe++) {
        metrics_entry *e = &m->table[(hash + probe) & mask];
        uint64_t waited_from = 0;
        for (;;) {
            uint64_t st = atomic_load_explicit(&e->state, memory_order_acquire);
            if (st == ST_READY) {
                metrics_entry f;
                if (entry_fields(m, e, &f) && f.hash == hash && f.kind == kind && f.parent == parent &&
                    f.key_len == key_len && memcmp(m->arena + f.key_off, key, key_len) == 0) {
                    if (reserved) unreserve(m, kind);
                    *entry_out = (hash + probe) & mask;
                    *cell_out = f.cell;
                    return KNHK_OK;
                }
                break; /* another key: probe on */
            }
            if (st == ST_DEAD) break;
            if (st == ST_EMPTY) {
                if (!reserved && !(reserved = reserve(m, kind, full))) {
                    _knhk_set_error("the metrics block holds its bound of %u %s",
                                    kind == KNHK_METRICS_KIND_SET ? m->h.max_sets : m->h.families_max,
                                    kind == KNHK_METRICS_KIND_SET ? "label sets" : "families");
                    return KNHK_ERR_STATE;
                }
                uint64_t expected = ST_EMPTY, mine = ((uint64_t)pid << 32) | ST_WRITING;
                if (!atomic_compare_exchange_strong_explicit(&e->state, &expected, mine, memory_order_acquire,
                                                             memory_order_relaxed))
                    continue; /* someone claimed it first: look again */
                uint64_t span = (uint64_t)key_len + payload_len, off = 0, cell = 0;
                bool arena_ok = bump(&m->hot->arena_used, span, m->h.arena_size, &off);
                if (!arena_ok || !bump(&m->hot->next_cell, ncells, m->h.cells, &cell)) {
                    atomic_store_explicit(&e->state, ST_DEAD, memory_order_release);
                    unreserve(m, kind);
                    *full = arena_ok ? KNHK_METRICS_FULL_CELLS : KNHK_METRICS_FULL_BYTES;
                    if (!arena_ok)
                        _knhk_set_error("the metrics block's %llu bytes of label values are used up",
                                        (unsigned long long)m->h.arena_size);
                    else
                        _knhk_set_error("the metrics block's %u cells are used up (%u more needed)", m->h.cells,
                                        ncells);
                    return KNHK_ERR_STATE;
                }
                char *dst = (char *)m->arena + off;
                if (key_len) memcpy(dst, key, key_len);
                if (payload_len) memcpy(dst + key_len, payload, payload_len);
                e->hash = hash;
                e->key_off = off;
                e->key_len = (uint32_t)key_len;
                e->payload_len = (uint32_t)payload_len;
                e->kind = kind;
                e->parent = parent;
                e->cell = (uint32_t)cell;
                e->ncells = ncells;
                /* A CAS, not a store: if this insert was so slow that a waiter
                   buried the entry, it stays buried and the insert starts
                   again (never two entries of one key). */
                uint64_t writing = mine;
                if (!atomic_compare_exchange_strong_explicit(&e->state, &writing, ST_READY, memory_order_release,
                                                             memory_order_relaxed)) {
                    if (++restarts > 8) {
                        if (reserved) unreserve(m, kind);
                        _knhk_set_error("inserting into the metrics table was overtaken 8 times (this process "
                                        "was stopped for over 2 s while inserting, each time)");
                        return KNHK_ERR_STATE;
                    }
                    goto restart;
                }
                *entry_out = (hash + probe) & mask;
                *cell_out = (uint32_t)cell;
                *created = 1;
                return KNHK_OK;
            }
            /* WRITING: wait for READY. Bury the entry if its writer is dead
               (killed mid-insert), or has not finished in WAIT_NS (stopped,
               or its pid was reused): a slow writer that comes back finds
               its entry buried (its CAS to READY fails) and inserts again. */
            uint32_t writer = (uint32_t)(st >> 32);
            uint64_t now = now_ns();
            if (waited_from == 0) waited_from = now;
            if ((uint32_t)st != ST_WRITING || writer == 0 || pid_dead(writer) || now - waited_from > WAIT_NS) {
                atomic_compare_exchange_strong_explicit(&e->state, &st, ST_DEAD, memory_order_relaxed,
                                                        memory_order_relaxed);
                continue;
            }
            sched_yield();
        }
    }
    if (reserved) unreserve(m, kind);
    *full = KNHK_METRICS_FULL_TABLE;
    _knhk_set_error("the metrics table's %u entries are all used", m->h.capacity);
    return KNHK_ERR_STATE;
}

int knhk_metrics_list(const knhk_metrics *m, uint32_t *out, size_t cap, size_t *n) {
    size_t k = 0;
    for (uint32_t i = 0; i < m->h.capacity; i++) {
        if (atomic_load_explicit(&m->table[i].state, memory_order_acquire) != ST_READY) continue;
        if (k == cap) {
            _knhk_set_error("the list buffer holds %zu entries, more are ready", cap);
            *n = k;
            return KNHK_ERR_INVALID;
        }
        out[k++] = i;
    }
    *n = k;
    return KNHK_OK;
}

int knhk_metrics_entry_get(const knhk_metrics *m, uint32_t index, knhk_metrics_entry_info *out) {
    memset(out, 0, sizeof *out);
    if (index >= m->h.capacity) {
        _knhk_set_error("entry %u is out of range [0, %u)", index, m->h.capacity);
        return KNHK_ERR_INVALID;
    }
    const metrics_entry *e = &m->table[index];
    if (atomic_load_explicit(&e->state, memory_order_acquire) != ST_READY) {
        _knhk_set_error("entry %u is not ready", index);
        return KNHK_ERR_STATE;
    }
    metrics_entry f;
    if (!entry_fields(m, e, &f)) {
        _knhk_set_error("entry %u is corrupt: its key, payload or cells lie outside the block", index);
        return KNHK_ERR_INVALID;
    }
    out->kind = f.kind;
    out->parent = f.parent;
    out->cell = f.cell;
    out->ncells = f.ncells;
    out->key = m->arena + f.key_off;
    out->key_len = f.key_len;
    out->payload = m->arena + f.key_off + f.key_len;
    out->payload_len = f.payload_len;
    return KNHK_OK;
}

int knhk_metrics_observe(knhk_counters *c, uint32_t cell, const double *bounds, uint32_t nbounds, double value,
                         int64_t sum_units) {
    /* Prometheus `le`: the first bucket whose upper bound is >= value; the
       last cell is the +Inf bucket (not in bounds). */
    uint32_t lo = 0, hi = nbounds;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (value <= bounds[mid])
            hi = mid;
        else
            lo = mid + 1;
    }
    int st = knhk_counters_add(c, cell + lo, 1);
    if (st != KNHK_OK) return st;
    return sum_units ? knhk_counters_add(c, cell + nbounds + 1, sum_units) : KNHK_OK;
}

int knhk_metrics_values(const knhk_metrics *m, int64_t *out, size_t cap, size_t *n) {
    /* Only the cells handed out so far (the shared bump counter, clamped to
       this handle's validated cell count): a scrape reads 64 slots x the
       cells in use, not x the block's capacity. */
    uint64_t used = atomic_load_explicit(&m->hot->next_cell, memory_order_acquire);
    if (used > m->h.cells) used = m->h.cells;
    if (cap < used) {
        _knhk_set_error("the value buffer holds %zu cells, %llu are in use", cap, (unsigned long long)used);
        *n = 0;
        return KNHK_ERR_INVALID;
    }
    for (uint64_t i = 0; i < used; i++) out[i] = knhk_counters_get(m->counters, (uint32_t)i);
    *n = (size_t)used;
    return KNHK_OK;
}
