from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ernievil2_train.checkpoints import CheckpointError, load_pdparams, read_pdparams
from ernievil2_train.checkpoints.paddle import (
    BIG_PARAM_KEY,
    NAME_TABLE_KEY,
    default_heads,
    infer_config,
    map_name,
    mlp_ratio,
    paddle_names,
)
from ernievil2_train.models import DualEncoder
from tests.checkpoints.reference import PDPARAMS_FILES, convert_reference, reference_heads


@pytest.fixture(scope="module")
def arrays(paddle_ref: Path) -> dict[str, np.ndarray]:
    return read_pdparams(paddle_ref / "model.pdparams")


def _write(path: Path, obj: object, protocol: int = 4) -> Path:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


def _raw(path: Path) -> dict:
    with path.open("rb") as f:
        return pickle.load(f)


@pytest.mark.parametrize("name", PDPARAMS_FILES)
def test_reads_every_reference_file(paddle_ref: Path, name: str) -> None:
    raw = _raw(paddle_ref / name)
    extra = json.loads((paddle_ref / "config.json").read_text()).get("extra_state_dict_keys", {})
    for key, shape in extra.items():
        assert list(raw[key].shape) == shape
    arrays = read_pdparams(paddle_ref / name)
    expected = {k for k in raw if k != NAME_TABLE_KEY and k not in extra}
    assert set(arrays) == expected and not set(arrays) & set(extra)
    for key in expected:
        np.testing.assert_array_equal(arrays[key], raw[key])
        assert arrays[key].dtype == np.float32


def test_paddle3_file_holds_the_same_state(paddle_ref: Path) -> None:
    """The files differ only in numpy's module path: same keys in the same order, arrays and name table."""
    raws = [_raw(paddle_ref / name) for name in PDPARAMS_FILES]
    assert raws and all(list(raw) == list(raws[0]) for raw in raws)
    for raw in raws[1:]:
        assert raw[NAME_TABLE_KEY] == raws[0][NAME_TABLE_KEY]
        for key, value in raw.items():
            if key != NAME_TABLE_KEY:
                np.testing.assert_array_equal(value, raws[0][key])


@pytest.mark.parametrize("module", ["numpy.core.multiarray", "numpy._core.multiarray"])
def test_either_numpy_module_path_is_accepted(
    tmp_path: Path, arrays: dict[str, np.ndarray], module: str
) -> None:
    """Protocol-2 pickles name the reconstructor as text, so either numpy generation can be written."""
    data = pickle.dumps({NAME_TABLE_KEY: {}, **arrays}, protocol=2)
    written = f"c{np.ndarray.__reduce__(np.zeros(1))[0].__module__}\n_reconstruct\n".encode()
    assert written in data
    path = tmp_path / "module.pdparams"
    path.write_bytes(data.replace(written, f"c{module}\n_reconstruct\n".encode()))
    loaded = read_pdparams(path)
    assert list(loaded) == list(arrays)
    for key, value in arrays.items():
        np.testing.assert_array_equal(loaded[key], value)
    path.write_bytes(data.replace(written, b"cnumpy.lib.format\n_reconstruct\n"))
    refused = re.escape("refused to load global numpy.lib.format._reconstruct")
    with pytest.raises(CheckpointError, match=refused):
        read_pdparams(path)


def test_infers_architecture_from_shapes(paddle_ref: Path, arrays: dict[str, np.ndarray]) -> None:
    ref = json.loads((paddle_ref / "config.json").read_text())
    vision_heads, text_heads = reference_heads(paddle_ref)
    cfg = infer_config(arrays, vision_heads, text_heads)
    v, t = ref["vision"], ref["text"]
    assert (cfg.vision.image_size, cfg.vision.patch_size) == (v["image_size"], v["patch_size"])
    assert (cfg.vision.width, cfg.vision.layers, cfg.vision.heads) == (v["width"], v["layers"], v["heads"])
    hidden = arrays["visual.blocks.0.mlp.fc1.weight"].shape[1]
    assert int(cfg.vision.width * cfg.vision.mlp_ratio) == hidden
    assert cfg.vision.mlp_ratio == pytest.approx(v["mlp_ratio"], rel=1e-3)  # config.json may round it
    assert (cfg.text.width, cfg.text.layers, cfg.text.heads) == (
        t["hidden_size"],
        t["num_hidden_layers"],
        t["num_attention_heads"],
    )
    assert (cfg.text.vocab_size, cfg.text.intermediate_size) == (t["vocab_size"], t["intermediate_size"])
    assert cfg.text.max_position_embeddings == t["max_position_embeddings"]
    default = infer_config(arrays)
    assert default.vision.heads == default_heads(v["width"])
    assert default.text.heads == default_heads(t["hidden_size"])


def test_heads_default_to_64_channels_or_the_nearest_count_that_divides_the_width() -> None:
    assert [default_heads(w) for w in (768, 1024, 512, 64, 48, 96)] == [12, 16, 8, 1, 1, 1]
    assert [default_heads(w) for w in (200, 224, 7)] == [4, 4, 1]  # 3 and 3 do not divide; 7 is prime


