/* process.c -- which allocator the whole process uses.
 *
 * A launcher (knhk-memory run) can make an allocator the process's malloc by
 * preloading it; this file answers, from inside the process, which shared
 * object really serves malloc. dlsym(RTLD_DEFAULT) follows the same global
 * lookup order as every other caller of malloc (preloads first, then the
 * executable's dependencies), and dladdr names the object that defines it.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>

#include "knhk_internal.h"

int knhk_process_malloc_owner(char *buf, size_t len) {
    if (buf == NULL || len == 0) {
        _knhk_set_error("knhk_process_malloc_owner needs a buffer of at least one byte");
        return KNHK_ERR_INVALID;
    }
    buf[0] = '\0';
    void *sym = dlsym(RTLD_DEFAULT, "malloc");
    Dl_info info;
    if (sym == NULL || dladdr(sym, &info) == 0 || info.dli_fname == NULL || info.dli_fname[0] == '\0') {
        _knhk_set_error("the dynamic loader cannot say which shared object defines malloc");
        return KNHK_ERR_UNSUPPORTED;
    }
    _knhk_copy_message(buf, len, info.dli_fname);
    return KNHK_OK;
}
