/*
 * pool_py.c -- the pools' alloc and free as CPython builtins (knhk_memory._fast.make_pool_fast).
 *
 * Through cffi an alloc or free costs a foreign call with a GIL release and
 * re-acquire (~300 ns on the 2-core VM) around a ~3 ns pop or push; as a
 * METH_FASTCALL builtin it is one vectorcall. The builtins hold the GIL
 * throughout (the pool call is far shorter than a GIL hand-off). Every
 * failure goes to the Python pool's _raise, which builds the error; the
 * builtin's self holds the Python pool, which holds the C pool's memory, so
 * the C pool outlives every builtin made for it (a closed pool answers
 * KNHK_POOL_CLOSED).
 */
#include "fast.h"

/* The capsule has no name: PyCapsule_GetPointer then compares two NULLs
   instead of running strcmp on every call. The capsule never leaves the
   builtin's self tuple, so no other code can hand us a foreign one. */
#define CAPSULE_NAME NULL

typedef uint64_t (*alloc_fn)(void *pool, int *problem);
typedef int (*free_fn)(void *pool, uint64_t addr);

typedef struct {
    void *pool;
    alloc_fn alloc;
    free_fn free;
} fast_state;

static void state_free(PyObject *capsule) {
    fast_state *st = PyCapsule_GetPointer(capsule, CAPSULE_NAME);
    if (st == NULL) {
        PyErr_Clear();
        return;
    }
    PyMem_Free(st);
}

/* self is (capsule, owner): a tuple is followed by the cycle collector, so
   owner.alloc -> builtin -> owner is a collectable cycle. */
static inline fast_state *state_of(PyObject *self) {
    return PyCapsule_GetPointer(PyTuple_GET_ITEM(self, 0), CAPSULE_NAME);
}

static PyObject *fail(PyObject *self, int problem, const char *what, PyObject *addr) {
    PyObject *owner = PyTuple_GET_ITEM(self, 1);
    PyObject *r = addr != NULL ? PyObject_CallMethod(owner, "_raise", "isO", problem, what, addr)
                               : PyObject_CallMethod(owner, "_raise", "is", problem, what);
    /* _raise always raises; a return is a bug in it. */
    if (r != NULL) {
        Py_DECREF(r);
        PyErr_SetString(PyExc_SystemError, "knhk_memory.pools: _raise returned");
    }
    return NULL;
}

static PyObject *fast_alloc(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    fast_state *st = state_of(self);
    if (fast_unlikely(st == NULL)) return NULL;
    if (fast_unlikely(nargs != 0)) {
        PyErr_Format(PyExc_TypeError, "alloc() takes no arguments (%zd given)", nargs);
        return NULL;
    }
    int problem;
    uint64_t a = st->alloc(st->pool, &problem);
    if (fast_likely(a != 0)) return PyLong_FromUnsignedLongLong(a);
    return fail(self, problem, "alloc", NULL);
}

static PyObject *fast_free(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    fast_state *st = state_of(self);
    if (fast_unlikely(st == NULL)) return NULL;
    if (fast_unlikely(nargs != 1)) {
        PyErr_Format(PyExc_TypeError, "free() takes one address (%zd given)", nargs);
        return NULL;
    }
    PyObject *owner = PyTuple_GET_ITEM(self, 1);
    if (fast_unlikely(!PyLong_CheckExact(args[0])))
        return PyObject_CallMethod(owner, "_slow_free", "O", args[0]); /* conversions, TypeError */
    uint64_t a = PyLong_AsUnsignedLongLong(args[0]);
    if (fast_unlikely(a == (uint64_t)-1 && PyErr_Occurred())) {
        PyErr_Clear();
        return PyObject_CallMethod(owner, "_slow_free", "O", args[0]); /* negative or too large */
    }
    int r = st->free(st->pool, a);
    if (fast_likely(r == KNHK_POOL_OK)) Py_RETURN_NONE;
    return fail(self, r, "free", args[0]);
}

static PyMethodDef alloc_def = {"alloc", (PyCFunction)(void (*)(void))fast_alloc, METH_FASTCALL,
                                "alloc(): the address of a free block (see knhk_memory.pools)."};
static PyMethodDef free_def = {"free", (PyCFunction)(void (*)(void))fast_free, METH_FASTCALL,
                               "free(addr): give the block at addr back (see knhk_memory.pools)."};

/* make_pool_fast(kind, pool_address, owner) -> (alloc, free); kind 0 FixedPool, 1 LockFreePool, 2 ThreadLocalPool. */
PyObject *fast_pool_make_fast(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    (void)mod;
    if (nargs != 3 || !PyLong_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "make_pool_fast(kind, pool_address, owner)");
        return NULL;
    }
    long kind = PyLong_AsLong(args[0]);
    if (kind == -1 && PyErr_Occurred()) return NULL;
    void *pool = fast_address(args[1], "make_pool_fast: pool_address");
    if (pool == NULL) return NULL;
    fast_state tmpl;
    switch (kind) {
    case 0: tmpl = (fast_state){pool, (alloc_fn)knhk_pool_alloc_addr, (free_fn)knhk_pool_free_addr}; break;
    case 1: tmpl = (fast_state){pool, (alloc_fn)knhk_lfpool_alloc_addr, (free_fn)knhk_lfpool_free_addr}; break;
    case 2: tmpl = (fast_state){pool, (alloc_fn)knhk_tlpool_alloc_addr, (free_fn)knhk_tlpool_free_addr}; break;
    default: PyErr_Format(PyExc_ValueError, "make_pool_fast: kind must be 0, 1 or 2, got %ld", kind); return NULL;
    }
    fast_state *st = PyMem_Malloc(sizeof *st);
    if (st == NULL) return PyErr_NoMemory();
    *st = tmpl;
    PyObject *capsule = PyCapsule_New(st, CAPSULE_NAME, state_free);
    if (capsule == NULL) {
        PyMem_Free(st);
        return NULL;
    }
    PyObject *self = PyTuple_Pack(2, capsule, args[2]);
    Py_DECREF(capsule);
    if (self == NULL) return NULL;
    PyObject *a = PyCFunction_NewEx(&alloc_def, self, NULL);
    PyObject *f = a ? PyCFunction_NewEx(&free_def, self, NULL) : NULL;
    Py_DECREF(self);
    if (f == NULL) {
        Py_XDECREF(a);
        return NULL;
    }
    PyObject *pair = PyTuple_Pack(2, a, f);
    Py_DECREF(a);
    Py_DECREF(f);
    return pair;
}
