"""User-level differential privacy: DP-FedAvg (McMahan et al. 2018) with a budget.

With ``dp`` set, a round is the Gaussian mechanism on a Poisson-sampled cohort:

* every client joins the round independently with probability q = fraction-train
  (``poisson_cohort``), not Flower's fixed-size draw: the event the accountant
  knows how to amplify;
* each client's update (its model minus the global model) is clipped to L2 norm C
  (``dp-clipping-norm``): by the server after the update filter (``dp='server'``),
  or by the client before it sends (``dp='client'``; the server then rejects
  updates longer than C); a multiplexed node clips each of its clients;
* the server sums the clipped updates and divides by the expected cohort q·N, not
  by the number that arrived (``noised_update``), and adds N(0, (zC / qN)²) noise to
  every coordinate. The fixed denominator keeps the sensitivity at C / qN whatever
  the cohort's size, and a client that fails only leaves its term out (it is not
  replaced: a replacement would be a client the Poisson draw did not pick);
* with ``dp-clipping='adaptive'``, C follows a quantile of the update norms
  (``AdaptiveClipping``, Andrew et al. 2021): clients report whether their update
  was within C, the server adds noise to that count, and moves C geometrically
  towards the ``dp-target-quantile``; the update noise is raised so that the pair
  (noised sum, noised count) is as private as one Gaussian mechanism of multiplier
  z, which is what the ledger composes;
* ``PrivacyLedger`` composes one ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``
  per round with dp-accounting (add-or-remove-one neighbours, i.e. user-level DP):
  its privacy loss distribution (``dp-accountant='pld'``, the tighter bound) or
  its Renyi DP (``'rdp'``), and reports epsilon at ``dp-delta``; a round that would
  take epsilon past ``dp-max-epsilon`` is not run.

Every draw the guarantee rests on (the cohort, the update noise, the count noise)
comes from ``private_generator``: a generator seeded from the OS's cryptographic
source for that one draw, never from the run's seed or a global generator other
code seeds. Were the noise a function of the seed, anyone holding the released
model and results.json (which records the seed and the noise's scale) could
regenerate and subtract it. Flower's ``add_gaussian_noise_inplace`` draws from
NumPy's global generator, which the ServerApp seeds, so it is not used.

Flower's own DP wrappers are not used: their fixed-size sampling has no
amplification their accountant can use, they average by the number of replies,
they clip before the update filter, and their accountant refuses strategies that
override ``aggregate_train`` (the safeguards do). Their adaptive clipping moves C the
wrong way: it counts the *clipped* updates where Andrew et al. count the unclipped
ones (``b = 1`` if the norm is at most C) in the same update rule, so C runs away
from the target quantile instead of settling on it (with 100 log-normal norms and
target 0.5 it grew from the median to 3.4 times it in 25 rounds, all updates
unclipped). Their noise-scale and noise-splitting functions are used as they are.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from logging import INFO
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.common import log
from flwr.serverapp.strategy import Strategy

from fedcifar_app import compat
from fedcifar_app.config import RunConfig
from fedcifar_app.extensions.privacy.node import DP_CLIPPED
from fedcifar_app.results import RunRecorder
from fedcifar_app.strategies.checkpoint import Checkpoint
from fedcifar_app.strategies.replies import (bound_update_norms, clipped_on_nodes, is_node_mean,
                                             served, update_norm)
from fedcifar_app.strategies.safeguards import RunEndsEarly, RunFailedError, ServerHook
from fedcifar_app.strategies.sampling import NodeList

ACCOUNTING = {  # by dp-accountant (config.DP_ACCOUNTANTS)
    "pld": "PLD (dp-accounting's privacy loss distribution, pessimistic estimate), user "
           "level, add-or-remove-one neighbours, one Poisson-sampled Gaussian mechanism "
           "per round",
    "rdp": "RDP (dp-accounting), user level, add-or-remove-one neighbours, one "
           "Poisson-sampled Gaussian mechanism per round"}


class PrivacyBudgetSpent(RunEndsEarly):
    """The next round would spend more than dp-max-epsilon; the run ends before it."""


def private_generator() -> np.random.Generator:
    """A generator for one draw a privacy guarantee rests on, seeded with 256 bits
    from the OS's cryptographic source: no seed, file or other draw replays it."""
    return np.random.default_rng(int.from_bytes(os.urandom(32), "big"))


