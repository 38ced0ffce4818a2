"""A small, deterministic numpy trainer for multi-layer perceptrons, with distillation.

The build uses it to train the teacher, a hard-label student and a distilled student. It
is deliberately plain: dense layers with ReLU, a softmax output, cross-entropy, Adam,
shuffled mini-batches and optional mixup, all driven by one seed, so the same inputs give
the same weights on the same machine. Training runs in float64; the finished model is held in float32,
the precision it is exported and served in.

The model scales its inputs by 1/16 itself, so callers (and clients of the exported
model) pass raw 0..16 digit pixels.

Distillation follows Hinton et al. (2015)::

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
           + (1 - alpha) * CE(softmax(student), labels)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

#: The input scale every model applies first: digit pixels run 0..16.
INPUT_SCALE = 1.0 / 16.0


@dataclass
class MLP:
    """A trained perceptron: ``weights[i]`` is ``[fan_in, fan_out]``, ReLU between layers."""

    weights: list[np.ndarray]
    biases: list[np.ndarray]
    input_scale: float = INPUT_SCALE

    @property
    def layer_sizes(self) -> list[int]:
        """Widths from input to output, e.g. ``[64, 16, 10]``."""
        return [self.weights[0].shape[0], *(w.shape[1] for w in self.weights)]

    @property
    def num_params(self) -> int:
        """Trainable parameters (weights and biases)."""
        return sum(w.size + b.size for w, b in zip(self.weights, self.biases, strict=True))

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """Pre-softmax scores ``[N, classes]`` for raw pixels ``[N, features]``."""
        dtype = self.weights[0].dtype
        h = np.asarray(pixels, dtype=dtype) * dtype.type(self.input_scale)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ w + b
            if i < last:
                h = np.maximum(h, 0)
        return h

    def predict_proba(self, pixels: np.ndarray) -> np.ndarray:
        """Class probabilities ``[N, classes]`` for raw pixels."""
        return softmax(self.logits(pixels))

    def accuracy(self, pixels: np.ndarray, labels: np.ndarray) -> float:
        """The fraction of ``labels`` the arg-max prediction gets right."""
        return float(np.mean(np.argmax(self.logits(pixels), axis=1) == labels))

    def astype(self, dtype: type[np.floating]) -> MLP:
        """A copy with every parameter in ``dtype``."""
        return MLP(
            weights=[w.astype(dtype) for w in self.weights],
            biases=[b.astype(dtype) for b in self.biases],
            input_scale=self.input_scale,
        )


@dataclass(frozen=True)
class TrainConfig:
    """How to train: optimiser settings, schedule, seed and (optionally) distillation."""

    epochs: int = 100
    batch_size: int = 32
    learning_rate: float = 1e-3
    #: L2 penalty added to the weight gradients (not to biases).
    weight_decay: float = 0.0
    seed: int = 0
    #: Distillation temperature T; used only when teacher logits are given.
    temperature: float = 4.0
    #: Weight of the soft (teacher) term; ``1 - alpha`` goes to the hard labels.
    alpha: float = 0.9
    #: Beta(a, a) parameter of mixup between shuffled pairs in a batch (0: no mixup).
    mixup: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8


@dataclass
class _Adam:
    """Adam state for a list of parameter arrays."""

    config: TrainConfig
    m: list[np.ndarray] = field(default_factory=list)
    v: list[np.ndarray] = field(default_factory=list)
    step: int = 0

    def update(self, params: Sequence[np.ndarray], grads: Sequence[np.ndarray]) -> None:
        c = self.config
        if not self.m:
            self.m = [np.zeros_like(p) for p in params]
            self.v = [np.zeros_like(p) for p in params]
        self.step += 1
        lr = c.learning_rate * np.sqrt(1 - c.beta2**self.step) / (1 - c.beta1**self.step)
        for p, g, m, v in zip(params, grads, self.m, self.v, strict=True):
            m *= c.beta1
            m += (1 - c.beta1) * g
            v *= c.beta2
            v += (1 - c.beta2) * g * g
            p -= lr * m / (np.sqrt(v) + c.epsilon)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``, computed stably."""
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def init_mlp(layer_sizes: Sequence[int], seed: int, input_scale: float = INPUT_SCALE) -> MLP:
    """A float64 perceptron with He-normal weights and zero biases, drawn from ``seed``."""
    if len(layer_sizes) < 2:
        raise ValueError("an MLP needs at least an input and an output width")
    rng = np.random.default_rng(seed)
    weights = [
        rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(fan_in, fan_out))
        for fan_in, fan_out in itertools.pairwise(layer_sizes)
    ]
    biases = [np.zeros(fan_out) for fan_out in layer_sizes[1:]]
    return MLP(weights=weights, biases=biases, input_scale=input_scale)


