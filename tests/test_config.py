"""The typed run config: defaults, documentation and every kind of error."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedcifar_app.config import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[1]


def pyproject_run_config() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def test_pyproject_holds_every_key_with_the_config_defaults() -> None:
    assert pyproject_run_config() == RunConfig().to_dict()
    assert RunConfig.from_mapping(pyproject_run_config()) == RunConfig()


def test_the_docs_document_every_key() -> None:
    reference = (ROOT / "docs" / "configuration.md").read_text()
    missing = [key for key in RunConfig().to_dict() if f"`{key}`" not in reference]
    assert missing == []


def test_overrides_are_typed() -> None:
    config = RunConfig.from_mapping({"num-server-rounds": 3, "learning-rate": 1,
                                     "augment": True, "strategy": "fedprox"})
    assert config.num_server_rounds == 3
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    assert config.augment is True and config.strategy == "fedprox"


@pytest.mark.parametrize("values, message", [
    ({"num-server-rounds": "two"}, "'num-server-rounds' expects an integer, got 'two' (str)"),
    ({"num-server-rounds": 2.5}, "'num-server-rounds' expects an integer"),
    ({"num-server-rounds": True}, "'num-server-rounds' expects an integer, got True (bool)"),
    ({"augment": 1}, "'augment' expects true or false"),
    ({"learning-rate": "fast"}, "'learning-rate' expects a number"),
    ({"dataset": 3}, "'dataset' expects a string"),
    ({"num-server-rounds": 0}, "'num-server-rounds' must be >= 1, got 0"),
    ({"fraction-train": 0.0}, "'fraction-train' must be in (0, 1], got 0.0"),
    ({"fraction-evaluate": 1.5}, "'fraction-evaluate' must be in [0, 1]"),
    ({"dirichlet-alpha": 0}, "'dirichlet-alpha' must be > 0, got 0"),
    ({"dirichlet-alpha": -1.0}, "'dirichlet-alpha' must be > 0"),
    ({"classes-per-partition": 11}, "'classes-per-partition' must be in [1, 10], got 11"),
    ({"classes-per-partition": 0}, "'classes-per-partition' must be in [1, 10]"),
    ({"validation-fraction": 1.0}, "'validation-fraction' must be in [0, 1)"),
    ({"validation-fraction": 0.0}, "'validation-fraction' is 0, so nodes hold no validation"),
    ({"dirichlet-min-partition-size": -1}, "'dirichlet-min-partition-size' must be >= 0"),
    ({"dirichlet-self-balancing": "yes"}, "'dirichlet-self-balancing' expects true or false"),
    ({"momentum": 1.0}, "'momentum' must be in [0, 1)"),
    ({"strategy": "fedsgd"}, "'strategy' must be one of fedavg, fedprox, fedavgm, fedadam"),
    ({"partitioner": "shards"}, "'partitioner' must be one of iid, dirichlet, pathological"),
    ({"dataset": " "}, "'dataset' must not be empty"),
    ({"num-rounds": 3}, "unknown key 'num-rounds'"),
])
def test_bad_values_name_the_key(values: dict, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        RunConfig.from_mapping(values)
    assert message in str(raised.value)


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as raised:
        RunConfig.from_mapping({"batch-size": 0, "seed": "x", "colour": "red"})
    text = str(raised.value)
    assert "'batch-size'" in text and "'seed'" in text and "'colour'" in text


def test_the_server_evaluates_every_k_rounds_and_the_final_model() -> None:
    config = RunConfig.from_mapping({"num-server-rounds": 7, "evaluate-every": 3})
    assert [r for r in range(8) if config.is_evaluation_round(r)] == [0, 3, 6, 7]
    every_round = RunConfig.from_mapping({"num-server-rounds": 3})
    assert all(every_round.is_evaluation_round(r) for r in range(4))


FLOAT_KEYS = [key for key, (default, _) in RunConfig.docs().items() if isinstance(default, float)]


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_no_float_key_takes_a_non_finite_value(key: str, value: float) -> None:
    """inf passed the range checks of learning-rate, dp-clipping-norm and others."""
    with pytest.raises(ConfigError, match=f"'{key}' "):
        RunConfig.from_mapping({key: value})
