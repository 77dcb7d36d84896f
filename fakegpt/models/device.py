"""Where and in what precision a model runs: `--device` and `--dtype` resolved once, the same for every stage.

`auto` means: CUDA when available, else the CPU; for training bfloat16 where the card computes it natively
(Ampere and newer), else float16 with a gradient scaler, float32 on the CPU; for inference bfloat16 on such
cards and float32 elsewhere. `torch.cuda.is_bf16_supported()` alone also counts emulated bf16 (V100, T4),
which is slower than fp16 there, hence `including_emulation=False`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from fakegpt.errors import FakegptError

# Canonical names first; the short aliases are accepted on the command line.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
CANONICAL = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` (or empty) -> cuda when available, else cpu; `cpu`, `cuda`, `cuda:N`, `mps` as given."""
    if spec in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise FakegptError(f"--device: unknown device {spec!r} (auto | cpu | cuda | cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FakegptError(f"--device {spec}: CUDA is not available on this machine (use --device cpu)")
    return device


def native_bf16(device: torch.device) -> bool:
    """True where the card computes bfloat16 in hardware (not emulated)."""
    if device.type != "cuda":
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no including_emulation and counts only native support
        return torch.cuda.is_bf16_supported()


def resolve_dtype(spec: str, device: torch.device, training: bool = False) -> str:
    """The canonical dtype name ("float32" | "bfloat16" | "float16") that `spec` means on `device`."""
    if spec in ("", "auto"):
        if device.type != "cuda":
            return "float32"
        if native_bf16(device):
            return "bfloat16"
        return "float16" if training else "float32"
    if spec not in DTYPES:
        raise FakegptError(f"--dtype: {spec!r} is not one of auto, {', '.join(DTYPES)}")
    name = CANONICAL.get(spec, spec)
    if training and device.type == "cpu" and name == "float16" and not _cpu_autocast_fp16():
        raise FakegptError("--dtype float16 needs CUDA for training here; use float32 or bfloat16 on CPU")
    return name


def _cpu_autocast_fp16() -> bool:
    """Whether this torch's CPU autocast runs float16 (recent versions; older ones disable it with a warning).
    Slow on most CPUs, but it lets the float16 + GradScaler path be tested without a GPU."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctx = torch.autocast("cpu", dtype=torch.float16)
    return bool(getattr(ctx, "_enabled", False))


def torch_dtype(name: str) -> torch.dtype:
    """torch dtype for a name `resolve_dtype` returned (or an alias)."""
    return DTYPES[name]


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 matmuls on (Ampere+) for the block, then the previous setting back.

    Training enables it for speed; it must not leak into scoring in the same process (`validate` trains and
    then scores), where claim-score differences are small numbers that TF32's 10-bit mantissa would blur.
    """
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
