"""Optional compiled CPU kernels, built on first use with the system C compiler.

Four source files, compiled together as one translation unit:

* ``lstm_gates.c``: the gate math of an LSTM cell, forward and backward, on a vector of
  coordinates: the one definition the other two run.
* ``lstm_cell.c``: the elementwise half of a coordinate-wise LSTM layer (four gate sigmoids, the
  cell and hidden update: one pass over the block instead of about a dozen torch kernels), in two
  forms. :func:`lstm_cell` updates the state in place (what :meth:`l2o.LSTMRule.update_`, and so
  ``LearnedOptimizer.step()``, runs); :func:`lstm_autograd` is a forward that keeps the
  activations and its backward (what the LSTM rule's fused autograd step runs: second-order
  meta-training, and ``update`` outside a tape).
* ``lstm_tape.c``: whole steps of the LSTM, matrix products included, keeping a truncation's
  activations, and the truncation's backward in one call (:func:`lstm_tape`, what
  first-order meta-training runs through :meth:`l2o.LSTMRule.tape`).
* ``mlp_rule.c``: one whole step of :class:`l2o.MLPRule` on a list of tensors
  (:func:`mlp_update`, what :meth:`l2o.MLPRule.update_`, and so ``LearnedOptimizer.step()``, runs):
  one pass updates the accumulators and sums the normalisers' squares, a second computes the 12
  features, the network and the update of each coordinate in registers (instead of about 60 torch
  operations per tensor).

All serve float32 state on the CPU; everything else (float64, CUDA) runs the torch twins of
:mod:`l2o.kernels.twin`, which compute the same math and are what the kernels are checked against.

The sources are compiled once per machine into the ``kernels`` folder of the cache directory
(``$L2O_CACHE``, else ``$XDG_CACHE_HOME/l2o``, else ``~/.cache/l2o``; the temporary folder
``l2o-kernels-<uid>`` if that is not usable) and loaded with :mod:`ctypes`; no torch headers, so
building takes about a second. A folder is used only if it belongs to the current user and no one
else can write to it, and a library in it only if the same holds for the file (another local user
could otherwise plant code there); l2o warns about a folder it refuses. The compiler is ``$CC`` if
set, else ``cc``, ``gcc`` or ``clang`` from ``PATH``, with ``-O3 -march=native -fno-fast-math``
(``-march=native`` is dropped if the compiler rejects it). When a library is loaded, every entry
point runs once on small random inputs against its torch twin (:mod:`l2o.kernels.selftest`, a few
milliseconds); a library that disagrees is not used. Without a working compiler, or after a failed
self-test, the library warns once and falls back to torch.

Environment:

* ``L2O_KERNELS=0`` (or :func:`set_enabled`): never compile or use the kernels. Read once, on first
  use.
* ``L2O_KERNELS_PORTABLE=1``: build without ``-march=native`` and with the portable branch of the C
  sources (no AVX-512 intrinsics), as on a machine without AVX-512; its own cache entry. The tests
  use it to check the portable code on every machine.

Under :func:`torch.compile` the kernels are not called (a compiled graph cannot run them): the
torch twins run instead, and the compiler fuses their elementwise math itself.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from ..cache import default_cache_dir
from ..fileio import commit_temp, reserve_temp
from . import selftest

__all__ = ["lstm_cell", "lstm_autograd", "lstm_tape", "TapeKernel", "TAPE_BLOCK", "mlp_update", "MLPKernel",
           "MLP_MAX_HIDDEN", "is_available", "set_enabled"]

#: Compiled as one translation unit, in this order (the others run ``lstm_gates.c``'s vector math).
_SOURCES = tuple(Path(__file__).with_name(name) for name in ("lstm_gates.c", "lstm_cell.c", "lstm_tape.c",
                                                              "mlp_rule.c"))
#: Compiler flag sets tried in order; the first that builds wins. ``-fno-fast-math`` first, so that
#: no compiler default can fold the exp of ``lstm_gates.c`` away (the source refuses to compile in
#: fast-math mode), and the two flags after it still apply: ``-fno-trapping-math`` lets the compiler
#: vectorise the clamps (it changes no result). OpenMP reuses the runtime torch loaded.
_FLAG_SETS = (
    ["-O3", "-fno-fast-math", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fopenmp"],
    ["-O3", "-fno-fast-math", "-march=native", "-fno-trapping-math", "-fno-math-errno"],
    ["-O3", "-fno-fast-math", "-fno-trapping-math", "-fno-math-errno"],
)
#: What ``L2O_KERNELS_PORTABLE=1`` builds with instead of ``-march=native``.
_PORTABLE_FLAG = "-DL2O_PORTABLE"

_lock = threading.Lock()  # taken only to load the library, once per process
_enabled: bool | None = None  # None: read L2O_KERNELS on first use
_UNLOADED: Any = object()
_kernel: Any = _UNLOADED  # after the first use: the _Kernels, or None if they could not be built or checked
_warned = False


def set_enabled(enabled: bool) -> None:
    """Turn the compiled kernels on or off for this process (overrides ``L2O_KERNELS``)."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"set_enabled expects True or False, got {enabled!r}")
    _enabled = enabled


