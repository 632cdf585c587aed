"""The project's C++ CPU kernels (``torch.ops.ecopvt``): one builder for every ``csrc/*.cpp`` source.

Each source is compiled on first use by ``torch.utils.cpp_extension.load`` (about 30 s, needs a C++ compiler and
ninja) into torch's extension cache (``TORCH_EXTENSIONS_DIR``); later processes reuse the built library. The
library name carries a hash of the source and, on x86-64 Linux, of the CPU's feature flags (``-march=native``), so a
cache shared by different machines or versions never runs another build. Where the build fails, the caller's
PyTorch ops are used instead and one warning names the cause and the fix. Used by :mod:`hashing.kernel_hash`
(the kernelized hash), :mod:`attention.ecoformer` (the linear attention) and :mod:`attention.bitformer`
(XOR/popcount scores).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import platform
from pathlib import Path
from typing import Any, Optional, Tuple

import torch

log = logging.getLogger(__name__)


def short_hash(data: bytes) -> str:
    """The first 10 hex digits of the SHA-1 of ``data``."""
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()[:10]


@functools.lru_cache(maxsize=None)
def native_flags() -> Tuple[Tuple[str, ...], str]:
    """(compiler flags, build-name tag), read once per process. ``-fno-trapping-math`` (no floating-point traps, results unchanged) lets
    loops with conversions vectorise. On Linux ``-fopenmp``: ``at::parallel_for`` is a header template that runs on
    one thread unless the extension itself is built with OpenMP (torch's Linux wheels use the same libgomp). On x86-64
    Linux ``-march=native``, tagged with a hash of the CPU's feature flags."""
    flags: Tuple[str, ...] = ("-O3", "-fno-trapping-math")
    if platform.system() == "Linux":
        flags += ("-fopenmp",)
        if platform.machine() == "x86_64":
            try:
                with open("/proc/cpuinfo") as cpuinfo:
                    cpu_flags = next(line for line in cpuinfo if line.startswith("flags"))
                return flags + ("-march=native",), "native_" + short_hash(cpu_flags.encode())
            except (OSError, StopIteration):
                pass
    return flags, platform.machine().lower() or "generic"


def cpu_kernels_apply(*tensors: torch.Tensor) -> bool:
    """Whether the fused CPU kernels apply to ``tensors``: all on CPU, none float64 (the reference precision stays on
    PyTorch's ops), and not inside torch.compile or export tracing."""
    return (all(t.device.type == "cpu" and t.dtype != torch.float64 for t in tensors)
            and not torch.compiler.is_compiling() and not torch.compiler.is_exporting())


def library_name(source: Path) -> str:
    """The extension's name in torch's cache: source stem, build tag and a hash of the source."""
    return f"ecopvt_{source.stem}_{native_flags()[1]}_{short_hash(source.read_bytes())[:8]}"


def build_kernels(source: Path, what: str, fallback: str) -> Optional[Any]:
    """Build (or load from the cache) ``source`` and return ``torch.ops.ecopvt``; None where that fails, after one
    warning "``fallback``: ``what`` could not be built (cause); to enable them, fix". Callers cache the result."""
    try:
        from torch.utils.cpp_extension import load

        flags, _ = native_flags()
        log.info("loading %s (built on first use, ~30 s, then cached)", what)
        load(name=library_name(source), sources=[str(source)], extra_cflags=list(flags),
             extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [], is_python_module=False)
    except Exception as err:  # no compiler / ninja / headers / writable cache: fall back, say why and the fix
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "")
        fix = ("make torch's extension folder writable or point TORCH_EXTENSIONS_DIR at one that is"
               if isinstance(err, PermissionError) else "install a C++ compiler and `pip install ninja`")
        log.warning("%s: %s could not be built (%s: %s); to enable them, %s.", fallback, what, type(err).__name__,
                    reason, fix)
        return None
    return torch.ops.ecopvt
