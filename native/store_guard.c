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
#include <sys/mman.h>
#include <unistd.h>

#include "knhk_internal.h"

_Thread_local sigjmp_buf *_knhk_fault_jmp;

static struct sigaction previous;
static pthread_mutex_t install_lock = PTHREAD_MUTEX_INITIALIZER;
static uintptr_t page_size = 4096;

/* Watched mappings, for faults outside a guarded read: a memoryview handed
   out by get() reads the mapping directly, and a file truncated under it
   would kill the process on the next read. The handler maps a page of zeros
   over the faulting page (its bytes are gone from the file anyway), flags
   the range as changed, so every later read through the store raises
   KNHK_STORE_CHANGED, and returns: the read sees zeros instead of a signal.
   Slots are claimed under install_lock and read lock-free by the handler. */
#define WATCH_SLOTS 4096
static struct {
    _Atomic uintptr_t start, end; /* end == 0: free */
    _Atomic int changed;
} ranges[WATCH_SLOTS];

int _knhk_watch_range(const void *base, uint64_t size, _Atomic int **changed) {
    int slot = -1;
    pthread_mutex_lock(&install_lock);
    for (int i = 0; i < WATCH_SLOTS; i++) {
        if (atomic_load(&ranges[i].end) == 0) {
            atomic_store(&ranges[i].changed, 0);
            atomic_store(&ranges[i].start, (uintptr_t)base);
            atomic_store(&ranges[i].end, (uintptr_t)base + (uintptr_t)size);
            *changed = &ranges[i].changed;
            slot = i;
            break;
        }
    }
    pthread_mutex_unlock(&install_lock);
    return slot;
}

void knhk_store_unwatch(int slot) {
    if (slot < 0 || slot >= WATCH_SLOTS) return;
    pthread_mutex_lock(&install_lock);
    atomic_store(&ranges[slot].end, 0);
    atomic_store(&ranges[slot].start, 0);
    pthread_mutex_unlock(&install_lock);
}

static int patch_page(uintptr_t a) {
    for (int i = 0; i < WATCH_SLOTS; i++) {
        uintptr_t end = atomic_load_explicit(&ranges[i].end, memory_order_acquire);
        if (end == 0 || a >= end || a < atomic_load_explicit(&ranges[i].start, memory_order_relaxed)) continue;
        void *page = (void *)(a & ~(page_size - 1));
        if (mmap(page, (size_t)page_size, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED)
            return 0;
        atomic_store_explicit(&ranges[i].changed, 1, memory_order_release);
        return 1;
    }
    return 0;
}

static void on_fault(int sig, siginfo_t *info, void *uc) {
    /* Only a fault the kernel raised for this thread's access (si_code > 0:
       BUS_ADRERR and kin); a SIGBUS sent with kill() (SI_USER) is not ours. */
    sigjmp_buf *jb = info != NULL && info->si_code > 0 ? _knhk_fault_jmp : NULL;
    if (jb != NULL) {
        _knhk_fault_jmp = NULL;
        siglongjmp(*jb, 1);
    }
    if (info != NULL && info->si_code == BUS_ADRERR && patch_page((uintptr_t)info->si_addr)) return;
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
    long ps = sysconf(_SC_PAGESIZE);
    pthread_mutex_lock(&install_lock);
    if (ps > 0) page_size = (uintptr_t)ps;
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
