"""Model, training and evaluation: pure PyTorch, no Flower.

This is the PyTorch "Training a Classifier" tutorial (``Net``, ``train``, ``test``)
with one change to the data path: images are decoded once into uint8 tensors
(see ``data.py``) and ``BatchLoader`` normalises and augments whole batches as
tensor ops, instead of running a PIL transform on every image on every pass. The
tensors can live on an accelerator (``resolve_device``, ``ImageTensors.to``); the
loader then shuffles, augments and normalises there, so no batch crosses from
host to device. ``build_model`` picks the tutorial CNN or a GroupNorm ResNet-9.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedcifar_app.errors import AnticipatedError

# Per-channel mean and standard deviation of the CIFAR-10 training images.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
NUM_CLASSES = 10
# Random crops shift an image by up to this many pixels (zero padding).
CROP_PADDING = 4
# Evaluation needs no gradients, so larger batches only save per-batch overhead.
EVAL_BATCH_SIZE = 500
# ResNet-9's GroupNorm: 32 groups (Wu & He 2018's default), whatever the width.
GROUP_NORM_GROUPS = 32


class DeviceUnavailableError(AnticipatedError, RuntimeError):
    """The requested device does not exist on this machine."""


class Net(nn.Module):
    """The tutorial CNN: conv 3→6 5×5, pool, conv 6→16 5×5, pool, fc 400→120→84→10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def _conv_block(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False),
                         nn.GroupNorm(GROUP_NORM_GROUPS, channels_out), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_block(channels, channels),
                                  _conv_block(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """ResNet-9 (Page 2018, "How to train your ResNet", the DAWNBench CIFAR-10 net:
    94 % in 24 epochs with BatchNorm), 6.6 M parameters, with GroupNorm in place of
    BatchNorm. GroupNorm normalises each image by itself and keeps no running
    statistics, so the global model is just its weights: FedAvg averages them like
    any other, nothing is kept local, and a client whose batches hold two labels
    does not skew statistics that others then use (Hsieh et al. 2020, "The Non-IID
    Data Quagmire", measured BatchNorm failing under skewed labels and GroupNorm
    holding)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            _conv_block(3, 64),
            _conv_block(64, 128), nn.MaxPool2d(2), _Residual(128),
            _conv_block(128, 256), nn.MaxPool2d(2),
            _conv_block(256, 512), nn.MaxPool2d(2), _Residual(512),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
            nn.Linear(512, NUM_CLASSES, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Page's scaling of the logits: keeps the initial softmax from saturating.
        return self.layers(x) * 0.125


MODELS: dict[str, Callable[[], nn.Module]] = {"tutorial-cnn": Net, "resnet9-gn": ResNet9}


def build_model(name: str) -> nn.Module:
    """A fresh model of the named architecture (a key of ``MODELS``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name]()


def available_devices() -> list[str]:
    """What ``resolve_device`` can give on this machine, e.g. ['cpu', 'cuda:0']."""
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(requested: str) -> torch.device:
    """``auto`` (CUDA if present, else MPS, else CPU, as the seed project does),
    ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; raise DeviceUnavailableError for one
    this machine does not have, naming those it has."""
    available = available_devices()
    if requested == "auto":
        return torch.device(available[1] if len(available) > 1 else "cpu")
    wanted = "cuda:0" if requested == "cuda" else requested
    if wanted not in available:
        raise DeviceUnavailableError(
            f"device '{requested}' is not available on this machine; available: "
            f"{', '.join(available)} (or 'auto')")
    return torch.device(wanted)


def cpu_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's weights on the CPU: what is saved and sent over the network
    (a copy, so that training on does not change it)."""
    return {name: tensor.detach().to("cpu", copy=True)
            for name, tensor in net.state_dict().items()}


@dataclass(frozen=True)
class ImageTensors:
    """Decoded images (uint8, N×3×32×32) and their labels (int64, N)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 N×C×H×W, got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> ImageTensors:
        return ImageTensors(self.images[indices], self.labels[indices])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device) -> ImageTensors:
        """The same data on ``device`` (itself if it is there already)."""
        if self.images.device == device:
            return self
        return ImageTensors(self.images.to(device), self.labels.to(device))


