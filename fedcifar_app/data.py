"""Loading, decoding and partitioning CIFAR-10 (Hugging Face datasets + flwr-datasets).

The expensive step, JPEG/PNG decoding, happens once per data set: the first
process that needs a split decodes it into a uint8 array file (.npy) under the cache
directory (as airbench's ``CifarLoader`` does), its labels beside it, and every later
process and round memory-maps that file. Partitions are computed once with
flwr-datasets' partitioners and cached as index tensors beside it, so a client's data
is its rows of the split, read from the file at their offsets.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from fedcifar_app.errors import AnticipatedError
from fedcifar_app.task import NUM_CLASSES, ImageTensors

IMAGE_COLUMN = "img"
LABEL_COLUMN = "label"
IMAGE_SIZE = 32
# Bump when the cached file layout changes, so stale caches are not read.
CACHE_FORMAT = 3
# Seconds the one request that checks the Hub is reachable may take.
HUB_PROBE_TIMEOUT = 5.0


class DatasetUnavailableError(AnticipatedError, RuntimeError):
    """The configured data set cannot be found, loaded or used."""


def is_local_dataset(dataset: str) -> bool:
    """A path (absolute, ~, ./ or an existing directory) rather than a Hub id."""
    return dataset.startswith(("/", "~", ".")) or Path(dataset).is_dir()


def _offline_hint() -> str:
    return ("to use local data, set `dataset` to a directory holding train.parquet and "
            "test.parquet (columns img, label), e.g. flwr run . --run-config "
            "\"dataset='/abs/path/to/cifar10'\" or python -m fedcifar_app.centralized "
            "--dataset /abs/path/to/cifar10")


def _hub_problem() -> str | None:
    """Why the Hugging Face Hub cannot be reached, from one request without retries
    (datasets retries each file five times, warning each time, for ~30 s), or None.
    With HF_HUB_OFFLINE set, datasets reads its own cache and the Hub is not asked."""
    import huggingface_hub
    import httpx

    # Read now, not at huggingface_hub's import; its own truthy spellings.
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        return None
    endpoint = huggingface_hub.constants.ENDPOINT
    try:
        httpx.head(endpoint, timeout=HUB_PROBE_TIMEOUT)
    except httpx.HTTPError as err:
        return (f"the Hugging Face Hub ({endpoint}) cannot be reached ({type(err).__name__}: "
                f"{err}; if the data set is in the Hugging Face cache, set HF_HUB_OFFLINE=1 "
                "where the app runs to use it)")
    return None


def _local_fingerprint(directory: Path) -> str:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    stats = [(str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns)
             for p in files]
    return hashlib.sha256(json.dumps([str(directory), stats]).encode()).hexdigest()[:16]


def dataset_cache_dir(dataset: str, cache_root: Path) -> Path:
    """The cache folder of one data set; checks that a local directory exists."""
    if is_local_dataset(dataset):
        directory = Path(dataset).expanduser().resolve()
        if not directory.is_dir():
            raise DatasetUnavailableError(
                f"dataset directory '{dataset}' not found (resolved to {directory} from "
                f"the working directory {Path.cwd()}; Flower apps run in the SuperLink's "
                "or SuperNode's working directory, so give an absolute path); "
                + _offline_hint())
        key = f"local-{directory.name}-{_local_fingerprint(directory)}"
    else:
        key = "hub-" + dataset.replace("/", "--")
    return cache_root / f"v{CACHE_FORMAT}" / key


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise cache writers across processes (Ray actors, SuperNodes, runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _cached(path: Path, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Load ``path``, or build it under a lock and save it atomically first."""
    if not path.exists():
        with _file_lock(path):
            if not path.exists():
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                torch.save(build(), tmp)
                os.replace(tmp, path)
    try:
        # mmap: processes share the page cache instead of each holding a copy.
        return torch.load(path, mmap=True, weights_only=True)
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise _unreadable(path, type(err).__name__) from err


