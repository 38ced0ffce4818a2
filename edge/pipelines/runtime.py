"""A model runtime with its declared pre- and post-processing around it.

:class:`PipelineRuntime` is a :class:`~edge.runtimes.Runtime` like any other, so the data
plane validates requests against what clients send (a ``BYTES`` image input), the router
escalates those same bytes (the encoded image, not the much larger tensor) when the cloud
model shares the pipeline, and the cloud worker batches them like any tensor.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge.pipelines.config import PipelineConfig
from edge.pipelines.image import ImageDecoder, encode_image, file_bytes
from edge.pipelines.labels import TopKLabeller
from edge.runtimes.base import Prediction, Runtime, TensorSpec, synthetic_input
from shared.errors import InternalError, ModelNotReady, Unavailable


class PipelineRuntime(Runtime):
    """``inner`` (the network) behind the stages of ``pipeline``."""

    def __init__(self, inner: Runtime, pipeline: PipelineConfig, model_dir: Path) -> None:
        super().__init__(inner.name, inner.version)
        self.inner = inner
        self.pipeline = pipeline
        self.model_dir = model_dir
        self.platform = inner.platform
        self.decoder = ImageDecoder(pipeline.input) if pipeline.input is not None else None
        self.labeller: TopKLabeller | None = None

    # ------------------------------------------------------------------ lifecycle

    def load(self) -> None:
        inner = self.inner
        inner.load()
        self.provider = inner.provider
        self.flops = inner.flops
        self.max_batch_size = inner.max_batch_size
        self.inputs = [self._client_input(spec) for spec in inner.inputs]
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

    def _client_input(self, spec: TensorSpec) -> TensorSpec:
        stage = self.pipeline.input
        if stage is None or spec.name != stage.tensor:
            return spec
        assert self.decoder is not None
        if tuple(spec.shape[1:]) != self.decoder.shape or spec.datatype != "FP32":
            raise Unavailable(
                f"model {self.name!r}: input {spec.name!r} is {spec.datatype}{list(spec.shape)}, "
                f"but the image pipeline makes FP32{[-1, *self.decoder.shape]}"
            )
        return TensorSpec(stage.name, "BYTES", (spec.shape[0],))

    def _inner_output(self, name: str) -> TensorSpec:
        for spec in self.inner.outputs:
            if spec.name == name:
                return spec
        raise Unavailable(f"model {self.name!r} has no output {name!r} for its labels")

    def unload(self) -> None:
        self.inner.unload()
        super().unload()

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Run the whole pipeline (decode included) on a synthetic JPEG at each batch size."""
        if self.decoder is None:
            super().warm_up(batch_sizes)
            return
        side = self.decoder.stage.resize + 16
        gradient = np.linspace(0, 255, side * side * 3).reshape(side, side, 3)
        image = encode_image(gradient.astype(np.uint8))
        for batch in batch_sizes:
            images = np.empty(batch, dtype=object)
            images[:] = [image] * batch
            feeds = {
                spec.name: images
                if spec.name == self.decoder.stage.name
                else synthetic_input(spec, batch)
                for spec in self.inputs
            }
            outputs = self.predict(feeds, None)
            for spec in self.outputs:
                if spec.name not in outputs:
                    raise InternalError(f"{self.name}: warm-up gave no output {spec.name!r}")

    # ------------------------------------------------------------------ inference

    def prepare(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The network's feeds: images decoded into its tensor, other inputs as they came."""
        stage = self.pipeline.input
        if stage is None or self.decoder is None:
            return dict(inputs)
        feeds = {name: array for name, array in inputs.items() if name != stage.name}
        feeds[stage.tensor] = self.decoder.batch(inputs[stage.name])
        return feeds

    def escalation_inputs(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Images as their raw file bytes (a JSON client's base64 text is a third larger)."""
        stage = self.pipeline.input
        if stage is None or stage.name not in inputs:
            return dict(inputs)
        images = inputs[stage.name]
        raw = np.empty(images.shape, dtype=object)
        for index, item in enumerate(images.ravel()):
            raw.flat[index] = file_bytes(item, index)
        return {**inputs, stage.name: raw}

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
            served_by=self.served_by,
            compute_ms=(finished - prepared) * 1000.0,
            parameters={"preprocess_ms": round((prepared - started) * 1000.0, 3)},
        )

    def metadata(self) -> dict[str, Any]:
        meta = self.inner.metadata()
        meta["inputs"] = [spec.to_metadata() for spec in self.inputs]
        meta["outputs"] = [spec.to_metadata() for spec in self.outputs]
        meta["parameters"]["pipeline"] = self.pipeline.model_dump(exclude_none=True)
        return meta
