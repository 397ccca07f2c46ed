/*
 * simd_py.c -- find and count on small buffers as CPython builtins.
 *
 * Through cffi a call costs ~350 ns here (argument conversion, a GIL release
 * and re-acquire, ffi.from_buffer for anything but bytes) around a scan that
 * takes ~10-50 ns on a few hundred bytes. As METH_FASTCALL builtins the
 * common calls -- bytes or any C-contiguous buffer, an exact bytes needle,
 * int or None bounds -- are one vectorcall. Everything else (str, an int
 * needle, keyword arguments, non-contiguous buffers, a refused SIMD level)
 * goes to the Python function given as `slow`, which converts or raises, so
 * the two paths cannot disagree on errors.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "knhk_internal.h"

#define NEEDLE_CAPSULE "knhk_memory.simd.needle"
/* Scans of more bytes than this release the GIL (and so run concurrently). */
#define GIL_RELEASE_BYTES ((Py_ssize_t)1 << 16)

enum { KIND_FIND = 0, KIND_COUNT = 1 };

typedef struct {
    const uint8_t *p;
    Py_ssize_t n;
    Py_buffer view;
    int has_view;
} span;

/* 1: s describes obj's bytes (release with span_release); 0: take the slow
   path (no exception set). bytes is used directly (immutable, kept alive by
   the caller's reference); anything else through the buffer protocol, whose
   export also keeps a bytearray from resizing while the GIL is released. */
