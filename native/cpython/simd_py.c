/*
 * simd_py.c -- find and count, and the id scans, as CPython builtins (knhk_memory._fast).
 *
 * Through cffi a call costs ~350 ns here (argument conversion, a GIL release
 * and re-acquire, ffi.from_buffer for anything but bytes) around a scan that
 * takes ~10-50 ns on a few hundred bytes. As METH_FASTCALL builtins the
 * common calls -- bytes or any C-contiguous buffer, an exact bytes needle,
 * int or None bounds -- are one vectorcall. Everything else (str, an int
 * needle, keyword arguments, non-contiguous buffers, a refused SIMD level)
 * goes to the Python function given as `slow`, which converts or raises, so
 * the two paths cannot disagree on errors.
 *
 * The id scans (count_eq, find_eq, mask_eq, isin, histogram, reduce,
 * column_min/max/sum) get the same treatment: through cffi a call on a
 * 4096-element array cost 3.6-12.4 us (ffi.from_buffer, ffi.new, the GIL
 * round trip, find_eq's growth loop) around a kernel of 0.1-2.3 us. Here
 * the common call -- an exact numpy.ndarray of a native-order unsigned
 * dtype, C-contiguous, an exact int (or exact numpy integer) id in the
 * dtype's range -- is one vectorcall; the rest goes to the Python function.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
/* numpy's C API table is numpy_handler.c's (imported by fast_numpy_ready). */
#define PY_ARRAY_UNIQUE_SYMBOL fast_numpy_api
#define NO_IMPORT_ARRAY
#include <numpy/arrayobject.h>

#include "fast.h"

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
        Py_BEGIN_ALLOW_THREADS if (sc->kind == KIND_FIND) r =
            sc->nd ? sc->nd->find(sc->nd, p, n) : knhk_simd_find(p, n, sc->s, m);
        else r = (int64_t)(sc->nd ? knhk_simd_needle_count(sc->nd, p, n, 0) : knhk_simd_count(p, n, sc->s, m, 0));
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
    if (fast_likely(kwnames == NULL && nargs >= 2 && nargs <= 4 && PyBytes_CheckExact(args[1]) && knhk_simd_ready())) {
        scan sc = {(int)PyLong_AsLong(PyTuple_GET_ITEM(self, 0)), NULL, (const uint8_t *)PyBytes_AS_STRING(args[1]),
                   (size_t)PyBytes_GET_SIZE(args[1])};
        int slow_path;
        PyObject *r = run_scan(&sc, args[0], nargs > 2 ? args[2] : NULL, nargs > 3 ? args[3] : NULL, &slow_path);
        if (!slow_path) return r;
    }
    return call_slow(slow, args, (size_t)nargs, kwnames);
}

static PyMethodDef find_def = {"find", (PyCFunction)(void (*)(void))fast_scan, METH_FASTCALL | METH_KEYWORDS,
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
    if (fast_likely(kwnames == NULL && nargs >= 1 && nargs <= 3)) {
        const knhk_simd_needle *nd = PyCapsule_GetPointer(PyTuple_GET_ITEM(self, 1), NEEDLE_CAPSULE);
        if (fast_unlikely(nd == NULL)) return NULL;
        scan sc = {(int)PyLong_AsLong(PyTuple_GET_ITEM(self, 0)), nd, nd->bytes, nd->len};
        int slow_path;
        PyObject *r = run_scan(&sc, args[0], nargs > 1 ? args[1] : NULL, nargs > 2 ? args[2] : NULL, &slow_path);
        if (!slow_path) return r;
    }
    return call_slow(slow, args, (size_t)nargs, kwnames);
}

static PyMethodDef needle_find_def = {"find", (PyCFunction)(void (*)(void))needle_scan, METH_FASTCALL | METH_KEYWORDS,
                                      "find(haystack, start=None, end=None, /)\n--\n\n"
                                      "Lowest index of the needle in haystack[start:end], or -1 (as bytes.find)."};
static PyMethodDef needle_count_def = {"count", (PyCFunction)(void (*)(void))needle_scan, METH_FASTCALL | METH_KEYWORDS,
                                       "count(haystack, start=None, end=None, /, *, overlapping=False)\n--\n\n"
                                       "Non-overlapping occurrences (as bytes.count), or every match position\n"
                                       "with overlapping=True."};