def _is_enabled() -> bool:
    global _enabled
    if _enabled is None:
        _enabled = os.environ.get("L2O_KERNELS", "1").strip().lower() not in ("0", "off", "false", "no")
    return _enabled


def _portable() -> bool:
    return os.environ.get("L2O_KERNELS_PORTABLE", "").strip().lower() in ("1", "on", "true", "yes")


def _flag_sets() -> list[list[str]]:
    """The flag sets to try: :data:`_FLAG_SETS`, or with ``L2O_KERNELS_PORTABLE`` their portable form."""
    if not _portable():
        return [list(flags) for flags in _FLAG_SETS]
    sets: list[list[str]] = []
    for flags in _FLAG_SETS:
        portable = [f for f in flags if f != "-march=native"] + [_PORTABLE_FLAG]
        if portable not in sets:
            sets.append(portable)
    return sets


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


def _not_private(path: Path, what: str) -> str | None:
    """Why ``path`` (a ``"folder"`` or a ``"file"``, links followed) must not be trusted with code,
    or ``None``: it must belong to the current user and be writable by no one else."""
    getuid = getattr(os, "getuid", None)
    if getuid is None:  # no POSIX ownership (Windows): nothing to check
        return None
    try:
        st = os.stat(path)
    except OSError as exc:  # e.g. a dangling link
        return f"unreadable ({exc.strerror})"
    if not (stat.S_ISDIR if what == "folder" else stat.S_ISREG)(st.st_mode):
        return f"not a {what}"
    if st.st_uid != getuid():
        return f"owned by user id {st.st_uid}, not by this user ({getuid()})"
    writers = [who for bit, who in ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "others")) if st.st_mode & bit]
    if writers:
        return f"writable by {' and '.join(writers)} (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _refuse(path: Path, what: str, reason: str, instead: str) -> str:
    """Warn that ``path`` is not used (see :func:`_not_private`); returns the reason for the error list."""
    warnings.warn(f"l2o: not using the compiled-kernel {what} {path}: it is {reason}, so another local user could "
                  f"have put code there; {instead}. Fix it (chown it to yourself, chmod go-w) or set L2O_CACHE to "
                  "a private folder.", RuntimeWarning, stacklevel=2)
    return f"{path}: refused ({reason})"


def _cache_dirs() -> tuple[Path, Path]:
    """The kernel cache folder, then the fallback in the temporary folder."""
    uid = getattr(os, "getuid", lambda: 0)()
    return default_cache_dir() / "kernels", Path(tempfile.gettempdir()) / f"l2o-kernels-{uid}"


