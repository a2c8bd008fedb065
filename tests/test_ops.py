"""The op contract: opcheck for every op, every backend's kernels against the reference."""

import subprocess
import sys
import textwrap

import pytest
import torch

import paca  # noqa: F401  (registers the CPU kernels)
from paca import backends, ops

BACKENDS = ["cpu", "cuda", "hpu"]
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


def _reference(name, args):
    """The op bodies of paca.ops, called directly (not through the dispatcher)."""
    x = args
    if name == "gather_cols":
        return x[0][..., x[1]]
    if name == "scatter_cols":
        cols, idx, n = x
        out = torch.zeros(*cols.shape[:-1], n, dtype=cols.dtype)
        out[..., idx] = cols
        return out
    if name == "partial_grad":
        g, x_idx, s = x
        dt = ops.grad_dtype(g.dtype)
        return s * g.reshape(-1, g.shape[-1]).to(torch.float64).t() @ x_idx.reshape(
            -1, x_idx.shape[-1]
        ).to(torch.float64), dt
    raise AssertionError(name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_kernels_on_cpu_tensors(backend, dtype):
    module = backends.load(backend)
    x, idx, g, weight, cols = _samples(dtype)
    k = module.KERNELS
    assert torch.equal(k["gather_cols"](x, idx), _reference("gather_cols", (x, idx)))
    x_idx = x.index_select(-1, idx)
    assert torch.equal(
        k["scatter_cols"](x_idx, idx, 16), _reference("scatter_cols", (x_idx, idx, 16))
    )
    w = weight.clone()
    k["write_cols_"](w, idx, cols, 1)
    expected = weight.clone()
    expected[:, idx] = cols
    assert torch.equal(w, expected)
    wt = weight.t().contiguous()
    k["write_cols_"](wt, idx, cols.t(), 0)
    assert torch.equal(wt, expected.t())
    ref, ref_dtype = _reference("partial_grad", (g, x_idx, 0.5))
    got = k["partial_grad"](g, x_idx, 0.5)
    assert got.dtype == ref_dtype and got.shape == (8, 4)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
    # 2-D inputs (a batch of tokens already flattened)
    got2 = k["partial_grad"](g[0], x_idx[0], 1.0)
    torch.testing.assert_close(
        got2.double(), _reference("partial_grad", (g[0], x_idx[0], 1.0))[0], rtol=tol, atol=tol
    )


_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA", "hpu": "HPU"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_registers_the_kernels_it_claims(backend):
    module = backends.load(backend)
    assert set(module.KERNELS) == set(ops.OPS), f"{backend} must implement every op"
    for name in module.KERNELS:
        qualified = f"paca::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, _DISPATCH_KEY[backend]), (
            f"{backend} claims {name} but no kernel is registered for {_DISPATCH_KEY[backend]}"
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
