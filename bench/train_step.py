"""Full training-step benchmark: ERNIE-ViL 2.0 multi-view step vs the OpenCLIP ViT-B-16 single-view step.

Both systems run in one process at the same per-device batch, with synthetic batches already on the device:
forward (bf16 autocast on CUDA), loss, backward and a fused AdamW step, timed with CUDA events after a
warm-up (median over the timed steps). One step of each is counted with `FlopCounterMode` (eager) to give
model TFLOP/s and MFU against a bf16 matmul ceiling measured on the same GPU, and one with
`perf.HostSyncCounter` for the ops that make the host wait for the device. Our text ids are cut to the
batch's longest row on the host, as the data pipeline does.

    python bench/train_step.py --batch-size 256 --compile --json out.json

Without CUDA it runs a tiny configuration in fp32 for 2 steps (a smoke test; MFU n/a).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import platform
import statistics
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ernievil2_train import perf
from ernievil2_train.data.batches import trim_text_ids
from ernievil2_train.module import COMPILE_MODES

PAD_ID, CLS_ID, SEP_ID = 0, 1, 2
N_BATCHES = 3  # distinct synthetic batches, used in turn
CAPTION_TOKENS = (20, 40)  # real tokens per caption, [CLS] and [SEP] included
TAG_TOKENS = (4, 12)
TAGS_PRESENT = 0.9  # share of samples that have tags
OPENCLIP_TEXT_TOKENS = (20, 40)  # real tokens per OpenCLIP caption, padded to its context length

TINY_OURS = {
    "vision": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "heads": 2},
    "text": {
        "vocab_size": 1000,
        "width": 64,
        "layers": 2,
        "heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 64,
    },
}
TINY_OPENCLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 2, "layers": 2},
}


@dataclass
class System:
    """One trainable system: its modules, parameters, per-step loss function and synthetic batches."""

    name: str
    model: nn.Module
    param_groups: list[dict[str, Any]]
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    batches: list[dict[str, torch.Tensor]]
    encoder_passes: int
    compile_fn: Callable[[], None]


@dataclass
class Result:
    name: str
    batch_size: int
    step_ms: float
    samples_per_s: float
    flops_per_step: int
    gflops_per_sample: float
    tflops: float
    mfu: float | None
    peak_memory_bytes: int | None
    memory_per_sample_bytes: float | None
    encoder_passes: int
    params: int
    loss: float
    host_syncs_per_step: dict[str, int]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=None, help="per-device batch (128; tiny: 8)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; CPU: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; CPU: 1)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoders of both systems")
    parser.add_argument(
        "--compile-mode", default="default", choices=COMPILE_MODES, help="torch.compile mode (with --compile)"
    )
    parser.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing, both")
    parser.add_argument("--channels-last", action="store_true", help="images in channels-last layout")
    parser.add_argument("--text-len", type=int, default=48, help="padded text length of our batches")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--tiny", action="store_true", help="tiny models (always on without CUDA)")
    parser.add_argument("--only", choices=("ernievil2", "openclip"), help="run one system only")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--profile", type=Path, default=None, help="write per-kernel tables of 2 steps here")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    on_cpu = args.device.type == "cpu"
    args.tiny = args.tiny or on_cpu
    if args.batch_size is None:
        args.batch_size = 8 if args.tiny else 128
    if args.steps is None:
        args.steps = 2 if on_cpu else 20
    args.warmup = args.warmup if args.warmup is not None else (1 if on_cpu else 5)
    for name in ("batch_size", "steps", "text_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.text_len < CAPTION_TOKENS[1]:
        parser.error(f"--text-len must be >= {CAPTION_TOKENS[1]} (the longest synthetic caption)")
    return args


def token_rows(
    n: int,
    length: int,
    lengths: tuple[int, int],
    vocab: int,
    gen: torch.Generator,
    present: torch.Tensor | None = None,
) -> torch.Tensor:
    """[n, length] ids: [CLS] word pieces [SEP] then pads; rows where `present` is False are all pads."""
    ids = torch.randint(SEP_ID + 1, vocab, (n, length), generator=gen)
    real = torch.randint(lengths[0], lengths[1] + 1, (n, 1), generator=gen)
    cols = torch.arange(length)[None, :]
    ids[:, 0] = CLS_ID
    ids = torch.where(cols == real - 1, SEP_ID, ids)
    ids = torch.where(cols < real, ids, PAD_ID)
    if present is not None:
        ids[~present] = PAD_ID
    return ids


def ours_batch(args: argparse.Namespace, model: nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One multi-view batch in the agreed format (two image views, caption, second caption, tags)."""
    b, size, vocab = args.batch_size, model.config.vision.image_size, model.config.text.vocab_size
    has_tags = torch.rand(b, generator=gen) < TAGS_PRESENT
    batch = {
        "image": torch.randn(b, 3, size, size, generator=gen),
        "image_view2": torch.randn(b, 3, size, size, generator=gen),
        "caption_ids": token_rows(b, args.text_len, CAPTION_TOKENS, vocab, gen),
        "text_view_ids": token_rows(b, args.text_len, CAPTION_TOKENS, vocab, gen),
        "tag_ids": token_rows(b, args.text_len, TAG_TOKENS, vocab, gen, present=has_tags),
        "has_tags": has_tags,
        "image_key": torch.randint(0, 2**62, (b,), generator=gen),
        "caption_key": torch.randint(0, 2**62, (b,), generator=gen),
        "tags_key": torch.randint(0, 2**62, (b,), generator=gen),
    }
    return to_device(trim_text_ids(batch), args)


