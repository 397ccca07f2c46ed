/*
 * metrics_py.c -- a bound counter child's add and a bound histogram child's
 * observe as CPython builtins (knhk_memory._fast), as counters_py.c does
 * for Counters.add.
 *
 * A child of a labelled family is bound to its cells once (labels() looks
 * the label set up or inserts it); from then on child.add(n) is one
 * vectorcall and one knhk_counters_add on the family's first cell, with the
 * GIL held. The common call -- no argument, or one exact int in 0..2**63-1
 * -- takes that path; anything else (a float, a negative n, a closed block,
 * a status from the core) goes to the Python method given as `slow`, which
 * converts or raises, so the two paths cannot disagree on errors.
 *
 * observe(value) takes an exact float or int: finite, with value/resolution
 * in int64 range; the bucket is found by binary search over the family's
 * bounds (copied into the builtin's state), then two adds.
 *
 * One state capsule per metrics block holds the embedded counter block's
 * handle; detach_metrics clears it when the block closes (under the GIL),
 * and every builtin made from it then takes its slow path.
 */
#include "fast.h"

#include <math.h>

#define STATE_CAPSULE "knhk_memory._fast.metrics"
#define BOUNDS_CAPSULE "knhk_memory._fast.metrics_bounds"

typedef struct {
    knhk_counters *h; /* NULL once detached */
} metrics_state;

typedef struct {
    uint32_t n;
    double resolution; /* sum units: value / resolution, rounded */
    double bounds[];
} bounds_state;

static void state_free(PyObject *capsule) {
    void *st = PyCapsule_GetPointer(capsule, STATE_CAPSULE);
    if (st == NULL) PyErr_Clear();
    PyMem_Free(st);
}

static void bounds_free(PyObject *capsule) {
    void *b = PyCapsule_GetPointer(capsule, BOUNDS_CAPSULE);
    if (b == NULL) PyErr_Clear();
    PyMem_Free(b);
}

/* metrics_state(counters_handle_address) -> state */
PyObject *fast_metrics_state(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "metrics_state(counters_handle_address)");
        return NULL;
    }
    knhk_counters *h = fast_address(args[0], "metrics_state");
    if (h == NULL) return NULL;
    metrics_state *st = PyMem_Calloc(1, sizeof *st);
    if (st == NULL) return PyErr_NoMemory();
    st->h = h;
    PyObject *capsule = PyCapsule_New(st, STATE_CAPSULE, state_free);
    if (capsule == NULL) PyMem_Free(st);
    return capsule;
}

/* detach_metrics(state) */
PyObject *fast_metrics_detach(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 1 || !PyCapsule_IsValid(args[0], STATE_CAPSULE)) {
        PyErr_SetString(PyExc_TypeError, "detach_metrics(state)");
        return NULL;
    }
    metrics_state *st = PyCapsule_GetPointer(args[0], STATE_CAPSULE);
    st->h = NULL;
    Py_RETURN_NONE;
}

static PyObject *call_slow(PyObject *slow, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    return PyObject_Vectorcall(slow, args, (size_t)nargs, kwnames);
}

/* child.add: self = (state, cell: int, slow) */
static PyObject *child_add(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *slow = PyTuple_GET_ITEM(self, 2);
    if (fast_unlikely(kwnames != NULL || nargs > 1)) return call_slow(slow, args, nargs, kwnames);
    metrics_state *st = PyCapsule_GetPointer(PyTuple_GET_ITEM(self, 0), STATE_CAPSULE);
    if (fast_unlikely(st == NULL)) return NULL;
    int64_t n = 1;
    if (nargs == 1) {
        if (fast_unlikely(!PyLong_CheckExact(args[0]))) return call_slow(slow, args, nargs, NULL);
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(args[0], &overflow);
        if (fast_unlikely(overflow || v < 0)) {
            PyErr_Clear();
            return call_slow(slow, args, nargs, NULL);
        }
        n = (int64_t)v;
    }
    if (fast_unlikely(st->h == NULL)) return call_slow(slow, args, nargs, NULL);
    uint32_t cell = (uint32_t)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(self, 1));
    if (fast_unlikely(knhk_counters_add(st->h, cell, n) != KNHK_OK)) return call_slow(slow, args, nargs, NULL);
    Py_RETURN_NONE;
}

