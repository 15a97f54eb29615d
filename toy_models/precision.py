"""The training forward's precision: fp32, or bf16 autocast (matmuls in bf16; weights, optimizer,
loss and every evaluation in fp32). Probes and identity checks never use it: they compute in fp32.

- `fp32`: everywhere.
- `bf16`: only where the hardware does bf16 natively (a CUDA GPU with bf16; a CPU with
  AVX512-BF16 or AMX, or an ARM CPU with its bf16 extension). Elsewhere it is refused: emulated
  bf16 is slower than fp32 and would only add rounding.
- `auto`: bf16 where the hardware does it natively, fp32 elsewhere.
- no choice (None): bf16 on a CUDA GPU that has it, fp32 on a CPU. On a CPU with native bf16,
  bf16 is faster on every base's pretraining step but *slower* on the quick study's d=128 tuning
  steps, which hold most of its work, and the quick study's rows were validated in fp32, so the
  CPU default stays fp32 (measured in docs/benchmarks.md, "Precision";
  `benchmarks/bench_precision.py`).
- a study (`reproduce`) with no choice, on a CPU with native bf16: per stage. Only the recipes
  measured faster in bf16 and validated in it train in bf16 (the quick E4 at d=256: its base, LoRA
  and prefix; docs/benchmarks.md, "Precision"); study.reproduce.study_precision.

A run records its precision in provenance.json, and in config.json when it is not fp32 (so a run
of one precision is never reused for another, and fp32 runs keep the configs they always had).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from prefixlab_common.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16")


@functools.lru_cache(maxsize=None)
def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """The CPU's native-bf16 feature flags (avx512_bf16, amx_bf16, ARM's bf16); () where the file
    cannot be read (not Linux)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")) and ":" in line:
            flags.update(line.split(":", 1)[1].split())
    return tuple(sorted(flags & {"avx512_bf16", "amx_bf16", "bf16"}))


def native_bf16(device: torch.device) -> bool:
    """Whether `device` does bf16 matmuls natively."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return bool(cpu_bf16_flags())
    return False


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """"fp32" or "bf16" for the choice `precision` (None, or one of PRECISIONS) on `device`. An
    unknown name, or bf16 on hardware without native bf16, is a UserError (exit code 2)."""
    if precision is None:
        return "bf16" if device.type == "cuda" and native_bf16(device) else "fp32"
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return "fp32"
    if native_bf16(device):
        return "bf16"
    if precision == "auto":
        return "fp32"
    what = "this CPU has neither AVX512-BF16 nor AMX" if device.type == "cpu" else f"{device} has no native bf16"
    raise UserError(f"--precision bf16: {what}; use --precision fp32 or auto")
