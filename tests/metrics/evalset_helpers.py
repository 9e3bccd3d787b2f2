"""A tiny checkpoint (model + vocab) and a tiny Chinese-CLIP-layout eval set for the evaluation tests."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ernievil2_train.checkpoints import save_pretrained
from ernievil2_train.models import DualEncoder, create_model

CHARS = "红绿蓝黄黑白色的猫狗车花树山水天一只在上"
TINY = {
    "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
    "text": {"vocab_size": 4 + len(CHARS) + 1, "width": 32, "layers": 1, "heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 16},
}
MAX_LEN = 16


def write_vocab(path: Path) -> Path:
    tokens = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", *CHARS, "[UNK]"]
    path.write_text("\n".join(f"{t}\t{i}" for i, t in enumerate(tokens)), encoding="utf-8")
    return path


def tiny_checkpoint(folder: Path, seed: int = 0) -> tuple[Path, DualEncoder]:
    torch.manual_seed(seed)
    model = create_model(TINY).eval()
    vocab = write_vocab(folder.parent / f"{folder.name}_vocab.txt")
    return save_pretrained(model, folder, vocab_file=vocab), model


def _image(rng: np.random.Generator) -> bytes:
    h, w = (int(v) for v in rng.integers(20, 60, size=2))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_evalset(folder: Path, num_images: int = 7, num_texts: int = 11, split: str = "valid", seed: int = 0,
                  corrupt: tuple[int, ...] = ()):
    """Images with several texts, texts with several images; returns (texts, image ids, text_to_images)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    image_ids = [f"img{i}" for i in range(num_images)]
    with (folder / f"{split}_imgs.tsv").open("w", encoding="utf-8") as fh:
        for image_id in image_ids:
            data = _image(rng)
            if int(image_id[3:]) in corrupt:
                data = data[:40]
            fh.write(f"{image_id}\t{base64.b64encode(data).decode()}\n")
    texts, positives = [], []
    with (folder / f"{split}_texts.jsonl").open("w", encoding="utf-8") as fh:
        for t in range(num_texts):
            text = "".join(rng.choice(list(CHARS), size=int(rng.integers(2, 9))))
            pos = sorted({t % num_images, int(rng.integers(0, num_images))})
            fh.write(json.dumps({"text_id": t, "text": text, "image_ids": [image_ids[i] for i in pos]},
                                ensure_ascii=False) + "\n")
            texts.append(text)
            positives.append(pos)
    return texts, image_ids, positives
