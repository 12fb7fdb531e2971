"""The method's Triton kernels (u2pl_scale/accel/triton_kernels.py, the CUDA stages' in accel/cuda.py): the queue
push's row copy (copy_rows_,
dst[dst_index[i]] = src[src_index[i]] for i < count), the fused queue push and the percentiles.

The Triton kernels (used on CUDA devices) run here in Triton's interpreter on CPU tensors, in a subprocess because
TRITON_INTERPRET is read when the kernel is defined; tests/gpu/test_gpu.py runs them compiled on a GPU (the push
directly, the percentiles inside the method's steps).
"""
import contextlib
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from u2pl_scale.accel.triton_kernels import copy_rows_

REPO = Path(__file__).resolve().parents[2]


def run_interpreted(script: str, tmp_path: Path):
    """Run `script` in a subprocess with TRITON_INTERPRET=1 (Triton kernels on CPU tensors); it saves its results to
    results.pt in the working directory, which this loads."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "results.pt")


def reference(dst, dst_index, src, src_index, count):
    out = dst.clone()
    for i in range(int(count)):
        out[int(dst_index[i])] = src[int(src_index[i])].to(dst.dtype)
    return out


def test_triton_kernel_copies_the_first_count_rows_only(tmp_path):
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import torch
        from u2pl_scale.accel.triton_kernels import launch_triton
        g = torch.Generator().manual_seed(0)
        results = []
        # dim above one column block (300 > 256), a non-power-of-two dim, bf16, rows of src with a stride;
        # indices as strided views (columns of an [N, 2] tensor, as the queue push passes them) in the last case
        cases = ((300, torch.float32, 23, False), (20, torch.bfloat16, 37, False), (256, torch.float32, 0, False),
                 (40, torch.float32, 30, True))
        for dim, dtype, count, strided in cases:
            dst = torch.randn(50, dim, generator=g).to(dtype)
            src = torch.randn(40, dim + 3, generator=g).to(dtype)[:, :dim]
            dst_index = torch.randperm(49, generator=g)[:37]
            src_index = torch.randint(0, 40, (37,), generator=g)
            if strided:
                dst_index = torch.stack([src_index, dst_index], 1)[:, 1]
                src_index = torch.stack([src_index, dst_index], 1)[:, 0]
                assert dst_index.stride(0) == 2 and src_index.stride(0) == 2
            out = dst.clone()
            launch_triton(out, dst_index, src, src_index, torch.tensor(count))
            results.append(dict(dst=dst, src=src, dst_index=dst_index, src_index=src_index, count=count, out=out))
        torch.save(results, "results.pt")
    """)
    results = run_interpreted(script, tmp_path)
    for r in results:
        expected = reference(r["dst"], r["dst_index"], r["src"], r["src_index"], r["count"])
        assert torch.equal(r["out"], expected), (r["dst"].shape, r["dst"].dtype, r["count"])
        if r["count"] == 0:
            assert torch.equal(r["out"], r["dst"])


def test_op_on_cpu_and_under_compile_writes_the_real_rows():
    g = torch.Generator().manual_seed(1)
    dst = torch.randn(30, 8, generator=g)
    src = torch.randn(12, 8, generator=g)
    scratch = 29
    dst_index = torch.tensor([4, 0, 17, 9, scratch, scratch, scratch])  # 4 real entries, then padding
    src_index = torch.tensor([3, 11, 0, 3, 0, 0, 0])
    count = torch.tensor(4)
    expected = reference(dst, dst_index, src, src_index, count)
    for fn in (copy_rows_, torch.compile(copy_rows_, dynamic=False)):
        out = dst.clone()
        fn(out, dst_index, src, src_index, count)
        torch.testing.assert_close(out[:scratch], expected[:scratch], rtol=0, atol=0)  # the scratch row is unread


