"""Per-sample multi-view transform, run inside DataLoader workers: raw shard sample -> dict of tensors.

Keys (per sample; the collate stacks them into the batch format documented in the README):
`image` [3,S,S], `image_view2` [3,S,S] (views.image_view2) (float32 normalised; uint8 with `uint8_images`),
`caption_ids` [L], `text_view_ids` [L]
(views.text_view != "none"), `text_view_key` [] (with a text view), `tag_ids` [L] + `has_tags` [] +
`tags_key` [] (views.tags), `image_key` [], `caption_key` [].

Text view modes: `dropout` (the caption ids again; the model's dropout makes the second view),
`second_caption` (another caption of the same image, random, different from this one when the image has
several, else the same caption: always so for plain caption sets such as img2dataset's, whose samples are
each their own image with one caption and no tags, see `decode`), `token_drop` (the caption with each word
piece deleted with probability `token_drop_p`, at least one kept), `none`.

`caption_key`, the hash of the caption, marks a caption written alike for two images (a positive of both in
image↔caption). `text_view_key` marks the text↔text positives (caption rows against text-view columns):
equal keys, positive pair. It is the caption's hash too, except with `second_caption` views, where any
caption of the image is a text view of every other: there it is the hash of the image's caption set, so two
samples of one image (whose text views may be each other's captions) are positives, not false negatives.
`tags_key` is the hash of the tag row's token ids: two images tagged alike (both "人, 狗") match each other's
tags too.

A caption or a tag the tokenizer reduces to nothing (control or format characters only) is not text: such a
caption is skipped as `bad_text`, such a tag left out (a sample left with none has `has_tags` false).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ernievil2_train.config_checks import dataclass_from
from ernievil2_train.data.decode import DEFAULT_MAX_IMAGE_PIXELS, RawSample, SkipSample, parse_sample
from ernievil2_train.data.keys import stable_key
from ernievil2_train.text import ErnieTokenizer
from ernievil2_train.text.tokenizer import OFFICIAL_MAX_LEN
from ernievil2_train.vision.augment import CenterView, TrainViews

TEXT_VIEW_MODES: tuple[str, ...] = ("dropout", "second_caption", "token_drop", "none")
TAG_SEPARATOR = "，"


@dataclass
class ViewConfig:
    """Which extra views a sample carries."""

    image_view2: bool = True
    tags: bool = True
    text_view: str = "dropout"
    token_drop_p: float = 0.15

    def __post_init__(self) -> None:
        for name in ("image_view2", "tags"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"views.{name} must be true or false, got {getattr(self, name)!r}")
        if self.text_view not in TEXT_VIEW_MODES:
            raise ValueError(f"views.text_view must be one of {TEXT_VIEW_MODES}, got {self.text_view!r}")
        p = self.token_drop_p
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p < 1:
            raise ValueError(f"views.token_drop_p must be in [0, 1), got {p!r}")

    @classmethod
    def from_any(cls, value: ViewConfig | dict[str, Any] | None) -> ViewConfig:
        return dataclass_from(cls, value, "views")

    def train_batch_keys(self) -> set[str]:
        """The keys of a training sample (and batch) with these views (`SampleTransform` makes them)."""
        keys = {"image", "caption_ids", "image_key", "caption_key"}
        keys |= {"image_view2"} if self.image_view2 else set()
        keys |= {"text_view_ids", "text_view_key"} if self.text_view != "none" else set()
        return keys | ({"tag_ids", "has_tags", "tags_key"} if self.tags else set())


class SampleTransform:
    """Raw sample -> tensors: augmented views and text views (`train`), else one center view."""

    def __init__(
        self,
        vocab_file: str,
        image_size: int = 224,
        text_max_len: int = OFFICIAL_MAX_LEN,
        views: ViewConfig | dict[str, Any] | None = None,
        augment: dict[str, Any] | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        train: bool = True,
        uint8_images: bool = False,
    ) -> None:
        self.tokenizer = ErnieTokenizer(vocab_file, max_len=text_max_len)
        self.views = ViewConfig.from_any(views)
        self._separator_pieces = self.tokenizer.encode(TAG_SEPARATOR)
        self.train = train
        self.max_image_pixels = max_image_pixels
        if train:
            num_views = 2 if self.views.image_view2 else 1
            augment = {**dict(augment or {}), "normalize": not uint8_images}
            self.images = TrainViews(image_size=image_size, num_views=num_views, **augment)
        else:
            self.images = CenterView(image_size=image_size, normalize=not uint8_images)

    def __repr__(self) -> str:
        return f"SampleTransform(train={self.train}, views={asdict(self.views)})"

    def row(self, pieces: list[int]) -> torch.Tensor:
        """`[CLS] + pieces[:L-2] + [SEP]`, padded to L, as the tokenizer builds rows."""
        tok = self.tokenizer
        body = pieces[: tok.max_len - 2]
        ids = [tok.cls_id, *body, tok.sep_id] + [tok.pad_id] * (tok.max_len - 2 - len(body))
        return torch.tensor(ids, dtype=torch.long)

    def text_view(self, caption: str, pieces: list[int], captions: list[str]) -> torch.Tensor:
        mode = self.views.text_view
        if mode == "second_caption":
            others = [c for c in captions if c != caption]
            return self.row(self.tokenizer.encode(random.choice(others))) if others else self.row(pieces)
        if mode == "token_drop" and len(pieces) > 1:
            p = self.views.token_drop_p
            kept = [piece for piece in pieces if random.random() >= p]
            return self.row(kept or [random.choice(pieces)])
        return self.row(pieces)

    def text_view_key(self, raw: RawSample) -> int:
        """The text↔text positive key: the caption's hash, the caption set's with `second_caption` views."""
        if self.views.text_view == "second_caption":
            group = sorted({raw.caption, *raw.captions})
            return stable_key(json.dumps(group, ensure_ascii=False))
        return stable_key(raw.caption)

    def __call__(self, sample: dict) -> dict[str, torch.Tensor]:
        raw = parse_sample(sample, self.max_image_pixels)
        pieces = self.tokenizer.encode(raw.caption)
        if not pieces:
            raise SkipSample("bad_text", f"{raw.key}: the caption has no token")
        try:
            images = self.images(raw.image)
        except Exception as exn:
            raise SkipSample("bad_image", f"{raw.key}: {exn}") from exn
        if not self.train:
            images = (images,)
        out = {
            "image": images[0],
            "caption_ids": self.row(pieces),
            "image_key": torch.tensor(stable_key(raw.image_id), dtype=torch.long),
            "caption_key": torch.tensor(stable_key(raw.caption), dtype=torch.long),
        }
        if self.train and self.views.image_view2:
            out["image_view2"] = images[1]
        if self.train and self.views.text_view != "none":
            out["text_view_ids"] = self.text_view(raw.caption, pieces, raw.captions)
            out["text_view_key"] = torch.tensor(self.text_view_key(raw), dtype=torch.long)
        if self.views.tags:
            tag_pieces = self.tag_pieces(raw.tags)
            if tag_pieces:
                out["tag_ids"] = self.row(tag_pieces)
            else:
                out["tag_ids"] = torch.zeros(self.tokenizer.max_len, dtype=torch.long)
            out["has_tags"] = torch.tensor(bool(tag_pieces))
            row = json.dumps(out["tag_ids"].tolist())  # the tags as the model reads them
            out["tags_key"] = torch.tensor(stable_key(row), dtype=torch.long)
        return out

    def tag_pieces(self, tags: list[str]) -> list[int]:
        """The pieces of the tags joined by `TAG_SEPARATOR`, tags without a token left out. The separator is
        punctuation, which the tokenizer always splits off, so this equals encoding the joined text."""
        separator = self._separator_pieces
        pieces: list[int] = []
        for tag in tags:
            tag_pieces = self.tokenizer.encode(tag)
            if tag_pieces:
                pieces += [*separator, *tag_pieces] if pieces else tag_pieces
        return pieces
