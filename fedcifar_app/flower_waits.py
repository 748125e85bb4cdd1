"""Shorter waits in flwr 1.42's deployment runtime, for the processes fedcifar starts.

A message's way through a deployment passes waits that flwr 1.42 hard-codes:

* **object pulls back off from 1 s.** A message travels as a small header and then
  its objects (the model's arrays). Whoever pulls a message whose objects are not all
  there yet (``ObjectUnavailableError``) waits 1 s, then 2, 4, ... up to 10 s
  (``PULL_INITIAL_BACKOFF``/``PULL_BACKOFF_CAP`` in ``flwr/supercore/constant.py``,
  bound as ``pull_objects``' defaults). That is the usual case, not a rare one: a
  SuperNode registers the ClientApp's task before it has pulled the message's
  objects, so a quickly started ClientApp asks for them too early; and a ServerApp
  that polls often sees a reply before the node has finished pushing its objects.
  Measured here (py-spy on a 3-node TLS deployment, warm ClientApps): 1.1-3.2 s per
  round in the ClientApp and about 1 s in the ServerApp, waiting on that backoff.
  ``shorten_object_pull_backoff`` starts it at ``PULL_BACKOFF`` and caps it at
  ``PULL_BACKOFF_CAP``; the give-up time stays Flower's (``max_time``, 2 h).
* **the SuperNode's pauses** (``flwr/supernode/start_client_internal.py``): 3 s after
  every pull that found no message, and 0.5 s between looks for the ClientApp's reply
  and for each of its objects before it pushes them on. ``cap_supernode_pauses`` cuts
  the first to an idle pause (a request to the SuperLink each time) and the others,
  which only look into the node's own memory while a message is in flight, to
  ``BUSY_PAUSE`` (used by ``fedcifar_app.fast_supernode``). Measured here: a reply
  took 0.5-0.8 s from the SuperNode's "Sending" to "Sent successfully" before.

Both change Flower's functions in the calling process only: the ServerApp applies
the first to itself, the warm ClientApp server to the ClientApps it forks, and the
fast SuperNode both to itself. Nothing heavy is imported at the top (the warm
ClientApp shim imports this module on every message).
"""

from __future__ import annotations

import time
import types
from logging import WARNING

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
        raise SystemExit("fedcifar_app.fast_supernode: this flwr's SuperNode loop "
                         "(flwr.supernode.start_client_internal) does not use the time "
                         "module as flwr 1.42 does; run flower-supernode instead")
    start_client_internal.time = capped_time(pause)
