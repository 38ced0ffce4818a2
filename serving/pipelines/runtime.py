"""A model runtime with its declared pre- and post-processing around it.

:class:`PipelineRuntime` is a :class:`~serving.runtimes.Runtime` like any other, so the data
plane validates requests against what clients send (a ``BYTES`` input of images or texts),
the router escalates those same bytes (the encoded image, not the much larger tensor; the
text, not one vocabulary's token ids) when the cloud model shares the pipeline, and the
cloud worker batches them like any tensor.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from serving.pipelines.config import ImageInput, InputStage, PipelineConfig, TextInput
from serving.pipelines.image import ImageDecoder
from serving.pipelines.labels import TopKLabeller
from serving.provenance import Provenance
from serving.runtimes.base import Prediction, Runtime, TensorSpec, synthetic_input
from shared.errors import InternalError, ModelNotReady, Unavailable


class InputRunner(Protocol):
    """What an input stage does at run time (one class per ``kind``: ``INPUT_RUNNERS``)."""

    @property
    def tensors(self) -> tuple[str, ...]:
        """The network inputs it fills."""

    def client_spec(self, network: Mapping[str, TensorSpec]) -> TensorSpec:
        """The input clients send instead, once the network's inputs are checked."""

    def feeds(self, items: np.ndarray) -> dict[str, np.ndarray]:
        """Client items -> the network's tensors."""

    def wire(self, items: np.ndarray) -> np.ndarray:
        """Client items in their smallest faithful form (what an escalation sends)."""

    def fits(self, cloud: Mapping[str, TensorSpec]) -> bool:
        """Whether a cloud model without the stage takes exactly the tensors it makes."""

    def sample(self, batch: int) -> np.ndarray:
        """Synthetic client items for a warm-up run."""


def _image(stage: InputStage, version_dir: Path) -> InputRunner:
    assert isinstance(stage, ImageInput)
    return ImageDecoder(stage)


def _text(stage: InputStage, version_dir: Path) -> InputRunner:
    from serving.pipelines.text import TextTokenizer  # tokenizers only for text models

    assert isinstance(stage, TextInput)
    return TextTokenizer.from_folder(stage, version_dir)


#: Input stage ``kind`` -> its runner, built from the stage and the model's version folder.
INPUT_RUNNERS: dict[str, Callable[[InputStage, Path], InputRunner]] = {
    "image": _image,
    "text": _text,
}


