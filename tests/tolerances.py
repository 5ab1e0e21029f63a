"""Numeric tolerances of the test suite, computed from the arithmetic rather than read off one machine.

A tolerance in these tests is one of three kinds (tests/TOLERANCES.md lists every one with its derivation):

* exact (0): both sides run the same operations on the same values in the same order, on any machine;
* a rounding bound: the unit roundoff u of the dtype the work is done in, times a bound on how many roundings
  reach one result (the accumulation length n), times the magnitude of the terms involved;
* a quantization bound: the step of a quantized format (float8, bitsandbytes' 8-bit maps) at its scale.

Unit roundoffs (half the distance from 1 to the next number): float64 2^-53, float32 2^-24, float16 2^-11,
bfloat16 2^-8, float8 e4m3 2^-4, float8 e5m2 2^-3.

Two bounds on a sum of n terms (a dot product, a reduction, a chain of them), relative to sum(|terms|):

* ``worst(n) = n u / (1 - n u)``: Higham's gamma_n (Accuracy and Stability of Numerical Algorithms, 2nd ed.,
  section 3.1): any order of summation, any machine, no assumption.
* ``likely(n) = LAMBDA sqrt(n) u``: Higham & Mary, "A new approach to probabilistic rounding error analysis",
  SIAM J. Sci. Comput. 41(5), 2019, theorem 2.4: with rounding errors independent and of mean zero, it holds for
  one result with probability at least 1 - 2 exp(-LAMBDA^2 / 2) (LAMBDA = 8: 1 - 2.5e-14).

CPUs sum the same terms in different orders (ATen's AVX2 / AVX-512 kernels, oneDNN and MKL choose blocking by
ISA; AMX and AVX-512-BF16 add pairs before accumulating). Two such evaluations each lie within the bound of the
exact value, so they differ by at most twice it: that is what `reordered` returns.
"""

from __future__ import annotations

import math

import torch

UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
    torch.float8_e4m3fn: 2.0**-4,
    torch.float8_e5m2: 2.0**-3,
}
U64, U32, U16, UBF16 = (UNIT_ROUNDOFF[d] for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16))
UE4M3, UE5M2 = UNIT_ROUNDOFF[torch.float8_e4m3fn], UNIT_ROUNDOFF[torch.float8_e5m2]
LAMBDA = 8.0

# Accumulation lengths of the tiny NVILA presets (tiny preset dims in nvila_ft/model/presets.py), summed along
# the longest chain of reductions from pixels to the loss; T is the sequence length, at most ~1000 in the tests.
#   vision: patch embedding 3*8*8 = 192; per SigLIP layer LN 32 + qkv 32 + QK 16 + softmax 16 + AV 16 + out 32
#           + LN 32 + fc1 32 + fc2 64 = 272, two layers used = 544
#   S2 area resize <= 9; projector (3x3 STC, the largest): LN 864 + linear 864 + linear 64 = 1792
#   LLM: per Qwen2 layer RMSNorm 64 + qkv 64 + QK 16 + softmax T + AV T + o 64 + RMSNorm 64 + gate/up 64
#        + down 128 = 528 + 2T, two layers = 1056 + 4T; final RMSNorm 64 + lm_head 64 = 128
#   loss: logsumexp over the vocabulary 2048 + mean over at most T tokens
# = 5769 + 5T <= 2^14 for T <= 2000. The backward pass runs the transposed reductions of the same chain and
# sums each weight's gradient over the T positions: at most twice the forward plus T, <= 2^15.
TINY_FORWARD = 2**14
TINY_TRAIN_STEP = 2**15


def unit_roundoff(dtype: torch.dtype) -> float:
    return UNIT_ROUNDOFF[dtype]


def worst(n: int, dtype: torch.dtype = torch.float32) -> float:
    """gamma_n: relative error bound of any n-term float sum, relative to the sum of |terms|."""
    nu = n * unit_roundoff(dtype)
    assert nu < 1, f"n = {n} is too long for {dtype}: the worst-case bound is vacuous"
    return nu / (1 - nu)


def likely(n: int, dtype: torch.dtype = torch.float32) -> float:
    """LAMBDA sqrt(n) u: the probabilistic bound of an n-term float sum, relative to the sum of |terms|."""
    return LAMBDA * math.sqrt(n) * unit_roundoff(dtype)


