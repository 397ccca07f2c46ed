/* numpy_handler.c -- NumPy data-memory handlers (NEP 49) over knhk backends
 * and arenas, for knhk_memory._fast.
 *
 * Each backend has one static PyDataMem_Handler whose ctx is the backend, so
 * an array's data is freed by the backend that allocated it, whatever handler
 * is current when the array dies (numpy keeps the capsule on the array).
 * An arena handler is made per scope: a heap PyDataMem_Handler whose ctx is
 * the arena, owned by its capsule, which holds a reference on the arena
 * (knhk_arena_retain) until numpy drops the capsule with its last array.
 *
 * Python holds the previous handler as an ordinary object and puts it back
 * with numpy_handler_set; every call here runs with the GIL held.
 */
#include "fast.h"

#define PY_ARRAY_UNIQUE_SYMBOL fast_numpy_api
#include <numpy/arrayobject.h>

#include <string.h>

int fast_numpy_ready(void) {
    if (PyArray_API != NULL) return 0;
    return _import_array();
}

void *fast_address(PyObject *obj, const char *what) {
    if (!PyLong_CheckExact(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected an int address, got %.100s", what, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    void *p = PyLong_AsVoidPtr(obj);
    if (p == NULL && !PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "%s: NULL address", what);
    return p;
}

static void copy_name(char *dst, size_t cap, const char *src) {
    size_t n = strlen(src);
    if (n >= cap) n = cap - 1;
    memcpy(dst, src, n);
    dst[n] = '\0';
}

/* ---------------------------------------------------------------- backend handlers */

static PyDataMem_Handler handlers[KNHK_BACKEND_COUNT];

static void *h_malloc(void *ctx, size_t size) { return knhk_malloc(ctx, size); }
static void *h_calloc(void *ctx, size_t n, size_t size) { return knhk_calloc(ctx, n, size); }
static void *h_realloc(void *ctx, void *p, size_t size) { return knhk_realloc(ctx, p, size, 0); }
static void h_free(void *ctx, void *p, size_t size) { knhk_free(ctx, p); }

/* The name numpy reports for arrays allocated through each backend. */
static const char *const handler_names[KNHK_BACKEND_COUNT] = {
    [KNHK_BACKEND_SYSTEM] = "knhk_memory.system",
    [KNHK_BACKEND_JEMALLOC] = "knhk_memory.jemalloc",
    [KNHK_BACKEND_MIMALLOC] = "knhk_memory.mimalloc",
};

static PyObject *set_capsule(PyObject *capsule) {
    PyObject *previous = PyDataMem_SetHandler(capsule);
    Py_DECREF(capsule);
    return previous;
}

/* numpy_handler_push(backend_address) -> previous handler */
PyObject *fast_numpy_handler_push(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "numpy_handler_push(backend_address)");
        return NULL;
    }
    const knhk_backend *b = fast_address(args[0], "numpy_handler_push");
    if (b == NULL || fast_numpy_ready() < 0) return NULL;
    int id = knhk_backend_id_of(b);
    if (id < 0 || id >= KNHK_BACKEND_COUNT) {
        PyErr_Format(PyExc_ValueError, "numpy_handler_push: not a backend (id %d)", id);
        return NULL;
    }
    /* The GIL serialises this first-time fill of the static handler. */
    PyDataMem_Handler *h = &handlers[id];
    if (h->allocator.ctx == NULL) {
        copy_name(h->name, sizeof h->name, handler_names[id]);
        h->version = 1;
        h->allocator = (PyDataMemAllocator){(void *)b, h_malloc, h_calloc, h_realloc, h_free};
    }
    PyObject *capsule = PyCapsule_New(h, "mem_handler", NULL);
    return capsule == NULL ? NULL : set_capsule(capsule);
}

/* numpy_handler_set(handler) -> the handler it replaced */
PyObject *fast_numpy_handler_set(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 1 || !PyCapsule_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "numpy_handler_set(handler: the capsule a push returned)");
        return NULL;
    }
    if (fast_numpy_ready() < 0) return NULL;
    return PyDataMem_SetHandler(args[0]);
}

/* ---------------------------------------------------------------- arena handlers */

static void *ah_malloc(void *ctx, size_t size) { return knhk_arena_block_alloc(ctx, size, 16, NULL); }

static void *ah_calloc(void *ctx, size_t n, size_t size) {
    size_t total;
    if (__builtin_mul_overflow(n, size, &total)) return NULL;
    void *p = knhk_arena_block_alloc(ctx, total, 16, NULL);
    /* Bumped memory may hold an earlier batch's bytes: zero it. */
    if (p != NULL) memset(p, 0, total);
    return p;
}

static void *ah_realloc(void *ctx, void *p, size_t size) { return knhk_arena_block_realloc(ctx, p, size, NULL); }
static void ah_free(void *ctx, void *p, size_t size) { knhk_arena_block_free(ctx, p); }

static void arena_capsule_destructor(PyObject *capsule) {
    PyDataMem_Handler *h = PyCapsule_GetPointer(capsule, "mem_handler");
    if (h == NULL) {
        PyErr_Clear();
        return;
    }
    knhk_arena_release(h->allocator.ctx);
    PyMem_RawFree(h);
}

/* numpy_arena_handler_push(arena_address) -> previous handler, or the int
   status of a refused knhk_arena_retain (its message in knhk_last_error). */
PyObject *fast_numpy_arena_handler_push(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "numpy_arena_handler_push(arena_address)");
        return NULL;
    }
    knhk_arena *a = fast_address(args[0], "numpy_arena_handler_push");
    if (a == NULL || fast_numpy_ready() < 0) return NULL;
    int rc = knhk_arena_retain(a);
    if (rc != KNHK_OK) return PyLong_FromLong(rc);
    PyDataMem_Handler *h = PyMem_RawCalloc(1, sizeof *h);
    if (h == NULL) {
        knhk_arena_release(a);
        return PyErr_NoMemory();
    }
    copy_name(h->name, sizeof h->name, "knhk_memory.arena");
    h->version = 1;
    h->allocator = (PyDataMemAllocator){(void *)a, ah_malloc, ah_calloc, ah_realloc, ah_free};
    PyObject *capsule = PyCapsule_New(h, "mem_handler", arena_capsule_destructor);
    if (capsule == NULL) {
        PyMem_RawFree(h);
        knhk_arena_release(a);
        return NULL;
    }
    /* From here the capsule owns h and the arena reference. */
    return set_capsule(capsule);
}
