"""Deterministic synthetic datasets: item ``i`` is a pure function of ``(seed, i)``.

Every rank (and every restart of a rank) sees the same samples without downloads or shared storage: each item is
drawn from a private ``torch.Generator`` seeded by hashing the dataset's seed, kind and index.
"""

from __future__ import annotations

import operator
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["SyntheticDataset", "SyntheticVectors", "SyntheticImages", "SyntheticTokens", "positive"]

# --------------------------------------------------------------------------
# Seeding helpers
# --------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1
# Streams keep the dataset's fixed parameters (teacher, prototypes, bigram
# table) statistically independent of the per-item draws.
_STREAM_PARAMS = 0
_STREAM_ITEMS = 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _mix_seed(*parts: int) -> int:
    """Hash integers into one generator seed.

    ``seed + index`` would make dataset(seed=1)[0] equal dataset(seed=0)[1];
    hashing the tuple avoids such overlaps.  Kept below 2**63 so any torch
    build accepts it.
    """
    h = 0
    for part in parts:
        h = _splitmix64(h ^ (part & _MASK64))
    return h & ((1 << 63) - 1)


def _generator(*parts: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(_mix_seed(*parts))
    return g


def positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


# --------------------------------------------------------------------------
# Synthetic datasets
# --------------------------------------------------------------------------


class SyntheticDataset(Dataset):
    """Base: fixed length, index normalisation, per-item generator.

    Constructors only check their options; a dataset's fixed tables (teacher, prototypes, bigram table) are
    drawn from its private generator on first use, on the CPU whatever the ambient device: the same values
    whenever that happens, and nothing built where nothing reads an item (``harness launch`` checking a
    config on the meta device).
    """

    _salt = 0  # distinguishes dataset kinds sharing a seed

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = positive("num_samples", num_samples)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def _item_generator(self, index: Any) -> torch.Generator:
        i = operator.index(index)
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {index} out of range for dataset of length {self.num_samples}")
        return _generator(self.seed, self._salt, _STREAM_ITEMS, i)

    def _param_generator(self) -> torch.Generator:
        return _generator(self.seed, self._salt, _STREAM_PARAMS)


class SyntheticVectors(SyntheticDataset):
    """Gaussian vectors labelled by a fixed random linear teacher.

    ``label = argmax(x @ W)`` is linearly separable, so any reasonable
    classifier drives the loss down -- useful to see training actually work.
    Items: ``(x float32[in_features], label int64[])``.
    """

    _salt = 1

    def __init__(self, num_samples: int, in_features: int, num_classes: int, seed: int = 0) -> None:
        super().__init__(num_samples, seed)
        self.in_features = positive("in_features", in_features)
        self.num_classes = positive("num_classes", num_classes)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")

    @cached_property
    def teacher(self) -> torch.Tensor:
        return torch.randn(self.in_features, self.num_classes, generator=self._param_generator(), device="cpu")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(self.in_features, generator=self._item_generator(index))
        label = torch.argmax(x @ self.teacher)
        return x, label.to(torch.int64)


class SyntheticImages(SyntheticDataset):
    """Noisy copies of one fixed random prototype image per class.

    The class is drawn per item, then ``x = prototype[label] + noise``; the
    prototypes are smooth-ish (upsampled from 1/4 resolution) so a small CNN
    picks them up quickly.  Items: ``(x float32[C, H, W], label int64[])``.
    """

    _salt = 2

    def __init__(
        self,
        num_samples: int,
        channels: int,
        height: int,
        width: int,
        num_classes: int,
        seed: int = 0,
        noise: float = 1.0,
    ) -> None:
        super().__init__(num_samples, seed)
        self.channels = positive("channels", channels)
        self.height = positive("height", height)
        self.width = positive("width", width)
        self.num_classes = positive("num_classes", num_classes)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.noise = float(noise)

    @cached_property
    def prototypes(self) -> torch.Tensor:
        h, w = self.height, self.width
        small = torch.randn(self.num_classes, self.channels, max(1, h // 4), max(1, w // 4),
                            generator=self._param_generator(), device="cpu")
        return F.interpolate(small, size=(h, w), mode="nearest")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = self._item_generator(index)
        label = torch.randint(self.num_classes, (), generator=g)
        noise = torch.randn(self.channels, self.height, self.width, generator=g)
        return self.prototypes[label] + self.noise * noise, label.to(torch.int64)


class SyntheticTokens(SyntheticDataset):
    """Token sequences from a fixed sparse random bigram chain.

    Each token has ``branching`` possible successors chosen at random (from
    the seed), picked uniformly; the best achievable loss is
    ``log(branching)`` versus ``log(vocab_size)`` for a fresh model, so
    learning is visible.  A sequence of ``seq_len + 1`` tokens is drawn and
    the item is ``(ids[:-1], ids[1:])``, both int64 of length ``seq_len``.
    """

    _salt = 3

    def __init__(self, num_samples: int, seq_len: int, vocab_size: int, seed: int = 0, branching: int = 4) -> None:
        super().__init__(num_samples, seed)
        self.seq_len = positive("seq_len", seq_len)
        self.vocab_size = positive("vocab_size", vocab_size)
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.branching = min(positive("branching", branching), vocab_size)

    @cached_property
    def successors(self) -> list[list[int]]:
        # A python list-of-lists: the per-item walk is a short Python loop and
        # list indexing there is much cheaper than tensor indexing.
        g = self._param_generator()
        return torch.randint(self.vocab_size, (self.vocab_size, self.branching), generator=g, device="cpu").tolist()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = self._item_generator(index)
        first = int(torch.randint(self.vocab_size, (), generator=g))
        choices = torch.randint(self.branching, (self.seq_len,), generator=g).tolist()
        ids = [first]
        for c in choices:
            ids.append(self.successors[ids[-1]][c])
        seq = torch.tensor(ids, dtype=torch.int64)
        return seq[:-1], seq[1:]
