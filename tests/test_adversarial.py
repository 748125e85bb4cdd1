"""Adversarial inputs: whatever a run config, a node config, a message or a file on disk
holds, the answer is a clear error naming what is wrong (or a valid result), never
another exception, and nothing is written or overwritten on the way."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcifar_app import client_app, data
from fedcifar_app.config import (NODE_KEYS, ConfigError, NodeConfigError, RunConfig,
                                 node_config_problems)
from fedcifar_app.strategies import RunFailedError
from fedcifar_app.strategies.replies import update_problem
from fedcifar_app.node import MalformedInstruction
from tests.test_client_app import SIMULATED, make_context
from tests.strategies.test_strategy import GLOBAL, make_strategy, state_dict
from tests.conftest import resumable_checkpoint

pytestmark = pytest.mark.usefixtures("server_task_identity")

# What TOML and flwr's --run-config / --node-config parsing can hand an app, and more.
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.lists(st.integers(), max_size=3), st.binary(max_size=8))
QUICK = settings(max_examples=60, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


@QUICK
@given(key=st.sampled_from(sorted(RunConfig.docs())), value=ANY_VALUE)
def test_any_run_config_value_is_valid_or_a_config_error_naming_its_key(key: str,
                                                                       value: object) -> None:
    try:
        config = RunConfig.from_mapping({key: value})
    except ConfigError as error:
        assert f"'{key}'" in str(error)
        return
    assert config.to_dict()[key] == value


@QUICK
@given(key=st.sampled_from(sorted(NODE_KEYS)), value=ANY_VALUE)
def test_any_node_config_value_is_valid_or_a_problem_naming_its_key(key: str,
                                                                   value: object) -> None:
    problems = node_config_problems({key: value})
    assert all(f"'{key}'" in problem for problem in problems)
    kind, _ = NODE_KEYS[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        assert problems


def train_message(content: RecordDict) -> Message:
    return Message(content=content, dst_node_id=7, message_type="train")


def model_record(**changes: torch.Tensor | None) -> ArrayRecord:
    arrays = dict(state_dict())
    for name, tensor in changes.items():
        if tensor is None:
            del arrays[name]
        else:
            arrays[name] = tensor
    return ArrayRecord(arrays)


ROUND = ConfigRecord({"server-round": 1})
MALFORMED = {
    "no model": (RecordDict({"config": ROUND}), "no ArrayRecord 'arrays'"),
    "no round": (RecordDict({"arrays": model_record()}), "integer 'server-round'"),
    "round of the wrong type": (
        RecordDict({"arrays": model_record(), "config": ConfigRecord({"server-round": "1"})}),
        "integer 'server-round'"),
    "a missing layer": (RecordDict({"arrays": model_record(**{"fc3.bias": None}),
                                    "config": ROUND}), "missing ['fc3.bias']"),
    "the wrong dtype": (RecordDict({"arrays": model_record(
        **{"fc1.bias": torch.zeros(120, dtype=torch.float64)}), "config": ROUND}),
        "'fc1.bias' is float64[120]"),
    "an oversized array": (RecordDict({"arrays": model_record(
        **{"fc1.weight": torch.zeros(4096, 4096)}), "config": ROUND}),
        "'fc1.weight' is float32[4096, 4096]"),
    "NaN weights": (RecordDict({"arrays": model_record(
        **{"conv1.bias": torch.full((6,), float("nan"))}), "config": ROUND}),
        "'conv1.bias' holds NaN or Inf"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_instruction_is_refused_clearly_and_nothing_is_written(
        case: str, tiny_dataset: Path, tmp_path: Path) -> None:
    content, expected = MALFORMED[case]
    cache = tmp_path / "cache"
    context = make_context(tiny_dataset, cache, SIMULATED)
    context.run_config["output-dir"] = str(tmp_path / "out")
    with pytest.raises(MalformedInstruction, match="instruction cannot be used") \
            as refused:
        client_app.app(train_message(content), context)
    assert expected in str(refused.value)
    assert not cache.exists() and not (tmp_path / "out").exists()


def test_a_node_config_of_the_wrong_kind_is_refused_before_any_work(
        tiny_dataset: Path, tmp_path: Path) -> None:
    context = make_context(tiny_dataset, tmp_path / "cache",
                           {"partition-id": 3, "num-partitions": 2})
    content = RecordDict({"arrays": model_record(), "config": ROUND})
    with pytest.raises(NodeConfigError, match="'partition-id' 3 must be below"):
        client_app.app(train_message(content), context)
    assert not (tmp_path / "cache").exists()


ARRAY = st.builds(
    lambda shape, dtype, fill: np.full(shape, fill, dtype=dtype),
    st.lists(st.integers(0, 6), min_size=0, max_size=3),
    st.sampled_from([np.float32, np.float64, np.int64, np.float16]),
    st.floats(allow_nan=True, allow_infinity=True, width=16))
REPLY_CONTENT = st.fixed_dictionaries({
    "arrays": st.one_of(st.none(), st.dictionaries(
        st.sampled_from([*state_dict(), "extra"]), ARRAY, max_size=4)),
    "metrics": st.one_of(st.none(), st.dictionaries(
        st.sampled_from(["num-examples", "train-loss", "x"]),
        st.one_of(st.integers(-5, 50), st.floats(allow_nan=True, allow_infinity=True)),
        max_size=3)),
})


def reply_from(content: dict, node: int = 5) -> Message:
    records = RecordDict()
    if content["arrays"] is not None:
        records["arrays"] = ArrayRecord({k: Array(v) for k, v in content["arrays"].items()})
    if content["metrics"] is not None:
        records["metrics"] = MetricRecord(content["metrics"])
    instruction = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    return Message(content=records, reply_to=instruction)


@QUICK
@given(content=REPLY_CONTENT)
def test_any_training_reply_is_aggregated_or_refused_by_name(content: dict,
                                                            tmp_path_factory) -> None:
    """A reply holding anything: the update filter names why it is unusable, and a
    round of only such replies fails the run, saying so; nothing else escapes."""
    problem = update_problem(reply_from(content), GLOBAL)
    strategy, recorder = make_strategy(tmp_path_factory.mktemp("round"))
    strategy._global_arrays = GLOBAL
    if problem is None:
        strategy.aggregate_train(1, [reply_from(content)])
        return
    with pytest.raises(RunFailedError, match="none of the 1 training replies"):
        strategy.aggregate_train(1, [reply_from(content)])
    assert recorder.entries[0]["train_rejected"] == 1


FOREIGN_FILES = {
    "truncated": lambda valid: valid[: len(valid) // 2],
    "empty": lambda valid: b"",
    "random bytes": lambda valid: np.random.default_rng(0).bytes(4096),
    "another program's pickle": lambda valid: pickle.dumps({"weights": [1, 2, 3]}),
    "JSON": lambda valid: b'{"round": 3}',
}


@pytest.mark.parametrize("kind", list(FOREIGN_FILES))
def test_a_foreign_or_cut_checkpoint_is_refused_for_resume_and_left_alone(
        kind: str, tmp_path: Path) -> None:
    strategy, _ = make_strategy(tmp_path / "first")
    strategy._global_arrays = GLOBAL
    strategy.aggregate_train(1, [reply_from({"arrays": {k: v.numpy() for k, v in
                                                         state_dict().items()},
                                             "metrics": {"num-examples": 10}})])
    path = tmp_path / "first" / "run" / "checkpoint.pt"
    path.write_bytes(FOREIGN_FILES[kind](path.read_bytes()))
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="is not a readable fedcifar checkpoint"):
        resumable_checkpoint(RunConfig.from_mapping({
            "output-dir": str(tmp_path), "resume-from": str(path)}))
    assert path.read_bytes() == before


@pytest.mark.parametrize("cache_file", ["test.pt", "test-images.npy"])
@pytest.mark.parametrize("kind", list(FOREIGN_FILES))
def test_a_foreign_or_cut_cache_file_is_refused_by_name_and_left_alone(
        kind: str, cache_file: str, tiny_dataset: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    data.load_split(str(tiny_dataset), "test", cache)
    (cached,) = cache.rglob(cache_file)
    cached.write_bytes(FOREIGN_FILES[kind](cached.read_bytes()))
    before = cached.read_bytes()
    with pytest.raises(data.DatasetUnavailableError, match="cannot be read") as refused:
        data.load_split(str(tiny_dataset), "test", cache)
    assert str(cached) in str(refused.value) and "delete it" in str(refused.value)
    assert cached.read_bytes() == before