def test_key_map_covers_the_model_exactly(arrays: dict[str, np.ndarray]) -> None:
    model = DualEncoder(infer_config(arrays))
    names = paddle_names(model.config)
    assert set(names) == set(arrays)
    assert {map_name(n)[0] for n in names} == set(model.state_dict())
    assert map_name("visual.blocks.0.attn.qkv.weight") == ("vision.blocks.0.attn.qkv.weight", True)
    assert map_name("text_model.encoder_stack.block.1.ln2.bias") == (
        "text.ernie.encoder.layer.1.output.LayerNorm.bias",
        False,
    )
    assert map_name("visual.head.weight") is None


def test_linear_weights_are_transposed(paddle_ref: Path, arrays: dict[str, np.ndarray]) -> None:
    model = convert_reference(paddle_ref)
    state = model.state_dict()
    q = torch.from_numpy(arrays["text_model.encoder_stack.block.0.attn.q.weight"])
    torch.testing.assert_close(state["text.ernie.encoder.layer.0.attention.self.query.weight"], q.T)
    conv = torch.from_numpy(arrays["visual.patch_embed.proj.weight"])
    torch.testing.assert_close(state["vision.patch_embed.proj.weight"], conv)
    temperature = arrays["contrastive_loss_mm.temperature_b"]
    assert tuple(state["logit_scale"].shape) == temperature.shape
    assert state["logit_scale"] == float(temperature[0])


@pytest.mark.parametrize("target", ["posix.system", "builtins.eval"])
def test_malicious_pickle_is_refused_before_running(tmp_path: Path, target: str) -> None:
    marker = tmp_path / "pwned"
    module, name = target.split(".")
    payload = f"touch {marker}" if name == "system" else f"open({str(marker)!r}, 'w')"

    class Evil:
        def __reduce__(self):
            return getattr(__import__(module), name), (payload,)

    path = _write(tmp_path / "evil.pdparams", {"visual.class_embedding": Evil()})
    with pytest.raises(CheckpointError, match=f"refused to load global {target}") as info:
        read_pdparams(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()


def test_truncated_and_non_pickle_files(tmp_path: Path, paddle_ref: Path) -> None:
    data = (paddle_ref / "model.pdparams").read_bytes()
    truncated = tmp_path / "truncated.pdparams"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_pdparams(truncated)
    text = tmp_path / "notes.pdparams"
    text.write_text("hello, not a pickle\n")
    with pytest.raises(CheckpointError, match=re.escape("not a .pdparams pickle")):
        read_pdparams(text)
    empty = tmp_path / "empty.pdparams"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or empty"):
        read_pdparams(empty)
    with pytest.raises(CheckpointError, match="top level is list"):
        read_pdparams(_write(tmp_path / "list.pdparams", [1, 2]))
    with pytest.raises(CheckpointError, match="no such file"):
        read_pdparams(tmp_path / "absent.pdparams")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path}: is a folder, not a .pdparams file")):
        read_pdparams(tmp_path)


