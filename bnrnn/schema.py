"""Every setting of a run, written once: its type, its default, its rule and its role.

The dataclasses here are the single source of the configuration. A key's default is the
one ``bnrnn train`` runs with when nothing chooses otherwise; the YAML files of ``conf/``
hold only what an option changes from these defaults (``model=lstm`` switches the norms
off), so a default is never written twice. Each key's :func:`setting` also declares

- ``rule``: the range check :func:`bnrnn.config.validate` applies (:data:`RULES`);
- ``choices``: the allowed values, or a function returning them from the registry that
  defines them (the backends, the norms, the tasks);
- ``fixed``: why a resume must not change it (:mod:`bnrnn.resume`);
- ``init_only``: it only initialises the weights, so a resume that changes it is refused;
- ``layer_arg``: the :class:`bnrnn.BNLSTM` keyword it is passed as.

A task's own keys live in its module (``Settings``, a subclass of :class:`TaskConfig`), and
the schema of a run takes the ``Settings`` of its ``task.kind`` (:func:`schema_for`).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

SHAPE = "the checkpoint's weights have another shape or meaning"
TRAINED_WITH = "the normalisation the weights were trained with"


def setting(default: Any, *, rule: str | None = None, choices: tuple | Callable[[], tuple] | None = None,
            fixed: str | None = None, init_only: bool = False, layer_arg: str | None = None) -> Any:
    """A dataclass field with the key's declared role (see the module's docstring)."""
    meta = {"rule": rule, "choices": choices, "fixed": fixed, "init_only": init_only, "layer_arg": layer_arg}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


# rule name -> (test, what the key must be)
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "positive": (lambda v: v > 0 and _finite(v), "a positive number"),
    "positive_or_null": (lambda v: v is None or v > 0, "a positive number or null"),
    "non_negative": (lambda v: v >= 0, "zero or more"),
    "unit_interval": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "open_unit_interval": (lambda v: 0 < v < 1, "in (0, 1)"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1) (a momentum of 1 or more never forgets a gradient: the steps "
                                       "grow without bound)"),
}


def _backends() -> tuple:
    from bnrnn.nn.backends import names

    return names()


def _norms() -> tuple:
    from bnrnn.nn.norms import NORMS

    return tuple(NORMS)


def _inits() -> tuple:
    from bnrnn.nn.lstm import INITS

    return INITS


def _task_kinds() -> tuple:
    from bnrnn.tasks import task_kinds

    return task_kinds()


STATISTICS_MODES = ("batch", "ema", "reestimated")


@dataclass
class DataConfig:
    root: str = "~/.cache/bnrnn/data"
    download: bool = True


@dataclass
class TaskConfig:
    """The keys every task has; a task's module adds its own (``Settings``)."""

    name: str = setting("seqmnist", fixed="the checkpoint was trained on another task")
    kind: str = setting("mnist", choices=_task_kinds, fixed="the checkpoint was trained on another task")
    batch_size: int = setting(100, rule="positive", fixed="the checkpoint's place in the data is counted in batches")
    eval_batch_size: int = setting(1000, rule="positive")


@dataclass
class NormalizedTerms:
    """Which terms ``model.norm`` normalises: W_x x, W_h h, c_t (the paper's BN-LSTM: all
    three; none: the plain LSTM)."""

    x: bool = setting(True, fixed=SHAPE, layer_arg="norm_terms")
    h: bool = setting(True, fixed=SHAPE, layer_arg="norm_terms")
    c: bool = setting(True, fixed=SHAPE, layer_arg="norm_terms")