def test_a_failing_triton_launch_warns_once_and_falls_back_to_index_copy(monkeypatch):
    from u2pl_scale.accel import triton_kernels as kernels

    def broken(*args):
        raise RuntimeError("no compiler for this GPU")

    monkeypatch.setattr(kernels, "_triton_failed", [])
    monkeypatch.setattr(kernels, "_uses_triton", lambda dst: not kernels._triton_failed)  # as on a CUDA device
    monkeypatch.setattr(kernels, "launch_triton", broken)
    dst, src = torch.zeros(5, 3), torch.arange(6.0).reshape(2, 3)
    dst_index, src_index, count = torch.tensor([3, 1]), torch.tensor([1, 0]), torch.tensor(2)
    with pytest.warns(RuntimeWarning, match="no compiler for this GPU"):
        copy_rows_(dst, dst_index, src, src_index, count)
    assert torch.equal(dst, reference(torch.zeros(5, 3), dst_index, src, src_index, count))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        copy_rows_(dst, dst_index, src, src_index, count)  # no second warning, no second try


def test_index_copy_path_writes_the_padding_to_the_spare_row_only():
    """With spare_row, the padded entries (from `count` on) may name any row, a real one included: the index_copy_
    path redirects them to the spare row, so only the first `count` entries and the spare row change. An eager call
    bumps dst's version counter, as the in-place custom op does."""
    g = torch.Generator().manual_seed(2)
    dst = torch.randn(10, 4, generator=g)
    src = torch.randn(6, 4, generator=g)
    dst_index = torch.tensor([7, 2, 0, 0, 0])  # 2 real entries; padding names row 0, a real row
    src_index = torch.tensor([5, 1, 0, 0, 0])
    expected = dst.clone()
    expected[7], expected[2] = src[5], src[1]
    for fn in (copy_rows_, torch.compile(copy_rows_, dynamic=False)):
        out = dst.clone()
        version = out._version
        fn(out, dst_index, src, src_index, torch.tensor(2), spare_row=9)
        torch.testing.assert_close(out[:9], expected[:9], rtol=0, atol=0)
        assert out._version > version
    out = dst.clone()
    copy_rows_(out, dst_index, src, src_index, torch.tensor(2))  # without a spare row the padding lands on row 0
    assert torch.equal(out[0], src[0])