def to_device(batch: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in batch.items():
        value = value.to(args.device)
        if value.ndim == 4 and args.channels_last:
            value = value.contiguous(memory_format=torch.channels_last)
        out[key] = value
    return out


def build_ours(args: argparse.Namespace, gen: torch.Generator) -> System:
    """ERNIE-ViL 2.0 with all four losses through the project's LightningModule `training_step`."""
    from ernievil2_train.losses import PAIRS
    from ernievil2_train.models import create_model
    from ernievil2_train.module import ErnieVil2Module

    model = create_model("ernie_vil2_base", **(TINY_OURS if args.tiny else {}))
    module = ErnieVil2Module(
        model=model, loss={"weights": dict.fromkeys(PAIRS, 1.0)}, grad_checkpointing=args.grad_checkpointing
    )
    module = module.to(args.device).train()

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return module.training_step(batch, 0)

    def compile_fn() -> None:
        model.vision.compile(mode=args.compile_mode)
        model.text.compile(mode=args.compile_mode)

    batches = [ours_batch(args, model, gen) for _ in range(N_BATCHES)]
    return System("ernievil2", module, module.param_groups(), loss_fn, batches, 5, compile_fn)


def build_openclip(args: argparse.Namespace, gen: torch.Generator) -> System:
    """OpenCLIP ViT-B-16 (random init) with its `ClipLoss`: one image view, one caption."""
    import open_clip

    model = open_clip.CLIP(**TINY_OPENCLIP) if args.tiny else open_clip.create_model("ViT-B-16")
    model = model.to(args.device).train()
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    clip_loss = open_clip.ClipLoss(cache_labels=True)
    context, vocab = model.context_length, model.vocab_size
    b, size = args.batch_size, model.visual.image_size[0]

    def make_batch() -> dict[str, torch.Tensor]:
        text = token_rows(b, context, OPENCLIP_TEXT_TOKENS, vocab - 1, gen)
        text = torch.where(text == SEP_ID, vocab - 1, text)  # end-of-text is the largest id (argmax pooling)
        return to_device({"image": torch.randn(b, 3, size, size, generator=gen), "text": text}, args)

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        image_features, text_features, logit_scale = model(batch["image"], batch["text"])
        return clip_loss(image_features, text_features, logit_scale)

    batches = [make_batch() for _ in range(N_BATCHES)]
    params = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    compile_fn = functools.partial(model.compile, mode=args.compile_mode)
    return System("openclip", model, params, loss_fn, batches, 2, compile_fn)


def make_step(system: System, args: argparse.Namespace) -> Callable[[int], torch.Tensor]:
    """A full optimisation step over batch `i % N_BATCHES`; returns the (detached) loss tensor."""
    optimizer = torch.optim.AdamW(system.param_groups, lr=1e-5, weight_decay=0.05, fused=True)
    use_amp = args.device.type == "cuda"

    def step(i: int) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = system.loss_fn(system.batches[i % len(system.batches)])
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def measure(system: System, args: argparse.Namespace, ceiling: float | None) -> Result:
    """Count one step's flops (eager), optionally compile, warm up, then time `args.steps` steps."""
    step = make_step(system, args)
    flops = perf.count_flops(lambda: step(0))
    syncs = perf.count_host_syncs(lambda: step(1))
    if args.compile:
        system.compile_fn()
    for i in range(args.warmup):
        step(i)
    losses: list[torch.Tensor] = []
    times = perf.time_steps(lambda i: losses.append(step(i)), args.steps, args.device)
    loss = float(losses[-1])
    if not math.isfinite(loss):
        raise RuntimeError(f"{system.name}: the training loss is {loss}")
    seconds = statistics.median(times)
    if args.profile:
        write_profile(step, system.name, args)
    peak = perf.peak_memory_bytes(args.device)
    tflops = flops / seconds / 1e12
    return Result(
        name=system.name,
        batch_size=args.batch_size,
        step_ms=seconds * 1e3,
        samples_per_s=args.batch_size / seconds,
        flops_per_step=flops,
        gflops_per_sample=flops / args.batch_size / 1e9,
        tflops=tflops,
        mfu=tflops / ceiling if ceiling else None,
        peak_memory_bytes=peak,
        memory_per_sample_bytes=peak / args.batch_size if peak is not None else None,
        encoder_passes=system.encoder_passes,
        params=sum(p.numel() for p in system.model.parameters()),
        loss=loss,
        host_syncs_per_step=syncs,
    )


def write_profile(step: Callable[[int], torch.Tensor], name: str, args: argparse.Namespace) -> None:
    """Profile two more steps; write the ops and kernels by self device time to PROFILE/<name>_profile.txt."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(2):
            step(i)
        perf.synchronize(args.device)
    sort = "self_cuda_time_total" if args.device.type == "cuda" else "self_cpu_time_total"
    args.profile.mkdir(parents=True, exist_ok=True)
    table_text = prof.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=120)
    (args.profile / f"{name}_profile.txt").write_text(table_text)


def ratios(ours: Result, peer: Result) -> dict[str, Any]:
    """ours / OpenCLIP; the memory target: per-sample ratio <= ratio of encoder passes per sample."""
    passes = ours.encoder_passes / peer.encoder_passes
    mem = None
    if ours.memory_per_sample_bytes is not None and peer.memory_per_sample_bytes:
        mem = ours.memory_per_sample_bytes / peer.memory_per_sample_bytes
    return {
        # the MFU ratio is the TFLOP/s ratio (one ceiling); without a measured ceiling (CPU) there is no MFU
        "mfu": ours.mfu / peer.mfu if ours.mfu and peer.mfu else None,
        "tflops": ours.tflops / peer.tflops,
        "samples_per_s": ours.samples_per_s / peer.samples_per_s,
        "memory_per_sample": mem,
        "encoder_passes": passes,
        "memory_per_sample_per_pass": mem / passes if mem is not None else None,
    }


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(
    results: list[Result], ceiling: float | None, rel: dict[str, Any] | None, env: dict[str, Any]
) -> str:
    lines = [
        f"device {env['device']} | torch {env['torch']} | batch {env['batch_size']}"
        f" | compile {env['compile']} | channels-last {env['channels_last']}"
        f" | grad-ckpt {env['grad_checkpointing']} | amp {env['amp']}"
        f" | bf16 matmul ceiling {fmt(ceiling, '.1f')} TFLOP/s",
        f"{'system':<10} {'step ms':>9} {'samples/s':>10} {'GFLOP/smp':>10} {'TFLOP/s':>8} {'MFU':>6} "
        f"{'peak GiB':>9} {'MiB/smp':>8} {'passes':>6} {'syncs':>5}",
    ]
    for r in results:
        peak = r.peak_memory_bytes / 2**30 if r.peak_memory_bytes is not None else None
        per = r.memory_per_sample_bytes / 2**20 if r.memory_per_sample_bytes is not None else None
        lines.append(
            f"{r.name:<10} {r.step_ms:>9.1f} {r.samples_per_s:>10.1f} {r.gflops_per_sample:>10.2f} "
            f"{r.tflops:>8.3g} {fmt(None if r.mfu is None else 100 * r.mfu, '.1f'):>6} {fmt(peak, '.2f'):>9} "
            f"{fmt(per, '.1f'):>8} {r.encoder_passes:>6} {sum(r.host_syncs_per_step.values()):>5}"
        )
    if rel:
        lines.append(
            f"ours/OpenCLIP: MFU x{fmt(rel['mfu'], '.2f')} | TFLOP/s x{rel['tflops']:.2f} | "
            f"samples/s x{rel['samples_per_s']:.2f} | memory/sample "
            f"x{fmt(rel['memory_per_sample'], '.2f')} (encoder passes x{rel['encoder_passes']:.2f}; per pass "
            f"x{fmt(rel['memory_per_sample_per_pass'], '.2f')})"
        )
    return "\n".join(lines)


def free(device: torch.device) -> None:
    gc.collect()
    perf.reset_peak_memory(device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*self.log.*")  # the module logs; no Trainer is attached here
    on_cuda = args.device.type == "cuda"
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ceiling = perf.matmul_ceiling_tflops(args.device) if on_cuda else None
    env = {
        "device": torch.cuda.get_device_name(args.device) if on_cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "compile": args.compile_mode if args.compile else False,
        "grad_checkpointing": args.grad_checkpointing,
        "channels_last": args.channels_last,
        "text_len": args.text_len,
        "tiny": args.tiny,
        "amp": "bf16" if on_cuda else "fp32",
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
    }
    builders = {"ernievil2": build_ours, "openclip": build_openclip}
    results = []
    for name, build in builders.items():
        if args.only and name != args.only:
            continue
        free(args.device)
        gen = torch.Generator().manual_seed(0)
        system = build(args, gen)
        results.append(measure(system, args, ceiling))
        del system
        torch._dynamo.reset()
    rel = ratios(*results) if len(results) == 2 else None
    print(table(results, ceiling, rel, env))
    if args.json:
        systems = {r.name: asdict(r) for r in results}
        report = {"env": env, "ceiling_tflops": ceiling, "systems": systems, "ratios": rel}
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