def scale_of(values) -> float:
    """The magnitude that a bound multiplies: the largest |value| of a tensor, a number or a dict of tensors."""
    if isinstance(values, dict):
        return max(scale_of(v) for v in values.values())
    if isinstance(values, torch.Tensor):
        return float(values.detach().abs().max()) if values.numel() else 0.0
    return abs(float(values))


def accumulation(n: int, dtype: torch.dtype = torch.float32) -> float:
    """The smaller of the two bounds (the worst case is the smaller one below n = LAMBDA^2 = 64)."""
    return min(worst(n, dtype), likely(n, dtype)) if n * unit_roundoff(dtype) < 0.5 else likely(n, dtype)


def reordered(n: int, scale: float, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """`assert_close(..., **reordered(n, scale))`: the same real arithmetic evaluated twice in `dtype` in different
    orders (other kernel, other blocking, other batch shape, other chunking), n roundings reaching each result, terms
    of magnitude `scale`: each side lies within accumulation(n) * scale of the exact value, so the two differ by at
    most atol = 2 accumulation(n) scale. rtol = 0: the error scales with the terms, not with each result."""
    return {"atol": 2 * accumulation(n, dtype) * scale, "rtol": 0.0}


def rounding_rms(dtype: torch.dtype) -> float:
    """Root-mean-square relative error of rounding to `dtype`: an error spread evenly over [-u, u] has rms u/sqrt(3)."""
    return unit_roundoff(dtype) / math.sqrt(3)


def product_rms(*dtypes: torch.dtype) -> float:
    """Relative rms error of a product (or a dot product, with independent errors) whose factors were each rounded to
    the given dtypes: the factors' independent errors add in quadrature."""
    return math.sqrt(sum(rounding_rms(d) ** 2 for d in dtypes))


def flips(seed: torch.dtype, quantized: torch.dtype) -> float:
    """Relative rms difference of two quantizations to `quantized` of inputs that differ by up to one rounding of
    `seed` (u_s relative) per element. An element flips to the neighbouring value only when it lies within u_s|x| of
    a rounding boundary of `quantized`, whose points are at least u_q|x| apart: probability <= u_s / u_q; a flip
    moves it by one step, <= 2 u_q |x|. rms <= sqrt(u_s / u_q) * 2 u_q = 2 sqrt(u_s u_q). A matrix product passes
    its operand's relative rms difference on to its output."""
    return 2 * math.sqrt(unit_roundoff(seed) * unit_roundoff(quantized))


def cross_entropy(vocab: int, tokens: int, loss: float, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Two evaluations of mean_t(logsumexp(z_t) - z_t,label) from the same logits (another chunking, a hand loop):
    logsumexp sums `vocab` terms exp(z - max z) <= 1 whose sum S >= 1, so its relative error accumulation(vocab) is
    an absolute error of log S; the mean over `tokens` adds accumulation(tokens) |loss|. Twice that, as atol."""
    return {"atol": 2 * (accumulation(vocab, dtype) + accumulation(tokens, dtype) * abs(float(loss))), "rtol": 0.0}


def dynamic_map_half_gap(signed: bool, above: float) -> float:
    """bitsandbytes' 8-bit optimizer states are blockwise quantized to its dynamic map (signed for Adam's m,
    unsigned for v) at the block's absmax: the largest half gap between neighbouring map values, relative to the
    value, over values at least `above` x absmax. Signed: 0.066 above 0.1, 0.123 above 0.01; unsigned 0.123 above
    1e-3, 0.220 above 1e-4."""
    import bitsandbytes.functional as F

    code = F.create_dynamic_map(signed=signed).double()
    values = torch.sort(code[code > 0]).values
    relative = (values[1:] - values[:-1]) / 2 / values[:-1]
    return float(relative[values[:-1] >= above].max())

# A float64 metric in [0, 1] (a mean of 0/1 scores, an IoU of boxes in [0, 1], a box scaled by the image size)
# computed through at most 64 roundings of quantities at most 1 in magnitude, against the same value written out
# another way: METRIC apart at most.
METRIC = worst(64, torch.float64)
