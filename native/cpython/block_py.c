/*
 * block_py.c -- backend blocks as C objects, and Backend.malloc as a C
 * method (knhk_memory._fast).
 *
 * Through cffi `backend.malloc(64).free()` cost ~3.7 us from Python here
 * (checks, the foreign call, ffi.gc, a Python object with four slots, the
 * refcount probe free() made for live views): 23x bytearray(64).
 *
 * BlockBase is the C base of knhk_memory.allocator.Block: it owns the pointer
 * (freed by its backend at deallocation or by free()), exports the memory
 * through the buffer protocol (view() is memoryview(block)) and counts the
 * exports, so free() and realloc() refuse while a view is alive and a view
 * never dangles. BackendBase is the C base of Backend: malloc(nbytes) serves
 * an exact int size with one call into the core and makes the block without
 * a Python frame; anything else (a bad size, a NULL from the allocator) goes
 * to the subclass's _malloc_slow, which converts or raises.
 */
#include "fast.h"

#include <structmember.h>

/* ---------------------------------------------------------------- BlockBase */

typedef struct {
    PyObject_HEAD PyObject *backend;        /* the Backend object (for messages and realloc) */
    const knhk_backend *b;
    void *ptr;                /* NULL once freed */
    Py_ssize_t size;          /* bytes requested */
    Py_ssize_t align;
    Py_ssize_t exports;       /* live buffer views */
} BlockBase;

static int block_traverse(BlockBase *self, visitproc visit, void *arg) {
    Py_VISIT(self->backend);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static int block_clear(BlockBase *self) {
    Py_CLEAR(self->backend);
    return 0;
}

static void block_dealloc(BlockBase *self) {
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    if (self->ptr != NULL) knhk_free(self->b, self->ptr);
    self->ptr = NULL;
    block_clear(self);
    tp->tp_free((PyObject *)self);
}

static int block_getbuffer(BlockBase *self, Py_buffer *view, int flags) {
    if (self->ptr == NULL) {
        PyErr_SetString(PyExc_BufferError, "the block has been freed");
        view->obj = NULL;
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->ptr, self->size, 0, flags) < 0) return -1;
    self->exports++;
    return 0;
}

static void block_releasebuffer(BlockBase *self, Py_buffer *view) { self->exports--; }

static PyBufferProcs block_as_buffer = {(getbufferproc)block_getbuffer, (releasebufferproc)block_releasebuffer};

/* free(): free now (else at collection). Idempotent; refused while views live. */
static PyObject *block_free(BlockBase *self, PyObject *unused) {
    if (self->ptr == NULL) Py_RETURN_NONE;
    if (fast_unlikely(self->exports > 0)) return PyObject_CallMethod((PyObject *)self, "_no_views", "s", "free");
    void *p = self->ptr;
    self->ptr = NULL;
    knhk_free(self->b, p);
    Py_RETURN_NONE;
}

/* _realloc(nbytes, align_or_0) -> bool: knhk_realloc; False (block unchanged) on NULL. */
static PyObject *block_realloc(BlockBase *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t n, a;
    if (nargs != 3 || (n = PyLong_AsSsize_t(args[0])) < 0 || (a = PyLong_AsSsize_t(args[1])) < 0 ||
        !PyLong_Check(args[2])) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "_realloc(nbytes, align_or_0, align_kept)");
        return NULL;
    }
    if (self->ptr == NULL || self->exports > 0) {
        PyErr_SetString(PyExc_BufferError, "_realloc: freed or viewed block");
        return NULL;
    }
    void *q = knhk_realloc(self->b, self->ptr, (size_t)n, (size_t)a);
    if (q == NULL) Py_RETURN_FALSE;
    self->ptr = q;
    self->size = n;
    self->align = PyLong_AsSsize_t(args[2]);
    Py_RETURN_TRUE;
}

/* _usable_size() -> int | None: knhk_usable_size under the GIL, so free() (a C
   method, GIL held too) cannot run between the freed check and the call (issue 22). */
static PyObject *block_usable_size(BlockBase *self, PyObject *unused) {
    if (self->ptr == NULL) Py_RETURN_NONE;
    return PyLong_FromSize_t(knhk_usable_size(self->b, self->ptr));
}

static PyObject *block_address(BlockBase *self, void *closure) {
    if (self->ptr == NULL) Py_RETURN_NONE;
    return PyLong_FromVoidPtr(self->ptr);
}

static PyObject *block_exports(BlockBase *self, void *closure) { return PyLong_FromSsize_t(self->exports); }

