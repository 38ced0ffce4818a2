"""The cloud worker with an image model (EfficientNet-Lite2): encoded images in, batched,
and one request's bad image costs that request only."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from harness.images import LITE2, REPOSITORY, images_built, sample
from shared.codec import build_request
from shared.envelopes import InferRequestEnvelope, frame
from shared.protocol import InferenceRequest
from tests.cloud.conftest import Asker, WorkerFactory


@pytest.fixture(scope="module")
def image_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not images_built():
        pytest.fail("the image models are not built: run `make install` (tether models build)")
    root = tmp_path_factory.mktemp("cloud-images")
    shutil.copytree(REPOSITORY / LITE2, root / LITE2)
    return root


def envelope(image: bytes, request_id: str) -> bytes:
    images = np.empty(1, dtype=object)
    images[0] = image
    header, blobs = build_request(
        {"image": images},
        {"image": "BYTES"},
        request_id=request_id,
        parameters={"binary_data_output": True},
    )
    message = InferRequestEnvelope(
        request_id=request_id,
        model=LITE2,
        deadline=time.time() + 60,
        request=InferenceRequest.model_validate(header),
    )
    return frame(message.dump(), blobs)


def test_a_bad_image_in_a_batch_fails_alone(
    make_worker: WorkerFactory, asker: Asker, image_repository: Path
) -> None:
    make_worker(
        repository=image_repository,
        models=[LITE2],
        batching={"max_batch_size": 8, "max_queue_delay_ms": 1000},
    )
    sent = {
        uuid.uuid4().hex: image
        for image in (sample("chelsea"), b"\xff\xd8\xff" + b"\x00" * 64, sample("coffee"))
    }
    for request_id, image in sent.items():
        asker.publish(LITE2, envelope(image, request_id))
    replies = {r.header["request_id"]: r for r in asker.collect(3, timeout_s=60)}
    chelsea, bad, coffee = (replies[i] for i in sent)
    assert chelsea.outputs["labels"][0][0] == b"Egyptian cat"
    assert coffee.outputs["labels"][0][0] == b"espresso"
    assert bad.kind == "error" and bad.header["status"] == 400
    assert "image 0" in bad.header["error"]
