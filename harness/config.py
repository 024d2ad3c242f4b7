"""Typed run configuration from TOML (stdlib tomllib) with ``--set section.key=value`` overrides.

Every section is a dataclass; unknown sections or keys, wrong types and bad values raise ConfigError with a
one-line message before anything starts. ``[model]`` and ``[data]`` take ``name`` plus free options that the
workload builder validates.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from harness.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli, the parser the standard library's tomllib was made from
    import tomli as tomllib


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = ""          # metrics.jsonl goes here; default: beside the checkpoints (Config.output_dir)
    id: str = ""                  # run id for the checkpoint folder's lease; default: the launcher's job id


@dataclass
class TrainConfig:
    max_steps: int = 200
    seed: int = 0
    batch_size: int = 32          # per rank
    log_every: int = 10
    device: str = "auto"          # auto | cpu | cuda
    amp: bool = False             # autocast on CUDA, in amp_dtype
    amp_dtype: str = "bf16"       # bf16 (no grad scaler: bf16 has fp32's range) | fp16 (with a GradScaler)
    deterministic: bool = False   # GPU: deterministic kernels only, for bitwise resume (README "Determinism")
    grad_clip: float = 0.0        # 0: off
    entry: str = ""               # "pkg.module:function" building a user Workload
    step_sleep_s: float = 0.0     # slow each step down (demos and fault tests)
    parallel: str = "ddp"         # ddp | zero (DDP + ZeroRedundancyOptimizer) | fsdp (FSDP2 fully_shard)


@dataclass
class OptimConfig:
    name: str = "adamw"           # adamw | adam | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9         # sgd only


@dataclass
class SchedulerConfig:
    name: str = "cosine"          # none | cosine | step
    warmup_steps: int = 0
    step_size: int = 100          # step: decay every step_size steps
    gamma: float = 0.5
    min_lr_ratio: float = 0.1     # cosine: final lr = lr * min_lr_ratio


@dataclass
class CheckpointConfig:
    dir: str = "runs/run/checkpoints"   # local path or fsspec URL (s3://bucket/prefix)
    every_steps: int = 50
    keep_last: int = 3
    keep_best: int = 0
    best_metric: str = "loss"
    best_mode: str = "min"
    async_save: bool = False            # TOML key: checkpoint.async
    storage_options: dict = field(default_factory=dict)
    grace_period_s: float = 25.0        # after a stop signal: the save must commit within this
    on_error: str = "stop"              # a failed save: stop | continue
    max_file_mb: int = 256
    io_threads: int = 4
    timeout_s: float = 600.0            # checkpoint collectives
    split_writes: bool = False          # ranks share the writes of replicated (DDP) state, greedy by size
    lease_timeout_s: float = 60.0       # another run's RUN_LEASE that does not beat for this long is taken over
    init_from: str = ""                 # a new run's initial weights: a checkpoint folder or a .pt/.safetensors
    #                                     file (tensors whose name and shape match); once dir has a checkpoint,
    #                                     restarts resume from that instead


@dataclass
class DistConfig:
    backend: str = "auto"         # auto | gloo | nccl
    timeout_s: float = 300.0      # process-group collectives: a dead peer ends the step with an error


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: dict = field(default_factory=lambda: {"name": "mlp"})
    data: dict = field(default_factory=lambda: {"name": "synthetic_vectors"})
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    @property
    def output_dir(self) -> str:
        """Where metrics.jsonl goes: ``run.output_dir`` if set, else the local checkpoint folder itself (a run's
        metrics sit with its checkpoints, so two runs with different folders never share a file), else for a
        remote ``checkpoint.dir`` a local folder derived from the URL: ``s3://bucket/a/b`` ->
        ``runs/remote/s3/bucket/a/b``."""
        return self.run.output_dir or metrics_dir_for(self.checkpoint.dir)

    @property
    def output_dir_setting(self) -> str:
        """The setting ``output_dir`` comes from, for messages about it (a file given as ``checkpoint.dir`` is
        refused as the output folder first: the message must name the key the user set)."""
        if self.run.output_dir:
            return "run.output_dir"
        if "://" in self.checkpoint.dir and not self.checkpoint.dir.startswith("file://"):
            return "derived from checkpoint.dir; set run.output_dir to move it"
        return "checkpoint.dir, unless run.output_dir is set"


def metrics_dir_for(checkpoint_dir: str) -> str:
    """The default metrics folder of a checkpoint folder (see ``Config.output_dir``)."""
    if checkpoint_dir.startswith("file://"):
        return checkpoint_dir[len("file://"):]
    scheme, sep, rest = checkpoint_dir.partition("://")
    if not sep:
        return checkpoint_dir
    parts = [p for p in rest.split("/") if p not in ("", ".", "..")]  # never climb out of runs/remote
    return "/".join(["runs", "remote", scheme, *parts])


_ALIASES = {("checkpoint", "async"): "async_save"}   # TOML names that are Python keywords
_CHOICES = {
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("train", "parallel"): ("ddp", "zero", "fsdp"),
    ("train", "amp_dtype"): ("bf16", "fp16"),
    ("optim", "name"): ("adamw", "adam", "sgd"),
    ("scheduler", "name"): ("none", "cosine", "step"),
    ("checkpoint", "best_mode"): ("min", "max"),
    ("checkpoint", "on_error"): ("stop", "continue"),
    ("dist", "backend"): ("auto", "gloo", "nccl"),
}
_PATHS = {("checkpoint", "dir"), ("run", "output_dir"), ("checkpoint", "init_from")}  # see local_or_url
_POSITIVE = {("train", "max_steps"), ("train", "batch_size"), ("train", "log_every"), ("checkpoint", "every_steps"),
             ("checkpoint", "max_file_mb"), ("checkpoint", "io_threads"), ("checkpoint", "timeout_s"),
             ("checkpoint", "grace_period_s"), ("checkpoint", "lease_timeout_s"), ("dist", "timeout_s"),
             ("optim", "lr"), ("scheduler", "step_size"),
             ("scheduler", "gamma")}  # a negative gamma flips the LR's sign every step_size steps
_NAMES = {("checkpoint", "best_metric")}  # must name something: not empty
_NON_NEGATIVE = {("checkpoint", "keep_last"), ("checkpoint", "keep_best"), ("train", "grad_clip"),
                 ("train", "step_sleep_s"), ("optim", "weight_decay"), ("scheduler", "warmup_steps"),
                 ("train", "seed"), ("optim", "momentum"), ("scheduler", "min_lr_ratio")}
# Durations in seconds. Collective timeouts under a second are a unit slip (milliseconds?) that would fail
# every run as a communication error; a week is past any real wait and within what timedelta and the
# collectives' millisecond counts can hold (1e300 overflowed in the workers, exit 1 after every restart).
MAX_DURATION_S = 7 * 24 * 3600.0
_DURATIONS = {("checkpoint", "grace_period_s"), ("checkpoint", "timeout_s"), ("checkpoint", "lease_timeout_s"),
              ("dist", "timeout_s"), ("train", "step_sleep_s")}
_AT_LEAST_A_SECOND = {("checkpoint", "timeout_s"), ("dist", "timeout_s")}


def suggest(name: str, options: list[str]) -> str:
    """The hint after an unknown name: the closest known one, else all of them (config keys, --rdzv-conf)."""
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(options)})"


def _check_type(where: str, value: Any, kind: Any) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{where} must be {kind.__name__}, got {type(value).__name__} {value!r}"
                          + _type_hint(value, kind))
    if kind is float and not math.isfinite(value):  # TOML reads nan and inf: no setting means either
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    return value


def _type_hint(value: Any, kind: Any) -> str:
    """What TOML wanted, where the value says what was meant: `True`, `yes` for a bool, `1e3` for an int."""
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
        meant = "true" if value.lower() in ("true", "yes", "on") else "false"
        return f" (TOML's booleans are true and false, unquoted: {meant})"
    if kind is int and isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 63:
        return f" (write {int(value)})"
    return ""


def _section(name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        attr = _ALIASES.get((name, key), key)
        if attr not in fields:
            shown = [next((k for (s, k), a in _ALIASES.items() if s == name and a == f), f) for f in fields]
            raise ConfigError(f"unknown config key '{name}.{key}'" + suggest(key, shown))
        kwargs[attr] = _check_value(name, key, _check_type(f"{name}.{key}", value, hints[attr]))
    return cls(**kwargs)


def _check_value(section: str, key: str, value: Any) -> Any:
    if (section, key) in _PATHS and isinstance(value, str):
        try:
            value = local_or_url(value)
        except ValueError as exc:
            raise ConfigError(f"{section}.{key} = {exc}") from None
    choices = _CHOICES.get((section, key))
    if choices and value not in choices:
        raise ConfigError(f"{section}.{key} must be one of {', '.join(choices)}, got {value!r}")
    if (section, key) in _NAMES and not value.strip():
        raise ConfigError(f"{section}.{key} is empty: name a metric ('loss' or a key of the saved metrics)")
    if (section, key) in _POSITIVE and value <= 0:
        raise ConfigError(f"{section}.{key} must be > 0, got {value!r}")
    if (section, key) in _NON_NEGATIVE and value < 0:
        raise ConfigError(f"{section}.{key} must be >= 0, got {value!r}")
    if (section, key) in _AT_LEAST_A_SECOND and value < 1:
        raise ConfigError(f"{section}.{key} is in seconds and must be >= 1, got {value!r}")
    if (section, key) in _DURATIONS and value > MAX_DURATION_S:
        raise ConfigError(f"{section}.{key} is in seconds and must be <= {MAX_DURATION_S:.0f} (a week), "
                          f"got {value!r}")
    return value


_HALF_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/?(?![/:])(.*)$")  # not a chained a::b://
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"})  # keys, not paths


def local_or_url(value: str) -> str:
    """A checkpoint location as storage should open it, for the config and for ``CheckpointManager(url)``
    alike. A leading ~ is the home folder (fsspec would make a folder named "~" in the working directory). A
    URL with one slash or none after its scheme (``s3:/bucket/run``, a typo) would be a local folder named
    ``s3:`` in the working directory: checkpoints on a node's disk where S3 was meant, lost with the node.
    That is a ValueError; a local folder whose name has a colon is still ``./name:x``. A scheme is
    case-insensitive (RFC 3986; fsspec only knows ``s3``, not ``S3``), and an empty segment in an object
    store's key (``s3://bucket//run``) is a ValueError: it stores under a key starting with "/", which
    ``s3://bucket/run`` (and the console) does not show."""
    if value.startswith("~"):
        return os.path.expanduser(value)
    half = _HALF_URL.match(value)
    if half:
        scheme, rest = half.groups()
        meant = f"file:///{rest}" if scheme.lower() == "file" else f"{scheme.lower()}://{rest}"
        raise ValueError(f"{value!r} is neither a URL nor a local path: did you mean {meant!r}? (a local folder "
                         f"whose name has a colon: './{value}')")
    url = _URL.match(value)
    if not url:
        return value
    scheme, rest = url.group(1).lower(), url.group(2)
    if scheme in _OBJECT_STORES and "//" in f"/{rest.rstrip('/')}":
        meant = f"{scheme}://" + "/".join(part for part in rest.split("/") if part)
        raise ValueError(f"{value!r} has an empty folder name ('//'): the object store would keep the checkpoints "
                         f"under keys with an empty folder, where {meant} and the console do not see them; did you "
                         f"mean {meant!r}?")
    return f"{scheme}://{rest}"


