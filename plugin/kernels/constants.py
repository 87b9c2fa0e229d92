"""Constants of the threshold solvers, shared by the Python, C and Triton implementations.

The Python functions of :mod:`plugin.kernels.maths` read them as module constants, the C row
kernel ``entmax_rows.c`` receives them as ``-D`` defines (:func:`c_defines`; the build cache
digests the compiler flags, so a change here rebuilds the library), and the Triton kernels
of :mod:`plugin.kernels.triton_entmax` as ``tl.constexpr`` arguments.
"""

from __future__ import annotations

# the kinds of rows the kernels solve: alpha = 2 (sparsemax), alpha = 1.5, any other alpha
SPARSEMAX, ENTMAX15, GENERAL = 0, 1, 2
KIND_NAMES = {SPARSEMAX: "sparsemax", ENTMAX15: "entmax15", GENERAL: "general alpha"}

# Newton's method on the threshold (plugin.kernels.maths.newton_threshold): at most this many
# steps per row (the closed-form kinds end exactly in a handful; a general alpha in a few more) ...
NEWTON_MAX_ITERS = 100
# ... and a general-alpha row is done when sum_j p_j is within this of 1 before normalization
# (or when a step no longer moves the threshold in float32; the final division by the sum
# absorbs the rest)
NEWTON_TOL = 2e-6


def c_defines() -> tuple[str, ...]:
    """The constants as C preprocessor definitions (``-DNAME=value``) for ``entmax_rows.c``."""
    return (
        f"-DKIND_SPARSEMAX={SPARSEMAX}",
        f"-DKIND_ENTMAX15={ENTMAX15}",
        f"-DKIND_GENERAL={GENERAL}",
        f"-DNEWTON_MAX_ITERS={int(NEWTON_MAX_ITERS)}",
        f"-DNEWTON_TOL={float(NEWTON_TOL)!r}f",
    )