/* ================================================================ id scans */

/* find_eq on more elements goes to the Python path (_collect: one pass, the
   output grown geometrically from 2^21 positions). */
#define FIND_EQ_FAST_MAX ((size_t)1 << 21)
/* find_eq gathers its first positions on the stack: a result of fewer is one
   exact allocation and a copy (the usual case: a batch of 4096 ids with 1/43
   matching has ~95). */
#define FIND_EQ_STACK 256
/* histogram with more bins (given, or max + 1) goes to the Python path, so a
   huge nbins fails there with numpy's own allocation error. */
#define HIST_FAST_MAX_BINS ((npy_intp)1 << 20)

/* An id column the kernels take as it is. */
typedef struct {
    PyArrayObject *arr;
    const void *p;
    size_t n;  /* elements */
    int width; /* bytes: 1, 2, 4 or 8 */
} idcol;

/* 1: obj is an exact numpy.ndarray of a native-byte-order unsigned integer
   dtype, C-contiguous (any shape); 0: the slow path (no exception set). The
   same arrays _ids() in simd.py passes to C. */
static inline int idcol_get(PyObject *obj, idcol *c) {
    if (!PyArray_CheckExact(obj)) return 0;
    PyArrayObject *arr = (PyArrayObject *)obj;
    const PyArray_Descr *d = PyArray_DESCR(arr);
    if (!PyTypeNum_ISUNSIGNED(d->type_num) || !PyArray_ISNBO(d->byteorder) || !PyArray_IS_C_CONTIGUOUS(arr) ||
        !PyArray_ISALIGNED(arr)) /* misaligned: the Python path refuses it */
        return 0;
    const npy_intp w = PyArray_ITEMSIZE(arr);
    if (w != 1 && w != 2 && w != 4 && w != 8) return 0;
    c->arr = arr;
    c->p = PyArray_DATA(arr);
    c->n = (size_t)PyArray_SIZE(arr);
    c->width = (int)w;
    return 1;
}

/* Scans of more bytes than GIL_RELEASE_BYTES run without the GIL; the array
   is referenced meanwhile, so ndarray.resize (refcheck) refuses to move it. */
#define IDS_SCAN(c, ...)                                               \
    do {                                                               \
        if ((c)->n * (size_t)(c)->width > (size_t)GIL_RELEASE_BYTES) { \
            Py_INCREF((c)->arr);                                       \
            Py_BEGIN_ALLOW_THREADS __VA_ARGS__;                        \
            Py_END_ALLOW_THREADS Py_DECREF((c)->arr);                  \
        } else {                                                       \
            __VA_ARGS__;                                               \
        }                                                              \
    } while (0)

enum { ID_SLOW = -1, ID_OUT = 0, ID_OK = 1 };

/* ID_OK: v is an exact int or an exact numpy integer scalar whose value is in
   [0, 2**(8 * width)), in *x. ID_OUT: such an id outside that range (it
   matches nothing). ID_SLOW: anything else -- bool, numpy.bool_, other
   types, subclasses, timedelta64 -- for the Python path. No exception set. */
static int id_get(PyObject *v, int width, uint64_t *x) {
    PyObject *num = NULL;
    if (!PyLong_CheckExact(v)) {
        if (!PyArray_IsScalar(v, Integer) || PyArray_IsScalar(v, Timedelta) || !PyArray_CheckAnyScalarExact(v))
            return ID_SLOW;
        num = PyNumber_Index(v); /* numpy's own __index__: operator.index's result */
        if (num == NULL) {
            PyErr_Clear();
            return ID_SLOW;
        }
        v = num;
    }
    int overflow, r = ID_OUT;
    const long long y = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow == 0 && y >= 0) {
        if (width == 8 || ((unsigned long long)y >> (8 * width)) == 0) {
            *x = (uint64_t)y;
            r = ID_OK;
        }
    } else if (overflow > 0 && width == 8) { /* [2**63, 2**64) fits uint64 */
        const unsigned long long u = PyLong_AsUnsignedLongLong(v);
        if (u != (unsigned long long)-1 || !PyErr_Occurred()) {
            *x = u;
            r = ID_OK;
        } else {
            PyErr_Clear(); /* OverflowError: >= 2**64, out of range */
        }
    }
    if (fast_unlikely(PyErr_Occurred())) { /* never for an int; so that no error can leak */
        PyErr_Clear();
        r = ID_SLOW;
    }
    Py_XDECREF(num);
    return r;
}

