"""User-level differential privacy: clipping, noise scale, accounting, the budget cap."""

from __future__ import annotations

import math
import random
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import pld, rdp
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedcifar_app import server_app
from fedcifar_app.config import ConfigError, RunConfig
from fedcifar_app.extensions import phase_retries
from fedcifar_app.extensions.privacy.server import (AdaptiveClipping, DifferentialPrivacy,
                                                    PrivacyBudgetSpent, PrivacyLedger,
                                                    poisson_cohort)
from fedcifar_app.strategies import RunFailedError, load_checkpoint
from tests.extensions.test_multiplex import run_rounds
from tests.strategies.test_recovery import FakeGrid as PushPullGrid
from tests.strategies.test_recovery import recovering
from tests.strategies.test_strategy import GLOBAL, FakeGrid, make_strategy, state_dict
from tests.conftest import resumable_checkpoint

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


def independent_epsilon(accountant: str, sampling_rate: float, noise_multiplier: float,
                        rounds: int, delta: float) -> float:
    """Epsilon after ``rounds`` Poisson-sampled Gaussian mechanisms, composed one by one
    in dp-accounting's own accountant."""
    composed = pld.PLDAccountant() if accountant == "pld" else rdp.RdpAccountant()
    for _ in range(rounds):
        composed.compose(dp_accounting.PoissonSampledDpEvent(
            sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)))
    return composed.get_epsilon(delta)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_epsilon_matches_an_independent_computation(accountant: str) -> None:
    """The ledger's epsilon after k rounds is dp-accounting's for k Poisson-sampled
    Gaussian mechanisms (q = 0.05, z = 1.1) at delta 1e-5, composed here on their own."""
    ledger = PrivacyLedger(noise_multiplier=1.1, sampling_rate=0.05, delta=1e-5,
                           accountant=accountant)
    for run_round in range(1, 6):
        spent = ledger.spend(run_round)
        assert spent == pytest.approx(
            independent_epsilon(accountant, 0.05, 1.1, run_round, 1e-5), rel=1e-9)
    assert list(ledger.epsilon_by_round) == [1, 2, 3, 4, 5]
    assert ledger.epsilon_by_round[1] < ledger.epsilon_by_round[5]


def test_pld_is_the_default_and_tighter_than_rdp() -> None:
    """z 0.832, q 0.05, 200 rounds, delta 1e-5: RDP 7.99, PLD 7.05, so at a target
    epsilon PLD needs less noise."""
    assert RunConfig().dp_accountant == "pld"
    by_accountant = {accountant: PrivacyLedger(0.832, 0.05, 1e-5, accountant=accountant)
                     .epsilon(200) for accountant in ("pld", "rdp")}
    assert by_accountant["rdp"] == pytest.approx(7.99, abs=0.01)
    assert by_accountant["pld"] == pytest.approx(7.05, abs=0.01)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_a_rounds_recorded_epsilon_is_the_recorded_settings(tmp_path: Path,
                                                            accountant: str) -> None:
    """What results.json says (accountant, q, z, delta) reproduces its epsilon."""
    _, recorder = private_round(tmp_path, [unchanged() for _ in range(NODES)], dp="server",
                                **{"dp-noise-multiplier": 1.3, "dp-delta": 1e-3,
                                   "dp-accountant": accountant})
    recorded = recorder.extra["privacy"]
    assert recorded["accountant"] == accountant
    assert recorder.entries[0]["dp_epsilon"] == pytest.approx(independent_epsilon(
        recorded["accountant"], recorded["sampling_rate"], recorded["noise_multiplier"],
        1, recorded["delta"]), rel=1e-9)


def seed_everything_the_run_seeds(seed: int) -> None:
    """What a replaying observer would do: every generator the run seed fixes."""
    server_app.seed_everything(seed)
    random.seed(seed)


def test_two_runs_with_the_same_seed_release_different_noise(tmp_path: Path) -> None:
    """Same seed, same updates, every global generator seeded alike: were the noise a
    function of the seed, both releases would be equal and the noise subtractable."""
    releases = []
    for attempt in range(2):
        seed_everything_the_run_seeds(42)
        change, _ = private_round(tmp_path / str(attempt), [unchanged() for _ in range(NODES)],
                                  dp="server", **{"dp-noise-multiplier": 1.0})
        releases.append(change)
    assert not torch.equal(releases[0], releases[1])
    # Independent noise: the difference of the two has sqrt(2) times the noise's std.
    noise_std = 1.0 * 1.0 / NODES
    assert (releases[0] - releases[1]).std().item() == pytest.approx(
        math.sqrt(2) * noise_std, rel=0.02)


