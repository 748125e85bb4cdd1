"""Every use of flwr 1.42's internals, in one place, each checked.

fedcifar relies on Flower's public API (``flwr.app``, ``flwr.serverapp``,
``flwr.clientapp``, its strategies and mods) everywhere else. What follows depends on
flwr 1.42's source layout or private behaviour; each item names what it relies on and
how it refuses (or warns, where refusing would stop a run that still works) on a flwr
that no longer behaves so. ``tests/test_compat.py`` has a test per item that fails
when the behaviour is gone. On import, a flwr outside ``SUPPORTED_SERIES`` is logged
as a warning naming this module (pyproject.toml pins ``<1.43``).

Shorter waits in the deployment runtime, for the processes fedcifar starts:

* **object pulls back off from 1 s.** A message travels as a small header and then
  its objects (the model's arrays). Whoever pulls a message whose objects are not all
  there yet (``ObjectUnavailableError``) waits 1 s, then 2, 4, ... up to 10 s
  (``PULL_INITIAL_BACKOFF``/``PULL_BACKOFF_CAP`` in ``flwr/supercore/constant.py``,
  bound as ``pull_objects``' defaults). That is the usual case, not a rare one: a
  SuperNode registers the ClientApp's task before it has pulled the message's
  objects, so a quickly started ClientApp asks for them too early; and a ServerApp
  that polls often sees a reply before the node has finished pushing its objects.
  ``shorten_object_pull_backoff`` starts it at ``PULL_BACKOFF`` and caps it at
  ``PULL_BACKOFF_CAP``; the give-up time stays Flower's (``max_time``, 2 h).
* **the SuperNode's pauses** (``flwr/supernode/start_client_internal.py``): 3 s after
  every pull that found no message, and 0.5 s between looks for the ClientApp's reply
  and for each of its objects before it pushes them on. ``cap_supernode_pauses`` cuts
  the first to an idle pause (a request to the SuperLink each time) and the others,
  which only look into the node's own memory while a message is in flight, to
  ``BUSY_PAUSE`` (used by ``fedcifar_app.ops.fast_supernode``).

* **the simulation engine's 0.1 s poll** (``add_messages_to_queue`` in
  ``flwr/server/superlink/fleet/vce/vce_api.py``): the engine looks for the
  ServerApp's new messages every 0.1 s, which costs a multiplexed cross-device round
  about 50 ms on average, a sixth of it; and the ServerApp can only poll for the
  replies. ``wake_simulation_engine`` swaps in the same loop, woken as soon as the
  ServerApp stores a message in the engine's LinkState (else every 0.1 s, as
  Flower), and hands back an event set whenever a reply is stored, which
  ``RecoveringGrid`` waits on instead of polling. Short polls would cost more than the
  wait they save: each wakes a thread that takes a core from a training node
  (BENCHMARKS.md, section 9).

All change Flower's functions in the calling process only: the ServerApp applies
the first and (in a simulation, whose engine runs in the ServerApp's process) the
last to itself, the warm ClientApp server the first to the ClientApps it forks, and
the fast SuperNode the first two to itself. (The measurements are in
BENCHMARKS.md.) Nothing heavy is imported at the top: the warm ClientApp shim imports
this module on every message.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from logging import INFO, WARNING

PULL_BACKOFF = 0.02
PULL_BACKOFF_CAP = 0.5
BUSY_PAUSE = 0.02
# flwr 1.42's SuperNode sleeps 3 s when idle and 0.5 s while a message is in flight.
_IDLE_SLEEP_FROM = 1.0
# The keyword defaults of flwr 1.42's pull functions that shorten_object_pull_backoff sets.
_PULL_DEFAULTS = {"initial_backoff": PULL_BACKOFF, "backoff_cap": PULL_BACKOFF_CAP,
                  # Flower bounds a pull by time (max_time, 2 h) and by tries (500, about
                  # 80 min at its backoff); shorter waits would use up the tries in ~4 min.
                  "max_tries_per_object": None}


def shorten_object_pull_backoff() -> bool:
    """Make Flower's object pulls in this process retry after PULL_BACKOFF seconds,
    doubling up to PULL_BACKOFF_CAP; return False (and log why) where this flwr's pull
    functions do not have flwr 1.42's parameters, leaving them as they are."""
    from flwr.common import log
    from flwr.supercore.inflatable import inflatable_utils

    functions = (inflatable_utils.pull_objects,
                 inflatable_utils.pull_and_inflate_object_from_tree)
    if not all(set(_PULL_DEFAULTS) <= set(f.__kwdefaults__ or {}) for f in functions):
        log(WARNING, "[fedcifar] this flwr's object pulls do not take %s: their backoff "
            "(1 s, doubling) is left as it is", ", ".join(_PULL_DEFAULTS))
        return False
    for function in functions:
        function.__kwdefaults__.update(_PULL_DEFAULTS)
    return True


