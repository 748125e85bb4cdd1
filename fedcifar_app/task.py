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

import ctypes
import itertools
import math
from collections import OrderedDict
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
# glibc's mallopt parameters (malloc.h) and the values reuse_freed_memory sets: blocks
# up to 32 MiB (the most glibc accepts) come from the heap; up to 1 GiB free at its top
# is kept there.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD = 32 << 20, 1 << 30


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

    def forward_stacked(self, params: dict[str, torch.Tensor],
                        images: torch.Tensor) -> torch.Tensor:
        """``forward`` of K copies of this network at once (see ``ModelStack``):
        ``params`` holds each parameter stacked K×..., ``images`` is K×B×3×32×32; the
        logits are K×B×10. The copies' convolutions run as one grouped convolution in
        channels-last layout and the linear layers as batched matrix products; ReLU
        comes after max-pooling (they commute), on a quarter of the values. The
        formulation measured fastest on a CPU (BENCHMARKS.md, section 9)."""
        clients, batch, channels, height, width = images.shape
        # Client-major channels (the grouped convolutions' groups are the copies), laid
        # out channels-last in the one copy that reorders them.
        x = images.permute(1, 3, 4, 0, 2).reshape(batch, height, width, clients * channels
                                                  ).permute(0, 3, 1, 2)
        for conv in ("conv1", "conv2"):
            weight = params[f"{conv}.weight"]
            x = F.conv2d(x.contiguous(memory_format=torch.channels_last),
                         weight.flatten(0, 1).contiguous(memory_format=torch.channels_last),
                         params[f"{conv}.bias"].flatten(), groups=clients)
            x = F.relu(self.pool(x))
        x = x.reshape(batch, clients, -1).transpose(0, 1)  # K×B×400
        for layer in ("fc1", "fc2", "fc3"):
            x = torch.baddbmm(params[f"{layer}.bias"].unsqueeze(1), x,
                              params[f"{layer}.weight"].transpose(1, 2))
            x = F.relu(x) if layer != "fc3" else x
        return x


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
# How many clients' copies of each model a node trains together by default (the run
# config's batched-clients): the tutorial CNN's tiny convolutions gain from batching;
# the ResNet's, on a CPU, do not (BENCHMARKS.md, section 9).
BATCHED_CLIENTS = {"tutorial-cnn": 64, "resnet9-gn": 1}


def build_model(name: str) -> nn.Module:
    """A fresh model of the named architecture (a key of ``MODELS``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name]()


def copy_model(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with its own parameters and buffers, as ``copy.deepcopy``
    makes, for every client a node trains at once; deepcopy's generic path, which
    reconstructs every attribute of every submodule, costs several times as much."""
    state = {name: value.copy() if type(value) in _CONTAINERS else value
             for name, value in net.__dict__.items()}
    state["_parameters"] = {name: None if p is None else nn.Parameter(p.detach().clone(),
                                                                      p.requires_grad)
                            for name, p in net._parameters.items()}
    state["_buffers"] = {name: None if b is None else b.clone()
                         for name, b in net._buffers.items()}
    state["_modules"] = {name: None if m is None else copy_model(m)
                         for name, m in net._modules.items()}
    copy = net.__class__.__new__(net.__class__)
    object.__setattr__(copy, "__dict__", state)
    return copy


# A module's attributes that hold other objects by name (hooks, submodules, ...).
_CONTAINERS = (dict, OrderedDict, set, list)


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


