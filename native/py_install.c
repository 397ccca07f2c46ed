/*
 * py_install.c -- puts a file's METH_FASTCALL builtins on a Python module.
 *
 * store_py.c and simd_py.c each expose their builtins the same way: import
 * the module they serve and set each function on it as an attribute, under
 * the GIL; a failure leaves its Python message in the knhk error buffer.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "knhk_internal.h"

int _knhk_py_install(const char *module, struct PyMethodDef *defs, size_t count, const char *what) {
    PyGILState_STATE g = PyGILState_Ensure();
    int status = KNHK_OK;
    PyObject *mod = PyImport_ImportModule(module);
    if (mod == NULL) {
        status = KNHK_ERR_PYTHON;
    } else {
        for (size_t i = 0; i < count; i++) {
            PyObject *fn = PyCFunction_NewEx(&defs[i], NULL, NULL);
            if (fn == NULL || PyObject_SetAttrString(mod, defs[i].ml_name, fn) < 0) {
                Py_XDECREF(fn);
                status = KNHK_ERR_PYTHON;
                break;
            }
            Py_DECREF(fn);
        }
        Py_DECREF(mod);
    }
    if (status != KNHK_OK) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyObject *s = value ? PyObject_Str(value) : NULL;
        _knhk_set_error("installing the %s fast path: %s", what, s ? PyUnicode_AsUTF8(s) : "unknown error");
        PyErr_Clear();
        Py_XDECREF(s);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
    }
    PyGILState_Release(g);
    return status;
}