def from_dict(raw: dict) -> Config:
    """Build and validate a Config from a parsed TOML document."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    kwargs = {}
    for name, value in raw.items():
        if name not in sections:
            raise ConfigError(f"unknown config section [{name}]" + suggest(name, list(sections)))
        if name in ("model", "data"):
            default = getattr(Config(), name)["name"]
            if not isinstance(value, dict) or not isinstance(value.get("name", default), str):
                raise ConfigError(f"[{name}] must be a table with a string 'name'")
            kwargs[name] = {"name": default, **value}
        else:
            kwargs[name] = _section(name, typing.get_type_hints(Config)[name], value)
    cfg = Config(**kwargs)
    _check_combinations(cfg)
    return cfg


def _check_combinations(cfg: Config) -> None:
    """Values that are each valid but cannot go together, refused at load time (exit 2) rather than as a
    ValueError from torch.distributed once workers have started."""
    if not cfg.checkpoint.dir.strip():
        raise ConfigError("checkpoint.dir is empty: name the folder (or URL) the run's checkpoints go to")
    if cfg.checkpoint.dir.lower().startswith("memory://"):
        raise ConfigError(f"checkpoint.dir = {cfg.checkpoint.dir!r} lives in one process's memory: every rank would "
                          "have its own, and all of it is gone when the run ends; use a folder or an object store")
    if cfg.checkpoint.init_from and cfg.train.parallel == "fsdp":
        raise ConfigError("checkpoint.init_from is not supported with train.parallel = 'fsdp' yet: import the "
                          "weights with `harness ckpt import`, or start the run under ddp")
    if cfg.dist.backend == "nccl" and cfg.train.device == "cpu":
        raise ConfigError("dist.backend = 'nccl' needs CUDA tensors, but train.device = 'cpu': "
                          "use dist.backend = 'gloo' (or 'auto'), or train.device = 'cuda'")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value``; the value is read as TOML (numbers, booleans, strings, arrays), else a string."""
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    dotted, value = text.split("=", 1)
    path = [p.strip() for p in dotted.split(".")]
    if len(path) < 2 or not all(path):
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return path, parsed


def load(path: str | None, overrides: list[str] = ()) -> Config:
    """Read a TOML file (or start from defaults when path is None) and apply --set overrides."""
    raw = {} if path is None else _read_toml(path)
    for text in [overrides] if isinstance(overrides, str) else overrides:  # one "section.key=value" as is
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: {k} is not a table")
        node[keys[-1]] = value
    return from_dict(raw)


def as_config(value: Any, what: str) -> Config:
    """A Config from a Config, its dict form (as TOML parses it) or a TOML file's path; TypeError otherwise."""
    if isinstance(value, Config):
        return value
    if isinstance(value, dict):
        return from_dict(value)
    if isinstance(value, (str, os.PathLike)):
        return load(os.fspath(value))
    raise TypeError(f"{what} takes a Config, a dict or a TOML file's path, got {type(value).__name__}")


def _read_toml(path: str) -> dict:
    """The parsed file, or a one-line ConfigError: missing, unreadable (a folder, no permission), not UTF-8
    (TOML is; a byte-order mark, which some editors write, is accepted) or not TOML."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (TOML files are UTF-8): byte 0x{data[exc.start]:02x} at "
                          f"offset {exc.start}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
