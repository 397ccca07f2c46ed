/* once.c -- knhk_once: a once-cell whose read is one acquire load.
 *
 * The state word is the whole protocol: EMPTY, READY, or the id of the thread
 * running the initialiser. Claiming is a CAS from EMPTY to the caller's id, so
 * a waiter can always tell who it waits for: itself (re-entrant call: an
 * error, not a deadlock) or a thread fork() did not copy (reset the cell).
 *
 * The initialiser runs with no lock held, so initialisers may nest (a SIMD
 * dispatch table may ask for the CPU features from inside its own init).
 * Waiting uses one process-wide mutex and condition variable; they are held
 * only around the wait and the wake, never across an initialiser, and
 * pthread_atfork keeps them consistent across fork().
 *
 * The C core's own once-cells (_knhk_once: CPU features, SIMD dispatch, tick
 * calibration, allocator backends, PatternStats.ticks_per_second) use the same
 * protocol through _knhk_once_run, so no process-wide lock is ever held across
 * an initialiser and a fork() at any moment leaves the child able to run it.
 *
 * Thread ids come from a counter that is never reset, and a forked child
 * continues the parent's count, so an id names at most one thread in a
 * process and its descendants: an id below the count at the last fork belongs
 * to a thread of an ancestor, alive here only if it is the thread that forked.
 */
#include <pthread.h>

#include "knhk_internal.h"

#define FIRST_THREAD_ID 2 /* 0 and 1 are KNHK_ONCE_EMPTY and KNHK_ONCE_READY */

static uint64_t next_thread_id = FIRST_THREAD_ID; /* atomic */
static __thread uint64_t tls_thread_id;

/* Written in the fork child handler, where the child has one thread. */
static uint64_t fork_id_floor;  /* ids below it were issued before the last fork */
static uint64_t fork_survivor;  /* id of the thread that called fork(), or 0 */

static pthread_mutex_t wait_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wait_cond = PTHREAD_COND_INITIALIZER;

static uint64_t self_id(void) {
    uint64_t id = tls_thread_id;
    if (_knhk_likely(id != 0)) return id;
    id = __atomic_fetch_add(&next_thread_id, 1, __ATOMIC_RELAXED);
    tls_thread_id = id;
    return id;
}

/* prepare/parent: no thread is inside wait_mutex while fork copies memory, so
   the child gets it unlocked and the condition variable without waiters. */
static void atfork_prepare(void) { pthread_mutex_lock(&wait_mutex); }
static void atfork_parent(void) { pthread_mutex_unlock(&wait_mutex); }
static void atfork_child(void) {
    fork_survivor = tls_thread_id; /* 0 if this thread never touched a cell: matches no owner */
    fork_id_floor = __atomic_load_n(&next_thread_id, __ATOMIC_RELAXED);
    /* Parent threads that were waiting do not exist here; start the wait
       state afresh rather than trust their bookkeeping. */
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t c = PTHREAD_COND_INITIALIZER;
    memcpy(&wait_mutex, &m, sizeof m);
    memcpy(&wait_cond, &c, sizeof c);
}
/* Registered when the library is loaded, before any thread can be inside
   wait_mutex: a lazy registration could itself race with a fork. */
