"""4-bit layers of a float32 model on a small kernel of our own (transformers_q4.c).

Where the CPU has no native bfloat16 (AVX2 only), ``dtype: auto`` picks
float32, and torch's int4 kernel, vectorised for bfloat16 inputs only, costs
a decode step more than the rest of it: 76 us a call at one row on an AMD
EPYC with AVX2, 212 calls a step for SmolLM2 (docs/benchmarks.md). The C file
multiplies the same Q4_1 codes, and the output layer's Q8_0 codes, by the rows
taken to 16-bit integers: the greedy answers are the de-quantized weights'
(docs/agents/transformers.md has the figures).

It is compiled when the model loads, with the machine's C compiler (``CC``,
else ``cc``), in about a second, and kept in the model cache (``cache_dir``)
under a name that hashes the source and the command. Where there is no
compiler, no AVX2, or the compiled kernel does not compute what the
de-quantized weights do, :func:`load_kernel` says why in the log and returns
None: the layers stay on torch's kernel.

The library links OpenMP as ``libgomp.so.1``, the name of the one torch
loaded already, so the dynamic linker gives it torch's: the same threads, and
the count ``torch.set_num_threads`` gave the engine's thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("transformers_q4.c")
# AVX2 and FMA named, not -march=native: a cache folder may move between machines.
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
COMPILE_SECONDS = 120
BLOCK = 32  # inputs per block of codes (a GGUF Q4_1 block)

# Kernels loaded in this process, by the hash of their source and command: an
# agent started again (SIGHUP, a second agent) neither compiles nor probes again.
_LOADED: dict[str, "Q4Kernel"] = {}


@dataclass(frozen=True)
class _Codes:
    """A layer's codes as the kernel reads them; ``pointers``, its tensors'
    addresses in field order, read once."""

    pointers: tuple[int, ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "pointers", tuple(
            getattr(self, item.name).data_ptr() for item in fields(self) if item.init))

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]


@dataclass(frozen=True)
class Q4Weight(_Codes):
    """A Q4_1 layer's codes: ``codes`` (out, blocks, 16) bytes, two codes each;
    ``scales`` and ``minimums`` (out, blocks), float32."""

    codes: torch.Tensor
    scales: torch.Tensor
    minimums: torch.Tensor

    @classmethod
    def from_codes(cls, values: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor) -> "Q4Weight":
        """From :func:`~plugins.transformers_weights.int4_codes`' layout:
        values (out, in) in 0..15, weight = (value - 8) * scale + zero."""
        out_features, in_features = values.shape
        blocks = values.reshape(out_features, in_features // BLOCK, BLOCK).to(torch.uint8)
        codes = blocks[..., :BLOCK // 2] | (blocks[..., BLOCK // 2:] << 4)
        scales = scales.t().float()
        return cls(codes.contiguous(), scales.contiguous(),
                   (zeros.t().float() - 8 * scales).contiguous())


@dataclass(frozen=True)
class Q8Weight(_Codes):
    """A Q8_0 layer's codes: ``codes`` (out, in), int8 from -127 to 127;
    ``scales`` (out, blocks), float32."""

    codes: torch.Tensor
    scales: torch.Tensor

    @classmethod
    def from_codes(cls, values: torch.Tensor, scales: torch.Tensor) -> "Q8Weight":
        """From :func:`~plugins.transformers_weights.q8_codes`' layout: values
        (out, in) in 1..255, the integer plus 128; scales (blocks, out)."""
        return cls((values - 128).to(torch.int8).contiguous(), scales.t().float().contiguous())


class Q4Kernel:
    """The compiled library's ``q4_1_matmul`` and ``q8_0_matmul`` (the C file
    says what they do)."""

    def __init__(self, library: ctypes.CDLL):
        self._library = library  # kept: the functions live as long as it does
        pointer, count = ctypes.c_void_p, ctypes.c_int
        self._products = {}
        for codes, name in ((Q4Weight, "q4_1_matmul"), (Q8Weight, "q8_0_matmul")):
            function = getattr(library, name)
            tensors = sum(item.init for item in fields(codes))
            # rows, their count and length, the codes' tensors, outputs, out
            function.argtypes = [pointer, count, count, *[pointer] * tensors, count, pointer]
            function.restype = None
            self._products[codes] = function

    def matmul(self, rows: torch.Tensor, weight: Q4Weight | Q8Weight) -> torch.Tensor:
        """``rows`` (rows, in) times the weight: (rows, out), float32. Rows are
        a decode step's few (the C file keeps their codes on the stack)."""
        rows = rows.to(torch.float32).contiguous()
        count, in_features = rows.shape
        out = rows.new_empty((count, weight.out_features))
        # ctypes lets go of the GIL for the call: the event loop runs meanwhile.
        self._products[type(weight)](rows.data_ptr(), count, in_features, *weight.pointers,
                                     weight.out_features, out.data_ptr())
        return out

    def works(self) -> bool:
        """Computes what the de-quantized weights do, to the 16-bit rows'
        precision (a wrong layout, or 8-bit rows, is off by far more), for 1 row
        and for more rows than one pass of the weights takes."""
        generator = torch.Generator().manual_seed(0)
        values = torch.randint(0, 16, (48, 4 * BLOCK), generator=generator)
        scales = torch.rand(4, 48, generator=generator) * 0.1 + 0.01
        zeros = torch.rand(4, 48, generator=generator) - 0.5
        weight = ((values.reshape(48, 4, BLOCK) - 8) * scales.t()[..., None]
                  + zeros.t()[..., None]).reshape(48, -1)
        packed = Q4Weight.from_codes(values, scales, zeros)
        eight_bit = torch.randint(1, 256, (48, 4 * BLOCK), generator=generator)
        eight_bit_scales = torch.rand(4, 48, generator=generator) * 0.01
        eight_bit_weight = ((eight_bit.reshape(48, 4, BLOCK) - 128)
                            * eight_bit_scales.t()[..., None]).reshape(48, -1)
        eight_bit_packed = Q8Weight.from_codes(eight_bit, eight_bit_scales)
        for count in (1, 11):
            sample = torch.randn(count, 4 * BLOCK, generator=generator)
            for product, expected in ((self.matmul(sample, packed), sample @ weight.t()),
                                      (self.matmul(sample, eight_bit_packed),
                                       sample @ eight_bit_weight.t())):
                if not (product - expected).norm() < 1e-3 * expected.norm():
                    return False
        return True


