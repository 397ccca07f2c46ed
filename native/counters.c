/* counters.c -- striped counters in private or shared memory, and per-pattern
 * executor statistics built on them.
 *
 * A block is KNHK_COUNTERS_SLOTS writer slots, each an array of 64-bit cells
 * padded to KNHK_CACHE_LINE. A writer thread claims a slot by CAS-ing its
 * owner token (pid << 32 | claim number) into the block's owner table; from
 * then on it is the slot's only writer and adds with a relaxed load and store
 * (no lock prefix, no shared cache line). A reader sums the slots. When every
 * slot is taken, late writers share the last slot with atomic adds: sharing
 * costs speed, never exactness.
 *
 * A thread's claim on a block is a writer (knhk_counters_writer): found on
 * each knhk_counters_add through a thread-local cache, or fetched once with
 * knhk_counters_writer_get so that knhk_counters_writer_add needs no lookup.
 *
 * Slots go back (owner token CAS-ed to 0 with release, so the next owner's
 * acquire sees the last values) when the thread exits or when the handle is
 * closed; the writer then dies (calls through it are refused). The counts
 * stay in the slot: the next owner continues from them. A process that dies holding slots
 * loses nothing either: its slots keep their counts, and a writer that finds
 * no free slot takes back those whose owner pid no longer exists.
 *
 * A read during writes: each cell is read atomically, and each slot's value
 * only grows (for non-negative adds), so a counter read while others add lies
 * between its value when the read began and its value when it ended. Counters
 * of one snapshot are not read at one instant.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#if (defined(__x86_64__) || defined(__i386__)) && !defined(KNHK_PORTABLE)
#include <x86intrin.h>
#endif

#include "knhk_internal.h"

#define SHARED_SLOT (KNHK_COUNTERS_SLOTS - 1)
#define PATTERN_CELLS 4
#define TLS_WAYS 8 /* blocks a thread writes to without evicting: a direct-mapped cache */

typedef struct {
    uint64_t magic;
    uint32_t version;
    uint32_t cache_line;
    uint32_t flavor;
    uint32_t count;
    uint32_t slots;
    uint32_t names_len;
    uint64_t slot_stride; /* bytes between two slots' cells */
    uint64_t names_off, base_off, owners_off, cells_off, total_size;
    uint64_t checksum; /* FNV-1a over the fields above and the names */
    _Atomic uint32_t ready;
    uint32_t creator_pid; /* informational, outside the checksum: for the "already exists" message */
    /* Bytes 96..103 (padding before the names at 128) hold the creator's start time, written by
       knhk_memory/segments.py: with the pid it tells a dead creator from a reused pid. */
} block_header;
_Static_assert(offsetof(block_header, creator_pid) == 92 && sizeof(block_header) == 96,
               "knhk_memory/counters.py reads creator_pid at byte 92");

/* A writer is one thread's claim on one block: the slot it owns (or the
   shared slot) and the thread it belongs to. Writers are made on a thread's
   first write to a block and live until the thread exits or the block
   handle closes; then they are *dead* (thread == 0). Dead writers are
   reused, never freed, so a stale pointer always points at a writer and a
   call through it is refused, not undefined: a writer whose thread exited
   stays in its block's list and is reused only for that block (so a stale
   handle that comes back to life counts into the right block); the writers
   of a closed block go to a process-wide pool. Neither is handed to a
   thread with the thread pointer of its last owner.

   Every field but `thread` is written under registry_mutex by the thread
   that becomes the owner, and read by the owner (or under the mutex); a
   call from any other thread reads `thread` alone (atomically) and stops. */
struct knhk_counters_writer {
    _Atomic uintptr_t thread; /* the owner's thread pointer; 0: dead */
    uint32_t limit;           /* count for sum blocks on an owned slot, else 0: one compare sends
                                 every other case (bad index, pattern block, shared slot) to the slow path */
    uint32_t shared;          /* 1: the shared slot, atomic adds */
    _Atomic uint64_t *cells;  /* the slot's cells */
    knhk_counters *c;         /* the block handle (cold paths) */
    uint64_t token;           /* owner token in c->owners[slot]; 0 for the shared slot */
    uint32_t slot;
    uintptr_t last_thread;    /* owner before it died: not handed to that thread again */
    knhk_counters_writer *next; /* in c->writers (live or dead) or in the pool (dead) */
};

struct knhk_counters {
    uint64_t id; /* process-unique, never reused: thread caches key on it */
    block_header *hdr;
    const char *names; /* validated at open: names_off and names_len as the layout puts them */
    uint32_t names_len;
    uint32_t count;
    uint32_t flavor;
    uint32_t add_limit; /* count for sum blocks, 0 otherwise: one compare checks both */
    uint64_t stride_cells;
    _Atomic uint64_t *base;   /* [count] reset baselines of sum cells */
    _Atomic uint64_t *owners; /* [SLOTS] owner tokens, 0 = free */
    _Atomic uint64_t *cells;  /* [SLOTS][stride_cells] */
    knhk_counters_writer *writers; /* writers of every thread, live and dead, under registry_mutex */
    struct knhk_counters *next; /* live-handle registry */
};

/* ------------------------------------------------------------------ layout */

static uint64_t round_line(uint64_t n) { return (n + KNHK_CACHE_LINE - 1) & ~(uint64_t)(KNHK_CACHE_LINE - 1); }

static uint32_t cells_for(uint32_t flavor, uint32_t count) {
    return flavor == KNHK_COUNTERS_FLAVOR_PATTERNS ? count * PATTERN_CELLS : count;
}

