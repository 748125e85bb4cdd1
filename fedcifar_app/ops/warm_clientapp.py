"""Warm ClientApp processes: a fork server behind a SuperNode's ``flwr-clientapp``.

flwr 1.42's SuperNode runs every message in a fresh ``flwr-clientapp`` process,
which spends seconds importing Flower and torch before the ClientApp starts, in
every round. This module keeps one process per SuperNode that has imported them
once, and forks a ready child for each message instead:

    python -m fedcifar_app.ops.warm_clientapp serve --socket /run/fedcifar/node-a.sock &
    python -m fedcifar_app.ops.warm_clientapp shim /opt/fedcifar-shim
    FEDCIFAR_WARM_CLIENTAPP=/run/fedcifar/node-a.sock PATH=/opt/fedcifar-shim:$PATH \\
        flower-supernode ...

``shim DIR`` writes ``DIR/flwr-clientapp``, which the SuperNode's SuperExec finds
first on its PATH. It passes its arguments, environment, working directory and
standard streams to the server named by $FEDCIFAR_WARM_CLIENTAPP, forwards
SIGTERM/SIGINT to the forked ClientApp and exits with its exit code; with no
server listening it runs the real ``flwr-clientapp`` instead. The forked child
runs Flower's own ``flwr-clientapp`` entry point, so Flower still pulls the
message, installs the FAB and loads the app from it: the server imports no code
of the app (this package is dropped from the child's modules before it runs).

Whoever can connect gets a ClientApp with the argv, environment and working
directory they send, and whoever owns the socket receives every shim's argv (the
ClientApp's token among them), environment and file descriptors. So only its owner
gets either: the socket lies in a directory of the owner's with mode 0700 (the
server creates it so, or refuses one that is not), is created 0600, and a path
someone else holds makes the server refuse to start; the server serves only
connections whose peer (SO_PEERCRED) is its own user, and the shim talks only to a
socket its own user owns and listens on. At most ``MAX_HANDLERS`` messages are
served at once; further connections wait.

Only third-party modules are preloaded, and no thread is started before a fork.
This module imports nothing heavy at the top: the shim runs it on every message.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import stat
import struct
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

SOCKET_ENV = "FEDCIFAR_WARM_CLIENTAPP"
COMMAND = "flwr-clientapp"
# What a ClientApp of this project imports that takes long: Flower's flwr-clientapp
# (with its HTTP and gRPC stacks), torch, numpy, PIL; and torch._dynamo, which torch
# imports on the first optimizer step (about 1 s here, paid in every fresh process).
PRELOAD = ("flwr.supernode.cli.flwr_clientapp", "flwr.clientapp", "flwr.app", "torch",
           "torch._dynamo", "numpy", "PIL.Image")
# A SuperNode runs a few ClientApps at once; more concurrent messages than this wait.
MAX_HANDLERS = 32
# Not __name__: the shim runs this file as __main__.
MODULE = "fedcifar_app.ops.warm_clientapp"
APP_PACKAGE = MODULE.split(".")[0]


# ---------------------------------------------------------------- who may connect

def private_socket_path(key: str) -> Path:
    """A socket path for ``key`` in this user's runtime directory ($XDG_RUNTIME_DIR, or
    a fedcifar-UID folder in the temporary directory): Unix socket paths are limited to
    ~107 bytes, so not under a deep state folder."""
    runtime = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(runtime) / f"fedcifar-{os.getuid()}" / f"warm-{digest}.sock"


def ensure_private_directory(directory: Path) -> None:
    """Create ``directory`` with mode 0700, or check that it is this user's and no one
    else's; SystemExit, saying why, if not."""
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() \
            or stat.S_IMODE(info.st_mode) & 0o077:
        raise SystemExit(f"[fedcifar] ERROR refusing {directory} for the warm ClientApp "
                         f"socket: it must be a directory of uid {os.getuid()} with mode "
                         f"0700, it is uid {info.st_uid}, mode "
                         f"{stat.filemode(info.st_mode)}; remove it or choose another --socket")


def peer_uid(connection: socket.socket) -> int:
    """The user of the process at the other end of a Unix socket."""
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                        struct.calcsize("3i"))
    return struct.unpack("3i", credentials)[1]


# ---------------------------------------------------------------- server

def serve(socket_path: Path) -> None:
    """Preload, then fork a request handler per connection, forever."""
    import importlib

    for module in PRELOAD:
        importlib.import_module(module)
    # flwr-clientapp talks to its SuperNode through an httpx client. The first one a
    # process makes costs ~0.3 s here (isinstance checks walking the subclasses of ABCs
    # that torch has filled); made once here, forked children find those checks cached.
    import httpx

    httpx.Client().close()
    from fedcifar_app.compat import shorten_object_pull_backoff

    # The forked ClientApps start fast, often before their SuperNode holds the
    # message's arrays: they should not then wait Flower's 1 s before asking again.
    shorten_object_pull_backoff()
    listener = _listen(socket_path)
    print(f"[fedcifar] warm flwr-clientapp server ready on {socket_path}", flush=True)
    handlers: set[int] = set()
    while True:
        _reap(handlers, wait=len(handlers) >= MAX_HANDLERS)
        connection, _ = listener.accept()
        if (peer := peer_uid(connection)) != os.getuid():
            print(f"[fedcifar] refused a connection from uid {peer}", flush=True)
            connection.close()
            continue
        handler = os.fork()
        if handler == 0:
            listener.close()
            _handle(connection)
        handlers.add(handler)
        connection.close()


