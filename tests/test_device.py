"""The op contract, the layers and DropBP on an accelerator's tensors, against CPU float64.

Runs only when ``PACA_TEST_DEVICE`` names a device (``cuda``, ``hpu``, ``xpu``, ``mps``, or
``cpu`` to check this file itself); ``scripts/gpu_bench.sh`` sets it. A named device that is not
there fails, it does not skip.

    PACA_TEST_DEVICE=cuda python -m pytest -q tests/test_device.py
"""

import os

import pytest
import torch
from conftest import tiny_llama, token_batch
from test_ops import _cases, _check

import paca
from paca import backends

DEVICE = os.environ.get("PACA_TEST_DEVICE")
pytestmark = pytest.mark.skipif(not DEVICE, reason="set PACA_TEST_DEVICE=cuda (or hpu, ...)")


@pytest.fixture(scope="module")
def device():
    resolved = backends.resolve_device(DEVICE)  # raises with the fix if the device is missing
    if resolved.type == "cuda":
        # exactness against float64: no TF32 in fp32 GEMMs
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return resolved


def _to(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_on_device_tensors(device, dtype):
    for name, cases in _cases(dtype).items():
        for args in cases:
            on_device = tuple(_to(a, device) for a in args)
            kernel = paca.ops.OPS[name]
            if name == "write_cols_":
                weight = on_device[0].clone()
                kernel(weight, *on_device[1:])
                _check(lambda w, *rest, out=weight: w.copy_(out.cpu()), name, args, dtype)
            else:
                _check(lambda *a, on_device=on_device, k=kernel: k(*on_device).cpu(), name, args,
                       dtype)  # fmt: skip


def _train(device, mode, drop=0.0, steps=3):
    model = paca.enable(tiny_llama(), r=4, mode=mode, seed=1, device=str(device)).train()
    if drop:
        paca.drop_backward(model, rate=drop, seed=2)
    ids = token_batch().to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return {n: layer.delta.detach().cpu() for n, layer in paca.paca_layers(model)}


@pytest.mark.parametrize("mode", ["merged", "additive"])
@pytest.mark.parametrize("drop", [0.0, 0.5])
def test_training_on_device_matches_cpu(device, mode, drop):
    got, want = _train(device, mode, drop), _train(torch.device("cpu"), mode, drop)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


def test_merged_layer_is_exact_in_float64(device):
    if device.type == "mps":
        pytest.skip("MPS has no float64")
    model = tiny_llama(dtype=torch.float64).to(device)
    ids = token_batch()
    with torch.no_grad():  # the base model on the same device: unload must give it back exactly
        want = model(ids.to(device)).logits.cpu()
    paca.enable(model, r=4, device=str(device))
    for _, layer in paca.paca_layers(model):
        with torch.no_grad():
            layer.delta.normal_()
    paca.sync_weights(model)
    with torch.no_grad():
        adapted = model(ids.to(device)).logits.cpu()
    paca.unload(model)
    with torch.no_grad():
        restored = model(ids.to(device)).logits.cpu()
    assert not torch.allclose(adapted, want)
    assert torch.equal(restored, want)
