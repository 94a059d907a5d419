"""The model's linear layers laid out for decode steps on CPU.

The batching engine (transformers_batching.py) runs a step of a few rows at a
time, where a plain ``nn.Linear`` spends its time on layout and dispatch
rather than arithmetic. Here:

- :class:`DecodeLinear`: the weight stored (in, out), and MKL-packed for a
  fixed number of rows where that works;
- :class:`Int4Linear`: a Q4_1 GGUF's layers on torch's int4 kernel, their
  4-bit codes kept exactly (``int4_weights``);
- :class:`Q8Linear`: the Q8_0 output layer as two int4 products of its 8-bit
  codes, at the few rows where that beats bfloat16;
- :func:`compute_dtype` and :func:`prepare_for_decoding`.

This module imports torch; the plugin imports it lazily, in a worker thread.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, NamedTuple

import torch
from torch import nn

from plugins.transformers_q4 import Q4Kernel, Q4Weight, Q8Weight

logger = logging.getLogger(__name__)

class DecodeLinear(nn.Module):
    """``nn.Linear`` laid out for decode steps of a few rows, on CPU.

    - the weight is stored (in, out): MKL multiplies a few rows by it faster
      than by the transposed view F.linear uses;
    - optionally it is also packed by MKL for exactly ``packed_rows`` rows.
      Between 3/4 of ``packed_rows`` and ``packed_rows`` the input is padded
      with zero rows to use it. It costs a second copy of the weights, so it
      is an option (``packed_weights``).

    The step times that chose this layout are in docs/benchmarks.md.
    """

    def __init__(self, linear: nn.Linear, packed_rows: int | None = None):
        super().__init__()
        weight = linear.weight.detach()
        self.weight_t = nn.Parameter(weight.t().contiguous(), requires_grad=False)
        self.bias = linear.bias
        self.packed_rows = packed_rows
        self.packed = None
        if packed_rows:
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, packed_rows)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.numel() // hidden.shape[-1]
        if self.packed is not None and 3 * self.packed_rows <= 4 * rows <= 4 * self.packed_rows:
            return self._packed_forward(hidden, rows)
        out = torch.matmul(hidden, self.weight_t)
        return out if self.bias is None else out + self.bias

    def _packed_forward(self, hidden: torch.Tensor, rows: int) -> torch.Tensor:
        flat = hidden.reshape(rows, hidden.shape[-1])
        if rows < self.packed_rows:
            flat = torch.cat([flat, flat.new_zeros((self.packed_rows - rows, flat.shape[1]))])
        out = torch.ops.mkl._mkl_linear(
            flat, self.packed, self.weight_t.t(), self.bias, self.packed_rows)
        return out[:rows].reshape(*hidden.shape[:-1], out.shape[-1])


def _packing_works(packed_rows: int) -> bool:
    """MKL's packed GEMM is there and agrees with a plain matmul."""
    try:
        probe = nn.Linear(64, 48)
        plain, packed = DecodeLinear(probe), DecodeLinear(probe, packed_rows)
        sample = torch.randn(packed_rows, 64)
        return torch.allclose(plain(sample), packed(sample), atol=1e-4)
    except (AttributeError, RuntimeError) as exc:
        logger.info("MKL packed weights unavailable (%s); using plain ones", type(exc).__name__)
        return False


# A 4-bit weight's group: GGUF's Q4 blocks are 32 weights along the input.
INT4_GROUP = 32
# Most rows that Int4Linear sends through the int4 kernel; prompts (more rows)
# take the full weight, on which 30 to 120 rows ran 1.2-1.7x faster (AMD EPYC
# with AVX512-BF16). The kernel's cost grows with the rows; with AMX, oneDNN's
# bfloat16 products hardly do: on a Xeon with AMX a decode step of 12 rows took
# 60-63 ms on the full weights against 68-88 on int4, and 16 rows 66-84
# against 74-101, while 8 rows still took 40-45 on int4 against 49-63.
INT4_MAX_ROWS = 16
INT4_MAX_ROWS_AMX = 8
# torch's int4 CPU kernel is vectorised for bfloat16 inputs only (its tinygemm
# kernels for AVX2 and AVX512); float32 takes a scalar loop, 7-22x slower than
# float32's own matmul on an AVX2-only AMD EPYC. So the kernel always runs in
# bfloat16: the scales are kept in it whatever the model's dtype, and a float32
# model's inputs to these layers are rounded to it (outputs cast back).
KERNEL_DTYPE = torch.bfloat16