def poisson_cohort(nodes: list[int], rate: float) -> list[int]:
    """Each of ``nodes`` with probability ``rate``, independently, from a private draw."""
    joins = private_generator().random(len(nodes)) < rate
    return [node for node, joined in zip(nodes, joins, strict=True) if joined]


@dataclass
class PrivacyLedger:
    """Epsilon at ``delta`` after the rounds composed so far."""

    noise_multiplier: float
    sampling_rate: float
    delta: float
    max_epsilon: float = 0.0  # 0: no cap
    accountant: str = "pld"  # one of config.DP_ACCOUNTANTS
    rounds: int = 0
    epsilon_by_round: dict[int, float] = field(default_factory=dict)
    _epsilon_after: dict[int, float] = field(default_factory=dict, init=False, repr=False,
                                             compare=False)

    def epsilon(self, rounds: int) -> float:
        """Epsilon at ``delta`` after ``rounds`` rounds (infinite without noise); each
        count computed once (check_next asks for the one spend then records)."""
        if rounds not in self._epsilon_after:
            self._epsilon_after[rounds] = self._composed_epsilon(rounds)
        return self._epsilon_after[rounds]

    def _composed_epsilon(self, rounds: int) -> float:
        if rounds == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return float("inf")
        if self.accountant == "pld":
            return float(self._round_loss_distribution.self_compose(rounds)
                         .get_epsilon_for_delta(self.delta))
        return self._rdp_epsilon(rounds)

    @functools.cached_property
    def _round_loss_distribution(self):  # noqa: ANN202 - dp-accounting's PLD of one round
        """One round's privacy loss distribution, built once (the costly part); composing
        it k times is what dp-accounting's PLDAccountant does for k rounds."""
        from dp_accounting.pld import privacy_loss_distribution

        return privacy_loss_distribution.from_gaussian_mechanism(
            self.noise_multiplier, sampling_prob=self.sampling_rate)

    def _rdp_epsilon(self, rounds: int) -> float:
        import dp_accounting
        from dp_accounting import rdp

        accountant = rdp.RdpAccountant()
        # At large sampling rates the lowest RDP orders do not converge; dp-accounting
        # leaves them out and warns each time (to the 'absl' logger): kept quiet here.
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(logging.ERROR)
        try:
            accountant.compose(dp_accounting.PoissonSampledDpEvent(
                self.sampling_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier)),
                rounds)
            return float(accountant.get_epsilon(self.delta))
        finally:
            absl_logger.setLevel(level)

    def check_next(self, run_round: int) -> None:
        """Raise PrivacyBudgetSpent if running ``run_round`` would exceed the cap."""
        after = self.epsilon(self.rounds + 1)
        if self.max_epsilon > 0 and after > self.max_epsilon:
            raise PrivacyBudgetSpent(
                f"round {run_round} would take epsilon from "
                f"{self.epsilon(self.rounds):.4g} to {after:.4g}, past dp-max-epsilon "
                f"{self.max_epsilon:g} (delta {self.delta:g}); the run ends after round "
                f"{run_round - 1}")

    def spend(self, run_round: int) -> float:
        """Compose one round; return epsilon so far."""
        self.rounds += 1
        self.epsilon_by_round[run_round] = self.epsilon(self.rounds)
        return self.epsilon_by_round[run_round]

    def state(self) -> dict:
        """What a checkpoint keeps: the mechanism, the accountant and the spending."""
        return {"accountant": self.accountant, "noise_multiplier": self.noise_multiplier,
                "sampling_rate": self.sampling_rate, "delta": self.delta,
                "rounds": self.rounds, "epsilon_by_round": dict(self.epsilon_by_round)}

    def continue_from(self, state: dict) -> None:
        """Take over a checkpoint's spending (its mechanism is checked to be this one)."""
        self.rounds = int(state["rounds"])
        self.epsilon_by_round = {int(k): float(v)
                                 for k, v in state["epsilon_by_round"].items()}


def noised_update(global_arrays: ArrayRecord, mean_arrays: ArrayRecord | None,
                  clients: int, expected_clients: float, noise_std: float) -> ArrayRecord:
    """The new global model: the global one plus the sum of the ``clients`` clipped
    updates whose mean ``mean_arrays`` holds, divided by ``expected_clients`` (q·N),
    plus Gaussian noise of ``noise_std`` on every coordinate."""
    keys = list(global_arrays)
    start = global_arrays.to_numpy_ndarrays()
    if mean_arrays is None or clients == 0:
        update = [np.zeros_like(s) for s in start]
    else:
        update = [(mean_arrays[k].numpy() - s) * (clients / expected_clients)
                  for k, s in zip(keys, start, strict=True)]
    noise = private_generator()
    for values in update:
        values += noise.normal(0.0, noise_std, values.shape)
    return ArrayRecord({k: Array((s + u).astype(s.dtype, copy=False))
                        for k, s, u in zip(keys, start, update, strict=True)})


