/*
 * arena_py.c -- Arena.alloc and Arena.array as C methods (knhk_memory._fast).
 *
 * Through cffi an Arena.alloc(64) cost ~2.3 us from Python here (argument
 * checks, the foreign call, ffi.gc, ffi.buffer, memoryview) around a bump of
 * a few ns: 7x numpy's own np.empty(64, uint8). ArenaBase is the C base
 * class of knhk_memory.arena.Arena: its alloc and array methods serve the
 * common call -- exact int sizes in range, the default alignment or an exact
 * power-of-two int, for array an exact int or tuple shape and a dtype already
 * seen -- with one call into the core, and hand every other call to the
 * subclass's _alloc_slow / _array_slow, which check, convert or raise, so the
 * messages keep one source. The owner-thread and closed checks are the
 * core's (knhk_arena_block_alloc refuses both; the slow path then says why).
 *
 * A block is an ArenaBlock: a buffer exporter whose deallocation frees the
 * counted block (knhk_arena_block_free, any thread); a memoryview or a numpy
 * array holds it as its base, so the memory lives exactly as long as they do.
 */
#include "fast.h"

#define NO_IMPORT_ARRAY
#define PY_ARRAY_UNIQUE_SYMBOL fast_numpy_api
#include <numpy/arrayobject.h>

/* ---------------------------------------------------------------- ArenaBlock */

typedef struct {
    PyObject_HEAD knhk_arena *arena;
    void *ptr;
    Py_ssize_t len;
} ArenaBlock;

static void block_dealloc(ArenaBlock *self) {
    if (self->ptr != NULL) knhk_arena_block_free(self->arena, self->ptr);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int block_getbuffer(ArenaBlock *self, Py_buffer *view, int flags) {
    return PyBuffer_FillInfo(view, (PyObject *)self, self->ptr, self->len, 0, flags);
}

static PyBufferProcs block_as_buffer = {(getbufferproc)block_getbuffer, NULL};

PyTypeObject fast_ArenaBlock_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "knhk_memory._fast.ArenaBlock",
    .tp_basicsize = sizeof(ArenaBlock),
    .tp_dealloc = (destructor)block_dealloc,
    .tp_as_buffer = &block_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A counted arena block: a writable buffer, freed when the last view of it goes.",
};

/* ---------------------------------------------------------------- ArenaBase */

typedef struct {
    PyObject_HEAD knhk_arena *raw;    /* NULL while unbound (closed) */
    PyObject *dtypes;   /* dict: dtype argument -> validated numpy descr (array's cache) */
} ArenaBase;

#define DTYPE_CACHE_MAX 256

