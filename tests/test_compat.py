"""fedcifar_app.compat: each reliance on flwr 1.42's internals, and a test that fails when
the behaviour it relies on is gone; Flower's waits, shortened (and the fast SuperNode)."""

from __future__ import annotations

import inspect
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_objects
from flwr.supernode import start_client_internal

from fedcifar_app import compat
from fedcifar_app.ops import fast_supernode


@pytest.fixture
def restore_flower():
    functions = (inflatable_utils.pull_objects,
                 inflatable_utils.pull_and_inflate_object_from_tree)
    saved = [dict(f.__kwdefaults__) for f in functions]
    yield
    start_client_internal.time = time
    for function, defaults in zip(functions, saved, strict=True):
        function.__kwdefaults__.clear()
        function.__kwdefaults__.update(defaults)


def test_the_supernode_loop_sleeps_at_most_the_pause(monkeypatch, restore_flower):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    compat.cap_supernode_pauses(0.25)
    # The three pauses of flwr 1.42's loop: after an empty pull, and waiting for a reply.
    start_client_internal.time.sleep(3)
    start_client_internal.time.sleep(0.5)
    start_client_internal.time.sleep(0.1)
    assert slept == [0.25, compat.BUSY_PAUSE, compat.BUSY_PAUSE]
    assert start_client_internal.time.monotonic is time.monotonic
    assert time.sleep is not start_client_internal.time.sleep  # only Flower's module sees it


def test_a_flwr_without_the_expected_loop_is_refused(monkeypatch, restore_flower):
    monkeypatch.delattr(start_client_internal, "time")
    with pytest.raises(SystemExit, match="run flower-supernode instead"):
        compat.cap_supernode_pauses(0.25)


def _unavailable_then_there(misses: int):
    """A pull function whose object is unavailable ``misses`` times, and the waits it saw."""
    asked: list[float] = []

    def pull(object_id: str) -> bytes:
        asked.append(time.monotonic())
        if len(asked) <= misses:
            raise ObjectUnavailableError(object_id)
        return b"arrays"

    return pull, asked


def test_object_pulls_retry_soon_instead_of_after_a_second(restore_flower):
    pull, asked = _unavailable_then_there(misses=3)
    assert compat.shorten_object_pull_backoff()
    assert pull_objects(["a"], pull) == {"a": b"arrays"}
    gaps = [later - earlier for earlier, later in zip(asked, asked[1:])]
    # Flower's own backoff would have waited 1 + 2 + 4 s; now 0.02 + 0.04 + 0.08 (±20 %).
    assert len(gaps) == 3 and all(gap < 0.8 for gap in gaps)  # Flower: >= 0.8 s each
    for function in (inflatable_utils.pull_objects,
                     inflatable_utils.pull_and_inflate_object_from_tree):
        assert function.__kwdefaults__["initial_backoff"] == compat.PULL_BACKOFF
        assert function.__kwdefaults__["backoff_cap"] == compat.PULL_BACKOFF_CAP
        assert function.__kwdefaults__["max_time"] == 7200  # Flower's give-up time stays


def test_a_flwr_whose_pulls_differ_is_left_alone(monkeypatch, restore_flower):
    monkeypatch.setattr(inflatable_utils.pull_objects, "__kwdefaults__", {"timeout": 1})
    assert not compat.shorten_object_pull_backoff()
    assert inflatable_utils.pull_objects.__kwdefaults__ == {"timeout": 1}


@pytest.mark.parametrize("value", ["0", "-1", "abc", "inf", "nan"])
def test_a_bad_pause_is_refused(monkeypatch, value):
    monkeypatch.setenv(fast_supernode.PAUSE_ENV, value)
    with pytest.raises(SystemExit, match=fast_supernode.PAUSE_ENV):
        fast_supernode.pause_from_env()


def test_the_pause_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(fast_supernode.PAUSE_ENV, raising=False)
    assert fast_supernode.pause_from_env() == fast_supernode.DEFAULT_PAUSE
    monkeypatch.setenv(fast_supernode.PAUSE_ENV, "0.05")
    assert fast_supernode.pause_from_env() == 0.05


