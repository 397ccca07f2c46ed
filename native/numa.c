/* numa.c -- NUMA placement through the raw mbind / set_mempolicy / get_mempolicy syscalls.
 *
 * No libnuma: the three calls are all a pool or an arena needs, and libnuma
 * would be one more shared library to find on the user's machine. Node
 * discovery (which nodes exist, their CPUs and memory) reads sysfs in the
 * Python layer (knhk_memory/numa.py), where a fake tree can stand in for it.
 * On a machine with one node every call still runs: binding to node 0 or
 * interleaving over {0} is a valid policy there.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "knhk_internal.h"

#if defined(SYS_mbind) && defined(SYS_set_mempolicy) && defined(SYS_get_mempolicy)
#define HAVE_MEMPOLICY 1
#else
#define HAVE_MEMPOLICY 0
#endif

#define MPOL_F_NODE_ (1 << 0)
#define MPOL_F_ADDR_ (1 << 1)

static const char *mode_name(int mode) {
    switch (mode) {
    case KNHK_NUMA_DEFAULT: return "default";
    case KNHK_NUMA_PREFERRED: return "preferred";
    case KNHK_NUMA_BIND: return "bind";
    case KNHK_NUMA_INTERLEAVE: return "interleave";
    case KNHK_NUMA_LOCAL: return "local";
    default: return "unknown";
    }
}

/* Check mode and mask; *maxnode gets the kernel's maxnode argument. */
static int check_policy(int mode, const uint64_t *mask, size_t mask_words, unsigned long *maxnode, const char *what) {
    if (mode < KNHK_NUMA_DEFAULT || mode > KNHK_NUMA_LOCAL) {
        _knhk_set_error("%s: NUMA mode must be %d..%d (default, preferred, bind, interleave, local), got %d", what,
                        KNHK_NUMA_DEFAULT, KNHK_NUMA_LOCAL, mode);
        return KNHK_ERR_INVALID;
    }
    if (mask_words > KNHK_NUMA_MAX_NODES / 64) {
        _knhk_set_error("%s: a node mask of %zu words is beyond the %d-node limit", what, mask_words,
                        KNHK_NUMA_MAX_NODES);
        return KNHK_ERR_INVALID;
    }
    int any = 0;
    for (size_t w = 0; mask != NULL && w < mask_words; w++) any |= mask[w] != 0;
    if ((mode == KNHK_NUMA_BIND || mode == KNHK_NUMA_INTERLEAVE || mode == KNHK_NUMA_PREFERRED) && !any) {
        _knhk_set_error("%s: NUMA mode %s needs at least one node in the mask", what, mode_name(mode));
        return KNHK_ERR_INVALID;
    }
    if ((mode == KNHK_NUMA_DEFAULT || mode == KNHK_NUMA_LOCAL) && any) {
        _knhk_set_error("%s: NUMA mode %s takes no nodes", what, mode_name(mode));
        return KNHK_ERR_INVALID;
    }
    /* The kernel reads maxnode - 1 bits. */
    *maxnode = any ? (unsigned long)(mask_words * 64 + 1) : 0;
    return KNHK_OK;
}

static int refused(const char *what, int mode, int err) {
    _knhk_set_error("%s(%s) refused by the kernel: %s (errno %d)%s", what, mode_name(mode), strerror(err), err,
                    err == ENOSYS   ? ": this kernel has no NUMA support"
                    : err == EPERM  ? ": not permitted here (a seccomp filter, or CAP_SYS_NICE missing)"
                    : err == EINVAL ? ": a node in the mask is not online"
                                    : "");
    return err == EINVAL ? KNHK_ERR_INVALID : KNHK_ERR_UNAVAILABLE;
}

int knhk_numa_mbind(void *addr, size_t len, int mode, const uint64_t *mask, size_t mask_words) {
    return _knhk_numa_mbind_flags(addr, len, mode, mask, mask_words, 0);
}

int _knhk_numa_mbind_flags(void *addr, size_t len, int mode, const uint64_t *mask, size_t mask_words, unsigned flags) {
    unsigned long maxnode;
    int st = check_policy(mode, mask, mask_words, &maxnode, "mbind");
    if (st != KNHK_OK) return st;
    long page = sysconf(_SC_PAGESIZE);
    if (addr == NULL || ((uintptr_t)addr & (uintptr_t)(page - 1)) != 0) {
        _knhk_set_error("mbind: the address %p must be page-aligned and not NULL", addr);
        return KNHK_ERR_INVALID;
    }
#if HAVE_MEMPOLICY
    if (syscall(SYS_mbind, addr, (unsigned long)len, (unsigned long)mode, maxnode ? mask : NULL, maxnode,
                (unsigned long)flags) != 0)
        return refused("mbind", mode, errno);
    return KNHK_OK;
#else
    (void)len;
    (void)flags;
    _knhk_set_error("mbind: this platform has no mbind system call");
    return KNHK_ERR_UNAVAILABLE;
#endif
}

int knhk_numa_set_thread_policy(int mode, const uint64_t *mask, size_t mask_words) {
    unsigned long maxnode;
    int st = check_policy(mode, mask, mask_words, &maxnode, "set_mempolicy");
    if (st != KNHK_OK) return st;
#if HAVE_MEMPOLICY
    if (syscall(SYS_set_mempolicy, (unsigned long)mode, maxnode ? mask : NULL, maxnode) != 0)
        return refused("set_mempolicy", mode, errno);
    return KNHK_OK;
#else
    _knhk_set_error("set_mempolicy: this platform has no such system call");
    return KNHK_ERR_UNAVAILABLE;
#endif
}

int knhk_numa_thread_policy(int *mode) {
#if HAVE_MEMPOLICY
    int m = 0;
    if (syscall(SYS_get_mempolicy, &m, NULL, 0UL, NULL, 0UL) != 0) return refused("get_mempolicy", 0, errno);
    /* The kernel ORs mode flags (MPOL_F_STATIC_NODES...) into the high bits. */
    *mode = m & 0xff;
    return KNHK_OK;
#else
    (void)mode;
    _knhk_set_error("get_mempolicy: this platform has no such system call");
    return KNHK_ERR_UNAVAILABLE;
#endif
}

int knhk_numa_node_of(void *addr, int *node) {
#if HAVE_MEMPOLICY
    int n = -1;
    if (syscall(SYS_get_mempolicy, &n, NULL, 0UL, addr, (unsigned long)(MPOL_F_NODE_ | MPOL_F_ADDR_)) != 0)
        return refused("get_mempolicy", 0, errno);
    *node = n;
    return KNHK_OK;
#else
    (void)addr;
    *node = -1;
    _knhk_set_error("get_mempolicy: this platform has no such system call");
    return KNHK_ERR_UNAVAILABLE;
#endif
}