static bool layout(block_header *h, uint32_t flavor, uint32_t count, size_t names_len) {
    if (flavor != KNHK_COUNTERS_FLAVOR_SUM && flavor != KNHK_COUNTERS_FLAVOR_PATTERNS) return false;
    if (count == 0 || count > KNHK_COUNTERS_MAX || names_len > KNHK_COUNTERS_NAMES_MAX) return false;
    if (flavor == KNHK_COUNTERS_FLAVOR_PATTERNS && count != KNHK_PATTERN_COUNT) return false;
    uint32_t ncells = cells_for(flavor, count);
    memset(h, 0, sizeof *h);
    h->magic = KNHK_COUNTERS_MAGIC;
    h->version = KNHK_COUNTERS_VERSION;
    h->cache_line = KNHK_CACHE_LINE;
    h->flavor = flavor;
    h->count = count;
    h->slots = KNHK_COUNTERS_SLOTS;
    h->names_len = (uint32_t)names_len;
    h->slot_stride = round_line((uint64_t)ncells * 8);
    h->names_off = round_line(sizeof(block_header));
    h->base_off = round_line(h->names_off + names_len);
    h->owners_off = round_line(h->base_off + (uint64_t)ncells * 8);
    h->cells_off = round_line(h->owners_off + KNHK_COUNTERS_SLOTS * 8);
    h->total_size = h->cells_off + h->slot_stride * KNHK_COUNTERS_SLOTS;
    return true;
}

static uint64_t fnv(uint64_t hash, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) hash = (hash ^ b[i]) * 0x100000001b3ULL;
    return hash;
}

static uint64_t header_checksum(const block_header *h, const char *names) {
    uint64_t x = fnv(0xcbf29ce484222325ULL, h, offsetof(block_header, checksum));
    return fnv(x, names, h->names_len);
}

size_t knhk_counters_layout_size(uint32_t flavor, uint32_t count, size_t names_len) {
    block_header h;
    return layout(&h, flavor, count, names_len) ? (size_t)h.total_size : 0;
}

static bool names_ok(const char *names, size_t len, uint32_t count) {
    if (len == 0 || names[len - 1] != '\0') return false;
    uint32_t n = 0;
    for (size_t i = 0; i < len; i++) n += names[i] == '\0';
    return n == count;
}

int knhk_counters_format(void *mem, size_t size, uint32_t flavor, uint32_t count, const char *names, size_t names_len) {
    block_header h;
    if (mem == NULL || ((uintptr_t)mem & (KNHK_CACHE_LINE - 1)) != 0) {
        _knhk_set_error("block memory must be aligned to %d bytes", KNHK_CACHE_LINE);
        return KNHK_ERR_INVALID;
    }
    if (!layout(&h, flavor, count, names_len)) {
        _knhk_set_error("flavor %u with %u counters and %zu bytes of names is out of range (1..%d counters, "
                        "names up to %d bytes)",
                        flavor, count, names_len, KNHK_COUNTERS_MAX, KNHK_COUNTERS_NAMES_MAX);
        return KNHK_ERR_INVALID;
    }
    if (names == NULL || !names_ok(names, names_len, count)) {
        _knhk_set_error("names must be %u NUL-ended strings", count);
        return KNHK_ERR_INVALID;
    }
    if (size < h.total_size) {
        _knhk_set_error("block of %zu bytes is smaller than the %llu bytes the layout needs", size,
                        (unsigned long long)h.total_size);
        return KNHK_ERR_INVALID;
    }
    block_header *dst = mem;
    if (atomic_load_explicit(&dst->ready, memory_order_acquire) != 0) {
        _knhk_set_error("the block is already formatted");
        return KNHK_ERR_STATE;
    }
    memcpy((char *)mem + h.names_off, names, names_len);
    h.checksum = header_checksum(&h, names);
    memcpy(dst, &h, offsetof(block_header, ready));
    dst->creator_pid = (uint32_t)getpid();
    /* Last, with release: an attacher that sees ready sees the whole header. */
    atomic_store_explicit(&dst->ready, 1, memory_order_release);
    return KNHK_OK;
}

/* ------------------------------------------------------------------ writers and the thread cache */

typedef struct {
    uint64_t id;             /* 0: empty */
    _Atomic uint64_t *cells; /* w's cells (copied: one load less per add) */
    uint32_t shared;         /* w's shared flag */
    knhk_counters_writer *w; /* NULL: none could be made, adds go to the shared slot */
} tls_entry;

/* Only a cache: a miss finds the thread's writer in the block's list. An
   entry for a closed block never matches again (handle ids are never reused). */
static __thread tls_entry tls_cache[TLS_WAYS];
static pthread_mutex_t registry_mutex = PTHREAD_MUTEX_INITIALIZER;
static knhk_counters *registry;            /* live handles, under registry_mutex */
static knhk_counters_writer *writer_pool;  /* dead writers of closed blocks, under registry_mutex */
static uint64_t next_handle_id = 1;        /* under registry_mutex */
static _Atomic uint32_t next_claim = 1;
static pthread_key_t exit_key;
static _knhk_once exit_key_once;

/* The calling thread's identity: its thread pointer (pthread_self() on
   glibc), read without a call where the compiler can. */
static inline uintptr_t self_thread(void) {
#if defined(__GNUC__) && !defined(__clang__) && !defined(KNHK_PORTABLE) && \
    (defined(__aarch64__) || (defined(__x86_64__) && __GNUC__ >= 11))
    return (uintptr_t)__builtin_thread_pointer();
#else
    return (uintptr_t)pthread_self();
#endif
}

/* Kill a live writer (the caller holds registry_mutex): give its slot back
   if `release`, and mark it dead. The owner token is CAS-ed to 0 with
   release, so the slot's next owner (acquire) sees the last values; the
   counts stay in the slot. */
static void kill_writer(knhk_counters_writer *w, bool release) {
    if (atomic_load_explicit(&w->thread, memory_order_relaxed) == 0) return; /* already dead */
    if (release && !w->shared) {
        uint64_t tok = w->token;
        atomic_compare_exchange_strong_explicit(&w->c->owners[w->slot], &tok, 0, memory_order_release,
                                                memory_order_relaxed);
    }
    w->last_thread = atomic_load_explicit(&w->thread, memory_order_relaxed);
    atomic_store_explicit(&w->thread, 0, memory_order_relaxed);
    w->limit = 0;
}

