"""Build fastdl's compiled extensions (Cython sources in kernels/).

OpenMP is used when the compiler supports it; otherwise the extensions are
built serially (prange then runs as a plain loop), so the build never fails
for lack of OpenMP.
"""
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
EXTENSIONS = {
    # module name -> source file under kernels/
    "fastdl._build_info": "kernels/_build_info.pyx",
    # the GEMM entry point of both compiled backends (fastdl/backends/blas.py picks the BLAS)
    "fastdl._kernels._blas": "kernels/_blas.pyx",
    # the Cython backend (fastdl/backends/cython_backend.py imports these)
    "fastdl._kernels._dense": "kernels/_dense.pyx",
    "fastdl._kernels._batchnorm": "kernels/_batchnorm.pyx",
    "fastdl._kernels._losses": "kernels/_losses.pyx",
    "fastdl._kernels._dropout": "kernels/_dropout.pyx",
    "fastdl._kernels._optim": "kernels/_optim.pyx",
    # the whole-epoch executor: a nogil C loop over fastdl.plan's encoding that calls the nogil
    # cores of the modules above (cimported through kernels/fastdl/_kernels/*.pxd)
    "fastdl._kernels._epoch": "kernels/_epoch.pyx",
}
# C headers (kernels/*.h) and the cimport path: the .pxd of module fastdl._kernels.X is
# kernels/fastdl/_kernels/X.pxd (Cython looks it up by qualified name), shared declarations are in
# kernels/_kernel_common.pxd.
KERNEL_DIR = "kernels"


def _has_openmp(compiler) -> bool:
    """Try to compile and link a tiny OpenMP program with this compiler."""
    if os.environ.get("FASTDL_NO_OPENMP"):
        return False
    flag = "/openmp" if compiler.compiler_type == "msvc" else "-fopenmp"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "omp_test.c"
        src.write_text("#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n")
        try:
            objs = compiler.compile([str(src)], output_dir=tmp, extra_postargs=[flag])
            compiler.link_executable(objs, "omp_test", output_dir=tmp,
                                     extra_postargs=[] if flag == "/openmp" else [flag])
        except Exception:
            return False
    return True


class BuildExt(build_ext):
    def build_extensions(self):
        omp = _has_openmp(self.compiler)
        is_msvc = self.compiler.compiler_type == "msvc"
        for ext in self.extensions:
            ext.extra_compile_args += ["/O2"] if is_msvc else ["-O3"]
            if omp:
                ext.extra_compile_args.append("/openmp" if is_msvc else "-fopenmp")
                if not is_msvc:
                    ext.extra_link_args.append("-fopenmp")
            ext.define_macros.append(("FASTDL_OPENMP", "1" if omp else "0"))
        print(f"fastdl: building extensions {'with' if omp else 'without'} OpenMP", file=sys.stderr)
        super().build_extensions()


def extensions():
    from Cython.Build import cythonize

    exts = [
        Extension(name, [src], include_dirs=[np.get_include(), KERNEL_DIR],
                  define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")])
        for name, src in EXTENSIONS.items()
    ]
    return cythonize(exts, language_level=3, include_path=[KERNEL_DIR], compiler_directives={
        "boundscheck": False, "wraparound": False, "cdivision": True, "initializedcheck": False,
    })


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