def _cpu_fits() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    except (AttributeError, RuntimeError):
        return False


def load_kernel(folder: Path | None) -> Q4Kernel | None:
    """The kernel, compiled into ``folder`` once (a temporary folder if None);
    None, with the reason logged, where it cannot be used."""
    if not _cpu_fits():
        logger.info("4-bit layers on torch's int4 kernel: the compiled one needs an x86-64 "
                    "CPU with AVX2")
        return None
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        logger.info("4-bit layers on torch's int4 kernel: no C compiler (%s) to build the "
                    "faster one; install gcc to have it", compiler)
        return None
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(b"\0".join([source, compiler.encode(), *map(str.encode, FLAGS)]))
    tag = tag.hexdigest()[:16]
    if tag in _LOADED:
        return _LOADED[tag]
    try:
        if folder is None:
            with tempfile.TemporaryDirectory(prefix="transformers-q4-") as scratch:
                library = _build(compiler, Path(scratch), tag)
        else:
            library = _build(compiler, folder / "kernels", tag)
        kernel = Q4Kernel(library)
        with torch.inference_mode():
            if kernel.works():
                _LOADED[tag] = kernel
                return kernel
        logger.warning("4-bit layers on torch's int4 kernel: the compiled one computed wrong "
                       "products")
    except subprocess.CalledProcessError as exc:
        logger.warning("4-bit layers on torch's int4 kernel: %s could not compile %s: %s",
                       compiler, SOURCE.name, (exc.stderr or "").strip()[-500:])
    except (OSError, subprocess.TimeoutExpired, AttributeError) as exc:
        logger.warning("4-bit layers on torch's int4 kernel: the compiled one is unusable (%s)",
                       exc)
    return None


def _build(compiler: str, folder: Path, tag: str) -> ctypes.CDLL:
    """Compile the library into ``folder`` unless it is there; load it.

    Written under a temporary name, then renamed: two processes starting at
    once each compile, and each loads a complete file. A library loaded from
    a temporary folder stays mapped once the folder is gone."""
    path = folder / f"transformers_q4-{tag}.so"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=folder, suffix=".so.part")
        os.close(handle)
        try:
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", partial], check=True,
                           capture_output=True, text=True, timeout=COMPILE_SECONDS)
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    return ctypes.CDLL(str(path))