@dataclass
class ModelConfig:
    """The recurrent model; the default is the paper's BN-LSTM (``model=bnlstm``)."""

    name: str = setting("bnlstm", fixed=SHAPE)
    hidden_size: int = setting(100, rule="positive", fixed=SHAPE)
    # stacked layers, each reading the one below (per-layer, per-direction statistics)
    num_layers: int = setting(1, rule="positive", fixed=SHAPE)
    # a reverse direction in every layer (classification only: not for a language model)
    bidirectional: bool = setting(False, fixed=SHAPE)
    normalize: NormalizedTerms = field(default_factory=NormalizedTerms)
    # initial gain of every normalisation (the paper's key finding: 0.1, not 1)
    gamma_init: float = setting(0.1, rule="positive", init_only=True, layer_arg="gamma_init")
    # EMA rate of the population statistics (paper: 0.01 MNIST, 0.05 PTB); not the optimiser's
    # trainer.momentum
    stats_momentum: float = setting(0.01, rule="unit_interval", layer_arg="momentum")
    eps: float = setting(1e-5, rule="positive", fixed=TRAINED_WITH, layer_arg="eps")
    # the fewest running sequences a step's batch statistics are taken over; at a step with
    # fewer (the tail of a variable-length batch) the norms use the population's
    stats_min_sequences: int = setting(1, rule="positive", layer_arg="stats_min_sequences")
    forget_bias: float = setting(1.0, init_only=True, layer_arg="forget_bias")
    # std of the noise on the learned h0 wherever the statistics come from the batch: MNIST's
    # leading black pixels otherwise give every example the same state, zero batch variance
    # for W_h h, and a gradient that overflows (0 for a model without batch statistics)
    h0_noise: float = setting(0.1, rule="non_negative", layer_arg="h0_noise")
    # population-statistics slots; null = the task's training length
    t_max: Optional[int] = setting(None, rule="positive_or_null", fixed=SHAPE)
    # orthogonal (each gate block) | identity_g (the authors' --init id)
    init: str = setting("orthogonal", choices=_inits, init_only=True, layer_arg="init")
    # a language model's input: null = one-hot (the vocabulary's width)
    embedding_size: Optional[int] = setting(None, rule="positive_or_null", fixed=SHAPE)
    # which implementation runs the recurrence (bnrnn.nn.backends); all compute the same function
    backend: str = setting("auto", choices=_backends, layer_arg="backend")
    # batch (Cooijmans et al.) | layer (Ba et al.: model=lnlstm) | rms; which terms: normalize.x|h|c
    norm: str = setting("batch", choices=_norms, fixed=TRAINED_WITH, layer_arg="norm")
    # triton backend: replay each training sequence shape as captured CUDA graphs
    cuda_graphs: bool = setting(True, layer_arg="cuda_graphs")


@dataclass
class TrainerConfig:
    """The optimiser and the training loop; the default is the paper's text for MNIST:
    RMSProp lr 1e-3 with "0.9 momentum" (decay: torch's 0.99), global-norm clipping 1.0."""

    optimizer: str = setting("rmsprop", choices=("rmsprop", "adam", "sgd"),
                             fixed="the optimiser state in the checkpoint belongs to the other optimiser")
    lr: float = setting(1e-3, rule="positive")
    momentum: float = setting(0.9, rule="momentum")  # RMSProp's and SGD's
    rmsprop_alpha: float = setting(0.99, rule="open_unit_interval")  # decay of the mean square
    rmsprop_eps: float = setting(1e-8, rule="positive")  # added to its square root
    betas: list[float] = setting([0.9, 0.999])  # Adam's
    weight_decay: float = setting(0.0, rule="non_negative")
    clip_norm: Optional[float] = setting(1.0, rule="positive_or_null")  # global gradient norm; null = none
    max_steps: Optional[int] = setting(None, rule="positive_or_null")  # when set, wins over max_epochs
    max_epochs: Optional[int] = setting(200, rule="positive_or_null")
    eval_every: int = setting(500, rule="positive")  # steps between validations (the whole validation set)
    # steps between validations in every mode of valid_stats (a multiple of eval_every); the
    # validations between them score select_on alone; null = every mode at every validation
    valid_stats_every: Optional[int] = setting(None, rule="positive_or_null")
    eval_batches: Optional[int] = setting(None, rule="positive_or_null")  # validate on the first N batches only
    log_every: int = setting(20, rule="positive")
    checkpoint_every: Optional[int] = setting(None, rule="positive_or_null")  # null = at every validation
    # wall-clock budget of this launch (2h50m, 45m, 3600 seconds, DD:HH:MM:SS; null = none): at
    # the first step boundary past it the run writes its checkpoint, says how to continue, and
    # exits 0; each resume counts its own budget
    max_time: Optional[str] = setting(None)
    # 32 | bf16: forward passes under torch.autocast(bf16) (bnrnn.device.precision_context)
    precision: str = setting("32", choices=("32", "bf16"))
    max_bad_steps: int = setting(5, rule="positive")  # consecutive non-finite steps (skipped) before a stop
    resume: bool = setting(False)
    progress: str = setting("auto", choices=("auto", "on", "off"))  # tqdm bar (auto: on a terminal, not in multirun)
    test_at_end: bool = setting(True)  # evaluate the best checkpoint on the test set when training ends
    # before testing, re-estimate the population statistics with the weights frozen, as the
    # authors did for their final numbers (the EMA test numbers are kept too)
    reestimate_stats: bool = setting(False)
    reestimate_batches: Optional[int] = setting(None, rule="positive_or_null")  # null = the whole training set
    reestimate_batch_size: Optional[int] = setting(None, rule="positive_or_null")  # null = task.batch_size
    # statistics each validation runs with, each logged under its own key: batch (every batch
    # normalised with its own statistics), ema (the population kept in training), reestimated
    # (re-estimated over valid_reestimate_batches training batches, the training untouched)
    valid_stats: list[str] = setting(list(STATISTICS_MODES))
    # the mode whose score is valid/<metric> and picks the best checkpoint (the authors': batch)
    select_on: str = setting("batch", choices=STATISTICS_MODES,
                             fixed="the best checkpoint so far was chosen on the other statistics")
    valid_reestimate_batches: int = setting(50, rule="positive")


