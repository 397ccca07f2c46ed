/*
 * fast.c -- knhk_memory._fast, the CPython fast-path module.
 *
 * The per-call operations whose cost through cffi (argument conversion, a
 * GIL release and re-acquire, ffi.from_buffer) is many times the C work they
 * wrap, as METH_FASTCALL builtins, plus numpy's NEP 49 handler glue:
 *
 *   store_py.c       the workflow store's get, get_bytes, [] and in (the StoreBase class)
 *   counters_py.c    Counters.add/get and CounterWriter.add
 *   arena_py.c       Arena.alloc/array (the ArenaBase class) and ArenaBlock
 *   block_py.c       Backend.malloc (BackendBase) and Block (BlockBase, a buffer exporter)
 *   cells_py.c       OnceLock/Lazy.get (OnceBase) and PatternRegistry[n] (LookupBase)
 *   metrics_py.c     a labelled family child's add, a histogram child's observe
 *   simd_py.c        find/count and the id scans (builtins bound to a slow path)
 *   numpy_handler.c  backend and arena data-memory handlers for numpy
 *   pool_py.c        FixedPool / LockFreePool / ThreadLocalPool alloc and free
 *
 * The module is private: knhk_memory.store, .simd, .allocator and .arena
 * import what they need from it by name (knhk_memory/_fast.pyi types it). It
 * links the C core's shared library (knhk_memory/libknhk.*.so, built from
 * the .c files of native/) and calls it through knhk.h only, as any other client of the
 * core would. numpy is imported on first use, not with the module.
 */
#include "fast.h"

#include <string.h>

#ifndef KNHK_VERSION_STRING
#error "KNHK_VERSION_STRING is defined by native/build_native.py from pyproject.toml"
#endif

#define FASTCALL(name, fn, doc) {name, (PyCFunction)(void (*)(void))(fn), METH_FASTCALL, doc}

static PyMethodDef methods[] = {
    FASTCALL("make_scan", fast_simd_make_fast,
             "make_scan(kind, slow) -> find (kind 0) or count (kind 1) over bytes or any C-contiguous buffer; "
             "anything else goes to slow(*args, **kwargs)."),
    FASTCALL("make_needle_method", fast_simd_make_needle_method,
             "make_needle_method(kind, needle_address, owner, slow) -> Needle.find / Needle.count."),
    FASTCALL("make_id_scan", fast_simd_make_ids_fast,
             "make_id_scan(kind, slow) -> an id scan (count_eq, find_eq, ...) over numpy arrays of unsigned ids."),
    FASTCALL("counters_state", fast_counters_state,
             "counters_state(handle_address, index, count) -> the state the counter builtins of one block share."),
    FASTCALL("detach_counters", fast_counters_detach,
             "detach_counters(state): the block is closing; its builtins take their slow paths from now on."),
    FASTCALL("counters_method", fast_counters_method,
             "counters_method(kind, state, slow[, writer_address]) -> Counters.add (0), Counters.get (1) or "
             "CounterWriter.add (2) as a builtin falling back to slow."),
    FASTCALL("metrics_state", fast_metrics_state,
             "metrics_state(counters_handle_address) -> the state the metric builtins of one block share."),
    FASTCALL("detach_metrics", fast_metrics_detach,
             "detach_metrics(state): the block is closing; its builtins take their slow paths from now on."),
    FASTCALL("metrics_method", fast_metrics_method,
             "metrics_method(kind, state, cell, slow[, bounds, resolution]) -> child.add (0) or child.observe (1) "
             "as a builtin falling back to slow."),
    FASTCALL("numpy_handler_push", fast_numpy_handler_push,
             "numpy_handler_push(backend_address) -> the previous handler: the backend is numpy's data-memory "
             "handler in the calling context from now on."),
    FASTCALL("numpy_arena_handler_push", fast_numpy_arena_handler_push,
             "numpy_arena_handler_push(arena_address) -> (previous handler, scope address), or the int status of a "
             "refused arena (owner thread only, open arenas only)."),
    FASTCALL("numpy_arena_scope_end", fast_numpy_arena_scope_end,
             "numpy_arena_scope_end(scope_address): the scope is over; its handler allocates through the previous "
             "handler from now on, wherever numpy copied it."),
    FASTCALL("numpy_arena_scope_fallbacks", fast_numpy_arena_scope_fallbacks,
             "numpy_arena_scope_fallbacks(scope_address) -> blocks the scope sent to the previous handler."),
    FASTCALL("numpy_handler_set", fast_numpy_handler_set, "numpy_handler_set(handler) -> the handler it replaced."),
    FASTCALL("make_pool_fast", fast_pool_make_fast,
             "make_pool_fast(kind, pool_address, owner) -> (alloc, free) builtins of one pool (kind 0 FixedPool, "
             "1 LockFreePool, 2 ThreadLocalPool); failures go to owner._raise, non-int addresses to owner._slow_free."),
    {NULL, NULL, 0, NULL},
};

static const struct {
    const char *name;
    PyTypeObject *type;
} types[] = {
    {"ArenaBlock", &fast_ArenaBlock_Type},   {"ArenaBase", &fast_ArenaBase_Type}, {"BlockBase", &fast_BlockBase_Type},
    {"BackendBase", &fast_BackendBase_Type}, {"OnceBase", &fast_OnceBase_Type},   {"LookupBase", &fast_LookupBase_Type},
    {"StoreBase", &fast_StoreBase_Type},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "knhk_memory._fast",
    .m_doc = "knhk-memory's CPython fast paths (private; see native/cpython/fast.c).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fast(void) {
    /* The core library is found by the dynamic linker (RUNPATH $ORIGIN); a
       stale one from another build would be called with the wrong layouts. */
    const char *core = knhk_version();
    if (strcmp(core, KNHK_VERSION_STRING) != 0) {
        PyErr_Format(PyExc_ImportError,
                     "knhk_memory._fast was built for C core %s but the loaded core is %s: rebuild the package "
                     "(pip install ., or bash scripts/dev.sh setup)",
                     KNHK_VERSION_STRING, core);
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddStringConstant(m, "CORE_VERSION", core) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
        if (PyType_Ready(types[i].type) < 0 || PyModule_AddObjectRef(m, types[i].name, (PyObject *)types[i].type) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    }
    return m;
}