def test_the_count_noise_of_adaptive_clipping_is_not_replayable() -> None:
    rule = AdaptiveClipping(target_quantile=0.5, learning_rate=0.2, count_stddev=1.0)
    fractions = set()
    for _ in range(2):
        seed_everything_the_run_seeds(7)
        fractions.add(rule.next_norm(1.0, 5, 10, 10.0, 1.0)[1])
    assert len(fractions) == 2


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


def test_the_cohort_is_poisson_sampled_and_not_a_function_of_the_seed(tmp_path: Path) -> None:
    nodes = list(range(10_000))
    cohorts = []
    for _ in range(2):
        seed_everything_the_run_seeds(3)
        cohorts.append(poisson_cohort(nodes, 0.1))
    # Binomial(10,000, 0.1): mean 1,000, std 30; 150 is 5 std.
    assert all(abs(len(cohort) - 1000) < 150 for cohort in cohorts)
    assert cohorts[0] != cohorts[1]
    # The strategy's own draw, same seed and round, over 200 nodes: 2^-200 to repeat.
    drawn = []
    for attempt in range(2):
        seed_everything_the_run_seeds(3)
        strategy, _ = make_strategy(tmp_path / str(attempt), **{
            "dp": "server", "fraction-train": 0.5, "min-available-nodes": 1, "seed": 3,
            "dp-delta": 1e-3})
        grid = FakeGrid(200, {n: n - 1 for n in range(1, 201)})
        strategy.meet_nodes(grid)
        drawn.append(sorted(m.metadata.dst_node_id
                            for m in strategy.configure_train(1, GLOBAL, ConfigRecord(), grid)))
    assert drawn[0] != drawn[1]


def test_a_failed_cohort_member_is_left_out_not_replaced(tmp_path: Path) -> None:
    """DP with the default round-retries: the instruction of a cohort member that fails
    goes to nobody else, so the round is still the Poisson-sampled mechanism the
    ledger accounts for (a replacement would be a client the draw did not pick)."""
    nodes = 40
    strategy, recorder = make_strategy(tmp_path, **{
        "dp": "server", "fraction-train": 0.5, "min-available-nodes": 1, "dp-delta": 1e-3,
        "dp-noise-multiplier": 1.0})
    assert strategy_config(strategy).round_retries == 3
    strategy.meet_nodes(FakeGrid(nodes, {n: n - 1 for n in range(1, nodes + 1)}))
    instructions = list(strategy.configure_train(
        1, GLOBAL, ConfigRecord(), FakeGrid(nodes, {n: n - 1 for n in range(1, nodes + 1)})))
    cohort = [m.metadata.dst_node_id for m in instructions]
    failing = cohort[0]
    grid = PushPullGrid({n: "error" if n == failing else "ok" for n in range(1, nodes + 1)})
    recovering_grid, reports = recovering(grid, retries=phase_retries(strategy_config(strategy)))
    replies = list(recovering_grid.send_and_receive(instructions, timeout=5))
    assert sorted(grid.destinations()) == sorted(cohort)
    assert reports[0].replacements == 0
    assert [r.metadata.src_node_id for r in replies if r.has_error()] == [failing]


def strategy_config(strategy) -> RunConfig:  # noqa: ANN001
    return RunConfig.from_mapping(dict(strategy.recorder.run_config))


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
        clipping: str, tmp_path: Path, tiny_dataset: Path, replay_private_draws) -> None:
    """Client-side clipping on each client, its node's unweighted mean, the same noise:
    six SuperNodes or six virtual clients on two give the same model and epsilon (and,
    with adaptive clipping, the same clipping norm each round, which nodes receive
    from the server and count against for it)."""
    settings = {"dp": "client", "dp-noise-multiplier": 0.8, "dp-clipping-norm": 0.3,
                "fraction-train": 0.5, "dp-delta": 1e-3, "dp-clipping": clipping,
                "dp-clipped-count-stddev": 1.0}
    # The comparison needs the same private draws in both modes: replayed here only.
    replay_private_draws()
    per_node, per_node_results = run_rounds(tmp_path / "per-node", tiny_dataset, 6, **settings)
    replay_private_draws()
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