def _usable(directory: Path, errors: list[str]) -> bool:
    """Whether the cache folder ``directory`` exists or can be made, and passes :func:`_not_private`
    (if not, the reason goes to ``errors``, and a refusal into a warning)."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # private if made here
        refused = _not_private(directory, "folder")
    except OSError as exc:  # cache not usable: try the next directory
        errors.append(f"{directory}: {exc}")
        return False
    if refused is not None:
        errors.append(_refuse(directory, "cache folder", refused, "trying the next one"))
    return refused is None


def _build(compiler: str, source: bytes) -> Path:
    """Compile ``source`` into the cache (or reuse a build of the same source, compiler, flags and CPU)."""
    errors: list[str] = []
    usable: dict[Path, bool] = {}  # each folder checked once, when first needed
    for flags in _flag_sets():
        key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(),
                                         _cpu_signature().encode()])).hexdigest()[:16]
        for directory in _cache_dirs():
            if directory not in usable:
                usable[directory] = _usable(directory, errors)
            if not usable[directory]:
                continue
            target = directory / f"lstm_cell-{key}.so"
            if os.path.lexists(target):
                refused = _not_private(target, "file")
                if refused is None:
                    return target
                _refuse(target, "library", refused, "compiling it again")  # the folder is ours: replaced below
            try:
                tmp = reserve_temp(target)
            except OSError as exc:  # cache not writable: try the next directory
                errors.append(f"{directory}: {exc}")
                continue
            try:
                proc = subprocess.run([compiler, *flags, "-shared", "-fPIC", "-x", "c", "-", "-o", tmp],
                                      input=source, capture_output=True, timeout=120)
                if proc.returncode == 0:
                    os.chmod(tmp, 0o700)  # whatever the linker's mode: private, so the next load accepts it
                    commit_temp(tmp, target)  # atomic: a concurrent process sees all of it or nothing
                    return target
                errors.append(f"{' '.join(flags)}: {proc.stderr.decode(errors='replace').strip()[-300:]}")
            except (OSError, subprocess.SubprocessError) as exc:
                errors.append(f"{' '.join(flags)}: {exc}")
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            break  # the compiler ran in this directory; a different directory will not help these flags
    raise RuntimeError("; ".join(errors) or "no flag set compiled")


class _Kernels(NamedTuple):
    """The entry points of the library (ctypes functions)."""

    cell: Any
    forward: Any
    backward: Any
    tape_start: Any
    tape_forward: Any
    tape_state: Any
    tape_backward: Any
    mlp_update: Any


def _load() -> _Kernels | None:
    """Build (or find) the library, load it and run the self-test; ``None`` (after one warning) if
    any of that fails."""
    global _warned
    compiler = _compiler()
    try:
        if compiler is None:
            raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
        # the cache key hashes the source, so the library loaded always matches the argtypes below
        lib = ctypes.CDLL(str(_build(compiler, b"\n".join(path.read_bytes() for path in _SOURCES))))
        fns = _Kernels(lib.l2o_lstm_cell_f32, lib.l2o_lstm_forward_f32, lib.l2o_lstm_backward_f32,
                       lib.l2o_tape_start_f32, lib.l2o_tape_forward_f32, lib.l2o_tape_state_f32,
                       lib.l2o_tape_backward_f32, lib.l2o_mlp_update_f32)
    except (OSError, RuntimeError, AttributeError) as exc:
        problem = f"could not build the compiled kernels ({exc})"
    else:
        _declare(fns)
        failed = selftest.check(_bind_cell(fns, 1), LSTMAutograd(fns, 1),
                                lambda *dims: TapeKernel(fns, *dims, threads=1), MLPKernel(fns, 1))
        if failed is None:
            return fns
        problem = f"the compiled kernels failed their self-test against torch ({failed})"
    if not _warned:
        _warned = True
        warnings.warn(f"l2o: {problem}; using the torch implementation, which is slower. Set L2O_KERNELS=0 to skip "
                      "this attempt.", RuntimeWarning, stacklevel=4)
    return None


def _declare(fns: _Kernels) -> None:
    """The entry points' C signatures."""
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    fns.cell.argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, i64, ptr, ptr, f32, i64, i64, i64]
    fns.forward.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, f32, i64, i64, i64]
    fns.backward.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64]
    dims = [ptr, i64, i64, i64, i64, i64]  # tape, T, F, H, L, n
    fns.tape_start.argtypes = [*dims, ptr, ptr, i64]
    fns.tape_forward.argtypes = [*dims, i64, ptr, ptr, ptr, ptr, f32, ptr, i64]
    fns.tape_state.argtypes = [*dims, i64, ptr, ptr, i64]
    fns.tape_backward.argtypes = [*dims, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64]
    for fn in fns:
        fn.restype = None
    fns.mlp_update.argtypes = [i64, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64]
    fns.tape_backward.restype = ctypes.c_int
    fns.mlp_update.restype = ctypes.c_int


def is_available() -> bool:
    """Whether the compiled kernels are enabled, built and checked (builds them on the first call)."""
    return _get() is not None


def _get() -> _Kernels | None:
    """The loaded kernels, or ``None`` (disabled, unavailable, or inside :func:`torch.compile`).
    After the first call this reads two module globals: no lock, no I/O."""
    if not _is_enabled() or torch.compiler.is_compiling():
        return None
    kernel = _kernel
    if kernel is _UNLOADED:
        kernel = _load_once()
    return kernel


def _load_once() -> _Kernels | None:
    global _kernel
    with _lock:  # one thread builds; the others wait for its result
        if _kernel is _UNLOADED:
            _kernel = _load()
        return _kernel


