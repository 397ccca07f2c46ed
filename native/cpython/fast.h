/*
 * fast.h -- shared by the files of the CPython fast-path module
 * knhk_memory._fast (fast.c joins them). Everything here is the module's own:
 * it calls the C core through the public API in knhk.h only, and no C code
 * of the core or of this module writes into another Python module.
 */
#ifndef KNHK_FAST_H
#define KNHK_FAST_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "knhk.h"

#define fast_likely(x) __builtin_expect(!!(x), 1)
#define fast_unlikely(x) __builtin_expect(!!(x), 0)

/* An exact int's value when it is one digit long (|v| < 2**30): the common
   increment or index, read without PyLong_AsLongLongAndOverflow (8% of a
   Counters.add loop under perf). 1 and *v set, or 0: use the general
   conversion. The caller has checked PyLong_CheckExact. */
static inline int fast_small_long(PyObject *o, long long *v) {
#if PY_VERSION_HEX >= 0x030C0000
    if (!PyUnstable_Long_IsCompact((PyLongObject *)o)) return 0;
    *v = (long long)PyUnstable_Long_CompactValue((PyLongObject *)o);
    return 1;
#else
    Py_ssize_t size = Py_SIZE(o);
    if (size == 0) {
        *v = 0;
        return 1;
    }
    if (size != 1 && size != -1) return 0;
    *v = (long long)size * (long long)((PyLongObject *)o)->ob_digit[0];
    return 1;
#endif
}

/* numpy_handler.c: import numpy's C API table (fast_numpy_api) on first use,
   so importing the module does not import numpy. 0, or -1 with a Python
   exception set. GIL held. */
int fast_numpy_ready(void);

/* The module's functions (METH_FASTCALL), by file. */
PyObject *fast_simd_make_fast(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
PyObject *fast_simd_make_needle_method(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
PyObject *fast_simd_make_ids_fast(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
PyObject *fast_counters_state(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
PyObject *fast_counters_detach(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
PyObject *fast_counters_method(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
PyObject *fast_metrics_state(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
PyObject *fast_metrics_detach(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
PyObject *fast_metrics_method(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
PyObject *fast_numpy_handler_push(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
PyObject *fast_numpy_arena_handler_push(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
PyObject *fast_numpy_handler_set(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
PyObject *fast_numpy_arena_scope_end(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
PyObject *fast_numpy_arena_scope_fallbacks(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
PyObject *fast_pool_make_fast(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);

/* The module's types (fast.c readies them and adds them to the module). */
extern PyTypeObject fast_ArenaBlock_Type; /* arena_py.c: knhk_memory._fast.ArenaBlock */
extern PyTypeObject fast_ArenaBase_Type; /* arena_py.c: knhk_memory._fast.ArenaBase */
extern PyTypeObject fast_BlockBase_Type; /* block_py.c: knhk_memory._fast.BlockBase */
extern PyTypeObject fast_BackendBase_Type; /* block_py.c: knhk_memory._fast.BackendBase */
extern PyTypeObject fast_OnceBase_Type; /* cells_py.c: knhk_memory._fast.OnceBase */
extern PyTypeObject fast_LookupBase_Type; /* cells_py.c: knhk_memory._fast.LookupBase */
extern PyTypeObject fast_StoreBase_Type; /* store_py.c: knhk_memory._fast.StoreBase */

/* A C pointer passed from Python as an int address (cffi's
   int(ffi.cast("uintptr_t", p))). NULL with a Python error for anything else. */
void *fast_address(PyObject *obj, const char *what);

#endif /* KNHK_FAST_H */