static void thread_exit(void *unused) {
    (void)unused;
    uintptr_t self = self_thread();
    pthread_mutex_lock(&registry_mutex);
    for (knhk_counters *c = registry; c != NULL; c = c->next)
        for (knhk_counters_writer *w = c->writers; w != NULL; w = w->next)
            if (atomic_load_explicit(&w->thread, memory_order_relaxed) == self) kill_writer(w, true);
    memset(tls_cache, 0, sizeof tls_cache);
    pthread_mutex_unlock(&registry_mutex);
}

/* A forked child is a new process with one thread: every writer it
   inherited belongs to a parent thread (the forking thread's included, whose
   thread pointer the child's thread shares), so all die, without giving
   their slots back: the parent still owns them. The child claims its own. */
static void atfork_prepare(void) { pthread_mutex_lock(&registry_mutex); }
static void atfork_parent(void) { pthread_mutex_unlock(&registry_mutex); }
static void atfork_child(void) {
    memset(tls_cache, 0, sizeof tls_cache);
    for (knhk_counters *c = registry; c != NULL; c = c->next)
        for (knhk_counters_writer *w = c->writers; w != NULL; w = w->next) kill_writer(w, false);
    pthread_mutex_unlock(&registry_mutex);
}

/* Registered when the library is loaded: a lazy registration inside a
   once-cell could run twice (a forked child reruns an initialiser its
   parent's thread left half done), and a prepare handler registered twice
   would lock registry_mutex twice. */
