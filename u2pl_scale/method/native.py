"""The fused CPU kernels of cpu_kernels.c, built on first use with the system C compiler and loaded with ctypes.

On CPU the method's large passes (the teacher's entropy and the unsupervised CE at crop size, and the anchors'
dot products with their sampled negatives) are bound by memory traffic: as torch ops each streams its hundreds of
MB several times, once per op. The kernels read each input once and keep a pixel row, or an anchor's negatives,
in cache for all the passes over it; the teacher rows are normalised for the queues and summed into prototypes in
one pass, the negatives' class mask comes from one pass over the teacher's probabilities, and the queue push copies
each kept row straight into its ring slot.

They are an optional accelerator, like NVIDIA apex on a GPU: no Python headers and no torch headers are needed, a
plain C compiler builds them in about a second, and the result is cached (by the hash of the source, the compiler,
its flags and the machine's architecture) in `$U2PL_NATIVE_CACHE`, else `$XDG_CACHE_HOME/u2pl_scale/native`, else
`~/.cache/u2pl_scale/native`. Where they cannot be built or loaded (no compiler, a read-only cache), a warning
names the reason once and the method runs the same maths as torch ops. `U2PL_NATIVE=0` turns them off.

Only the CPU host path calls them (eager CPU tensors; see paths.py): they read tensors through raw pointers, so
every wrapper here checks dtype, layout and shape first and returns None (the caller then takes its torch-op
path) for anything it does not handle. Index and label ranges are checked by the kernels, which then write
nothing past their outputs and return an error, raised here naming the bad input.
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
from typing import Optional

import torch

from .buffers import reusable_empty
from .paths import CPU_LOOPS_SINGLE_THREAD

SOURCE = Path(__file__).with_name("cpu_kernels.c")
_LOCK = threading.Lock()
_STATE: dict = {}  # "lib": the loaded library, or None once building or loading failed; "reason": why
ENABLED = os.environ.get("U2PL_NATIVE", "1") != "0"

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "u2pl_entropy": [_P, _P, _I64, _I64, _I64, _I64, _INT],
    "u2pl_ce_grad": [_P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, ctypes.c_float, _INT],
    "u2pl_anchor_neg": [_P, _P, _INT, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _INT],
    "u2pl_prepare_rows": [_P, _P, _P, _INT, _P, _P, _I64, _I64, _I64, _INT],
    "u2pl_push": [_P, _P, _I64, _I64, _P, _P, _P, _P, _P, _I64, _I64, _I64, _INT],
    "u2pl_negative_mask": [_P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, ctypes.c_float, _INT],
}
# u2pl_negative_mask compares every pair of a pixel's classes: fine for 19 or 21 classes, not for hundreds
NEGATIVE_MASK_MAX_CLASSES = 64


def cache_dir() -> Path:
    if os.environ.get("U2PL_NATIVE_CACHE"):
        return Path(os.environ["U2PL_NATIVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "u2pl_scale" / "native"


def compile_flags() -> list[str]:
    """-O3 vectorises the kernels' pixel loops; -fno-trapping-math and -fno-math-errno let the compiler turn their
    selects and roundings into vector instructions (neither changes a result); AVX2 + FMA where the CPU has them
    (as torch's own CPU capability reports), so the library is built for the machine that runs it."""
    flags = ["-O3", "-fno-trapping-math", "-fno-math-errno", "-fopenmp-simd", "-fPIC", "-shared"]
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in (
            "AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def _compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CC", "cc"))


