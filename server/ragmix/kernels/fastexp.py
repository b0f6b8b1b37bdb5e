"""exp and log that LLVM can vectorise inside Numba loops.

Numba's `np.exp` / `math.exp` compile to a scalar libm call per element (the PyPI llvmlite has no
SVML), which stops the loop from vectorising and makes a Numba softmax slower than numpy's
(docs/DESIGN.md § Performance model). These versions are range reduction plus a polynomial, with the power of
two assembled from exponent bits through a bitcast, so a loop that calls them has no calls left.

- `fexp32(x)`: float32 exp (Cephes expf polynomial), relative error ~2 ulp for x in [-87.3, 88];
  exactly 0 below -87.3 (including -inf), so a masked logit contributes nothing.
- `flog32(x)`: log of a positive *normal* float32, returned as float64, absolute error < 1e-9 beyond
  the input's own rounding. Callers keep zeros and denormals away (they take the exact path).

Loops that call them must be compiled with `fastmath=FASTMATH, error_model="numpy"`: Python's error
model checks every float division for zero, and that branch alone stops vectorisation.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# Fast-math without "nnan"/"ninf": priors and masked logits are -inf and must stay -inf.
FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}

_EXP_LO = np.float32(-87.33654)  # below this expf underflows float32's normal range
_EXP_HI = np.float32(88.37626)
_LOG2E = np.float32(1.44269504088896341)
_LN2_HI = np.float32(0.693359375)  # ln 2 split in two so n * _LN2_HI is exact
_LN2_LO = np.float32(-2.12194440e-4)
_SQRT2 = np.float32(1.41421356)
_LN2 = 0.6931471805599453


@intrinsic
def _int_as_f32(typingctx, i):
    """Reinterpret the low 32 bits of an integer as a float32 (a bitcast, no conversion)."""
    if not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if i.bitwidth != 32:
            value = builder.trunc(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(i), codegen


@intrinsic
def _f32_as_i32(typingctx, x):
    """Reinterpret a float32's bits as an int32."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(x), codegen


@intrinsic
def _low32_as_f64(typingctx, i):
    """float64 of the low 32 bits of an integer as a signed int32.

    Numba widens int32 arithmetic to int64, and AVX2 has no vector int64 -> double conversion;
    converting from int32 keeps the loop vectorised.
    """
    if not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if i.bitwidth != 32:
            value = builder.trunc(value, ir.IntType(32))
        return builder.sitofp(value, ir.DoubleType())

    return types.float64(i), codegen


@njit(inline="always", fastmath=FASTMATH, error_model="numpy", cache=True)
def fexp32(x: np.float32) -> np.float32:
    """exp(x) in float32 without a libm call: x = n ln2 + r, |r| <= ln2/2, exp(r) by polynomial."""
    xc = min(max(x, _EXP_LO), _EXP_HI)
    n = np.floor(xc * _LOG2E + np.float32(0.5))
    r = xc - n * _LN2_HI - n * _LN2_LO
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    y = p * r * r + r + np.float32(1.0)
    two_n = _int_as_f32((np.int32(n) + np.int32(127)) << np.int32(23))  # 2**n from exponent bits
    return y * two_n if x >= _EXP_LO else np.float32(0.0)


@njit(inline="always", fastmath=FASTMATH, error_model="numpy", cache=True)
def flog32(x: np.float32) -> float:
    """log(x) for a positive normal float32: exponent from the bits, log of the mantissa by series."""
    bits = _f32_as_i32(x)
    e = ((bits >> 23) & 0xFF) - 127
    m = _int_as_f32((bits & 0x7FFFFF) | 0x3F800000)  # mantissa in [1, 2)
    big = m > _SQRT2
    m = m * np.float32(0.5) if big else m  # now in [sqrt(1/2), sqrt(2)]
    e = e + 1 if big else e
    mf = np.float64(m)
    s = (mf - 1.0) / (mf + 1.0)  # |s| <= 0.172: log m = 2 atanh(s)
    z = s * s
    series = 1.0 + z * (1.0 / 3.0 + z * (1.0 / 5.0 + z * (1.0 / 7.0 + z * (1.0 / 9.0))))
    return _low32_as_f64(e) * _LN2 + 2.0 * s * series
