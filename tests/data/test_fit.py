"""Data the model cannot take is refused: by the training command, and by the module a trainer sets up."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest

from ernievil2_train.config_checks import ConfigError
from ernievil2_train.data.datamodule import MultiViewDataModule
from ernievil2_train.data.fit import check_data_fits_model
from ernievil2_train.module import ErnieVil2Module
from tests.data.shard_helpers import write_split, write_vocab
from tests.models.tiny import TINY, tiny_model


def test_data_must_fit_the_model(tmp_path: Path) -> None:
    model = tiny_model()
    vocab = write_vocab(tmp_path / "vocab.txt")
    size = TINY["vision"]["image_size"]
    check_data_fits_model(SimpleNamespace(image_size=size, vocab_file=vocab), model)
    message = f"config key 'data.image_size': {size + 16}, but the model takes {size}"
    with pytest.raises(ConfigError, match=message):
        check_data_fits_model(SimpleNamespace(image_size=size + 16, vocab_file=vocab), model)
    big = tmp_path / "big.txt"
    tokens = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", *map(str, range(TINY["text"]["vocab_size"]))]
    big.write_text("\n".join(tokens))
    with pytest.raises(ConfigError, match=r"config key 'data.vocab_file': .*big\.txt: ids go up to"):
        check_data_fits_model(SimpleNamespace(image_size=size, vocab_file=big), model)
    positions = TINY["text"]["max_position_embeddings"]
    fits = SimpleNamespace(image_size=size, vocab_file=vocab, text_max_len=positions)
    check_data_fits_model(fits, model)
    longer = SimpleNamespace(image_size=size, vocab_file=vocab, text_max_len=positions + 1)
    message = rf"'data.datamodule.text_max_len': {positions + 1}, but the model has {positions} text"
    with pytest.raises(ConfigError, match=message):
        check_data_fits_model(longer, model)


def test_data_must_read_the_vocabulary_of_the_checkpoint(tmp_path: Path) -> None:
    """A converted or exported folder's vocab.txt defines the model's ids: another vocabulary that fits the
    table would scramble every token, so it is refused; the folder's own (or no vocab in it) passes."""
    model = tiny_model()
    size = TINY["vision"]["image_size"]
    folder = tmp_path / "ckpt"
    folder.mkdir()
    own = write_vocab(folder / "vocab.txt")
    other = write_vocab(tmp_path / "other.txt", chars="猫狗")
    check_data_fits_model(SimpleNamespace(image_size=size, vocab_file=own), model, str(folder))
    check_data_fits_model(SimpleNamespace(image_size=size, vocab_file=other), model, str(tmp_path))
    with pytest.raises(ConfigError, match=r"config key 'data.vocab_file': .*other\.txt is not the vocabulary "
                                          r"of model.checkpoint"):
        check_data_fits_model(SimpleNamespace(image_size=size, vocab_file=other), model, str(folder))


def test_a_trainer_set_up_in_python_refuses_data_the_model_cannot_take(tmp_path: Path) -> None:
    """Without the training command's check, a caption longer than the model's positions failed inside
    the embedding lookup, whenever the first such caption came."""
    write_vocab(tmp_path / "vocab.txt")
    write_split(tmp_path, "train", 1, 0)
    positions = TINY["text"]["max_position_embeddings"]
    datamodule = MultiViewDataModule(str(tmp_path), str(tmp_path / "vocab.txt"),
                                     image_size=TINY["vision"]["image_size"], batch_size=4, num_workers=0,
                                     text_max_len=positions + 1)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    refusal = rf"'data.datamodule.text_max_len': {positions + 1}, but the model has {positions} text"
    with pytest.raises(ConfigError, match=refusal):
        trainer.fit(ErnieVil2Module(tiny_model()), datamodule=datamodule)
    assert trainer.global_step == 0
