"""The one compiled part: pipeline._sparse_gunzip (see its source). Everything else is in pyproject.toml.

`optional=True`: without a C compiler the install still succeeds and the regions stage falls back to
libdeflate (slower, same results).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("pipeline._sparse_gunzip", ["pipeline/_sparse_gunzip.c"], extra_compile_args=["-O3"], optional=True)
    ]
)
