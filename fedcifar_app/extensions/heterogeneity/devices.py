"""Heterogeneous clients: each client's device (compute speed, link, availability over
time), and how long a round takes on it, in simulated seconds.

A device's compute is modelled, not measured (a measurement would make the simulated
clock, and with it who is available when, differ from run to run): a round trains
epochs x examples samples at the device's seconds per sample. Devices come from seeded
draws (``drawn_devices``: a log-normal spread of speeds and links around a reference
device, and a fraction of stragglers several times slower) or from FedScale's trace
files (``traced_devices``):

* ``client_device_capacity``: {client: {"computation": inference latency in ms per
  sample, "communication": link in kbit/s}}; a round computes 3 x batch x steps
  samples' latency (FedScale's rule: a backward pass costs about twice the forward one)
  and sends the model down and up;
* ``client_behave_trace``: {client: {"active": [s, ...], "inactive": [s, ...],
  "finish_time": s, ...}}: the client is available from each active[i] to inactive[i],
  the pattern repeating every finish_time seconds (FedScale's ``is_active``).

Client i (a partition id) takes the trace's i-th client in key order, wrapping around,
as FedScale assigns its profiles. Trace files are pickles: they are read with an
unpickler that builds only numbers, strings, lists, tuples and dicts, so a file from
elsewhere cannot run code here.
"""

from __future__ import annotations

import io
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedcifar_app.config import ConfigError

# A round's compute in FedScale's model: forward (1) plus backward (about 2) passes.
FEDSCALE_TRAINING_FACTOR = 3.0


@dataclass(frozen=True)
class Device:
    """One client's device."""

    seconds_per_sample: float  # training compute per sample
    kbps: float  # its link, each way
    active: tuple[float, ...] = ()  # availability windows [active[i], inactive[i]] ...
    inactive: tuple[float, ...] = ()
    period: float = 0.0  # ... repeating every period seconds; 0: always available

    def round_seconds(self, samples: int, model_bytes: int) -> float:
        """Simulated seconds of a round: receive the model, train ``samples`` samples
        (epochs times examples), send the update back."""
        return samples * self.seconds_per_sample + 2 * model_bytes * 8 / 1000.0 / self.kbps

    def available(self, at: float) -> bool:
        """Whether the client is reachable at simulated time ``at``."""
        if self.period == 0:
            return True
        offset = at % self.period
        return any(start <= offset <= end for start, end in zip(self.active, self.inactive))

    def available_until(self, at: float) -> float:
        """When the availability window holding ``at`` closes (inf: never; ``at`` itself
        when the client is not available then)."""
        if self.period == 0:
            return math.inf
        offset = at % self.period
        ends = [end for start, end in zip(self.active, self.inactive) if start <= offset <= end]
        return at + (max(ends) - offset) if ends else at

    def next_available(self, at: float) -> float:
        """The first time from ``at`` on when the client is reachable."""
        if self.available(at):
            return at
        offset = at % self.period
        later = [start for start in self.active if start > offset]
        return at + (min(later) - offset if later else self.period - offset + min(self.active))


def drawn_devices(count: int, seed: int, seconds_per_sample: float, kbps: float,
                  spread: float, straggler_fraction: float,
                  straggler_slowdown: tuple[float, float]) -> list[Device]:
    """``count`` devices drawn from ``seed``: compute and links log-normal around
    ``seconds_per_sample`` and ``kbps`` (sigma ``spread``), and round(fraction x count)
    stragglers whose compute is further slowed by a factor uniform in
    ``straggler_slowdown``."""
    rng = np.random.default_rng([seed, 0x5EED_DE71CE])  # its own stream of the seed
    slowdowns = rng.lognormal(0.0, spread, count)
    links = kbps * rng.lognormal(0.0, spread, count)
    stragglers = rng.permutation(count)[:round(straggler_fraction * count)]
    slowdowns[stragglers] *= rng.uniform(*straggler_slowdown, len(stragglers))
    return [Device(seconds_per_sample * float(slowdown), float(link))
            for slowdown, link in zip(slowdowns, links, strict=True)]


def traced_devices(capacity_file: Path, behaviour_file: Path | None,
                   count: int) -> list[Device]:
    """``count`` devices from FedScale trace files (see the module docstring)."""
    capacity = _trace(capacity_file, ("computation", "communication"))
    behaviour = (_trace(behaviour_file, ("active", "inactive", "finish_time"))
                 if behaviour_file is not None else None)
    capacity_keys = sorted(capacity, key=str)
    behaviour_keys = sorted(behaviour, key=str) if behaviour else []
    devices = []
    for client in range(count):
        speed = capacity[capacity_keys[client % len(capacity_keys)]]
        device = Device(FEDSCALE_TRAINING_FACTOR * float(speed["computation"]) / 1000.0,
                        float(speed["communication"]))
        if behaviour:
            key = behaviour_keys[client % len(behaviour_keys)]
            device = _with_behaviour(device, behaviour[key], behaviour_file, key)
        devices.append(device)
    return devices


def _with_behaviour(device: Device, trace: dict, path: Path, key: Any) -> Device:
    active = tuple(float(t) for t in trace["active"])
    inactive = tuple(float(t) for t in trace["inactive"])
    period = float(trace["finish_time"])
    if len(active) != len(inactive) or not active or period <= 0 or any(
            not 0 <= start <= end for start, end in zip(active, inactive)):
        raise ConfigError(f"{path}: client {key!r}: 'active' and 'inactive' must be lists of "
                          "equal length with active[i] <= inactive[i], and 'finish_time' > 0")
    return Device(device.seconds_per_sample, device.kbps, active, inactive, period)


def _trace(path: Path, fields: tuple[str, ...]) -> dict:
    """A FedScale trace: a pickled dict of per-client dicts holding ``fields``; a
    ConfigError naming the file and what is wrong otherwise."""
    try:
        trace = _PlainUnpickler(io.BytesIO(Path(path).read_bytes())).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ConfigError(f"{path}: not a readable FedScale trace ({type(err).__name__}: "
                          f"{err})") from err
    if not isinstance(trace, dict) or not trace:
        raise ConfigError(f"{path}: a FedScale trace is a non-empty dict of clients")
    for key, entry in trace.items():
        if not isinstance(entry, dict) or not set(fields) <= set(entry):
            raise ConfigError(f"{path}: client {key!r} lacks {', '.join(fields)}")
    if "communication" in fields and not all(
            float(e["communication"]) > 0 and float(e["computation"]) > 0
            for e in trace.values()):
        raise ConfigError(f"{path}: 'computation' and 'communication' must be > 0")
    return trace


class _PlainUnpickler(pickle.Unpickler):
    """Builds numbers, strings, lists, tuples and dicts only: a pickle that names any
    class or function (how a pickle runs code) is refused before anything is called."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it names {module}.{name}; a trace holds only "
                                     "numbers, strings, lists and dicts")