def capped_time(idle_pause: float, busy_pause: float = BUSY_PAUSE) -> types.SimpleNamespace:
    """The ``time`` module, except that ``sleep`` waits at most ``idle_pause`` seconds
    where it was asked for a second or more, and at most ``busy_pause`` otherwise."""
    module = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time)
                                      if not name.startswith("__")})

    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, idle_pause if seconds >= _IDLE_SLEEP_FROM else busy_pause))

    module.sleep = sleep
    return module


def cap_supernode_pauses(pause: float) -> None:
    """Make flwr's SuperNode loop pause at most ``pause`` seconds when idle and
    BUSY_PAUSE while a message is in flight; raise SystemExit where this flwr's loop
    does not use the time module as 1.42's does."""
    from flwr.supernode import start_client_internal

    if getattr(start_client_internal, "time", None) is not time:
        raise SystemExit("fedcifar_app.ops.fast_supernode: this flwr's SuperNode loop "
                         "(flwr.supernode.start_client_internal) does not use the time "
                         "module as flwr 1.42 does; run flower-supernode instead")
    start_client_internal.time = capped_time(pause)


FLOWER_SIMULATION_POLL = 0.1  # flwr 1.42's literal in add_messages_to_queue
_VCE_MODULE = "flwr.server.superlink.fleet.vce.vce_api"


class SimulationWakeups:
    """What ``wake_simulation_engine`` puts in the engine's place: its look for new
    messages (``look_for_messages``, flwr 1.42's ``add_messages_to_queue`` woken by
    ``instructions``) and ``replies``, set whenever the engine stores a reply."""

    def __init__(self) -> None:
        self.instructions = threading.Event()
        self.replies = threading.Event()

    def look_for_messages(self, state, queue, nodes_mapping,  # noqa: ANN001 - flwr's
                          f_stop) -> None:  # noqa: ANN001
        """flwr 1.42's ``add_messages_to_queue``, woken by a stored message instead of
        looking every 0.1 s (it still looks that often, as Flower does)."""
        _set_after(state, "store_message_ins", self.instructions)
        _set_after(state, "store_message_res", self.replies)
        while not f_stop.is_set():
            # Cleared before the look: a message stored during it wakes the next wait.
            self.instructions.clear()
            for node_id in nodes_mapping.keys():
                for message in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(message)
            self.instructions.wait(FLOWER_SIMULATION_POLL)


def _set_after(state: object, method: str, event: threading.Event) -> None:
    """Make ``state.method`` (on this instance only) set ``event`` after each call."""
    stored = getattr(state, method)

    def storing(*args: object, **kwargs: object) -> object:
        result = stored(*args, **kwargs)
        event.set()
        return result

    setattr(state, method, storing)