static PyObject *base_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    ArenaBase *self = (ArenaBase *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->dtypes = PyDict_New();
    if (self->dtypes == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int base_traverse(ArenaBase *self, visitproc visit, void *arg) {
    Py_VISIT(self->dtypes);
    Py_VISIT(Py_TYPE(self)); /* heap subclasses */
    return 0;
}

static int base_clear(ArenaBase *self) {
    Py_CLEAR(self->dtypes);
    return 0;
}

static void base_dealloc(ArenaBase *self) {
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    base_clear(self);
    tp->tp_free((PyObject *)self);
}

/* An exact int in [lo, hi] into *out, else 0. */
static inline int exact_size(PyObject *obj, long long lo, long long hi, long long *out) {
    if (!PyLong_CheckExact(obj)) return 0;
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (overflow || v < lo || v > hi) {
        PyErr_Clear();
        return 0;
    }
    *out = v;
    return 1;
}

/* align: absent (16) or an exact power-of-two int in [1, KNHK_MAX_ALIGN]. */
static inline int align_of(PyObject *obj, size_t *out) {
    long long a;
    if (obj == NULL) {
        *out = 16;
        return 1;
    }
    if (!exact_size(obj, 1, KNHK_MAX_ALIGN, &a) || (a & (a - 1))) return 0;
    *out = (size_t)a;
    return 1;
}

static PyObject *new_block(ArenaBase *self, size_t n, size_t align) {
    void *ptr = knhk_arena_block_alloc(self->raw, n, align, NULL);
    if (ptr == NULL) return NULL; /* no exception set: the caller takes the slow path */
    ArenaBlock *b = PyObject_New(ArenaBlock, &fast_ArenaBlock_Type);
    if (b == NULL) {
        knhk_arena_block_free(self->raw, ptr);
        return NULL;
    }
    b->arena = self->raw;
    b->ptr = ptr;
    b->len = (Py_ssize_t)n;
    return (PyObject *)b;
}

static PyObject *slow(PyObject *self, const char *name, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *fn = PyObject_GetAttrString(self, name);
    if (fn == NULL) return NULL;
    PyObject *r = PyObject_Vectorcall(fn, args, (size_t)nargs, kwnames);
    Py_DECREF(fn);
    return r;
}

/* alloc(nbytes, align=16) -> memoryview */
static PyObject *base_alloc(ArenaBase *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    long long n;
    size_t align;
    if (fast_likely(kwnames == NULL && nargs >= 1 && nargs <= 2 && self->raw != NULL &&
                    exact_size(args[0], 1, (long long)KNHK_ARENA_MAX_REQUEST, &n) &&
                    align_of(nargs == 2 ? args[1] : NULL, &align))) {
        PyObject *block = new_block(self, (size_t)n, align);
        if (fast_likely(block != NULL)) {
            PyObject *view = PyMemoryView_FromObject(block);
            Py_DECREF(block);
            return view;
        }
        if (PyErr_Occurred()) return NULL;
    }
    return slow((PyObject *)self, "_alloc_slow", args, nargs, kwnames);
}

/* array(shape, dtype="float64") -> numpy.ndarray (align= goes the slow way) */
static PyObject *base_array(ArenaBase *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    if (kwnames != NULL || nargs < 1 || nargs > 2 || self->raw == NULL || self->dtypes == NULL) goto slow_path;
    npy_intp dims[NPY_MAXDIMS];
    int nd;
    long long d;
    PyObject *shape = args[0];
    if (exact_size(shape, 0, NPY_MAX_INTP, &d)) {
        nd = 1;
        dims[0] = (npy_intp)d;
    } else if (PyTuple_CheckExact(shape) && PyTuple_GET_SIZE(shape) <= NPY_MAXDIMS) {
        nd = (int)PyTuple_GET_SIZE(shape);
        for (int i = 0; i < nd; i++) {
            if (!exact_size(PyTuple_GET_ITEM(shape, i), 0, NPY_MAX_INTP, &d)) goto slow_path;
            dims[i] = (npy_intp)d;
        }
    } else {
        goto slow_path;
    }
    PyArray_Descr *descr;
    if (nargs == 2) {
        PyObject *key = args[1];
        if (!PyUnicode_CheckExact(key) && !PyType_Check(key) && !PyArray_DescrCheck(key)) goto slow_path;
        descr = (PyArray_Descr *)PyDict_GetItemWithError(self->dtypes, key); /* borrowed */
        if (descr == NULL) {
            PyErr_Clear();
            goto slow_path;
        }
    } else {
        descr = (PyArray_Descr *)PyDict_GetItemWithError(self->dtypes, Py_None);
        if (descr == NULL) {
            PyErr_Clear();
            goto slow_path;
        }
    }
    /* nbytes = prod(dims) * itemsize, checked against the arena's largest request */
    size_t nbytes = (size_t)PyDataType_ELSIZE(descr);
    for (int i = 0; i < nd; i++)
        if (__builtin_mul_overflow(nbytes, (size_t)dims[i], &nbytes)) goto slow_path;
    if (nbytes > KNHK_ARENA_MAX_REQUEST) goto slow_path;
    size_t align = PyDataType_ALIGNMENT(descr) > 16 ? (size_t)PyDataType_ALIGNMENT(descr) : 16;
    PyObject *block = new_block(self, nbytes ? nbytes : 1, align);
    if (block == NULL) {
        if (PyErr_Occurred()) return NULL;
        goto slow_path;
    }
    Py_INCREF(descr); /* PyArray_NewFromDescr steals it */
    PyObject *arr =
        PyArray_NewFromDescr(&PyArray_Type, descr, nd, dims, NULL, ((ArenaBlock *)block)->ptr, NPY_ARRAY_CARRAY, NULL);
    if (arr == NULL) {
        Py_DECREF(block);
        return NULL;
    }
    if (PyArray_SetBaseObject((PyArrayObject *)arr, block) < 0) { /* steals block, even on failure */
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
slow_path:
    return slow((PyObject *)self, "_array_slow", args, nargs, kwnames);
}

/* _fast_bind(address | None): the arena this object allocates from (None: closed). */
static PyObject *base_bind(ArenaBase *self, PyObject *arg) {
    if (arg == Py_None) {
        self->raw = NULL;
        Py_RETURN_NONE;
    }
    knhk_arena *a = fast_address(arg, "_fast_bind");
    if (a == NULL) return NULL;
    if (fast_numpy_ready() < 0) return NULL;
    self->raw = a;
    Py_RETURN_NONE;
}

/* _fast_cache_dtype(key, descr): array() may take `key` as this validated dtype from now on. */
static PyObject *base_cache_dtype(ArenaBase *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyArray_DescrCheck(args[1])) {
        PyErr_SetString(PyExc_TypeError, "_fast_cache_dtype(key, descr: numpy.dtype)");
        return NULL;
    }
    if (self->dtypes != NULL && PyDict_GET_SIZE(self->dtypes) < DTYPE_CACHE_MAX &&
        PyDict_SetItem(self->dtypes, args[0], args[1]) < 0)
        PyErr_Clear(); /* an unhashable key is simply not cached */
    Py_RETURN_NONE;
}

static PyMethodDef base_methods[] = {
    {"alloc", (PyCFunction)(void (*)(void))base_alloc, METH_FASTCALL | METH_KEYWORDS,
     "alloc(nbytes, align=16) -> memoryview: a writable, zero-copy buffer of nbytes (uninitialised) aligned to "
     "align, live while the memoryview (or anything made from it) is. Raises ValueError/TypeError for a bad "
     "size or alignment, ArenaClosedError, ArenaThreadError, MemoryError."},
    {"array", (PyCFunction)(void (*)(void))base_array, METH_FASTCALL | METH_KEYWORDS,
     "array(shape, dtype='float64', *, align=None) -> numpy.ndarray: uninitialised, C-ordered, its data in the "
     "arena (align defaults to 16 or the dtype's alignment if larger)."},
    {"_fast_bind", (PyCFunction)base_bind, METH_O, "Bind to a knhk_arena * address, or None once closed."},
    {"_fast_cache_dtype", (PyCFunction)(void (*)(void))base_cache_dtype, METH_FASTCALL,
     "Remember a validated dtype for array()."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject fast_ArenaBase_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "knhk_memory._fast.ArenaBase",
    .tp_basicsize = sizeof(ArenaBase),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C base of knhk_memory.arena.Arena: its alloc and array fast paths.",
    .tp_new = base_new,
    .tp_dealloc = (destructor)base_dealloc,
    .tp_traverse = (traverseproc)base_traverse,
    .tp_clear = (inquiry)base_clear,
    .tp_methods = base_methods,
};
