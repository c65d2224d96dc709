"""Builds jaxvlm's CPU kernel for int8 and bfloat16 weights (`jaxvlm/matvec.cc`) against the XLA FFI
headers that jaxlib ships; everything else is declared in pyproject.toml.

The kernel is compiled for this machine's CPU (-march=native). Without a C++ compiler the install still
succeeds: jaxvlm then warns once and takes XLA's slower path (see `jaxvlm/matvec.py`).
"""

import importlib.util
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildKernel(build_ext):
    def build_extension(self, ext):
        jaxlib = importlib.util.find_spec("jaxlib")
        ext.include_dirs.append(os.path.join(os.path.dirname(jaxlib.origin), "include"))
        try:
            super().build_extension(ext)
        except Exception as e:  # a missing compiler: the XLA fallback still works
            self.warn(f"jaxvlm's CPU kernel was not built ({e}); int8 and bfloat16 weights will take XLA's path")


setup(
    ext_modules=[Extension("jaxvlm._matvec", ["jaxvlm/matvec.cc"], language="c++",
                           extra_compile_args=["-O3", "-march=native", "-std=c++17", "-Wno-attributes"])],
    cmdclass={"build_ext": BuildKernel},
)
