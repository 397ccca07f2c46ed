/* numpy_handler.c -- NumPy data-memory handlers (NEP 49) backed by knhk backends.
 *
 * Each backend has one static PyDataMem_Handler whose ctx is the backend, so
 * an array's data is freed by the backend that allocated it, whatever handler
 * is current when the array dies (numpy keeps the capsule on the array).
 *
 * cffi calls into C with the GIL released; the functions here that touch
 * Python objects take it back with PyGILState_Ensure. Every reference stays
 * inside this file: Python holds a token only as an opaque pointer.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define PY_ARRAY_UNIQUE_SYMBOL _knhk_numpy_array_api
#include <numpy/arrayobject.h>

#include "knhk_internal.h"

static PyDataMem_Handler handlers[KNHK_BACKEND_COUNT];

static void *h_malloc(void *ctx, size_t size) { return knhk_malloc(ctx, size); }
static void *h_calloc(void *ctx, size_t n, size_t size) { return knhk_calloc(ctx, n, size); }
static void *h_realloc(void *ctx, void *p, size_t size) { return knhk_realloc(ctx, p, size, 0); }
static void h_free(void *ctx, void *p, size_t size) { knhk_free(ctx, p); }

/* Called with the GIL held. Also used by simd_py.c (which includes numpy's
   headers with NO_IMPORT_ARRAY: the API table is this file's). */
int _knhk_numpy_ready(void) {
    if (PyArray_API != NULL) return 0;
    return _import_array();
}

static void take_python_error(const char *what) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *s = value ? PyObject_Str(value) : NULL;
    const char *msg = s ? PyUnicode_AsUTF8(s) : NULL;
    _knhk_set_error("%s: %s", what, msg ? msg : "unknown Python error");
    Py_XDECREF(s);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    PyErr_Clear();
}

static const char *const handler_names[KNHK_BACKEND_COUNT] = {
    [KNHK_BACKEND_SYSTEM] = "knhk_memory.system",
    [KNHK_BACKEND_JEMALLOC] = "knhk_memory.jemalloc",
    [KNHK_BACKEND_MIMALLOC] = "knhk_memory.mimalloc",
};

const char *knhk_numpy_handler_name(const knhk_backend *b) { return handler_names[knhk_backend_id_of(b)]; }

void *knhk_numpy_handler_push(const knhk_backend *b, int *status) {
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *previous = NULL;
    int rc = KNHK_OK;
    if (_knhk_numpy_ready() < 0) {
        take_python_error("numpy's C API could not be imported");
        rc = KNHK_ERR_PYTHON;
        goto done;
    }
    /* The GIL serialises this first-time fill of the static handler. */
    PyDataMem_Handler *h = &handlers[knhk_backend_id_of(b)];
    if (h->allocator.ctx == NULL) {
        _knhk_copy_message(h->name, sizeof h->name, knhk_numpy_handler_name(b));
        h->version = 1;
        h->allocator = (PyDataMemAllocator){(void *)b, h_malloc, h_calloc, h_realloc, h_free};
    }
    PyObject *capsule = PyCapsule_New(h, "mem_handler", NULL);
    if (capsule == NULL) {
        take_python_error("creating the handler capsule failed");
        rc = KNHK_ERR_PYTHON;
        goto done;
    }
    previous = PyDataMem_SetHandler(capsule);
    Py_DECREF(capsule);
    if (previous == NULL) {
        take_python_error("PyDataMem_SetHandler failed");
        rc = KNHK_ERR_PYTHON;
    }
done:
    PyGILState_Release(gil);
    if (status) *status = rc;
    return previous;
}

int knhk_numpy_handler_restore(void *token) {
    if (token == NULL) return KNHK_ERR_INVALID;
    PyGILState_STATE gil = PyGILState_Ensure();
    int rc = KNHK_OK;
    PyObject *replaced = PyDataMem_SetHandler((PyObject *)token);
    if (replaced == NULL) {
        take_python_error("PyDataMem_SetHandler failed");
        rc = KNHK_ERR_PYTHON;
    }
    Py_XDECREF(replaced);
    Py_DECREF((PyObject *)token);
    PyGILState_Release(gil);
    return rc;
}

void knhk_numpy_handler_discard(void *token) {
    if (token == NULL) return;
    PyGILState_STATE gil = PyGILState_Ensure();
    Py_DECREF((PyObject *)token);
    PyGILState_Release(gil);
}

/* ---------------------------------------------------------------- arena handlers
 *
 * An arena handler is made per scope: a heap PyDataMem_Handler whose ctx is
 * the arena, owned by its capsule. numpy keeps the capsule on every array it
 * allocates through it, so the handler lives exactly as long as the scope's
 * token or the last such array; its destructor drops the handler's reference
 * on the arena. The arena itself stays until every counted block is freed.
 */

/* ctx is the scope (arena_scope.c): the arena while the scope is open and
   the caller owns it, else the handler current when the scope opened. */