static int span_get(PyObject *obj, span *s) {
    s->has_view = 0;
    if (PyBytes_CheckExact(obj)) {
        s->p = (const uint8_t *)PyBytes_AS_STRING(obj);
        s->n = PyBytes_GET_SIZE(obj);
        return 1;
    }
    if (PyUnicode_Check(obj) || !PyObject_CheckBuffer(obj)) return 0;
    if (PyObject_GetBuffer(obj, &s->view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear(); /* non-contiguous and the like: the slow path says why */
        return 0;
    }
    s->p = s->view.buf;
    s->n = s->view.len;
    s->has_view = 1;
    return 1;
}

static void span_release(span *s) {
    if (s->has_view) PyBuffer_Release(&s->view);
}

/* An int (not bool) or None bound that fits Py_ssize_t; 0 for the slow path. */
static int bound_get(PyObject *obj, Py_ssize_t *out, int *given) {
    *given = 0;
    if (obj == NULL || obj == Py_None) return 1;
    if (!PyLong_CheckExact(obj)) return 0;
    Py_ssize_t v = PyLong_AsSsize_t(obj);
    if (v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    *out = v;
    *given = 1;
    return 1;
}

/* bytes.find's ADJUST_INDICES: end clamped to n, negatives from the end. */
static void adjust(Py_ssize_t n, Py_ssize_t *start, Py_ssize_t *end) {
    if (*end > n)
        *end = n;
    else if (*end < 0 && (*end += n) < 0)
        *end = 0;
    if (*start < 0 && (*start += n) < 0) *start = 0;
}

typedef int64_t (*find_call)(const void *ctx, const uint8_t *hay, size_t n);
typedef uint64_t (*count_call)(const void *ctx, const uint8_t *hay, size_t n);

/* The scan itself, on hay[lo, hi) with needle length m: a find or a count
   through either the dispatched API (ctx = the needle bytes) or a prepared
   needle (ctx = the knhk_simd_needle). */
typedef struct {
    int kind;
    const knhk_simd_needle *nd; /* NULL: use the dispatched calls with s, m */
    const uint8_t *s;
    size_t m;
} scan;

static PyObject *run_scan(const scan *sc, PyObject *hay_obj, PyObject *start_obj, PyObject *end_obj, int *slow) {
    Py_ssize_t start = 0, end = PY_SSIZE_T_MAX;
    int has_start, has_end;
    *slow = 1;
    if (!bound_get(start_obj, &start, &has_start) || !bound_get(end_obj, &end, &has_end)) return NULL;
    span h;
    if (!span_get(hay_obj, &h)) return NULL;
    *slow = 0;
    adjust(h.n, &start, &end);
    const size_t m = sc->m;
    if (end - start < (Py_ssize_t)m) { /* also start > n */
        span_release(&h);
        return PyLong_FromLong(sc->kind == KIND_FIND ? -1 : 0);
    }
    const uint8_t *p = h.p + start;
    const size_t n = (size_t)(end - start);
    int64_t r;
    if (n > (size_t)GIL_RELEASE_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        if (sc->kind == KIND_FIND)
            r = sc->nd ? sc->nd->find(sc->nd, p, n) : knhk_simd_find(p, n, sc->s, m);
        else
            r = (int64_t)(sc->nd ? knhk_simd_needle_count(sc->nd, p, n, 0) : knhk_simd_count(p, n, sc->s, m, 0));
        Py_END_ALLOW_THREADS
    } else if (sc->kind == KIND_FIND) {
        r = sc->nd ? sc->nd->find(sc->nd, p, n) : knhk_simd_find(p, n, sc->s, m);
    } else {
        r = (int64_t)(sc->nd ? knhk_simd_needle_count(sc->nd, p, n, 0) : knhk_simd_count(p, n, sc->s, m, 0));
    }
    span_release(&h);
    if (sc->kind == KIND_FIND) return PyLong_FromSsize_t(r >= 0 ? (Py_ssize_t)r + start : -1);
    return PyLong_FromLongLong(r);
}

static PyObject *call_slow(PyObject *slow, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    return PyObject_Vectorcall(slow, args, nargsf, kwnames);
}

/* ------------------------------------------------ find(haystack, needle, start=None, end=None) */

/* self: the tuple (kind, slow). */
static PyObject *fast_scan(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *slow = PyTuple_GET_ITEM(self, 1);
    if (_knhk_likely(kwnames == NULL && nargs >= 2 && nargs <= 4 && PyBytes_CheckExact(args[1]) &&
                     _knhk_simd_ready())) {
        scan sc = {(int)PyLong_AsLong(PyTuple_GET_ITEM(self, 0)), NULL, (const uint8_t *)PyBytes_AS_STRING(args[1]),
                   (size_t)PyBytes_GET_SIZE(args[1])};
        int slow_path;
        PyObject *r = run_scan(&sc, args[0], nargs > 2 ? args[2] : NULL, nargs > 3 ? args[3] : NULL, &slow_path);
        if (!slow_path) return r;
    }
    return call_slow(slow, args, (size_t)nargs, kwnames);
}

static PyMethodDef find_def = {
    "find", (PyCFunction)(void (*)(void))fast_scan, METH_FASTCALL | METH_KEYWORDS,
    "find($module, haystack, needle, start=None, end=None, /)\n--\n\n"
    "Lowest index of needle in haystack[start:end], or -1 (as bytes.find)."};
static PyMethodDef count_def = {
    "count", (PyCFunction)(void (*)(void))fast_scan, METH_FASTCALL | METH_KEYWORDS,
    "count($module, haystack, needle, start=None, end=None, /, *, overlapping=False)\n--\n\n"
    "Number of non-overlapping occurrences (as bytes.count); overlapping=True\n"
    "counts every match position. An empty needle counts len(slice) + 1."};

/* ------------------------------------------------ Needle.find / Needle.count */

/* self: the tuple (kind, capsule of the knhk_simd_needle *, owner, slow). */
static PyObject *needle_scan(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *slow = PyTuple_GET_ITEM(self, 3);
    if (_knhk_likely(kwnames == NULL && nargs >= 1 && nargs <= 3)) {
        const knhk_simd_needle *nd = PyCapsule_GetPointer(PyTuple_GET_ITEM(self, 1), NEEDLE_CAPSULE);
        if (_knhk_unlikely(nd == NULL)) return NULL;
        scan sc = {(int)PyLong_AsLong(PyTuple_GET_ITEM(self, 0)), nd, nd->bytes, nd->len};
        int slow_path;
        PyObject *r = run_scan(&sc, args[0], nargs > 1 ? args[1] : NULL, nargs > 2 ? args[2] : NULL, &slow_path);
        if (!slow_path) return r;
    }
    return call_slow(slow, args, (size_t)nargs, kwnames);
}

static PyMethodDef needle_find_def = {
    "find", (PyCFunction)(void (*)(void))needle_scan, METH_FASTCALL | METH_KEYWORDS,
    "find(haystack, start=None, end=None, /)\n--\n\n"
    "Lowest index of the needle in haystack[start:end], or -1 (as bytes.find)."};
static PyMethodDef needle_count_def = {
    "count", (PyCFunction)(void (*)(void))needle_scan, METH_FASTCALL | METH_KEYWORDS,
    "count(haystack, start=None, end=None, /, *, overlapping=False)\n--\n\n"
    "Non-overlapping occurrences (as bytes.count), or every match position\n"
    "with overlapping=True."};

/* ------------------------------------------------ factories */

static int kind_of(PyObject *obj) {
    long k = PyLong_Check(obj) ? PyLong_AsLong(obj) : -1;
    if (k == KIND_FIND || k == KIND_COUNT) return (int)k;
    PyErr_Clear();
    return -1;
}

static PyObject *make_fast(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    int kind = nargs == 2 ? kind_of(args[0]) : -1;
    if (kind < 0 || !PyCallable_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "_make_fast(kind: 0 (find) or 1 (count), slow: callable)");
        return NULL;
    }
    PyObject *self = PyTuple_Pack(2, args[0], args[1]);
    if (self == NULL) return NULL;
    PyObject *name = PyUnicode_FromString("knhk_memory.simd");
    PyObject *fn = name ? PyCFunction_NewEx(kind == KIND_FIND ? &find_def : &count_def, self, name) : NULL;
    Py_XDECREF(name);
    Py_DECREF(self);
    return fn;
}

static PyObject *make_needle_method(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    int kind = nargs == 4 ? kind_of(args[0]) : -1;
    if (kind < 0 || !PyLong_Check(args[1]) || !PyCallable_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "_make_needle_method(kind: 0 or 1, needle_address: int, owner, slow: callable)");
        return NULL;
    }
    void *nd = PyLong_AsVoidPtr(args[1]);
    if (nd == NULL) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "_make_needle_method: NULL needle");
        return NULL;
    }
    /* No destructor: the owner (which holds the needle and frees it) is kept
       alive by this tuple, so the pointer outlives every call. */
    PyObject *capsule = PyCapsule_New(nd, NEEDLE_CAPSULE, NULL);
    if (capsule == NULL) return NULL;
    PyObject *self = PyTuple_Pack(4, args[0], capsule, args[2], args[3]);
    Py_DECREF(capsule);
    if (self == NULL) return NULL;
    PyObject *fn = PyCFunction_New(kind == KIND_FIND ? &needle_find_def : &needle_count_def, self);
    Py_DECREF(self);
    return fn;
}

static PyMethodDef module_defs[] = {
    {"_make_fast", (PyCFunction)(void (*)(void))make_fast, METH_FASTCALL, "Make a fast find or count."},
    {"_make_needle_method", (PyCFunction)(void (*)(void))make_needle_method, METH_FASTCALL,
     "Make a fast Needle.find or Needle.count."},
};

int knhk_simd_py_install(void) {
    return _knhk_py_install("knhk_memory.simd", module_defs, sizeof module_defs / sizeof module_defs[0], "simd");
}
