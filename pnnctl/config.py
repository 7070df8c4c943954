"""One frozen config per run, from defaults < ``--config`` TOML < flags < ``--set key=value``.

Everything is validated here, once, with one-line errors that name the field and what is allowed.
TOML files are parsed (``tomllib``), never evaluated; ``--set`` values are read as TOML scalars
(``--set lr=0.1``, ``--set ist.variant='sharded'`` or ``--set ist.variant=sharded``).

A TOML file holds top-level run fields, a ``[synthetic]`` table for the synthetic dataset and one
table per strategy for its options::

    strategy = "ist"
    workers = 4
    [ist]
    local_steps = 20
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pnnctl.errors import UsageError


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    """The ``synthetic`` dataset: Gaussian inputs labelled by a seeded random teacher network."""

    samples: int = 10000
    """training + test samples (test is 20%)"""
    dim: int = 64
    """input dimension"""
    classes: int = 10
    """number of classes"""
    teacher_width: int = 128
    """hidden width of the teacher network"""
    noise: float = 0.0
    """probability that a label is replaced by a random one"""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything that defines one run. Per-worker quantities say so."""

    strategy: str = "centralized"
    """training strategy (pnnctl list strategies)"""
    dataset: str = "mnist-small"
    """dataset (pnnctl list datasets)"""
    model: str = "mlp"
    """model spec, such as mlp:784-512-512-10 or lenet (pnnctl list models)"""
    workers: int = 4
    """logical workers N (centralized always uses 1)"""
    epochs: float = 5.0
    """training budget in passes over the training set (all workers together)"""
    batch_size: int = 32
    """samples per worker per step"""
    lr: float = 0.05
    """learning rate"""
    optimizer: str = "sgd"
    """sgd | adam | adamw"""
    momentum: float = 0.0
    """SGD momentum"""
    weight_decay: float = 0.0
    """L2 weight decay"""
    seed: int = 0
    """seed of model init, data order and every strategy's randomness"""
    device: str = "auto"
    """auto | cpu | cuda | cuda:K"""
    sharding: str = "iid"
    """how training data is split over workers: iid | dirichlet:ALPHA | by-class"""
    data_dir: str = ""
    """folder of file-backed datasets (default: $PNNCTL_DATA)"""
    download: bool = False
    """download file-backed datasets through torchvision"""
    eval_every: float = 1.0
    """evaluate every this many epochs (and at the end)"""
    target_acc: float = 0.0
    """test accuracy in (0, 1] whose first crossing is reported (0: none)"""
    network: str = "lan-1g"
    """network model for projected time: lan-1g | dc-10g | dc-100g | wan | edge | LATENCY,BANDWIDTH"""
    budget: str = "epochs"
    """stop at the first of: epochs, or samples=N | bytes=N | seconds=N (besides --epochs)"""
    out: str = "results"
    """results folder"""
    run_name: str = ""
    """run folder name (default: STRATEGY-wN-sSEED)"""
    variant: str = ""
    """label of the option values a compare grid varies for this run (set by compare --vary)"""
    checkpoint_every: int = 1
    """rounds between checkpoints"""
    nproc: int = 1
    """local processes to launch (torch.distributed); 1 runs simulated"""
    backend: str = "auto"
    """torch.distributed backend: auto (gloo on CPU, nccl on CUDA) | gloo | nccl"""
    timeout_s: float = 60.0
    """seconds after which a dead or hung rank ends the run"""
    precision: str = "fp32"
    """fp32 | tf32 (CUDA only) | bf16 (autocast, on CUDA or the CPU)"""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """options of the synthetic dataset"""
    options: Mapping[str, Any] = field(default_factory=dict)
    """options of the chosen strategy (a table named after it in TOML; --set STRATEGY.KEY=V)"""

    def with_updates(self, **changes: Any) -> RunConfig:
        return validate(dataclasses.replace(self, **changes))

    @property
    def run_id(self) -> str:
        return self.run_name or f"{self.strategy}-w{self.effective_workers}-s{self.seed}"

    @property
    def effective_workers(self) -> int:
        from strategies import get_strategy

        return 1 if get_strategy(self.strategy).single_worker else self.workers

    def strategy_options(self) -> Any:
        """The chosen strategy's options dataclass, filled from ``options``."""
        from strategies import get_strategy

        cls = get_strategy(self.strategy)
        return build_dataclass(cls.Options, dict(self.options), prefix=self.strategy)


