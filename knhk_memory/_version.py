"""The package version, written once.

pyproject.toml reads it (``[tool.setuptools.dynamic] version``), the build
passes it to the C core (``-DKNHK_VERSION_STRING``, native/build_native.py),
and :mod:`knhk_memory._core` checks at import that the compiled core says the
same, so a stale build is an ImportError instead of wrong layouts.
"""

__version__ = "0.1.0"