def int4_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The 4-bit codes, scales and zeros of a weight that is 4-bit already, else None.

    "4-bit already": every group of 32 inputs holds at most 16 evenly spaced
    values from its minimum to its maximum, as a de-quantized Q4_1 block does
    (llama.cpp maps a block's minimum to code 0 and its maximum to 15). Then
    the codes give back the very weights; any other weight is left alone.
    Codes are (out, in) in 0..15; weight = (code - 8) * scale + zero, per group,
    the layout of torch's int4 kernel.
    """
    out_features, in_features = weight.shape
    if in_features % INT4_GROUP or out_features % 16:  # the kernel's packing needs both
        return None
    groups = weight.detach().float().reshape(out_features, -1, INT4_GROUP)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low) / 15
    codes = ((groups - low) / torch.where(scale > 0, scale, 1)).round().clamp(0, 15)
    if ((codes * scale + low - groups).abs() > 0.01 * scale + 1e-7).any():
        return None
    return (codes.to(torch.int32).reshape(out_features, in_features),
            scale.squeeze(-1).t(), (low + 8 * scale).squeeze(-1).t())


def _as_hidden(out: torch.Tensor, hidden: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A product of ``hidden``'s rows, flattened, back in its dtype and shape, plus the bias."""
    out = out.to(hidden.dtype).reshape(*hidden.shape[:-1], out.shape[-1])
    return out if bias is None else out + bias


class Int4Linear(nn.Module):
    """``nn.Linear`` whose weight is 4-bit already, on an int4 kernel: torch's,
    or in a float32 model the compiled one of transformers_q4.py, if given.

    A decode step reads every weight once, and on a few rows that reading is
    the step (docs/agents/transformers.md): a quarter of bfloat16's bytes.
    Prompts, many rows at once, are bound by arithmetic instead, where the
    kernel's de-quantizing costs more than it saves: they use the full weight,
    kept beside the codes, which takes the model's dtype with ``model.to(dtype)``.
    The codes' scales are plain attributes, not buffers, so that they keep
    the kernel's dtype.
    """

    def __init__(self, linear: nn.Linear, codes: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                 max_rows: int = INT4_MAX_ROWS, kernel: Q4Kernel | None = None):
        super().__init__()
        values, scales, zeros = codes
        self.out_features = linear.out_features
        self.max_rows = max_rows
        self.kernel = kernel
        if kernel is not None:
            self.q4 = Q4Weight.from_codes(values, scales, zeros)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
            self.register_buffer("packed", packed)
            self.scales_and_zeros = torch.stack([scales, zeros], dim=-1).to(
                KERNEL_DTYPE).contiguous()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        if flat.shape[0] > self.max_rows:
            return nn.functional.linear(hidden, self.weight, self.bias)
        if self.kernel is not None:
            return _as_hidden(self.kernel.matmul(flat, self.q4), hidden, self.bias)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat.to(KERNEL_DTYPE).contiguous(), self.packed, INT4_GROUP, self.scales_and_zeros)
        return _as_hidden(out, hidden, self.bias)


# Most rows that the Q8_0 layer sends through the int4 kernel. Its output
# layer (49152 x 576 for SmolLM2) took 4.0-5.1 ms against 7.8-10.8 ms in
# bfloat16 at 1 row and 8.5 against 11.4 ms at 4, but 14 against 11.4 at 6.
Q8_MAX_ROWS = 4


