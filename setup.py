# The only reason this file exists: cffi's setuptools hook takes `cffi_modules`
# as a setup() keyword, which pyproject.toml cannot express. All metadata lives
# in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["meshlink/_ffi_build.py:ffibuilder"])