def test_fused_triton_push_equals_the_exact_push(tmp_path):
    """kernels.launch_triton_push (the CUDA stages' queue write: each kept pair's row straight to its ring slot, then
    the pointers) in Triton's interpreter, through ClassQueues.push, against the CPU stages' push: five pushes with
    wrap-around, a push of more rows than a class holds, an empty class, the class mask as a class-major view (as
    the contrastive loss passes it) and as a plain [N, C] tensor, fp32 and bf16 queues, dim above one column block."""
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import torch
        from u2pl_scale.accel import triton_kernels as kernels
        from u2pl_scale.accel.cpu import cpu_stages
        from u2pl_scale.accel.cuda import cuda_stages
        from u2pl_scale.method.queues import ClassQueues
        kernels._uses_triton = lambda dst: True  # as on a CUDA device
        calls = []
        launch = kernels.launch_triton_push
        kernels.launch_triton_push = lambda *a: (calls.append(1), launch(*a))
        g = torch.Generator().manual_seed(3)
        results = []
        for dim, dtype in ((300, torch.float32), (8, torch.bfloat16)):
            fused, exact = (ClassQueues(4, dim, [7, 30, 5, 12], dtype=dtype, write=stages.queue_write)
                            for stages in (cuda_stages(compiled=False), cpu_stages()))
            for step, rows in enumerate((20, 3, 40, 9, 25)):
                features = torch.randn(rows, dim, generator=g)
                mask = torch.rand(rows, 4, generator=g) < 0.5
                mask[:, 3] = False if step == 1 else mask[:, 3]
                if step % 2:  # a [N, C] view of a class-major [C, N] tensor
                    mask = mask.t().contiguous().t()
                fused.push(features, mask)
                exact.push(features, mask)
                results.append({k: (fused.state_dict()[k], exact.state_dict()[k])
                                for k in ("buffer", "write_ptr", "fill")})
        torch.save(dict(results=results, calls=len(calls)), "results.pt")
    """)
    saved = run_interpreted(script, tmp_path)
    assert saved["calls"] == 10  # every push ran the fused kernels
    for step, state in enumerate(saved["results"]):
        for key, (fused, exact) in state.items():
            if key == "buffer":  # the scratch row (last) is the compacted push's, never written here
                fused, exact = fused[:-1], exact[:-1]
            assert torch.equal(fused, exact), (step, key)


def test_triton_percentiles_equal_the_torch_ops_and_numpy(tmp_path):
    """kernels.launch_triton_percentiles (the percentiles after the sort on CUDA: one kernel where the torch ops are
    about a dozen) in Triton's interpreter, through the CUDA stages' percentiles_and_count, against the same
    function with the kernel switched off (the reference's torch ops) and against numpy.percentile: random values with a
    mask, ties, one valid entry, none (+inf), q at 0 and 100 and outside [0, 100] (clamped), and fractions whose
    fp32 rounding would move the position (the kernel takes them as float64 bits)."""
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import numpy as np
        import torch
        from u2pl_scale.accel import triton_kernels as kernels
        from u2pl_scale.accel.cuda import percentiles_and_count as _percentiles_and_count
        calls = []
        launch = kernels.launch_triton_percentiles
        kernels.launch_triton_percentiles = lambda *a: (calls.append(1), launch(*a))[1]
        g = torch.Generator().manual_seed(5)
        cases = []
        values = torch.rand(300007, generator=g) * 4
        cases.append((values, torch.rand(300007, generator=g) < 0.7, [80.0, 17.3456789, 82.6543211]))
        ties = torch.randint(0, 5, (999,), generator=g).float()
        cases.append((ties, torch.ones(999, dtype=torch.bool), [0.0, 50.0, 100.0, 33.3]))
        cases.append((values[:10], torch.arange(10) == 3, [10.0, 90.0]))
        cases.append((values[:10], torch.zeros(10, dtype=torch.bool), [10.0, 90.0]))
        cases.append((values[:500], torch.ones(500, dtype=torch.bool), [-5.0, 150.0]))
        cases.append((values[:500], torch.ones(500, dtype=torch.bool), [0.0, -0.0]))  # all bits fit in 32
        # a step from 0 to 1 between sorted positions 99999 and 100000, where q = 33.3333333 % puts the position
        # (99999.99999) but its fp32 rounding (0.33333334) puts it past 100000
        step = (torch.arange(300001) >= 100000).float()
        cases.append((step, torch.ones(300001, dtype=torch.bool), [33.3333333]))
        results = []
        for values, valid, qs in cases:
            kernels._uses_triton = lambda tensor: True
            fused, count = _percentiles_and_count(values, valid, qs)
            kernels._uses_triton = lambda tensor: False
            torch_ops, _ = _percentiles_and_count(values, valid, qs)
            kept = values[valid].double().numpy()
            clamped = [min(max(q, 0.0), 100.0) for q in qs]
            reference = np.percentile(kept, clamped) if kept.size else np.full(len(qs), np.inf)
            results.append(dict(fused=fused, torch_ops=torch_ops, reference=torch.tensor(reference),
                                count=int(count), valid=int(valid.sum())))
        torch.save(dict(results=results, calls=len(calls)), "results.pt")
    """)
    saved = run_interpreted(script, tmp_path)
    assert saved["calls"] == 7
    for case, r in enumerate(saved["results"]):
        assert r["count"] == r["valid"], case
        assert torch.equal(r["fused"], r["torch_ops"]), (case, r["fused"], r["torch_ops"])
        torch.testing.assert_close(r["fused"].double(), r["reference"], rtol=1e-6, atol=1e-6)


