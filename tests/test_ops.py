"""The op contract: opcheck for every op, every backend's kernels against the reference."""

import subprocess
import sys
import textwrap
import types

import pytest
import torch

import paca  # noqa: F401  (registers the CPU kernels)
from paca import backends, ops

BACKENDS = backends.device_types()  # discovered from the table, not written by hand
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _samples(dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=generator).to(dtype)
    idx = torch.tensor([1, 4, 7, 15])
    g = torch.randn(2, 5, 8, generator=generator).to(dtype)
    weight = torch.randn(8, 16, generator=generator).to(dtype)
    cols = torch.randn(8, 4, generator=generator).to(dtype)
    return x, idx, g, weight, cols


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_every_op(dtype):
    x, idx, g, weight, cols = _samples(dtype)
    x_idx = x.index_select(-1, idx)
    cases = {
        "gather_cols": (x, idx),
        "scatter_cols": (x_idx, idx, 16),
        "write_cols_": (weight.clone(), idx, cols, 1),
        "partial_grad": (g, x_idx, 0.5),
    }
    assert set(cases) == set(ops.OPS), "every op of the contract needs an opcheck case"
    for name, args in cases.items():
        torch.library.opcheck(ops.OPS[name], args)
    # 2-D input and the Conv1D layout of write_cols_ as well
    torch.library.opcheck(ops.gather_cols, (x[0], idx))
    torch.library.opcheck(ops.write_cols_, (weight.t().contiguous(), idx, cols.t().contiguous(), 0))


def _expected(name, args):
    """Each op's result, written with plain indexing (independent of every kernel)."""
    if name == "gather_cols":
        x, idx = args
        return x[..., idx]
    if name == "scatter_cols":
        cols, idx, n = args
        out = torch.zeros(*cols.shape[:-1], n, dtype=cols.dtype)
        out[..., idx] = cols
        return out
    if name == "write_cols_":
        weight, idx, cols, dim = args
        out = weight.clone()
        if dim == 1:
            out[:, idx] = cols.to(weight.dtype)
        else:
            out[idx, :] = cols.to(weight.dtype)
        return out
    if name == "partial_grad":
        g, x_idx, s = args
        g2d = g.reshape(-1, g.shape[-1]).double()
        return (s * g2d.t() @ x_idx.reshape(-1, x_idx.shape[-1]).double()).to(
            ops.grad_dtype(g.dtype)
        )
    raise AssertionError(name)


def _cases(dtype):
    x, idx, g, weight, cols = _samples(dtype)
    x_idx = x.index_select(-1, idx)
    return {
        "gather_cols": [(x, idx), (x[0], idx)],
        "scatter_cols": [(x_idx, idx, 16), (x_idx[0, 0], idx, 16)],
        "write_cols_": [
            (weight, idx, cols, 1),
            (weight.t().contiguous(), idx, cols.t().contiguous(), 0),
        ],
        "partial_grad": [(g, x_idx, 0.5), (g[0], x_idx[0], 1.0)],
    }