#define SLOW_OF(self) PyTuple_GET_ITEM(self, 0)

/* The common (a, v) call: 1 with the column and the id, 0 for the slow path. */
static inline int ids_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, idcol *c, uint64_t *v) {
    return kwnames == NULL && nargs == 2 && idcol_get(args[0], c) && id_get(args[1], c->width, v) == ID_OK &&
           knhk_simd_ready();
}

/* self of every id builtin: the tuple (slow, result_type or None). */
static PyObject *ids_count_eq(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    idcol c;
    uint64_t v, count = 0;
    if (fast_likely(ids_args(args, nargs, kwnames, &c, &v))) {
        IDS_SCAN(&c, knhk_simd_count_eq(c.p, c.n, c.width, v, &count));
        return PyLong_FromUnsignedLongLong(count);
    }
    return call_slow(SLOW_OF(self), args, (size_t)nargs, kwnames);
}

static PyObject *int64_array(npy_intp n) { return PyArray_SimpleNew(1, &n, NPY_INT64); }

static PyObject *ids_find_eq(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    idcol c;
    uint64_t v;
    if (fast_likely(ids_args(args, nargs, kwnames, &c, &v) && c.n <= FIND_EQ_FAST_MAX)) {
        int64_t first[FIND_EQ_STACK];
        size_t k = 0, next = 0;
        IDS_SCAN(&c, knhk_simd_find_eq(c.p, c.n, c.width, v, 0, first, FIND_EQ_STACK, &k, &next));
        if (k < FIND_EQ_STACK) { /* complete: the result is exactly k positions */
            PyObject *out = int64_array((npy_intp)k);
            if (out != NULL && k) memcpy(PyArray_DATA((PyArrayObject *)out), first, k * sizeof *first);
            return out;
        }
        /* More: room for every element not yet scanned, so the rest is one
           call (one pass in all), then shrunk in place (realloc) to the
           count, as _collect does: the result owns exactly its memory. */
        const npy_intp cap = (npy_intp)(FIND_EQ_STACK + (c.n - next));
        PyObject *out = int64_array(cap);
        if (out == NULL) return NULL;
        int64_t *o = PyArray_DATA((PyArrayObject *)out);
        memcpy(o, first, sizeof first);
        size_t more = 0;
        IDS_SCAN(&c, knhk_simd_find_eq(c.p, c.n, c.width, v, next, o + FIND_EQ_STACK, (size_t)cap - FIND_EQ_STACK,
                                       &more, NULL));
        npy_intp total = (npy_intp)(FIND_EQ_STACK + more);
        if (total < cap) {
            PyArray_Dims shape = {&total, 1};
            PyObject *none = PyArray_Resize((PyArrayObject *)out, &shape, 0, NPY_CORDER);
            if (none == NULL) {
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(none);
        }
        return out;
    }
    return call_slow(SLOW_OF(self), args, (size_t)nargs, kwnames);
}

static PyObject *ids_mask_eq(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    idcol c;
    uint64_t v;
    if (fast_likely(ids_args(args, nargs, kwnames, &c, &v))) {
        PyObject *out = PyArray_SimpleNew(PyArray_NDIM(c.arr), PyArray_DIMS(c.arr), NPY_BOOL);
        if (out != NULL && c.n) {
            uint8_t *o = PyArray_DATA((PyArrayObject *)out);
            IDS_SCAN(&c, knhk_simd_mask_eq(c.p, c.n, c.width, v, o));
        }
        return out;
    }
    return call_slow(SLOW_OF(self), args, (size_t)nargs, kwnames);
}

/* isin(a, ids) with ids an exact list or tuple of at most KNHK_SIMD_ISIN_MAX
   ids, each an exact int or numpy integer (out-of-range ones are left out, as
   the Python path does). */
static PyObject *ids_isin(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    idcol c;
    if (fast_likely(kwnames == NULL && nargs == 2 && (PyList_CheckExact(args[1]) || PyTuple_CheckExact(args[1])) &&
                    PySequence_Fast_GET_SIZE(args[1]) <= KNHK_SIMD_ISIN_MAX && idcol_get(args[0], &c) &&
                    knhk_simd_ready())) {
        uint64_t set[KNHK_SIMD_ISIN_MAX];
        size_t k = 0;
        const Py_ssize_t m = PySequence_Fast_GET_SIZE(args[1]);
        PyObject **items = PySequence_Fast_ITEMS(args[1]);
        int ok = 1;
        for (Py_ssize_t i = 0; i < m && ok; i++) {
            uint64_t x;
            const int r = id_get(items[i], c.width, &x);
            if (r == ID_SLOW) {
                ok = 0;
            } else if (r == ID_OK) { /* insert into the sorted set, once */
                size_t j = k;
                while (j > 0 && set[j - 1] > x) j--;
                if (j > 0 && set[j - 1] == x) continue;
                memmove(set + j + 1, set + j, (k - j) * sizeof *set);
                set[j] = x;
                k++;
            }
        }
        if (ok) {
            if (k == 0) return PyArray_ZEROS(PyArray_NDIM(c.arr), PyArray_DIMS(c.arr), NPY_BOOL, 0);
            PyObject *out = PyArray_SimpleNew(PyArray_NDIM(c.arr), PyArray_DIMS(c.arr), NPY_BOOL);
            if (out != NULL && c.n) {
                uint8_t *o = PyArray_DATA((PyArrayObject *)out);
                IDS_SCAN(&c, knhk_simd_isin(c.p, c.n, c.width, set, k, o));
            }
            return out;
        }
    }
    return call_slow(SLOW_OF(self), args, (size_t)nargs, kwnames);
}

static inline int str_is(PyObject *s, const char *ascii) { return PyUnicode_CompareWithASCIIString(s, ascii) == 0; }

/* histogram(a, nbins=None, *, out_of_range="raise"): nbins an exact int in
   [1, HIST_FAST_MAX_BINS] or None (max + 1), given by position or keyword;
   out_of_range exactly the str "raise" or "ignore". Ids >= nbins with
   "raise" go to the Python path, which raises with their largest. */
static PyObject *ids_histogram(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    idcol c;
    PyObject *nbins_obj = nargs > 1 ? args[1] : NULL, *oor_obj = NULL;
    int ok = nargs >= 1 && nargs <= 2 && idcol_get(args[0], &c) && knhk_simd_ready();
    if (ok && kwnames != NULL) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(kwnames) && ok; i++) {
            PyObject *key = PyTuple_GET_ITEM(kwnames, i);
            if (nbins_obj == NULL && str_is(key, "nbins"))
                nbins_obj = args[nargs + i];
            else if (oor_obj == NULL && str_is(key, "out_of_range"))
                oor_obj = args[nargs + i];
            else
                ok = 0; /* unknown or repeated: the Python path's TypeError */
        }
    }
    int raise = 1;
    if (ok && oor_obj != NULL) {
        if (!PyUnicode_CheckExact(oor_obj))
            ok = 0;
        else if (str_is(oor_obj, "ignore"))
            raise = 0;
        else if (!str_is(oor_obj, "raise"))
            ok = 0;
    }
    npy_intp nbins = 0;
    if (ok) {
        if (nbins_obj == NULL || nbins_obj == Py_None) {
            if (c.n == 0) {
                nbins = 0;
                return PyArray_ZEROS(1, &nbins, NPY_INT64, 0);
            }
            knhk_simd_reduction r;
            IDS_SCAN(&c, knhk_simd_reduce(c.p, c.n, c.width, &r));
            if (r.max < (uint64_t)HIST_FAST_MAX_BINS)
                nbins = (npy_intp)r.max + 1;
            else
                ok = 0;
        } else if (PyLong_CheckExact(nbins_obj)) {
            int overflow;
            const long long b = PyLong_AsLongLongAndOverflow(nbins_obj, &overflow);
            if (overflow == 0 && b >= 1 && b <= (long long)HIST_FAST_MAX_BINS)
                nbins = (npy_intp)b;
            else
                ok = 0;
        } else {
            ok = 0;
        }
    }
    if (ok) {
        PyObject *out = int64_array(nbins);
        if (out == NULL) return NULL;
        uint64_t *counts = PyArray_DATA((PyArrayObject *)out), bad = 0;
        IDS_SCAN(&c, knhk_simd_histogram(c.p, c.n, c.width, counts, (size_t)nbins, &bad));
        if (bad == 0 || !raise) return out;
        Py_DECREF(out); /* the Python path raises, naming the largest id */
    }
    return call_slow(SLOW_OF(self), args, (size_t)nargs, kwnames);
}

