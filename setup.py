"""Build hook for the optional C helpers (``hubarches._fastcore``, ``_fastnet``, ``_fastgemm``).

Everything else is in pyproject. The extensions make the likelihood's elementwise work and
the training steps' small network several times faster on the CPU. They are optional: when one
cannot be compiled (no compiler, no OpenMP), the build says so and hubarches runs the same
computation in PyTorch.
"""

from __future__ import annotations

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

UNIX_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-std=c11", "-ffp-contract=fast"]
MSVC_FLAGS = ["/O2"]


class OptionalBuildExt(build_ext):
    """Try with OpenMP, then without; skip the extension when neither compiles."""

    def build_extension(self, ext: Extension) -> None:
        """Compile ``ext`` with the best flags this compiler takes, or leave it out."""
        msvc = self.compiler.compiler_type == "msvc"
        base = MSVC_FLAGS if msvc else UNIX_FLAGS
        openmp = ["/openmp"] if msvc else ["-fopenmp"]
        attempts = [(base + openmp, [] if msvc else openmp), (base, [])]
        for compile_args, link_args in attempts:
            ext.extra_compile_args = compile_args
            ext.extra_link_args = link_args
            try:
                super().build_extension(ext)
                return
            except Exception as err:  # CompileError, LinkError, a missing compiler
                self.warn(f"building {ext.name} with {compile_args} failed: {err}")
        self.warn(f"{ext.name} is not built; hubarches uses its PyTorch code instead")


setup(
    ext_modules=[
        Extension(
            f"hubarches.{name}",
            sources=[f"hubarches/{name}.c"],
            libraries=[] if sys.platform == "win32" else ["m"],
            optional=True,
        )
        for name in ("_fastcore", "_fastnet", "_fastgemm")
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
