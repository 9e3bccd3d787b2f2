"""Per-sample multi-view transform: keys, shapes, token rows, text-view modes, tags, stable keys."""

from __future__ import annotations

import json
import pickle
import random

import pytest
import torch

from ernievil2_train.data.decode import SkipSample
from ernievil2_train.data.keys import stable_key
from ernievil2_train.data.views import TAG_SEPARATOR, SampleTransform, ViewConfig
from ernievil2_train.text import ErnieTokenizer
from tests.data.shard_helpers import sample, write_vocab

SIZE = 32


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return str(write_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt"))


def rows(vocab: str, texts: list[str], max_len: int = 48) -> torch.Tensor:
    return ErnieTokenizer(vocab, max_len=max_len)(texts)["input_ids"]


def test_train_sample_has_every_view(vocab):
    out = SampleTransform(vocab, image_size=SIZE)(sample(1))
    assert set(out) == {"image", "image_view2", "caption_ids", "text_view_ids", "tag_ids", "has_tags",
                        "tags_key", "image_key", "caption_key", "text_view_key"}
    for name in ("image", "image_view2"):
        assert out[name].shape == (3, SIZE, SIZE) and out[name].dtype == torch.float32
    for name in ("caption_ids", "text_view_ids", "tag_ids"):
        assert out[name].shape == (48,) and out[name].dtype == torch.long
    assert out["has_tags"].dtype == torch.bool and out["has_tags"].shape == ()
    keys = ("image_key", "caption_key", "tags_key", "text_view_key")
    assert all(out[key].dtype == torch.long for key in keys)


def test_flags_switch_views_off(vocab):
    views = {"image_view2": False, "tags": False, "text_view": "none"}
    out = SampleTransform(vocab, image_size=SIZE, views=views)(sample(2))
    assert set(out) == {"image", "caption_ids", "image_key", "caption_key"}


@pytest.mark.parametrize("views", [
    {}, {"image_view2": False}, {"tags": False}, {"text_view": "none"}, {"text_view": "token_drop"},
    {"image_view2": False, "tags": False, "text_view": "none"},
])
def test_the_batch_keys_a_view_config_promises_are_those_a_sample_has(vocab, views):
    """What the start-up check of views against losses reads, against what the transform makes."""
    out = SampleTransform(vocab, image_size=SIZE, views=views)(sample(3))
    assert ViewConfig.from_any(views).train_batch_keys() == set(out)


def test_caption_tags_and_keys_match_tokenizer_and_stable_key(vocab):
    item = sample(3, captions=["一只狗在草地上奔跑", "两个人骑自行车"], tags=["狗", "草地"])
    out = SampleTransform(vocab, image_size=SIZE, text_max_len=12)(item)
    expected = rows(vocab, ["一只狗在草地上奔跑", "狗，草地"], max_len=12)
    assert torch.equal(out["caption_ids"], expected[0])
    assert torch.equal(out["tag_ids"], expected[1])
    assert bool(out["has_tags"])
    assert int(out["image_key"]) == stable_key("img3")
    assert int(out["caption_key"]) == stable_key("一只狗在草地上奔跑")


def test_images_tagged_alike_share_a_tags_key(vocab):
    """The tags key is the hash of the tag row the model reads: alike for alike tags of other images and
    for tags that differ only past the row's end, different otherwise."""
    transform = SampleTransform(vocab, image_size=SIZE, text_max_len=6)
    key = {name: int(transform(sample(i, tags=tags))["tags_key"])
           for i, (name, tags) in enumerate({"a": ["狗", "草地"], "b": ["狗", "草地"], "c": ["草地", "狗"],
                                             "d": ["狗", "草地", "人"]}.items())}
    assert key["a"] == key["b"] == stable_key(json.dumps(rows(vocab, ["狗，草地"], max_len=6)[0].tolist()))
    assert key["c"] != key["a"] and key["d"] == key["a"]  # "狗，草地，人" is cut to 4 pieces, as "狗，草地"


def test_long_caption_is_truncated_like_the_tokenizer(vocab):
    text = "一只狗在草地上奔跑" * 8
    out = SampleTransform(vocab, image_size=SIZE)(sample(4, captions=[text]))
    assert torch.equal(out["caption_ids"], rows(vocab, [text])[0])


def test_no_tags_gives_all_pad_row(vocab):
    out = SampleTransform(vocab, image_size=SIZE)(sample(5, tags=[]))
    assert not bool(out["has_tags"]) and int(out["tag_ids"].abs().sum()) == 0


def test_dropout_view_repeats_the_caption(vocab):
    out = SampleTransform(vocab, image_size=SIZE, views={"text_view": "dropout"})(sample(6))
    assert torch.equal(out["text_view_ids"], out["caption_ids"])


def test_second_caption_picks_another_caption_of_the_image(vocab):
    transform = SampleTransform(vocab, image_size=SIZE, views={"text_view": "second_caption"})
    captions = ["一只狗在草地上奔跑", "两个人骑自行车", "红色的汽车停路边"]
    random.seed(0)
    picked = {tuple(transform(sample(7, captions=captions))["text_view_ids"].tolist()) for _ in range(20)}
    assert picked == {tuple(r) for r in rows(vocab, captions[1:]).tolist()}
    single = transform(sample(8, captions=["猫睡觉"]))
    assert torch.equal(single["text_view_ids"], single["caption_ids"])


def test_second_caption_keys_make_the_captions_of_one_image_positives(vocab: str) -> None:
    """Text views of one image are each other's captions: the text-text key must match across its samples
    (else a caption row meets its own text as a negative column), and stay apart from other images."""
    captions = ["一只狗在草地上奔跑", "两个人骑自行车"]
    second = SampleTransform(vocab, image_size=SIZE, views={"text_view": "second_caption"})
    first = second(sample(13, captions=captions))
    other = second(sample(13, captions=captions[::-1]))
    assert torch.equal(first["caption_ids"], other["text_view_ids"])
    assert int(first["text_view_key"]) == int(other["text_view_key"])
    unrelated = second(sample(14, captions=[captions[0], "红色的汽车停路边"]))
    assert int(unrelated["text_view_key"]) != int(first["text_view_key"])
    dropout = SampleTransform(vocab, image_size=SIZE, views={"text_view": "dropout"})
    assert int(dropout(sample(13, captions=captions))["text_view_key"]) == stable_key(captions[0])
    assert int(dropout(sample(13, captions=captions[::-1]))["text_view_key"]) == stable_key(captions[1])


@pytest.mark.parametrize("text_view", ["second_caption", "dropout", "none"])
def test_a_caption_written_alike_for_two_images_has_one_caption_key_in_every_text_view_mode(
    vocab: str, text_view: str
) -> None:
    """The image-caption positive rule: with `second_caption` views the caption key was the caption set's,
    so two images' alike captions were negatives in training (and positives in validation)."""
    train = SampleTransform(vocab, image_size=SIZE, views={"text_view": text_view})
    alike = "一只狗在草地上奔跑"
    a = train(sample(21, captions=[alike, "两个人骑自行车"]))
    b = train(sample(22, captions=[alike, "红色的汽车停路边"]))
    val = SampleTransform(vocab, image_size=SIZE, views={"text_view": text_view}, train=False)
    validated = val(sample(21, captions=[alike]))
    assert int(a["caption_key"]) == int(b["caption_key"]) == int(validated["caption_key"])
    assert int(a["image_key"]) != int(b["image_key"])


def test_text_without_tokens_is_neither_a_tag_nor_a_caption(vocab: str) -> None:
    """Format characters only: such a tag is dropped (no fake tag row), such a caption is `bad_text`."""
    transform = SampleTransform(vocab, image_size=SIZE)
    tagless = transform(sample(15, tags=["\u200b"]))
    assert not bool(tagless["has_tags"]) and int(tagless["tag_ids"].abs().sum()) == 0
    mixed = transform(sample(15, tags=["\u200b", "狗"]))
    assert torch.equal(mixed["tag_ids"], rows(vocab, ["狗"])[0])
    with pytest.raises(SkipSample, match="bad_text"):
        transform(sample(16, captions=["\u200b\u200d"]))


def test_token_drop_deletes_pieces_and_keeps_one(vocab):
    caption = "一只狗在草地上奔跑两个人骑自行车"
    pieces = ErnieTokenizer(vocab).encode(caption)
    views = {"text_view": "token_drop", "token_drop_p": 0.5}
    transform = SampleTransform(vocab, image_size=SIZE, views=views)
    random.seed(1)
    kept_counts = []
    for _ in range(40):
        row = transform(sample(9, captions=[caption]))["text_view_ids"].tolist()
        body = row[1:row.index(2)]
        assert row[0] == 1 and len(body) >= 1
        it = iter(pieces)
        assert all(p in it for p in body)  # an order-preserving subsequence
        kept_counts.append(len(body))
    assert 0.3 < sum(kept_counts) / (40 * len(pieces)) < 0.7
    heavy = SampleTransform(vocab, image_size=SIZE, views={"text_view": "token_drop", "token_drop_p": 0.99})
    assert all((heavy(sample(10, captions=[caption]))["text_view_ids"] > 3).sum() >= 1 for _ in range(10))


def test_token_drop_p_is_the_share_of_pieces_dropped(vocab: str) -> None:
    """The default `token_drop_p=0.15` drops about 15% of the word pieces (not 85%): 100 seeded views
    of a 16-piece caption, bounds over 10 standard deviations wide."""
    caption = "一只狗在草地上奔跑两个人骑自行车"
    pieces = ErnieTokenizer(vocab).encode(caption)
    assert len(pieces) >= 10
    transform = SampleTransform(vocab, image_size=SIZE, views={"text_view": "token_drop"})
    assert transform.views.token_drop_p == 0.15
    random.seed(2)
    kept = 0
    for _ in range(100):
        row = transform(sample(9, captions=[caption]))["text_view_ids"].tolist()
        kept += len(row[1:row.index(2)])
    assert 0.05 < 1 - kept / (100 * len(pieces)) < 0.30


def test_eval_transform_is_single_view_and_deterministic(vocab):
    transform = SampleTransform(vocab, image_size=SIZE, train=False)
    a, b = transform(sample(11)), transform(sample(11))
    assert set(a) == {"image", "caption_ids", "tag_ids", "has_tags", "tags_key", "image_key", "caption_key"}
    assert torch.equal(a["image"], b["image"])


def test_views_differ_and_transform_pickles(vocab):
    transform = pickle.loads(pickle.dumps(SampleTransform(vocab, image_size=SIZE)))
    out = transform(sample(12))
    assert not torch.equal(out["image"], out["image_view2"])


def test_bad_view_config_is_refused():
    with pytest.raises(ValueError, match="text_view"):
        ViewConfig(text_view="shuffle")
    with pytest.raises(ValueError, match="token_drop_p"):
        ViewConfig(token_drop_p=1.0)
    with pytest.raises(ValueError, match=r"^views\.token_drop_p must be in \[0, 1\), got 'abc'$"):
        ViewConfig(token_drop_p="abc")
    for name in ("image_view2", "tags"):  # a YAML "no" or a quoted "false" is a string, and strings are true
        for value in ("no", "false", 1, None):
            with pytest.raises(ValueError, match=f"views.{name} must be true or false, got {value!r}"):
                ViewConfig(**{name: value})


def test_unknown_view_field_is_named() -> None:
    with pytest.raises(ValueError, match="unknown views config field"):
        ViewConfig.from_any({"image_view3": True})


def test_tag_pieces_equal_the_joined_tags_encoded(paddle_ref) -> None:
    """Tags are encoded one by one and joined with the separator's pieces; the official way encodes the
    joined text. The fixtures' tokenizer cases (accents, Latin words, digits, punctuation, spaces) as tags."""
    lines = (paddle_ref / "tokenizer_cases.jsonl").read_text(encoding="utf-8").splitlines()
    cases = [json.loads(line)["text"] for line in lines]
    transform = SampleTransform(str(paddle_ref / "vocab.txt"), image_size=SIZE, text_max_len=512)
    tokenizer = transform.tokenizer
    rng = random.Random(0)
    for _ in range(200):
        tags = rng.sample(cases, rng.randint(1, 4))
        kept = [tag for tag in tags if tokenizer.encode(tag)]
        assert transform.tag_pieces(tags) == tokenizer.encode(TAG_SEPARATOR.join(kept)), tags