__attribute__((constructor)) static void register_atfork(void) {
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

static int make_exit_key(void *unused) {
    (void)unused;
    if (pthread_key_create(&exit_key, thread_exit) != 0) return KNHK_ERR_NOMEM;
    return KNHK_OK;
}

/* An owner token's pid comes from the shared block (untrusted): one that no
   process can have (0, or above Linux's PID_MAX_LIMIT of 2^22) is never
   handed to kill(), where a negative pid_t would name a process group. Such
   a slot counts as dead (reclaimable): nobody can be its owner. */
static bool pid_dead(uint32_t pid) {
    if (pid == 0) return false; /* a free slot, not a dead owner */
    if (pid > (1u << 22)) return true;
    return kill((pid_t)pid, 0) == -1 && errno == ESRCH;
}

static bool try_claim(knhk_counters *c, int s, uint64_t expected, uint64_t tok) {
    return atomic_compare_exchange_strong_explicit(&c->owners[s], &expected, tok, memory_order_acquire,
                                                   memory_order_relaxed);
}

/* A new writer for the calling thread (registry_mutex held): a dead one of
   this block, else one from the pool, else malloc'ed (never a dead one whose
   last owner had this thread pointer). */
static knhk_counters_writer *new_writer(knhk_counters *c, uintptr_t self) {
    knhk_counters_writer *w = c->writers;
    while (w != NULL && (atomic_load_explicit(&w->thread, memory_order_relaxed) != 0 || w->last_thread == self))
        w = w->next;
    bool linked = w != NULL;
    for (knhk_counters_writer **p = &writer_pool; w == NULL && *p != NULL; p = &(*p)->next) {
        if ((*p)->last_thread != self) {
            w = *p;
            *p = w->next;
            break;
        }
    }
    if (w == NULL && (w = malloc(sizeof *w)) == NULL) return NULL;
    int slot = SHARED_SLOT;
    uint64_t tok =
        ((uint64_t)(uint32_t)getpid() << 32) | atomic_fetch_add_explicit(&next_claim, 1, memory_order_relaxed);
    for (int s = 0; s < SHARED_SLOT && slot == SHARED_SLOT; s++)
        if (try_claim(c, s, 0, tok)) slot = s;
    for (int s = 0; s < SHARED_SLOT && slot == SHARED_SLOT; s++) {
        uint64_t owner = atomic_load_explicit(&c->owners[s], memory_order_relaxed);
        if (pid_dead((uint32_t)(owner >> 32)) && try_claim(c, s, owner, tok)) slot = s;
    }
    w->c = c;
    w->slot = (uint32_t)slot;
    w->shared = slot == SHARED_SLOT;
    w->token = w->shared ? 0 : tok;
    w->cells = c->cells + (uint64_t)slot * c->stride_cells;
    w->limit = w->shared ? 0 : c->add_limit;
    w->last_thread = 0;
    atomic_store_explicit(&w->thread, self, memory_order_relaxed);
    if (!linked) {
        w->next = c->writers;
        c->writers = w;
    }
    return w;
}

/* The slow path of the thread cache: find the thread's writer for c, or
   make one. Never fails: without memory (or without a thread-exit handler,
   which would leak the slot) the entry sends the thread's adds to the
   shared slot (atomic adds) with no writer; knhk_counters_writer_get tries
   again. */
static __attribute__((noinline)) tls_entry *find_writer(knhk_counters *c) {
    tls_entry *e = &tls_cache[c->id & (TLS_WAYS - 1)];
    knhk_counters_writer *w = NULL;
    if (_knhk_once_run(&exit_key_once, make_exit_key, NULL) == KNHK_OK) {
        uintptr_t self = self_thread();
        pthread_mutex_lock(&registry_mutex);
        w = c->writers;
        while (w != NULL && atomic_load_explicit(&w->thread, memory_order_relaxed) != self) w = w->next;
        if (w == NULL && (w = new_writer(c, self)) != NULL)
            pthread_setspecific(exit_key, (void *)1); /* non-NULL: the destructor runs at thread exit */
        pthread_mutex_unlock(&registry_mutex);
    }
    e->w = w;
    e->cells = w != NULL ? w->cells : c->cells + (uint64_t)SHARED_SLOT * c->stride_cells;
    e->shared = w != NULL ? w->shared : 1;
    e->id = c->id;
    return e;
}

static inline tls_entry *my_slot(knhk_counters *c) {
    tls_entry *e = &tls_cache[c->id & (TLS_WAYS - 1)];
    return _knhk_likely(e->id == c->id) ? e : find_writer(c);
}

/* The owner is the only writer of its cells: a relaxed load and store, no
   lock prefix. The shared slot takes atomic adds. */
static inline void cell_add(tls_entry *e, uint32_t i, uint64_t n) {
    _Atomic uint64_t *p = &e->cells[i];
    if (_knhk_likely(!e->shared))
        atomic_store_explicit(p, atomic_load_explicit(p, memory_order_relaxed) + n, memory_order_relaxed);
    else
        atomic_fetch_add_explicit(p, n, memory_order_relaxed);
}

static inline void cell_max(tls_entry *e, uint32_t i, uint64_t v) {
    _Atomic uint64_t *p = &e->cells[i];
    uint64_t cur = atomic_load_explicit(p, memory_order_relaxed);
    if (v <= cur) return;
    if (_knhk_likely(!e->shared)) {
        atomic_store_explicit(p, v, memory_order_relaxed);
    } else {
        while (v > cur &&
               !atomic_compare_exchange_weak_explicit(p, &cur, v, memory_order_relaxed, memory_order_relaxed)) {
        }
    }
}

int knhk_counters_open(void *mem, size_t size, knhk_counters **out) {
    if (out != NULL) *out = NULL;
    block_header *h = mem;
    if (mem == NULL || out == NULL || ((uintptr_t)mem & (KNHK_CACHE_LINE - 1)) != 0) {
        _knhk_set_error("block memory must be non-NULL and aligned to %d bytes", KNHK_CACHE_LINE);
        return KNHK_ERR_INVALID;
    }
    if (size < sizeof(block_header)) {
        _knhk_set_error("%zu bytes cannot hold a counter block header (%zu bytes)", size, sizeof(block_header));
        return KNHK_ERR_INVALID;
    }
    block_header hc; /* a private copy: the shared header may change under us */
    memcpy(&hc, (const void *)h, offsetof(block_header, ready));
    if (hc.magic != KNHK_COUNTERS_MAGIC) {
        _knhk_set_error("not a knhk counter block: magic is 0x%016llx, expected 0x%016llx",
                        (unsigned long long)hc.magic, (unsigned long long)KNHK_COUNTERS_MAGIC);
        return KNHK_ERR_INVALID;
    }
    if (atomic_load_explicit(&h->ready, memory_order_acquire) != 1) {
        _knhk_set_error("the counter block is not completely written (its creator may still be formatting it)");
        return KNHK_ERR_STATE;
    }
    /* Again, after the acquire of ready: the header as its creator published it. */
    memcpy(&hc, (const void *)h, offsetof(block_header, ready));
    if (hc.version != KNHK_COUNTERS_VERSION) {
        _knhk_set_error("counter block version %u, this build reads version %d", hc.version, KNHK_COUNTERS_VERSION);
        return KNHK_ERR_INVALID;
    }
    if (hc.cache_line != KNHK_CACHE_LINE) {
        _knhk_set_error("counter block laid out for %u-byte cache lines, this build uses %d", hc.cache_line,
                        KNHK_CACHE_LINE);
        return KNHK_ERR_INVALID;
    }
    /* The block is untrusted input (any process that can write the file can
       write the header, now and later): read the header once into a local
       copy, derive the whole layout from (flavor, count, names_len) alone,
       require every offset and length in the header to equal it and the
       mapping to hold it, and only then read the names through names_off
       and check the checksum. Every later access uses the handle's own
       validated copy, never the shared header. */
    block_header want;
    if (!layout(&want, hc.flavor, hc.count, hc.names_len)) {
        _knhk_set_error("counter block header is inconsistent: flavor %u with %u counters and %u bytes of names "
                        "is not a layout this build makes (flavors %d and %d, 1..%d counters, names up to %d bytes)",
                        hc.flavor, hc.count, hc.names_len, KNHK_COUNTERS_FLAVOR_SUM, KNHK_COUNTERS_FLAVOR_PATTERNS,
                        KNHK_COUNTERS_MAX, KNHK_COUNTERS_NAMES_MAX);
        return KNHK_ERR_INVALID;
    }
    static const struct {
        const char *name;
        size_t off;
    } fields[] = {
        {"slots", offsetof(block_header, slots)},           {"slot_stride", offsetof(block_header, slot_stride)},
        {"names_off", offsetof(block_header, names_off)},   {"base_off", offsetof(block_header, base_off)},
        {"owners_off", offsetof(block_header, owners_off)}, {"cells_off", offsetof(block_header, cells_off)},
        {"total_size", offsetof(block_header, total_size)},
    };
    for (size_t f = 0; f < sizeof fields / sizeof fields[0]; f++) {
        uint64_t got = 0, exp = 0;
        size_t width = fields[f].off == offsetof(block_header, slots) ? 4 : 8;
        memcpy(&got, (const char *)&hc + fields[f].off, width);
        memcpy(&exp, (const char *)&want + fields[f].off, width);
        if (got != exp) {
            _knhk_set_error("counter block header is inconsistent: %s is %llu, the layout of %u counters with %u "
                            "bytes of names puts it at %llu (corrupt or foreign block)",
                            fields[f].name, (unsigned long long)got, hc.count, hc.names_len, (unsigned long long)exp);
            return KNHK_ERR_INVALID;
        }
    }
    if (size < want.total_size) {
        _knhk_set_error("counter block needs %llu bytes, only %zu are mapped (truncated block)",
                        (unsigned long long)want.total_size, size);
        return KNHK_ERR_INVALID;
    }
    const char *names = (const char *)mem + want.names_off;
    if (header_checksum(&hc, names) != hc.checksum) {
        _knhk_set_error("counter block checksum does not match its header and names (corrupt block)");
        return KNHK_ERR_INVALID;
    }
    if (!names_ok(names, want.names_len, want.count)) {
        _knhk_set_error("counter block names are not %u NUL-ended strings (corrupt block)", want.count);
        return KNHK_ERR_INVALID;
    }
    knhk_counters *c = calloc(1, sizeof *c);
    if (c == NULL) {
        _knhk_set_error("out of memory for a counter handle");
        return KNHK_ERR_NOMEM;
    }
    char *base = mem;
    c->hdr = h;
    c->names = names;
    c->names_len = want.names_len;
    c->count = want.count;
    c->flavor = want.flavor;
    c->add_limit = want.flavor == KNHK_COUNTERS_FLAVOR_SUM ? want.count : 0;
    c->stride_cells = want.slot_stride / 8;
    c->base = (_Atomic uint64_t *)(base + want.base_off);
    c->owners = (_Atomic uint64_t *)(base + want.owners_off);
    c->cells = (_Atomic uint64_t *)(base + want.cells_off);
    pthread_mutex_lock(&registry_mutex);
    c->id = next_handle_id++;
    c->next = registry;
    registry = c;
    pthread_mutex_unlock(&registry_mutex);
    *out = c;
    return KNHK_OK;
}

void knhk_counters_close(knhk_counters *c) {
    if (c == NULL) return;
    pthread_mutex_lock(&registry_mutex);
    for (knhk_counters **p = &registry; *p != NULL; p = &(*p)->next) {
        if (*p == c) {
            *p = c->next;
            break;
        }
    }
    /* Every writer of this handle dies and its slot goes back, whichever
       thread owns it; those threads' cache entries are dead (ids are never
       reused), and a call through one of the writers is refused. */
    while (c->writers != NULL) {
        knhk_counters_writer *w = c->writers;
        c->writers = w->next;
        kill_writer(w, true);
        w->c = NULL;
        w->next = writer_pool;
        writer_pool = w;
    }
    tls_entry *e = &tls_cache[c->id & (TLS_WAYS - 1)];
    if (e->id == c->id) e->id = 0;
    pthread_mutex_unlock(&registry_mutex);
    free(c);
}

uint32_t knhk_counters_flavor(const knhk_counters *c) { return c->flavor; }
uint32_t knhk_counters_count(const knhk_counters *c) { return c->count; }

const char *knhk_counters_names(const knhk_counters *c, size_t *len) {
    if (len != NULL) *len = c->names_len;
    return c->names; /* validated at open; the bytes are the block's (a writer of the block can change them) */
}

/* ------------------------------------------------------------------ sum counters */

/* The overflow rule (knhk.h, KNHK_COUNTERS_SLOT_LIMIT): v, a slot cell read
   as two's complement, lies in [-L, L]. For a cell in range and any int64 n,
   cur + n wraps (mod 2^64) only when the true sum is beyond +-(2^63 - L),
   where the wrapped value is out of range too: one compare checks both. */
#define SLOT_LIMIT ((uint64_t)KNHK_COUNTERS_SLOT_LIMIT)
static inline bool slot_ok(uint64_t v) { return v + SLOT_LIMIT <= 2 * SLOT_LIMIT; }

static int overflow(const knhk_counters *c, uint32_t index, uint64_t cur, int64_t n) {
    _knhk_set_error("adding %lld to counter %u would take this thread's slot from %lld past +-%lld "
                    "(KNHK_COUNTERS_SLOT_LIMIT, 2^56, which keeps every sum exact in int64); nothing was added",
                    (long long)n, index, (long long)cur, (long long)KNHK_COUNTERS_SLOT_LIMIT);
    (void)c;
    return KNHK_ERR_OVERFLOW;
}

/* The shared slot: a CAS loop, so a refused add changes nothing. */
static int shared_add(const knhk_counters *c, _Atomic uint64_t *p, uint32_t index, int64_t n) {
    uint64_t cur = atomic_load_explicit(p, memory_order_relaxed);
    do {
        if (_knhk_unlikely(!slot_ok(cur + (uint64_t)n))) return overflow(c, index, cur, n);
    } while (
        !atomic_compare_exchange_weak_explicit(p, &cur, cur + (uint64_t)n, memory_order_relaxed, memory_order_relaxed));
    return KNHK_OK;
}

/* An add to a sum cell through a thread-cache entry: the owner's plain load
   and store, or the shared slot's CAS. */
static inline int sum_add(const knhk_counters *c, tls_entry *e, uint32_t index, int64_t n) {
    _Atomic uint64_t *p = &e->cells[index];
    if (_knhk_unlikely(e->shared)) return shared_add(c, p, index, n);
    uint64_t cur = atomic_load_explicit(p, memory_order_relaxed), v = cur + (uint64_t)n;
    if (_knhk_unlikely(!slot_ok(v))) return overflow(c, index, cur, n);
    atomic_store_explicit(p, v, memory_order_relaxed);
    return KNHK_OK;
}

static int bad_index(const knhk_counters *c, int64_t index) {
    _knhk_set_error("counter index %lld is out of range [0, %u)", (long long)index, c->count);
    return KNHK_ERR_INVALID;
}

static int wrong_flavor(const knhk_counters *c, uint32_t want) {
    _knhk_set_error("this block holds %s, not %s",
                    c->flavor == KNHK_COUNTERS_FLAVOR_SUM ? "sum counters" : "pattern statistics",
                    want == KNHK_COUNTERS_FLAVOR_SUM ? "sum counters" : "pattern statistics");
    return KNHK_ERR_STATE;
}

int knhk_counters_add(knhk_counters *c, uint32_t index, int64_t n) {
    if (_knhk_unlikely(index >= c->add_limit))
        return index >= c->count ? bad_index(c, index) : wrong_flavor(c, KNHK_COUNTERS_FLAVOR_SUM);
    return sum_add(c, my_slot(c), index, n);
}

int knhk_counters_writer_get(knhk_counters *c, knhk_counters_writer **out) {
    if (out != NULL) *out = NULL;
    if (c == NULL || out == NULL) {
        _knhk_set_error("knhk_counters_writer_get: the block handle and out must not be NULL");
        return KNHK_ERR_INVALID;
    }
    tls_entry *e = my_slot(c);
    if (e->w == NULL && (e = find_writer(c))->w == NULL) {
        _knhk_set_error("no memory for a counter writer (or no thread-exit handler could be registered)");
        return KNHK_ERR_NOMEM;
    }
    *out = e->w;
    return KNHK_OK;
}

/* Everything but an owner's add to its own slot: the shared slot's atomic
   add, and refusals. Reads only `thread` unless the caller owns the writer,
   so a call from the wrong thread touches nothing else. */
static __attribute__((noinline)) int writer_slow(knhk_counters_writer *w, uint32_t index, int64_t n) {
    uintptr_t owner = atomic_load_explicit(&w->thread, memory_order_relaxed), self = self_thread();
    if (owner == 0) {
        _knhk_set_error("this counter writer is dead: its thread exited, its block was closed, or the process "
                        "forked since it was made; each thread gets its own with knhk_counters_writer_get");
        return KNHK_ERR_STATE;
    }
    if (owner != self) {
        _knhk_set_error("this counter writer belongs to thread 0x%llx, not to the calling thread 0x%llx; each "
                        "thread gets its own with knhk_counters_writer_get",
                        (unsigned long long)owner, (unsigned long long)self);
        return KNHK_ERR_STATE;
    }
    if (_knhk_likely(index < w->c->add_limit)) {
        if (w->shared) return shared_add(w->c, &w->cells[index], index, n);
        return overflow(w->c, index, atomic_load_explicit(&w->cells[index], memory_order_relaxed), n);
    }
    return index >= w->c->count ? bad_index(w->c, index) : wrong_flavor(w->c, KNHK_COUNTERS_FLAVOR_SUM);
}

/* The writer add, inline for callers in this library (the hot op); the
   exported knhk_counters_writer_add is this plus a call. */
static inline int writer_add(knhk_counters_writer *w, uint32_t index, int64_t n) {
    /* One load and compare proves the caller is the live owner, one more
       that it owns a slot and the index is in range (both off the add's
       dependency chain); then the plain load+add+store. */
    if (_knhk_unlikely(atomic_load_explicit(&w->thread, memory_order_relaxed) != self_thread() || index >= w->limit))
        return writer_slow(w, index, n);
    _Atomic uint64_t *p = &w->cells[index];
    uint64_t v = atomic_load_explicit(p, memory_order_relaxed) + (uint64_t)n;
    if (_knhk_unlikely(!slot_ok(v))) return writer_slow(w, index, n); /* the overflow rule: refuse */
    atomic_store_explicit(p, v, memory_order_relaxed);
    return KNHK_OK;
}

int knhk_counters_writer_add(knhk_counters_writer *w, uint32_t index, int64_t n) { return writer_add(w, index, n); }

int knhk_counters_add_indices(knhk_counters *c, const int64_t *indices, size_t len, int64_t n) {
    if (c->flavor != KNHK_COUNTERS_FLAVOR_SUM) return wrong_flavor(c, KNHK_COUNTERS_FLAVOR_SUM);
    for (size_t i = 0; i < len; i++) {
        if (_knhk_unlikely((uint64_t)indices[i] >= c->count)) {
            _knhk_set_error("counter index %lld (at position %zu) is out of range [0, %u)", (long long)indices[i], i,
                            c->count);
            return KNHK_ERR_INVALID;
        }
    }
    if (len == 0) return KNHK_OK;
    tls_entry *e = my_slot(c);
    for (size_t i = 0; i < len; i++) {
        int rc = sum_add(c, e, (uint32_t)indices[i], n);
        if (_knhk_unlikely(rc != KNHK_OK)) {
            /* Undo this batch's adds (each was in range before, so each undo is too). */
            for (size_t j = i; j-- > 0;) {
                _Atomic uint64_t *p = &e->cells[indices[j]];
                if (e->shared)
                    atomic_fetch_sub_explicit(p, (uint64_t)n, memory_order_relaxed);
                else
                    atomic_store_explicit(p, atomic_load_explicit(p, memory_order_relaxed) - (uint64_t)n,
                                          memory_order_relaxed);
            }
            return rc;
        }
    }
    return KNHK_OK;
}

static uint64_t sum_cell(const knhk_counters *c, uint32_t i) {
    uint64_t s = 0;
    for (int slot = 0; slot < KNHK_COUNTERS_SLOTS; slot++)
        s += atomic_load_explicit(&c->cells[(uint64_t)slot * c->stride_cells + i], memory_order_relaxed);
    return s;
}

static uint64_t max_cell(const knhk_counters *c, uint32_t i) {
    uint64_t m = 0;
    for (int slot = 0; slot < KNHK_COUNTERS_SLOTS; slot++) {
        uint64_t v = atomic_load_explicit(&c->cells[(uint64_t)slot * c->stride_cells + i], memory_order_relaxed);
        if (v > m) m = v;
    }
    return m;
}

int64_t knhk_counters_get(const knhk_counters *c, uint32_t index) {
    if (index >= c->count || c->flavor != KNHK_COUNTERS_FLAVOR_SUM) return 0;
    return (int64_t)(sum_cell(c, index) - atomic_load_explicit(&c->base[index], memory_order_relaxed));
}

int knhk_counters_snapshot(const knhk_counters *c, int64_t *out, size_t count) {
    if (c->flavor != KNHK_COUNTERS_FLAVOR_SUM) return wrong_flavor(c, KNHK_COUNTERS_FLAVOR_SUM);
    if (count < c->count) {
        _knhk_set_error("snapshot buffer holds %zu values, the block has %u counters", count, c->count);
        return KNHK_ERR_INVALID;
    }
    /* Slot by slot, so the walk follows memory order. */
    for (uint32_t i = 0; i < c->count; i++) out[i] = -(int64_t)atomic_load_explicit(&c->base[i], memory_order_relaxed);
    for (int slot = 0; slot < KNHK_COUNTERS_SLOTS; slot++) {
        const _Atomic uint64_t *cells = c->cells + (uint64_t)slot * c->stride_cells;
        for (uint32_t i = 0; i < c->count; i++)
            out[i] = (int64_t)((uint64_t)out[i] + atomic_load_explicit(&cells[i], memory_order_relaxed));
    }
    return KNHK_OK;
}

static bool is_max_cell(const knhk_counters *c, uint32_t cell) {
    return c->flavor == KNHK_COUNTERS_FLAVOR_PATTERNS && (cell % PATTERN_CELLS) >= 2;
}

/* Sum cells get a new baseline, so no writer's cell is touched: a reset
   during adds loses none of them (each lands before or after the baseline).
   Min/max cells are cleared in every slot; a record racing with that may
   survive or vanish. */
void knhk_counters_reset(knhk_counters *c) {
    uint32_t ncells = cells_for(c->flavor, c->count);
    for (uint32_t i = 0; i < ncells; i++) {
        if (is_max_cell(c, i)) {
            for (int slot = 0; slot < KNHK_COUNTERS_SLOTS; slot++)
                atomic_store_explicit(&c->cells[(uint64_t)slot * c->stride_cells + i], 0, memory_order_relaxed);
        } else {
            atomic_store_explicit(&c->base[i], sum_cell(c, i), memory_order_relaxed);
        }
    }
}

int knhk_counters_get_and_reset(knhk_counters *c, int64_t *out, size_t count) {
    if (c->flavor != KNHK_COUNTERS_FLAVOR_SUM) return wrong_flavor(c, KNHK_COUNTERS_FLAVOR_SUM);
    if (count < c->count) {
        _knhk_set_error("get_and_reset buffer holds %zu values, the block has %u counters", count, c->count);
        return KNHK_ERR_INVALID;
    }
    for (uint32_t i = 0; i < c->count; i++) {
        uint64_t base = atomic_load_explicit(&c->base[i], memory_order_acquire), sum;
        do {
            sum = sum_cell(c, i); /* read after the baseline it is compared with */
        } while (!atomic_compare_exchange_weak_explicit(&c->base[i], &base, sum, memory_order_acq_rel,
                                                        memory_order_acquire));
        out[i] = (int64_t)(sum - base);
    }
    return KNHK_OK;
}

uint32_t knhk_counters_slots_owned(const knhk_counters *c) {
    uint32_t n = 0;
    for (int s = 0; s < SHARED_SLOT; s++) n += atomic_load_explicit(&c->owners[s], memory_order_relaxed) != 0;
    return n;
}

uint32_t knhk_counters_reclaim_dead(knhk_counters *c) {
    uint32_t n = 0;
    for (int s = 0; s < SHARED_SLOT; s++) {
        uint64_t owner = atomic_load_explicit(&c->owners[s], memory_order_acquire);
        if (pid_dead((uint32_t)(owner >> 32)) &&
            atomic_compare_exchange_strong_explicit(&c->owners[s], &owner, 0, memory_order_acq_rel,
                                                    memory_order_relaxed))
            n++;
    }
    return n;
}

/* ------------------------------------------------------------------ pattern statistics */

uint64_t knhk_counters_ticks(void) {
#if (defined(__x86_64__) || defined(__i386__)) && !defined(KNHK_PORTABLE)
    return __rdtsc();
#elif defined(__aarch64__) && !defined(KNHK_PORTABLE)
    uint64_t v;
    __asm__ volatile("mrs %0, cntvct_el0" : "=r"(v));
    return v;
#else
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
#endif
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static _knhk_once tps_once;
static double tps;

static int measure_tps(void *unused) {
    (void)unused;
    uint64_t n0 = now_ns(), t0 = knhk_counters_ticks();
    struct timespec pause = {0, 20 * 1000 * 1000};
    nanosleep(&pause, NULL);
    uint64_t n1 = now_ns(), t1 = knhk_counters_ticks();
    tps = n1 > n0 ? (double)(t1 - t0) * 1e9 / (double)(n1 - n0) : 1e9;
    return KNHK_OK;
}

double knhk_counters_ticks_per_second(void) {
    _knhk_once_run(&tps_once, measure_tps, NULL);
    return tps;
}

static int bad_pattern(int64_t pattern, size_t at, bool batch) {
    if (batch)
        _knhk_set_error("pattern id %lld (at position %zu) is out of range [1, %d]", (long long)pattern, at,
                        KNHK_PATTERN_COUNT);
    else
        _knhk_set_error("pattern id %lld is out of range [1, %d]", (long long)pattern, KNHK_PATTERN_COUNT);
    return KNHK_ERR_INVALID;
}

static inline void record(tls_entry *e, int64_t pattern, uint64_t ticks) {
    uint32_t base = (uint32_t)(pattern - 1) * PATTERN_CELLS;
    cell_add(e, base, 1);
    cell_add(e, base + 1, ticks);
    cell_max(e, base + 2, ~ticks); /* min as the max of complements: 0 stays "none yet" */
    cell_max(e, base + 3, ticks);
}

int knhk_counters_pattern_record(knhk_counters *c, int64_t pattern, uint64_t ticks) {
    if (c->flavor != KNHK_COUNTERS_FLAVOR_PATTERNS) return wrong_flavor(c, KNHK_COUNTERS_FLAVOR_PATTERNS);
    if (pattern < 1 || pattern > KNHK_PATTERN_COUNT) return bad_pattern(pattern, 0, false);
    record(my_slot(c), pattern, ticks);
    return KNHK_OK;
}

int knhk_counters_pattern_stop(knhk_counters *c, int64_t pattern, uint64_t start_ticks) {
    uint64_t now = knhk_counters_ticks();
    return knhk_counters_pattern_record(c, pattern, now >= start_ticks ? now - start_ticks : 0);
}

int knhk_counters_pattern_record_many(knhk_counters *c, const int64_t *patterns, const uint64_t *ticks, size_t len) {
    if (c->flavor != KNHK_COUNTERS_FLAVOR_PATTERNS) return wrong_flavor(c, KNHK_COUNTERS_FLAVOR_PATTERNS);
    for (size_t i = 0; i < len; i++)
        if (patterns[i] < 1 || patterns[i] > KNHK_PATTERN_COUNT) return bad_pattern(patterns[i], i, true);
    if (len == 0) return KNHK_OK;
    tls_entry *e = my_slot(c);
    for (size_t i = 0; i < len; i++) record(e, patterns[i], ticks[i]);
    return KNHK_OK;
}

int knhk_counters_pattern_snapshot(const knhk_counters *c, uint64_t *out, size_t len) {
    if (c->flavor != KNHK_COUNTERS_FLAVOR_PATTERNS) return wrong_flavor(c, KNHK_COUNTERS_FLAVOR_PATTERNS);
    if (len < (size_t)KNHK_PATTERN_COUNT * PATTERN_CELLS) {
        _knhk_set_error("pattern snapshot buffer holds %zu values, %d are needed", len,
                        KNHK_PATTERN_COUNT * PATTERN_CELLS);
        return KNHK_ERR_INVALID;
    }
    for (uint32_t p = 0; p < KNHK_PATTERN_COUNT; p++) {
        uint32_t b = p * PATTERN_CELLS;
        uint64_t execs = sum_cell(c, b) - atomic_load_explicit(&c->base[b], memory_order_relaxed);
        uint64_t total = sum_cell(c, b + 1) - atomic_load_explicit(&c->base[b + 1], memory_order_relaxed);
        uint64_t mn = max_cell(c, b + 2);
        out[b] = execs;
        out[b + 1] = total;
        out[b + 2] = mn ? ~mn : 0;
        out[b + 3] = max_cell(c, b + 3);
    }
    return KNHK_OK;
}

/* ------------------------------------------------------------------ hot path and benchmark */

void knhk_counters_hotop_add(void *ctx, uint64_t iterations) {
    knhk_counters *c = ctx;
    for (uint64_t i = 0; i < iterations; i++) knhk_counters_add(c, 0, 1);
}

/* The engine's hot path: the writer is fetched once (as a worker thread
   does when it starts) and every add goes through it. The add is called
   through a volatile pointer, so it is the exported function, not a copy
   inlined into this loop and optimised against it. */
/* The engine's hot path: a worker fetches its writer once and adds through
   it. The add is the inline core of knhk_counters_writer_add, as a caller
   in this library uses it (the exported function adds a call and return:
   knhk_counters_hotop_writer_add_call). */
void knhk_counters_hotop_writer_add(void *ctx, uint64_t iterations) {
    knhk_counters_writer *w;
    if (knhk_counters_writer_get(ctx, &w) != KNHK_OK) return;
    for (uint64_t i = 0; i < iterations; i++) writer_add(w, 0, 1);
}

/* The same through the exported function, called through a pointer as a
   caller in another shared object calls it (through its PLT). */
void knhk_counters_hotop_writer_add_call(void *ctx, uint64_t iterations) {
    knhk_counters_writer *w;
    if (knhk_counters_writer_get(ctx, &w) != KNHK_OK) return;
    int (*volatile add)(knhk_counters_writer *, uint32_t, int64_t) = knhk_counters_writer_add;
    int (*fn)(knhk_counters_writer *, uint32_t, int64_t) = add;
    for (uint64_t i = 0; i < iterations; i++) fn(w, 0, 1);
}

typedef struct {
    _Atomic uint64_t *cell;
    uint64_t iterations;
    int atomic_rmw;
    _Atomic int *go;
    int cpu_rank;
} bench_arg;

static void *bench_thread(void *p) {
    bench_arg *a = p;
    /* One thread per CPU when the process may use two, so the threads really
       run at once (on a loaded machine they may still be descheduled). */
    cpu_set_t allowed;
    if (sched_getaffinity(0, sizeof allowed, &allowed) == 0 && CPU_COUNT(&allowed) >= 2) {
        int want = a->cpu_rank, seen = 0;
        for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) {
            if (!CPU_ISSET(cpu, &allowed)) continue;
            if (seen++ == want) {
                cpu_set_t one;
                CPU_ZERO(&one);
                CPU_SET(cpu, &one);
                pthread_setaffinity_np(pthread_self(), sizeof one, &one);
                break;
            }
        }
    }
    while (!atomic_load_explicit(a->go, memory_order_acquire)) {
    }
    if (a->atomic_rmw) {
        for (uint64_t i = 0; i < a->iterations; i++) atomic_fetch_add_explicit(a->cell, 1, memory_order_relaxed);
    } else {
        for (uint64_t i = 0; i < a->iterations; i++)
            atomic_store_explicit(a->cell, atomic_load_explicit(a->cell, memory_order_relaxed) + 1,
                                  memory_order_relaxed);
    }
    return NULL;
}

int knhk_counters_bench_false_sharing(uint64_t iterations, int padded, int atomic_rmw, uint64_t *elapsed_ns) {
    _Atomic uint64_t *cells = aligned_alloc(KNHK_CACHE_LINE, 2 * KNHK_CACHE_LINE);
    if (cells == NULL) {
        _knhk_set_error("out of memory for the benchmark cells");
        return KNHK_ERR_NOMEM;
    }
    memset((void *)cells, 0, 2 * KNHK_CACHE_LINE);
    _Atomic int go = 0;
    size_t step = padded ? KNHK_CACHE_LINE / 8 : 1;
    bench_arg args[2] = {{&cells[0], iterations, atomic_rmw, &go, 0}, {&cells[step], iterations, atomic_rmw, &go, 1}};
    pthread_t th[2];
    int started = 0;
    for (; started < 2; started++)
        if (pthread_create(&th[started], NULL, bench_thread, &args[started]) != 0) break;
    uint64_t t0 = now_ns();
    atomic_store_explicit(&go, 1, memory_order_release);
    for (int i = 0; i < started; i++) pthread_join(th[i], NULL);
    uint64_t t1 = now_ns();
    bool exact = atomic_load(&cells[0]) == (started > 0 ? iterations : 0) &&
                 atomic_load(&cells[step]) == (started > 1 ? iterations : 0);
    free((void *)cells);
    if (started < 2) {
        _knhk_set_error("could not start the benchmark threads");
        return KNHK_ERR_NOMEM;
    }
    if (!exact) {
        _knhk_set_error("benchmark counters are not exact");
        return KNHK_ERR_STATE;
    }
    if (elapsed_ns != NULL) *elapsed_ns = t1 - t0;
    return KNHK_OK;
}
