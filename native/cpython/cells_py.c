/*
 * cells_py.c -- the read paths of once-cells and the pattern registry as C
 * (knhk_memory._fast).
 *
 * OnceBase is the C base of knhk_memory.once.OnceLock and Lazy: the cell's
 * value and its full flag are C fields (the Python layer writes them as the
 * members _value and _full, under its own lock), and get() is a C method: a
 * load, an incref, a return -- no Python frame. An empty cell's get() asks the
 * subclass's _get_slow (OnceLock: None; Lazy: compute the value once).
 *
 * LookupBase is the C base of knhk_memory.registry.PatternRegistry: its
 * mapping subscript finds an exact int key in the member _by_number (a dict,
 * filled on first use) without a Python frame, and hands every other key to
 * the subclass's _getitem_slow, which loads the table, finds names, or raises.
 */
#include "fast.h"

#include <structmember.h>

/* ---------------------------------------------------------------- OnceBase */

typedef struct {
    PyObject_HEAD PyObject *value;
    char full;
} OnceBase;

static int once_traverse(OnceBase *self, visitproc visit, void *arg) {
    Py_VISIT(self->value);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static int once_clear(OnceBase *self) {
    Py_CLEAR(self->value);
    return 0;
}

static void once_dealloc(OnceBase *self) {
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    once_clear(self);
    tp->tp_free((PyObject *)self);
}

static PyObject *once_get(OnceBase *self, PyObject *unused) {
    if (fast_likely(self->full)) {
        PyObject *v = self->value != NULL ? self->value : Py_None;
        Py_INCREF(v);
        return v;
    }
    return PyObject_CallMethod((PyObject *)self, "_get_slow", NULL);
}

static PyMethodDef once_methods[] = {
    {"get", (PyCFunction)once_get, METH_NOARGS,
     "get() -> the value. OnceLock: None while the cell is empty or being initialised, never blocks. "
     "Lazy: computes the value on the first call."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef once_members[] = {
    {"_value", T_OBJECT, offsetof(OnceBase, value), 0, "the cell's value (None while empty)"},
    {"_full", T_BOOL, offsetof(OnceBase, full), 0, "whether the value is published"},
    {NULL, 0, 0, 0, NULL},
};

PyTypeObject fast_OnceBase_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "knhk_memory._fast.OnceBase",
    .tp_basicsize = sizeof(OnceBase),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C base of OnceLock and Lazy: the value, the full flag and get().",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)once_dealloc,
    .tp_traverse = (traverseproc)once_traverse,
    .tp_clear = (inquiry)once_clear,
    .tp_methods = once_methods,
    .tp_members = once_members,
};

/* ---------------------------------------------------------------- LookupBase */

static PyObject *slow_name; /* "_getitem_slow", interned on first use (under the GIL) */

typedef struct {
    PyObject_HEAD PyObject *by_number; /* dict int -> value, or NULL/None before the first load */
} LookupBase;

static int lookup_traverse(LookupBase *self, visitproc visit, void *arg) {
    Py_VISIT(self->by_number);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static int lookup_clear(LookupBase *self) {
    Py_CLEAR(self->by_number);
    return 0;
}

static void lookup_dealloc(LookupBase *self) {
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    lookup_clear(self);
    tp->tp_free((PyObject *)self);
}

static PyObject *lookup_subscript(LookupBase *self, PyObject *key) {
    /* Exact int only: True and 2.0 hash like 1 and 2 and must not match. */
    if (fast_likely(PyLong_CheckExact(key) && self->by_number != NULL && PyDict_CheckExact(self->by_number))) {
        PyObject *v = PyDict_GetItemWithError(self->by_number, key); /* borrowed */
        if (fast_likely(v != NULL)) {
            Py_INCREF(v);
            return v;
        }
        if (PyErr_Occurred()) return NULL;
    }
    if (slow_name == NULL && (slow_name = PyUnicode_InternFromString("_getitem_slow")) == NULL) return NULL;
    return PyObject_CallMethodOneArg((PyObject *)self, slow_name, key);
}

static PyMappingMethods lookup_as_mapping = {.mp_subscript = (binaryfunc)lookup_subscript};

static PyMemberDef lookup_members[] = {
    {"_by_number", T_OBJECT, offsetof(LookupBase, by_number), 0, "the loaded index: number -> value"},
    {NULL, 0, 0, 0, NULL},
};

PyTypeObject fast_LookupBase_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "knhk_memory._fast.LookupBase",
    .tp_basicsize = sizeof(LookupBase),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C base of PatternRegistry: obj[number] from the _by_number dict, else _getitem_slow.",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)lookup_dealloc,
    .tp_traverse = (traverseproc)lookup_traverse,
    .tp_clear = (inquiry)lookup_clear,
    .tp_as_mapping = &lookup_as_mapping,
    .tp_members = lookup_members,
};
