/* arena_scope.c -- the state of one arena numpy scope (issue 16).
 *
 * numpy keeps its current data-memory handler in a contextvar, so a handler
 * set inside `with arena.scope():` is copied into every asyncio task created
 * there and every contextvars.copy_context() (loop.run_in_executor included),
 * and stays current in them after the scope ends; nothing can take it back
 * out of a copied context. So the handler itself checks, on every
 * allocation, that its scope is still open and that the calling thread owns
 * the arena. If so, the block comes from the arena; if not, from the handler
 * that was current when the scope opened (numpy's default, or a backend's),
 * marked by a 16-byte header so that free and realloc send it back there.
 * A task that outlives its scope therefore allocates as it would have
 * without the scope: never into the arena after the scope, never into a
 * closed arena, never into an arena from a second thread. Growing an array
 * that is already in the arena (realloc) stays in the arena in its thread
 * while the arena is open; once it is closed, or from another thread, the
 * block moves out (copied into a fallback block) instead of failing.
 *
 * Pure C: numpy_handler.c fills in the previous handler's functions and owns
 * the Python references. Layout of a fallback block: [header 16][data]; the
 * header sits where an arena block's knhk_arena block header sits, with a
 * different magic, so one look tells the two apart.
 */
#include <stdlib.h>

#include "knhk_internal.h"

#define ARENA_BLOCK_MAGIC 0x6b6e6862u /* arena.c's BLOCK_MAGIC */
#define FALLBACK_MAGIC 0x6b6e6866u    /* "knhf" */

typedef struct {
    uint64_t size;
    uint32_t magic;
    uint32_t align;
} block_head;
_Static_assert(sizeof(block_head) == KNHK_ARENA_BLOCK_HEADER, "arena.c's block header");

static block_head *head_of(void *p) { return (block_head *)((char *)p - sizeof(block_head)); }

_knhk_arena_scope *_knhk_arena_scope_new(knhk_arena *a) {
    _knhk_arena_scope *s = calloc(1, sizeof *s);
    if (s == NULL) return NULL;
    s->arena = a;
    atomic_init(&s->open, 1);
    atomic_init(&s->refs, 2); /* the handler's capsule, and the scope's caller until knhk_numpy_arena_scope_end */
    return s;
}

/* Drop one reference; returns true when the scope is to be freed (the caller
   then drops the previous handler's Python reference and the arena's). */
bool _knhk_arena_scope_unref(_knhk_arena_scope *s) {
    return atomic_fetch_sub_explicit(&s->refs, 1, memory_order_acq_rel) == 1;
}

void knhk_numpy_arena_scope_end(void *scope) {
    _knhk_arena_scope *s = scope;
    if (s == NULL) return;
    atomic_store_explicit(&s->open, 0, memory_order_release);
    if (_knhk_arena_scope_unref(s)) _knhk_arena_scope_free_state(s);
}

uint64_t knhk_numpy_arena_scope_fallbacks(const void *scope) {
    const _knhk_arena_scope *s = scope;
    return s == NULL ? 0 : atomic_load_explicit(&s->fallbacks, memory_order_relaxed);
}

static bool use_arena(_knhk_arena_scope *s) {
    return atomic_load_explicit(&s->open, memory_order_acquire) && _knhk_arena_is_owner(s->arena);
}

static void *fallback_alloc(_knhk_arena_scope *s, size_t size, bool zero) {
    size_t total;
    if (__builtin_add_overflow(size, sizeof(block_head), &total)) return NULL;
    char *base = zero ? s->prev_calloc(s->prev_ctx, 1, total) : s->prev_malloc(s->prev_ctx, total);
    if (base == NULL) return NULL;
    atomic_fetch_add_explicit(&s->fallbacks, 1, memory_order_relaxed);
    block_head *h = (block_head *)base;
    h->size = size;
    h->magic = FALLBACK_MAGIC;
    h->align = 16;
    return base + sizeof(block_head);
}

void *_knhk_arena_scope_alloc(_knhk_arena_scope *s, size_t size, bool zero) {
    if (!use_arena(s)) return fallback_alloc(s, size, zero);
    void *p = knhk_arena_block_alloc(s->arena, size, 16, NULL);
    /* Bumped memory may hold an earlier batch's bytes: zero it. */
    if (p != NULL && zero) memset(p, 0, size);
    return p;
}

void _knhk_arena_scope_free(_knhk_arena_scope *s, void *p) {
    if (p == NULL) return;
    block_head *h = head_of(p);
    if (h->magic == FALLBACK_MAGIC) {
        h->magic = 0;
        s->prev_free(s->prev_ctx, h, h->size + sizeof(block_head));
    } else {
        knhk_arena_block_free(s->arena, p); /* ignores a block that is not live */
    }
}

void *_knhk_arena_scope_realloc(_knhk_arena_scope *s, void *p, size_t size) {
    if (p == NULL) return _knhk_arena_scope_alloc(s, size, false);
    block_head *h = head_of(p);
    if (h->magic == FALLBACK_MAGIC) {
        size_t total;
        if (__builtin_add_overflow(size, sizeof(block_head), &total)) return NULL;
        block_head *n = s->prev_realloc(s->prev_ctx, h, total);
        if (n == NULL) return NULL;
        n->size = size;
        return (char *)n + sizeof(block_head);
    }
    if (h->magic != ARENA_BLOCK_MAGIC) return NULL;
    /* An arena block in the arena's thread stays in the arena while it is
       open (also after the scope: it was the arena's already). */
    if (_knhk_arena_is_owner(s->arena)) {
        int status = KNHK_OK;
        void *q = knhk_arena_block_realloc(s->arena, p, size, &status);
        if (q != NULL || status != KNHK_ERR_STATE) return q;
    }
    /* The arena is closed, or this is another thread: move the block out. */
    void *q = fallback_alloc(s, size, false);
    if (q == NULL) return NULL;
    memcpy(q, p, h->size < size ? h->size : size);
    knhk_arena_block_free(s->arena, p);
    return q;
}