__attribute__((constructor)) static void register_atfork(void) {
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

/* An owner that a fork left behind will never finish. */
static bool owner_is_gone(uint64_t owner) {
    uint64_t floor = __atomic_load_n(&fork_id_floor, __ATOMIC_RELAXED);
    return owner < floor && owner != __atomic_load_n(&fork_survivor, __ATOMIC_RELAXED);
}

static inline void *once_get(const knhk_once *o) {
    /* Fast path: one acquire load; the value was written before the release
       store of READY, so the plain read after it sees it. */
    if (_knhk_likely(__atomic_load_n(&o->state, __ATOMIC_ACQUIRE) == KNHK_ONCE_READY)) return o->value;
    return NULL;
}

void knhk_once_init(knhk_once *o) {
    o->value = NULL;
    __atomic_store_n(&o->state, KNHK_ONCE_EMPTY, __ATOMIC_RELEASE);
}

void *knhk_once_get(const knhk_once *o) { return once_get(o); }

int knhk_once_is_set(const knhk_once *o) { return __atomic_load_n(&o->state, __ATOMIC_ACQUIRE) == KNHK_ONCE_READY; }

static void publish(uint64_t *state, uint64_t value) {
    __atomic_store_n(state, value, __ATOMIC_RELEASE);
    /* The store is before the lock, the waiter's check is under it: a waiter
       either sees the new state or is already waiting when we broadcast. */
    pthread_mutex_lock(&wait_mutex);
    pthread_cond_broadcast(&wait_cond);
    pthread_mutex_unlock(&wait_mutex);
}

int knhk_once_set(knhk_once *o, void *value) {
    uint64_t me = self_id(), expected = KNHK_ONCE_EMPTY;
    if (!__atomic_compare_exchange_n(&o->state, &expected, me, false, __ATOMIC_ACQUIRE, __ATOMIC_ACQUIRE)) {
        _knhk_set_error("knhk_once_set: the cell is %s",
                        expected == KNHK_ONCE_READY ? "already full" : "being initialised by another call");
        return KNHK_ERR_STATE;
    }
    o->value = value;
    publish(&o->state, KNHK_ONCE_READY);
    return KNHK_OK;
}

/* Claim, run, publish on one state word. call(ctx) runs the initialiser with
   no lock held and stores its value on success; READY is published after it,
   EMPTY after a failure (a waiter takes over and retries). */
static int run_state(uint64_t *state, int (*call)(void *), void *ctx, const char *who) {
    uint64_t me = self_id();
    for (;;) {
        uint64_t s = __atomic_load_n(state, __ATOMIC_ACQUIRE);
        if (s == KNHK_ONCE_READY) return KNHK_OK;
        if (s == KNHK_ONCE_EMPTY) {
            if (!__atomic_compare_exchange_n(state, &s, me, false, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
                continue; /* lost the race: look again at what won */
            int rc = call(ctx);
            publish(state, rc == KNHK_OK ? KNHK_ONCE_READY : KNHK_ONCE_EMPTY);
            return rc;
        }
        if (s == me) {
            _knhk_set_error("%s: re-entrant initialisation (the initialiser of this cell asked for the same cell)",
                            who);
            return KNHK_ERR_STATE;
        }
        if (owner_is_gone(s)) {
            /* Its initialiser ran in a thread of the parent: take the cell over. */
            __atomic_compare_exchange_n(state, &s, KNHK_ONCE_EMPTY, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
            continue;
        }
        pthread_mutex_lock(&wait_mutex);
        while (__atomic_load_n(state, __ATOMIC_ACQUIRE) == s) pthread_cond_wait(&wait_cond, &wait_mutex);
        pthread_mutex_unlock(&wait_mutex);
    }
}

typedef struct {
    knhk_once *o;
    knhk_once_init_fn init;
    void *arg;
} public_call;

static int call_public(void *ctx) {
    public_call *p = ctx;
    void *value = NULL;
    int rc = p->init(p->arg, &value);
    if (rc == KNHK_OK) p->o->value = value;
    return rc;
}

int knhk_once_run(knhk_once *o, knhk_once_init_fn init, void *arg, void **value_out) {
    void *v = once_get(o);
    if (_knhk_likely(v != NULL || knhk_once_is_set(o))) {
        if (value_out != NULL) *value_out = v;
        return KNHK_OK;
    }
    if (init == NULL) {
        _knhk_set_error("knhk_once_run: init is NULL; pass the initialiser function");
        return KNHK_ERR_INVALID;
    }
    public_call p = {o, init, arg};
    int rc = run_state(&o->state, call_public, &p, "knhk_once_run");
    if (rc == KNHK_OK && value_out != NULL) *value_out = o->value;
    return rc;
}

int _knhk_once_run(_knhk_once *o, int (*init)(void *), void *arg) {
    if (_knhk_once_ready(o)) return KNHK_OK;
    return run_state(&o->state, init, arg, "knhk internal once-cell");
}

void knhk_once_hotop_read(void *ctx, uint64_t iterations) {
    const knhk_once *o = ctx;
    uintptr_t sink = 0;
    for (uint64_t i = 0; i < iterations; i++) {
        sink += (uintptr_t)once_get(o);
        /* Keep each read a real load: the compiler may not hoist it out. */
        __asm__ volatile("" : "+r"(sink) : : "memory");
    }
    __asm__ volatile("" : : "r"(sink));
}
