"""Deterministic built-in workloads: small models, losses, and the registry that pairs them with the synthetic
datasets of :mod:`harness.synthetic`.

Everything here is a pure function of seeds so that every rank (and every
restart of a rank) sees the same weights and the same samples without
downloads or shared storage: datasets compute item ``i`` from ``(seed, i)``
with a private ``torch.Generator``, and models are built under
``torch.manual_seed(seed)``.  Users can plug in their own builder via
:func:`load_entry_point`.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import Dataset

from harness.synthetic import SyntheticImages, SyntheticTokens, SyntheticVectors, SyntheticDataset, positive

__all__ = [
    "Workload",
    "SyntheticVectors",
    "SyntheticImages",
    "SyntheticTokens",
    "MLP",
    "SmallCNN",
    "GPT",
    "classification_loss",
    "classification_metrics",
    "token_loss",
    "token_metrics",
    "MODEL_DEFAULTS",
    "DATA_DEFAULTS",
    "WORKLOADS",
    "list_workloads",
    "build_workload",
    "load_entry_point",
]


@dataclass
class Workload:
    """What the trainer needs: a model, a map-style dataset, and how to score it."""

    model: nn.Module
    dataset: Dataset
    loss_fn: Callable[[Any, Any], torch.Tensor]
    metric_fn: Callable[[Any, Any], dict[str, float]] | None = None


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


class MLP(nn.Module):
    """``layers`` hidden Linear+ReLU blocks then a linear classifier.

    Inputs with more than one feature dimension (e.g. images) are flattened.
    """

    def __init__(self, in_features: int, hidden: int, num_classes: int, layers: int = 2) -> None:
        super().__init__()
        positive("in_features", in_features)
        positive("hidden", hidden)
        positive("num_classes", num_classes)
        positive("layers", layers)
        blocks: list[nn.Module] = []
        width = in_features
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        blocks.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class SmallCNN(nn.Module):
    """Two conv/ReLU/pool stages, global average pool, linear head.

    No BatchNorm on purpose: its running stats are extra state that DDP
    would need to sync and that makes bit-exact resume tests harder.  Works
    for any input of at least 4x4 pixels.
    """

    def __init__(self, channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        positive("channels", channels)
        positive("num_classes", num_classes)
        positive("width", width)
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class _CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        # (B, T, D) -> (B, H, T, D/H)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = _CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model),
            nn.Dropout(dropout),
        )
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.resid_dropout(self.attn(self.ln1(x)))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Small causal decoder: ``(B, T) int64 ids -> (B, T, vocab) logits``.

    GPT-2 style init (N(0, 0.02), residual projections scaled by
    ``1/sqrt(2 * n_layers)``) drawn from the global torch RNG, so the weights
    are a function of the seed set before construction.
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        dropout: float = 0.0,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("seq_len", seq_len),
            ("d_model", d_model),
            ("n_layers", n_layers),
            ("n_heads", n_heads),
        ):
            positive(name, value)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.seq_len = seq_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init_weights)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * n_layers))
        if tie_weights:
            # Tie after init so the shared tensor keeps the embedding's init.
            self.head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        if t > self.seq_len:
            raise ValueError(f"sequence length {t} exceeds the model's seq_len={self.seq_len}")
        pos = torch.arange(t, device=ids.device)
        x = self.drop(self.tok_emb(ids) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# --------------------------------------------------------------------------
# Losses and metrics (module-level functions so Workloads stay picklable)
# --------------------------------------------------------------------------


def classification_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``(B, C)`` logits against ``(B,)`` labels."""
    return F.cross_entropy(logits, target)


def classification_metrics(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    return {"accuracy": (logits.argmax(-1) == target).float().mean().item()}


def token_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``(B, T, V)`` logits vs ``(B, T)`` ids."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def token_metrics(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    return {"accuracy": (logits.argmax(-1) == target).float().mean().item()}


# --------------------------------------------------------------------------
# Registry and builder
# --------------------------------------------------------------------------

# Option defaults per name.  Model options that describe the data's shape are
# listed too; build_workload takes them from the dataset (see _LINKS).
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"in_features": 32, "hidden": 64, "num_classes": 4, "layers": 2},
    "cnn": {"channels": 3, "num_classes": 10, "width": 16},
    "gpt": {
        "vocab_size": 256,
        "seq_len": 64,
        "d_model": 64,
        "n_layers": 2,
        "n_heads": 4,
        "dropout": 0.0,
        "tie_weights": True,
    },
}

