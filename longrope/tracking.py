"""Weights & Biases set-up shared by the scripts: offline when no credentials exist, never printing a key."""

from __future__ import annotations

import logging
import netrc
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

logger = logging.getLogger(__name__)


def wandb_credentials_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def configure_wandb(report_to: list[str] | str, output_dir: str) -> None:
    """Log to W&B offline (into output_dir) when no credentials exist, instead of failing or prompting."""
    if "wandb" not in (report_to if isinstance(report_to, (list, tuple)) else [report_to]):
        return
    if "WANDB_MODE" not in os.environ and not wandb_credentials_present():
        os.environ["WANDB_MODE"] = "offline"
        logger.info("W&B: no API key or netrc entry found, logging offline (sync later with `wandb sync`)")
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_DIR", output_dir)
    os.environ.setdefault("WANDB_PROJECT", "longrope")


def start_wandb(project: str, name: str, config: dict[str, Any], output_dir: str) -> Any:
    """A W&B run for search.py / evaluate.py (train.py goes through the Trainer's ``report_to``)."""
    configure_wandb(["wandb"], output_dir)
    import wandb

    safe_config = {k: v for k, v in config.items() if not k.endswith("_token") and "key" not in k.lower()}
    return wandb.init(project=os.environ.get("WANDB_PROJECT", project), name=name, config=safe_config, dir=output_dir)


def finish_wandb_run() -> None:
    """End the W&B run the Trainer started, so that everything it queued (the factors artifact, the last metrics) is
    written (offline) or uploaded before train.py returns. Left to W&B's exit hook, a loaded machine ended the process
    with the artifact, once even the whole offline run, missing."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.run.finish()
