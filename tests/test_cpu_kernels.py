"""The CPU kernels the numerics tests depend on, one operation at a time, against their exact definition, with the
bounds of tests/tolerances.py; then the same checks, and the float8 model test, on a non-native instruction set.

Different x86-64 CPUs run different kernels for the same call: torch's ATen picks AVX2 or AVX-512 code
(`ATEN_CPU_CAPABILITY`), oneDNN blocks and accumulates by ISA (AVX2, AVX-512, AVX-512-BF16, AMX;
`ONEDNN_MAX_CPU_ISA`), and `torch._scaled_mm` runs oneDNN's float8 matmul on AMX CPUs and a float32 fallback
elsewhere. A bound that holds for one kernel only is a measurement; these hold for any summation order.

To run the kernel-sensitive files on another ISA by hand (`default` is scalar code, `avx2`, `avx512`):
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 DNNL_MAX_CPU_ISA=AVX2 \\
        .venv/bin/python -m pytest tests/test_cpu_kernels.py tests/test_fp8.py tests/test_float8_weights.py -q
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tolerances import U32, UBF16, worst

ROOT = Path(__file__).resolve().parents[1]
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def within(out: torch.Tensor, exact: torch.Tensor, terms: torch.Tensor, k: int, extra: float = 0.0) -> bool:
    """|out - exact| <= u_bf16 |exact| (the bf16 output rounding) + (gamma_K + extra) (|a| @ |b|) (any float32
    accumulation order of a length-K dot product, relative to the sum of |terms|; `extra`: further roundings of each
    term, e.g. scaling an operand)."""
    bound = UBF16 * exact.abs() + (1 + UBF16) * (worst(k) + extra) * terms
    return bool(((out.double() - exact).abs() <= bound).all())


def float8_operands(m: int, k: int, n: int, dtype_a: torch.dtype, seed: int = 0):
    """As torchao casts them: x (m x k) and w (n x k) scaled to their dtype's range, then w transposed (column-major)."""
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    scale_a = torch.finfo(dtype_a).max / x.abs().max()
    scale_b = torch.finfo(E4M3).max / w.abs().max()
    a = (x * scale_a).to(dtype_a)
    b = (w * scale_b).to(E4M3).t()
    return a, b, scale_a.float(), scale_b.float()


@pytest.mark.parametrize("k", [64, 128, 256])
@pytest.mark.parametrize("dtype_a", [E4M3, E5M2], ids=["e4m3", "e5m2-gradient"])
def test_scaled_mm_is_its_float32_definition(k, dtype_a):
    """torch._scaled_mm (oneDNN on AMX CPUs, ATen's float32 fallback elsewhere) and torchao's emulation (dequantize,
    float32 mm) both within one bf16 rounding and gamma_K of the exact product. A scale off by 1% fails (checked)."""
    a, b, scale_a, scale_b = float8_operands(77, k, 48, dtype_a)
    inverse_a, inverse_b = scale_a.reciprocal(), scale_b.reciprocal()
    # float8 products have <= 8 significant bits and K <= 2^8 of them sum exactly in float64
    exact = (a.double() @ b.double()) * inverse_a.double() * inverse_b.double()
    terms = (a.double().abs() @ b.double().abs()) * inverse_a.double() * inverse_b.double()
    kernel = torch._scaled_mm(a, b, scale_a=inverse_a, scale_b=inverse_b, out_dtype=torch.bfloat16)
    emulated = torch.mm(a.float() / scale_a, b.float() / scale_b).to(torch.bfloat16)  # torchao's emulate=True
    assert kernel.dtype == emulated.dtype == torch.bfloat16
    assert within(kernel, exact, terms, k, extra=2 * U32)  # two float32 scale multiplications
    assert within(emulated, exact, terms, k, extra=2 * U32)  # two float32 divisions of the operands
    assert not within(kernel.double() * 1.01, exact, terms, k, extra=2 * U32)  # the bound sees a 1% scale error


