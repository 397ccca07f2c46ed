/*
 * store_py.c -- the workflow store's read paths as C (knhk_memory._fast).
 *
 * StoreBase is the C base of knhk_memory.store.WorkflowStore. Through cffi a
 * get costs a foreign call, a GIL release and re-acquire and an int
 * conversion around a ~50 ns probe; here get, get_bytes, store[key] and
 * `key in store` are C methods and slots: one vectorcall, the probe with the
 * GIL held (it is shorter than a GIL hand-off), the value a memoryview made
 * straight from the store's own view (no slice object).
 *
 * Lifetime (issue 22): the open file is a Python object, the generation
 * (store.py's _Open: the knhk_store handle, the cffi buffer over the mapping,
 * the mapping), which frees all three when its last reference goes. StoreBase
 * holds one reference; every read takes its own for the length of the read
 * (these methods under the GIL, the Python paths that release the GIL in a
 * local variable), and close()/reopen() only drop StoreBase's. So a close
 * from another thread never frees a mapping under a reader: the reader
 * finishes on the generation it started with, and its next call sees the
 * store closed (StoreClosedError) or reopened.
 *
 * Anything but the common case -- a compressed or closed store, a key that
 * is neither str nor bytes, a missing key for [] and get_bytes (aliases,
 * messages), a changed or damaged file, a value too large to copy with the
 * GIL held -- goes to the subclass's Python method (_get_slow,
 * _getitem_slow, _get_bytes_slow, _contains_slow), so every message has one
 * source.
 */
#include "fast.h"

#include <structmember.h>

/* get_bytes copies values up to this size with the GIL held; larger ones go to
   the Python path, which releases it for the copy. */
#define COPY_WITH_GIL_MAX (1 << 20)

typedef struct {
    PyObject_HEAD knhk_store *store; /* the generation's handle; NULL: closed or compressed */
    PyObject *view;                   /* memoryview over the whole file (the generation's) */
    PyObject *gen;                    /* the generation: owns store and the mapping */
} StoreBase;

/* The subclass's Python paths, by the C method that falls back to them. */
enum { SLOW_GET, SLOW_GETITEM, SLOW_GET_BYTES, SLOW_CONTAINS, SLOW_N };
static const char *const slow_names[SLOW_N] = {"_get_slow", "_getitem_slow", "_get_bytes_slow", "_contains_slow"};
static PyObject *slow_interned[SLOW_N]; /* interned on first use, under the GIL */

static int sb_traverse(StoreBase *self, visitproc visit, void *arg) {
    Py_VISIT(self->view);
    Py_VISIT(self->gen);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static int sb_clear(StoreBase *self) {
    self->store = NULL;
    Py_CLEAR(self->view);
    Py_CLEAR(self->gen);
    return 0;
}

static void sb_dealloc(StoreBase *self) {
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    sb_clear(self);
    tp->tp_free((PyObject *)self);
}

/* The key's bytes without a copy: exact bytes, or exact str (its UTF-8 form,
   which CPython keeps on the str; ASCII strs are their own UTF-8). 1, 0 for
   any other type and for a str with no UTF-8 form (a lone surrogate: the slow
   path converts or refuses it, with the store's message), -1 with another
   error set (no memory). */
static inline int key_span(PyObject *key, const char **kp, Py_ssize_t *kl) {
    if (fast_likely(PyUnicode_CheckExact(key))) {
        if (fast_likely(PyUnicode_IS_COMPACT_ASCII(key))) { /* its characters are its UTF-8 */
            *kp = (const char *)PyUnicode_DATA(key);
            *kl = PyUnicode_GET_LENGTH(key);
            return 1;
        }
        *kp = PyUnicode_AsUTF8AndSize(key, kl);
        if (fast_likely(*kp != NULL)) return 1;
        if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) return -1;
        PyErr_Clear();
        return 0;
    }
    if (PyBytes_CheckExact(key)) {
        *kp = PyBytes_AS_STRING(key);
        *kl = PyBytes_GET_SIZE(key);
        return 1;
    }
    return 0;
}

/* view[off:off + len] as a new memoryview: the same managed buffer as the
   store's view (so the mapping lives while it does), with its span narrowed.
   What memoryview slicing does, less the slice object and its parsing. */