enum { RED_TUPLE, RED_MIN, RED_MAX, RED_SUM };

/* The Reduction (a tuple subclass with no fields of its own: a NamedTuple)
   made as tuple.__new__ makes it -- tp_alloc, then the items -- without the
   Python-level __new__. */
static PyObject *reduction_new(PyTypeObject *cls, const knhk_simd_reduction *r) {
    PyObject *lo = PyLong_FromUnsignedLongLong(r->min);
    PyObject *hi = PyLong_FromUnsignedLongLong(r->max);
    PyObject *sum = PyLong_FromUnsignedLongLong(r->sum);
    PyObject *t = lo && hi && sum ? cls->tp_alloc(cls, 3) : NULL;
    if (t == NULL) {
        Py_XDECREF(lo);
        Py_XDECREF(hi);
        Py_XDECREF(sum);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, lo);
    PyTuple_SET_ITEM(t, 1, hi);
    PyTuple_SET_ITEM(t, 2, sum);
    return t;
}

static PyObject *ids_reduction(int what, PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    idcol c;
    if (fast_likely(kwnames == NULL && nargs == 1 && idcol_get(args[0], &c) && knhk_simd_ready())) {
        if (c.n == 0 && what == RED_SUM) return PyLong_FromLong(0);
        if (c.n > 0) { /* empty: the Python path raises */
            knhk_simd_reduction r;
            IDS_SCAN(&c, knhk_simd_reduce(c.p, c.n, c.width, &r));
            switch (what) {
            case RED_MIN: return PyLong_FromUnsignedLongLong(r.min);
            case RED_MAX: return PyLong_FromUnsignedLongLong(r.max);
            case RED_SUM: return PyLong_FromUnsignedLongLong(r.sum);
            default: return reduction_new((PyTypeObject *)PyTuple_GET_ITEM(self, 1), &r);
            }
        }
    }
    return call_slow(SLOW_OF(self), args, (size_t)nargs, kwnames);
}

