/*
 * counters_py.c -- Counters.add / .get and CounterWriter.add as CPython
 * builtins (knhk_memory._fast).
 *
 * Through cffi an add cost ~630 ns from Python here (a Python method, the
 * name lookup, an int check, the foreign call with its GIL release and
 * re-acquire) around a ~2 ns add: more than `with lock: n += 1`, which is
 * the one thing a striped counter exists to beat. As METH_FASTCALL builtins
 * the common call -- an exact str name found in the block's index or an
 * exact int index in range, and an exact int increment that fits int64 --
 * is one vectorcall and one call into the core, with the GIL held (the add
 * is far shorter than a GIL hand-off). Anything else (a numpy integer, an
 * unknown name, a closed block, a status from the core) goes to the Python
 * method given as `slow`, which converts or raises, so the two paths cannot
 * disagree on errors.
 *
 * One state capsule per block holds the handle; detach_counters clears it
 * when the block closes (under the GIL, so no builtin runs meanwhile), and
 * every builtin made from it then takes the slow path.
 */
#include "fast.h"

#define STATE_CAPSULE "knhk_memory._fast.counters"
#define WRITER_CAPSULE "knhk_memory._fast.counter_writer"

/* A direct-mapped cache of name objects the index resolved, by address: a
   caller's name is usually one interned literal, so a hit is one pointer
   compare instead of a dict probe (the largest cost left in Counters.add).
   Entries hold a reference, so an address is never reused while cached. */
#define NAME_WAYS 8

typedef struct {
    knhk_counters *h; /* NULL once detached */
    PyObject *index;  /* dict: name -> index (never changes) */
    Py_ssize_t count; /* counters in the block */
    PyObject *names[NAME_WAYS];
    Py_ssize_t indices[NAME_WAYS];
} counters_state;

static inline size_t name_way(PyObject *key) { return ((uintptr_t)key >> 4) & (NAME_WAYS - 1); }

/* The pointer a capsule made here holds. PyCapsule_GetPointer compares the
   name with strcmp on every call (7% of a Counters.add loop under perf); the
   capsules here are made with these very literals and carry the pointer as
   their context too, so the name's address is the check on the hot path. */
static inline void *capsule_ptr(PyObject *capsule, const char *name) {
    if (fast_likely(PyCapsule_CheckExact(capsule) && PyCapsule_GetName(capsule) == name)) {
        void *p = PyCapsule_GetContext(capsule);
        if (fast_likely(p != NULL)) return p;
    }
    return PyCapsule_GetPointer(capsule, name);
}

static void state_free(PyObject *capsule) {
    counters_state *st = PyCapsule_GetPointer(capsule, STATE_CAPSULE);
    if (st == NULL) {
        PyErr_Clear();
        return;
    }
    Py_XDECREF(st->index);
    for (int w = 0; w < NAME_WAYS; w++) Py_XDECREF(st->names[w]);
    PyMem_Free(st);
}

/* counters_state(handle_address, index: dict, count) -> state */
PyObject *fast_counters_state(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyDict_CheckExact(args[1]) || !PyLong_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "counters_state(handle_address, index: dict, count: int)");
        return NULL;
    }
    knhk_counters *h = fast_address(args[0], "counters_state");
    if (h == NULL) return NULL;
    Py_ssize_t count = PyLong_AsSsize_t(args[2]);
    if (count < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "counters_state: negative count");
        return NULL;
    }
    counters_state *st = PyMem_Calloc(1, sizeof *st);
    if (st == NULL) return PyErr_NoMemory();
    st->h = h;
    st->count = count;
    Py_INCREF(args[1]);
    st->index = args[1];
    PyObject *capsule = PyCapsule_New(st, STATE_CAPSULE, state_free);
    if (capsule == NULL) {
        Py_DECREF(st->index);
        PyMem_Free(st);
        return NULL;
    }
    if (PyCapsule_SetContext(capsule, st) != 0) {
        Py_DECREF(capsule);
        return NULL;
    }
    return capsule;
}

/* detach_counters(state): the block is closing; every builtin of it goes to
   its slow path from now on. */
PyObject *fast_counters_detach(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 1 || !PyCapsule_IsValid(args[0], STATE_CAPSULE)) {
        PyErr_SetString(PyExc_TypeError, "detach_counters(state)");
        return NULL;
    }
    counters_state *st = PyCapsule_GetPointer(args[0], STATE_CAPSULE);
    st->h = NULL;
    Py_RETURN_NONE;
}