@dataclass
class DeviceConfig:
    name: str = setting("auto", choices=("auto", "cpu", "cuda"))  # auto: CUDA when available


@dataclass
class TrainConfig:
    seed: int = setting(1, rule="non_negative", fixed="the data order and every random draw of the run follow it")
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)


def declared(schema: Any, prefix: str = "") -> Iterator[tuple[str, dict]]:
    """(dotted key, metadata) for every leaf of a schema dataclass (type or instance); a
    node's own dataclass is followed where ``schema`` is an instance (a task's Settings)."""
    for f in dataclasses.fields(schema):
        node = getattr(schema, f.name, None) if not isinstance(schema, type) else None
        if node is None and f.default_factory is not dataclasses.MISSING:
            node = f.default_factory()
        if dataclasses.is_dataclass(node):
            yield from declared(node, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", _metadata(schema, f)


def _metadata(schema: Any, f: dataclasses.Field) -> dict:
    """The field's declared role; a subclass that only changes a default (``name: str =
    "ptb"`` in a task's Settings) keeps the role its base class declared."""
    cls = schema if isinstance(schema, type) else type(schema)
    for base in cls.__mro__:
        if dataclasses.is_dataclass(base):
            found = {g.name: g for g in dataclasses.fields(base)}.get(f.name)
            if found is not None and found.metadata:
                return dict(found.metadata)
    return {}


def every_declared() -> dict[str, dict]:
    """{key: metadata} over the schema and every registered task's own keys."""
    from bnrnn.tasks import task_classes

    keys = dict(declared(TrainConfig))
    for cls in task_classes():
        keys.update(declared(cls.Settings, "task."))
    return keys


def keys_where(role: str) -> dict[str, Any]:
    """{key: value of ``role``} for every declared key that has it (``fixed``, ``init_only``...)."""
    return {key: meta[role] for key, meta in every_declared().items() if meta.get(role)}


def choices_of(meta: dict) -> tuple | None:
    choices = meta.get("choices")
    return choices() if callable(choices) else choices


def normalized_terms(model_cfg: Any) -> tuple[str, ...]:
    """The terms a model config normalises, of "x", "h" and "c" (``model.normalize.*``)."""
    return tuple(term for term in ("x", "h", "c") if model_cfg.normalize[term])


def layer_arguments(model_cfg: Any) -> dict[str, Any]:
    """The :class:`bnrnn.BNLSTM` keywords a model config sets (``layer_arg`` keys); the
    ``model.normalize`` switches become one ``norm_terms``."""
    out = {}
    for key, meta in declared(ModelConfig):
        if meta.get("layer_arg") and meta["layer_arg"] != "norm_terms":
            value = model_cfg
            for part in key.split("."):
                value = value[part]
            out[meta["layer_arg"]] = value
    out["norm_terms"] = normalized_terms(model_cfg)
    return out


def yaml_folder() -> str:
    """Absolute path of the YAML options (conf/): bnrnn/conf in a wheel, <repo>/conf from source."""
    spec = importlib.util.find_spec("bnrnn.conf")
    if spec is not None and spec.submodule_search_locations:
        return str(Path(next(iter(spec.submodule_search_locations))).resolve())
    return str(Path(__file__).resolve().parents[1] / "conf")