static PyObject *ids_reduce(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    return ids_reduction(RED_TUPLE, self, args, nargs, kwnames);
}
static PyObject *ids_column_min(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    return ids_reduction(RED_MIN, self, args, nargs, kwnames);
}
static PyObject *ids_column_max(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    return ids_reduction(RED_MAX, self, args, nargs, kwnames);
}
static PyObject *ids_column_sum(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    return ids_reduction(RED_SUM, self, args, nargs, kwnames);
}

/* The docstrings are the Python functions' (tests/test_simd_fast_ids.py
   checks that they stay equal). */
#define IDS_DEF(name, sig, doc)                                                     \
    {#name, (PyCFunction)(void (*)(void))ids_##name, METH_FASTCALL | METH_KEYWORDS, \
     #name "($module, " sig ")\n--\n\n" doc}
static PyMethodDef ids_defs[] = {
    IDS_DEF(count_eq, "a, v",
            "``numpy.count_nonzero(a == v)`` in one pass. An id outside the dtype's\n"
            "range matches nothing (as numpy compares it)."),
    IDS_DEF(find_eq, "a, v", "``numpy.flatnonzero(a == v)``: flat (C-order) indices as int64, one pass."),
    IDS_DEF(mask_eq, "a, v", "``a == v`` as a bool array of ``a``'s shape."),
    IDS_DEF(isin, "a, ids",
            "``numpy.isin(a, ids)`` for a small set (at most ``KNHK_SIMD_ISIN_MAX`` =\n"
            "256 distinct ids in the dtype's range; ids outside it match nothing)."),
    IDS_DEF(histogram, "a, nbins=None, *, out_of_range='raise'",
            "Counts per id (``numpy.bincount(a, minlength=nbins)``), int64, length ``nbins``.\n\n"
            "``nbins=None`` means ``max(a) + 1`` (0 bins for an empty array), as bincount.\n"
            "Ids ``>= nbins``: ``out_of_range=\"raise\"`` (default) raises\n"
            ":class:`SimdValueError` saying how many and the largest; ``\"ignore\"``\n"
            "leaves them out of the counts."),
    IDS_DEF(reduce, "a",
            "min, max and sum of ``a`` in one pass. An empty array raises\n"
            ":class:`SimdValueError` (as ``numpy.min`` does); use :func:`column_sum` for 0."),
    IDS_DEF(column_min, "a", "``int(a.min())``; an empty array raises :class:`SimdValueError`."),
    IDS_DEF(column_max, "a", "``int(a.max())``; an empty array raises :class:`SimdValueError`."),
    IDS_DEF(column_sum, "a", "``int(a.sum(dtype=numpy.uint64))``: the sum modulo 2**64; 0 for an empty array."),
};
#define IDS_COUNT (sizeof ids_defs / sizeof ids_defs[0])

/* make_id_scan(name, slow, result_type=None): the builtin `name` (one of
   ids_defs) falling back to slow; reduce needs result_type, its Reduction. */
PyObject *fast_simd_make_ids_fast(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    /* The id scans use numpy's C API: import it before any of them exists. */
    if (fast_numpy_ready() < 0) return NULL;
    const PyMethodDef *def = NULL;
    if (nargs >= 2 && nargs <= 3 && PyUnicode_Check(args[0]) && PyCallable_Check(args[1])) {
        for (size_t i = 0; i < IDS_COUNT && def == NULL; i++)
            if (str_is(args[0], ids_defs[i].ml_name)) def = &ids_defs[i];
    }
    PyObject *extra = nargs == 3 ? args[2] : Py_None;
    const int needs_type = def != NULL && def->ml_meth == (PyCFunction)(void (*)(void))ids_reduce;
    /* tp_alloc + items is tuple.__new__ only for a subclass that adds no fields. */
    if (def == NULL || (needs_type && !(PyType_Check(extra) && PyType_IsSubtype((PyTypeObject *)extra, &PyTuple_Type) &&
                                        ((PyTypeObject *)extra)->tp_basicsize == PyTuple_Type.tp_basicsize &&
                                        ((PyTypeObject *)extra)->tp_dictoffset == 0))) {
        PyErr_SetString(PyExc_TypeError,
                        "make_id_scan(name: count_eq, find_eq, mask_eq, isin, histogram, reduce, column_min, "
                        "column_max or column_sum, slow: callable, result_type: for reduce, a NamedTuple class)");
        return NULL;
    }
    PyObject *self = PyTuple_Pack(2, args[1], extra);
    if (self == NULL) return NULL;
    PyObject *name = PyUnicode_FromString("knhk_memory.simd");
    PyObject *fn = name ? PyCFunction_NewEx((PyMethodDef *)def, self, name) : NULL;
    Py_XDECREF(name);
    Py_DECREF(self);
    return fn;
}

/* ------------------------------------------------ factories */

static int kind_of(PyObject *obj) {
    long k = PyLong_Check(obj) ? PyLong_AsLong(obj) : -1;
    if (k == KIND_FIND || k == KIND_COUNT) return (int)k;
    PyErr_Clear();
    return -1;
}

PyObject *fast_simd_make_fast(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    int kind = nargs == 2 ? kind_of(args[0]) : -1;
    if (kind < 0 || !PyCallable_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "make_scan(kind: 0 (find) or 1 (count), slow: callable)");
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

PyObject *fast_simd_make_needle_method(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    int kind = nargs == 4 ? kind_of(args[0]) : -1;
    if (kind < 0 || !PyLong_Check(args[1]) || !PyCallable_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "make_needle_method(kind: 0 or 1, needle_address: int, owner, slow: callable)");
        return NULL;
    }
    void *nd = PyLong_AsVoidPtr(args[1]);
    if (nd == NULL) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "make_needle_method: NULL needle");
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