static void *ah_malloc(void *ctx, size_t size) { return _knhk_arena_scope_alloc(ctx, size, false); }

static void *ah_calloc(void *ctx, size_t n, size_t size) {
    size_t total;
    if (__builtin_mul_overflow(n, size, &total)) return NULL;
    return _knhk_arena_scope_alloc(ctx, total, true);
}

static void *ah_realloc(void *ctx, void *p, size_t size) { return _knhk_arena_scope_realloc(ctx, p, size); }
static void ah_free(void *ctx, void *p, size_t size) { _knhk_arena_scope_free(ctx, p); }

/* With the GIL (the capsule destructor, or knhk_numpy_arena_scope_end, which takes it). */
void _knhk_arena_scope_free_state(_knhk_arena_scope *s) {
    PyGILState_STATE gil = PyGILState_Ensure();
    Py_XDECREF((PyObject *)s->prev_capsule);
    PyGILState_Release(gil);
    _knhk_arena_unref(s->arena);
    free(s);
}

static void arena_capsule_destructor(PyObject *capsule) {
    PyDataMem_Handler *h = PyCapsule_GetPointer(capsule, "mem_handler");
    if (h == NULL) {
        PyErr_Clear();
        return;
    }
    if (_knhk_arena_scope_unref(h->allocator.ctx)) _knhk_arena_scope_free_state(h->allocator.ctx);
    PyMem_RawFree(h);
}

void *knhk_numpy_arena_handler_push(knhk_arena *a, int *status) {
    void *scope = NULL;
    void *token = knhk_numpy_arena_scope_push(a, &scope, status);
    knhk_numpy_arena_scope_end(scope); /* no caller to end it: it ends with the handler */
    return token;
}

void *knhk_numpy_arena_scope_push(knhk_arena *a, void **scope, int *status) {
    if (scope != NULL) *scope = NULL;
    int rc = _knhk_arena_ref(a);
    if (rc != KNHK_OK) {
        if (status) *status = rc;
        return NULL;
    }
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *previous = NULL;
    PyObject *capsule = NULL;
    PyDataMem_Handler *h = NULL;
    _knhk_arena_scope *s = NULL;
    if (_knhk_numpy_ready() < 0) {
        take_python_error("numpy's C API could not be imported");
        rc = KNHK_ERR_PYTHON;
        goto fail;
    }
    h = PyMem_RawCalloc(1, sizeof *h);
    if (h == NULL) {
        _knhk_set_error("no memory for a numpy arena handler");
        rc = KNHK_ERR_NOMEM;
        goto fail;
    }
    _knhk_copy_message(h->name, sizeof h->name, "knhk_memory.arena");
    h->version = 1;
    s = _knhk_arena_scope_new(a);
    if (s == NULL) {
        _knhk_set_error("no memory for a numpy arena scope");
        rc = KNHK_ERR_NOMEM;
        goto fail;
    }
    h->allocator = (PyDataMemAllocator){(void *)s, ah_malloc, ah_calloc, ah_realloc, ah_free};
    capsule = PyCapsule_New(h, "mem_handler", arena_capsule_destructor);
    if (capsule == NULL) {
        take_python_error("creating the arena handler capsule failed");
        rc = KNHK_ERR_PYTHON;
        goto fail;
    }
    /* From here the capsule owns h, and s with the arena reference. */
    h = NULL;
    /* The previous handler, for allocations outside the scope: the current
       one now (the GIL keeps it current until SetHandler below). */
    PyObject *prev = PyDataMem_GetHandler();
    PyDataMem_Handler *ph = prev != NULL ? PyCapsule_GetPointer(prev, "mem_handler") : NULL;
    if (ph == NULL) {
        Py_XDECREF(prev);
        Py_DECREF(capsule);
        take_python_error("reading numpy's current data handler failed");
        if (status) *status = KNHK_ERR_PYTHON;
        PyGILState_Release(gil);
        return NULL;
    }
    s->prev_capsule = prev;
    s->prev_ctx = ph->allocator.ctx;
    s->prev_malloc = ph->allocator.malloc;
    s->prev_calloc = ph->allocator.calloc;
    s->prev_realloc = ph->allocator.realloc;
    s->prev_free = ph->allocator.free;
    previous = PyDataMem_SetHandler(capsule);
    Py_DECREF(capsule);
    if (previous == NULL) {
        take_python_error("PyDataMem_SetHandler failed");
        rc = KNHK_ERR_PYTHON;
        knhk_numpy_arena_scope_end(s); /* the caller's reference: nobody will end it */
    } else if (scope != NULL) {
        *scope = s;
    } else {
        knhk_numpy_arena_scope_end(s);
    }
    PyGILState_Release(gil);
    if (status) *status = rc;
    return previous;
fail:
    free(s);
    PyMem_RawFree(h);
    PyGILState_Release(gil);
    _knhk_arena_unref(a);
    if (status) *status = rc;
    return NULL;
}