DATA_DEFAULTS: dict[str, dict[str, Any]] = {
    "synthetic_vectors": {"num_samples": 4096, "in_features": 32, "num_classes": 4, "seed": None},
    "synthetic_images": {
        "num_samples": 4096,
        "channels": 3,
        "height": 32,
        "width": 32,
        "num_classes": 10,
        "noise": 1.0,
        "seed": None,
    },
    "synthetic_tokens": {"num_samples": 4096, "seq_len": 64, "vocab_size": 256, "branching": 4, "seed": None},
}

# Which datasets each model can consume.
WORKLOADS: dict[str, tuple[str, ...]] = {
    "mlp": ("synthetic_vectors", "synthetic_images"),
    "cnn": ("synthetic_images",),
    "gpt": ("synthetic_tokens",),
}

# Model option -> data option that must agree.  Whichever side is given wins;
# both given and different is an error.
_LINKS: dict[tuple[str, str], dict[str, str]] = {
    ("mlp", "synthetic_vectors"): {"in_features": "in_features", "num_classes": "num_classes"},
    ("mlp", "synthetic_images"): {"num_classes": "num_classes"},
    ("cnn", "synthetic_images"): {"channels": "channels", "num_classes": "num_classes"},
    ("gpt", "synthetic_tokens"): {"vocab_size": "vocab_size", "seq_len": "seq_len"},
}

_DATASETS: dict[str, type[SyntheticDataset]] = {
    "synthetic_vectors": SyntheticVectors,
    "synthetic_images": SyntheticImages,
    "synthetic_tokens": SyntheticTokens,
}


def list_workloads() -> list[str]:
    """One human-readable line per model and per dataset, for docs and ``--help``."""
    lines = []
    for name, defaults in MODEL_DEFAULTS.items():
        opts = ", ".join(f"{k}={v}" for k, v in defaults.items())
        lines.append(f"model {name} (data: {' | '.join(WORKLOADS[name])}): {opts}")
    for name, defaults in DATA_DEFAULTS.items():
        opts = ", ".join(f"{k}={v}" for k, v in defaults.items())
        lines.append(f"data {name}: {opts}")
    return lines


