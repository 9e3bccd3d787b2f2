"""Whether a data module's images, texts and vocabulary fit a model: checked by the training command before
it starts anything, and by the LightningModule when a trainer sets it up (a run built in Python)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ernievil2_train.config_checks import ConfigError
from ernievil2_train.text.vocab import check_vocab_fits, same_token_ids


def check_data_fits_model(datamodule: Any, model: Any, checkpoint: str | None = None) -> None:
    """Refuse data the model cannot take: another image size, texts longer than its positions, token ids
    beyond its embedding table (a pretrained model keeps the sizes of its checkpoint), or a vocabulary other
    than the `checkpoint` folder's own `vocab.txt` (its ids would mean other tokens to the model)."""
    config = getattr(model, "config", None)
    if config is None:
        return
    image_size, wanted = getattr(datamodule, "image_size", None), config.vision.image_size
    if image_size is not None and image_size != wanted:
        raise ConfigError(
            f"config key 'data.image_size': {image_size}, but the model takes {wanted}-pixel images "
            f"(set data.image_size={wanted})"
        )
    text_len, positions = getattr(datamodule, "text_max_len", None), config.text.max_position_embeddings
    if text_len is not None and text_len > positions:
        raise ConfigError(
            f"config key 'data.datamodule.text_max_len': {text_len}, but the model has {positions} text "
            f"positions (max_position_embeddings; set it to {positions} or less)"
        )
    vocab_file = getattr(datamodule, "vocab_file", None)
    if vocab_file is not None:
        try:
            check_vocab_fits(vocab_file, config.text.vocab_size)
        except ValueError as error:
            raise ConfigError(f"config key 'data.vocab_file': {error}") from None
        own = Path(checkpoint or "", "vocab.txt")
        if checkpoint and own.is_file() and not same_token_ids(own, vocab_file):
            raise ConfigError(
                f"config key 'data.vocab_file': {vocab_file} is not the vocabulary of model.checkpoint "
                f"({own}); its ids would mean other tokens to the model (set data.vocab_file={own})"
            )