def _check(kernel, name, args, dtype):
    if name == "write_cols_":
        weight = args[0].clone()
        kernel(weight, *args[1:])
        assert torch.equal(weight, _expected(name, args))
        return
    got, expected = kernel(*args), _expected(name, args)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if name == "partial_grad":
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_kernels(dtype):
    for name, cases in _cases(dtype).items():
        for args in cases:
            _check(ops.REFERENCE[name], name, args, dtype)
            _check(ops.OPS[name], name, args, dtype)  # through the dispatcher (CPU kernels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_kernels_on_cpu_tensors(backend, dtype):
    module = backends.load(backend)
    cases = _cases(dtype)
    if not module.KERNELS:
        pytest.skip(f"{backend} runs the reference kernels (tested above)")
    for name, kernel in module.KERNELS.items():
        for args in cases[name]:
            _check(kernel, name, args, dtype)


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "emulated-bf16"])
def test_cpu_partial_grad_in_bf16_on_either_kind_of_cpu(monkeypatch, native):
    """Where the CPU computes bf16 natively, the bf16 gradient goes into the GEMM as it is (no
    fp32 copy of the (tokens, out) gradient); elsewhere it is cast to fp32 first. Both within
    bf16's precision of the float64 product, in fp32. The probe is forced, so both paths run on
    any CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    cpu = backends.load("cpu")
    monkeypatch.setattr(cpu, "_native_bf16", lambda: native)
    generator = torch.Generator().manual_seed(0)
    g = torch.randn(2, 64, 48, generator=generator).to(torch.bfloat16)  # (batch, tokens, out)
    x_idx = torch.randn(2, 64, 8, generator=generator).to(torch.bfloat16)
    casts = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if (
                isinstance(out, torch.Tensor)
                and out.dtype == torch.float32
                and out.numel() >= g.numel()
            ):
                casts.append(func)
            return out

    with Watch():
        got = cpu.partial_grad(g, x_idx, 0.5)
    assert got.dtype == torch.float32 and got.shape == (48, 8) and got.is_contiguous()
    assert bool(casts) is not native, casts  # an fp32 copy of the gradient only when emulated
    torch.testing.assert_close(
        got, _expected("partial_grad", (g, x_idx, 0.5)), rtol=2e-2, atol=2e-2
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_registers_the_kernels_it_claims(backend):
    module = backends.load(backend)
    assert set(module.KERNELS) <= set(ops.OPS), f"{backend} claims ops that do not exist"
    for name in ops.OPS:
        registered = torch._C._dispatch_has_kernel_for_dispatch_key(
            f"paca::{name}", torch._C._dispatch_key_for_device(backend)
        )
        assert registered == (name in module.KERNELS), (
            f"{backend}: {name} claimed={name in module.KERNELS} registered={registered}"
        )
        # every op has its reference kernel for the devices without their own
        assert torch._C._dispatch_has_kernel_for_dispatch_key(
            f"paca::{name}", "CompositeExplicitAutograd"
        )


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="no backend for device type 'tpu'"):
        backends.load("tpu")


def test_import_touches_no_device_and_no_habana(tmp_path):
    # A habana_frameworks that explodes on import: `import paca` must not import it.
    fake = tmp_path / "habana_frameworks"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise RuntimeError('habana_frameworks imported')\n")
    code = textwrap.dedent(
        """
        import sys, torch
        import paca
        assert "habana_frameworks" not in sys.modules, "paca imported habana_frameworks"
        for heavy in ("trl", "peft", "deepspeed", "bitsandbytes", "paca.recipes"):
            assert heavy not in sys.modules, f"import paca imported {heavy}"
        assert not torch.cuda.is_initialized(), "paca initialised CUDA"
        assert paca.backends.loaded() == ["cpu"], paca.backends.loaded()
        print("ok")
        """
    )
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_device_resolution_errors():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' is not available here"):
            backends.resolve_device("cuda")
    with pytest.raises(ValueError, match="device='tpu' is not a device"):
        backends.resolve_device("tpu")
    with pytest.raises(ValueError, match="has no paca backend"):
        backends.resolve_device("meta")
    assert backends.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_kernel_table_is_the_registered_kernels(backend):
    # ops.kernels skips the dispatcher in eager mode: it must hand out exactly the kernels the
    # dispatcher would run, the backend's own or the reference
    module = backends.load(backend)
    like = types.SimpleNamespace(device=torch.device(backend))  # no device is touched
    table = ops.kernels(like)
    assert set(table) == set(ops.OPS)
    for name in ops.OPS:
        assert table[name] is module.KERNELS.get(name, ops.REFERENCE[name]), (backend, name)
    assert ops.kernels(torch.empty(1, device="meta")) is ops.REFERENCE  # no backend: reference


def test_compiled_graphs_trace_the_kernels():
    # torch.compile sees the kernels' own ATen ops (which it can fuse and generate code for),
    # not an opaque call back into Python
    seen = []

    def backend(gm, example_inputs):
        for module in gm.modules():
            graph = getattr(module, "graph", None)
            if graph is not None:
                seen.extend(str(n.target) for n in graph.nodes if n.op == "call_function")
        return gm

    x, idx, g, weight, cols = _samples(torch.float32)
    x.requires_grad_(True)
    delta = torch.zeros_like(cols, requires_grad=True)
    compiled = torch.compile(ops.merged_linear, backend=backend, fullgraph=True)
    compiled(x, weight, None, delta, idx, 2.0).sum().backward()
    assert not [t for t in seen if t.startswith("paca.")], seen
    assert any("index_select" in t for t in seen), seen
    x_idx = x.detach()[..., idx].flatten(0, 1)  # (tokens, r)
    expected = 2.0 * torch.ones(10, 8).t() @ x_idx  # the output gradient is all ones
    torch.testing.assert_close(delta.grad, expected)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_partial_grad_split_over_threads(threads):
    """The fp32 kernel splits a wide gradient into one block of output columns per thread (one
    bmm); narrow or uneven widths stay one GEMM. Every way within fp32 of the float64 product,
    on a contiguous gradient, a transposed one and one whose rows lie apart."""
    cpu = backends.load("cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        for out, split in ((cpu.MIN_BLOCK * 2, threads == 2), (cpu.MIN_BLOCK * 6, threads > 1)):
            assert (cpu._blocks(out) > 1) is split
            g = torch.randn(2, 48, out, generator=generator)
            x_idx = torch.randn(2, 48, 8, generator=generator)
            transposed = torch.randn(out, 48, 2, generator=generator).permute(2, 1, 0)
            sliced = torch.randn(2, 48, out + 5, generator=generator)[..., :out]  # rows apart
            for grad in (g, transposed, sliced):
                got = cpu.partial_grad(grad, x_idx, 0.5)
                assert got.shape == (out, 8) and got.is_contiguous()
                expected = _expected("partial_grad", (grad, x_idx, 0.5))
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert cpu._blocks(cpu.MIN_BLOCK * threads - 1) == 1  # uneven or too narrow: one GEMM
    finally:
        torch.set_num_threads(before)
