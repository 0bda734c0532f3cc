"""The typed configuration schema and its checks.

Hydra composes the YAML in conf/; :func:`typed_config` merges the result onto these
dataclasses (so a wrong type or an unknown key fails at start-up) and :func:`validate`
checks ranges. Both raise :class:`ConfigError` with one sentence naming the key.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bnrnn.durations import parse_duration
from bnrnn.errors import BnrnnError, ConfigError, first_line

log = logging.getLogger("bnrnn")


@dataclass
class DataConfig:
    root: str = "~/.cache/bnrnn/data"
    download: bool = True


@dataclass
class TaskConfig:
    name: str = "seqmnist"
    kind: str = "mnist"  # mnist | ptb
    batch_size: int = 100
    eval_batch_size: int = 1000
    # MNIST
    permute: bool = False
    permutation_seed: int = 0
    permutation_with_replacement: bool = False
    valid_size: int = 10000
    train_limit: Optional[int] = None
    # PTB
    seq_len: int = 100
    eval_chunk: int = 100


@dataclass
class BNSwitches:
    x: bool = True
    h: bool = True
    c: bool = True


@dataclass
class ModelConfig:
    name: str = "bnlstm"
    hidden_size: int = 100
    num_layers: int = 1
    bidirectional: bool = False
    bn: BNSwitches = field(default_factory=BNSwitches)
    gamma_init: float = 0.1
    momentum: float = 0.01
    eps: float = 1e-5
    forget_bias: float = 1.0
    h0_noise: float = 0.0
    t_max: Optional[int] = None
    init: str = "orthogonal"  # orthogonal | identity_g (the authors' --init id)
    embedding_size: Optional[int] = None
    backend: str = "auto"  # auto | triton | cpu | aten | reference (bnrnn.nn.backends)
    norm: str = "batch"  # batch (Cooijmans et al.) | layer (Ba et al.: lnlstm)
    cuda_graphs: bool = True


@dataclass
class TrainerConfig:
    optimizer: str = "rmsprop"  # rmsprop | adam | sgd
    lr: float = 1e-3
    momentum: float = 0.9
    rmsprop_alpha: float = 0.99
    rmsprop_eps: float = 1e-8
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    clip_norm: Optional[float] = 1.0
    max_steps: Optional[int] = None
    max_epochs: Optional[int] = 200
    eval_every: int = 500
    valid_stats_every: Optional[int] = None
    eval_batches: Optional[int] = None
    log_every: int = 20
    checkpoint_every: Optional[int] = None
    max_time: Optional[str] = None
    max_bad_steps: int = 5
    resume: bool = False
    progress: str = "auto"  # auto | on | off
    test_at_end: bool = True
    reestimate_stats: bool = False
    reestimate_batches: Optional[int] = None
    reestimate_batch_size: Optional[int] = None
    valid_stats: list[str] = field(default_factory=lambda: ["batch", "ema", "reestimated"])
    select_on: str = "batch"
    valid_reestimate_batches: int = 50


@dataclass
class DeviceConfig:
    name: str = "auto"  # auto | cpu | cuda


@dataclass
class TrainConfig:
    seed: int = 1
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)


def typed_config(cfg: DictConfig | dict) -> DictConfig:
    """Merge a composed config onto the schema; ConfigError on a wrong type or unknown key."""
    schema = OmegaConf.structured(TrainConfig)
    try:
        merged = OmegaConf.merge(schema, cfg)
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        reason = first_line(exc)
        raise ConfigError(f"bad config value for '{key}': {reason}" if key else f"bad config: {reason}") from exc
    return merged


# The config groups of conf/: one option each on the command line (``model=lstm``).
GROUPS = ("task", "model", "trainer", "device", "experiment")

CHOICES = {
    "task.kind": ("mnist", "ptb"),
    "trainer.optimizer": ("rmsprop", "adam", "sgd"),
    "trainer.progress": ("auto", "on", "off"),
    "device.name": ("auto", "cpu", "cuda"),
    "model.init": ("orthogonal", "identity_g"),
    "model.backend": ("auto", "triton", "cpu", "aten", "reference"),
    "model.norm": ("batch", "layer", "rms"),  # bnrnn.nn.norms.NORMS
    "trainer.select_on": ("batch", "ema", "reestimated"),
}
STATISTICS_MODES = CHOICES["trainer.select_on"]
POSITIVE = (
    "task.batch_size", "task.eval_batch_size", "task.seq_len", "task.eval_chunk",
    "model.hidden_size", "model.num_layers", "model.gamma_init", "model.eps", "trainer.lr",
    "trainer.eval_every", "trainer.log_every", "trainer.max_bad_steps", "trainer.valid_reestimate_batches",
    "trainer.rmsprop_eps", "task.valid_size",
)
POSITIVE_OR_NULL = (
    "model.t_max", "model.embedding_size", "trainer.max_steps", "trainer.max_epochs",
    "trainer.eval_batches", "trainer.checkpoint_every", "trainer.valid_stats_every", "trainer.reestimate_batches",
    "trainer.reestimate_batch_size", "trainer.clip_norm", "task.train_limit",
)
NON_NEGATIVE = ("seed", "task.permutation_seed", "model.h0_noise", "trainer.weight_decay", "trainer.momentum")
# What each task's name stands for: the keys that make it that task (conf/task/*.yaml), which
# an override must not turn into another task while the name (and every table) says this one.
TASK_IDENTITY = {
    "seqmnist": {"task.kind": "mnist", "task.permute": False},
    "pmnist": {"task.kind": "mnist", "task.permute": True},
    "ptb": {"task.kind": "ptb"},
}
# The seed also seeds each epoch's data order as seed * 1_000_003 + epoch, a 64-bit integer.
MAX_SEED = 2**32 - 1
UNIT_INTERVAL = ("model.momentum",)  # (0, 1]


def validate(cfg: DictConfig) -> None:
    """Range checks; the first failure raises ConfigError naming the key and the rule."""

    def get(key: str) -> Any:
        return OmegaConf.select(cfg, key)

    def bad(key: str, rule: str) -> None:
        raise ConfigError(f"{key}={get(key)} is invalid: it must be {rule}")

    # First, since a NaN or an infinity passes every comparison below in one direction or
    # the other (momentum=inf is "zero or more"), and only shows up later as a diverged loss.
    for key, value in leaves(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value} is invalid: it must be a finite number")
    for key, allowed in CHOICES.items():
        if get(key) not in allowed:
            bad(key, "one of " + ", ".join(allowed))
    for key in POSITIVE:
        if not get(key) > 0 or (isinstance(get(key), float) and not math.isfinite(get(key))):
            bad(key, "a positive number")
    for key in POSITIVE_OR_NULL:
        if get(key) is not None and not get(key) > 0:
            bad(key, "a positive number or null")
    for key in NON_NEGATIVE:
        if not get(key) >= 0:
            bad(key, "zero or more")
    if get("seed") > MAX_SEED:
        bad("seed", f"at most {MAX_SEED}")
    for key in UNIT_INTERVAL:
        if not 0 < get(key) <= 1:
            bad(key, "in (0, 1]")
    for key, value in TASK_IDENTITY.get(get("task.name"), {}).items():
        if get(key) != value:
            shown = str(value).lower() if isinstance(value, bool) else value
            bad(key, f"{shown} for task.name={get('task.name')} (choose another task with task=..., which sets "
                     f"both)")
    if not get("trainer.momentum") < 1:
        bad("trainer.momentum", "in [0, 1) (a momentum of 1 or more never forgets a gradient: the steps grow "
                                "without bound)")
    if not 0 < get("trainer.rmsprop_alpha") < 1:
        bad("trainer.rmsprop_alpha", "in (0, 1)")
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
    if cfg.task.kind == "ptb" and cfg.task.seq_len < 2:
        bad("task.seq_len", "at least 2 for PTB (a window of L characters gives L - 1 predictions)")
    if cfg.model.bidirectional and cfg.task.kind == "ptb":
        bad("model.bidirectional", "false for a language model (it predicts the next symbol, which a reverse "
            "direction would already have read)")
    if cfg.task.batch_size < 2 and cfg.model.norm == "batch" and (cfg.model.bn.x or cfg.model.bn.h or cfg.model.bn.c):
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


def without_unknown_keys(saved: DictConfig | dict) -> tuple[DictConfig, list[str]]:
    """A saved config (a run's config.yaml, a checkpoint's) without the keys this version of
    the schema does not have (a setting since renamed or removed), and the keys dropped, so
    that older runs can still be resumed and evaluated."""
    schema = OmegaConf.structured(TrainConfig)
    saved = OmegaConf.create(saved) if isinstance(saved, dict) else saved.copy()
    dropped = []

    def prune(node: DictConfig, known, prefix: str) -> None:
        for key in list(node.keys()):
            if key not in known:
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
