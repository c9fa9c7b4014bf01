"""Typed job configuration: one `JobConfig` made of the components' own dataclasses.

A job is read from a built-in name (a TOML file in `launch/configs/`) or a TOML path, then
`key=value` overrides with dotted keys are applied (`training.lr=1e-3`, `model.n_layers=2`,
`model.kernels.rmsnorm=torch`, `fp8.recipe=rowwise`). Values are parsed to the field's declared type; unknown keys are
rejected with the closest valid name. The model is picked by `[model] preset = "tiny"` (a name
from `llama3hp.model.PRESETS`); the other `[model]` keys override the preset's fields.

Each section is the dataclass of the component it configures, which validates itself
(`TrainingConfig` in train/trainer.py, `CheckpointConfig` in train/checkpointer.py, `MetricsConfig`
in train/metrics.py, `HealthConfig` in train/health.py, `WatchdogConfig` in train/watchdog.py,
`FaultConfig` in train/faults.py, `ParallelConfig` in parallel/mesh.py, `DataConfig`, `ModelArgs`, `Fp8Config`,
`PostTrainConfig` in posttrain/config.py);
this module holds the override engine and the checks across components (`validate`).

Every error raised here is a `ConfigError` with a one-line message the CLI prints as is.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import tomllib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama3hp.data import DataConfig
from llama3hp.errors import ConfigError
from llama3hp.fp8.config import Fp8Config
from llama3hp.model import ModelArgs, get_model_args
from llama3hp.parallel.mesh import ParallelConfig
from llama3hp.posttrain.config import PostTrainConfig
from llama3hp.train.build import STDLIB_CORPUS
from llama3hp.train.checkpointer import CheckpointConfig
from llama3hp.train.faults import FaultConfig
from llama3hp.train.health import HealthConfig
from llama3hp.train.metrics import MetricsConfig
from llama3hp.train.trainer import TrainingConfig
from llama3hp.train.watchdog import WatchdogConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "launch" / "configs"
# Keys whose field name differs (a Python keyword cannot be a field name).
KEY_ALIASES = {"checkpoint.async": "checkpoint.async_save"}


@dataclass
class JobConfig:
    """A whole training job."""

    name: str = "run"  # run name; the run folder is <runs_root>/<name>-<timestamp>
    run_dir: str = ""  # explicit run folder ("" = derived from runs_root, name and time)
    runs_root: str = "runs"  # parent of the run folders
    data_cache: str = "data"  # where the stdlib corpus is prepared on first use
    model_preset: str = "tiny"  # a name in llama3hp.model.PRESETS (TOML key [model] preset)
    model: ModelArgs = field(default_factory=lambda: get_model_args("tiny"))  # architecture
    data: DataConfig = field(default_factory=lambda: DataConfig(datasets=[STDLIB_CORPUS]))  # data pipeline
    training: TrainingConfig = field(default_factory=TrainingConfig)  # optimisation
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # checkpoints
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # logging and profiling
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # 4D layout [TP, CP, PP, DP]
    # FP8 linears in the transformer blocks (TOML [fp8]); off by default: recipe "none". Turn on with
    # fp8.recipe=rowwise (sm89+ GPUs; emulated GEMM on CPU), emulated, te_delayed or te_current.
    fp8: Fp8Config = field(default_factory=lambda: Fp8Config(recipe="none"))
    health: HealthConfig = field(default_factory=HealthConfig)  # NaN/Inf and loss-spike policies
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)  # hangs and stragglers
    fault: FaultConfig = field(default_factory=FaultConfig)  # faults injected on purpose (off)
    # The objective: pre-training, SFT or DPO (with its reference model); TOML [posttrain].
    posttrain: PostTrainConfig = field(default_factory=PostTrainConfig)

    def validate(self, *, dp_size: int = 1) -> JobConfig:
        """Every component's own checks, then the checks across components; one-line ConfigError."""
        validate(self, dp_size=dp_size)
        return self

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON data; `job_from_dict` reads it back."""
        return job_to_dict(self)

    def dump(self, path: Path) -> None:
        """config.json, written to a temporary name and renamed."""
        dump_job_config(self, path)


# ----------------------------------------------------------------------------------------------
# Parsing values to declared types


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _parse_text(text: str) -> Any:
    """A command-line value as TOML would read it, else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` (from TOML, JSON or the command line) converted to type `tp`, or a ConfigError."""

    def bad() -> ConfigError:
        return ConfigError(f"bad value {value!r} for '{key}': expected {_type_name(tp)}")

    optional, inner = _is_optional(tp)
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(value, inner, key)
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"'{key}' is a section, not a value: set its fields, e.g. '{key}.<field>=...'")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise bad()
    if tp is int:
        if isinstance(value, str):
            value_p = _parse_text(value)
            if isinstance(value_p, str):
                raise bad()
            value = value_p
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():  # 1e6 is a fine step count
            return int(value)
        raise bad()
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    if typing.get_origin(tp) is tuple:  # only tuple[X, ...] (e.g. fp8.include): a list, kept immutable
        item_args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if len(item_args) != 1:
            raise ConfigError(f"'{key}' has unsupported type {_type_name(tp)}")
        return tuple(coerce(value, types.GenericAlias(list, (item_args[0],)), key))
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            parsed = _parse_text(value)
            if isinstance(parsed, list):
                value = parsed
            elif value.strip() == "":
                value = []
            else:  # a,b,c without brackets
                value = [_parse_text(v.strip()) for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            raise bad()
        if item_tp is Any:
            return list(value)
        if item_tp is str:  # a bare 1.5 typed on the command line is still a name
            value = [v if isinstance(v, str) or isinstance(v, bool) else str(v) for v in value]
        try:
            return [coerce(v, item_tp, key) for v in value]
        except ConfigError:
            raise bad() from None
    if tp is Any:
        return value
    raise ConfigError(f"'{key}' has unsupported type {_type_name(tp)}")


# ----------------------------------------------------------------------------------------------
# Dotted keys


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys(obj: Any, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a dataclass instance (sections are recursed into)."""
    keys = []
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        tp = hints[f.name]
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(tp) and dataclasses.is_dataclass(value):
            keys += valid_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unknown(key: str, choices: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def set_key(obj: Any, key: str, value: Any, *, root: Any = None, prefix: str = "") -> None:
    """Set dotted `key` of dataclass `obj` to `value` parsed to the field's type."""
    root = obj if root is None else root
    head, _, rest = key.partition(".")
    names = {f.name for f in dataclasses.fields(obj)}
    if head not in names:
        raise _unknown(prefix + key, _job_keys(root))
    tp = _hints(type(obj))[head]
    current = getattr(obj, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise _unknown(prefix + key, _job_keys(root))
        set_key(current, rest, value, root=root, prefix=f"{prefix}{head}.")
        return
    if isinstance(value, dict):
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"bad value for '{prefix}{key}': expected {_type_name(tp)}, got a table")
        for k, v in value.items():
            set_key(current, k, v, root=root, prefix=f"{prefix}{head}.")
        return
    setattr(obj, head, coerce(value, tp, prefix + key))


def _job_keys(obj: Any) -> list[str]:
    keys = valid_keys(obj)
    return keys + ["model.preset"] if isinstance(obj, JobConfig) else keys


def flatten(table: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """A nested TOML/JSON table as (dotted key, value) pairs, in order."""
    out = []
    for k, v in table.items():
        if isinstance(v, dict):
            out += flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"bad override {text!r}: write key=value, e.g. training.lr=1e-3")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"bad override {text!r}: empty key")
    return key, value.strip()


# ----------------------------------------------------------------------------------------------
# Loading, validating, dumping


def builtin_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A TOML path, or the built-in config of that name in launch/configs/."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or os.sep in name_or_path:
        if not path.is_file():
            raise ConfigError(f"config file not found: {name_or_path}")
        return path
    builtin = CONFIG_DIR / f"{name_or_path}.toml"
    if builtin.is_file():
        return builtin
    if path.is_file():
        return path
    names = builtin_configs()
    close = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; built-in configs: {', '.join(names)}"
    raise ConfigError(f"no config named '{name_or_path}' and no such file{hint}")


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"bad TOML in {path}: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path} is not a TOML text file (not UTF-8 at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None


def build_job_config(pairs: list[tuple[str, Any]], *, dp_size: int = 1) -> JobConfig:
    """A validated JobConfig from (dotted key, value) pairs applied in order to the defaults.

    `model.preset` (the last one given) is applied first, so field overrides land on that preset.
    """
    preset = "tiny"
    rest = []
    for key, value in pairs:
        key = KEY_ALIASES.get(key, key)
        if key in ("model.preset", "model_preset"):
            preset = coerce(value, str, "model.preset")
        else:
            rest.append((key, value))
    try:
        model = get_model_args(preset)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    job = JobConfig(model_preset=preset, model=model)
    for key, value in rest:
        set_key(job, key, value)
    validate(job, dp_size=dp_size)
    return job


def load_job_config(name_or_path: str, overrides: Sequence[str] = (), *, dp_size: int = 1) -> JobConfig:
    """Read a built-in name or TOML path, apply `key=value` overrides, validate."""
    table = read_toml(resolve_config_path(name_or_path))
    pairs = flatten(table) + [parse_override(o) for o in overrides]
    return build_job_config(pairs, dp_size=dp_size)


def validate(job: JobConfig, *, dp_size: int = 1) -> None:
    """One-line ConfigError for a config that cannot make sense: each component's own `validate`,
    then what only the whole job can check (batch over data-parallel ranks, lengths against the
    model, FP8 against the layout and activation checkpointing, data present)."""
    t = job.training
    for component in (
        t,
        job.checkpoint,
        job.metrics,
        job.health,
        job.watchdog,
        job.fault,
        job.data,
        job.posttrain,
    ):
        component.validate()
    for what in (job.fp8, job.model):
        try:
            what.validate()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None
    per_step = t.micro_batch_rows * dp_size
    for rows in [t.global_batch_rows] + [r for _, r in t.batch_ramp]:
        if rows % per_step:
            raise ConfigError(
                f"global batch of {rows} rows is not divisible by micro_batch_rows x dp = "
                f"{t.micro_batch_rows} x {dp_size}: change training.global_batch_rows or training.micro_batch_rows"
            )
    for seq in [t.seq_len] + [s[1] for s in t.seq_len_stages]:
        if seq > job.model.max_seq_len:
            raise ConfigError(f"sequence length {seq} exceeds model.max_seq_len ({job.model.max_seq_len})")
    p = job.parallel
    if job.model.tie_embeddings and (p.tp > 1 or p.pp > 1):
        raise ConfigError(
            f"model preset {job.model_preset} ties its embedding and output head, which tp={p.tp}, pp={p.pp} "
            "would split: use an untied preset or tp=1, pp=1"
        )
    if job.fp8.uses_te and (p.tp > 1 or p.cp > 1 or p.pp > 1):
        raise ConfigError(
            f"fp8.recipe={job.fp8.recipe} with tp={p.tp}, cp={p.cp}, pp={p.pp}: Transformer Engine recipes run "
            "on one process only; use fp8.recipe=rowwise on a parallel layout"
        )
    if job.fp8.uses_te and t.activation_checkpointing != "none":
        # TE's delayed scaling would record every checkpointed block's amaxes again in the recompute.
        raise ConfigError(
            f"fp8.recipe={job.fp8.recipe} with training.activation_checkpointing={t.activation_checkpointing}: "
            "not supported with Transformer Engine recipes; use fp8.recipe=rowwise"
        )
    if (job.posttrain.objective == "reward") != (job.model.head == "reward"):
        raise ConfigError(
            f"posttrain.objective={job.posttrain.objective} with model.head={job.model.head}: a reward model "
            "needs both (posttrain.objective=reward and model.head=reward), other objectives the lm head"
        )
    if not job.data.datasets:
        raise ConfigError("data.datasets is empty: give at least one prepared dataset folder (or '@stdlib')")


def job_to_dict(job: JobConfig) -> dict[str, Any]:
    """The resolved config as plain JSON data; `job_from_dict` reads it back."""
    d = dataclasses.asdict(job)
    d["model"] = {"preset": d.pop("model_preset"), **d["model"]}
    return d


def model_args_from_dict(d: dict[str, Any]) -> ModelArgs:
    """ModelArgs from `dataclasses.asdict(args)` (as stored in checkpoints)."""
    args = ModelArgs()
    for key, value in flatten(d):
        set_key(args, key, value)
    return args.validate()


def job_from_dict(d: dict[str, Any]) -> JobConfig:
    return build_job_config(flatten(d))


def dump_job_config(job: JobConfig, path: Path) -> None:
    """config.json, written to a temporary name and renamed."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(job_to_dict(job), indent=2) + "\n")
    os.replace(tmp, path)
