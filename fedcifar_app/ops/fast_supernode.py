"""``flower-supernode`` with short waits: Flower's SuperNode, unchanged but for them.

flwr 1.42's SuperNode (``flwr/supernode/start_client_internal.py``) sleeps 3 s after
every pull that finds no message and looks every 0.5 s for the ClientApp's reply;
neither pause can be configured. A deployment round pays both: a node sees its
instruction up to 3 s after the ServerApp sent it (1.5 s on average; almost 3 s for
the node that trained the round before, which pulled right after its reply, found
nothing yet and went to sleep), and its reply leaves up to 0.5 s after it is ready.
And when it pulls a message whose arrays are still on their way, it waits 1 s (then
2, 4, ...) before it asks again (see ``fedcifar_app.compat``).

    python -m fedcifar_app.ops.fast_supernode [flower-supernode arguments]

runs Flower's own ``flower-supernode`` entry point with those pauses cut to at most
$FEDCIFAR_SUPERNODE_PAUSE seconds (default 0.25) and the pull backoff shortened:
everything else (connection, authentication, SuperExec, isolation) is Flower's. The
price is an idle node's pull rate: 4 a second instead of one every 3 s, each a small
request the SuperLink answers. With a flwr whose SuperNode loop is not laid out as
1.42's, it refuses to start.
"""

from __future__ import annotations

import os
import sys

from fedcifar_app.compat import (cap_supernode_pauses, flower_supernode_main,
                                 shorten_object_pull_backoff)

PAUSE_ENV = "FEDCIFAR_SUPERNODE_PAUSE"
DEFAULT_PAUSE = 0.25


def pause_from_env() -> float:
    """$FEDCIFAR_SUPERNODE_PAUSE in seconds, or the default; positive and finite."""
    text = os.environ.get(PAUSE_ENV, str(DEFAULT_PAUSE))
    try:
        pause = float(text)
    except ValueError:
        pause = float("nan")
    if not 0 < pause < float("inf"):
        raise SystemExit(f"{PAUSE_ENV} must be a positive number of seconds, not {text!r}")
    return pause


def main() -> None:
    cap_supernode_pauses(pause_from_env())
    shorten_object_pull_backoff()
    sys.argv[0] = "flower-supernode"
    flower_supernode_main()


if __name__ == "__main__":
    main()
