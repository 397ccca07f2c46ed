/*
 * store_py.c -- the workflow store's lookup as a CPython builtin (knhk_memory._fast).
 *
 * Through cffi a get costs a foreign call, a GIL release and re-acquire and
 * an int conversion around a ~50 ns probe; as a METH_FASTCALL builtin it is
 * one vectorcall. The getter holds the GIL throughout (the probe is shorter
 * than a GIL hand-off), which also orders it against close(): detach_store_getter runs
 * under the GIL too, so a getter never sees a freed store.
 */
#include "fast.h"

#define CAPSULE_NAME "knhk_memory.store.getter"

typedef struct {
    knhk_store *store; /* NULL once detached */
    PyObject *view;    /* memoryview over the whole file */
    PyObject *slow;    /* slow(key, code, default): conversions, errors, closed store */
} getter_state;

static void state_free(PyObject *capsule) {
    getter_state *st = PyCapsule_GetPointer(capsule, CAPSULE_NAME);
    if (st == NULL) {
        PyErr_Clear();
        return;
    }
    Py_XDECREF(st->view);
    Py_XDECREF(st->slow);
    PyMem_Free(st);
}

static PyObject *call_slow(getter_state *st, PyObject *key, long long code, PyObject *dflt) {
    return PyObject_CallFunction(st->slow, "OLO", key, code, dflt);
}

/* The getter's self is the tuple (capsule, owner): a tuple, unlike a capsule,
   is followed by the cycle collector, so owner.get -> getter -> owner is a
   collectable cycle and a getter keeps its store alive. */
static inline getter_state *state_of(PyObject *self) {
    return PyCapsule_GetPointer(PyTuple_GET_ITEM(self, 0), CAPSULE_NAME);
}

static PyObject *fast_get(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    getter_state *st = state_of(self);
    if (fast_unlikely(st == NULL)) return NULL;
    if (fast_unlikely(nargs < 1 || nargs > 2)) {
        PyErr_Format(PyExc_TypeError, "get() takes a key and an optional default (%zd arguments given)", nargs);
        return NULL;
    }
    PyObject *key = args[0], *dflt = nargs == 2 ? args[1] : Py_None;
    const char *kp;
    Py_ssize_t kl;
    if (fast_likely(PyBytes_CheckExact(key))) {
        kp = PyBytes_AS_STRING(key);
        kl = PyBytes_GET_SIZE(key);
    } else if (PyUnicode_CheckExact(key)) {
        kp = PyUnicode_AsUTF8AndSize(key, &kl); /* cached on the str after the first call */
        if (kp == NULL) return NULL;
    } else {
        return call_slow(st, key, 0, dflt); /* bytearray, memoryview, or a TypeError */
    }
    if (fast_unlikely(st->store == NULL)) return call_slow(st, key, KNHK_STORE_BROKEN - 1, dflt);
    uint64_t off, len;
    int64_t r = knhk_store_lookup(st->store, kp, (size_t)kl, &off, &len);
    if (fast_likely(r == 0)) return PySequence_GetSlice(st->view, (Py_ssize_t)off, (Py_ssize_t)(off + len));
    if (r == KNHK_STORE_ABSENT) {
        Py_INCREF(dflt);
        return dflt;
    }
    return call_slow(st, key, r, dflt);
}

static PyMethodDef getter_def = {"get", (PyCFunction)(void (*)(void))fast_get, METH_FASTCALL,
                                 "get(key, default=None): the value of key as a read-only memoryview "
                                 "into the file, or default."};

PyObject *fast_store_make_getter(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyLong_Check(args[0]) || !PyMemoryView_Check(args[1]) || !PyCallable_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError,
                        "make_store_getter(handle_address: int, view: memoryview, slow: callable, owner)");
        return NULL;
    }
    void *handle = PyLong_AsVoidPtr(args[0]);
    if (handle == NULL) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "make_store_getter: NULL store handle");
        return NULL;
    }
    getter_state *st = PyMem_Calloc(1, sizeof *st);
    if (st == NULL) return PyErr_NoMemory();
    st->store = handle;
    Py_INCREF(args[1]);
    st->view = args[1];
    Py_INCREF(args[2]);
    st->slow = args[2];
    PyObject *capsule = PyCapsule_New(st, CAPSULE_NAME, state_free);
    if (capsule == NULL) {
        Py_DECREF(st->view);
        Py_DECREF(st->slow);
        PyMem_Free(st);
        return NULL;
    }
    PyObject *self = PyTuple_Pack(2, capsule, args[3]);
    Py_DECREF(capsule);
    if (self == NULL) return NULL;
    PyObject *fn = PyCFunction_New(&getter_def, self);
    Py_DECREF(self);
    return fn;
}

PyObject *fast_store_detach(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 1 || !PyCFunction_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "detach_store_getter(getter)");
        return NULL;
    }
    PyObject *self = PyCFunction_GET_SELF(args[0]);
    getter_state *st = self && PyTuple_CheckExact(self) && PyTuple_GET_SIZE(self) == 2 ? state_of(self) : NULL;
    if (st == NULL) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "detach_store_getter: not a store getter");
        return NULL;
    }
    st->store = NULL;
    Py_RETURN_NONE;
}