@pytest.mark.parametrize("k", [64, 128, 1024])
def test_bf16_linear_under_autocast_is_its_float32_definition(k):
    """bf16 GEMM (oneDNN's AVX-512-BF16 / AMX kernels, ATen's elsewhere): float32 accumulation, one bf16 rounding."""
    g = torch.Generator().manual_seed(k)
    x, w = torch.randn(77, k, generator=g).bfloat16(), torch.randn(48, k, generator=g).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.nn.functional.linear(x, w)
    exact = x.double() @ w.double().t()  # bf16 products (16 bits) summed exactly in float64 for K <= 2^10
    assert out.dtype == torch.bfloat16
    assert within(out, exact, x.double().abs() @ w.double().abs().t(), k)
    assert not within(out.double() * 1.01, exact, x.double().abs() @ w.double().abs().t(), k)


def test_bitsandbytes_nf4_and_8_bit_blockwise_round_trips_and_4_bit_matmul():
    """bitsandbytes' CPU backend: NF4 weights within half the largest gap of the NF4 code times their block's absmax
    (plus the bf16 rounding of the dequantized value); 8-bit blockwise (optimizer states) within half the largest
    gap of the dynamic map; the 4-bit matmul within one bf16 rounding and gamma_K of x @ dequantized(W)^T, with
    the dequantized weights possibly rounded to bf16 inside the kernel (u_bf16 |x| @ |W|)."""
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=g).bfloat16()
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    d = F.dequantize_4bit(q, state)
    nf4 = torch.sort(F.get_4bit_type("nf4", device="cpu").double()).values
    half_gap = float(((nf4[1:] - nf4[:-1]) / 2).max())  # 0.152
    absmax = w.double().abs().reshape(-1, 64).amax(1, keepdim=True)
    error = (d.double() - w.double()).abs().reshape(-1, 64)
    assert (error <= half_gap * absmax + UBF16 * d.double().abs().reshape(-1, 64) + U32 * absmax).all()

    x = torch.randn(5, 128, generator=g).bfloat16()
    out = bnb.matmul_4bit(x, q.t(), quant_state=state)
    exact = x.double() @ d.double().t()
    terms = x.double().abs() @ d.double().abs().t()
    assert within(out, exact, terms, 128, extra=UBF16)

    s = torch.randn(4096, generator=g)
    q8, state8 = F.quantize_blockwise(s, blocksize=256)
    code = torch.sort(state8.code.double()).values
    half_gap8 = float(((code[1:] - code[:-1]) / 2).max())  # 0.0070 of the block's absmax
    absmax8 = s.double().abs().reshape(-1, 256).amax(1, keepdim=True)
    error8 = (F.dequantize_blockwise(q8, state8).double() - s.double()).abs().reshape(-1, 256)
    assert (error8 <= (half_gap8 + 2 * U32) * absmax8).all()


# ------------------------------------------------------------------ the same on another instruction set
NON_NATIVE = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"}
ISA_CHECKS = [
    "tests/test_cpu_kernels.py",
    "tests/test_float8_weights.py",
    "tests/test_fp8.py::test_fp8_loss_logits_and_gradients_match_bf16[lora-tensorwise]",
    "tests/test_fp8.py::test_gradient_checkpointing_gives_the_same_gradients",
]


def test_the_instruction_set_asked_for_is_the_one_in_use():
    """In the child of the test below: ATen really runs the capability it was asked for."""
    asked = os.environ.get("ATEN_CPU_CAPABILITY")
    if not asked or not os.environ.get("NVILA_FT_ISA_CHILD"):
        pytest.skip("checked in the non-native run below")
    assert torch.backends.cpu.get_cpu_capability() == asked.upper()


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 instruction sets")
def test_kernel_checks_pass_on_avx2_kernels():
    """ATen's AVX2 kernels and oneDNN capped at AVX2 (no AVX-512, BF16 or AMX paths): the checks above, the float8
    weights' bit-for-bit claims and the float8 model test (one parametrisation). ~20 s on 2 cores."""
    if os.environ.get("NVILA_FT_ISA_CHILD"):
        pytest.skip("already the non-native run")
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("ATen already runs its scalar fallback here (no AVX2, or ATEN_CPU_CAPABILITY=default)")
    env = {**os.environ, **NON_NATIVE, "NVILA_FT_ISA_CHILD": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *ISA_CHECKS], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-4000:] + result.stderr[-2000:]