static inline PyObject *view_span(PyObject *view, uint64_t off, uint64_t len) {
    /* Allocating the new view may run the cycle collector, and a finalizer may close
       the store and drop its view: hold it until the new one is made. */
    Py_INCREF(view);
    PyObject *mv = PyMemoryView_FromObject(view); /* registers with view's managed buffer */
    Py_DECREF(view);
    if (fast_unlikely(mv == NULL)) return NULL;
    Py_buffer *b = PyMemoryView_GET_BUFFER(mv);
    if (fast_unlikely(b->ndim != 1 || b->itemsize != 1 || b->shape == NULL || (uint64_t)b->len < off ||
                      (uint64_t)b->len - off < len)) {
        Py_DECREF(mv);
        return PySequence_GetSlice(view, (Py_ssize_t)off, (Py_ssize_t)(off + len));
    }
    b->buf = (char *)b->buf + off;
    b->len = (Py_ssize_t)len;
    b->shape[0] = (Py_ssize_t)len;
    return mv;
}

/* One probe: 0 with the span, KNHK_STORE_ABSENT, another negative store code,
   or 1 when the fast path does not apply (closed, compressed, key type);
   PROBE_PY_ERROR with a Python error set. */
#define PROBE_PY_ERROR (-1000000)
static inline int64_t probe(StoreBase *self, PyObject *key, uint64_t *off, uint64_t *len) {
    if (fast_unlikely(self->store == NULL)) return 1;
    const char *kp;
    Py_ssize_t kl;
    int k = key_span(key, &kp, &kl);
    if (fast_unlikely(k <= 0)) return k == 0 ? 1 : PROBE_PY_ERROR;
    return knhk_store_lookup(self->store, kp, (size_t)kl, off, len);
}

/* self._<which>_slow(*args, **kwnames), one vectorcall. */
static PyObject *call_slow_kw(StoreBase *self, int which, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *name = slow_interned[which];
    if (fast_unlikely(name == NULL)) {
        name = PyUnicode_InternFromString(slow_names[which]);
        if (name == NULL) return NULL;
        slow_interned[which] = name;
    }
    Py_ssize_t n = nargs + (kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0);
    PyObject *small[5], **argv = small;
    if (n + 1 > 5 && (argv = PyMem_Malloc((size_t)(n + 1) * sizeof *argv)) == NULL) return PyErr_NoMemory();
    argv[0] = (PyObject *)self;
    for (Py_ssize_t i = 0; i < n; i++) argv[i + 1] = args[i];
    PyObject *r = PyObject_VectorcallMethod(name, argv, (size_t)(nargs + 1), kwnames);
    if (argv != small) PyMem_Free(argv);
    return r;
}

static inline PyObject *call_slow(StoreBase *self, int which, PyObject *const *args, Py_ssize_t nargs) {
    return call_slow_kw(self, which, args, nargs, NULL);
}

static PyObject *sb_get(StoreBase *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    /* Keywords and wrong arities: the Python path, for its signature's messages. */
    if (fast_unlikely(nargs < 1 || nargs > 2 || kwnames != NULL))
        return call_slow_kw(self, SLOW_GET, args, nargs, kwnames);
    uint64_t off, len;
    int64_t r = probe(self, args[0], &off, &len);
    if (fast_likely(r == 0)) return view_span(self->view, off, len);
    if (r == KNHK_STORE_ABSENT) {
        PyObject *d = nargs == 2 ? args[1] : Py_None;
        Py_INCREF(d);
        return d;
    }
    if (r == PROBE_PY_ERROR) return NULL;
    return call_slow(self, SLOW_GET, args, nargs);
}

static PyObject *sb_get_bytes(StoreBase *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    if (fast_unlikely(nargs < 1 || nargs > 2 || kwnames != NULL))
        return call_slow_kw(self, SLOW_GET_BYTES, args, nargs, kwnames);
    uint64_t off, len;
    int64_t r = probe(self, args[0], &off, &len);
    if (r == PROBE_PY_ERROR) return NULL;
    if (fast_likely(r == 0 && len <= COPY_WITH_GIL_MAX)) {
        /* The copy is taken under the SIGBUS guard and the header re-read after it
           (knhk_store_copy): the value of one version of the file, or the slow path
           raises StoreChangedError. The bytes object is not tracked by the cycle
           collector, so allocating it runs no Python code: self->store is still
           this generation's. */
        knhk_store *store = self->store;
        PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)len);
        if (out == NULL) return NULL;
        if (fast_likely(knhk_store_copy(store, off, len, (uint8_t *)PyBytes_AS_STRING(out)) == KNHK_OK)) return out;
        Py_DECREF(out);
    }
    /* Absent (an alias? the default?), large, changed, damaged, compressed, closed. */
    return call_slow(self, SLOW_GET_BYTES, args, nargs);
}