def _build() -> ctypes.CDLL:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError(f"no C compiler found (CC={os.environ.get('CC', 'cc')!r})")
    flags = compile_flags()
    # the machine too: a home directory shared by x86 and ARM nodes must not hand one the other's library
    key = hashlib.sha256("\0".join([SOURCE.read_text(), os.path.realpath(compiler), platform.machine(),
                                     *flags]).encode()).hexdigest()
    target = cache_dir() / f"u2pl_cpu_kernels_{key[:24]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # built under a temporary name and renamed: a concurrent builder (another rank or test worker) never sees
        # half a file, and the last rename of identical builds wins
        fd, partial = tempfile.mkstemp(prefix=target.stem + ".", suffix=".so.partial", dir=target.parent)
        os.close(fd)
        try:
            result = subprocess.run([compiler, *flags, "-o", partial, str(SOURCE), "-lm", "-lpthread"],
                                    capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {result.stderr.strip()[-2000:]}")
            os.chmod(partial, 0o755)  # mkstemp's 0600 would lock out other users of a shared U2PL_NATIVE_CACHE
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    lib = ctypes.CDLL(str(target))
    for name, argtypes in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = ctypes.c_int
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernels, built on first call; None if turned off or unavailable (warned once, with the reason)."""
    if not ENABLED:
        return None
    if "lib" not in _STATE:
        with _LOCK:
            if "lib" not in _STATE:
                try:
                    _STATE["lib"] = _build()
                except Exception as error:  # any failure to build or load means: run the torch ops instead
                    _STATE["lib"], _STATE["reason"] = None, f"{type(error).__name__}: {error}"
                    warnings.warn(f"u2pl_scale: the fused CPU kernels are unavailable ({_STATE['reason']}); the "
                                  "method runs the same maths as torch ops instead, slower on CPU "
                                  "(U2PL_NATIVE=0 silences this)", RuntimeWarning, stacklevel=2)
    return _STATE["lib"]


def _check(status: int, bad_input: str) -> None:
    """A kernel's status (cpu_kernels.c): 0 fine, -1 bad input (the message names it), -2 out of memory."""
    if status == -2:
        raise MemoryError("a fused CPU kernel could not allocate its per-thread scratch memory")
    if status != 0:
        raise IndexError(bad_input)


def _threads() -> int:
    return 1 if CPU_LOOPS_SINGLE_THREAD else torch.get_num_threads()


def _plain(tensor: torch.Tensor, dtype: torch.dtype, dim: int) -> bool:
    """A CPU tensor the kernels can read through its data pointer; not one autograd would need to differentiate
    through (the kernels' results have no graph)."""
    return (tensor.device.type == "cpu" and tensor.dtype == dtype and tensor.dim() == dim
            and tensor.is_contiguous() and not tensor.is_conj() and not tensor.is_neg()
            and not (tensor.requires_grad and torch.is_grad_enabled()))


def entropy(logits: torch.Tensor) -> Optional[torch.Tensor]:
    """Per-pixel entropy of softmax(logits) over dim 1, [B, C, H, W] fp32 -> [B, H, W]; None if not handled."""
    lib = library()
    if lib is None or not _plain(logits, torch.float32, 4):
        return None
    batch, classes, height, width = logits.shape
    out = torch.empty(batch, height, width, dtype=torch.float32)
    if out.numel():
        _check(lib.u2pl_entropy(logits.data_ptr(), out.data_ptr(), batch, classes, height, width, _threads()), "")
    return out


def ce_grad(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, scale: float,
            grad: torch.Tensor) -> Optional[float]:
    """Sum of the per-pixel CE of logits [B, C, H, W] (fp32) against target [B, H, W] (int64) over the pixels not
    equal to ignore_index, and into `grad` (like logits) scale * (softmax - onehot), 0 on ignored pixels. None if
    not handled; IndexError for a target outside [0, C) that is not ignore_index."""
    lib = library()
    if (lib is None or not _plain(logits, torch.float32, 4) or not _plain(target, torch.int64, 3)
            or not _plain(grad, torch.float32, 4) or grad.shape != logits.shape
            or target.shape != logits.shape[:1] + logits.shape[2:]):
        return None
    batch, classes, height, width = logits.shape
    total = ctypes.c_double(0.0)
    if logits.numel():
        _check(lib.u2pl_ce_grad(logits.data_ptr(), target.data_ptr(), grad.data_ptr(), ctypes.byref(total), batch,
                                classes, height, width, ignore_index, float(scale), _threads()),
               f"cross-entropy target out of range: a label is neither in [0, {classes}) nor the ignore index "
               f"{ignore_index}")
    return total.value


def anchor_negatives(scaled: torch.Tensor, buffer: torch.Tensor, index: torch.Tensor,
                     positive_logit: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For anchors `scaled` [M, D] (fp32), their negatives' rows `index` [M, K] (int64) of `buffer` [Q, D] (fp32 or
    bf16) and their positive logits [M]: (log p_0 [M], p_0 - 1 [M], sum_k p_k buffer[index[m, k]] [M, D]) of the
    softmax over [positive, scaled . rows]. None if not handled; IndexError for an index outside [0, Q)."""
    lib = library()
    if (lib is None or buffer.dtype not in (torch.float32, torch.bfloat16) or not _plain(buffer, buffer.dtype, 2)
            or not _plain(scaled, torch.float32, 2) or not _plain(index, torch.int64, 2)
            or not _plain(positive_logit, torch.float32, 1) or scaled.shape[1] != buffer.shape[1]
            or index.shape[0] != scaled.shape[0] or positive_logit.shape[0] != scaled.shape[0]):
        return None
    rows, dim = scaled.shape
    log_p0 = torch.empty(rows, dtype=torch.float32)
    p0_minus_1 = torch.empty(rows, dtype=torch.float32)
    grad = torch.empty(rows, dim, dtype=torch.float32)
    if rows:
        _check(lib.u2pl_anchor_neg(scaled.data_ptr(), buffer.data_ptr(), int(buffer.dtype == torch.bfloat16),
                                   index.data_ptr(), positive_logit.data_ptr(), log_p0.data_ptr(),
                                   p0_minus_1.data_ptr(), grad.data_ptr(), rows, index.shape[1], dim,
                                   buffer.shape[0], _threads()),
               f"negative index out of range: not in [0, {buffer.shape[0]}) (the queue's rows)")
    return log_p0, p0_minus_1, grad


def prepare_rows(rows: torch.Tensor, label: torch.Tensor, num_classes: int,
                 unit_dtype: torch.dtype) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """In one pass over the teacher rows [P, D] (fp32): the unit rows [P, D] (`unit_dtype`, fp32 or bf16) =
    rows / max(|row|, 1e-12) (F.normalize), and the sums [C, D] (fp32, accumulated in fp64) and counts [C] (int64)
    of the rows whose `label` [P] (int64) is c in [0, C); label C means none. The unit rows are a reused buffer
    (buffers.reusable_empty). None if not handled; IndexError for a label outside [0, C]."""
    lib = library()
    if (lib is None or unit_dtype not in (torch.float32, torch.bfloat16) or not _plain(rows, torch.float32, 2)
            or not _plain(label, torch.int64, 1) or label.shape[0] != rows.shape[0]):
        return None
    num_rows, dim = rows.shape
    unit = reusable_empty("push_rows", (num_rows, dim), unit_dtype, rows.device)
    sums = torch.empty(num_classes, dim, dtype=torch.float64)
    counts = torch.empty(num_classes, dtype=torch.int64)
    _check(lib.u2pl_prepare_rows(rows.data_ptr(), label.data_ptr(), unit.data_ptr(),
                                 int(unit_dtype == torch.bfloat16), sums.data_ptr(), counts.data_ptr(), num_rows,
                                 dim, num_classes, _threads()),
           f"prototype label out of range: not in [0, {num_classes}] ({num_classes}: none)")
    return unit, sums.float(), counts


def push(features: torch.Tensor, mask_cn: torch.Tensor, buffer: torch.Tensor, offsets: torch.Tensor,
         capacities: torch.Tensor, write_ptr: torch.Tensor, fill: torch.Tensor) -> bool:
    """ClassQueues' push on CPU: row n of `features` [N, D] (the buffer's dtype) into the ring of every class k with
    mask_cn[k, n] (bool [C, N], any strides), rows in order, only the newest `capacity` of a class kept; the ring
    state `write_ptr` and `fill` (int64 [C]) is updated in place. False if not handled (nothing written)."""
    lib = library()
    state = (offsets, capacities, write_ptr, fill)
    if (lib is None or not _plain(features, buffer.dtype, 2) or not _plain(buffer, buffer.dtype, 2)
            or features.shape[1] != buffer.shape[1] or mask_cn.dtype != torch.bool or mask_cn.dim() != 2
            or mask_cn.device.type != "cpu" or mask_cn.shape[1] != features.shape[0]
            or not all(_plain(t, torch.int64, 1) and t.shape[0] == mask_cn.shape[0] for t in state)):
        return False
    if lib.u2pl_push(features.data_ptr(), mask_cn.data_ptr(), mask_cn.stride(0), mask_cn.stride(1),
                     buffer.data_ptr(), offsets.data_ptr(), capacities.data_ptr(), write_ptr.data_ptr(),
                     fill.data_ptr(), mask_cn.shape[0], features.shape[0],
                     features.shape[1] * features.element_size(), _threads()) != 0:
        raise ValueError("queue state corrupt: a write pointer outside its ring, or a capacity below 1")
    return True


def negative_mask(prob: torch.Tensor, labels: torch.Tensor, high: torch.Tensor, num_labeled: int, low_rank: int,
                  high_rank: int, threshold: float) -> Optional[torch.Tensor]:
    """The contrastive loss's negative candidates, class-major [C, N, hw] bool, from the teacher's prob [N, C, hw]
    (fp32), the labels [N, hw] (int64; >= C: none) and the high-entropy mask [N, hw] (bool): high, prob < threshold,
    and the class's rank in its pixel (stable descending: ties to the lower class) below low_rank and not the label
    in the first num_labeled images, in [low_rank, high_rank) in the others (contrastive._pixel_classes). None if
    not handled (more than NEGATIVE_MASK_MAX_CLASSES classes among them)."""
    lib = library()
    if (lib is None or not _plain(prob, torch.float32, 3) or not _plain(labels, torch.int64, 2)
            or not _plain(high, torch.bool, 2) or prob.shape[1] > NEGATIVE_MASK_MAX_CLASSES
            or labels.shape != prob.shape[:1] + prob.shape[2:] or high.shape != labels.shape):
        return None
    batch, classes, pixels = prob.shape
    negative = torch.empty(classes, batch, pixels, dtype=torch.bool)
    if negative.numel():
        _check(lib.u2pl_negative_mask(prob.data_ptr(), labels.data_ptr(), high.data_ptr(), negative.data_ptr(), batch,
                                      classes, pixels, num_labeled, low_rank, high_rank, float(threshold),
                                      _threads()), "")
    return negative
