"""`python -m ernievil2_train [overrides]`: the Hydra training entry point."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import hydra
from hydra.errors import (
    CompactHydraException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)
from omegaconf import DictConfig
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

from ernievil2_train.config_checks import ConfigError
from ernievil2_train.resolvers import register_resolvers
from ernievil2_train.stopping import INTERRUPTED_EXIT, TERMINATED_EXIT, stop_children

register_resolvers()
exit_log = logging.getLogger("ernievil2_train.exit_report")  # the log file's handler only (conf/hydra)

FULL_ERROR = "HYDRA_FULL_ERROR"


def _message(error: Exception) -> str:
    """The error's own message; for one re-raised from a DataLoader worker, the original's last line."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    return last.removeprefix(f"{type(error).__module__}.{type(error).__qualname__}: ")


def composition_message(error: CompactHydraException) -> str:
    """One line for a config Hydra could not compose: an unknown key or group option, a bad override."""
    lines = []
    for line in str(error).splitlines():
        if line.startswith(("Config search path:", "Available options", "See https://")):
            break
        if line.strip():
            lines.append(line.strip().rstrip("."))
    text = "; ".join(lines[:1] + [line[:1].lower() + line[1:] for line in lines[1:2]])
    if isinstance(error, OverrideParseException):
        text = f"cannot parse override '{error.override}': {text}"
    if isinstance(error, MissingConfigException) and error.options:
        text += f"; available: {', '.join(error.options)}"
    return text


_started = False  # whether Hydra got as far as calling `main` (it makes the run folder and log file first)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    global _started
    _started = True
    # imported once Hydra has composed the config: a config it cannot compose is reported without them
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from ernievil2_train.callbacks.retrieval import TrainingDiverged
    from ernievil2_train.distributed import is_first_process
    from ernievil2_train.train import train

    run_dir = _new_run_folder()
    try:
        train(cfg)
    except ConfigError as error:
        _report(f"error: {_in_sweep(_message(error))}")
        _remove_if_only_logs(run_dir)
        sys.exit(2)
    except InterpolationResolutionError as error:
        _report(f"error: {_in_sweep(config_key_message(error))}")
        _remove_if_only_logs(run_dir)
        sys.exit(2)
    except TrainingDiverged as error:
        _report(f"error: {_in_sweep(str(error))}")
        sys.exit(1)
    except KeyboardInterrupt as stop:
        _report(f"interrupted{f': {stop}' if str(stop) else ''}", printed=is_first_process())
        sys.exit(INTERRUPTED_EXIT)
    except SIGTERMException:
        # the run folder is named by the time: a plain rerun would start a new run
        _report(f"stopped by SIGTERM after saving a checkpoint; the same command with "
                f"hydra.run.dir={cfg.paths.output_dir} resumes the run", printed=is_first_process())
        sys.exit(TERMINATED_EXIT)
    except Exception:
        exit_log.exception("the run failed")  # the traceback goes on to stderr, as Python prints it
        raise
    finally:  # on every way out, an error mid-validation included: the exit would wait for loader workers
        stop_children()


def _report(message: str, printed: bool = True) -> None:
    """How the run ended, on stderr (when `printed`) and in this process's log file, where a look into the
    run folder finds it later."""
    if printed:
        print(message, file=sys.stderr)
    exit_log.error(message)


def _only_logs(folder: Path, empty: bool = False) -> bool:
    """Whether `folder` holds nothing but log files (`empty`: with nothing written in them yet)."""
    return folder.is_dir() and all(
        entry.suffix == ".log" and entry.is_file() and not (empty and entry.stat().st_size)
        for entry in folder.iterdir()
    )


def _new_run_folder() -> Path | None:
    """The run folder when Hydra has just made it for this run (it holds nothing but empty log files), else
    None: a folder of an earlier run, which a resume writes into."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    folder = Path(HydraConfig.get().runtime.output_dir)
    return folder if _only_logs(folder, empty=True) else None


def _remove_if_only_logs(run_dir: Path | None) -> None:
    """A refused run leaves no run folder behind (Hydra made it, with its log file, before the checks ran),
    as long as the run wrote nothing else there."""
    if run_dir is not None and _only_logs(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)


def _in_sweep(message: str) -> str:
    """`message`, in a multirun (`-m`) as the message of its job, which ends the sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or (hydra_cfg := HydraConfig.get()).mode != RunMode.MULTIRUN:
        return message
    job = f"job {hydra_cfg.job.num} ({' '.join(hydra_cfg.overrides.task)})"
    return f"{job}: {message}; the sweep stops here, the jobs after it do not run"


def run() -> None:
    """`main`, with Hydra's own composition errors, flags it cannot take together, and a run folder it cannot
    make, as one line and exit status 2 (`HYDRA_FULL_ERROR=1` keeps Hydra's full report)."""
    full_report = os.environ.get(FULL_ERROR) == "1"
    os.environ[FULL_ERROR] = "1"  # Hydra then raises instead of printing and exiting itself
    try:
        main()
    except CompactHydraException as error:
        if full_report or isinstance(error, InstantiationException):
            raise
        print(f"error: {composition_message(error)}", file=sys.stderr)
        sys.exit(2)
    except OmegaConfBaseException as error:  # a launcher's settings, resolved by Hydra outside `main`
        if full_report:
            raise
        print(f"error: {config_key_message(error)}", file=sys.stderr)
        sys.exit(2)
    except ValueError as error:  # Hydra's own flags, used together when they cannot be
        if _started or full_report:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:  # after Hydra's own errors, some of which are OSErrors
        if _started or full_report:  # raised by the run itself: not a run folder that cannot be made
            raise
        reason = error.strerror or type(error).__name__
        print(f"error: hydra.run.dir: cannot create the run folder or its log ({error.filename}: {reason})",
              file=sys.stderr)
        sys.exit(2)


def config_key_message(error: OmegaConfBaseException) -> str:
    """One line for a config value OmegaConf could not resolve or validate: its key and why (a `ConfigError`
    a resolver raised speaks for itself)."""
    cause = error.__cause__ or error.__context__
    lines = [line for line in str(error).splitlines() if line.strip()]
    reason = str(cause) if isinstance(cause, ConfigError) else (lines[0] if lines else type(error).__name__)
    key = getattr(error, "full_key", None)
    return f"config key '{key}': {reason}" if key else reason


if __name__ == "__main__":
    run()
