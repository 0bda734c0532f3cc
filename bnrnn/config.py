"""The typed configuration schema and its checks.

Hydra composes the YAML in conf/, which holds only what each option changes;
:func:`typed_config` merges the result onto the schema of :mod:`bnrnn.schema`, where every
key, its default and its rule are written once (so a wrong type or an unknown key fails at
start-up), and :func:`validate` checks the rules. Both raise :class:`ConfigError` with one
sentence naming the key.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from bnrnn.durations import parse_duration
from bnrnn.errors import BnrnnError, ConfigError, first_line
from bnrnn.schema import (RULES, STATISTICS_MODES, TaskConfig, TrainConfig, choices_of, declared, normalized_terms,
                          yaml_folder)
from bnrnn.tasks import task_class, task_classes, task_kinds

__all__ = ["GROUPS", "STATISTICS_MODES", "TrainConfig", "load_config", "read_run_config", "typed_config", "validate"]

log = logging.getLogger("bnrnn")


def schema_for(cfg: DictConfig | dict | None = None) -> DictConfig:
    """The typed schema of a run: :class:`~bnrnn.schema.TrainConfig` with the ``Settings`` of
    its ``task.kind`` (none given: the schema's default task); ConfigError for a kind no task
    registers."""
    given = OmegaConf.create(cfg) if cfg is not None else OmegaConf.create()
    kind = OmegaConf.select(given, "task.kind", default=None)
    if kind is not None and not isinstance(kind, str):
        raise ConfigError(f"task.kind={kind} is invalid: it must be one of {', '.join(task_kinds())}")
    name = OmegaConf.select(given, "task.name", default=None)
    owner = next((cls for cls in task_classes() if name in cls.presets), None)
    if kind is not None and owner is not None and owner.kind != kind:
        # before the kind's schema refuses the preset's own keys (a seqmnist config's task.permute)
        raise ConfigError(_identity_refusal("task.kind", kind, owner.kind, name))
    return OmegaConf.structured(TrainConfig(task=task_class(kind or TaskConfig.kind).Settings()))


def _identity_refusal(key: str, value: Any, wanted: Any, name: str) -> str:
    shown = str(wanted).lower() if isinstance(wanted, bool) else wanted
    return (f"{key}={value} is invalid: it must be {shown} for task.name={name} (choose another task with task=..., "
            f"which sets both)")


def typed_config(cfg: DictConfig | dict) -> DictConfig:
    """Merge a composed config onto the schema; ConfigError on a wrong type or unknown key."""
    schema = None
    try:
        schema = schema_for(cfg)
        merged = OmegaConf.merge(schema, cfg)
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        if isinstance(exc, ConfigKeyError) and schema is not None and str(key).startswith("task."):  # another task's
            kind = schema.task.kind
            own = ", ".join(k for k in schema.task if k not in ("name", "kind"))
            raise ConfigError(f"{key} is not a setting of task.kind={kind} (its settings: {own})") from exc
        reason = first_line(exc)
        raise ConfigError(f"bad config value for '{key}': {reason}" if key else f"bad config: {reason}") from exc
    return merged


def config_dir() -> str:
    """Absolute path of the Hydra configs, bnrnn/conf in a wheel, <repo>/conf from source,
    with the schema registered (:func:`register_schema_with_hydra`): every caller composes next."""
    register_schema_with_hydra()
    return yaml_folder()


@functools.cache  # once a process: every compose calls config_dir()
def register_schema_with_hydra() -> None:
    """Give Hydra's composition every key with its default (untyped: the types and rules stay
    :func:`typed_config`'s and :func:`validate`'s one sentence): ``bnrnn_schema``, the root
    that ``conf/train.yaml`` starts from, and ``task_schema/<kind>``, each task's keys, which
    its YAML file places under ``task`` (``- /task_schema/mnist@_here_``). So any key can be
    overridden on the command line although the YAML holds only what each option changes."""
    from hydra.core.config_store import ConfigStore

    if not OmegaConf.has_resolver("bnrnn_config_groups"):  # bnrnn train --help: the groups a user picks from
        OmegaConf.register_new_resolver("bnrnn_config_groups", config_groups_text)
    store = ConfigStore.instance()
    root = OmegaConf.to_container(OmegaConf.structured(TrainConfig))
    del root["task"]  # each task's own, from its group option
    store.store(name="bnrnn_schema", node=root)
    for cls in task_classes():
        store.store(group="task_schema", name=cls.kind, node=OmegaConf.to_container(OmegaConf.structured(cls.Settings)))


# The config groups of conf/: one option each on the command line (``model=lstm``).
GROUPS = ("task", "model", "trainer", "device", "experiment")


def config_groups_text() -> str:
    """'task: adding, pmnist, ...' a line per group of :data:`GROUPS`, for the help text (the
    schema's own task_schema group is not a choice)."""
    folder = Path(yaml_folder())
    return "\n".join(f"{group}: {', '.join(sorted(p.stem for p in (folder / group).glob('*.yaml')))}"
                     for group in sorted(GROUPS))
# The seed also seeds each epoch's data order as seed * 1_000_003 + epoch, a 64-bit integer.
MAX_SEED = 2**32 - 1


def validate(cfg: DictConfig) -> None:
    """Range checks; the first failure raises ConfigError naming the key and the rule.

    Each key's own rule and allowed values are declared with it (:mod:`bnrnn.schema`); the
    rules between keys follow here, then the task's own (its ``check``)."""

    def get(key: str) -> Any:
        return OmegaConf.select(cfg, key)

    def bad(key: str, rule: str) -> None:
        raise ConfigError(f"{key}={get(key)} is invalid: it must be {rule}")

    # First, since a NaN or an infinity passes every comparison below in one direction or
    # the other (momentum=inf is "zero or more"), and only shows up later as a diverged loss.
    for key, value in leaves(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value} is invalid: it must be a finite number")
    task = task_class(cfg.task.kind)
    for key, meta in [*declared(TrainConfig), *declared(task.Settings, "task.")]:
        allowed = choices_of(meta)
        if allowed is not None and get(key) not in allowed:
            bad(key, "one of " + ", ".join(allowed))
        if meta.get("rule"):
            test, rule = RULES[meta["rule"]]
            if not test(get(key)):
                bad(key, rule)
    if get("seed") > MAX_SEED:
        bad("seed", f"at most {MAX_SEED}")
    for key, value in task.presets.get(get("task.name"), {}).items():  # what makes the preset that task
        if get(f"task.{key}") != value:
            raise ConfigError(_identity_refusal(f"task.{key}", get(f"task.{key}"), value, get("task.name")))
    betas = get("trainer.betas")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        bad("trainer.betas", "two numbers in [0, 1)")
    modes = list(get("trainer.valid_stats"))
    if not modes or any(mode not in STATISTICS_MODES for mode in modes) or len(set(modes)) < len(modes):
        bad("trainer.valid_stats", "a list of distinct modes from " + ", ".join(STATISTICS_MODES))
    if get("trainer.select_on") not in modes:
        bad("trainer.select_on", "one of the modes in trainer.valid_stats (" + ", ".join(modes) + ")")
    every = get("trainer.valid_stats_every")
    if every is not None and every % get("trainer.eval_every"):
        bad("trainer.valid_stats_every", f"a multiple of trainer.eval_every ({get('trainer.eval_every')}) or null")
    if get("trainer.max_time") is not None:
        try:
            parse_duration(get("trainer.max_time"))
        except ValueError as exc:
            bad("trainer.max_time", f"{exc} (or null)")
    if get("trainer.max_steps") is None and get("trainer.max_epochs") is None:
        bad("trainer.max_steps", "set when trainer.max_epochs is null")
    task.check(cfg, bad)
    if cfg.model.bidirectional and task.language_model:
        bad("model.bidirectional", "false for a language model (it predicts the next symbol, which a reverse "
            "direction would already have read)")
    if cfg.task.batch_size < 2 and cfg.model.norm == "batch" and normalized_terms(cfg.model):
        bad("task.batch_size", "at least 2 with batch norm (a batch of one has no variance)")


def leaves(cfg: DictConfig, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) for every leaf of ``cfg``; a list is one leaf, its items checked too."""
    out = []
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if isinstance(value, DictConfig):
            out.extend(leaves(value, path + "."))
        else:
            out.append((path, value))
            if OmegaConf.is_list(value):
                out.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return out


# Keys renamed since runs were first saved: old dotted key -> new one. A saved config (a
# run's config.yaml, a checkpoint's) is read under the new names, so an older run resumes,
# evaluates and reports with the settings it was trained with.
RENAMED = {
    "model.bn.x": "model.normalize.x",  # the switches also turn on layer and RMS norm
    "model.bn.h": "model.normalize.h",
    "model.bn.c": "model.normalize.c",
    "model.momentum": "model.stats_momentum",  # the statistics' EMA rate, not the optimiser's
}


def with_current_names(saved: DictConfig | dict) -> DictConfig:
    """A copy of a saved config with every :data:`RENAMED` key under its new name (a key
    that already has its new name is left as it is)."""
    saved = OmegaConf.create(saved) if isinstance(saved, dict) else saved.copy()
    for old, new in RENAMED.items():
        value = OmegaConf.select(saved, old, default=None, throw_on_missing=False)
        if value is None:
            continue
        if OmegaConf.select(saved, new, default=None) is None:
            OmegaConf.update(saved, new, value, force_add=True)
        parent, _, leaf = old.rpartition(".")
        node = OmegaConf.select(saved, parent)
        del node[leaf]
        if not node and parent.count("."):  # model.bn emptied: remove it
            grand, _, name = parent.rpartition(".")
            del OmegaConf.select(saved, grand)[name]
    return saved


def without_unknown_keys(saved: DictConfig | dict) -> tuple[DictConfig, list[str]]:
    """A saved config (a run's config.yaml, a checkpoint's) under this version's names
    (:func:`with_current_names`) and without the keys the schema does not have (a setting
    since removed), and the keys dropped, so that older runs can still be resumed and
    evaluated."""
    saved = with_current_names(saved)
    try:
        schema = schema_for(saved)
    except ConfigError:  # a task this version does not have: typed_config names it
        schema = schema_for()
    # Before each task had its own keys, every config held all tasks' (a seqMNIST run's
    # task.seq_len): those are dropped without a word.
    other_tasks = {key for cls in task_classes() for key, _ in declared(cls.Settings, "task.")}
    dropped = []

    def prune(node: DictConfig, known, prefix: str) -> None:
        for key in list(node.keys()):
            if key not in known:
                if prefix + str(key) not in other_tasks:
                    dropped.append(prefix + str(key))
                del node[key]
            elif isinstance(node[key], DictConfig) and isinstance(known[key], DictConfig):
                prune(node[key], known[key], f"{prefix}{key}.")

    prune(saved, schema, "")
    return saved, dropped


def read_yaml_mapping(path, remedy: str) -> DictConfig:
    """A YAML file of settings (a run's config.yaml); ConfigError naming the file and ``remedy``
    if it cannot be read, is not YAML, or is not a mapping."""
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # OSError, yaml's and OmegaConf's errors: no common base
        raise ConfigError(f"{path} is not a readable config ({first_line(exc)}); {remedy}") from exc
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path} does not hold a mapping of settings; {remedy}")
    return loaded


def read_saved_settings(path, remedy: str) -> DictConfig:
    """A run's saved settings (its config.yaml): :func:`read_yaml_mapping`, then without the
    keys this version no longer has (:func:`without_unknown_keys`), which a warning names."""
    settings, dropped = without_unknown_keys(read_yaml_mapping(path, remedy))
    if dropped:
        log.warning("%s: settings this version no longer has are ignored: %s", path, ", ".join(dropped))
    return settings


def read_run_config(run_dir, tool: str) -> DictConfig:
    """RUN_DIR/config.yaml for a command that reads a finished run (``tool``: "bnrnn eval", ...);
    BnrnnError if the folder holds none."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise BnrnnError(f"{run_dir} is not a bnrnn run folder (no config.yaml)")
    remedy = f"fix it: {tool} reads the run's settings from it"
    settings = read_saved_settings(path, remedy)
    try:
        typed_config(settings)  # a wrong value is named with its file here, not later without it
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}; {remedy}") from None
    return settings


def load_config(cfg: DictConfig | dict) -> DictConfig:
    """typed_config + validate: the one entry point for a composed config."""
    typed = typed_config(cfg)
    validate(typed)
    return typed