def _fits(tensors: tuple[Tensor, ...]) -> bool:
    """Float32 CPU tensors of one or two dimensions with contiguous rows."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.dim() in (1, 2) and t.stride(-1) == 1
               for t in tensors)


def _copy_and_out(h_copy: Tensor | None, out: tuple[Tensor, Tensor, Any] | None) -> tuple[Any, int, Any, Any, float]:
    """The kernels' optional-output arguments: (h_copy pointer, its row stride, u, w pointers, b)."""
    copy = (None, 0) if h_copy is None else (h_copy.data_ptr(), h_copy.stride(0))
    outs = (None, None, 0.0) if out is None else (out[0].data_ptr(), out[1].data_ptr(), float(out[2]))
    return (*copy, *outs)


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
    fns = _get()
    if fns is None or not _fits(tensors):
        return None
    return _bind_cell(fns, torch.get_num_threads() if threads is None else threads)


def _bind_cell(fns: _Kernels, nthreads: int) -> Callable[..., None]:
    """:func:`lstm_cell`'s ``cell`` on ``nthreads`` threads."""
    fn = fns.cell

    def cell(gates: Tensor, c: Tensor, h: Tensor, h_copy: Tensor | None = None,
             out: tuple[Tensor, Tensor, Tensor | float] | None = None) -> None:
        copy_ptr, copy_ld, u_ptr, w_ptr, b = _copy_and_out(h_copy, out)
        fn(gates.data_ptr(), gates.stride(0), c.data_ptr(), c.stride(0), h.data_ptr(), h.stride(0), copy_ptr, copy_ld,
           u_ptr, w_ptr, b, c.shape[0], c.shape[1], nthreads)

    return cell


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class LSTMAutograd(NamedTuple):
    """The meta-training kernels bound to a thread count; see :func:`lstm_autograd`."""

    fns: _Kernels
    threads: int

    def forward(self, act: Tensor, bias: Tensor, c: Tensor, c_new: Tensor, h: Tensor, tanh_c: Tensor,
                h_copy: Tensor | None = None, out: tuple[Tensor, Tensor, Tensor | float] | None = None) -> None:
        r"""One layer's forward. On entry ``act`` (``(4H, m)``, contiguous) holds the products
        :math:`W [x; h]` without the bias; on return the activations
        :math:`[\sigma(a_i); \sigma(a_f); \sigma(a_o); \tanh(a_g)]` of :math:`a = W[x; h] + b`.
        Writes :math:`c' = f c + i g` to ``c_new``, :math:`h' = o \tanh(c')` to ``h`` and
        :math:`\tanh(c')` to ``tanh_c`` (all ``(H, m)``, contiguous); like the cell, also
        :math:`h'` to ``h_copy`` (rows of stride ``h_copy.stride(0)``) and, with
        ``out=(u, w, b)``, the output layer :math:`u = w^\top h' + b` to ``u`` (``m`` floats)."""
        hidden, m = c.shape
        copy_ptr, copy_ld, u_ptr, w_ptr, b = _copy_and_out(h_copy, out)
        self.fns.forward(act.data_ptr(), bias.data_ptr(), c.data_ptr(), c_new.data_ptr(), h.data_ptr(),
                         tanh_c.data_ptr(), copy_ptr, copy_ld, u_ptr, w_ptr, b, hidden, m, self.threads)

    def backward(self, act: Tensor, c: Tensor, tanh_c: Tensor, dh_parts: tuple[Tensor | None, Tensor | None],
                 du: Tensor | None, out_w: Tensor | None, dc_new: Tensor | None, dact: Tensor, dc: Tensor) -> None:
        r"""Its backward: with the gradient at :math:`h'` the sum of ``dh_parts`` (two ``(H, m)``
        matrices with row stride ``m``, either ``None``) and, when ``du`` is given, the output
        layer's :math:`w\, du^\top`, and the gradient at :math:`c'` ``dc_new`` (``None``: zero),
        writes the gradient of the pre-activations :math:`a` to ``dact`` (``(4H, m)``) and of
        ``c`` to ``dc`` (see ``lstm_cell.c`` for the formulas)."""
        hidden, m = c.shape
        self.fns.backward(act.data_ptr(), c.data_ptr(), tanh_c.data_ptr(), _ptr(dh_parts[0]), _ptr(dh_parts[1]),
                          _ptr(du), _ptr(out_w), _ptr(dc_new), dact.data_ptr(), dc.data_ptr(), hidden, m, self.threads)


