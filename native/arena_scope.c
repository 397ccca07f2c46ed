/* arena_scope.c -- a scope over an arena: allocate from it while the scope is
 * open and the calling thread owns the arena, else from a fallback allocator.
 *
 * Made for numpy's data-memory handler of an arena scope (issue 16): numpy
 * keeps its current handler in a contextvar, so a handler set inside
 * `with arena.scope():` is copied into every asyncio task created there and
 * every contextvars.copy_context() (loop.run_in_executor included), and stays
 * current in them after the scope ends; nothing can take it back out of a
 * copied context. So the scope itself checks, on every allocation, that it is
 * still open and that the calling thread owns the arena. If so, the block
 * comes from the arena; if not, from the fallback the scope was opened with
 * (the handler that was current before: numpy's default, or a backend's),
 * marked by a 16-byte header so that free and realloc send it back there.
 * A task that outlives its scope therefore allocates as it would have
 * without the scope: never into the arena after the scope, never into a
 * closed arena, never into an arena from a second thread. Growing a block
 * already in the arena (realloc) stays in the arena in its thread while the
 * arena is open; once it is closed, or from another thread, the block moves
 * out (copied into a fallback block) instead of failing.
 *
 * Layout of a fallback block: [header 16][data]. The header's magic sits
 * where a counted arena block's does (offset 8 of its 16-byte header), with
 * another value, so one look tells the two apart.
 */
#include <stdlib.h>

#include "knhk_internal.h"

#define FALLBACK_MAGIC 0x6b6e6866u /* "knhf" */

typedef struct {
    uint64_t size;
    uint32_t magic;
    uint32_t align;
} fallback_head;
_Static_assert(sizeof(fallback_head) == KNHK_ARENA_BLOCK_HEADER, "a counted arena block's header size");

struct knhk_arena_scope {
    knhk_arena *arena;
    _Atomic int open;
    _Atomic int refs;           /* the caller's (until knhk_arena_scope_end) plus knhk_arena_scope_retain's */
    _Atomic uint64_t fallbacks; /* blocks that went to the fallback */
    knhk_fallback_allocator fallback;
    void (*release)(void *arg); /* called once the scope is freed: the fallback is no longer used */
    void *release_arg;
};

static fallback_head *head_of(void *p) { return (fallback_head *)((char *)p - sizeof(fallback_head)); }

int knhk_arena_scope_open(knhk_arena *a, const knhk_fallback_allocator *fallback, void (*release)(void *),
                          void *release_arg, knhk_arena_scope **out) {
    if (out != NULL) *out = NULL;
    if (a == NULL || fallback == NULL || out == NULL || fallback->malloc == NULL || fallback->calloc == NULL ||
        fallback->realloc == NULL || fallback->free == NULL) {
        _knhk_set_error("knhk_arena_scope_open needs an arena, a fallback with all four functions and an out "
                        "pointer");
        return KNHK_ERR_INVALID;
    }
    int rc = knhk_arena_retain(a); /* owner thread, open arena */
    if (rc != KNHK_OK) return rc;
    knhk_arena_scope *s = calloc(1, sizeof *s);
    if (s == NULL) {
        knhk_arena_release(a);
        _knhk_set_error("no memory for an arena scope");
        return KNHK_ERR_NOMEM;
    }
    s->arena = a;
    s->fallback = *fallback;
    s->release = release;
    s->release_arg = release_arg;
    atomic_init(&s->open, 1);
    atomic_init(&s->refs, 1);
    atomic_init(&s->fallbacks, 0);
    *out = s;
    return KNHK_OK;
}

void knhk_arena_scope_retain(knhk_arena_scope *s) { atomic_fetch_add_explicit(&s->refs, 1, memory_order_relaxed); }

void knhk_arena_scope_release(knhk_arena_scope *s) {
    if (s == NULL || atomic_fetch_sub_explicit(&s->refs, 1, memory_order_acq_rel) != 1) return;
    if (s->release != NULL) s->release(s->release_arg);
    knhk_arena_release(s->arena);
    free(s);
}