@dataclass(frozen=True)
class AdaptiveClipping:
    """Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping":
    after each round C <- C * exp(-learning_rate * (b - target_quantile)), where b is
    the noised fraction of the round's updates whose norm was at most C."""

    target_quantile: float  # fraction of updates C should leave unclipped
    learning_rate: float
    count_stddev: float  # noise on the count of unclipped updates; 0: cohort / 20

    def noise(self, noise_multiplier: float, expected_clients: float) -> tuple[float, float]:
        """(count noise std, update noise multiplier) for an overall multiplier z:
        the count's sensitivity is 1/2 (bits centred on 0), so the two Gaussian
        mechanisms together are one of multiplier z when z^-2 = z_update^-2 +
        (2 * count_std)^-2. ValueError if the count noise leaves no room for z."""
        return compat.compute_adaptive_noise_params(noise_multiplier, expected_clients,
                                                    self.count_stddev or None)

    def next_norm(self, norm: float, unclipped: int, clients: int, expected_clients: float,
                  count_stddev: float) -> tuple[float, float]:
        """(next C, the noised unclipped fraction it was moved by). The centred count
        sum(b - 1/2) is noised and divided by the expected cohort, as the update sum is."""
        noised = float(private_generator().normal(unclipped - clients / 2, count_stddev))
        fraction = noised / expected_clients + 0.5
        return norm * math.exp(-self.learning_rate * (fraction - self.target_quantile)), fraction


