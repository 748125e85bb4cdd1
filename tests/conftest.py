"""Shared fixtures: a tiny CIFAR-10-shaped data set in the Hub's parquet schema."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
               "ship", "truck"]


# Well-separated colours (corners of the RGB cube and two greys), one per class.
PALETTE = np.array([[40, 40, 40], [215, 40, 40], [40, 215, 40], [40, 40, 215],
                    [215, 215, 40], [215, 40, 215], [40, 215, 215], [215, 215, 215],
                    [100, 100, 100], [160, 160, 160]])


def class_colour(label: int) -> np.ndarray:
    """The mean colour of a class, so that a small CNN learns the task fast."""
    return PALETTE[label]


def make_images(labels: np.ndarray, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    encoded = []
    for label in labels:
        noise = rng.normal(0, 12, size=(32, 32, 3))
        pixels = np.clip(class_colour(int(label)) + noise, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


def write_split(path: Path, labels: np.ndarray, seed: int) -> None:
    import datasets

    features = datasets.Features({"img": datasets.Image(),
                                  "label": datasets.ClassLabel(names=LABEL_NAMES)})
    images = [{"bytes": b, "path": None} for b in make_images(labels, seed)]
    split = datasets.Dataset.from_dict({"img": images, "label": labels.tolist()},
                                       features=features)
    split.to_parquet(str(path))


def write_dataset(directory: Path, num_train: int = 400, num_test: int = 100,
                  seed: int = 0) -> Path:
    """A directory with train.parquet and test.parquet, balanced over the 10 labels."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    write_split(directory / "train.parquet", rng.permutation(np.arange(num_train) % 10), seed)
    write_split(directory / "test.parquet", rng.permutation(np.arange(num_test) % 10), seed + 1)
    return directory


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "cifar10-tiny")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"