/* child.observe: self = (state, cell: int, bounds capsule, slow) */
static PyObject *child_observe(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *slow = PyTuple_GET_ITEM(self, 3);
    if (fast_unlikely(kwnames != NULL || nargs != 1)) return call_slow(slow, args, nargs, kwnames);
    metrics_state *st = PyCapsule_GetPointer(PyTuple_GET_ITEM(self, 0), STATE_CAPSULE);
    bounds_state *b = PyCapsule_GetPointer(PyTuple_GET_ITEM(self, 2), BOUNDS_CAPSULE);
    if (fast_unlikely(st == NULL || b == NULL)) return NULL;
    double v;
    if (PyFloat_CheckExact(args[0])) {
        v = PyFloat_AS_DOUBLE(args[0]);
    } else if (PyLong_CheckExact(args[0])) {
        int overflow;
        long long i = PyLong_AsLongLongAndOverflow(args[0], &overflow);
        if (overflow || (i == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return call_slow(slow, args, nargs, NULL);
        }
        v = (double)i;
    } else {
        return call_slow(slow, args, nargs, NULL);
    }
    double units = nearbyint(v / b->resolution);
    /* finite and in int64 range (NaN fails both compares) */
    if (fast_unlikely(!(units > -9.2e18 && units < 9.2e18)) || st->h == NULL) return call_slow(slow, args, nargs, NULL);
    uint32_t cell = (uint32_t)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(self, 1));
    if (fast_unlikely(knhk_metrics_observe(st->h, cell, b->bounds, b->n, v, (int64_t)units) != KNHK_OK))
        return call_slow(slow, args, nargs, NULL);
    Py_RETURN_NONE;
}

static PyMethodDef add_def = {"add", (PyCFunction)(void (*)(void))child_add, METH_FASTCALL | METH_KEYWORDS,
                              "add(n=1): add n (an int >= 0) to this label set's counter."};
static PyMethodDef observe_def = {"observe", (PyCFunction)(void (*)(void))child_observe, METH_FASTCALL | METH_KEYWORDS,
                                  "observe(value): record one observation (a finite number) in this label set's "
                                  "histogram."};

/* metrics_method(kind, state, cell, slow[, bounds: tuple of float, resolution: float]) -> builtin:
   kind 0 child.add, 1 child.observe (bounds sorted, finite: the caller checked). */
PyObject *fast_metrics_method(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    long kind = nargs >= 4 && PyLong_CheckExact(args[0]) ? PyLong_AsLong(args[0]) : -1;
    if (kind < 0 || kind > 1 || nargs != (kind == 1 ? 6 : 4) || !PyCapsule_IsValid(args[1], STATE_CAPSULE) ||
        !PyLong_CheckExact(args[2]) || !PyCallable_Check(args[3]) ||
        (kind == 1 && (!PyTuple_Check(args[4]) || !PyFloat_Check(args[5])))) {
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError, "metrics_method(kind: 0 add or 1 observe, state, cell: int, slow: callable"
                                         "[, bounds: tuple, resolution: float for kind 1])");
        return NULL;
    }
    unsigned long cell = PyLong_AsUnsignedLong(args[2]);
    if (cell == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    if (cell > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "metrics_method: cell out of range");
        return NULL;
    }
    PyObject *self;
    if (kind == 1) {
        Py_ssize_t n = PyTuple_GET_SIZE(args[4]);
        if (n > 65536) {
            PyErr_SetString(PyExc_ValueError, "metrics_method: too many bounds");
            return NULL;
        }
        bounds_state *b = PyMem_Malloc(sizeof *b + (size_t)n * sizeof(double));
        if (b == NULL) return PyErr_NoMemory();
        b->n = (uint32_t)n;
        b->resolution = PyFloat_AsDouble(args[5]);
        for (Py_ssize_t i = 0; i < n; i++) {
            b->bounds[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(args[4], i));
            if (b->bounds[i] == -1.0 && PyErr_Occurred()) {
                PyMem_Free(b);
                return NULL;
            }
        }
        if (!(b->resolution > 0) || !isfinite(b->resolution)) {
            PyMem_Free(b);
            PyErr_SetString(PyExc_ValueError, "metrics_method: resolution must be a positive finite float");
            return NULL;
        }
        PyObject *bc = PyCapsule_New(b, BOUNDS_CAPSULE, bounds_free);
        if (bc == NULL) {
            PyMem_Free(b);
            return NULL;
        }
        self = PyTuple_Pack(4, args[1], args[2], bc, args[3]);
        Py_DECREF(bc);
    } else {
        self = PyTuple_Pack(3, args[1], args[2], args[3]);
    }
    if (self == NULL) return NULL;
    PyObject *fn = PyCFunction_New(kind == 0 ? &add_def : &observe_def, self);
    Py_DECREF(self);
    return fn;
}