def lstm_autograd(*tensors: Tensor, threads: int | None = None) -> LSTMAutograd | None:
    """The meta-training kernels (a forward keeping the activations, and its backward), or ``None``.

    ``None`` (the caller runs the torch implementation) when the kernels are disabled or failed to
    build, or when any of ``tensors`` is not a float32 CPU tensor with contiguous rows. The
    functions do no checks: every matrix they are given must be contiguous ``(rows, m)`` except
    where their docstrings say otherwise. They run on ``threads`` threads (default:
    ``torch.get_num_threads()`` at this call).
    """
    fns = _get()
    if fns is None or not _fits(tensors):
        return None
    return LSTMAutograd(fns, torch.get_num_threads() if threads is None else threads)


#: Coordinates per block of the tape kernel (``TB`` in ``lstm_tape.c``).
TAPE_BLOCK = 64


class TapeKernel:
    r"""The activations of one truncation of a coordinate-wise LSTM, kept by the compiled tape
    kernel (``lstm_tape.c``), with its forward step and the truncation's backward.

    ``steps`` steps of an ``L``-layer LSTM of ``H`` units with ``F`` input features on ``n``
    coordinates (float32, CPU). Call :meth:`start` with the initial state, :meth:`forward` for
    steps ``1..steps`` in order, then :meth:`state` for the state after any step and
    :meth:`backward` once for the weight gradients. The weights are passed as one flat tensor,
    every layer's ``(4H, in_l + H)`` matrix row-major in layer order (:func:`torch.cat` of their
    ``reshape(-1)``), and the biases as one ``(L * 4H,)`` tensor. The methods check nothing: the
    caller passes contiguous float32 CPU tensors of the stated shapes.
    """

    def __init__(self, fns: _Kernels, steps: int, features: int, hidden: int, layers: int, n: int, threads: int,
                 buffer: Tensor | None = None) -> None:
        self.fns, self.threads = fns, threads
        self.dims = (steps, features, hidden, layers, n)
        blocks = -(-n // TAPE_BLOCK)
        size = blocks * (steps + 1) * (features + 7 * hidden * layers) * TAPE_BLOCK
        if buffer is None or buffer.numel() < size:
            buffer = torch.empty(size, dtype=torch.float32, device="cpu")
        #: The tape's memory (reusable by a later tape of at most this size: see :func:`lstm_tape`).
        self.buffer = buffer

    def start(self, h0: Tensor, c0: Tensor) -> None:
        """The state before step 1: ``h0``, ``c0`` of shape ``(L, H, n)``."""
        self.fns.tape_start(self.buffer.data_ptr(), *self.dims, h0.data_ptr(), c0.data_ptr(), self.threads)

    def forward(self, step: int, x: Tensor, weight: Tensor, bias: Tensor, out_w: Tensor, out_b: float) -> Tensor:
        """Step ``step`` (1-based) on the inputs ``x (F, n)``; returns the raw outputs ``u (n,)``."""
        u = torch.empty(self.dims[-1], dtype=torch.float32, device="cpu")
        self.fns.tape_forward(self.buffer.data_ptr(), *self.dims, step, x.data_ptr(), weight.data_ptr(),
                              bias.data_ptr(), out_w.data_ptr(), out_b, u.data_ptr(), self.threads)
        return u

    def state(self, step: int) -> tuple[Tensor, Tensor]:
        """The hidden and cell state after step ``step`` (0: the initial state), each ``(L, H, n)``."""
        _, _, hidden, layers, n = self.dims
        h, c = (torch.empty(layers, hidden, n, dtype=torch.float32, device="cpu") for _ in range(2))
        self.fns.tape_state(self.buffer.data_ptr(), *self.dims, step, h.data_ptr(), c.data_ptr(), self.threads)
        return h, c

    def backward(self, du: Tensor, weight: Tensor, out_w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Given ``du (steps, n)``, the gradient at every step's raw output, the gradients of the
        flat weights, the biases, the output weight ``(H,)`` and the output bias ``(1,)``."""
        _, _, hidden, layers, n = self.dims
        cpu32 = dict(dtype=torch.float32, device="cpu")
        dw, db = torch.empty_like(weight), torch.empty(layers * 4 * hidden, **cpu32)
        dout_w, dout_b = torch.empty(hidden, **cpu32), torch.empty(1, **cpu32)
        code = self.fns.tape_backward(self.buffer.data_ptr(), *self.dims, du.data_ptr(), weight.data_ptr(),
                                      out_w.data_ptr(), dw.data_ptr(), db.data_ptr(), dout_w.data_ptr(),
                                      dout_b.data_ptr(), self.threads)
        if code != 0:
            raise MemoryError("l2o: the LSTM tape backward could not allocate its scratch memory")
        return dw, db, dout_w, dout_b


def lstm_tape(steps: int, features: int, hidden: int, layers: int, n: int, *, threads: int | None = None,
              buffer: Tensor | None = None) -> TapeKernel | None:
    """A :class:`TapeKernel` for one truncation, or ``None`` when the kernels are disabled or failed
    to build. ``buffer`` (a float32 CPU tensor from an earlier tape no longer in use) is reused
    when it is large enough. Runs on ``threads`` threads (default: ``torch.get_num_threads()``)."""
    fns = _get()
    if fns is None:
        return None
    return TapeKernel(fns, steps, features, hidden, layers, n, torch.get_num_threads() if threads is None else threads,
                    buffer)


#: The widest hidden layer :func:`mlp_update` serves (``MLP_HMAX`` in ``mlp_rule.c``).
MLP_MAX_HIDDEN = 128

#: One tensor of :meth:`MLPKernel.update`: its ``(instances, n, rows, cols, factored, rank)`` and
#: its ``(grad, param, m1, m2, m3, v, row, col, u)`` tensors.
MLPEntry = tuple[tuple[int, int, int, int, int, int], tuple[Tensor, ...]]


class MLPKernel(NamedTuple):
    """The MLP-rule kernel (``mlp_rule.c``) bound to a thread count; see :func:`mlp_update`."""

    fns: _Kernels
    threads: int

    def update(self, entries: list[MLPEntry], coef: tuple[float, ...], first: Tensor, hidden: Tensor,
               last: Tensor) -> None:
        r"""One step of :class:`l2o.MLPRule` on every tensor of ``entries``, in place.

        Each entry is ``((I, n, R, C, factored, rank), (g, p, m1, m2, m3, v, r, c, u))``: ``I``
        instances of ``n`` coordinates (``R x C`` row-major when ``factored``), the gradient, the
        param, the three momenta and the second moment (updated in place), the row and column
        statistics ``(I, R)`` and ``(I, C)`` (updated in place; ignored unless factored) and ``u``,
        which receives the update. ``coef`` is the 17 floats ``1 - beta_1, 1 - beta_2, 1 - beta_3,
        beta_v, 1 - beta_v, 1 - beta_f, 1/bc_1, 1/bc_2, 1/bc_3, 1/bc_v, 1/bc_f, sqrt(1/bc_v), eps,
        lr, log_lr_offset, residual, max_step_ratio`` (``bc`` the bias corrections; ``max_step_ratio``
        0 for none); ``first`` the three ranks'
        ``(H, 13)`` first layers with the context bias as last column, ``(3, H, 13)``; ``hidden``
        the ``(L - 1, H, H + 1)`` further layers (bias last); ``last`` the ``(2, H + 1)`` output
        layer, its magnitude row times ``exp_mult``. Checks nothing: every tensor must be a
        contiguous float32 CPU tensor of those sizes (see ``mlp_rule.c`` for the math).
        """
        dims: list[int] = []
        ptrs: list[int] = []
        for dim, tensors in entries:
            dims += dim
            ptrs += [t.data_ptr() for t in tensors]
        dims_t = (ctypes.c_int64 * len(dims))(*dims)
        ptrs_t = (ctypes.c_void_p * len(ptrs))(*ptrs)
        coef_t = (ctypes.c_float * len(coef))(*coef)
        code = self.fns.mlp_update(len(entries), dims_t, ptrs_t, coef_t, first.data_ptr(), hidden.data_ptr(),
                                   last.data_ptr(), first.shape[1], hidden.shape[0] + 1, self.threads)
        if code != 0:
            raise MemoryError("l2o: the MLP-rule kernel could not allocate its scratch memory")


def mlp_update(hidden_size: int, *, threads: int | None = None) -> MLPKernel | None:
    """The :class:`MLPKernel` for a rule of ``hidden_size`` units, or ``None`` (the caller runs
    torch) when the kernels are disabled, failed to build, run inside :func:`torch.compile`, or
    ``hidden_size`` exceeds :data:`MLP_MAX_HIDDEN`. The caller checks that its tensors are
    contiguous float32 CPU tensors. Runs on ``threads`` threads (default:
    ``torch.get_num_threads()`` at this call)."""
    if hidden_size > MLP_MAX_HIDDEN:
        return None
    fns = _get()
    if fns is None:
        return None
    return MLPKernel(fns, torch.get_num_threads() if threads is None else threads)
