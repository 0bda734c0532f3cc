"""What a resume runs with: the run's own saved settings, plus only what the user changes now.

``bnrnn train hydra.run.dir=R trainer.resume=true`` must continue run R as it was made,
not with the defaults of a fresh command line. So the resumed config starts from R's
``config.yaml`` (hand edits included), and only the overrides given on this command line
are applied over it. The result is compared with the config saved in the checkpoint:

- a change to a key of :data:`FIXED_ON_RESUME` is refused, naming the key and why: the
  checkpoint would not mean the same thing (another shape, data split, data order...);
- a change to a key of :data:`INIT_ONLY` is refused too: it would have no effect;
- every other change (``trainer.lr``, ``trainer.max_steps``, ``device.name``, ...) is
  applied, logged and recorded with its step in the run's ``history.jsonl``.

Called with ``overrides=None`` (the Python API: ``train(cfg, run_dir)``) the given config
is taken as a whole, and checked against the checkpoint's the same way.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from bnrnn.config import GROUPS, load_config, read_saved_settings, typed_config, without_unknown_keys
from bnrnn.errors import CheckpointError, ConfigError
from bnrnn.schema import keys_where

CONFIG_FILE = "config.yaml"

# Declared with each key in the schema (bnrnn.schema: ``fixed=`` and ``init_only=``).
FIXED_ON_RESUME: dict[str, str] = keys_where("fixed")
INIT_ONLY = tuple(keys_where("init_only"))
IGNORED = ("trainer.resume",)  # always differs on a resume; not a change of the run


def flat(cfg: DictConfig) -> dict[str, Any]:
    """{dotted key: plain value} for every leaf; lists stay whole (as plain lists)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, DictConfig):
            out.update({f"{key}.{k}": v for k, v in flat(value).items()})
        else:
            out[str(key)] = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
    return out


def read_saved_config(run_dir: Path, under: DictConfig | None = None) -> DictConfig | None:
    """The run's config.yaml, typed; None if absent; ConfigError naming the file if unusable.

    A key the file lacks (an older version wrote it, or a hand edit removed it) takes its
    value from ``under`` (the checkpoint's config: what the run ran with), not from today's
    defaults; only a key neither has gets the default."""
    path = run_dir / CONFIG_FILE
    if not path.exists():
        return None
    remedy = "fix it, or delete it to resume with the settings saved in the checkpoint"
    loaded = read_saved_settings(path, remedy)
    try:
        # merged untyped, so that a bad value in the file is typed_config's one sentence
        return typed_config(loaded if under is None else OmegaConf.merge(OmegaConf.to_container(under), loaded))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}; {remedy}") from exc


def keys_given(overrides: list[str], saved_choices: dict[str, str]) -> list[str]:
    """The config keys (or whole groups) that this command line sets.

    ``hydra.*`` and ``trainer.resume`` are not settings of the run. A group option equal to
    the run's own choice (``model=bnlstm`` for a BN-LSTM run) changes nothing; another option
    stands for the whole group's settings, so that each of its keys is checked.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = []
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key.startswith("hydra") or key in IGNORED:
            continue
        if key in GROUPS:
            if saved_choices.get(key) == override.value():
                continue
            if key == "experiment":
                raise ConfigError(
                    f"experiment={override.value()} on a resume would replace the run's settings; resume "
                    f"without it and set the keys to change (e.g. trainer.max_steps=...), or start a new run folder"
                )
        keys.append(key)
    return keys


def apply_given(saved: DictConfig, requested: DictConfig, keys: list[str]) -> DictConfig:
    """``saved`` with the value of each of ``keys`` taken from ``requested``."""
    effective = copy.deepcopy(saved)
    for key in keys:
        value = OmegaConf.select(requested, key)
        OmegaConf.update(effective, key, copy.deepcopy(value), merge=False)
    effective.trainer.resume = True
    return effective


def changes_between(before: DictConfig, after: DictConfig) -> dict[str, list]:
    """{key: [old, new]} for every leaf that differs (``trainer.resume`` aside)."""
    old, new = flat(before), flat(after)
    return {k: [old.get(k), new[k]] for k in new if k not in IGNORED and old.get(k) != new[k]}


def resume_config(requested: DictConfig, run_dir: Path, checkpoint_config: dict, overrides: list[str] | None,
                  saved_choices: dict[str, str]) -> tuple[DictConfig, dict[str, list]]:
    """The config a resume of ``run_dir`` runs with, and its accepted changes.

    CheckpointError naming every refused change (with where it came from) if there is one.
    """
    at_checkpoint = typed_config(without_unknown_keys(checkpoint_config)[0])
    if overrides is None:
        effective, given = requested, None
    else:
        saved = read_saved_config(run_dir, under=at_checkpoint) or at_checkpoint
        given = keys_given(overrides, saved_choices)
        effective = apply_given(saved, requested, given)
    effective = load_config(effective)
    changes = changes_between(at_checkpoint, effective)

    def origin(key: str) -> str:
        if given is None or any(key == g or key.startswith(g + ".") for g in given):
            return ""
        return f", edited in {run_dir / CONFIG_FILE}"

    refused = [
        f"{key} {old} -> {new} ({FIXED_ON_RESUME[key]}{origin(key)})" for key, (old, new) in changes.items()
        if key in FIXED_ON_RESUME
    ] + [
        f"{key} {old} -> {new} (used only to initialise the weights: it would have no effect{origin(key)})"
        for key, (old, new) in changes.items() if key in INIT_ONLY
    ]
    if refused:
        raise CheckpointError(
            f"cannot resume {run_dir} with {'; '.join(refused)}; keep the run's value, or start a new run "
            f"folder (another hydra.run.dir)"
        )
    return effective, changes
