/* fork.c -- keeping the dynamic loader consistent across fork().
 *
 * glibc (2.36 here) resets the loader's lock in a fork child but not the
 * state of its link-map list: a child forked while another thread was inside
 * dlopen() inherits a list marked "being changed", and its next dlopen()
 * aborts the process ("Inconsistency detected by ld.so: dl-open.c ...
 * Assertion `... r_state == RT_CONSISTENT' failed"). Our dlopen()s (the
 * allocator backends) therefore run under dlopen_mutex, and a fork waits for
 * it: knhk_fork_prepare takes it, knhk_fork_parent / knhk_fork_child give it
 * back.
 *
 * These are not pthread_atfork handlers on purpose. glibc holds its atfork
 * lock while it runs prepare handlers, and a library being dlopen'ed may call
 * pthread_atfork from its constructor (jemalloc does): a prepare handler
 * waiting for a dlopen that waits for the atfork lock would deadlock. The
 * hooks run before fork() starts instead: the Python package registers them
 * with os.register_at_fork (so os.fork, multiprocessing's fork start method
 * and every Python fork go through them); a C host that forks calls them
 * around fork() itself.
 *
 * Every other process-wide lock of the C core is either held only briefly and
 * handled by pthread_atfork (counters.c registry_mutex, once.c wait_mutex),
 * or is no lock at all (once-cells are state words; a child takes over a cell
 * whose initialiser thread it did not inherit: once.c).
 */
#include <dlfcn.h>
#include <pthread.h>

#include "knhk_internal.h"

static pthread_mutex_t dlopen_mutex = PTHREAD_MUTEX_INITIALIZER;

void *_knhk_dlopen(const char *file, int mode) {
    pthread_mutex_lock(&dlopen_mutex);
    void *h = dlopen(file, mode);
    pthread_mutex_unlock(&dlopen_mutex);
    return h;
}

void knhk_fork_prepare(void) { pthread_mutex_lock(&dlopen_mutex); }

void knhk_fork_parent(void) { pthread_mutex_unlock(&dlopen_mutex); }

void knhk_fork_child(void) {
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    memcpy(&dlopen_mutex, &m, sizeof m);
}
