"""Build the optional compiled core.

`TCPTOTCP_NO_EXTENSIONS=1` at build time, a platform without the POSIX socket API
(Windows), or a failing compiler all give a working pure-Python install instead:
`tcptotcp` then falls back to `tcptotcp.pure` at import.
`TCPTOTCP_REQUIRE_EXTENSIONS=1` turns a failed build into an error (CI, wheels).
"""
import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


NO_EXTENSIONS = _flag("TCPTOTCP_NO_EXTENSIONS") or os.name != "posix"
REQUIRE_EXTENSIONS = _flag("TCPTOTCP_REQUIRE_EXTENSIONS")


class OptionalBuildExt(build_ext):
    """Build the core if we can; otherwise install the pure package and say why."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler, no headers, no Cython
            self._give_up(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._give_up(exc)

    def _give_up(self, exc):
        if REQUIRE_EXTENSIONS:
            raise
        sys.stderr.write(
            f"WARNING: tcptotcp compiled core not built ({exc!r}); "
            "installing the pure-Python backend only.\n"
        )


def _extensions():
    if NO_EXTENSIONS:
        return []
    from setuptools import Extension

    try:
        from Cython.Build import cythonize
    except ImportError as exc:
        if REQUIRE_EXTENSIONS:
            raise
        sys.stderr.write(f"WARNING: Cython unavailable ({exc}); pure-Python install.\n")
        return []
    ext = Extension(
        "tcptotcp._core",
        ["src/tcptotcp/_core.pyx"],
        depends=sorted(glob.glob("src/tcptotcp/_loop*.h")) + ["src/tcptotcp/_loop.pxd"],
        extra_compile_args=["-O2"],
    )
    try:
        return cythonize([ext], compiler_directives={"language_level": "3"}, quiet=True)
    except Exception as exc:
        if REQUIRE_EXTENSIONS:
            raise
        sys.stderr.write(f"WARNING: cythonize failed ({exc}); pure-Python install.\n")
        return []


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
