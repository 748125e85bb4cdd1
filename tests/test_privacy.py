"""User-level differential privacy: clipping, noise scale, accounting, the budget cap."""

from __future__ import annotations

import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import rdp
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedcifar_app.config import ConfigError, RunConfig
from fedcifar_app.strategies.privacy import (AdaptiveClipping, PrivacyBudgetSpent, PrivacyLedger,
                                             poisson_cohort)
from fedcifar_app.strategies.safeguards import RunFailedError, load_checkpoint
from tests.test_multiplex import run_rounds
from tests.test_strategy import GLOBAL, FakeGrid, make_strategy, state_dict

pytestmark = pytest.mark.usefixtures("server_task_identity")

NODES = 10


def updates(arrays: list[dict[str, torch.Tensor]]) -> list[Message]:
    """Training replies with ``arrays``, each weighing one client (dp-weight 1)."""
    replies = []
    for node, weights in enumerate(arrays, start=1):
        instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
        replies.append(Message(RecordDict({
            "arrays": ArrayRecord(weights),
            "metrics": MetricRecord({"num-examples": 10, "train-loss": 1.0, "dp-weight": 1})}),
            reply_to=instruction))
    return replies


def private_round(tmp_path: Path, arrays: list[dict[str, torch.Tensor]], **config: object):
    """One round of a DP strategy over NODES nodes all sampled (fraction 1): return the
    change of the global model, as one flat array, and the recorder."""
    strategy, recorder = make_strategy(tmp_path, **{"fraction-train": 1.0,
                                                    "min-available-nodes": 1, **config})
    grid = FakeGrid(NODES, {n: n - 1 for n in range(1, NODES + 1)})
    strategy.meet_nodes(grid)
    assert len(strategy.configure_train(1, GLOBAL, ConfigRecord(), grid)) == NODES
    aggregated, _ = strategy.aggregate_train(1, updates(arrays))
    start = GLOBAL.to_torch_state_dict()
    change = torch.cat([(aggregated.to_torch_state_dict()[k] - v).flatten()
                        for k, v in start.items()])
    return change, recorder


def unchanged() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state_dict().items()}


def test_the_noise_has_the_configured_scale(tmp_path: Path) -> None:
    """Zero updates from all 10 clients: what changes is the noise alone, N(0, (zC/qN)^2)
    on each of the CNN's 62,006 coordinates. The sample std of 62,006 normal draws is
    within 1 % of the true one with overwhelming probability (its own std is 0.28 %),
    and a scale off by a factor (e.g. C/n with the wrong n) is far outside that."""
    np.random.seed(0)
    change, recorder = private_round(tmp_path, [unchanged() for _ in range(NODES)],
                                     dp="server", **{"dp-noise-multiplier": 1.5,
                                                     "dp-clipping-norm": 2.0})
    expected = 1.5 * 2.0 / NODES
    assert change.std().item() == pytest.approx(expected, rel=0.01)
    assert abs(change.mean().item()) < 5 * expected / math.sqrt(change.numel())
    assert recorder.entries[0]["dp_noise_std"] == pytest.approx(expected)


def test_server_side_clipping_bounds_each_update(tmp_path: Path) -> None:
    """No noise: one client moved every weight by 1 (norm 249), the others not at all;
    its update is clipped to C, and the sum is divided by the expected cohort."""
    far = {k: v + 1 for k, v in unchanged().items()}
    change, recorder = private_round(tmp_path, [far] + [unchanged() for _ in range(NODES - 1)],
                                     dp="server", **{"dp-noise-multiplier": 0.0,
                                                     "dp-clipping-norm": 0.5})
    assert change.norm().item() == pytest.approx(0.5 / NODES, rel=1e-4)
    assert recorder.entries[0]["train_clipped"] == 1


def test_with_client_side_clipping_the_server_rejects_unclipped_updates(tmp_path: Path) -> None:
    far = {k: v + 1 for k, v in unchanged().items()}
    _, recorder = private_round(tmp_path, [far] + [unchanged() for _ in range(NODES - 1)],
                                dp="client", **{"dp-noise-multiplier": 0.0,
                                                "dp-clipping-norm": 0.5})
    entry = recorder.entries[0]
    assert (entry["train_replies"], entry["train_rejected"]) == (NODES - 1, 1)


def test_epsilon_matches_an_independent_computation() -> None:
    """The ledger's epsilon after k rounds is dp-accounting's for k Poisson-sampled
    Gaussian mechanisms (q = 0.05, z = 1.1) at delta 1e-5, composed here on their own."""
    ledger = PrivacyLedger(noise_multiplier=1.1, sampling_rate=0.05, delta=1e-5)
    for run_round in range(1, 6):
        spent = ledger.spend(run_round)
        accountant = rdp.RdpAccountant()
        for _ in range(run_round):
            accountant.compose(dp_accounting.PoissonSampledDpEvent(
                0.05, dp_accounting.GaussianDpEvent(1.1)))
        assert spent == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert list(ledger.epsilon_by_round) == [1, 2, 3, 4, 5]
    assert ledger.epsilon_by_round[1] < ledger.epsilon_by_round[5]