def wake_simulation_engine() -> SimulationWakeups | None:
    """In a simulation's process, make the engine start a message's delivery as soon as
    the ServerApp stores it, and return the wakeups (whose ``replies`` event the
    ServerApp's grid can wait on); see the module docstring. Elsewhere (a deployment's
    ServerApp: no engine loaded), or where this flwr's engine does not look as 1.42's
    does or started looking before this call (logged), return None: Flower's poll
    stays."""
    import sys

    from flwr.common import log

    vce_api = sys.modules.get(_VCE_MODULE)
    if vce_api is None:
        return None
    original = getattr(vce_api, "add_messages_to_queue", None)
    if isinstance(getattr(original, "__self__", None), SimulationWakeups):
        return original.__self__
    problem = _simulation_poll_problem(vce_api, original)
    if problem is None and any(getattr(t, "_target", None) is original
                               for t in threading.enumerate()):
        problem = "the engine started looking before the ServerApp could change it"
    if problem is not None:
        log(WARNING, "[fedcifar] the simulation engine's 0.1 s poll is left as it is: %s",
            problem)
        return None
    wakeups = SimulationWakeups()
    vce_api.add_messages_to_queue = wakeups.look_for_messages
    log(INFO, "[fedcifar] the simulation engine is woken by each message (Flower: looks "
        "every %g s)", FLOWER_SIMULATION_POLL)
    return wakeups


def _simulation_poll_problem(vce_api: types.ModuleType, original: object) -> str | None:
    import inspect

    if original is None or "add_messages_to_queue" not in vce_api.run_api.__code__.co_names:
        return "this flwr's engine has no add_messages_to_queue used by run_api"
    parameters = list(inspect.signature(original).parameters)
    if parameters != ["state", "queue", "nodes_mapping", "f_stop"]:
        return f"add_messages_to_queue takes {parameters}, not flwr 1.42's"
    if FLOWER_SIMULATION_POLL not in original.__code__.co_consts:
        return "add_messages_to_queue no longer waits flwr 1.42's 0.1 s"
    if not {"get_message_ins", "store_message_ins", "store_message_res"} <= set(
            dir(_in_memory_link_state())):
        return "this flwr's in-memory LinkState stores messages otherwise"
    return None


def _in_memory_link_state() -> type:
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    return InMemoryLinkState


# --- The version this module was written against -------------------------------------

SUPPORTED_SERIES = "1.42."


def flwr_version_problem() -> str | None:
    """Why the installed flwr may not behave as this module assumes, or None."""
    from importlib.metadata import version

    installed = version("flwr")
    if installed.startswith(SUPPORTED_SERIES):
        return None
    return (f"flwr {installed} is installed; fedcifar_app.compat was written against "
            f"flwr {SUPPORTED_SERIES}x: its patches refuse where the layout they rely on "
            "is gone, check the rest with tests/test_compat.py")


# --- Environment variables flwr 1.42 reads (some of them private) --------------------

# The SuperExec polls for new tasks every second by default (flwr/supercore/superexec).
SUPEREXEC_POLL_INTERVAL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
# How many of a message's objects travel at once (flwr/supercore/inflatable, private).
MAX_CONCURRENT_PULLS_ENV = "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS"
MAX_CONCURRENT_PUSHES_ENV = "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES"
# The managed local SuperLink installs a run's dependencies unless this is 1.
DISABLE_INSTALL_ENV = "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"
# The managed local SuperLink's ports (flwr/cli, local SuperLink management).
LOCAL_HTTP_PORT_ENV = "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"
LOCAL_CONTROL_PORT_ENV = "FLWR_LOCAL_CONTROL_API_PORT"
FLWR_ENV_VARIABLES = (SUPEREXEC_POLL_INTERVAL_ENV, MAX_CONCURRENT_PULLS_ENV,
                      MAX_CONCURRENT_PUSHES_ENV, DISABLE_INSTALL_ENV, LOCAL_HTTP_PORT_ENV,
                      LOCAL_CONTROL_PORT_ENV)


# --- SecAgg+'s legacy workflow -------------------------------------------------------------