def reuse_freed_memory() -> bool:
    """Have this process's C allocator keep the memory tensors free for the next ones,
    instead of handing it back to the system; return whether it took effect (False
    where the C library is not glibc, e.g. macOS: nothing changes there).

    By default glibc maps every block over a threshold (128 KiB, growing to at most
    32 MiB) afresh and unmaps it when freed, so each training step's activations
    (megabytes each) are new memory whose every 4 KiB page faults on first touch;
    kept, they are reused as they are (BENCHMARKS.md, section 9, measured). The cost:
    a process holds on to its peak usage instead of shrinking after it."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))


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
        order = self.epoch_order()
        for start in range(0, len(order), self.batch_size):
            batch_indices = order[start:start + self.batch_size]
            yield (self.prepared(self.data.images[batch_indices],
                                 self.augmentation(len(batch_indices))),
                   self.data.labels[batch_indices])

    def epoch_order(self) -> torch.Tensor:
        """The order of the samples in the next epoch (drawn from ``generator``)."""
        num_samples = len(self.data)
        return (torch.randperm(num_samples, generator=self.generator, device=self.device)
                if self.shuffle else torch.arange(num_samples, device=self.device))

    def augmentation(self, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The next batch's random draws (from ``generator``), for ``count`` images:
        which to flip, and each one's crop shift (dy, dx); None without augmentation."""
        if not self.augment:
            return None
        flip = torch.rand(count, generator=self.generator, device=self.device) < 0.5
        shifts = torch.randint(0, 2 * CROP_PADDING + 1, (count, 2), generator=self.generator,
                               device=self.device)
        return flip, shifts

    def prepared(self, images: torch.Tensor,
                 augmentation: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """uint8 images as normalised floats, flipped and cropped as ``augmentation``
        (drawn by ``augmentation``, possibly several loaders' draws concatenated) says."""
        if augmentation is not None:
            flip, shifts = augmentation
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
            images = _shifted(images, shifts)
        return (images.float() - self._mean) / self._std


def _shifted(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Shift each image by its (dy, dx) ∈ [0, 2·pad]² - pad, filling with zeros."""
    pad = CROP_PADDING
    size = images.shape[-1]
    padded = F.pad(images, (pad,) * 4)
    steps = torch.arange(size, device=images.device)
    rows = (shifts[:, 0, None] + steps).view(-1, 1, size, 1)
    cols = (shifts[:, 1, None] + steps).view(-1, 1, 1, size)
    batch = torch.arange(len(images), device=images.device).view(-1, 1, 1, 1)
    channels = torch.arange(images.shape[1], device=images.device).view(1, -1, 1, 1)
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
    evaluate per epoch. (``train_together`` with one model: the one training loop.)
    """
    report = None if on_epoch_end is None else (
        lambda epoch, losses: on_epoch_end(epoch, losses[0]))
    (mean_loss,) = train_together([net], [loader], epochs, learning_rate, momentum,
                                  weight_decay, proximal_mu, [drift_correction], report)
    return checked_loss(mean_loss)


def checked_loss(mean_loss: float) -> float:
    """``mean_loss``, unless training diverged (FloatingPointError)."""
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"training diverged (mean loss {mean_loss}); "
                                 "lower the learning rate")
    return mean_loss


def train_together(
    nets: Sequence[nn.Module],
    loaders: Sequence[Iterable[tuple[torch.Tensor, torch.Tensor]]],
    epochs: int,
    learning_rate: float,
    momentum: float,
    weight_decay: float = 0.0,
    proximal_mu: float = 0.0,
    drift_corrections: Sequence[Sequence[torch.Tensor] | None] | None = None,
    on_epoch_end: Callable[[int, list[float]], None] | None = None,
) -> list[float]:
    """Train several models of one architecture at once, each on its own loader, as
    ``train`` trains one (same hyperparameters; ``drift_corrections``: one per model,
    or None); return each model's mean training loss (NaN or Inf where it diverged:
    the others are unaffected).

    Each model keeps its own weights, momentum and batches: every step, the models
    that have a batch left in the epoch take it, in one batched computation per batch
    size (``ModelStack.step``); the result equals training them one after another, to
    float rounding. The models must hold their state in parameters (no running
    statistics) and sit on one device.
    """
    stack = ModelStack(nets, learning_rate, momentum, weight_decay, proximal_mu,
                       drift_corrections)
    total_loss = torch.zeros(len(nets), device=stack.device)
    batches = torch.zeros(len(nets), device=stack.device)
    for net in nets:
        net.train()
    for epoch in range(1, epochs + 1):
        epoch_loss_before, batches_before = total_loss.clone(), batches.clone()
        for step in _epoch_steps(loaders):
            for rows, images, labels in step:
                losses = stack.step(rows, images, labels)
                # Accumulate as tensors: .item() every step would force a sync per batch.
                if len(rows) == len(nets):
                    total_loss += losses
                    batches += 1
                else:
                    total_loss[rows] += losses
                    batches[rows] += 1
        if on_epoch_end is not None:
            stack.write_back(nets)
            epoch_batches = (batches - batches_before).clamp(min=1)
            on_epoch_end(epoch, ((total_loss - epoch_loss_before) / epoch_batches).tolist())
            for net in nets:
                net.train()  # The callback may have switched to eval mode.
    stack.write_back(nets)
    return (total_loss / batches.clamp(min=1)).tolist()


Step = list[tuple[list[int], torch.Tensor, torch.Tensor]]


def _epoch_steps(loaders: Sequence[Iterable[tuple[torch.Tensor, torch.Tensor]]]
                 ) -> Iterator[Step]:
    """One epoch of the loaders, step by step: each step, the loaders with a batch
    left, grouped by batch size, as (rows, images K×B×C×H×W, labels K×B)."""
    if (len(loaders) > 1 and all(type(loader) is BatchLoader for loader in loaders)
            and len({(loader.device, loader.augment) for loader in loaders}) == 1):
        yield from _batch_loader_steps(loaders)
        return
    streams = [iter(loader) for loader in loaders]
    while True:
        fetched = [next(stream, None) for stream in streams]
        groups = _rows_by_size([0 if batch is None else len(batch[1]) for batch in fetched])
        if not groups:
            return
        yield [(rows, *_stacked([fetched[index] for index in rows]))
               for rows in groups.values()]


def _rows_by_size(sizes: list[int]) -> dict[int, list[int]]:
    """The rows of the loaders with a batch this step (size > 0), by batch size."""
    rows_by_size: dict[int, list[int]] = {}
    for row, size in enumerate(sizes):
        if size:
            rows_by_size.setdefault(size, []).append(row)
    return rows_by_size


def _batch_loader_steps(loaders: Sequence[BatchLoader]) -> Iterator[Step]:
    """``_epoch_steps`` of BatchLoaders on one device: each group's batches gathered,
    augmented and normalised at once, one operation each instead of one per loader
    (the same values: each loader draws its order and augmentation in its own order)."""
    images = torch.cat([loader.data.images for loader in loaders])
    labels = torch.cat([loader.data.labels for loader in loaders])
    offsets = [0, *itertools.accumulate(len(loader.data) for loader in loaders)]
    orders = [loader.epoch_order() + offset for loader, offset in zip(loaders, offsets)]
    for step in itertools.count():
        indices = [order[step * loader.batch_size:(step + 1) * loader.batch_size]
                   for loader, order in zip(loaders, orders)]
        batches = _rows_by_size([len(rows) for rows in indices])
        if not batches:
            return
        groups = []
        for size, rows in batches.items():
            index = torch.cat([indices[row] for row in rows])
            draws = [loaders[row].augmentation(size) for row in rows]
            augmentation = None if draws[0] is None else (
                torch.cat([flip for flip, _ in draws]), torch.cat([shift for _, shift in draws]))
            batch = loaders[rows[0]].prepared(images[index], augmentation)
            groups.append((rows, batch.view(len(rows), size, *batch.shape[1:]),
                           labels[index].view(len(rows), size)))
        yield groups


def _stacked(batches: list[tuple[torch.Tensor, torch.Tensor]]
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """K batches of one size as K×B×... images and K×B labels (one: a view, no copy)."""
    if len(batches) == 1:
        return batches[0][0].unsqueeze(0), batches[0][1].unsqueeze(0)
    return (torch.stack([images for images, _ in batches]),
            torch.stack([labels for _, labels in batches]))


class ModelStack:
    """The weights (and SGD momentum) of K models of one architecture, each parameter
    stacked on a new first dimension, and one SGD step for any subset of them.

    A step's forward pass is the model's ``forward_stacked`` where it has one (a
    formulation measured faster, see the tutorial CNN's), else ``torch.func.vmap``
    over ``functional_call``; for one model, its own ``forward``. SGD is
    ``torch.optim.SGD``'s arithmetic (weight decay into the gradient, then momentum,
    no dampening), per model; the models are independent, so the gradient of the sum
    of their losses is each one's own.
    """

    def __init__(self, nets: Sequence[nn.Module], learning_rate: float, momentum: float,
                 weight_decay: float, proximal_mu: float,
                 drift_corrections: Sequence[Sequence[torch.Tensor] | None] | None) -> None:
        self.template = nets[0]
        self.names = [name for name, _ in self.template.named_parameters()]
        # One model trains in place, in its own parameters: no copies, its own forward.
        self.single = len(nets) == 1
        self.weights = ([p.detach().unsqueeze(0) for p in self.template.parameters()]
                        if self.single else
                        [torch.stack([p.detach() for p in parameters]) for parameters in
                         zip(*(net.parameters() for net in nets), strict=True)])
        self.device = self.weights[0].device
        self.learning_rate, self.momentum = learning_rate, momentum
        self.weight_decay, self.proximal_mu = weight_decay, proximal_mu
        # Zero momentum makes the first step's buffer the gradient, as torch's SGD does.
        self.momenta = [torch.zeros_like(w) for w in self.weights] if momentum else None
        self.anchors = [w.clone() for w in self.weights] if proximal_mu > 0 else None
        self.corrections = _stacked_corrections(drift_corrections, self.weights)
        self._vmapped = None

    def step(self, rows: list[int], images: torch.Tensor, labels: torch.Tensor
             ) -> torch.Tensor:
        """One SGD step of the models ``rows`` on their batches (images K×B×C×H×W,
        labels K×B); return their losses (K), detached."""
        everyone = len(rows) == len(self.weights[0])
        index = None if everyone else torch.tensor(rows, device=self.device)

        def rows_of(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            if self.single:
                return [t[0] for t in tensors]
            return tensors if everyone else [t[index] for t in tensors]

        weights = (list(self.template.parameters()) if self.single
                   else [w.detach().requires_grad_() for w in rows_of(self.weights)])
        logits = self._forward(weights, images)
        losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                 reduction="none").view(labels.shape).mean(1)
        objective = losses.sum()
        if self.anchors is not None:
            objective = objective + self.proximal_mu / 2 * sum(
                (w - a).pow(2).sum()
                for w, a in zip(weights, rows_of(self.anchors), strict=True))
        gradients = torch.autograd.grad(objective, weights)
        momenta = rows_of(self.momenta or [])
        with torch.no_grad():
            self._sgd(weights, gradients, momenta, rows_of(self.corrections or []))
            if not everyone:  # the rows were copies: put them back
                for stacked, updated in zip(self.weights + (self.momenta or []),
                                            weights + momenta, strict=True):
                    stacked[index] = updated
        return losses.detach()

    def _sgd(self, weights: list[torch.Tensor], gradients: Sequence[torch.Tensor],
             momenta: list[torch.Tensor], corrections: list[torch.Tensor]) -> None:
        for position, (weight, gradient) in enumerate(zip(weights, gradients, strict=True)):
            if self.weight_decay:
                gradient = gradient.add(weight, alpha=self.weight_decay)
            if momenta:
                gradient = momenta[position].mul_(self.momentum).add_(gradient)
            weight.sub_(gradient, alpha=self.learning_rate)
            if corrections:
                # After the step, as NIID-Bench's SCAFFOLD does: outside SGD momentum.
                weight.sub_(corrections[position], alpha=self.learning_rate)

    def _forward(self, weights: list[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """Logits K×B×classes of the K models whose weights these are."""
        if self.single:
            return self.template(images[0]).unsqueeze(0)
        params = dict(zip(self.names, weights, strict=True))
        if len(images) == 1:
            single = {name: w[0] for name, w in params.items()}
            return torch.func.functional_call(self.template, single, (images[0],)).unsqueeze(0)
        stacked_forward = getattr(self.template, "forward_stacked", None)
        if stacked_forward is not None:
            return stacked_forward(params, images)
        if self._vmapped is None:
            self._vmapped = torch.func.vmap(
                lambda p, x: torch.func.functional_call(self.template, p, (x,)))
        return self._vmapped(params, images)

    @torch.no_grad()
    def write_back(self, nets: Sequence[nn.Module]) -> None:
        """Copy each model's trained weights into its module (one model's are its own)."""
        if self.single:
            return
        for row, net in enumerate(nets):
            for param, stacked in zip(net.parameters(), self.weights, strict=True):
                param.copy_(stacked[row])


def _stacked_corrections(drift_corrections: Sequence[Sequence[torch.Tensor] | None] | None,
                         weights: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """SCAFFOLD's corrections stacked like the weights (zero for a model without one),
    or None where no model has one."""
    if not drift_corrections or all(c is None for c in drift_corrections):
        return None
    count = len(weights[0])
    if len(drift_corrections) != count:
        raise ValueError(f"{len(drift_corrections)} drift corrections for {count} models")
    return [torch.stack([torch.zeros_like(w[row]) if corrections is None
                         else corrections[position].to(w.device)
                         for row, corrections in enumerate(drift_corrections)])
            for position, w in enumerate(weights)]


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
