"""Logger factories: W&B that works offline without an account and resumes under the same run id."""

from __future__ import annotations

import netrc
import os
import uuid
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger

RUN_ID_FILE = "wandb_run_id.txt"
# Rank variables of the launchers: torchrun (RANK, LOCAL_RANK), Lightning's own (LOCAL_RANK, NODE_RANK) and
# srun (SLURM_PROCID; srun starts every task at once, before Lightning sets any of the others).
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def is_first_process() -> bool:
    """True unless a launcher's rank variable says this process is not the first (global rank 0)."""
    return all(os.environ.get(name, "0").strip() in ("", "0") for name in RANK_VARIABLES)


def wandb_has_credentials() -> bool:
    """True when an API key is configured (environment variable or `wandb login`'s netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        entries = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in entries)


def wandb_logger(
    project: str,
    save_dir: str,
    name: str | None = None,
    offline: bool | None = None,
    tags: list[str] | None = None,
    log_model: bool = False,
    **kwargs: Any,
) -> WandbLogger:
    """A `WandbLogger` whose run id is kept in `save_dir`, so a resumed run logs into the same W&B run.

    `offline=None` means: offline unless credentials are configured (or `WANDB_MODE` says otherwise).
    """
    if offline is None:
        mode = os.environ.get("WANDB_MODE")
        offline = mode in ("offline", "dryrun") if mode else not wandb_has_credentials()
    id_file = Path(save_dir) / RUN_ID_FILE
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        if is_first_process():  # other ranks log nothing; a write of theirs would replace rank 0's id
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id)
    return WandbLogger(
        project=project,
        name=name,
        save_dir=save_dir,
        offline=offline,
        tags=list(tags or []),
        log_model=log_model,
        id=run_id,
        resume="allow",
        **kwargs,
    )