class DifferentialPrivacy(ServerHook):
    """DP-FedAvg in the safeguarded strategy: the Poisson cohort, the clipping (or, with
    dp='client', the check that clients clipped), the noised release and its
    accounting, and the ledger and clipping norm in the checkpoint."""

    releases_empty_rounds = True  # an empty cohort still releases (noise only)

    def __init__(self, config: RunConfig, recorder: RunRecorder) -> None:
        self.ledger = PrivacyLedger(config.dp_noise_multiplier, config.fraction_train,
                                    config.dp_delta, config.dp_max_epsilon,
                                    config.dp_accountant)
        self.clipping_norm = config.dp_clipping_norm  # this round's C (adaptive moves it)
        self.clips_on_server = config.dp == "server"  # dp='client': the server checks C
        self.adaptive_clipping = None if config.dp_clipping != "adaptive" else AdaptiveClipping(
            config.dp_target_quantile, config.dp_clip_learning_rate,
            config.dp_clipped_count_stddev)
        self.recorder = recorder
        self._expected_cohort = 0.0
        self._update_noise_multiplier = 0.0
        self._count_stddev = 0.0
        self._clipped = 0
        recorder.extra["privacy"] = {
            "accountant": config.dp_accountant,
            "accounting": ACCOUNTING[config.dp_accountant], "clipping": config.dp,
            "noise_multiplier": config.dp_noise_multiplier,
            "clipping_norm": config.dp_clipping_norm,
            "sampling_rate": config.fraction_train, "delta": config.dp_delta,
            "max_epsilon": config.dp_max_epsilon, "adaptive_clipping": None if
            self.adaptive_clipping is None else {
                "target_quantile": config.dp_target_quantile,
                "learning_rate": config.dp_clip_learning_rate,
                "clipped_count_stddev": config.dp_clipped_count_stddev or "cohort / 20"}}

    def configure_train(self, strategy: Strategy, run_round: int, arrays: ArrayRecord,
                        config: ConfigRecord, nodes: NodeList) -> list[Message]:
        """Stop before a round past the budget; sample a Poisson cohort and hand
        Flower's configure_train exactly those nodes."""
        ledger = self.ledger
        population = len(nodes.node_ids)
        if ledger.delta >= 1 / population:
            raise RunFailedError(
                f"'dp-delta' {ledger.delta:g} is not below 1 / {population} clients: such "
                "a delta allows releasing a client's data outright; lower dp-delta")
        ledger.check_next(run_round)
        self._expected_cohort = ledger.sampling_rate * population
        self._update_noise_multiplier = ledger.noise_multiplier
        if self.adaptive_clipping is not None:
            try:
                self._count_stddev, self._update_noise_multiplier = \
                    self.adaptive_clipping.noise(ledger.noise_multiplier, self._expected_cohort)
            except ValueError as err:
                raise RunFailedError(
                    f"adaptive clipping: 'dp-noise-multiplier' {ledger.noise_multiplier:g} "
                    f"needs 'dp-clipped-count-stddev' above {ledger.noise_multiplier / 2:g} "
                    f"(with {self._expected_cohort:g} clients expected per round): {err}"
                ) from err
        config["dp-clipping-norm"] = self.clipping_norm  # what clients clip to
        cohort = poisson_cohort(nodes.node_ids, ledger.sampling_rate)
        if not cohort:  # the round still releases (noise only)
            return []
        # Flower samples int(n * fraction-train) of the nodes it is given once
        # min-available-nodes of them are there: here, all of the cohort at once.
        saved = strategy.fraction_train, strategy.min_available_nodes
        strategy.fraction_train, strategy.min_available_nodes = 1.0, 1
        try:
            return list(strategy.configure_train(run_round, arrays, config, NodeList(cohort)))
        finally:
            strategy.fraction_train, strategy.min_available_nodes = saved

    def reply_problem(self, reply: Message, global_arrays: ArrayRecord) -> str | None:
        """With dp='client': why an update is longer than the clipping norm, or None."""
        if self.clips_on_server or is_node_mean(reply):
            return None
        norm = update_norm(reply.content["arrays"], global_arrays)
        if norm <= self.clipping_norm * (1 + 1e-5):
            return None
        return (f"update norm {norm:.4g} exceeds this round's clipping norm "
                f"{self.clipping_norm:.4g} (dp='client': clients clip)")

    def clip(self, run_round: int, usable: list[Message], global_arrays: ArrayRecord) -> int:
        """Clip on the server (dp='server') or count what clients clipped; multiplexed
        nodes clip each client's update before averaging them."""
        single = [r for r in usable if not is_node_mean(r)]
        clipped = clipped_on_nodes(usable)
        if self.clips_on_server:
            clipped += bound_update_norms(single, global_arrays, self.clipping_norm)
        else:  # dp='client': each client says whether it clipped
            clipped += sum(int(r.content["metrics"].get(DP_CLIPPED, 0)) for r in single)
        self._clipped = clipped
        return clipped

    def release(self, run_round: int, global_arrays: ArrayRecord,
                aggregate: ArrayRecord | None, usable: list[Message]) -> ArrayRecord:
        """DP-FedAvg's release: the clipped updates' sum over the expected cohort, plus
        noise; with adaptive clipping, the next round's norm from the noised count of
        unclipped updates. The round's epsilon goes to the log and results.json."""
        clients = sum(len(served(r)) for r in usable) if aggregate is not None else 0
        unclipped = clients - self._clipped if aggregate is not None else 0
        ledger = self.ledger
        norm = self.clipping_norm
        noise_std = compat.compute_stdv(self._update_noise_multiplier, norm,
                                        self._expected_cohort)
        arrays = noised_update(global_arrays, aggregate, clients, self._expected_cohort,
                               noise_std)
        epsilon = ledger.spend(run_round)
        log(INFO, "Round %d: privacy spent so far epsilon=%.4f at delta=%g (%d clients, "
            "clipping norm %.4g, noise std %.3g)", run_round, epsilon, ledger.delta,
            clients, norm, noise_std)
        self.recorder.record(run_round, save=False, dp_epsilon=epsilon,
                             dp_delta=ledger.delta, dp_clients=clients,
                             dp_clipping_norm=norm, dp_noise_std=noise_std)
        if self.adaptive_clipping is not None:
            self.clipping_norm, fraction = self.adaptive_clipping.next_norm(
                norm, unclipped, clients, self._expected_cohort, self._count_stddev)
            self.recorder.record(run_round, save=False, dp_unclipped_fraction=fraction)
        return arrays

    def checkpoint_state(self) -> dict:
        """The spending so far and the next round's clipping norm."""
        return {"privacy_ledger": self.ledger.state(), "dp_clipping_norm": self.clipping_norm}

    def resume(self, checkpoint: Checkpoint) -> None:
        # resume_problems found the same mechanism
        self.ledger.continue_from(checkpoint.extension_state["privacy_ledger"])
        self.clipping_norm = checkpoint.extension_state["dp_clipping_norm"]