OPTIMIZERS = ("sgd", "adam", "adamw")
FLOAT32_MAX = 3.4028234663852886e38
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "tf32", "bf16")
BACKENDS = ("auto", "gloo", "nccl")
BUDGET_KINDS = ("samples", "bytes", "seconds")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Check and convert one value to the declared field type (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return coerce(value, args[0], name)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise UsageError(name, f"must be true or false, not {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(name, f"must be an integer, not {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UsageError(name, f"must be a number, not {value!r}")
        try:
            finite = math.isfinite(value)
        except OverflowError:
            finite = False
        if not finite:
            raise UsageError(name, f"must be a finite number, not {str(value)[:40]}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UsageError(name, f"must be a string, not {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise UsageError(name, f"must be a list, not {value!r}")
        (item_type, *_rest) = typing.get_args(tp)
        return tuple(coerce(v, item_type, name) for v in value)
    return value


def build_dataclass(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    """Build ``cls`` from a mapping, refusing unknown keys and values of the wrong type."""
    types_by_name = _field_types(cls)
    unknown = sorted(set(values) - set(types_by_name))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        allowed = ", ".join(types_by_name) or "no options"
        raise UsageError(key, f"unknown {'option' if prefix else 'field'}; allowed: {allowed}")
    kwargs = {
        name: coerce(value, types_by_name[name], f"{prefix}.{name}" if prefix else name)
        for name, value in values.items()
    }
    return cls(**kwargs)


def check_processes(config: RunConfig, processes: int) -> None:
    """Every process needs a worker of its own (``processes``: --nproc, or torchrun's world size)."""
    if processes <= config.effective_workers:
        return
    from strategies import get_strategy

    if get_strategy(config.strategy).single_worker:  # --workers cannot help
        raise UsageError("nproc", f"{config.strategy} trains one worker in one process, so it cannot use "
                                  f"{processes} processes; run it with --nproc 1")
    raise UsageError("workers", f"{config.effective_workers} workers cannot fill {processes} processes; "
                                "use --workers >= --nproc")


def samples_allowed(config: RunConfig, n_train: int) -> float:
    """The most training samples the run's epochs and a ``samples=N`` budget allow."""
    allowed = config.epochs * n_train
    budget = parse_budget(config.budget)
    if budget is not None and budget[0] == "samples":
        allowed = min(allowed, budget[1])
    return allowed


def loss_assignments(loss: str | None, strategies: list[str]) -> list[str]:
    """``--loss X`` is ``--set S.loss=X`` for each named strategy with a loss option (an error if none has)."""
    if loss is None:
        return []
    from strategies import get_strategy

    having = [s for s in strategies if "loss" in {f.name for f in fields(get_strategy(s).Options)}]
    if not having:
        verb = "takes" if len(strategies) == 1 else "take"
        raise UsageError("loss", f"{', '.join(strategies)} {verb} no loss option; psl, consensus and dgd do")
    return [f"{s}.loss={loss}" for s in having]


def parse_budget(text: str) -> tuple[str, float] | None:
    """``epochs`` -> None (the epoch budget alone); ``bytes=1e8`` -> ('bytes', 1e8)."""
    if text == "epochs":
        return None
    kind, sep, amount = text.partition("=")
    if not sep or kind not in BUDGET_KINDS:
        kinds = ", ".join(k + "=N" for k in BUDGET_KINDS)
        raise UsageError("budget", f"must be 'epochs' or one of {kinds}, not {text!r}")
    try:
        value = float(amount)
    except ValueError:
        raise UsageError("budget", f"amount in {text!r} must be a number") from None
    if value <= 0 or not math.isfinite(value):
        raise UsageError("budget", f"amount in {text!r} must be positive")
    return kind, value


def validate(config: RunConfig) -> RunConfig:
    """Check every field's range and every name against its registry; return the config unchanged."""
    from pnnctl.data import DATASETS, parse_sharding
    from pnnctl.models import parse_model_spec
    from pnnctl.network import parse_network
    from strategies import STRATEGIES

    def require(ok: bool, name: str, allowed: str) -> None:
        if not ok:
            raise UsageError(name, f"must be {allowed}, not {getattr(config, name)!r}")

    require(config.strategy in STRATEGIES, "strategy", "one of " + ", ".join(STRATEGIES))
    known_dataset = config.dataset in DATASETS or (
        config.dataset.startswith("emnist-") and "emnist-<split>" in DATASETS
    )
    require(known_dataset, "dataset", "one of " + ", ".join(DATASETS))
    parse_model_spec(config.model)
    require(config.workers >= 1, "workers", "an integer >= 1")
    require(config.epochs > 0, "epochs", "a number > 0")
    require(config.batch_size >= 1, "batch_size", "an integer >= 1")
    require(0 < config.lr < FLOAT32_MAX, "lr", "a number > 0 (and below 3.4e38, float32's largest)")
    require(config.optimizer in OPTIMIZERS, "optimizer", "one of " + ", ".join(OPTIMIZERS))
    require(0 <= config.momentum < 1, "momentum", "a number in [0, 1)")
    require(config.weight_decay >= 0, "weight_decay", "a number >= 0")
    require(0 <= config.seed < 2**63, "seed", "an integer in [0, 2**63)")
    device_ok = config.device in DEVICES or (config.device.startswith("cuda:") and config.device[5:].isdigit())
    require(device_ok, "device", "auto, cpu, cuda or cuda:K")
    parse_sharding(config.sharding)
    require(config.eval_every >= 1e-4, "eval_every", "a number of epochs >= 0.0001")
    require(0 <= config.target_acc <= 1, "target_acc", "a fraction in [0, 1] (0 for none)")
    parse_network(config.network)
    parse_budget(config.budget)
    require(bool(config.out), "out", "a folder path")
    def no_control(text: str) -> bool:
        return all(ch >= " " and ch != "\x7f" for ch in text)

    plain = "/" not in config.run_name and config.run_name not in (".", "..") and no_control(config.run_name)
    require(plain, "run_name", "a plain folder name (no '/', no control characters)")
    require(len(config.run_id.encode()) <= 255, "run_name", "a folder name of at most 255 bytes")
    require(no_control(config.out), "out", "a folder path without control characters")
    require(config.checkpoint_every >= 1, "checkpoint_every", "an integer >= 1")
    require(config.nproc >= 1, "nproc", "an integer >= 1")
    check_processes(config, config.nproc)
    require(config.backend in BACKENDS, "backend", "one of " + ", ".join(BACKENDS))
    require(config.timeout_s > 0, "timeout_s", "a number of seconds > 0")
    require(config.precision in PRECISIONS, "precision", "one of " + ", ".join(PRECISIONS))
    synthetic = config.synthetic
    for name, ok, allowed in (
        ("samples", synthetic.samples >= 10, "an integer >= 10"),
        ("dim", synthetic.dim >= 1, "an integer >= 1"),
        ("classes", synthetic.classes >= 2, "an integer >= 2"),
        ("teacher_width", synthetic.teacher_width >= 1, "an integer >= 1"),
        ("noise", 0 <= synthetic.noise < 1, "a probability in [0, 1)"),
    ):
        if not ok:
            raise UsageError(f"synthetic.{name}", f"must be {allowed}, not {getattr(synthetic, name)!r}")
    check_options(config.strategy, config.strategy_options())
    return config


def check_options(strategy: str, options: Any) -> None:
    """Run a strategy's options' own ``validate``, naming a field the way the user types it: STRATEGY.OPTION."""
    check = getattr(options, "validate", None)
    if check is None:
        return
    try:
        check()
    except UsageError as exc:
        if "." not in exc.field and exc.field in {f.name for f in fields(options)}:
            raise UsageError(f"{strategy}.{exc.field}", exc.problem) from None
        raise


def split_sections(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Flatten a TOML document into RunConfig keyword values (tables become nested dicts)."""
    from strategies import STRATEGIES

    run_fields = {f.name for f in fields(RunConfig)} - {"options"}
    values: dict[str, Any] = {}
    options: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        if key == "synthetic":
            if not isinstance(value, dict):
                raise UsageError("synthetic", f"must be a table in {source}")
            values["synthetic"] = dict(value)
        elif key in STRATEGIES:
            if not isinstance(value, dict):
                raise UsageError(key, f"must be a table of {key}'s options in {source}")
            options[key] = dict(value)
        elif key in run_fields:
            values[key] = value
        else:
            allowed = ", ".join(sorted(run_fields | set(STRATEGIES)))
            raise UsageError(key, f"unknown field in {source}; allowed: {allowed}")
    values["options"] = options
    return values


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError("config", f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError("config", f"{path} is not UTF-8 text (byte {exc.start}); TOML files are UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError("config", f"{path} is not valid TOML ({exc})") from None


def parse_set_value(text: str) -> Any:
    """A ``--set`` value as a TOML scalar or array; a bare word that is not TOML is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_set(assignments: list[str]) -> dict[str, Any]:
    """``["lr=0.1", "ist.local_steps=20"]`` -> nested dict ``{"lr": 0.1, "ist": {"local_steps": 20}}``."""
    out: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError("set", f"expected KEY=VALUE, got {assignment!r}")
        parts = key.split(".")
        if len(parts) > 2 or not all(parts):
            raise UsageError("set", f"key {key!r} must be FIELD or SECTION.FIELD")
        if len(parts) == 2:
            section = out.setdefault(parts[0], {})
            if not isinstance(section, dict):
                raise UsageError("set", f"{parts[0]} is both a field and a section")
            section[parts[1]] = parse_set_value(value.strip())
        else:
            out[key] = parse_set_value(value.strip())
    return out


def merge_layers(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_layers(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


#: What a resumed run may change and otherwise keeps from its run folder's config.toml: how far it trains and
#: how often it checkpoints. (``out`` and ``device``, where it runs, may change too, but are not carried.)
RESUME_CARRIES = ("epochs", "budget", "target_acc", "checkpoint_every", "timeout_s")


def resumed_limits(run_dir: Path) -> dict[str, Any]:
    """The ``RESUME_CARRIES`` values a run folder's config.toml holds (its checkpoint's where config.toml is gone;
    none without either): a ``--resume`` that did not repeat ``--epochs`` trained to the default 5 epochs,
    whatever the run was started with."""
    stored = run_dir / "config.toml"
    if stored.is_file():
        values = load_toml(stored)
    elif (run_dir / "checkpoint.pt").is_file():  # without config.toml a resume trained a finished run on to 5 epochs
        from pnnctl.trainer import load_checkpoint

        values = load_checkpoint(run_dir / "checkpoint.pt").get("config", {})
    else:
        values = {}
    return {key: values[key] for key in RESUME_CARRIES if key in values}


def resolve_layers(
    file_values: Mapping[str, Any] | None = None,
    flags: Mapping[str, Any] | None = None,
    assignments: list[str] | None = None,
    source: str = "config",
    underneath: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Defaults < ``underneath`` (a resumed run's own limits) < TOML document < flags < ``--set``, merged but
    not yet validated.

    Every strategy's option table is kept, so a grid can build each strategy's config from it.
    """
    layered: dict[str, Any] = {"options": {}}
    if underneath:
        layered = merge_layers(layered, dict(underneath))
    if file_values:
        layered = merge_layers(layered, split_sections(file_values, source))
    if flags:
        layered = merge_layers(layered, {k: v for k, v in flags.items() if v is not None})
    if assignments:
        layered = merge_layers(layered, split_sections(parse_set(assignments), "--set"))
    return layered


def resolve_config(
    config_file: str | Path | None = None,
    flags: Mapping[str, Any] | None = None,
    assignments: list[str] | None = None,
    underneath: Mapping[str, Any] | None = None,
    loss: str | None = None,
) -> RunConfig:
    """Defaults < ``underneath`` < TOML file < flags < ``--set``; then validate. ``loss`` is ``--loss``:
    ``--set STRATEGY.loss=LOSS`` for the strategy the layers name, added before anything is validated
    (checked first without it, ``--loss squared --set consensus.surrogate=gauss-newton`` was refused).

    A file's ``[compare]`` table (an experiment file, a grid's grid.toml) is the grid's, not the run's:
    one run of an experiment is ``--config FILE --strategy NAME``, so it is left out here."""
    file_values = load_toml(config_file) if config_file else None
    if file_values:
        file_values.pop("compare", None)
    layers = resolve_layers(file_values, flags, assignments, str(config_file), underneath)
    if loss is not None:  # the last layer, as a --set after the others
        strategy = str(layers.get("strategy", RunConfig.strategy))
        layers = merge_layers(layers, split_sections(parse_set(loss_assignments(loss, [strategy])), "--set"))
    return config_from_dict(layers)


def config_from_dict(values: Mapping[str, Any]) -> RunConfig:
    values = dict(values)
    synthetic = build_dataclass(SyntheticConfig, values.pop("synthetic", {}) or {}, prefix="synthetic")
    all_options = values.pop("options", {}) or {}
    config = build_dataclass(RunConfig, values, prefix="")
    # Only the chosen strategy's table applies; others in a shared experiment file are ignored, but
    # their names, types and values are checked all the same: a typo there would otherwise surface only
    # when that strategy runs, if ever (``--set ist.local_step=5`` on a centralized run did nothing).
    from strategies import get_strategy

    for name, table in all_options.items():
        if name != config.strategy:
            check_options(name, build_dataclass(get_strategy(name).Options, dict(table), prefix=name))
    chosen = dict(all_options.get(config.strategy, {}))
    return validate(dataclasses.replace(config, synthetic=synthetic, options=chosen))


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    out = {f.name: getattr(config, f.name) for f in fields(RunConfig) if f.name not in ("synthetic", "options")}
    out["synthetic"] = dataclasses.asdict(config.synthetic)
    out[config.strategy] = dataclasses.asdict(config.strategy_options())
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):  # an inline table; keys quoted since they may hold dots
        return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    # A JSON string is a valid TOML basic string, once DEL (which JSON leaves raw) is escaped too.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def stored_form(config: RunConfig) -> dict[str, Any]:
    """``config`` as its run folder's config.toml reads back: compared with a stored one through the same
    TOML writer, tuples, lists and absent options compare alike."""
    return tomllib.loads(to_toml(config_to_dict(config)))


def to_toml(values: Mapping[str, Any]) -> str:
    """A small TOML writer for flat values and one level of tables (all pnnctl configs need)."""
    lines = [f"{key} = {_toml_value(v)}" for key, v in values.items() if not isinstance(v, Mapping)]
    for key, table in values.items():
        if isinstance(table, Mapping):
            lines.append(f"\n[{key}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None)
    return "\n".join(lines) + "\n"


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings under each dataclass field (read from the source), for ``pnnctl list`` and --help."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    # Base classes first, so a subclass's docstring for a field overrides its parent's.
    for klass in reversed(cls.__mro__):
        if klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, following in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())  # one line, however wrapped
    return docs
