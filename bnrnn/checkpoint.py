"""Checkpoints: one dict (model, optimiser, counters, best metric, RNG states, config),
written atomically so that a kill during the write leaves the previous file intact."""

from __future__ import annotations

import os
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from bnrnn.errors import CheckpointError, StorageError, first_line, is_no_room

# Format 2: the recurrent layer is always a bnrnn.BNLSTM (its cells under rnn.cells.{i}.), and
# its norms are norm_x, norm_h, norm_c (format 1: bn_x, ..., and a single layer's directly
# under rnn.); a format-1 file is read under the new names (migrate_model_state).
FORMAT_NAME, FORMAT_VERSION = "bnrnn-checkpoint", 2
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"  # a file's marker; the version grows when the contents change meaning


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)  # the previous checkpoint at `path` is untouched
        if is_no_room(exc):
            reason = os.strerror(exc.errno) if isinstance(exc, OSError) else "the disk is full"
            previous = "the previous one is intact" if path.exists() else "there was none before"
            raise StorageError(f"cannot write the checkpoint {path} ({reason}); {previous}") from None
        raise


def load_checkpoint(path: Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint; CheckpointError naming the file if it is unusable."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as exc:
        reason = first_line(exc).split(". ")[0]  # torch's zip errors go on for several sentences
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or foreign file: {reason})") from exc
    marker = payload.get("format") if isinstance(payload, dict) else None
    name, _, version = str(marker).partition("/")
    if name != FORMAT_NAME or not version.isdigit():
        raise CheckpointError(f"{path} is not a bnrnn checkpoint (no '{FORMAT}' marker)")
    if int(version) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer bnrnn (checkpoint format {version}; this version reads "
                              f"format {FORMAT_VERSION}); upgrade bnrnn to use it")
    if int(version) < 2 and isinstance(payload.get("model"), dict):
        payload["model"] = migrate_model_state(payload["model"])
    return payload


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, config_file: Path) -> None:
    """``model.load_state_dict(state)``, read from the checkpoint ``path``; CheckpointError
    naming both files where the weights do not fit the model ``config_file`` describes."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit the model in {config_file}") from exc


def population_source(payload: dict[str, Any]) -> str:
    """The statistics mode a checkpoint's population buffers hold: "reestimated" where a
    published best.pt says its statistics were re-estimated (bnrnn.published), else "ema"
    (the training's moving average)."""
    return "reestimated" if payload.get("population_statistics", {}).get("source") == "reestimated" else "ema"


def migrate_model_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A format-1 model state dict under format 2's names: ``rnn.layers.{i}.`` (a stack) and
    ``rnn.`` (a single layer) become ``rnn.cells.{i}.`` and ``rnn.cells.0.``, and the norms
    ``bn_x``, ``bn_h``, ``bn_c`` become ``norm_x``, ``norm_h``, ``norm_c``. The order of the
    entries, which the optimiser's state follows, is kept."""
    out = {}
    for key, value in state.items():
        if key.startswith("rnn."):
            rest = key[len("rnn."):]
            rest = rest[len("layers."):] if rest.startswith("layers.") else "0." + rest
            key = "rnn.cells." + re.sub(r"(^|\.)bn_([xhc])\.", r"\1norm_\2.", rest)
        out[key] = value
    return out


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
