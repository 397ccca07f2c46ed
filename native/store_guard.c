/*
 * store_guard.c -- a SIGBUS guard for reads of a mapped store file.
 *
 * A file mapped with MAP_SHARED that someone truncates under the reader
 * raises SIGBUS on the next access past the new end. A watched store
 * (knhk_store_watch) sets the thread-local _knhk_fault_jmp around each read;
 * this handler siglongjmps there, so the read returns KNHK_STORE_CHANGED
 * instead of killing the process. The same technique guards mmap reads in
 * LMDB's and SQLite's users (SQLite's own docs list SIGBUS on truncation as
 * the hazard of its mmap mode). A SIGBUS outside a guarded read goes to the
 * handler we replaced (faulthandler's, say) or, with none, kills the process
 * as it would have without us.
 *
 * SA_NODEFER: the handler leaves by siglongjmp without restoring a signal
 * mask (sigsetjmp(buf, 0) saves none, which keeps the guard cheap), so
 * SIGBUS must not be blocked while it runs.
 */
#include <pthread.h>
#include <signal.h>

#include "knhk_internal.h"

_Thread_local sigjmp_buf *_knhk_fault_jmp;

static struct sigaction previous;
static pthread_mutex_t install_lock = PTHREAD_MUTEX_INITIALIZER;

static void on_fault(int sig, siginfo_t *info, void *uc) {
    sigjmp_buf *jb = _knhk_fault_jmp;
    if (jb != NULL) {
        _knhk_fault_jmp = NULL;
        siglongjmp(*jb, 1);
    }
    if (previous.sa_flags & SA_SIGINFO) {
        if (previous.sa_sigaction != NULL) {
            previous.sa_sigaction(sig, info, uc);
            return;
        }
    } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
        return;
    }
    /* No handler before us: die of the signal, as the process would have. */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
    raise(sig);
}

int _knhk_fault_guard_install(void) {
    int status = KNHK_OK;
    pthread_mutex_lock(&install_lock);
    struct sigaction cur;
    if (sigaction(SIGBUS, NULL, &cur) != 0) {
        status = KNHK_ERR_INVALID;
    } else if (!((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_fault)) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGBUS, &sa, &previous) != 0) status = KNHK_ERR_INVALID;
    }
    pthread_mutex_unlock(&install_lock);
    if (status != KNHK_OK) _knhk_set_error("cannot install the SIGBUS handler that guards mapped store reads");
    return status;
}