def test_torch_zip_file_is_named_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "torch.pdparams"
    torch.save({"visual.class_embedding": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError) as info:
        read_pdparams(path)
    assert str(info.value) == f"{path}: a torch/zip file, not a Paddle .pdparams pickle"


def _error(tmp_path: Path, arrays: dict[str, np.ndarray], **heads: int) -> str:
    """The one-line error of converting `arrays`, which names the file exactly once."""
    path = _write(tmp_path / "edited.pdparams", arrays)
    with pytest.raises(CheckpointError) as info:
        load_pdparams(path, **heads)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ") and message.count(str(path)) == 1
    return message.removeprefix(f"{path}: ")


def test_unexpected_ranks_name_the_key_and_shape(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    conv = arrays["visual.patch_embed.proj.weight"]
    flat_conv = conv.reshape(conv.shape[0], -1)
    assert _error(tmp_path, {**arrays, "visual.patch_embed.proj.weight": flat_conv}) == (
        f"visual.patch_embed.proj.weight has shape {flat_conv.shape}, expected a 4-D array"
    )
    flat_emb = arrays["text_model.word_emb.weight"].reshape(-1)
    assert _error(tmp_path, {**arrays, "text_model.word_emb.weight": flat_emb}) == (
        f"text_model.word_emb.weight has shape {flat_emb.shape}, expected a 2-D array"
    )
    pos = arrays["visual.positional_embedding"]
    assert "visual.positional_embedding has shape" in _error(
        tmp_path, {**arrays, "visual.positional_embedding": pos[0]}
    )
    short = pos[:, :-1]
    assert "cannot infer image size" in _error(tmp_path, {**arrays, "visual.positional_embedding": short})


def test_the_mlp_ratio_gives_back_the_checkpoints_mlp_width() -> None:
    """timm builds `int(width * mlp_ratio)` MLP channels: the ratio must give back every width exactly, also
    where hidden / width times width falls just short in floating point."""
    for width in range(1, 300):
        for hidden in range(1, 8 * width + 1, 7):
            assert int(width * mlp_ratio(hidden, width)) == hidden, (width, hidden)


def test_path_appears_once_in_architecture_errors(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    missing = {k: v for k, v in arrays.items() if k != "text_model.encoder_stack.block.0.ffn.i.weight"}
    assert _error(tmp_path, missing).startswith("missing key text_model.encoder_stack.block.0.ffn.i.weight")
    assert _error(tmp_path, arrays, vision_heads=0) == "vision heads must be a positive integer, got 0"
    width = arrays["text_model.word_emb.weight"].shape[1]
    assert _error(tmp_path, arrays, text_heads=width + 1) == (
        f"text width {width} is not divisible by {width + 1} heads"
    )
    wrong_width = {**arrays, "text_model.word_emb.weight": arrays["text_model.word_emb.weight"][:, :-1]}
    assert "must equal text.width" in _error(tmp_path, wrong_width, text_heads=1)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_logit_scale_is_refused(
    tmp_path: Path, arrays: dict[str, np.ndarray], value: float
) -> None:
    scale = np.full_like(arrays["contrastive_loss_mm.temperature_b"], value)
    message = _error(tmp_path, {**arrays, "contrastive_loss_mm.temperature_b": scale})
    assert message == f"contrastive_loss_mm.temperature_b is not finite ({value})"


def test_non_finite_weights_are_refused_naming_the_parameter(
    tmp_path: Path, arrays: dict[str, np.ndarray]
) -> None:
    words = arrays["text_model.word_emb.weight"].copy()
    words[3, 3] = np.nan
    message = _error(tmp_path, {**arrays, "text_model.word_emb.weight": words})
    assert message.startswith("NaN or infinite weights in [text.ernie.embeddings.word_embeddings.weight]")


def _convert_dict(tmp_path: Path, arrays: dict[str, np.ndarray]) -> DualEncoder:
    return load_pdparams(_write(tmp_path / "edited.pdparams", arrays))


def test_missing_extra_and_misshapen_keys(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    missing = {k: v for k, v in arrays.items() if k != "text_model.encoder_stack.block.0.ffn.o.bias"}
    with pytest.raises(
        CheckpointError, match=r"missing keys \[text_model.encoder_stack.block.0.ffn.o.bias\]"
    ):
        _convert_dict(tmp_path, missing)
    extra = {**arrays, "text_model.sent_emb.weight": np.zeros((4, 8), np.float32)}
    with pytest.raises(CheckpointError, match=r"unexpected keys \[text_model.sent_emb.weight\]"):
        _convert_dict(tmp_path, extra)
    qkv = arrays["visual.blocks.0.attn.qkv.weight"]
    bad = {**arrays, "visual.blocks.0.attn.qkv.weight": qkv[:, :-1]}
    with pytest.raises(
        CheckpointError, match=re.escape("shape mismatch for visual.blocks.0.attn.qkv.weight")
    ):
        _convert_dict(tmp_path, bad)
    no_conv = {k: v for k, v in arrays.items() if k != "visual.patch_embed.proj.weight"}
    with pytest.raises(CheckpointError, match=re.escape("missing key visual.patch_embed.proj.weight")):
        _convert_dict(tmp_path, no_conv)


def test_split_big_parameters_are_reassembled(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    """In the order of the slice list (numeric: `@@.10` after `@@.9`, not after `@@.1`)."""
    split = dict(arrays)
    info = {}
    for name in ("text_model.word_emb.weight", "visual.positional_embedding"):
        flat = split.pop(name).reshape(-1)
        step = -(-flat.size // 12)
        parts = [f"{name}@@.{i}" for i in range(12)]
        for i, part in enumerate(parts):
            split[part] = flat[i * step : (i + 1) * step]
        info[name] = {"OriginShape": list(arrays[name].shape), "slices": parts}
    split[BIG_PARAM_KEY] = info
    path = _write(tmp_path / "split.pdparams", split, protocol=2)
    joined = read_pdparams(path)
    assert set(joined) == set(arrays)
    for name, array in arrays.items():
        np.testing.assert_array_equal(joined[name], array)
    broken = {k: v for k, v in split.items() if k != "visual.positional_embedding@@.1"}
    with pytest.raises(
        CheckpointError, match=re.escape("split parameter visual.positional_embedding is incomplete")
    ):
        read_pdparams(_write(tmp_path / "broken.pdparams", broken, protocol=2))


@pytest.mark.parametrize("dtype", [np.int64, np.bool_])
def test_a_parameter_that_is_not_floating_point_is_refused(tmp_path: Path, arrays: dict[str, np.ndarray],
                                                           dtype: type) -> None:
    """Not cast to float32 in silence: the file is not a model's weights as this loader knows them."""
    name = "visual.positional_embedding"
    state = {**arrays, name: arrays[name].astype(dtype)}
    with pytest.raises(CheckpointError, match=re.escape(f"entry {name} is not a floating-point array")):
        read_pdparams(_write(tmp_path / "ints.pdparams", state))
