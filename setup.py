# setup.py exists because cffi's out-of-line build hooks in through the
# `cffi_modules` keyword, which pyproject.toml cannot express, and because the
# C core must be built before the two modules that link it (build_ext below).
# What each binary is: native/build_native.py.
import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

_spec = importlib.util.spec_from_file_location("build_native", Path(__file__).parent / "native" / "build_native.py")
build_native = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_native)


class build_core_first(build_ext):
    """Build the C core's shared library, then link the cffi and fast-path modules to it."""

    def build_extensions(self):
        core = next(e for e in self.extensions if e.name == build_native.CORE_NAME)
        core_file = self.get_ext_fullpath(core.name)
        build_native.core_soname(core, core_file)
        self.build_extension(core)
        for ext in self.extensions:
            if ext is not core:
                build_native.link_to_core(ext, core_file)
                self.build_extension(ext)


setup(
    ext_modules=[build_native.core_extension(), build_native.fast_extension()],
    cffi_modules=["native/build_native.py:ffibuilder"],
    cmdclass={"build_ext": build_core_first},
)