def test_it_runs_flowers_own_supernode_command_line():
    shown = subprocess.run([sys.executable, "-m", "fedcifar_app.ops.fast_supernode", "--help"],
                           capture_output=True, text=True, timeout=120, check=True)
    assert "usage: flower-supernode" in shown.stdout
    assert "--auth-supernode-private-key" in shown.stdout


# --- One test per other reliance on flwr 1.42 (see fedcifar_app/compat.py) ---------------

def test_the_installed_flwr_is_the_series_compat_was_written_for(monkeypatch):
    assert compat.flwr_version_problem() is None
    monkeypatch.setattr("importlib.metadata.version", lambda name: "1.43.0")
    assert "flwr 1.43.0 is installed" in compat.flwr_version_problem()


def test_importing_compat_under_another_flwr_warns():
    probe = ("import importlib.metadata, logging; logging.basicConfig(); "
             "importlib.metadata.version = lambda name: '1.43.0'; import fedcifar_app.compat")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, check=True)
    assert "[fedcifar] flwr 1.43.0 is installed" in done.stderr
    quiet = subprocess.run([sys.executable, "-c", probe.split("; importlib.metadata.version")[0]
                            + "; import fedcifar_app.compat"], capture_output=True, text=True,
                           timeout=120, check=True)
    assert "is installed" not in quiet.stderr


@pytest.mark.parametrize("name", compat.FLWR_ENV_VARIABLES)
def test_flwr_still_reads_each_environment_variable_fedcifar_sets(name):
    """A variable flwr no longer reads would be set to no effect, silently."""
    import flwr

    sources = Path(flwr.__file__).parent.rglob("*.py")
    assert any(name in source.read_text(errors="replace") for source in sources), name


@pytest.mark.parametrize("available, fraction", [(10, 0.5), (7, 0.3), (3, 0.1), (25, 1.0)])
def test_the_sample_size_is_the_one_flower_samples(available, fraction, server_task_identity):
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    from fedcifar_app.strategies.sampling import NodeList

    strategy = FedAvg(fraction_train=fraction, min_train_nodes=1, min_available_nodes=1)
    sent = strategy.configure_train(1, ArrayRecord(), ConfigRecord(),
                                    NodeList(list(range(1, available + 1))))
    assert len(list(sent)) == compat.flower_sample_size(available, fraction, 1)


def test_flowers_exit_report_starts_as_the_one_line_report_expects():
    """reported_in_one_line drops Flower's exit-code footer by its first words."""
    from flwr.supercore.exit import exit as flower_exit

    source = inspect.getsource(flower_exit.flwr_exit)
    assert f'exit_message = f"{compat.EXIT_FOOTER_PREFIX}{{code}}' in source
    assert compat.FLOWER_LOGGER_NAME == flwr_logger().name


def flwr_logger():  # noqa: ANN201
    from flwr.common.logger import FLOWER_LOGGER

    return FLOWER_LOGGER


def test_an_anticipated_error_is_reported_in_one_line_and_flowers_report_dropped(caplog):
    from fedcifar_app.config import ConfigError

    error = ConfigError("invalid run config: 'seed' must be >= 0\nsecond line")
    with pytest.raises(ConfigError), compat.reported_in_one_line():
        raise error
    logger = flwr_logger()
    try:
        records = [logger.makeRecord("flwr", 40, __file__, 1, "boom", (), (ConfigError, error,
                                                                           None)),
                   logger.makeRecord("flwr", 40, __file__, 1, "Exit Code: 700\n...", (), None),
                   logger.makeRecord("flwr", 40, __file__, 1, "another failure", (), None)]
        assert [all(f.filter(r) for f in logger.filters) for r in records] == [False, False,
                                                                                True]
    finally:
        logger.filters.clear()
    assert "[fedcifar] ERROR invalid run config: 'seed' must be >= 0; second line" in \
        caplog.text


@pytest.mark.parametrize("name", sorted(compat._FROM_FLOWER))
def test_each_name_taken_from_flowers_internals_is_there(name):
    assert getattr(compat, name) is not None