class PipelineRuntime(Runtime):
    """``inner`` (the network) behind the stages of ``pipeline``."""

    def __init__(self, inner: Runtime, pipeline: PipelineConfig, model_dir: Path) -> None:
        super().__init__(inner.name, inner.version)
        self.inner = inner
        self.pipeline = pipeline
        self.model_dir = model_dir
        self.platform = inner.platform
        #: The input stage's runner, built at :meth:`load` (it may read files).
        self.decoder: InputRunner | None = None
        self.labeller: TopKLabeller | None = None

    # ------------------------------------------------------------------ lifecycle

    def load(self) -> None:
        inner = self.inner
        inner.load()
        self.provider = inner.provider
        self.flops = inner.flops
        self.max_batch_size = inner.max_batch_size
        self.inputs = self._client_inputs(inner.inputs)
        self.outputs = list(inner.outputs)
        stage = self.pipeline.output
        if stage is not None:
            scores = self._inner_output(stage.tensor)
            self.labeller = TopKLabeller.from_file(stage, self.model_dir)
            if scores.shape[-1] >= 0 and scores.shape[-1] != self.labeller.classes:
                raise Unavailable(
                    f"model {self.name!r}: output {stage.tensor!r} has {scores.shape[-1]} "
                    f"classes but {stage.labels_file} names {self.labeller.classes}"
                )
            batch = (-1,) if inner.max_batch_size > 0 else (1,)
            self.outputs.append(TensorSpec(stage.name, "BYTES", (*batch, self.labeller.k)))

    def _client_inputs(self, network: list[TensorSpec]) -> list[TensorSpec]:
        """The network's inputs with the stage's client input in place of those it fills."""
        stage = self.pipeline.input
        if stage is None:
            return list(network)
        version_dir = self.model_dir / self.version
        try:
            self.decoder = INPUT_RUNNERS[stage.kind](stage, version_dir)
            client = self.decoder.client_spec({spec.name: spec for spec in network})
        except Unavailable as exc:
            raise Unavailable(f"model {self.name!r}: {exc.message}") from None
        filled = self.decoder.tensors
        return [client if s.name == filled[0] else s for s in network if s.name not in filled[1:]]

    def _inner_output(self, name: str) -> TensorSpec:
        for spec in self.inner.outputs:
            if spec.name == name:
                return spec
        raise Unavailable(f"model {self.name!r} has no output {name!r} for its labels")

    def unload(self) -> None:
        self.inner.unload()
        super().unload()

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Run the whole pipeline (decoding or tokenizing included) at each batch size."""
        if self.decoder is None or self.pipeline.input is None:
            super().warm_up(batch_sizes)
            return
        name = self.pipeline.input.name
        for batch in batch_sizes:
            feeds = {
                spec.name: self.decoder.sample(batch)
                if spec.name == name
                else synthetic_input(spec, batch)
                for spec in self.inputs
            }
            outputs = self.predict(feeds, None)
            for spec in self.outputs:
                if spec.name not in outputs:
                    raise InternalError(f"{self.name}: warm-up gave no output {spec.name!r}")

    # ------------------------------------------------------------------ inference

    def prepare(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The network's feeds: the stage's input made into its tensors, others as they came."""
        stage = self.pipeline.input
        if stage is None or self.decoder is None:
            return dict(inputs)
        feeds = {name: array for name, array in inputs.items() if name != stage.name}
        feeds.update(self.decoder.feeds(inputs[stage.name]))
        return feeds

    def escalate(
        self,
        cloud: Runtime,
        inputs: Mapping[str, np.ndarray],
        output_names: Sequence[str] | None = None,
    ) -> Prediction:
        """Send the smallest faithful form: the client's items when ``cloud`` takes them
        (image files, a JSON client's base64 text turned back into bytes; texts as UTF-8),
        else the tensor this model's pipeline made, when ``cloud`` takes exactly that (images
        only); then add the outputs the cloud model lacks and this pipeline makes (the
        labels, from the cloud's scores)."""
        names = list(output_names) if output_names else [spec.name for spec in self.outputs]
        takes = {spec.name: spec for spec in cloud.inputs}
        stage = self.pipeline.input
        sent: Mapping[str, np.ndarray] = inputs
        if stage is not None and self.decoder is not None and stage.name in inputs:
            if self.decoder.fits(takes):
                sent = self.prepare(inputs)
            else:
                sent = {**inputs, stage.name: self.decoder.wire(inputs[stage.name])}
        has = {spec.name for spec in cloud.outputs}
        labels = self.pipeline.output
        labeller = self.labeller
        make_labels = (
            labels is not None
            and labeller is not None
            and labels.name in names
            and bool(has)
            and labels.name not in has
        )
        asked = [n for n in names if not has or n in has]
        if make_labels and labels is not None:
            asked = list(dict.fromkeys([*asked, labels.tensor]))
        answer = cloud.infer(sent, asked)
        if (
            make_labels
            and labels is not None
            and labeller is not None
            and labels.tensor in answer.outputs
        ):
            answer.outputs[labels.name] = labeller(answer.outputs[labels.tensor])
        answer.outputs = {n: answer.outputs[n] for n in names if n in answer.outputs}
        return answer

    def run(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """The network on prepared feeds, then the output stage; the asked-for outputs."""
        names = list(output_names) if output_names else [spec.name for spec in self.outputs]
        stage = self.pipeline.output
        want_labels = stage is not None and stage.name in names
        inner_names = [n for n in names if stage is None or n != stage.name]
        if want_labels and stage is not None and stage.tensor not in inner_names:
            inner_names.append(stage.tensor)
        outputs = self.inner.predict(feeds, inner_names)
        if want_labels and stage is not None and self.labeller is not None:
            outputs[stage.name] = self.labeller(outputs[stage.tensor])
        return {name: outputs[name] for name in names}

    def predict(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        return self.run(self.prepare(inputs), output_names)

    def infer(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> Prediction:
        """As :meth:`Runtime.infer`, with decoding reported apart (``preprocess_ms``)."""
        if not self._ready:
            raise ModelNotReady(f"model {self.name!r} version {self.version} is not ready")
        started = time.perf_counter()
        feeds = self.prepare(inputs)
        prepared = time.perf_counter()
        outputs = self.run(feeds, output_names)
        finished = time.perf_counter()
        return Prediction(
            outputs=outputs,
            model_name=self.name,
            model_version=self.version,
            compute_ms=(finished - prepared) * 1000.0,
            provenance=Provenance(
                served_by=self.served_by, preprocess_ms=(prepared - started) * 1000.0
            ),
        )

    def metadata(self) -> dict[str, Any]:
        meta = self.inner.metadata()
        meta["inputs"] = [spec.to_metadata() for spec in self.inputs]
        meta["outputs"] = [spec.to_metadata() for spec in self.outputs]
        meta["parameters"]["pipeline"] = self.pipeline.model_dump(exclude_none=True)
        return meta