def train_mlp(
    pixels: np.ndarray,
    labels: np.ndarray,
    layer_sizes: Sequence[int],
    config: TrainConfig,
    teacher: MLP | None = None,
    *,
    teacher_logits: np.ndarray | None = None,
    input_scale: float = INPUT_SCALE,
) -> MLP:
    """Train a perceptron on raw pixels and integer labels; return it in float32.

    With a ``teacher`` the loss is Hinton's distillation loss at ``config.temperature``
    and ``config.alpha``, the teacher scoring exactly the (augmented) batch the student
    sees; without, plain cross-entropy on the labels. ``teacher_logits`` (one row per input,
    e.g. the log-probabilities of a teacher that is not an MLP) distil the same way without
    augmentation; with ``alpha = 1`` the labels are not used at all. ``input_scale`` is
    what the model multiplies its inputs by first (1/16 for digit pixels).
    """
    x = np.asarray(pixels, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    n = x.shape[0]
    classes = layer_sizes[-1]
    if x.shape[1] != layer_sizes[0]:
        raise ValueError(f"pixels have {x.shape[1]} features, the model takes {layer_sizes[0]}")
    if teacher is not None and teacher.layer_sizes[-1] != classes:
        raise ValueError("the teacher and the student must predict the same classes")
    if teacher_logits is not None and teacher_logits.shape != (n, classes):
        raise ValueError(
            f"teacher logits have shape {list(teacher_logits.shape)}, expected [{n}, {classes}]"
        )
    teacher64 = None if teacher is None else teacher.astype(np.float64)
    onehot = np.eye(classes)[y]
    # Without augmentation the teacher sees the same rows every epoch: score them once.
    fixed_targets: np.ndarray | None = None
    if teacher_logits is not None:
        if config.mixup:
            raise ValueError("fixed teacher logits cannot follow mixed-up inputs")
        fixed_targets = softmax(np.asarray(teacher_logits, np.float64), config.temperature)
    elif teacher64 is not None and config.mixup == 0:
        fixed_targets = softmax(teacher64.logits(x), config.temperature)

    model = init_mlp(layer_sizes, config.seed, input_scale)
    rng = np.random.default_rng(config.seed + 1)
    adam = _Adam(config)
    params = [*model.weights, *model.biases]
    layers = len(model.weights)
    for _ in range(config.epochs):
        order = rng.permutation(n)
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            xb, tb = augment(x[idx], onehot[idx], config, rng)
            soft = None
            if fixed_targets is not None:
                soft = fixed_targets[idx]
            elif teacher64 is not None:
                soft = softmax(teacher64.logits(xb), config.temperature)
            grads = _gradients(model, xb, tb, config, soft)
            for i in range(layers):
                grads[i] = grads[i] + config.weight_decay * model.weights[i]
            adam.update(params, grads)
    return model.astype(np.float32)


def augment(
    pixels: np.ndarray, targets: np.ndarray, config: TrainConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Mix pairs of the batch up (inputs and targets alike) when ``config.mixup`` asks."""
    x = pixels
    if config.mixup > 0:
        lam = rng.beta(config.mixup, config.mixup, size=(x.shape[0], 1))
        partner = rng.permutation(x.shape[0])
        x = lam * x + (1 - lam) * x[partner]
        targets = lam * targets + (1 - lam) * targets[partner]
    return x, targets


def _gradients(
    model: MLP,
    x: np.ndarray,
    onehot: np.ndarray,
    config: TrainConfig,
    soft_targets: np.ndarray | None,
) -> list[np.ndarray]:
    """Loss gradients for one batch: weight gradients first, then bias gradients."""
    activations = [x * model.input_scale]
    last = len(model.weights) - 1
    h = activations[0]
    for i, (w, b) in enumerate(zip(model.weights, model.biases, strict=True)):
        h = h @ w + b
        if i < last:
            h = np.maximum(h, 0.0)
            activations.append(h)
    logits = h

    # dLoss/dlogits, averaged over the batch.
    delta = softmax(logits) - onehot
    if soft_targets is not None:
        t = config.temperature
        soft = t * (softmax(logits, t) - soft_targets)  # T^2 * dKL/dz = T * (q_T - p_T)
        delta = config.alpha * soft + (1.0 - config.alpha) * delta
    delta = delta / x.shape[0]

    weight_grads: list[np.ndarray] = [np.empty(0)] * len(model.weights)
    bias_grads: list[np.ndarray] = [np.empty(0)] * len(model.weights)
    for i in range(last, -1, -1):
        weight_grads[i] = activations[i].T @ delta
        bias_grads[i] = delta.sum(axis=0)
        if i > 0:
            delta = (delta @ model.weights[i].T) * (activations[i] > 0)
    return [*weight_grads, *bias_grads]


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run BLAS on one thread: faster for these small matrices (threads only contend on a
    loaded machine) and reproducible."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield
