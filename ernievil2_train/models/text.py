"""Text tower: a transformers `ErnieModel` configured as the ERNIE 3.0 encoder of ERNIE-ViL 2.0."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from transformers import ErnieConfig, ErnieModel

from ernievil2_train.config_checks import check_fields, check_number, check_positive_int
from ernievil2_train.text.vocab import PAD_ID

TEXT_LN_EPS = 1e-5
NON_REENTRANT = {"use_reentrant": False}


@dataclass
class TextConfig:
    """Architecture of the ERNIE text tower (post-LN BERT-style encoder)."""

    vocab_size: int = 40000
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 2048
    dropout: float = 0.1
    attention_dropout: float = 0.1

    def __post_init__(self) -> None:
        sizes = ("vocab_size", "width", "layers", "heads", "intermediate_size", "max_position_embeddings")
        for name in sizes:
            check_positive_int(getattr(self, name), f"text.{name}")
        self.dropout = check_number(self.dropout, "text.dropout", 0.0, 1.0)
        self.attention_dropout = check_number(self.attention_dropout, "text.attention_dropout", 0.0, 1.0)
        if self.width % self.heads:
            raise ValueError(f"text.width {self.width} is not divisible by text.heads {self.heads}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextConfig:
        return cls(**check_fields(cls, data, "text"))


def padded_length(*input_ids: torch.Tensor, multiple: int = 8) -> int:
    """1 + the last column holding a real token in any row of any tensor, rounded up to `multiple` and capped
    at the tensors' common length. Meant for host (CPU) tensors: on an accelerator it waits for the device.

    Rounding keeps the number of distinct sequence lengths small (few recompilations under torch.compile);
    the extra columns are padding, which the attention mask hides.
    """
    width = input_ids[0].shape[1]
    length = 1
    for ids in input_ids:
        real_cols = (ids != PAD_ID).any(dim=0).nonzero()
        if len(real_cols):
            length = max(length, int(real_cols[-1]) + 1)
    return min(-(-length // multiple) * multiple, width)


def trim_padding(input_ids: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """Drop the all-pad columns after the last real token (see `padded_length`); the encoding is unchanged."""
    return input_ids[:, : padded_length(input_ids, multiple=multiple)]


class ZeroTokenType(nn.Module):
    """Stands in for the token-type table: adds exactly zero (a 0-dim integer zero, which leaves the float
    embeddings' dtype as it is); no parameters, no buffers, no saved state."""

    def forward(self, token_type_ids: torch.Tensor) -> torch.Tensor:
        return token_type_ids.new_zeros(())


def ernie_config(cfg: TextConfig) -> ErnieConfig:
    """The transformers config for `cfg`: exact GELU, LayerNorm eps 1e-5, no task-type embedding."""
    return ErnieConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=1,
        use_task_id=False,
        layer_norm_eps=TEXT_LN_EPS,
        pad_token_id=PAD_ID,
        use_cache=False,
    )


def key_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """Bool[B, L]: the keys attention may use, the non-pad tokens (`input_ids != 0`). The first key of every
    row is kept too: it is [CLS] in a real row, so nothing changes there, and an all-pad row (a sample
    without tags, left out of its loss) then stays finite on every attention kernel instead of depending on
    how a kernel treats a row with no key at all."""
    keep = input_ids != PAD_ID
    keep[:, 0].fill_(True)  # a fill, not an assignment: that copies a new scalar tensor from host memory
    return keep


class TextTower(nn.Module):
    """ERNIE encoder + tanh pooler; keys at pad positions (`input_ids == 0`) are masked, but for each row's
    first key (`key_mask`)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.ernie = ErnieModel(ernie_config(cfg), add_pooling_layer=True)
        embeddings = self.ernie.embeddings
        embeddings.token_type_embeddings = ZeroTokenType()
        # constant index buffers, given in `forward` instead: a module without buffers has nothing for DDP to
        # broadcast, so no forward is a collective (a rank without validation batches cannot stall the others)
        del embeddings.position_ids, embeddings.token_type_ids

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False) -> Any:
        """Run the encoder; returns the transformers output (`last_hidden_state`, `pooler_output`, ...).

        With SDPA the key mask goes in as a ready 4-D boolean mask: given the 2-D one, transformers would
        test whether it has any pad (`mask.all()`), a host sync in every step.
        """
        keep = key_mask(input_ids)
        sdpa = self.ernie.config._attn_implementation == "sdpa"
        mask = keep[:, None, None, :] if sdpa else keep.long()
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        return self.ernie(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                          token_type_ids=input_ids,  # `ZeroTokenType` uses its device only
                          output_hidden_states=output_hidden_states)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Use the transformers activation checkpointing (named `gradient_checkpointing_*` before v5)."""
        ernie = self.ernie
        if hasattr(ernie, "activation_checkpointing_enable"):
            if enable:
                ernie.activation_checkpointing_enable(activation_checkpointing_kwargs=NON_REENTRANT)
            else:
                ernie.activation_checkpointing_disable()
        elif enable:
            ernie.gradient_checkpointing_enable(gradient_checkpointing_kwargs=NON_REENTRANT)
        else:
            ernie.gradient_checkpointing_disable()

    @property
    def grad_checkpointing(self) -> bool:
        """Whether any ERNIE layer recomputes its activations in backward."""
        return any(getattr(m, "gradient_checkpointing", False) for m in self.ernie.modules())
