"""The backend table: adding a device is one file plus one line, absent devices are clear
errors that leave the model alone, meta tensors need no backend, memory helpers fall back."""

import sys

import pytest
import torch
from conftest import tiny_llama

import paca
from paca import backends

FAKE = '''
"""A throwaway backend, added the way a contributor adds one."""
import torch

DEVICE_TYPE = "privateuseone"
AUTO_RANK = 5
HINT = "the throwaway test device is switched off"
AVAILABLE = False
CALLS = []


def is_available():
    return AVAILABLE


def gather_cols(x, idx):
    CALLS.append("gather_cols")
    return torch.index_select(x, -1, idx)


KERNELS = {"gather_cols": gather_cols}
'''


@pytest.fixture
def fake_backend(tmp_path, monkeypatch):
    (tmp_path / "paca_throwaway_backend.py").write_text(FAKE)
    monkeypatch.syspath_prepend(str(tmp_path))
    # the one line a contributor adds
    monkeypatch.setattr(backends, "MODULES", (*backends.MODULES, "paca_throwaway_backend"))
    yield __import__("paca_throwaway_backend")
    sys.modules.pop("paca_throwaway_backend", None)
    backends._loaded.pop("privateuseone", None)


def test_a_new_backend_is_one_file_plus_one_line(fake_backend):
    assert "privateuseone" in backends.device_types()
    with pytest.raises(ValueError, match="the throwaway test device is switched off"):
        backends.resolve_device("privateuseone")
    assert backends.resolve_device("auto") == torch.device("cpu")
    fake_backend.AVAILABLE = True
    # AUTO_RANK 5 comes before every real accelerator
    assert backends.resolve_device("auto") == torch.device("privateuseone")
    assert backends.resolve_device("privateuseone") == torch.device("privateuseone")
    module = backends.load("privateuseone")
    assert module is fake_backend
    assert torch._C._dispatch_has_kernel_for_dispatch_key("paca::gather_cols", "PrivateUse1")


@pytest.mark.parametrize("device", ["xpu", "mps"])
def test_absent_new_devices_are_clear_errors_and_leave_the_model(device):
    if backends.is_available(device):
        pytest.skip(f"this machine has a {device}")
    with pytest.raises(ValueError, match=rf"device='{device}' is not available here: torch"):
        backends.resolve_device(device)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"device='{device}' is not available here"):
        paca.enable(model, r=4, device=device)
    assert not paca.paca_layers(model) and paca.get_state(model) is None
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


def test_every_backend_declares_what_the_table_needs():
    for device_type, module in backends.table().items():
        assert module.DEVICE_TYPE == device_type
        assert isinstance(module.AUTO_RANK, int)
        assert device_type == "cpu" or isinstance(module.HINT, str) and module.HINT
        assert isinstance(module.is_available(), bool)
        assert isinstance(module.KERNELS, dict)
    assert list(backends.table())[-1] == "cpu", "the CPU is the last resort of device='auto'"


def test_only_a_graph_per_shape_device_asks_for_static_shapes():
    assert backends.static_shapes(torch.device("hpu"))  # Gaudi compiles a graph per shape
    for device_type in ("cpu", "cuda", "meta"):
        assert not backends.static_shapes(torch.device(device_type))


def test_meta_tensors_need_no_backend():
    before = backends.loaded()
    backends.load_for({torch.device("meta"), torch.device("cpu")})
    assert backends.loaded() == sorted(set(before) | {"cpu"})
    with pytest.raises(ValueError, match="has no paca backend"):
        backends.resolve_device("meta")


def test_memory_helpers_fall_back_where_a_device_has_no_counter():
    assert backends.device_memory(torch.device("cpu")) is None
    # torch.mps has no max_memory_allocated: no peak figure rather than an AttributeError
    assert not hasattr(torch.mps, "max_memory_allocated")
    assert backends.device_memory(torch.device("mps")) is None
    backends.reset_device_memory(torch.device("mps"))  # a no-op, not an error