/* The counter a key names, or -1 for the slow path. No exception is left set. */
static inline Py_ssize_t index_of(counters_state *st, PyObject *key) {
    if (fast_likely(PyUnicode_CheckExact(key))) {
        size_t way = name_way(key);
        if (fast_likely(st->names[way] == key)) return st->indices[way];
        PyObject *i = PyDict_GetItemWithError(st->index, key); /* borrowed */
        if (fast_unlikely(i == NULL)) {
            PyErr_Clear();
            return -1;
        }
        long long v;
        Py_ssize_t found;
        if (fast_likely(fast_small_long(i, &v))) {
            found = (Py_ssize_t)v; /* the block's own index: small, exact */
        } else if ((found = PyLong_AsSsize_t(i)) < 0) {
            PyErr_Clear();
            return -1;
        }
        PyObject *old = st->names[way];
        Py_INCREF(key);
        st->names[way] = key;
        st->indices[way] = found;
        Py_XDECREF(old); /* a str: its deallocation runs no Python code */
        return found;
    }
    if (PyLong_CheckExact(key)) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(key, &overflow);
        if (!overflow && v >= 0 && v < st->count) return (Py_ssize_t)v;
        PyErr_Clear();
    }
    return -1;
}

/* An exact int that fits int64 into *n, else 0 (slow path). */
static inline int increment_of(PyObject *obj, int64_t *n) {
    if (fast_unlikely(!PyLong_CheckExact(obj))) return 0;
    long long small;
    if (fast_likely(fast_small_long(obj, &small))) {
        *n = (int64_t)small;
        return 1;
    }
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (fast_unlikely(overflow || (v == -1 && PyErr_Occurred()))) {
        PyErr_Clear();
        return 0;
    }
    *n = (int64_t)v;
    return 1;
}

static PyObject *call_slow(PyObject *slow, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    return PyObject_Vectorcall(slow, args, (size_t)nargs, kwnames);
}

/* Counters.add: self = (state, slow) */
static PyObject *counters_add(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *slow = PyTuple_GET_ITEM(self, 1);
    if (fast_unlikely(kwnames != NULL || nargs < 1 || nargs > 2)) return call_slow(slow, args, nargs, kwnames);
    counters_state *st = capsule_ptr(PyTuple_GET_ITEM(self, 0), STATE_CAPSULE);
    if (fast_unlikely(st == NULL)) return NULL;
    int64_t n = 1;
    Py_ssize_t i = index_of(st, args[0]);
    if (fast_unlikely(i < 0 || st->h == NULL || (nargs == 2 && !increment_of(args[1], &n))))
        return call_slow(slow, args, nargs, NULL);
    if (fast_unlikely(knhk_counters_add(st->h, (uint32_t)i, n) != KNHK_OK))
        return call_slow(slow, args, nargs, NULL); /* nothing added; the slow path says why */
    Py_RETURN_NONE;
}

/* Counters.get: self = (state, slow) */
static PyObject *counters_get(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *slow = PyTuple_GET_ITEM(self, 1);
    if (fast_unlikely(kwnames != NULL || nargs != 1)) return call_slow(slow, args, nargs, kwnames);
    counters_state *st = capsule_ptr(PyTuple_GET_ITEM(self, 0), STATE_CAPSULE);
    if (fast_unlikely(st == NULL)) return NULL;
    Py_ssize_t i = index_of(st, args[0]);
    if (fast_unlikely(i < 0 || st->h == NULL)) return call_slow(slow, args, nargs, NULL);
    return PyLong_FromLongLong(knhk_counters_get(st->h, (uint32_t)i));
}

/* CounterWriter.add: self = (state, writer capsule, slow). The writer's
   thread check is the core's (KNHK_ERR_STATE from another thread). */
static PyObject *writer_add(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *slow = PyTuple_GET_ITEM(self, 2);
    if (fast_unlikely(kwnames != NULL || nargs < 1 || nargs > 2)) return call_slow(slow, args, nargs, kwnames);
    counters_state *st = capsule_ptr(PyTuple_GET_ITEM(self, 0), STATE_CAPSULE);
    knhk_counters_writer *w = capsule_ptr(PyTuple_GET_ITEM(self, 1), WRITER_CAPSULE);
    if (fast_unlikely(st == NULL || w == NULL)) return NULL;
    int64_t n = 1;
    Py_ssize_t i = index_of(st, args[0]);
    if (fast_unlikely(i < 0 || st->h == NULL || (nargs == 2 && !increment_of(args[1], &n))))
        return call_slow(slow, args, nargs, NULL);
    if (fast_unlikely(knhk_counters_writer_add(w, (uint32_t)i, n) != KNHK_OK))
        return call_slow(slow, args, nargs, NULL);
    Py_RETURN_NONE;
}