class BatchLoader:
    """Yields normalised float batches from uint8 tensors; augmentation is per batch.

    Like airbench's ``CifarLoader``: no per-image Python work, so the loader costs
    a few tensor ops per batch, run on the device the data is on (``generator``
    must be on that device too). ``augment`` adds a random horizontal flip and a
    random crop with ``CROP_PADDING`` pixels of zero padding (the NIID-Bench setup).
    """

    def __init__(
        self,
        data: ImageTensors,
        batch_size: int,
        shuffle: bool = False,
        augment: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.generator = generator
        self.device = data.device
        self._mean = torch.tensor(CIFAR10_MEAN, device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(CIFAR10_STD, device=self.device).view(1, 3, 1, 1) * 255

    def __len__(self) -> int:
        return math.ceil(len(self.data) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        num_samples = len(self.data)
        order = (torch.randperm(num_samples, generator=self.generator, device=self.device)
                 if self.shuffle else torch.arange(num_samples, device=self.device))
        for start in range(0, num_samples, self.batch_size):
            batch_indices = order[start:start + self.batch_size]
            images = self.data.images[batch_indices]
            if self.augment:
                images = self._random_crop(self._random_flip(images))
            images = (images.float() - self._mean) / self._std
            yield images, self.data.labels[batch_indices]

    def _random_flip(self, images: torch.Tensor) -> torch.Tensor:
        flip = torch.rand(len(images), generator=self.generator, device=self.device) < 0.5
        return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)

    def _random_crop(self, images: torch.Tensor) -> torch.Tensor:
        """Shift each image by (dy, dx) ∈ [-pad, pad]², filling with zeros."""
        pad = CROP_PADDING
        size = images.shape[-1]
        padded = F.pad(images, (pad,) * 4)
        shifts = torch.randint(0, 2 * pad + 1, (len(images), 2), generator=self.generator,
                               device=self.device)
        steps = torch.arange(size, device=self.device)
        rows = (shifts[:, 0, None] + steps).view(-1, 1, size, 1)
        cols = (shifts[:, 1, None] + steps).view(-1, 1, 1, size)
        batch = torch.arange(len(images), device=self.device).view(-1, 1, 1, 1)
        channels = torch.arange(images.shape[1], device=self.device).view(1, -1, 1, 1)
        return padded[batch, channels, rows, cols]


def train(
    net: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    epochs: int,
    learning_rate: float,
    momentum: float,
    weight_decay: float = 0.0,
    proximal_mu: float = 0.0,
    drift_correction: Sequence[torch.Tensor] | None = None,
    on_epoch_end: Callable[[int, float], None] | None = None,
) -> float:
    """Train with SGD; return the mean training loss over all batches.

    ``proximal_mu`` > 0 adds FedProx's proximal term (mu/2)·||w - w_global||², where
    w_global are the weights ``net`` holds when training starts.
    ``drift_correction`` (one tensor per parameter, SCAFFOLD's c - c_i) is
    subtracted, times the learning rate, from the weights after every step.
    ``on_epoch_end`` is called with (epoch, mean loss of that epoch), e.g. to
    evaluate per epoch.
    """
    criterion = nn.CrossEntropyLoss()
    device = next(net.parameters()).device
    optimizer = torch.optim.SGD(net.parameters(), lr=learning_rate, momentum=momentum,
                                weight_decay=weight_decay)
    global_params = [p.detach().clone() for p in net.parameters()] if proximal_mu > 0 else []
    net.train()
    total_loss = torch.zeros((), device=device)
    num_batches = 0
    for epoch in range(1, epochs + 1):
        epoch_loss_before, batches_before = total_loss.clone(), num_batches
        for images, labels in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(net(images), labels)
            if global_params:
                loss = loss + proximal_mu / 2 * sum(
                    (p - g).pow(2).sum() for p, g in zip(net.parameters(), global_params))
            loss.backward()
            optimizer.step()
            if drift_correction is not None:
                # After the step, as NIID-Bench's SCAFFOLD does: outside SGD momentum.
                with torch.no_grad():
                    for param, correction in zip(net.parameters(), drift_correction, strict=True):
                        param.sub_(correction, alpha=learning_rate)
            # Accumulate as a tensor: .item() every step would force a sync per batch.
            total_loss += loss.detach()
            num_batches += 1
        if on_epoch_end is not None:
            epoch_batches = max(num_batches - batches_before, 1)
            on_epoch_end(epoch, ((total_loss - epoch_loss_before) / epoch_batches).item())
            net.train()  # The callback may have switched to eval mode.
    mean_loss = (total_loss / max(num_batches, 1)).item()
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"training diverged (mean loss {mean_loss}); "
                                 "lower the learning rate")
    return mean_loss


def scaffold_client_control(
    client_control: Sequence[torch.Tensor],
    server_control: Sequence[torch.Tensor],
    global_weights: Sequence[torch.Tensor],
    trained_weights: Sequence[torch.Tensor],
    steps: int,
    learning_rate: float,
) -> list[torch.Tensor]:
    """SCAFFOLD's new client control variate (Karimireddy et al. 2020, option II):
    c_i - c + (x - y_i) / (steps · learning rate), per parameter."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    scale = 1.0 / (steps * learning_rate)
    return [c_i - c + (x - y) * scale for c_i, c, x, y in
            zip(client_control, server_control, global_weights, trained_weights, strict=True)]


@torch.no_grad()
def test(net: nn.Module, loader: BatchLoader) -> tuple[float, float]:
    """Return (mean cross-entropy loss, accuracy) of ``net`` over ``loader``."""
    net.eval()
    total_loss = 0.0
    correct = 0
    for images, labels in loader:
        logits = net(images)
        total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
    num_samples = len(loader.data)
    if num_samples == 0:
        raise ValueError("cannot evaluate on an empty data set")
    return total_loss / num_samples, correct / num_samples