@pytest.fixture
def engine_module(monkeypatch):
    """flwr 1.42's simulation engine module, restored afterwards."""
    from flwr.server.superlink.fleet.vce import vce_api

    monkeypatch.setattr(vce_api, "add_messages_to_queue", vce_api.add_messages_to_queue)
    return vce_api


class _CountingStop:
    """The engine's stop event: records each wait, and stops after ``looks`` looks."""

    def __init__(self, looks: int) -> None:
        self.looks = looks
        self.waits: list[float] = []

    def is_set(self) -> bool:
        return len(self.waits) >= self.looks

    def wait(self, timeout: float) -> None:
        self.waits.append(timeout)


class _LinkState:
    """The engine's LinkState: ``pending`` messages per node; counts its looks."""

    def __init__(self, pending: dict[int, list[str]]) -> None:
        self.pending = pending
        self.looks = 0
        self.replies: list[str] = []

    def get_message_ins(self, node_id: int, limit: int) -> list[str]:
        self.looks += 1
        messages, self.pending[node_id] = self.pending[node_id][:limit], \
            self.pending[node_id][limit:]
        return messages

    def store_message_ins(self, message: tuple[int, str]) -> str:
        node_id, text = message
        self.pending[node_id].append(text)
        return text

    def store_message_res(self, message: str) -> str:
        self.replies.append(message)
        return message


def test_the_simulation_engine_is_woken_by_each_stored_message(engine_module, caplog,
                                                                monkeypatch):
    import threading
    from queue import Queue

    original = engine_module.add_messages_to_queue
    stop = _CountingStop(looks=3)
    queue: Queue = Queue()
    original(_LinkState({1: ["a"], 2: []}), queue, {1: 0, 2: 1}, stop)
    assert stop.waits == [compat.FLOWER_SIMULATION_POLL] * 3  # what is being replaced
    assert queue.get_nowait() == "a"
    wakeups = compat.wake_simulation_engine()
    assert engine_module.add_messages_to_queue == wakeups.look_for_messages
    assert "woken by each message" in caplog.text
    assert compat.wake_simulation_engine() is wakeups  # a second call keeps it
    # Waiting a minute between looks, a stored message still goes out at once.
    monkeypatch.setattr(compat, "FLOWER_SIMULATION_POLL", 60.0)
    state, stop = _LinkState({1: [], 2: []}), threading.Event()
    looking = threading.Thread(target=engine_module.add_messages_to_queue,
                               args=(state, queue, {1: 0, 2: 1}, stop))
    looking.start()
    try:
        deadline = time.monotonic() + 10
        while state.looks < 2 and time.monotonic() < deadline:  # its first look is over
            time.sleep(0.01)
        state.store_message_ins((2, "b"))
        assert queue.get(timeout=10) == "b"
        assert not wakeups.replies.is_set()
        state.store_message_res("reply")
        assert wakeups.replies.is_set() and state.replies == ["reply"]
    finally:
        stop.set()
        wakeups.instructions.set()
        looking.join(10)
    assert not looking.is_alive()


def test_an_engine_that_already_looks_or_looks_otherwise_is_left_alone(engine_module,
                                                                          monkeypatch, caplog):
    import threading

    original = engine_module.add_messages_to_queue
    stop = threading.Event()
    looking = threading.Thread(target=original, args=(_LinkState({}), None, {}, stop))
    looking.start()
    try:
        assert compat.wake_simulation_engine() is None
        assert "started looking before" in caplog.text
        assert engine_module.add_messages_to_queue is original
    finally:
        stop.set()
        looking.join()

    def other(state, queue, nodes, stop, interval=0.1):  # noqa: ANN001, ANN202
        return None

    monkeypatch.setattr(engine_module, "add_messages_to_queue", other)
    assert compat.wake_simulation_engine() is None
    assert "not flwr 1.42's" in caplog.text
    assert engine_module.add_messages_to_queue is other


def test_outside_a_simulation_the_engine_is_not_loaded(monkeypatch):
    monkeypatch.delitem(sys.modules, "flwr.server.superlink.fleet.vce.vce_api", raising=False)
    assert compat.wake_simulation_engine() is None
    assert "flwr.server.superlink.fleet.vce.vce_api" not in sys.modules
