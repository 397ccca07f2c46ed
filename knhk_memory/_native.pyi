"""Types of knhk_memory._native, the cffi binding of the C core (built by
native/build_native.py from native/knhk.h's cdef; out-of-line API mode).

``lib`` holds every ``knhk_*`` function and ``KNHK_*`` constant of the cdef;
its members are not typed one by one here (the header is their reference),
so the typed layer over it (knhk_memory/_core.py and the capability modules)
is where argument and result types are checked.
"""

from typing import Any

import cffi

ffi: cffi.FFI
lib: Any