def _unreadable(path: Path, why: str) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f"the cache file {path} cannot be read ({why}); it was not written by this "
        f"fedcifar or was cut short: delete it (it is rebuilt from the data set) and run "
        f"again")


def _load_hf_split(dataset: str, split: str) -> Any:
    import datasets  # Deferred: importing datasets costs ~1 s, and cache hits skip it.

    local = is_local_dataset(dataset)
    source = str(Path(dataset).expanduser().resolve()) if local else dataset
    problem = None if local else _hub_problem()
    if problem is not None:
        raise DatasetUnavailableError(
            f"cannot load dataset '{dataset}': {problem}; " + _offline_hint())
    try:
        hf_split = datasets.load_dataset(source, split=split)
    except Exception as err:  # datasets raises many types for "cannot load".
        raise DatasetUnavailableError(
            f"cannot load split '{split}' of dataset '{dataset}': "
            f"{type(err).__name__}: {err}; " + _offline_hint()) from err
    missing = {IMAGE_COLUMN, LABEL_COLUMN} - set(hf_split.column_names)
    if missing:
        raise DatasetUnavailableError(
            f"dataset '{dataset}' split '{split}' lacks column(s) {sorted(missing)}; "
            f"expected '{IMAGE_COLUMN}' (Image) and '{LABEL_COLUMN}' (ClassLabel), "
            f"found {hf_split.column_names}")
    return hf_split.cast_column(IMAGE_COLUMN, datasets.Image(decode=False))


def _decode(dataset: str, split: str, images_path: Path) -> dict[str, Any]:
    """Decode the split: its images into the array file ``images_path`` (written
    whole, then renamed into place), its labels returned for ``_cached`` to write
    after it, so that the labels file's presence means both are there."""
    hf_split = _load_hf_split(dataset, split)
    print(f"[fedcifar] decoding {len(hf_split)} images of {dataset}:{split} (once; cached)",
          flush=True)
    encoded = hf_split[IMAGE_COLUMN]
    images = np.empty((len(encoded), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, item in enumerate(encoded):
        with Image.open(io.BytesIO(item["bytes"])) as image:
            pixels = np.asarray(image.convert("RGB"))
        if pixels.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
            raise DatasetUnavailableError(
                f"dataset '{dataset}' holds {pixels.shape[1]}×{pixels.shape[0]} images; "
                f"the model expects {IMAGE_SIZE}×{IMAGE_SIZE}")
        images[i] = pixels
    labels = torch.tensor(hf_split[LABEL_COLUMN], dtype=torch.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DatasetUnavailableError(
            f"dataset '{dataset}' has labels outside 0..{NUM_CLASSES - 1}")
    tmp = images_path.with_name(f"{images_path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as file:
        np.save(file, np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    os.replace(tmp, images_path)
    return {"labels": labels}


def load_split(dataset: str, split: str, cache_root: Path) -> ImageTensors:
    """A whole split as uint8 tensors, decoded on first use and cached on disk."""
    return _load_split(dataset, split, dataset_cache_dir(dataset, cache_root))


def _load_split(dataset: str, split: str, cache_dir: Path) -> ImageTensors:
    images, labels = _mapped_split(dataset, split, cache_dir)
    return ImageTensors(torch.from_numpy(images), labels)


def _mapped_split(dataset: str, split: str, cache_dir: Path) -> tuple[np.memmap, torch.Tensor]:
    """The split's images, memory-mapped (N×3×32×32 uint8), and its labels."""
    images_path = cache_dir / f"{split}-images.npy"
    labels = _cached(cache_dir / f"{split}.pt",
                     lambda: _decode(dataset, split, images_path))["labels"]
    try:
        # Copy-on-write: writable for torch, and nothing ever reaches the file.
        images = np.load(images_path, mmap_mode="c")
    except Exception as err:  # numpy raises several types for a cut or foreign file
        raise _unreadable(images_path, type(err).__name__) from err
    expected = (len(labels), 3, IMAGE_SIZE, IMAGE_SIZE)
    if images.dtype != np.uint8 or images.shape != expected:
        raise _unreadable(images_path, f"{images.dtype}{list(images.shape)}, not the "
                                       f"uint8{list(expected)} of its labels")
    return images, labels


def _read_rows(images: np.memmap, rows: torch.Tensor) -> torch.Tensor:
    """``images[rows]`` read from the file at each row's offset: a gather from a new
    memory map faults in every page it touches, one by one (BENCHMARKS.md, section
    9), and a multiplexed node reads its clients' rows anew in every call."""
    row_bytes = images[0].nbytes if len(images) else 0
    gathered = torch.empty((len(rows), *images.shape[1:]), dtype=torch.uint8)
    buffer = gathered.numpy().reshape(-1)
    with open(images.filename, "rb") as file:
        for position, row in enumerate(rows.tolist()):
            target = buffer[position * row_bytes:(position + 1) * row_bytes]
            if os.preadv(file.fileno(), [target], images.offset + row * row_bytes) < row_bytes:
                raise _unreadable(Path(images.filename), "shorter than its header says")
    return gathered


@dataclass(frozen=True)
class PartitionScheme:
    """How a training split is divided among nodes, each keeping a validation part."""

    partitioner: str
    num_partitions: int
    dirichlet_alpha: float
    classes_per_partition: int
    validation_fraction: float
    seed: int
    dirichlet_min_partition_size: int = 10
    dirichlet_self_balancing: bool = False

    def cache_name(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        return f"partitions-{self.partitioner}-{self.num_partitions}-{digest.hexdigest()[:12]}.pt"


def _make_partitioner(scheme: PartitionScheme) -> Any:
    from flwr_datasets.partitioner import (DirichletPartitioner, IidPartitioner,
                                           PathologicalPartitioner)

    if scheme.partitioner == "iid":
        return IidPartitioner(num_partitions=scheme.num_partitions)
    if scheme.partitioner == "dirichlet":
        return DirichletPartitioner(
            num_partitions=scheme.num_partitions, partition_by=LABEL_COLUMN,
            alpha=scheme.dirichlet_alpha, seed=scheme.seed,
            min_partition_size=scheme.dirichlet_min_partition_size,
            self_balancing=scheme.dirichlet_self_balancing)
    if scheme.partitioner == "pathological":
        return PathologicalPartitioner(
            num_partitions=scheme.num_partitions, partition_by=LABEL_COLUMN,
            num_classes_per_partition=scheme.classes_per_partition,
            class_assignment_mode="first-deterministic", seed=scheme.seed)
    raise ValueError(f"unknown partitioner '{scheme.partitioner}'")


def _split_validation(rows: Any, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Hold out ``fraction`` of a partition (rows: a dataset with a 'row' column)."""
    if fraction == 0:
        return rows["row"], []
    if len(rows) < 2:
        raise DatasetUnavailableError(
            f"a partition of {len(rows)} example(s) cannot be split into training and "
            "validation data; use fewer partitions or a different partitioner")
    parts = rows.train_test_split(test_size=fraction, seed=seed)
    return parts["train"]["row"], parts["test"]["row"]


def _flatten(parts: list[list[int]]) -> dict[str, torch.Tensor]:
    """One index tensor plus offsets: loading it costs the same for 10 or 1,000 parts
    (a list of 1,000 small tensors takes over 100 ms to unpickle, on every task)."""
    sizes = torch.tensor([0] + [len(part) for part in parts])
    rows = [row for part in parts for row in part]
    return {"rows": torch.tensor(rows, dtype=torch.int64), "offsets": sizes.cumsum(0)}


def _part(flat: dict[str, torch.Tensor], index: int) -> torch.Tensor:
    return flat["rows"][flat["offsets"][index]:flat["offsets"][index + 1]]


def _label_partitioner(labels: torch.Tensor, scheme: PartitionScheme) -> Any:
    """The scheme's flwr-datasets partitioner over a split's labels."""
    import datasets

    # Partitioners need only labels; the row column maps results back to the split.
    rows = datasets.Dataset.from_dict(
        {LABEL_COLUMN: labels.tolist(), "row": list(range(len(labels)))})
    # Shuffle first, as FederatedDataset does, so IID shards are not file-order slices.
    partitioner = _make_partitioner(scheme)
    partitioner.dataset = rows.shuffle(seed=scheme.seed)
    return partitioner


def _compute_partitions(labels: torch.Tensor, scheme: PartitionScheme) -> dict[str, Any]:
    partitioner = _label_partitioner(labels, scheme)
    train_rows, validation_rows = [], []
    for partition_id in range(scheme.num_partitions):
        try:
            partition = partitioner.load_partition(partition_id)
        except ValueError as err:  # e.g. no Dirichlet draw met the minimum size
            raise DatasetUnavailableError(
                f"cannot split {len(labels)} examples into {scheme.num_partitions} "
                f"'{scheme.partitioner}' partitions: {err} (for Dirichlet, a larger "
                "dirichlet-alpha or a smaller dirichlet-min-partition-size helps)") from err
        train, validation = _split_validation(partition, scheme.validation_fraction,
                                              scheme.seed)
        train_rows.append(train)
        validation_rows.append(validation)
    return {"train": _flatten(train_rows), "validation": _flatten(validation_rows)}


def load_partition(dataset: str, cache_root: Path, scheme: PartitionScheme,
                   partition_id: int) -> tuple[ImageTensors, ImageTensors]:
    """(train, validation) tensors of one simulated node's partition."""
    return load_partitions(dataset, cache_root, scheme, [partition_id])[0]


def load_partitions(dataset: str, cache_root: Path, scheme: PartitionScheme,
                    partition_ids: list[int]) -> list[tuple[ImageTensors, ImageTensors]]:
    """(train, validation) tensors of each of ``partition_ids``: the split and the
    partition index are mapped once for all of them (a multiplexed node's clients)."""
    for partition_id in partition_ids:
        if not 0 <= partition_id < scheme.num_partitions:
            raise ValueError(f"partition-id {partition_id} is outside "
                             f"[0, {scheme.num_partitions - 1}] (num-partitions)")
    # Fingerprinting a local directory stats its files: once per call, not twice.
    cache_dir = dataset_cache_dir(dataset, cache_root)
    images, labels = _mapped_split(dataset, "train", cache_dir)
    partitions = _cached(cache_dir / scheme.cache_name(),
                         lambda: _compute_partitions(labels, scheme))

    def part(kind: str, partition_id: int) -> ImageTensors:
        rows = _part(partitions[kind], partition_id)
        return ImageTensors(_read_rows(images, rows), labels[rows])

    return [(part("train", partition_id), part("validation", partition_id))
            for partition_id in partition_ids]


def plot_label_distribution(dataset: str, cache_root: Path, scheme: PartitionScheme,
                            path: Path) -> bool:
    """Draw the label counts of the scheme's partitions (flwr-datasets'
    ``plot_label_distributions``) from this machine's cached training split; False,
    drawing nothing, where it has none (a deployment's server: the nodes hold the data)."""
    cache_dir = dataset_cache_dir(dataset, cache_root)
    if not (cache_dir / "train.pt").exists():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from flwr_datasets.visualization import plot_label_distributions

    labels = _load_split(dataset, "train", cache_dir).labels
    figure, _, _ = plot_label_distributions(
        _label_partitioner(labels, scheme), label_name=LABEL_COLUMN, legend=True,
        legend_title="label", verbose_labels=False,
        figsize=(min(14.0, 4 + 0.12 * scheme.num_partitions), 4.2),
        title=f"labels per partition: {scheme.partitioner}, {scheme.num_partitions} "
              f"partitions (seed {scheme.seed})")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return True


def load_node_data(data_path: str, cache_root: Path, validation_fraction: float,
                   seed: int) -> tuple[ImageTensors, ImageTensors]:
    """(train, validation) tensors of a node that holds its own data directory."""
    scheme = PartitionScheme("iid", 1, 1.0, NUM_CLASSES, validation_fraction, seed)
    return load_partition(data_path, cache_root, scheme, 0)
