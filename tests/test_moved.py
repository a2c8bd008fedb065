"""Module paths of paca 0.1 keep working for one release, with a DeprecationWarning."""

import importlib

import pytest

from paca import adapters, base_layer, targets
from paca.adapters import foreign
from paca.recipes import bench, loading, train


@pytest.mark.parametrize(
    "old, name, new",
    [
        ("paca.checkpoint", "save_adapter", adapters.save_adapter),
        ("paca.checkpoint", "ADAPTER_WEIGHTS", adapters.ADAPTER_WEIGHTS),
        ("paca.interop", "export_lora", adapters.export_lora),
        ("paca.interop", "read_foreign", foreign.read),
        ("paca.train", "TrainConfig", train.TrainConfig),
        ("paca.bench", "BenchConfig", bench.BenchConfig),
        ("paca.loading", "dtype_argument", loading.dtype_argument),
        ("paca.model", "DEFAULT_TARGETS", targets.DEFAULT_TARGETS),
        ("paca.layer", "is_conv1d", base_layer.is_conv1d),
        ("paca.quant", "is_quantized", base_layer.is_quantized),
    ],
)
def test_old_paths_forward_with_a_deprecation_warning(old, name, new):
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=rf"{old}\.{name} moved to"):
        assert getattr(module, name) is new


def test_unknown_names_on_old_paths_are_attribute_errors():
    module = importlib.import_module("paca.checkpoint")
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        module.nothing_here  # noqa: B018
