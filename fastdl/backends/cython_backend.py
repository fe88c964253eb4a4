"""The Cython backend: every kernel of :mod:`fastdl.backends.contract`.

The kernels are compiled from ``kernels/*.pyx`` into ``fastdl._kernels``
(see ``setup.py``). Importing this module raises ``ImportError`` when the
extensions are not built, and :func:`fastdl.backends.get_backend` then falls
back to the other backends.

The names below are the compiled functions themselves (no Python wrapper),
with the reference signatures. Each validates its arguments on the NumPy C
API (dtype float32/float64 shared by all float arrays, C-contiguous, aligned,
native byte order, writeable outputs, matching shapes) and raises ValueError
for anything else (the validated entry points, ``get_backend('cython').<kernel>``,
say which argument is wrong). BLAS (GEMM):
see :mod:`fastdl.backends.blas` (MKL when installed, else SciPy's OpenBLAS); elementwise passes use OpenMP threads
above per-kernel size thresholds when the build has OpenMP
(:func:`fastdl._build_info.openmp_enabled`), and respect
``OMP_NUM_THREADS`` / ``threadpoolctl``. ``build_info()`` reports how the extensions were built.
"""
from __future__ import annotations


# The kernels use libgomp (one runtime per process, shared with Numba's "omp"
# threading layer). Unless told otherwise, its idle workers spin for
# milliseconds after every parallel region, on the cores OpenBLAS's threads
# need for the next GEMM and that other processes need on a shared machine
# (measured: a 2-thread region then waits a whole scheduler timeslice, ~10 ms,
# for its worker). A passive policy costs a futex wake-up per region instead,
# which the kernels' size thresholds absorb. Same setting as the Numba
# backend; it only takes effect if libgomp is not loaded yet, and an explicit
# user setting always wins.
from fastdl.backends.runtime import prepare_openmp  # noqa: E402

prepare_openmp()  # OMP_WAIT_POLICY before libgomp loads (fastdl.backends.runtime)

from fastdl.backends import blas as _blas_choice  # noqa: E402

_blas_choice.select()   # MKL or SciPy's OpenBLAS for the GEMMs, before any kernel runs

from fastdl._kernels._batchnorm import (  # noqa: E402
    batchnorm_backward, batchnorm_forward_infer, batchnorm_forward_train)
from fastdl._kernels._dense import (  # noqa: E402
    activation_backward, activation_forward, build_info, dense_backward, dense_forward)
from fastdl.backends.contract import KERNELS  # noqa: E402
from fastdl._kernels._dropout import dropout_backward, dropout_forward  # noqa: E402
from fastdl._kernels._losses import mse, poisson, sigmoid_bce, softmax, softmax_cross_entropy  # noqa: E402
from fastdl._kernels._optim import (  # noqa: E402
    adam_step, all_finite, momentum_step, nesterov_step, rmsprop_step, sgd_step, sum_squares)
# The whole-epoch executor (kernels/_epoch.pyx): epoch_executor(plan, batch_size, opt_spec) ->
# fastdl.plan.EpochExecutor, one nogil C loop per epoch over the plan, bit-identical to this
# backend's per-layer path (it calls the same compiled cores).
from fastdl._kernels._epoch import epoch_executor  # noqa: E402
# bf16 Dense cores with each GEMM operand rounded once (docs/spec.md section 13): Backend.bf16_cores()
from fastdl._kernels._dense import dense_backward_bf16, dense_forward_bf16, round_bf16  # noqa: E402
from fastdl._kernels._blas import bf16_gemm_packs  # noqa: E402  (which bf16 products a packing kernel runs)

__all__ = [*KERNELS, "build_info", "epoch_executor"]