static PyGetSetDef block_getset[] = {
    {"_address", (getter)block_address, NULL, "the block's address, or None once freed", NULL},
    {"_exports", (getter)block_exports, NULL, "live buffer views of the block", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef block_members[] = {
    {"backend", T_OBJECT, offsetof(BlockBase, backend), READONLY, "the Backend that allocated the block"},
    {"_size", T_PYSSIZET, offsetof(BlockBase, size), READONLY, "bytes requested"},
    {"_align", T_PYSSIZET, offsetof(BlockBase, align), READONLY, "the block's alignment"},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef block_methods[] = {
    {"free", (PyCFunction)block_free, METH_NOARGS,
     "free(): free now (otherwise the block is freed when it is collected). Idempotent. Raises BufferError "
     "while views of the block are alive."},
    {"_realloc", (PyCFunction)(void (*)(void))block_realloc, METH_FASTCALL, "knhk_realloc of the block."},
    {"_usable_size", (PyCFunction)block_usable_size, METH_NOARGS, "knhk_usable_size of the block, or None once freed."},
    {NULL, NULL, 0, NULL},
};

static PyObject *block_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyErr_SetString(PyExc_TypeError, "Blocks come from Backend.malloc/calloc/aligned");
    return NULL;
}

PyTypeObject fast_BlockBase_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "knhk_memory._fast.BlockBase",
    .tp_basicsize = sizeof(BlockBase),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C base of Block: one backend allocation, its buffer views counted.",
    .tp_new = block_new,
    .tp_dealloc = (destructor)block_dealloc,
    .tp_traverse = (traverseproc)block_traverse,
    .tp_clear = (inquiry)block_clear,
    .tp_as_buffer = &block_as_buffer,
    .tp_methods = block_methods,
    .tp_members = block_members,
    .tp_getset = block_getset,
};

/* A block of `type` (Block) owning ptr. Steals nothing; NULL with an error set. */
static PyObject *adopt(PyTypeObject *type, PyObject *backend, const knhk_backend *b, void *ptr, Py_ssize_t size,
                       Py_ssize_t align) {
    BlockBase *blk = (BlockBase *)type->tp_alloc(type, 0);
    if (blk == NULL) {
        knhk_free(b, ptr);
        return NULL;
    }
    Py_INCREF(backend);
    blk->backend = backend;
    blk->b = b;
    blk->ptr = ptr;
    blk->size = size;
    blk->align = align;
    return (PyObject *)blk;
}

/* ---------------------------------------------------------------- BackendBase */

typedef struct {
    PyObject_HEAD const knhk_backend *b;
    PyTypeObject *block_type; /* Block, a subclass of BlockBase */
} BackendBase;

static int backend_traverse(BackendBase *self, visitproc visit, void *arg) {
    Py_VISIT(self->block_type);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static int backend_clear(BackendBase *self) {
    Py_CLEAR(self->block_type);
    return 0;
}

static void backend_dealloc(BackendBase *self) {
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    backend_clear(self);
    tp->tp_free((PyObject *)self);
}

/* malloc(nbytes) -> Block */
static PyObject *backend_malloc(BackendBase *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    if (fast_likely(kwnames == NULL && nargs == 1 && self->b != NULL && PyLong_CheckExact(args[0]))) {
        Py_ssize_t n = PyLong_AsSsize_t(args[0]);
        if (fast_likely(n >= 0)) {
            void *p = knhk_malloc(self->b, (size_t)n);
            if (fast_likely(p != NULL))
                return adopt(self->block_type, (PyObject *)self, self->b, p, n, KNHK_DEFAULT_ALIGN);
        } else {
            PyErr_Clear();
        }
    }
    PyObject *fn = PyObject_GetAttrString((PyObject *)self, "_malloc_slow");
    if (fn == NULL) return NULL;
    PyObject *r = PyObject_Vectorcall(fn, args, (size_t)nargs, kwnames);
    Py_DECREF(fn);
    return r;
}

/* _fast_bind(backend_address, block_type) */
static PyObject *backend_bind(BackendBase *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyType_Check(args[1]) || !PyType_IsSubtype((PyTypeObject *)args[1], &fast_BlockBase_Type)) {
        PyErr_SetString(PyExc_TypeError, "_fast_bind(backend_address, block_type: a BlockBase subclass)");
        return NULL;
    }
    const knhk_backend *b = fast_address(args[0], "_fast_bind");
    if (b == NULL) return NULL;
    self->b = b;
    Py_INCREF(args[1]);
    Py_XSETREF(self->block_type, (PyTypeObject *)args[1]);
    Py_RETURN_NONE;
}

/* _adopt(address, size, align) -> Block: take ownership of memory this
   backend allocated (calloc, aligned). address 0 is refused (the caller
   raises MemoryError first). */
static PyObject *backend_adopt(BackendBase *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || self->b == NULL) {
        PyErr_SetString(PyExc_TypeError, "_adopt(address, size, align) on a bound backend");
        return NULL;
    }
    void *p = fast_address(args[0], "_adopt");
    Py_ssize_t size = p ? PyLong_AsSsize_t(args[1]) : -1, align = p ? PyLong_AsSsize_t(args[2]) : -1;
    if (p == NULL || size < 0 || align < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "_adopt: negative size or alignment");
        return NULL; /* the memory stays the caller's */
    }
    return adopt(self->block_type, (PyObject *)self, self->b, p, size, align);
}

static PyMethodDef backend_methods[] = {
    {"malloc", (PyCFunction)(void (*)(void))backend_malloc, METH_FASTCALL | METH_KEYWORDS,
     "malloc(nbytes) -> Block: nbytes (uninitialised), aligned to 16. Raises TypeError/ValueError for a bad "
     "size and MemoryError when the allocator has none."},
    {"_fast_bind", (PyCFunction)(void (*)(void))backend_bind, METH_FASTCALL, "Bind to a knhk_backend *."},
    {"_adopt", (PyCFunction)(void (*)(void))backend_adopt, METH_FASTCALL, "Own memory this backend allocated."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject fast_BackendBase_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "knhk_memory._fast.BackendBase",
    .tp_basicsize = sizeof(BackendBase),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C base of Backend: malloc() without a Python frame.",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)backend_dealloc,
    .tp_traverse = (traverseproc)backend_traverse,
    .tp_clear = (inquiry)backend_clear,
    .tp_methods = backend_methods,
};