void knhk_arena_scope_end(knhk_arena_scope *s) {
    if (s == NULL) return;
    atomic_store_explicit(&s->open, 0, memory_order_release);
    knhk_arena_scope_release(s);
}

uint64_t knhk_arena_scope_fallbacks(const knhk_arena_scope *s) {
    return s == NULL ? 0 : atomic_load_explicit(&s->fallbacks, memory_order_relaxed);
}

static bool use_arena(knhk_arena_scope *s) {
    return atomic_load_explicit(&s->open, memory_order_acquire) && _knhk_arena_is_owner(s->arena);
}

static void *fallback_alloc(knhk_arena_scope *s, size_t size, bool zero) {
    size_t total;
    if (__builtin_add_overflow(size, sizeof(fallback_head), &total)) return NULL;
    char *base = zero ? s->fallback.calloc(s->fallback.ctx, 1, total) : s->fallback.malloc(s->fallback.ctx, total);
    if (base == NULL) return NULL;
    atomic_fetch_add_explicit(&s->fallbacks, 1, memory_order_relaxed);
    fallback_head *h = (fallback_head *)base;
    h->size = size;
    h->magic = FALLBACK_MAGIC;
    h->align = 16;
    return base + sizeof(fallback_head);
}

void *knhk_arena_scope_alloc(knhk_arena_scope *s, size_t size, int zero) {
    if (!use_arena(s)) return fallback_alloc(s, size, zero != 0);
    int status = KNHK_OK;
    void *p = knhk_arena_block_alloc(s->arena, size, 16, &status);
    /* Closed since use_arena looked (a close() from another thread, issue 22): the
       scope's reference keeps the arena's memory, and the block goes to the fallback,
       as every later one will. Only a real shortage is a NULL. */
    if (p == NULL && status == KNHK_ERR_STATE) return fallback_alloc(s, size, zero != 0);
    /* Bumped memory may hold an earlier batch's bytes: zero it. */
    if (p != NULL && zero) memset(p, 0, size);
    return p;
}

void knhk_arena_scope_free(knhk_arena_scope *s, void *p) {
    if (p == NULL) return;
    fallback_head *h = head_of(p);
    if (h->magic == FALLBACK_MAGIC) {
        h->magic = 0;
        s->fallback.free(s->fallback.ctx, h, h->size + sizeof(fallback_head));
    } else {
        knhk_arena_block_free(s->arena, p); /* ignores a block that is not live */
    }
}

void *knhk_arena_scope_realloc(knhk_arena_scope *s, void *p, size_t size) {
    if (p == NULL) return knhk_arena_scope_alloc(s, size, 0);
    fallback_head *h = head_of(p);
    if (h->magic == FALLBACK_MAGIC) {
        size_t total;
        if (__builtin_add_overflow(size, sizeof(fallback_head), &total)) return NULL;
        fallback_head *n = s->fallback.realloc(s->fallback.ctx, h, total);
        if (n == NULL) return NULL;
        n->size = size;
        return (char *)n + sizeof(fallback_head);
    }
    size_t old = _knhk_arena_block_size(p);
    if (old == 0) return NULL; /* not a live block of an arena */
    /* A block in the arena's thread stays in the arena while it is open
       (also after the scope: it was the arena's already). */
    if (_knhk_arena_is_owner(s->arena)) {
        int status = KNHK_OK;
        void *q = knhk_arena_block_realloc(s->arena, p, size, &status);
        if (q != NULL || status != KNHK_ERR_STATE) return q;
    }
    /* The arena is closed, or this is another thread: move the block out. */
    void *q = fallback_alloc(s, size, false);
    if (q == NULL) return NULL;
    memcpy(q, p, old < size ? old : size);
    knhk_arena_block_free(s->arena, p);
    return q;
}
