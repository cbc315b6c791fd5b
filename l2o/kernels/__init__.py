"""Optional compiled CPU kernels, built on first use with the system C compiler.

One kernel today: the elementwise half of a coordinate-wise LSTM layer (``lstm_cell.c``: four
gate sigmoids, the cell and hidden update, one pass over the block instead of about a dozen torch
kernels). :meth:`l2o.LSTMRule.update_`, and so ``LearnedOptimizer.step()``, use it for float32
state on the CPU; everything else (float64, CUDA, meta-training) runs the torch implementation,
which computes the same math and is what the tests compare the kernel against.

The source is compiled once per machine into the ``kernels`` folder of the cache directory
(``$L2O_CACHE``, else ``$XDG_CACHE_HOME/l2o``, else ``~/.cache/l2o``; a temporary folder if that is
not writable) and loaded with :mod:`ctypes`; no torch headers, so building takes well
under a second. The compiler is ``$CC`` if set, else ``cc``, ``gcc`` or ``clang`` from ``PATH``.
Without a working compiler the library warns once and falls back to torch. Set ``L2O_KERNELS=0``
(or call :func:`set_enabled`) to never compile or use the kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from ..cache import default_cache_dir

__all__ = ["lstm_cell", "is_available", "set_enabled"]

_SOURCE = Path(__file__).with_name("lstm_cell.c")
#: Compiler flag sets tried in order; the first that builds wins. ``-fno-trapping-math`` lets the
#: compiler vectorise the clamps (it changes no result); OpenMP reuses the runtime torch loaded.
_FLAG_SETS = (
    ["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fopenmp"],
    ["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno"],
    ["-O3", "-fno-trapping-math", "-fno-math-errno"],
)

_lock = threading.Lock()
_enabled: bool | None = None  # None: read L2O_KERNELS on first use
_UNLOADED: Any = object()
_kernel: Any = _UNLOADED  # after the first use: the ctypes function, or None if it could not be built
_warned = False


def set_enabled(enabled: bool) -> None:
    """Turn the compiled kernels on or off for this process (overrides ``L2O_KERNELS``)."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"set_enabled expects True or False, got {enabled!r}")
    _enabled = enabled


def _is_enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return os.environ.get("L2O_KERNELS", "1").strip().lower() not in ("0", "off", "false", "no")


def _compiler() -> str | None:
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"]) or os.environ["CC"]
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    parts = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    parts.append(line.strip())
                if len(parts) > 6:
                    break
    except OSError:
        pass
    return "\n".join(parts)


def _build(compiler: str, source: bytes) -> Path:
    """Compile ``source`` into the cache (or reuse a build of the same source, compiler, flags and CPU)."""
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(),
                                         _cpu_signature().encode()])).hexdigest()[:16]
        fallback = Path(tempfile.gettempdir()) / f"l2o-kernels-{getattr(os, 'getuid', lambda: 0)()}"
        for directory in (default_cache_dir() / "kernels", fallback):
            target = directory / f"lstm_cell-{key}.so"
            if target.exists():
                return target
            try:
                directory.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
                os.close(fd)
            except OSError as exc:  # cache not writable: try the next directory
                errors.append(f"{directory}: {exc}")
                continue
            try:
                proc = subprocess.run([compiler, *flags, "-shared", "-fPIC", "-x", "c", "-", "-o", tmp],
                                      input=source, capture_output=True, timeout=120)
                if proc.returncode == 0:
                    os.replace(tmp, target)  # atomic: a concurrent process sees all of it or nothing
                    return target
                errors.append(f"{' '.join(flags)}: {proc.stderr.decode(errors='replace').strip()[-300:]}")
            except (OSError, subprocess.SubprocessError) as exc:
                errors.append(f"{' '.join(flags)}: {exc}")
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            break  # the compiler ran in this directory; a different directory will not help these flags
    raise RuntimeError("; ".join(errors) or "no flag set compiled")


def _load() -> Callable[..., None] | None:
    global _warned
    compiler = _compiler()
    try:
        if compiler is None:
            raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
        # the cache key hashes the source, so the library loaded always matches the argtypes below
        fn = ctypes.CDLL(str(_build(compiler, _SOURCE.read_bytes()))).l2o_lstm_cell_f32
    except (OSError, RuntimeError, AttributeError) as exc:
        if not _warned:
            _warned = True
            warnings.warn(f"l2o: could not build the compiled LSTM kernel ({exc}); using the torch implementation, "
                          "which is slower. Set L2O_KERNELS=0 to skip this attempt.", RuntimeWarning, stacklevel=3)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, i64, ptr, ptr, ctypes.c_float, i64, i64, i64]
    fn.restype = None
    return fn


def is_available() -> bool:
    """Whether the LSTM kernel is enabled and built (builds it on the first call)."""
    return _get() is not None


def _get() -> Callable[..., None] | None:
    global _kernel
    if not _is_enabled():
        return None
    with _lock:
        if _kernel is _UNLOADED:
            _kernel = _load()
        return _kernel


def lstm_cell(*tensors: Tensor, threads: int | None = None) -> Callable[..., None] | None:
    r"""The LSTM-cell kernel as a function ``cell(gates, c, h, h_copy=None, out=None)``, or ``None``.

    ``cell`` overwrites ``c`` and ``h`` (each ``(H, m)``) with one LSTM layer's new state from
    ``gates``, the ``(4H, m)`` block of pre-activations ``[a_i; a_f; a_o; 2 a_g]`` (cell-gate rows
    doubled): :math:`c' = \sigma(a_f) c + \sigma(a_i) \tanh(a_g)`,
    :math:`h' = \sigma(a_o) \tanh(c')`. It also writes :math:`h'` into ``h_copy`` (an ``(H, m)``
    view) unless that is ``None``, and with ``out=(u, w, b)`` (``u`` a ``(1, m)`` view, ``w`` the
    ``(1, H)`` output weight, contiguous, ``b`` a float or one-element tensor) the output layer
    :math:`u = w^\top h' + b`.

    Returns ``None`` (the caller computes the same with torch) when the kernel is disabled or
    failed to build, or when any of ``tensors`` (those the caller will pass views of) is not a
    float32 CPU tensor with contiguous rows. ``cell`` itself does no checks; it runs on ``threads``
    threads (default: ``torch.get_num_threads()`` at this call).
    """
    if not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.dim() in (1, 2) and t.stride(-1) == 1
               for t in tensors):
        return None
    fn = _get()
    if fn is None:
        return None
    nthreads = torch.get_num_threads() if threads is None else threads

    def cell(gates: Tensor, c: Tensor, h: Tensor, h_copy: Tensor | None = None,
             out: tuple[Tensor, Tensor, Tensor | float] | None = None) -> None:
        copy_ptr, copy_ld = (None, 0) if h_copy is None else (h_copy.data_ptr(), h_copy.stride(0))
        u_ptr, w_ptr, b = (None, None, 0.0) if out is None else (out[0].data_ptr(), out[1].data_ptr(), float(out[2]))
        fn(gates.data_ptr(), gates.stride(0), c.data_ptr(), c.stride(0), h.data_ptr(), h.stride(0), copy_ptr, copy_ld,
           u_ptr, w_ptr, b, c.shape[0], c.shape[1], nthreads)

    return cell