/* PatternStats.record: self = (state, slow); pattern an exact int (the core
   checks its range), ticks an exact int in [0, 2**64). */
static PyObject *pattern_record(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *slow = PyTuple_GET_ITEM(self, 1);
    if (fast_unlikely(kwnames != NULL || nargs != 2 || !PyLong_CheckExact(args[0]) || !PyLong_CheckExact(args[1])))
        return call_slow(slow, args, nargs, kwnames);
    counters_state *st = capsule_ptr(PyTuple_GET_ITEM(self, 0), STATE_CAPSULE);
    if (fast_unlikely(st == NULL)) return NULL;
    int overflow, overflow2;
    long long pattern = PyLong_AsLongLongAndOverflow(args[0], &overflow);
    long long ticks = PyLong_AsLongLongAndOverflow(args[1], &overflow2); /* int64, as the Python path takes */
    if (fast_unlikely(overflow || overflow2 || ticks < 0 || PyErr_Occurred() || st->h == NULL)) {
        PyErr_Clear();
        return call_slow(slow, args, nargs, NULL);
    }
    if (fast_unlikely(knhk_counters_pattern_record(st->h, (int64_t)pattern, (uint64_t)ticks) != KNHK_OK))
        return call_slow(slow, args, nargs, NULL);
    Py_RETURN_NONE;
}

static PyMethodDef add_def = {"add", (PyCFunction)(void (*)(void))counters_add, METH_FASTCALL | METH_KEYWORDS,
                              "add(key, n=1): add n (an int; negative subtracts) to the counter named key "
                              "(a name or an index)."};
static PyMethodDef get_def = {"get", (PyCFunction)(void (*)(void))counters_get, METH_FASTCALL | METH_KEYWORDS,
                              "get(key) -> int: one counter's value."};
static PyMethodDef record_def = {"record", (PyCFunction)(void (*)(void))pattern_record, METH_FASTCALL | METH_KEYWORDS,
                                 "record(pattern, ticks): one execution of pattern (1..43) that took ticks."};
static PyMethodDef writer_add_def = {"add", (PyCFunction)(void (*)(void))writer_add, METH_FASTCALL | METH_KEYWORDS,
                                     "add(key, n=1): add n to one counter through this thread's slot."};

/* counters_method(kind, state, slow[, writer_address]) -> builtin:
   kind 0 Counters.add, 1 Counters.get, 2 CounterWriter.add (needs the
   writer's address; the caller keeps the writer's block alive), 3
   PatternStats.record. */
PyObject *fast_counters_method(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    long kind = nargs >= 3 && PyLong_CheckExact(args[0]) ? PyLong_AsLong(args[0]) : -1;
    if (kind < 0 || kind > 3 || nargs != (kind == 2 ? 4 : 3) || !PyCapsule_IsValid(args[1], STATE_CAPSULE) ||
        !PyCallable_Check(args[2])) {
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError,
                        "counters_method(kind: 0 add, 1 get, 2 writer add or 3 record, state, slow: callable"
                        "[, writer_address for kind 2])");
        return NULL;
    }
    PyObject *self;
    if (kind == 2) {
        void *w = fast_address(args[3], "counters_method");
        if (w == NULL) return NULL;
        PyObject *wc = PyCapsule_New(w, WRITER_CAPSULE, NULL);
        if (wc == NULL) return NULL;
        if (PyCapsule_SetContext(wc, w) != 0) {
            Py_DECREF(wc);
            return NULL;
        }
        self = PyTuple_Pack(3, args[1], wc, args[2]);
        Py_DECREF(wc);
    } else {
        self = PyTuple_Pack(2, args[1], args[2]);
    }
    if (self == NULL) return NULL;
    PyMethodDef *def = kind == 0 ? &add_def : kind == 1 ? &get_def : kind == 2 ? &writer_add_def : &record_def;
    PyObject *fn = PyCFunction_New(def, self);
    Py_DECREF(self);
    return fn;
}
