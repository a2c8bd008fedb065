import copy
import json
import pickle

import pytest
import torch

from paca import PacaConfig


def test_json_round_trip_copy_and_pickle(tmp_path):
    config = PacaConfig(
        r=16, alpha=32, target_modules=["q_proj", "v_proj"], device=torch.device("cpu")
    )
    assert config.device == "cpu" and config.scaling == 2.0
    assert PacaConfig.from_json(config.to_json()) == config
    config.save(tmp_path / "c.json")
    assert PacaConfig.load(tmp_path / "c.json") == config
    assert copy.deepcopy(config) == config and copy.copy(config) == config
    assert pickle.loads(pickle.dumps(config)) == config
    json.loads(config.to_json())  # plain JSON


def test_unknown_keys_are_named():
    data = PacaConfig().to_dict() | {"rank": 4, "dropout": 0.1}
    with pytest.raises(ValueError, match=r"unknown PaCA config keys \['dropout', 'rank'\]"):
        PacaConfig.from_dict(data)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=2.5), "r must be a positive integer"),
        (dict(r=True), "r must be a positive integer"),
        (dict(alpha="big"), "alpha must be a number"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(target_modules=[1]), "target_modules must be a list of module names"),
        (dict(trainable_modules="classifier"), "trainable_modules must be a list"),
    ],
)
def test_invalid_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PacaConfig(**kwargs)