@contextlib.contextmanager
def compile_only_for(arch: int):
    """Inside, every Triton launch compiles its kernel for a CUDA GPU of compute capability `arch` (Triton's
    compiler and the ptxas it ships run without a GPU), with the arguments the caller passed (CPU tensors stand in
    for device ones: a pointer's type and 16-byte alignment are what Triton specialises on), and launches nothing;
    yields the list of (kernel name, grid, compiled kernel). Triton's interpreter runs the kernels' Python, not
    their compilation, so this is what catches a kernel that the interpreter runs but the compiler rejects (types
    it infers differently, an op it cannot lower) before a GPU does. Uses Triton's launch internals (the active
    driver, JITFunction.__getitem__ and warmup, which compiles without launching)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    device_key = f"u2pl-compile-only-sm{arch}"

    class CompileOnlyDriver:  # the "current device" of a launch: a target to compile for, nothing to run on
        def get_current_device(self):
            return device_key

        def get_current_stream(self, device):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

    compiled, functions = [], set()

    def compile_at_launch(kernel, grid):
        def launch(*args, **kwargs):
            functions.add(kernel)
            compiled.append((kernel.fn.__name__, grid, kernel.warmup(*args, grid=grid, **kwargs)))
        return launch

    saved_driver, saved_getitem = driver._active, JITFunction.__getitem__
    driver.set_active(CompileOnlyDriver())
    JITFunction.__getitem__ = compile_at_launch
    try:
        yield compiled
    finally:
        driver._active, JITFunction.__getitem__ = saved_driver, saved_getitem
        for kernel in functions:
            kernel.device_caches.pop(device_key, None)


@pytest.mark.parametrize("arch", [80, 90, 100], ids=["sm80-A100", "sm90-H100-H200", "sm100-B200"])
def test_every_triton_kernel_compiles_for_the_gpus_with_the_methods_arguments(arch, monkeypatch, tmp_path):
    """Each of the method's Triton kernels compiled (to a cubin) for A100, H100/H200 and B200 with the arguments
    its callers pass: one eager method step with the CUDA stages (percentiles, fused queue push; fp32 queues), the
    fused push into bf16 queues of dim 256 (one column block) and 300 (two), the compacted push's row copy
    (max_pairs) into fp32 and bf16 queues, and percentile fractions whose bits all fit in 32 bits (Triton then
    types every fraction argument i32); and none spills registers."""
    pytest.importorskip("triton")
    from method_inputs import make_inputs, step_config
    from u2pl_scale.engine.step import method_losses
    from u2pl_scale.accel import triton_kernels as kernels
    from u2pl_scale.accel.cuda import cuda_stages
    from u2pl_scale.method.queues import ClassQueues

    monkeypatch.setattr(kernels, "_triton_failed", [])
    monkeypatch.setattr(kernels, "_uses_triton", lambda tensor: True)  # as on a CUDA device
    g = torch.Generator().manual_seed(0)
    stages = cuda_stages(compiled=False)
    with compile_only_for(arch) as compiled:
        pred, rep, y_l, pseudo_u, prob_t, rep_t, logits_u_t, queues = make_inputs(0, 0, stages=stages)
        method_losses(step_config(stages), pred, rep, y_l, pseudo_u, prob_t, rep_t, logits_u_t, queues, 0.3)
        for dim, dtype, max_pairs in ((256, torch.bfloat16, None), (300, torch.bfloat16, None),
                                      (256, torch.float32, 500), (300, torch.bfloat16, 500)):
            more_queues = ClassQueues(21, dim, [500] * 21, dtype=dtype, write=stages.queue_write)
            more_queues.push(torch.randn(64, dim, generator=g), torch.rand(64, 21, generator=g) < 0.3,
                               max_pairs=max_pairs)
        kernels.launch_triton_percentiles(torch.rand(100).sort().values, torch.tensor(100), [0.0, -0.0])
    assert not kernels._triton_failed, kernels._triton_failed
    names = [name for name, _, _ in compiled]
    assert names.count("_percentile_kernel") == 2  # the step's three percentiles (one launch) and the direct call
    assert names.count("_push_kernel") == names.count("_advance_kernel") == 3
    assert names.count("_copy_rows_kernel") == 2
    for name, grid, kernel in compiled:
        assert kernel.metadata.target.arch == arch, name
        usage = resource_usage(kernel.asm["cubin"], tmp_path)
        # no register spills (a 64 x 256 fp32 tile in the push once took all 255 registers and spilled)
        assert usage["STACK"] == 0 and usage["LOCAL"] == 0, (name, usage)


def resource_usage(cubin: bytes, tmp_path: Path) -> dict:
    """{"REG": registers per thread, "STACK": bytes, "LOCAL": bytes, ...} of a cubin's one kernel, as the
    cuobjdump that Triton ships reports them."""
    import re

    import triton

    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(path)],
                         capture_output=True, text=True, check=True).stdout
    usage = {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}
    assert "REG" in usage, out
    return usage
