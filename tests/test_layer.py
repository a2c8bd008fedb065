"""PacaLinear against a float64 dense reference, in both modes, for nn.Linear and Conv1D."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.pytorch_utils import Conv1D

import paca
from paca.layer import PacaLinear

IN, OUT, R = 12, 7, 4
MODES = ["merged", "additive"]
KINDS = ["linear", "conv1d"]


def make_layer(kind="linear", mode="merged", bias=True, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    if kind == "linear":
        base = nn.Linear(IN, OUT, bias=bias).to(dtype)
        w0 = base.weight.detach().clone()  # (out, in)
    else:
        base = Conv1D(OUT, IN).to(dtype)  # Conv1D always has a bias; "no bias" = zeros
        nn.init.normal_(base.bias) if bias else nn.init.zeros_(base.bias)
        w0 = base.weight.detach().t().clone()
    b0 = base.bias.detach().clone() if base.bias is not None else None
    idx = torch.tensor([0, 3, 5, 11])
    layer = PacaLinear(base, idx, alpha=8.0, mode=mode)
    with torch.no_grad():
        layer.delta.normal_()  # non-zero, as after some training; forward picks the change up
    return layer, w0, b0, idx


def dense_reference(x, w0, b0, idx, delta, scaling):
    """``x @ W_eff.T + b`` with ``W_eff[:, idx] = W0[:, idx] + s * delta``, and its leaves."""
    x = x.detach().to(torch.float64).requires_grad_(True)
    delta = delta.detach().to(torch.float64).requires_grad_(True)
    w0 = w0.to(torch.float64)
    w_eff = w0.index_copy(1, idx, w0[:, idx] + scaling * delta)
    y = x @ w_eff.t()
    if b0 is not None:
        y = y + b0.to(torch.float64)
    return y, x, delta


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, IN), (2, 3, IN)])
def test_exact_against_dense_float64(kind, mode, bias, shape):
    layer, w0, b0, idx = make_layer(kind, mode, bias)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref, x_ref, delta_ref = dense_reference(x, w0, b0, idx, layer.delta, layer.scaling)
    y_ref.backward(g)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.delta.grad, delta_ref.grad, rtol=1e-12, atol=1e-12)
    assert layer.delta.grad.dtype == torch.float64
    # the base weight never receives a gradient
    assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_additive_layer(kind):
    layer, *_ = make_layer(kind, "additive")
    x = torch.randn(2, 3, IN, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    assert torch.autograd.gradcheck(
        lambda x, d: paca.ops.partial_linear(layer.base_layer(x), x, d, layer.idx, 2.0),
        (x, layer.delta),
    )


@pytest.mark.parametrize("transposed", [False, True])
def test_gradcheck_merged_function(transposed):
    # The merged weight is a function of delta that autograd does not see (it is frozen); rebuild
    # it from delta inside f so the numerical Jacobian sees delta's effect.
    torch.manual_seed(0)
    w0 = torch.randn(OUT, IN, dtype=torch.float64)
    b = torch.randn(OUT, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([1, 2, 8, 9])

    def f(x, delta, b):
        w = w0.index_copy(1, idx, w0[:, idx] + 0.5 * delta.detach())
        w = w.t().contiguous() if transposed else w
        return paca.ops.merged_linear(x, w, b, delta, idx, 0.5, transposed)

    x = torch.randn(2, 3, IN, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(OUT, R, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, delta, b))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_adamw_steps_equal_masked_dense_training(mode, kind):
    layer, w0, b0, idx = make_layer(kind, mode, bias=True)
    with torch.no_grad():
        layer.delta.zero_()
    s = layer.scaling
    lr, eps = 1e-2, 1e-8
    opt = torch.optim.AdamW([layer.delta], lr=lr, eps=eps, weight_decay=0.0)
    # Dense twin: W itself trained, gradient masked to the columns. Adam is scale invariant up to
    # eps, so W's columns (which move by s * delta) follow with lr * s and eps / s.
    w = w0.clone().requires_grad_(True)
    dense_opt = torch.optim.AdamW([w], lr=lr * s, eps=eps / s, weight_decay=0.0)
    mask = torch.zeros_like(w0)
    mask[:, idx] = 1
    torch.manual_seed(1)
    for _ in range(4):
        x = torch.randn(3, 5, IN, dtype=torch.float64)
        target = torch.randn(3, 5, OUT, dtype=torch.float64)
        loss = ((layer(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        dense_loss = ((x @ w.t() + b0 - target) ** 2).mean()
        dense_loss.backward()
        w.grad.mul_(mask)
        dense_opt.step()
        dense_opt.zero_grad()
        torch.testing.assert_close(loss, dense_loss, rtol=1e-10, atol=1e-12)
    w_paca = w0.index_copy(1, idx, w0[:, idx] + s * layer.delta.detach())
    torch.testing.assert_close(w_paca, w.detach(), rtol=1e-10, atol=1e-12)
    if mode == "merged":
        effective = layer.weight.t() if kind == "conv1d" else layer.weight
        torch.testing.assert_close(effective, w.detach(), rtol=1e-10, atol=1e-12)
    # columns outside idx never moved
    others = [i for i in range(IN) if i not in idx.tolist()]
    assert torch.equal(w.detach()[:, others], w0[:, others])


def _saved_tensor_shapes(layer, x):
    owned = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
    shapes = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in owned:
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    return shapes


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_saves_only_r_input_columns(mode, kind):
    layer, *_ = make_layer(kind, mode, dtype=torch.float32)
    x = torch.randn(2, 6, IN, requires_grad=True)
    shapes = _saved_tensor_shapes(layer, x)
    assert (2, 6, R) in shapes, shapes
    assert all(s[-1] != IN for s in shapes if s), (
        f"a tensor with last dim in_features was saved: {shapes}"
    )


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_merged_writes_columns_only_after_a_step():
    # eager calls run the CPU kernels straight (ops.kernels), so the ATen ops they run are
    # counted: index_select is the gather, index_copy_ the column write
    layer, *_ = make_layer("linear", "merged", dtype=torch.float32)
    opt = torch.optim.SGD([layer.delta], lr=0.1)
    x = torch.randn(4, IN)
    layer(x)  # picks up the hand-set delta (safety net)
    with _OpCounter() as counter:
        for _ in range(3):  # gradient accumulation: three forward/backward, no step
            layer(x).sum().backward()
        with torch.no_grad():
            layer(x)  # evaluation between steps
    assert "aten.index_copy_" not in counter.names
    assert counter.names.count("aten.index_select") == 3
    with _OpCounter() as counter:
        opt.step()
    assert counter.names.count("aten.index_copy_") == 1, counter.names
    with _OpCounter() as counter:
        layer(x).sum().backward()
    assert "aten.index_copy_" not in counter.names


def test_gradient_accumulation_equals_one_big_batch():
    layer, w0, b0, idx = make_layer("linear", "merged")
    x = torch.randn(4, 3, IN, dtype=torch.float64)
    for half in (x[:2], x[2:]):
        (layer(half) ** 2).sum().backward()
    y_ref, _, delta_ref = dense_reference(x, w0, b0, idx, layer.delta, layer.scaling)
    (y_ref**2).sum().backward()
    torch.testing.assert_close(layer.delta.grad, delta_ref.grad, rtol=1e-12, atol=1e-12)


def test_hand_edit_of_delta_is_picked_up_in_eager():
    layer, w0, b0, idx = make_layer("linear", "merged")
    x = torch.randn(3, IN, dtype=torch.float64)
    with torch.no_grad():
        layer.delta.mul_(3.0)
        y = layer(x)
    y_ref, *_ = dense_reference(x, w0, b0, idx, layer.delta, layer.scaling)
    torch.testing.assert_close(y, y_ref.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_bf16_weights_keep_fp32_delta(mode):
    layer, w0, b0, idx = make_layer("linear", mode, dtype=torch.bfloat16)
    assert layer.delta.dtype == torch.float32
    x = torch.randn(2, 5, IN, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.delta.grad.dtype == torch.float32
    y_ref, *_ = dense_reference(x, w0, b0, idx, layer.delta, layer.scaling)
    torch.testing.assert_close(y.double(), y_ref.detach(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("mode", MODES)
def test_autocast_bf16(mode):
    layer, w0, b0, idx = make_layer("linear", mode, dtype=torch.float32)
    x = torch.randn(2, 5, IN, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.delta.dtype == torch.float32 and layer.delta.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32
    y_ref, x_ref, delta_ref = dense_reference(x, w0, b0, idx, layer.delta, layer.scaling)
    y_ref.sum().backward()
    torch.testing.assert_close(y.double(), y_ref.detach(), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(layer.delta.grad.double(), delta_ref.grad, rtol=3e-2, atol=5e-2)


def test_layer_keeps_linear_attributes():
    layer, *_ = make_layer("conv1d", "merged")
    assert (layer.in_features, layer.out_features) == (IN, OUT)
    assert layer.weight is layer.base_layer.weight
    assert "r=4" in repr(layer)


@pytest.mark.parametrize(
    "optimizer_kwargs", [dict(fused=True), dict(foreach=True), dict(foreach=False)]
)
def test_merged_columns_follow_every_optimizer_implementation(optimizer_kwargs):
    # fused AdamW updates parameters without bumping their version counter: the step hook
    # must write the columns anyway.
    layer, w0, b0, idx = make_layer("linear", "merged", dtype=torch.float32)
    opt = torch.optim.AdamW([layer.delta], lr=0.1, **optimizer_kwargs)
    x = torch.randn(4, IN)
    for _ in range(3):
        layer(x).sum().backward()
        opt.step()
        opt.zero_grad()
    expected = w0.index_copy(1, idx, w0[:, idx] + layer.scaling * layer.delta.detach())
    torch.testing.assert_close(layer.weight, expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        y_ref, *_ = dense_reference(x, w0, b0, idx, layer.delta, layer.scaling)
        torch.testing.assert_close(layer(x).double(), y_ref, rtol=1e-5, atol=1e-5)


def test_one_optimizer_step_writes_every_layer_with_its_own_scaling():
    # the step hook batches the writes of all layers an optimizer owns, grouped by scaling:
    # Linear and Conv1D (transposed) layers with different alphas in one optimizer
    layers = []
    for seed, (kind, alpha) in enumerate([("linear", 8.0), ("conv1d", 8.0), ("linear", 2.0)]):
        layer, w0, _, idx = make_layer(kind, "merged", seed=seed)
        layer.adapters["default"].alpha = alpha
        layer.adapters["default"].scaling = alpha / R
        layers.append((layer, w0, idx))
    opt = torch.optim.SGD([layer.delta for layer, _, _ in layers], lr=0.5)
    x = torch.randn(3, IN, dtype=torch.float64)
    sum(layer(x).square().sum() for layer, _, _ in layers).backward()
    opt.step()
    for layer, w0, idx in layers:
        weight = layer.base_layer.weight
        weight = weight.t() if layer.transposed else weight  # (out, in)
        expected = w0.index_copy(1, idx, w0[:, idx] + layer.scaling * layer.delta.detach())
        torch.testing.assert_close(weight, expected, rtol=1e-12, atol=1e-12)
    # restoring gives the base weight back bit for bit
    for layer, w0, _ in layers:
        layer.restore_base()
        weight = layer.base_layer.weight
        assert torch.equal(weight.t() if layer.transposed else weight, w0)