def _listen(socket_path: Path) -> socket.socket:
    """A listening socket at ``socket_path``, mode 0600 in a private directory; a path
    that is someone else's, or a live server's, is refused."""
    ensure_private_directory(socket_path.parent)
    if socket_path.is_symlink() or socket_path.exists():
        info = socket_path.lstat()
        if info.st_uid != os.getuid() or not stat.S_ISSOCK(info.st_mode):
            raise SystemExit(f"[fedcifar] ERROR refusing to start: {socket_path} exists and "
                             f"is not a socket of this user (owner uid {info.st_uid})")
        if _connect(str(socket_path)) is not None:
            raise SystemExit(f"[fedcifar] ERROR a warm ClientApp server already listens on "
                             f"{socket_path}")
        socket_path.unlink()  # this user's, from a server that has stopped
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)  # the socket is 0600 from its creation
    try:
        listener.bind(str(socket_path))
    finally:
        os.umask(umask)
    listener.listen(64)
    return listener


def _reap(handlers: set[int], wait: bool) -> None:
    """Forget the handlers that have exited; with ``wait``, wait for one first."""
    if wait:
        handlers.discard(os.waitpid(-1, 0)[0])
    while handlers:
        pid, _ = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            return
        handlers.discard(pid)


def _handle(connection: socket.socket) -> None:
    """In a handler process: fork the ClientApp, report its PID and exit code."""
    code = 1
    try:
        _, fds, _, _ = socket.recv_fds(connection, 1, 3)
        request = json.loads(connection.makefile("rb").readline())
        child = os.fork()
        if child == 0:
            connection.close()
            _run_clientapp(request, fds)
        for fd in fds:
            os.close(fd)
        print(f"[fedcifar] forked flwr-clientapp as PID {child}", flush=True)
        connection.sendall(f"{child}\n".encode())
        _, status = os.waitpid(child, 0)
        connection.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
        code = 0
    finally:
        os._exit(code)


def _run_clientapp(request: dict, fds: list[int]) -> None:
    """In the forked child: become the flwr-clientapp the SuperExec asked for."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = [COMMAND, *request["argv"]]
        # Flower must load the app from the FAB, not from what this process imported.
        for name in [n for n in sys.modules if n.split(".")[0] == APP_PACKAGE]:
            del sys.modules[name]
        from fedcifar_app.compat import flwr_clientapp_main

        flwr_clientapp_main()
        code = 0
    except SystemExit as exit_request:
        code = exit_request.code if isinstance(exit_request.code, int) else (
            0 if exit_request.code is None else 1)
    except BaseException:  # noqa: BLE001 -- reported like Python would, then exit
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# ---------------------------------------------------------------- shim

def run(argv: Sequence[str]) -> int:
    """What the shim runs for each message: a forked ClientApp, or the real one."""
    connection = _connect(os.environ.get(SOCKET_ENV, ""))
    if connection is None:
        _exec_real_clientapp(argv)
    request = {"argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ)}
    socket.send_fds(connection, [b"\0"], [0, 1, 2])
    connection.sendall(json.dumps(request).encode() + b"\n")
    replies = connection.makefile("r")
    first = replies.readline()
    if not first.strip():  # the server failed before forking: run it the usual way
        _exec_real_clientapp(argv)
    child = int(first)

    def forward(signal_number: int, _frame: object) -> None:
        try:
            os.kill(child, signal_number)
        except ProcessLookupError:
            pass

    for forwarded in (signal.SIGTERM, signal.SIGINT):
        signal.signal(forwarded, forward)
    line = replies.readline()
    code = int(line) if line.strip() else 1
    return 128 - code if code < 0 else code  # killed by a signal: 128 + its number


def _connect(socket_path: str) -> socket.socket | None:
    """A connection to this user's server at ``socket_path``, or None: no server, or
    one this user does not own (it would receive the ClientApp's token)."""
    if not socket_path:
        return None
    try:
        owner = os.lstat(socket_path).st_uid
    except OSError:
        return None
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if owner != os.getuid():
            raise PermissionError(f"owned by uid {owner}")
        connection.connect(socket_path)
        if (peer := peer_uid(connection)) != os.getuid():
            raise PermissionError(f"served by uid {peer}")
    except PermissionError as err:
        print(f"[fedcifar] not using the warm ClientApp socket {socket_path}: {err}",
              file=sys.stderr)
        connection.close()
        return None
    except OSError:
        connection.close()
        return None
    return connection


def _exec_real_clientapp(argv: Sequence[str]) -> None:
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory or ".", COMMAND)
        if os.access(candidate, os.X_OK) and not _is_shim(candidate):
            os.execv(candidate, [str(candidate), *argv])
    sys.exit(f"{COMMAND}: not found on PATH besides the fedcifar shim")


def _is_shim(path: Path) -> bool:
    try:
        return f"-m {MODULE} run".encode() in path.read_bytes()[:512]
    except OSError:
        return False


def write_shim(directory: Path) -> Path:
    """``directory/flwr-clientapp``: runs ``run`` with this Python."""
    directory.mkdir(parents=True, exist_ok=True)
    shim = directory / COMMAND
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m {MODULE} run \"$@\"\n")
    shim.chmod(0o755)
    return shim


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:  # the shim: everything after 'run' is flwr-clientapp's
        return run(argv[1:])
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("serve", help="preload, then fork a ClientApp per message")
    server.add_argument("--socket", type=Path, required=True, help="Unix socket to listen on")
    shim = commands.add_parser("shim", help=f"write DIR/{COMMAND} for a SuperNode's PATH")
    shim.add_argument("directory", type=Path)
    commands.add_parser("run", help=f"(the shim) run {COMMAND} with the given arguments")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.socket.resolve())
    else:
        print(write_shim(args.directory.resolve()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