def _split_cfg(kind: str, cfg: Any, defaults: Mapping[str, Mapping[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Validate ``{"name": ..., **options}`` and return (name, options)."""
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{kind} config must be a dict, got {type(cfg).__name__}")
    if "name" not in cfg:
        raise ValueError(f"{kind} config needs a 'name'; valid names: {', '.join(defaults)}")
    name = cfg["name"]
    if name not in defaults:
        raise ValueError(f"unknown {kind} name {name!r}; valid names: {', '.join(defaults)}")
    options = {k: v for k, v in cfg.items() if k != "name"}
    unknown = sorted(set(options) - set(defaults[name]))
    if unknown:
        raise ValueError(
            f"unknown {kind} option(s) {', '.join(map(repr, unknown))} for {name!r}; "
            f"valid options: {', '.join(sorted(defaults[name]))}"
        )
    return name, options


def _reconcile(model_name: str, data_name: str, model_opts: dict[str, Any], data_opts: dict[str, Any]) -> None:
    """Make linked options agree, copying a model-only value into the data."""
    for m_key, d_key in _LINKS[(model_name, data_name)].items():
        if m_key in model_opts and d_key in data_opts and model_opts[m_key] != data_opts[d_key]:
            raise ValueError(
                f"model option {m_key}={model_opts[m_key]!r} conflicts with data option "
                f"{d_key}={data_opts[d_key]!r}; set only one of them"
            )
        if m_key in model_opts:
            data_opts[d_key] = model_opts[m_key]


def _build_dataset(name: str, options: Mapping[str, Any], seed: int) -> SyntheticDataset:
    kwargs = {**DATA_DEFAULTS[name], **options}
    if kwargs["seed"] is None:
        kwargs["seed"] = seed
    return _DATASETS[name](**kwargs)


def _model_kwargs(model_name: str, data_name: str, model_opts: dict[str, Any], dataset: Any) -> dict[str, Any]:
    """Model keyword arguments: defaults, user options, then data-derived shapes."""
    kwargs = {**MODEL_DEFAULTS[model_name], **model_opts}
    for m_key, d_key in _LINKS[(model_name, data_name)].items():
        kwargs[m_key] = getattr(dataset, d_key)
    if (model_name, data_name) == ("mlp", "synthetic_images"):
        flat = dataset.channels * dataset.height * dataset.width
        if "in_features" in model_opts and model_opts["in_features"] != flat:
            raise ValueError(
                f"model option in_features={model_opts['in_features']!r} does not match "
                f"flattened image size {flat}; omit it to derive it from the data"
            )
        kwargs["in_features"] = flat
    return kwargs


_MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": SmallCNN, "gpt": GPT}
_LOSSES: dict[str, tuple[Callable[[Any, Any], torch.Tensor], Callable[[Any, Any], dict[str, float]]]] = {
    "mlp": (classification_loss, classification_metrics),
    "cnn": (classification_loss, classification_metrics),
    "gpt": (token_loss, token_metrics),
}


class _SkipInit(TorchFunctionMode):
    """``torch.nn.init`` draws become no-ops: the weights of a model built on the meta device have no values
    to draw (and drawing there would import torch's compiler stack, about a second)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else (kwargs or {}).get("tensor")
        return func(*args, **(kwargs or {}))


def build_workload(model_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any], seed: int, *,
                   deferred: bool = False) -> Workload:
    """Build a built-in workload from ``{"name": ..., **options}`` configs.

    The model is constructed under ``torch.manual_seed(seed)`` inside a forked
    RNG scope, so every rank gets identical weights and the caller's global
    RNG stream is left untouched.  The dataset seed defaults to ``seed``.

    ``deferred``: the model is built on the meta device and its initial weights are not drawn (every option
    is still checked): for a config check, or for a run that overwrites every weight from a checkpoint.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    model_name, model_opts = _split_cfg("model", model_cfg, MODEL_DEFAULTS)
    data_name, data_opts = _split_cfg("data", data_cfg, DATA_DEFAULTS)
    if data_name not in WORKLOADS[model_name]:
        raise ValueError(
            f"model {model_name!r} cannot train on data {data_name!r}; "
            f"compatible data: {', '.join(WORKLOADS[model_name])}"
        )
    _reconcile(model_name, data_name, model_opts, data_opts)
    dataset = _build_dataset(data_name, data_opts, seed)
    kwargs = _model_kwargs(model_name, data_name, model_opts, dataset)
    if deferred:
        with torch.device("meta"), _SkipInit():
            model = _MODELS[model_name](**kwargs)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _MODELS[model_name](**kwargs)
    loss_fn, metric_fn = _LOSSES[model_name]
    return Workload(model=model, dataset=dataset, loss_fn=loss_fn, metric_fn=metric_fn)


_SPEC_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def _import_user_module(name: str) -> Any:
    """``name`` imported as ``python -m`` would find it: the ``harness`` console script, unlike ``python -m
    harness``, does not put the working directory on sys.path, so ``mymod.py`` beside the config was "No module
    named 'mymod'" there. The working directory is searched last: it never shadows an installed module."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        here = os.getcwd()
        top = name.split(".")[0]
        if exc.name != top or here in sys.path or "" in sys.path:
            raise
        sys.path.append(here)
        return importlib.import_module(name)


def load_entry_point(spec: str) -> Callable[..., Any]:
    """Import ``"package.module:function"`` and return the callable.

    Meant for user workload builders with the signature
    ``fn(model_cfg: dict, data_cfg: dict, seed: int) -> Workload``.  The
    attribute part may be dotted (``"pkg.mod:Factory.build"``).  Every failure
    becomes a ValueError naming the spec, so the CLI can report it in one line.
    """
    if not isinstance(spec, str) or not _SPEC_RE.match(spec.strip()):
        raise ValueError(f"entry point must look like 'package.module:function', got {spec!r}")
    module_name, attr_path = spec.strip().split(":")
    try:
        obj: Any = _import_user_module(module_name)
    except Exception as exc:  # user code may raise anything at import time
        raise ValueError(f"cannot import module {module_name!r} for entry point {spec!r}: {exc}") from exc
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError as exc:
            raise ValueError(f"entry point {spec!r}: {module_name!r} has no attribute {attr_path!r}") from exc
    if not callable(obj):
        raise ValueError(f"entry point {spec!r} is not callable (got {type(obj).__name__})")
    return obj
