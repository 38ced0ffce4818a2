"""The user's data for ``tether calibrate`` and ``tether models distill``, in three formats.

* **V2 request JSON lines** (``*.jsonl``): one Open Inference Protocol request per line,
  exactly as clients post it; the label (a class index or name, or a list of them for a
  batch) in ``parameters.label``. Lines without one are unlabelled.
* **A folder of images per class** (a directory): ``DIR/<class>/<file>``, the folder's name
  a class name of the model's labels file (or a class index); image files directly in
  ``DIR`` are unlabelled.
* **Labelled text** (``*.tsv``, ``*.txt``): ``label<TAB>text`` lines; a line without a tab is
  unlabelled text.

Images and texts become the model's ``BYTES`` input; the server's own pipeline turns them
into tensors, so calibration sees exactly what serving sees. Labels are class indices;
``-1`` marks an unlabelled row. The digits splits are one more dataset (``builtin:digits``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from shared.codec import decode_request
from shared.errors import TetherError

#: A row without a label.
UNLABELLED = -1
#: Files a folder dataset reads as images (others are skipped).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})


class DatasetError(ValueError):
    """A dataset that cannot be read, with the file and the reason."""


@dataclass(frozen=True)
class Dataset:
    """Inputs for one model (batch-major arrays by input name) and a label per row."""

    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def labelled(self) -> bool:
        """True when every row has a label."""
        return bool(len(self.labels)) and bool(np.all(self.labels != UNLABELLED))

    def take(self, rows: np.ndarray) -> Dataset:
        return Dataset(
            {name: array[rows] for name, array in self.inputs.items()},
            self.datatypes,
            self.labels[rows],
        )

    def split(self, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
        """A seeded random split: ``fraction`` of the rows, and the rest."""
        order = np.random.default_rng(seed).permutation(len(self))
        cut = round(len(self) * fraction)
        if cut == 0 or cut == len(self):
            raise DatasetError(f"{len(self)} rows are too few to split {fraction:.0%} apart")
        return self.take(np.sort(order[:cut])), self.take(np.sort(order[cut:]))


def load_dataset(source: str, input_name: str, class_names: Sequence[str] = ()) -> Dataset:
    """Read ``source`` (a file or folder in one of the formats, or ``builtin:<name>``).

    ``input_name`` is the model's input that images or texts fill; ``class_names`` map
    names in the data to class indices (a name may also be the index itself).
    """
    if source.startswith("builtin:"):
        return builtin(source.removeprefix("builtin:"), input_name)
    path = Path(source)
    index = {name: i for i, name in enumerate(class_names)}
    if path.is_dir():
        return _image_folder(path, input_name, index)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file or folder")
    if path.suffix == ".jsonl":
        return _request_lines(path, index)
    if path.suffix in (".tsv", ".txt"):
        return _labelled_text(path, input_name, index)
    raise DatasetError(
        f"{path}: unknown format; use a .jsonl of V2 requests, a folder of images per class, "
        "or a .tsv of label<TAB>text lines"
    )


#: Built-in datasets: name -> the digits split it is.
BUILTIN = {"digits": "calibration", "digits-test": "test"}


def builtin(name: str, input_name: str) -> Dataset:
    """A dataset that ships with Tether: scikit-learn's digits, its calibration split
    (``digits``) or its test split (``digits-test``)."""
    if name not in BUILTIN:
        raise DatasetError(f"unknown built-in dataset {name!r} (known: {', '.join(BUILTIN)})")
    from models.digits import load_split

    pixels, labels = load_split(BUILTIN[name])  # type: ignore[arg-type]
    return Dataset({input_name: pixels}, {input_name: "FP32"}, labels.astype(np.int64))


def _label(raw: object, index: dict[str, int], where: str) -> int:
    if raw is None or raw == "":
        return UNLABELLED
    if isinstance(raw, bool):
        raise DatasetError(f"{where}: label {raw!r} is neither a class index nor a name")
    if isinstance(raw, int):
        return raw
    text = str(raw).strip()
    if text in index:
        return index[text]
    if text.isdigit():
        return int(text)
    raise DatasetError(f"{where}: label {text!r} is not one of the model's class names")


def _bytes_array(items: list[bytes]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def _image_folder(root: Path, input_name: str, index: dict[str, int]) -> Dataset:
    images: list[bytes] = []
    labels: list[int] = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir():
            label = _label(entry.name, index, str(entry))
            files = sorted(p for p in entry.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            label, files = UNLABELLED, [entry]
        else:
            continue
        for file in files:
            images.append(file.read_bytes())
            labels.append(label)
    if not images:
        raise DatasetError(f"{root}: no .jpg/.jpeg/.png images in it or its class folders")
    return Dataset(
        {input_name: _bytes_array(images)}, {input_name: "BYTES"}, np.array(labels, np.int64)
    )


def _labelled_text(path: Path, input_name: str, index: dict[str, int]) -> Dataset:
    texts: list[bytes] = []
    labels: list[int] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        label, tab, text = line.partition("\t")
        if not tab:
            label, text = "", line
        labels.append(_label(label, index, f"{path}:{number}"))
        texts.append(text.encode("utf-8"))
    if not texts:
        raise DatasetError(f"{path}: no lines")
    return Dataset(
        {input_name: _bytes_array(texts)}, {input_name: "BYTES"}, np.array(labels, np.int64)
    )


def _request_lines(path: Path, index: dict[str, int]) -> Dataset:
    parts: dict[str, list[np.ndarray]] = {}
    datatypes: dict[str, str] = {}
    labels: list[int] = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            request = decode_request(line)
        except TetherError as exc:
            raise DatasetError(f"{where}: {exc.message}") from None
        rows = {int(a.shape[0]) if a.ndim else 1 for a in request.inputs.values()}
        if len(rows) != 1:
            raise DatasetError(f"{where}: inputs with different batch sizes {sorted(rows)}")
        count = rows.pop()
        raw = request.parameters.get("label")
        if raw is None:
            try:
                raw = orjson.loads(line).get("label")
            except orjson.JSONDecodeError:
                raw = None
        given = raw if isinstance(raw, list) else [raw] * count
        if len(given) != count:
            raise DatasetError(f"{where}: {len(given)} labels for {count} rows")
        labels.extend(_label(item, index, where) for item in given)
        if parts and set(parts) != set(request.inputs):
            raise DatasetError(f"{where}: inputs {sorted(request.inputs)} differ from line 1's")
        for name, array in request.inputs.items():
            parts.setdefault(name, []).append(array if array.ndim else array.reshape(1))
            datatypes[name] = request.datatypes[name]
    if not labels:
        raise DatasetError(f"{path}: no requests")
    try:
        inputs = {name: np.concatenate(arrays) for name, arrays in parts.items()}
    except ValueError as exc:
        raise DatasetError(f"{path}: rows of different shapes: {exc}") from None
    return Dataset(inputs, datatypes, np.array(labels, np.int64))
