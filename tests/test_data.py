"""Decoding, caching and partitioning through HF datasets and flwr-datasets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedcifar_app import data
from fedcifar_app.data import DatasetUnavailableError, PartitionScheme
from tests.conftest import class_colour, write_split


def test_split_is_decoded_once_and_then_read_from_the_cache(
        tiny_dataset: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = []
    real_decode = data._decode
    monkeypatch.setattr(data, "_decode", lambda *a: decoded.append(a) or real_decode(*a))
    first = data.load_split(str(tiny_dataset), "train", cache_dir)
    second = data.load_split(str(tiny_dataset), "train", cache_dir)
    assert len(decoded) == 1
    assert first.images.shape == (400, 3, 32, 32) and first.images.dtype == torch.uint8
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.labels, second.labels)
    # Pixels survive decoding: each image's mean colour is its class colour.
    for label in range(10):
        mean = first.images[first.labels == label].float().mean(dim=(0, 2, 3))
        assert torch.allclose(mean, torch.tensor(class_colour(label)).float(), atol=4)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological"])
def test_partitions_are_disjoint_and_cover_the_split(
        tiny_dataset: Path, cache_dir: Path, partitioner: str) -> None:
    scheme = PartitionScheme(partitioner, num_partitions=10, dirichlet_alpha=0.5,
                             classes_per_partition=2, validation_fraction=0.2, seed=7)
    split = data.load_split(str(tiny_dataset), "train", cache_dir)
    seen: list[tuple] = []
    for partition_id in range(10):
        train, validation = data.load_partition(str(tiny_dataset), cache_dir, scheme,
                                                partition_id)
        assert len(train) > 0 and len(validation) > 0
        if partitioner == "pathological":
            labels = set(train.labels.tolist()) | set(validation.labels.tolist())
            assert len(labels) <= 2
        seen += [tuple(img.flatten().tolist()) for img in train.images]
        seen += [tuple(img.flatten().tolist()) for img in validation.images]
    assert len(seen) == len(set(seen)) == len(split)  # disjoint, and all of them


def test_partitioning_is_reproducible_and_depends_on_the_seed(
        tiny_dataset: Path, cache_dir: Path, tmp_path: Path) -> None:
    def first_labels(seed: int, cache: Path) -> list[int]:
        scheme = PartitionScheme("dirichlet", 5, 0.3, 2, 0.1, seed)
        return data.load_partition(str(tiny_dataset), cache, scheme, 0)[0].labels.tolist()

    assert first_labels(1, cache_dir) == first_labels(1, tmp_path / "other-cache")
    assert first_labels(1, cache_dir) != first_labels(2, cache_dir)


def test_node_data_holds_out_validation(tiny_dataset: Path, cache_dir: Path) -> None:
    train, validation = data.load_node_data(str(tiny_dataset), cache_dir, 0.25, seed=0)
    assert (len(train), len(validation)) == (300, 100)


def test_partition_id_out_of_range(tiny_dataset: Path, cache_dir: Path) -> None:
    scheme = PartitionScheme("iid", 4, 1.0, 2, 0.1, 0)
    with pytest.raises(ValueError, match="partition-id 4 is outside"):
        data.load_partition(str(tiny_dataset), cache_dir, scheme, 4)


def test_missing_directory_says_how_to_point_at_local_data(
        cache_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailableError) as raised:
        data.load_split(str(tmp_path / "nowhere"), "train", cache_dir)
    text = str(raised.value)
    assert "not found" in text and "absolute path" in text and "dataset='" in text


def test_unreachable_hub_says_how_to_point_at_local_data(
        cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(cache_dir / "hf"))
    with pytest.raises(DatasetUnavailableError) as raised:
        data.load_split("nobody-here/no-such-dataset", "test", cache_dir)
    text = str(raised.value)
    assert "cannot load split 'test' of dataset 'nobody-here/no-such-dataset'" in text
    assert "train.parquet" in text


def test_wrong_schema_is_rejected(cache_dir: Path, tmp_path: Path) -> None:
    import datasets

    directory = tmp_path / "wrong"
    directory.mkdir()
    datasets.Dataset.from_dict({"image": [b"x"], "target": [0]}).to_parquet(
        str(directory / "train.parquet"))
    with pytest.raises(DatasetUnavailableError, match=r"lacks column\(s\) \['img', 'label'\]"):
        data.load_split(str(directory), "train", cache_dir)


def test_cache_follows_changes_to_local_files(tmp_path: Path, cache_dir: Path) -> None:
    directory = tmp_path / "changing"
    directory.mkdir()
    write_split(directory / "train.parquet", torch.arange(20).remainder(10).numpy(), 0)
    assert len(data.load_split(str(directory), "train", cache_dir)) == 20
    write_split(directory / "train.parquet", torch.arange(30).remainder(10).numpy(), 0)
    assert len(data.load_split(str(directory), "train", cache_dir)) == 30


def test_no_validation_hold_out(tiny_dataset: Path, cache_dir: Path) -> None:
    scheme = PartitionScheme("iid", 4, 1.0, 2, 0.0, 0)
    train, validation = data.load_partition(str(tiny_dataset), cache_dir, scheme, 0)
    assert (len(train), len(validation)) == (100, 0)


def test_impossible_dirichlet_split_says_what_to_change(tiny_dataset: Path,
                                                        cache_dir: Path) -> None:
    scheme = PartitionScheme("dirichlet", 100, 0.05, 2, 0.1, 0,
                             dirichlet_min_partition_size=10)
    with pytest.raises(DatasetUnavailableError, match="dirichlet-min-partition-size"):
        data.load_partition(str(tiny_dataset), cache_dir, scheme, 0)


def test_a_partitions_rows_are_read_from_the_file_as_the_mapped_split_holds_them(
        tiny_dataset: Path, cache_dir: Path) -> None:
    """Partitions are read row by row at their offsets in the cached array file: the
    same images, in the same order, as indexing the memory-mapped split."""
    scheme = PartitionScheme("dirichlet", 5, 0.5, 2, 0.25, seed=3)
    split = data.load_split(str(tiny_dataset), "train", cache_dir)
    partitions = data.load_partitions(str(tiny_dataset), cache_dir, scheme, [4, 0, 2])
    cached = torch.load(next(cache_dir.rglob(scheme.cache_name())), weights_only=True)
    for partition_id, (train, validation) in zip([4, 0, 2], partitions, strict=True):
        for kind, part in (("train", train), ("validation", validation)):
            rows = data._part(cached[kind], partition_id)
            assert len(rows) > 0
            assert torch.equal(part.images, split.images[rows])
            assert torch.equal(part.labels, split.labels[rows])


def test_a_cut_image_file_is_refused_when_partitions_are_read(
        tiny_dataset: Path, cache_dir: Path) -> None:
    data.load_split(str(tiny_dataset), "train", cache_dir)
    (images,) = cache_dir.rglob("train-images.npy")
    images.write_bytes(images.read_bytes()[:-3 * 32 * 32 * 10])
    scheme = PartitionScheme("iid", 2, 0.5, 2, 0.0, seed=0)
    with pytest.raises(DatasetUnavailableError, match="cannot be read"):
        data.load_partitions(str(tiny_dataset), cache_dir, scheme, [0, 1])