def q8_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The 8-bit codes and scales of a weight that is Q8_0 already, else None.

    "Q8_0 already": every group of 32 inputs is a scale times integers from
    -127 to 127, the scale being the group's largest magnitude over 127, which
    is what llama.cpp's Q8_0 stores (the bundled model's output layer).
    Codes are (out, in) in 1..255 (the integer plus 128); scales (groups, out).
    """
    out_features, in_features = weight.shape
    if in_features % INT4_GROUP:
        return None
    groups = weight.detach().float().reshape(out_features, -1, INT4_GROUP)
    scale = groups.abs().amax(-1, keepdim=True) / 127
    codes = groups / torch.where(scale > 0, scale, 1)
    if ((codes - codes.round()).abs() > 0.01).any():
        return None
    return ((codes.round() + 128).to(torch.int32).reshape(out_features, in_features),
            scale.squeeze(-1).t())


class Q8Linear(nn.Module):
    """``nn.Linear`` whose weight is Q8_0 already, on torch's int4 CPU kernel
    or, in a float32 model, the compiled one.

    torch has no kernel for 8-bit weights in groups of 32 (its int8 one takes
    one scale per output), so each 8-bit code is split in two 4-bit halves,
    ``code - 128 = 16 * (high - 8) + low``, and the layer is the sum of two
    int4 products with the same group scale: 16 * scale for the high half,
    scale with a zero of 8 * scale for the low one. The codes are kept
    exactly; the scale is rounded to ``KERNEL_DTYPE``, as in :class:`Int4Linear`.
    That reads half of bfloat16's bytes, which wins at up to ``Q8_MAX_ROWS``
    rows; more rows use the full weight, kept beside the codes. The outputs
    are padded to the kernel's multiple of 16.

    With the compiled ``kernel`` (a float32 model, transformers_q4.py), the
    8-bit codes are multiplied as they are, up to ``max_rows`` rows: for
    SmolLM2's 49152 x 576 output layer on an AVX2-only AMD EPYC, 1.6-1.9 ms at
    one row against 4.7-6.5 on the halves, 4.3-5.6 at 8 against 11.6-15.3 ms
    on the full weight.
    """

    def __init__(self, linear: nn.Linear, codes: tuple[torch.Tensor, torch.Tensor],
                 kernel: Q4Kernel | None = None, max_rows: int = INT4_MAX_ROWS):
        super().__init__()
        values, scales = codes
        self.out_features = linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.kernel = kernel
        self.max_rows = max_rows if kernel is not None else Q8_MAX_ROWS
        if kernel is not None:
            self.q8 = Q8Weight.from_codes(values, scales)
            return
        padding = -self.out_features % 16
        values = nn.functional.pad(values, (0, 0, 0, padding), value=128)
        scales = nn.functional.pad(scales, (0, padding))
        to_int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu
        self.register_buffer("packed_high", to_int4((values // 16).contiguous(), 1))
        self.register_buffer("packed_low", to_int4((values % 16).contiguous(), 1))
        self.scales_high = torch.stack([16 * scales, torch.zeros_like(scales)],
                                       dim=-1).to(KERNEL_DTYPE).contiguous()
        self.scales_low = torch.stack([scales, 8 * scales], dim=-1).to(KERNEL_DTYPE).contiguous()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        if flat.shape[0] > self.max_rows:
            if self.weight.dtype != torch.float32:
                return nn.functional.linear(hidden, self.weight, self.bias)
            # MKL multiplies a few rows by this wide weight 1.5-3x faster with the
            # operands swapped (49152 x 576 at 5-32 rows, AVX2-only AMD EPYC:
            # 10-25 ms against 23-41 for F.linear; an 8-row decode step 0.85x).
            return _as_hidden((self.weight @ flat.t()).t(), hidden, self.bias)
        if self.kernel is not None:
            return _as_hidden(self.kernel.matmul(flat, self.q8), hidden, self.bias)
        flat = flat.to(KERNEL_DTYPE).contiguous()
        product = torch.ops.aten._weight_int4pack_mm_for_cpu
        out = product(flat, self.packed_high, INT4_GROUP, self.scales_high)
        out += product(flat, self.packed_low, INT4_GROUP, self.scales_low)
        return _as_hidden(out[:, :self.out_features], hidden, self.bias)


def _int4_works() -> bool:
    """torch's int4 CPU kernel is there and computes what the de-quantized weights do
    (to bfloat16's precision: a wrong layout is off by far more)."""
    close = functools.partial(torch.allclose, rtol=0.02, atol=0.02)
    try:
        probe = nn.Linear(2 * INT4_GROUP, 16, bias=False)
        with torch.no_grad():  # every group holds all 16 codes
            codes = torch.arange(16 * 2 * INT4_GROUP).reshape(16, -1) * 7 % 16
            probe.weight.copy_(codes * 0.01 - 0.05)
        codes = int4_codes(probe.weight)
        sample = torch.randn(3, 2 * INT4_GROUP)
        if codes is None or not close(Int4Linear(probe, codes)(sample), probe(sample)):
            return False
        with torch.no_grad():  # codes -127..127, outputs not a multiple of 16
            probe = nn.Linear(2 * INT4_GROUP, 24, bias=False)
            codes = torch.arange(24 * 2 * INT4_GROUP).reshape(24, -1) * 37 % 255 - 127
            codes[:, ::INT4_GROUP] = 127  # each group's largest magnitude
            probe.weight.copy_(codes * 0.001)
        codes = q8_codes(probe.weight)
        return codes is not None and close(Q8Linear(probe, codes)(sample), probe(sample))
    except (AttributeError, RuntimeError, NotImplementedError) as exc:
        logger.info("torch's int4 kernel unavailable (%s); keeping the weights as they are",
                    type(exc).__name__)
        return False


def int4_max_rows(dtype: torch.dtype) -> int:
    """Most rows for the int4 kernel: fewer where AMX multiplies bfloat16."""
    try:
        amx = dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported()
    except (AttributeError, RuntimeError):
        amx = False
    return INT4_MAX_ROWS_AMX if amx else INT4_MAX_ROWS


class Int4Layers(NamedTuple):
    """What :func:`use_int4_weights` swapped, and the kernel they run on."""

    four_bit: int
    eight_bit: int
    linears: int
    kernel: Q4Kernel | None = None


def use_int4_weights(model: nn.Module, max_rows: int = INT4_MAX_ROWS,
                     load_kernel: Callable[[], Q4Kernel | None] | None = None) -> Int4Layers:
    """Swap the linear layers whose weights are 4-bit already for :class:`Int4Linear`
    (up to ``max_rows`` rows on an int4 kernel), and those that are Q8_0 already
    for :class:`Q8Linear`. ``load_kernel`` (for a float32 model only) is called
    once such layers are found: with the compiled kernel it returns, both kinds
    run on it, else on torch's int4 kernel. A model without them compiles nothing.

    Call it before casting the model to its dtype (the grids are checked in
    float32). None are swapped on another device or where torch's int4 kernel
    is missing.
    """
    linears = [(module, name, child) for module in model.modules()
               for name, child in module.named_children() if type(child) is nn.Linear]
    if not linears or next(model.parameters()).device.type != "cpu":
        return Int4Layers(0, 0, len(linears))
    with torch.inference_mode():
        if not _int4_works():
            return Int4Layers(0, 0, len(linears))
    four_bit, eight_bit = [], []
    for module, name, child in linears:
        if (codes := int4_codes(child.weight)) is not None:
            four_bit.append((module, name, child, codes))
        elif (codes := q8_codes(child.weight)) is not None:
            eight_bit.append((module, name, child, codes))
    kernel = load_kernel() if load_kernel and (four_bit or eight_bit) else None
    for module, name, child, codes in four_bit:
        setattr(module, name, Int4Linear(child, codes, max_rows, kernel))
    for module, name, child, codes in eight_bit:
        setattr(module, name, Q8Linear(child, codes, kernel, max_rows))
    return Int4Layers(len(four_bit), len(eight_bit), len(linears), kernel)


def compute_dtype(name: str) -> torch.dtype:
    """The dtype of the option ``dtype``. ``auto``: bfloat16 where the CPU has
    native bfloat16 arithmetic (AVX512-BF16, AMX), else float32.

    Where it is native, bfloat16 decodes faster with the same greedy answers
    (figures in docs/benchmarks.md); without native support its matmuls are
    emulated, and slower.
    """
    if name != "auto":
        return getattr(torch, name)
    try:
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        native = False
    return torch.bfloat16 if native else torch.float32


def prepare_for_decoding(model: nn.Module, packed_rows: int | None = None) -> nn.Module:
    """Swap the model's linear layers for :class:`DecodeLinear` (CPU only).

    The tied output layer gets its own copy (about 113 MB for SmolLM2-135M):
    it is the largest matmul of a decode step. The remaining weights are
    copied too, so that a memory-mapped checkpoint is released rather than
    kept resident beside the copies.
    """
    if next(model.parameters()).device.type != "cpu":
        return model
    with torch.inference_mode():
        if packed_rows and (packed_rows < 2 or not _packing_works(packed_rows)):
            packed_rows = None
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, DecodeLinear(child, packed_rows))
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, DecodeLinear):
                for parameter in module.parameters(recurse=False):
                    parameter.data = parameter.data.clone()
    return model
