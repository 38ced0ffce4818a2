"""Image pipelines: bounded decoding, the tensor they make, labels, and the V2 API around
the real EfficientNet-Lite0 (in-process app; tests/integration/test_images.py runs the
same through a real ``tether edge``)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image, ImageFile
from pytest_mock import MockerFixture

from harness.edge_app import edge_app
from harness.images import LITE0, REPOSITORY, images_built, png_bomb, sample
from serving.pipelines.config import ImageInput, TopKLabels
from serving.pipelines.image import ImageDecoder, encode_image
from serving.pipelines.labels import TopKLabeller
from shared.codec import HEADER_LENGTH_HEADER, decode_response, encode_request
from shared.errors import InvalidInput, PayloadTooLarge

STAGE = ImageInput(tensor="input", resize=256, crop=224, scale=1.0, mean=(127,) * 3, std=(128,) * 3)


@pytest.fixture(scope="module")
def built() -> None:
    if not images_built():
        pytest.fail("the image models are not built: run `make install` (tether models build)")


def _one(data: bytes) -> np.ndarray:
    images = np.empty(1, dtype=object)
    images[0] = data
    return images


# ---------------------------------------------------------------------- decoding


def test_a_jpeg_becomes_the_networks_normalised_nchw_tensor() -> None:
    tensor = ImageDecoder(STAGE).batch(_one(sample("chelsea")))
    assert tensor.shape == (1, 3, 224, 224) and tensor.dtype == np.float32
    assert -1.0 <= tensor.min() < -0.5 and 0.5 < tensor.max() <= 1.0  # (pixel - 127) / 128


def test_png_jpeg_and_base64_text_of_one_image_give_the_same_tensor() -> None:
    decoder = ImageDecoder(STAGE)
    png = decoder.batch(_one(sample("coffee", "PNG")))
    jpeg = decoder.batch(_one(sample("coffee")))
    as_text = decoder.batch(_one(base64.b64encode(sample("coffee", "PNG"))))
    np.testing.assert_array_equal(png, as_text)
    assert np.abs(png - jpeg).mean() < 0.03  # JPEG at quality 90


def test_nhwc_layout_and_exif_orientation_are_honoured() -> None:
    pixels = np.zeros((300, 400, 3), np.uint8)
    pixels[:, :200] = 255  # left half white
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view": the left half becomes the top half
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    decoder = ImageDecoder(
        STAGE.model_copy(
            update={"layout": "NHWC", "scale": 1 / 255, "mean": (0,) * 3, "std": (1,) * 3}
        )
    )
    tensor = decoder.batch(_one(buffer.getvalue()))[0]
    assert tensor.shape == (224, 224, 3)
    assert tensor[:50].mean() > 0.9 and tensor[-50:].mean() < 0.1  # top white, bottom black


def test_a_decompression_bomb_is_refused_from_its_header(mocker: MockerFixture) -> None:
    load = mocker.spy(ImageFile.ImageFile, "load")
    with pytest.raises(PayloadTooLarge, match="refused from its header") as caught:
        ImageDecoder(STAGE).batch(_one(png_bomb()))
    assert caught.value.status == 413
    assert load.call_count == 0  # not one pixel decoded


def test_the_configured_pixel_bound_applies_below_pillows_own(mocker: MockerFixture) -> None:
    load = mocker.spy(ImageFile.ImageFile, "load")
    small = ImageDecoder(STAGE.model_copy(update={"max_pixels": 100_000}))
    with pytest.raises(PayloadTooLarge, match=r"451 x 300 pixels is over the limit of 100,000"):
        small.batch(_one(sample("chelsea")))
    assert load.call_count == 0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not an image at all", "neither an image file nor base64"),
        (base64.b64encode(b"plain words"), "does not hold an image file"),
        (sample("chelsea")[:5000], "cannot decode it"),
        (encode_image(np.zeros((8, 8, 3), np.uint8), "GIF"), "not a JPEG or PNG image"),
        (b"", "empty"),
    ],
    ids=["garbage", "base64-garbage", "truncated-jpeg", "gif", "empty"],
)
def test_bad_images_are_400s_naming_the_row(data: bytes, message: str) -> None:
    images = np.empty(2, dtype=object)
    images[:] = [sample("chelsea"), data]
    with pytest.raises(InvalidInput, match=message) as caught:
        ImageDecoder(STAGE).batch(images)
    assert caught.value.status == 400 and "image 1" in caught.value.message


def test_top_k_labels_are_best_first() -> None:
    labeller = TopKLabeller(TopKLabels(tensor="p", k=3), ["a", "b", "c", "d"])
    scores = np.array([[0.1, 0.5, 0.3, 0.1], [0.7, 0.0, 0.1, 0.2]], np.float32)
    assert labeller(scores).tolist() == [[b"b", b"c", b"a"], [b"a", b"d", b"c"]]


# ---------------------------------------------------------------------- the V2 API


@pytest.fixture(scope="module")
def app(built: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    with edge_app(tmp_path_factory.mktemp("images"), [REPOSITORY / LITE0]) as application:
        yield application


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def test_metadata_shows_the_image_input_and_the_labels_output(client: FlaskClient) -> None:
    meta = client.get(f"/v2/models/{LITE0}").json
    assert meta is not None
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert {"name": "labels", "datatype": "BYTES", "shape": [-1, 5]} in meta["outputs"]


def test_binary_jpegs_get_probabilities_and_labels(client: FlaskClient) -> None:
    images = np.empty(2, dtype=object)
    images[:] = [sample("chelsea"), sample("coffee")]
    body, length = encode_request({"image": images}, {"image": "BYTES"})
    response = client.post(
        f"/v2/models/{LITE0}/infer", data=body, headers={HEADER_LENGTH_HEADER: str(length)}
    )
    assert response.status_code == 200, response.data
    parsed = decode_response(
        response.data, int(response.headers.get(HEADER_LENGTH_HEADER, 0)) or None
    )
    outputs = {o["name"]: o["data"] for o in parsed["outputs"]}
    assert [row[0] for row in outputs["labels"].tolist()] == [b"Egyptian cat", b"espresso"]
    probabilities = outputs["probabilities"]
    assert probabilities.shape == (2, 1000)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-4)
    assert parsed["parameters"]["served_by"] == "edge"
    assert parsed["parameters"]["preprocess_ms"] > 0


def test_json_base64_png_and_only_the_labels_output(client: FlaskClient) -> None:
    text = base64.b64encode(sample("coffee", "PNG")).decode()
    response = client.post(
        f"/v2/models/{LITE0}/infer",
        json={
            "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [text]}],
            "outputs": [{"name": "labels"}],
        },
    )
    assert response.status_code == 200, response.data
    body = response.json
    assert body is not None
    assert [o["name"] for o in body["outputs"]] == ["labels"]
    assert body["outputs"][0]["data"][0] == "espresso"


def test_a_bomb_through_the_api_is_a_413_and_the_server_carries_on(client: FlaskClient) -> None:
    body, length = encode_request({"image": _one(png_bomb())}, {"image": "BYTES"})
    response = client.post(
        f"/v2/models/{LITE0}/infer", data=body, headers={HEADER_LENGTH_HEADER: str(length)}
    )
    assert response.status_code == 413
    assert response.json is not None and "refused from its header" in response.json["error"]
    again = client.post(
        f"/v2/models/{LITE0}/infer",
        json={
            "inputs": [
                {
                    "name": "image",
                    "shape": [1],
                    "datatype": "BYTES",
                    "data": [base64.b64encode(sample("chelsea")).decode()],
                }
            ]
        },
    )
    assert again.status_code == 200


def test_a_float_tensor_where_the_image_goes_is_a_400(client: FlaskClient) -> None:
    response = client.post(
        f"/v2/models/{LITE0}/infer",
        json={"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [1.0]}]},
    )
    assert response.status_code == 400
    assert response.json is not None and "must be BYTES" in response.json["error"]


def test_images_need_no_torch_at_run_time() -> None:
    import subprocess
    import sys

    code = (
        "import sys, serving.pipelines.runtime, serving.runtimes.onnx, edge.worker; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
