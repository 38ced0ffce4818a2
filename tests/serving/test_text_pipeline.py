"""The text input stage with a real ``tokenizer.json`` (all-MiniLM-L6-v2's): tokenizing
within bounds, and bad texts as 4xx errors naming the row (tests/edge/test_text_pipelines.py
runs the stage behind the V2 API)."""

from __future__ import annotations

import numpy as np
import pytest

from harness.news import TEXT_REPOSITORY, texts_array
from serving.model_config import ModelConfig
from serving.pipelines.config import TextInput
from serving.pipelines.text import TextTokenizer
from shared.errors import InvalidInput, PayloadTooLarge, Unavailable

ENCODER = TEXT_REPOSITORY / "minilm-l6" / "1"


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    if not (ENCODER / "tokenizer.json").is_file():
        pytest.fail("minilm-l6 is not built: run `make install` (tether models build)")
    stage = TextInput(max_tokens=16, token_type_ids="token_type_ids", max_text_bytes=1000)
    return TextTokenizer.from_folder(stage, ENCODER)


# ---------------------------------------------------------------------- tokenizing


def test_texts_become_token_tensors_truncated_and_padded_to_the_longest(
    tokenizer: TextTokenizer,
) -> None:
    feeds = tokenizer.feeds(texts_array(["a short text", "word " * 100]))
    assert set(feeds) == {"input_ids", "attention_mask", "token_type_ids"}
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    assert ids.dtype == np.int64 and ids.shape == (2, 16)  # the long text: max_tokens
    assert mask[1].sum() == 16 and 2 < mask[0].sum() < 16  # the short one: padded
    assert (ids[0][mask[0] == 0] == 0).all()  # with the pad id
    alone = tokenizer.feeds(texts_array(["a short text"]))["input_ids"]
    assert alone.shape[1] == mask[0].sum()  # a batch pads to its own longest text only
    np.testing.assert_array_equal(alone[0], ids[0][: alone.shape[1]])


def test_json_strings_and_utf8_bytes_give_the_same_tokens(tokenizer: TextTokenizer) -> None:
    as_str = np.array(["café sur la plage"], dtype=object)
    as_bytes = texts_array(["café sur la plage"])
    np.testing.assert_array_equal(
        tokenizer.feeds(as_str)["input_ids"], tokenizer.feeds(as_bytes)["input_ids"]
    )


@pytest.mark.parametrize(
    ("item", "error", "message"),
    [
        (b"caf\xe9", InvalidInput, "text 0: not valid UTF-8"),
        (b"", InvalidInput, "text 0: empty"),
        (b" \n\t ", InvalidInput, "text 0: empty"),
        (12, InvalidInput, "expected UTF-8 text, got int"),
        (b"x" * 1001, PayloadTooLarge, "over the limit of 1,000"),
    ],
)
def test_bad_texts_are_4xx_errors_naming_the_row(
    tokenizer: TextTokenizer, item: object, error: type[Exception], message: str
) -> None:
    items = np.empty(1, dtype=object)
    items[0] = item
    with pytest.raises(error, match=message):
        tokenizer.feeds(items)


def test_an_escalation_sends_the_texts_not_token_ids(tokenizer: TextTokenizer) -> None:
    wire = tokenizer.wire(np.array(["café"], dtype=object))
    assert wire.tolist() == ["café".encode()]
    assert not tokenizer.fits({})


def test_a_text_stage_stands_in_for_all_the_token_inputs_it_fills() -> None:
    config = ModelConfig.model_validate(
        {
            "name": "m",
            "max_batch_size": 8,
            "input": [
                {"name": n, "datatype": "INT64", "dims": [-1]}
                for n in ("input_ids", "attention_mask", "token_type_ids")
            ],
            "output": [{"name": "probabilities", "datatype": "FP32", "dims": [20]}],
            "pipeline": {"input": {"kind": "text", "token_type_ids": "token_type_ids"}},
        }
    )
    assert [(t.name, t.datatype) for t in config.client_inputs()] == [("text", "BYTES")]


def test_a_missing_tokenizer_makes_the_model_unavailable(tmp_path: object) -> None:
    with pytest.raises(Unavailable, match="cannot read the tokenizer"):
        TextTokenizer.from_folder(TextInput(), ENCODER.parent / "no-such-version")