# Names taken from flwr 1.42's internal modules, imported on first use (this module is
# imported where flwr's server side would be too heavy to load).
_FROM_FLOWER = {
    # SecAgg+ exists only on the legacy API: the node mod's record key and the legacy
    # message conversions.
    "RECORD_KEY_CONFIGS": ("flwr.common.secure_aggregation.secaggplus_constants",
                           "RECORD_KEY_CONFIGS"),
    "legacy_records": ("flwr.compat.common", "recorddict_compat"),
    # Flower's DP arithmetic (noise scales, clipping, norms) is an internal package.
    "compute_stdv": ("flwr.supercore.differential_privacy", "compute_stdv"),
    "compute_adaptive_noise_params": ("flwr.supercore.differential_privacy",
                                      "compute_adaptive_noise_params"),
    "clip_inputs_inplace": ("flwr.supercore.differential_privacy", "clip_inputs_inplace"),
    "get_norm": ("flwr.supercore.differential_privacy", "get_norm"),
}


def __getattr__(name: str):  # noqa: ANN202 - whatever flwr's module holds
    if name not in _FROM_FLOWER:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _FROM_FLOWER[name]
    return getattr(importlib.import_module(module), attribute)


def legacy_current_round(legacy_context) -> int:  # noqa: ANN001 - flwr's LegacyContext
    """The round a legacy workflow is in (flwr 1.42 keeps it in its context's state)."""
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key

    return int(legacy_context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])


# --- Flower's report of a failed ServerApp --------------------------------------------

FLOWER_LOGGER_NAME = "flwr"  # flwr.common.logger.FLOWER_LOGGER's name
EXIT_FOOTER_PREFIX = "Exit Code: "  # flwr.common.exit's footer after a traceback


@contextmanager
def reported_in_one_line() -> Iterator[None]:
    """Report an AnticipatedError raised inside as one line, then re-raise it (the run
    still fails, with Flower's status and exit code). Flower logs whatever a ServerApp
    raises with its traceback, then an exit-code footer that calls it unhandled, both
    to its 'flwr' logger; both are dropped for this error. Anything else keeps
    Flower's report."""
    from fedcifar_app.errors import AnticipatedError, one_line

    logger = logging.getLogger(FLOWER_LOGGER_NAME)
    try:
        yield
    except AnticipatedError as error:
        logger.debug("[fedcifar] where the error below was raised", exc_info=error)
        logger.error("[fedcifar] ERROR %s", one_line(error))
        logger.addFilter(_AlreadyReported(error))
        raise


class _AlreadyReported(logging.Filter):
    """Drops Flower's traceback of ``error`` and the exit-code footer after it."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is self.error:
            return False
        return not (record.levelno >= logging.ERROR
                    and str(record.msg).startswith(EXIT_FOOTER_PREFIX))


# --- Node sampling ----------------------------------------------------------------------

def flower_sample_size(available: int, fraction: float, minimum: int) -> int:
    """How many nodes flwr 1.42's ``FedAvg.configure_train`` samples from ``available``
    (``flwr/serverapp/strategy/strategy_utils.py``: ``sample_nodes``), so that a check
    can run before Flower samples. Tested against Flower's own sampling."""
    return max(int(available * fraction), minimum)


# --- Entry points the operations tooling runs in its own processes ---------------------

def flwr_clientapp_main() -> None:
    """flwr 1.42's ``flwr-clientapp`` command (``flwr.supernode.cli``)."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    flwr_clientapp()


def flower_supernode_main() -> None:
    """flwr 1.42's ``flower-supernode`` command (``flwr.supernode.cli``)."""
    from flwr.supernode.cli import flower_supernode

    flower_supernode()


def parse_run_config(text: str) -> dict:
    """A ``--run-config`` string as flwr 1.42 parses it (``flwr.common.config``)."""
    from flwr.common.config import parse_config_args

    return dict(parse_config_args([text]))


def act_as_serverapp(run_id: int = 1) -> None:
    """Let this process build Messages as a ServerApp does: Flower's runtime records
    who runs before a Message is built (``flwr.supercore.task_identity``, private);
    benchmarks and tests that drive a strategy without a runtime call this first."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 1


def _warn_if_unsupported() -> None:
    problem = flwr_version_problem()
    if problem is not None:
        logging.getLogger(FLOWER_LOGGER_NAME).warning("[fedcifar] %s", problem)


_warn_if_unsupported()  # once, when the module is imported