static PyObject *sb_subscript(StoreBase *self, PyObject *key) {
    uint64_t off, len;
    int64_t r = probe(self, key, &off, &len);
    if (fast_likely(r == 0)) return view_span(self->view, off, len);
    if (r == PROBE_PY_ERROR) return NULL;
    return call_slow(self, SLOW_GETITEM, &key, 1);
}

static int sb_contains(StoreBase *self, PyObject *key) {
    uint64_t off, len;
    int64_t r = probe(self, key, &off, &len);
    if (fast_likely(r == 0)) return 1;
    if (r == KNHK_STORE_ABSENT) return 0;
    if (r == PROBE_PY_ERROR) return -1;
    PyObject *got = call_slow(self, SLOW_CONTAINS, &key, 1);
    if (got == NULL) return -1;
    int truth = PyObject_IsTrue(got);
    Py_DECREF(got);
    return truth;
}

/* _attach(gen, handle_address, view): reads go to this generation from now on.
   handle_address 0: no C fast path (a compressed store); gen and view are still
   held. */
static PyObject *sb_attach(StoreBase *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyLong_Check(args[1]) || !PyMemoryView_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "_attach(gen, handle_address: int, view: memoryview)");
        return NULL;
    }
    void *handle = PyLong_AsVoidPtr(args[1]);
    if (handle == NULL && PyErr_Occurred()) return NULL;
    PyObject *old_gen = self->gen, *old_view = self->view;
    Py_INCREF(args[0]);
    Py_INCREF(args[2]);
    self->gen = args[0];
    self->view = args[2];
    self->store = handle;
    Py_XDECREF(old_view);
    Py_XDECREF(old_gen); /* last: may free the old generation (runs its __del__) */
    Py_RETURN_NONE;
}

/* _detach() -> the generation (or None): the store reads nothing from now on. */
static PyObject *sb_detach(StoreBase *self, PyObject *unused) {
    PyObject *gen = self->gen, *view = self->view;
    self->store = NULL;
    self->gen = NULL;
    self->view = NULL;
    Py_XDECREF(view);
    return gen != NULL ? gen : Py_NewRef(Py_None);
}

static PyMethodDef sb_methods[] = {
    {"get", (PyCFunction)(void (*)(void))sb_get, METH_FASTCALL | METH_KEYWORDS,
     "get($self, key, default=None)\n--\n\nThe value of key (str, UTF-8 encoded, or bytes-like) as a read-only "
     "memoryview into the file (zero-copy; decompressed into memory in a compressed store), or default "
     "when key is absent. Raises StoreChangedError once the mapped file was rewritten or truncated in "
     "place, StoreCorruptError for a damaged record, StoreClosedError after close(), TypeError for a key "
     "of another type (accepted: str, or bytes-like: bytes, bytearray, memoryview), StoreKeyEncodingError "
     "(a ValueError) for a str with no UTF-8 form (a lone surrogate)."},
    {"get_bytes", (PyCFunction)(void (*)(void))sb_get_bytes, METH_FASTCALL | METH_KEYWORDS,
     "get_bytes($self, key, default=None)\n--\n\nThe value of key -- or of the record an alias names (typed records) "
     "-- as a bytes copy (decompressed in a compressed store), or default when it is neither. The copy is "
     "taken under the SIGBUS guard and the header re-read after it: the value of one version of the file, "
     "or StoreChangedError, even while the file is rewritten in place. Raises AmbiguousKeyError for an "
     "alias of several records, StoreClosedError after close(), and as get()."},
    {"_attach", (PyCFunction)(void (*)(void))sb_attach, METH_FASTCALL,
     "_attach(gen, handle_address, view): read this generation (handle_address 0: no C fast path)."},
    {"_detach", (PyCFunction)sb_detach, METH_NOARGS, "_detach() -> the generation read until now, or None."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef sb_members[] = {
    {"_gen", T_OBJECT, offsetof(StoreBase, gen), READONLY, "the open file's generation, None when closed"},
    {NULL, 0, 0, 0, NULL},
};

static PyMappingMethods sb_as_mapping = {.mp_subscript = (binaryfunc)sb_subscript};
static PySequenceMethods sb_as_sequence = {.sq_contains = (objobjproc)sb_contains};

PyTypeObject fast_StoreBase_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "knhk_memory._fast.StoreBase",
    .tp_basicsize = sizeof(StoreBase),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C base of WorkflowStore: get, get_bytes, store[key] and key in store on the open generation.",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)sb_dealloc,
    .tp_traverse = (traverseproc)sb_traverse,
    .tp_clear = (inquiry)sb_clear,
    .tp_methods = sb_methods,
    .tp_members = sb_members,
    .tp_as_mapping = &sb_as_mapping,
    .tp_as_sequence = &sb_as_sequence,
};
