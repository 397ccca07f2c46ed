# setup.py exists only because cffi's out-of-line build hooks in through the
# `cffi_modules` keyword, which pyproject.toml cannot express.
from setuptools import setup

setup(cffi_modules=["native/build_native.py:ffibuilder"])