def dp_of(strategy):  # noqa: ANN001, ANN201
    """The DP hook of a safeguarded strategy."""
    return next(hook for hook in strategy.hooks if isinstance(hook, DifferentialPrivacy))


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
    assert dp_of(strategy).clipping_norm == pytest.approx(moved)
    second = strategy.configure_train(2, GLOBAL, ConfigRecord(), grid)
    assert {m.content["config"]["dp-clipping-norm"] for m in second} == {
        dp_of(strategy).clipping_norm}
    checkpoint = load_checkpoint(str(strategy.checkpoint_path))
    assert checkpoint.extension_state["dp_clipping_norm"] == pytest.approx(moved)
    resumed, _ = make_strategy(tmp_path / "resumed", **{
        "dp": "server", "dp-clipping-norm": 0.5, "dp-clipping": "adaptive"})
    resumed.resume_from(checkpoint)
    assert dp_of(resumed).clipping_norm == pytest.approx(moved)


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


RESUMABLE = {"dp": "server", "fraction-train": 1.0, "min-available-nodes": 1,
             "dp-noise-multiplier": 1.2, "dp-delta": 1e-3}


def private_rounds(strategy, rounds: range) -> None:  # noqa: ANN001
    grid = FakeGrid(NODES, {n: n - 1 for n in range(1, NODES + 1)})
    strategy.meet_nodes(grid)
    for run_round in rounds:
        strategy.configure_train(run_round, GLOBAL, ConfigRecord(), grid)
        strategy.aggregate_train(run_round, updates([unchanged() for _ in range(NODES)]))


def checkpoint_for(tmp_path: Path, **settings: object):  # noqa: ANN201
    """The checkpoint a run with ``settings`` would resume from (refusals raise)."""
    return resumable_checkpoint(RunConfig.from_mapping({
        "output-dir": str(tmp_path), "resume-from": str(tmp_path / "first" / "run"),
        **settings}))


def test_a_matching_resume_continues_the_ledger(tmp_path: Path) -> None:
    first, _ = make_strategy(tmp_path / "first", **RESUMABLE)
    private_rounds(first, range(1, 3))
    resumed, recorder = make_strategy(tmp_path / "second", **RESUMABLE)
    resumed.resume_from(checkpoint_for(tmp_path, **RESUMABLE))
    private_rounds(resumed, range(1, 2))  # Flower's round 1 of the rest is round 3
    assert recorder.entries[0]["round"] == 3
    assert recorder.entries[0]["dp_epsilon"] == pytest.approx(
        independent_epsilon("pld", 1.0, 1.2, 3, 1e-3), rel=1e-9)
    ledger = load_checkpoint(str(tmp_path / "second" / "run")).extension_state["privacy_ledger"]
    assert list(ledger["epsilon_by_round"]) == [1, 2, 3]
    assert [ledger["epsilon_by_round"][r] for r in (1, 2)] == \
        [dp_of(first).ledger.epsilon_by_round[r] for r in (1, 2)]


@pytest.mark.parametrize("first_settings, change, named", [
    (RESUMABLE, {"dp-noise-multiplier": 2.0}, "'dp-noise-multiplier' was 1.2, is 2.0"),
    (RESUMABLE, {"dp-accountant": "rdp"}, "'dp-accountant' was 'pld', is 'rdp'"),
    (RESUMABLE, {"fraction-train": 0.5}, "'fraction-train' was 1.0, is 0.5"),
    (RESUMABLE, {"seed": 1}, "'seed' was 42, is 1"),
    (RESUMABLE, {"strategy": "fedprox"}, "'strategy' was 'fedavg', is 'fedprox'"),
    (RESUMABLE, {"dp": "none"}, "'dp' was 'server', is 'none'"),
    # A checkpoint of rounds without noise, resumed with DP: they spent infinite epsilon.
    ({"fraction-train": 1.0, "min-available-nodes": 1}, RESUMABLE, "'dp' was 'none', is 'server'"),
])
def test_a_resume_with_other_settings_is_refused_naming_them(
        tmp_path: Path, first_settings: dict, change: dict, named: str) -> None:
    first, _ = make_strategy(tmp_path / "first", **first_settings)
    private_rounds(first, range(1, 2))
    with pytest.raises(ConfigError, match="cannot be continued by this run") as refused:
        checkpoint_for(tmp_path, **{**first_settings, **change})
    assert named in str(refused.value)
    assert checkpoint_for(tmp_path, **first_settings).round == 1


def test_a_checkpoint_without_recorded_settings_is_refused(tmp_path: Path) -> None:
    first, _ = make_strategy(tmp_path / "first")
    first._global_arrays = GLOBAL
    first.aggregate_train(1, updates([unchanged()]))
    path = tmp_path / "first" / "run" / "checkpoint.pt"
    saved = torch.load(path, weights_only=True)
    del saved["settings"]
    torch.save(saved, path)
    with pytest.raises(ConfigError, match="records no run settings"):
        checkpoint_for(tmp_path)