def test_the_cap_refuses_the_first_round_past_it() -> None:
    probe = PrivacyLedger(noise_multiplier=2.0, sampling_rate=0.5, delta=1e-5)
    cap = (probe.epsilon(2) + probe.epsilon(3)) / 2
    ledger = PrivacyLedger(noise_multiplier=2.0, sampling_rate=0.5, delta=1e-5,
                           max_epsilon=cap)
    for run_round in (1, 2):
        ledger.check_next(run_round)
        ledger.spend(run_round)
    with pytest.raises(PrivacyBudgetSpent, match="round 3 would take epsilon"):
        ledger.check_next(3)


def test_the_cohort_is_poisson_sampled_and_seeded() -> None:
    nodes = list(range(10_000))
    cohort = poisson_cohort(nodes, 0.1, seed=3, run_round=1)
    # Binomial(10,000, 0.1): mean 1,000, std 30; 150 is 5 std.
    assert abs(len(cohort) - 1000) < 150
    assert cohort == poisson_cohort(nodes, 0.1, seed=3, run_round=1)
    assert cohort != poisson_cohort(nodes, 0.1, seed=3, run_round=2)


@pytest.mark.parametrize("settings, message", [
    ({"dp": "server", "strategy": "fedmedian"}, "'dp' needs 'strategy' fedavg or fedprox"),
    ({"dp": "client", "dp-max-epsilon": 1.0, "dp-noise-multiplier": 0.0},
     "without noise epsilon is infinite"),
    ({"dp": "server", "dp-delta": 1.0}, "'dp-delta' must be in (0, 1)"),
    ({"dp": "server", "update-norm-bound": 0.5}, "set 'update-norm-bound' to 0"),
    ({"dp": "server", "dp-clipping": "adaptive", "dp-clipped-count-stddev": 0.4},
     "'dp-noise-multiplier' 1 must be below 2 x 'dp-clipped-count-stddev' (0.8)"),
    ({"dp": "server", "dp-clipping": "flat"}, "'dp-clipping' must be one of fixed, adaptive"),
])
def test_invalid_privacy_settings_are_named(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        RunConfig.from_mapping(settings)
    assert message in str(error.value)


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_a_private_multiplexed_run_gives_the_per_node_model_and_spends_the_same(
        clipping: str, tmp_path: Path, tiny_dataset: Path) -> None:
    """Client-side clipping on each client, its node's unweighted mean, the same noise:
    six SuperNodes or six virtual clients on two give the same model and epsilon (and,
    with adaptive clipping, the same clipping norm each round, which nodes receive
    from the server and count against for it)."""
    settings = {"dp": "client", "dp-noise-multiplier": 0.8, "dp-clipping-norm": 0.3,
                "fraction-train": 0.5, "dp-delta": 1e-3, "dp-clipping": clipping,
                "dp-clipped-count-stddev": 1.0}
    np.random.seed(5)
    per_node, per_node_results = run_rounds(tmp_path / "per-node", tiny_dataset, 6, **settings)
    np.random.seed(5)
    multiplexed, mux_results = run_rounds(tmp_path / "multiplexed", tiny_dataset, 2,
                                          **{"virtual-clients": 6}, **settings)
    for name in per_node:
        torch.testing.assert_close(per_node[name], multiplexed[name], rtol=1e-4, atol=1e-5)
    keys = ("dp_epsilon", "dp_clients", "dp_clipping_norm", "train_clipped")
    spent = [tuple(e[k] for k in keys) for e in per_node_results["entries"] if keys[0] in e]
    assert spent == [tuple(e[k] for k in keys) for e in mux_results["entries"] if keys[0] in e]
    assert len(spent) == 3
    assert spent[0][0] < spent[-1][0]
    norms = {norm for _, _, norm, _ in spent}
    assert len(norms) == (3 if clipping == "adaptive" else 1)


def test_adaptive_clipping_settles_on_the_target_quantile() -> None:
    """Without count noise, from a hundred times too small or too large, the norm
    ends within 5 % of the target quantile of a fixed set of 200 update norms (one
    step moves it by at most 0.2 x 1/200 in log near there, well inside 5 %)."""
    norms = np.random.default_rng(0).lognormal(0.0, 0.5, 200)
    for target in (0.5, 0.8):
        rule = AdaptiveClipping(target_quantile=target, learning_rate=0.2, count_stddev=0.0)
        for start in (0.01, 100.0):
            clipping_norm = start
            for _ in range(400):
                unclipped = int((norms <= clipping_norm).sum())
                clipping_norm, fraction = rule.next_norm(clipping_norm, unclipped, 200,
                                                         200.0, 0.0)
                assert fraction == pytest.approx(unclipped / 200)
            assert clipping_norm == pytest.approx(np.quantile(norms, target), rel=0.05)


def test_adaptive_clipping_splits_the_noise_without_spending_more() -> None:
    """The update noise is raised so that update sum (sensitivity C) and centred count
    (sensitivity 1/2) together are one Gaussian mechanism of the configured z."""
    for z, expected, stddev in [(1.0, 100.0, 0.0), (0.8, 3.0, 1.0)]:
        rule = AdaptiveClipping(0.5, 0.2, stddev)
        count_stddev, update_z = rule.noise(z, expected)
        assert count_stddev == (stddev or expected / 20)
        assert update_z > z
        assert update_z ** -2 + (2 * count_stddev) ** -2 == pytest.approx(z ** -2)


def test_an_adaptive_round_moves_the_norm_by_the_unclipped_fraction(tmp_path: Path) -> None:
    """No noise: 3 of 10 updates are longer than C = 0.5 and clipped, 7 are not; the
    next round's C is 0.5 exp(-0.2 (0.7 - 0.5)), which the next instructions carry,
    the checkpoint keeps, and a resumed run starts from."""
    far = {k: v + 1 for k, v in unchanged().items()}
    strategy, recorder = make_strategy(tmp_path, **{
        "fraction-train": 1.0, "min-available-nodes": 1, "dp": "server",
        "dp-noise-multiplier": 0.0, "dp-clipping-norm": 0.5, "dp-clipping": "adaptive"})
    grid = FakeGrid(NODES, {n: n - 1 for n in range(1, NODES + 1)})
    strategy.meet_nodes(grid)
    first = strategy.configure_train(1, GLOBAL, ConfigRecord(), grid)
    assert {m.content["config"]["dp-clipping-norm"] for m in first} == {0.5}
    strategy.aggregate_train(1, updates([far] * 3 + [unchanged() for _ in range(NODES - 3)]))
    entry = recorder.entries[0]
    moved = 0.5 * math.exp(-0.2 * (0.7 - 0.5))
    assert (entry["train_clipped"], entry["dp_clipping_norm"]) == (3, 0.5)
    assert entry["dp_unclipped_fraction"] == pytest.approx(0.7)
    assert strategy.dp_clipping_norm == pytest.approx(moved)
    second = strategy.configure_train(2, GLOBAL, ConfigRecord(), grid)
    assert {m.content["config"]["dp-clipping-norm"] for m in second} == {strategy.dp_clipping_norm}
    checkpoint = load_checkpoint(str(strategy.checkpoint_path))
    assert checkpoint.dp_clipping_norm == pytest.approx(moved)
    resumed, _ = make_strategy(tmp_path / "resumed", **{
        "dp": "server", "dp-clipping-norm": 0.5, "dp-clipping": "adaptive"})
    resumed.resume_from(checkpoint)
    assert resumed.dp_clipping_norm == pytest.approx(moved)


def test_client_side_adaptive_clipping_counts_what_the_clients_report(tmp_path: Path) -> None:
    strategy, recorder = make_strategy(tmp_path, **{
        "fraction-train": 1.0, "min-available-nodes": 1, "dp": "client",
        "dp-noise-multiplier": 0.0, "dp-clipping-norm": 0.5, "dp-clipping": "adaptive"})
    grid = FakeGrid(NODES, {n: n - 1 for n in range(1, NODES + 1)})
    strategy.meet_nodes(grid)
    strategy.configure_train(1, GLOBAL, ConfigRecord(), grid)
    replies = updates([unchanged() for _ in range(NODES)])
    for position, reply in enumerate(replies):
        reply.content["metrics"]["dp-clipped"] = int(position < 4)
    strategy.aggregate_train(1, replies)
    assert recorder.entries[0]["train_clipped"] == 4
    assert recorder.entries[0]["dp_unclipped_fraction"] == pytest.approx(0.6)


def test_adaptive_clipping_refuses_count_noise_too_small_for_the_noise_multiplier(
        tmp_path: Path) -> None:
    """Andrew et al.'s default count noise, expected clients / 20 = 0.5 here, leaves no
    room for z = 1.5 (it needs z < 2 x 0.5): the first round fails, naming the keys."""
    strategy, _ = make_strategy(tmp_path, **{
        "fraction-train": 1.0, "min-available-nodes": 1, "dp": "server",
        "dp-noise-multiplier": 1.5, "dp-clipping-norm": 0.5, "dp-clipping": "adaptive"})
    grid = FakeGrid(NODES, {n: n - 1 for n in range(1, NODES + 1)})
    strategy.meet_nodes(grid)
    with pytest.raises(RunFailedError, match="'dp-clipped-count-stddev' above 0.75"):
        strategy.configure_train(1, GLOBAL, ConfigRecord(), grid)
