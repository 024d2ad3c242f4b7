"""Built-in workloads: determinism, trainability, config validation, entry points."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from harness.data import BatchLoader, ResumableSampler
from harness.workloads import (
    GPT,
    WORKLOADS,
    SyntheticImages,
    SyntheticTokens,
    SyntheticVectors,
    Workload,
    build_workload,
    list_workloads,
    load_entry_point,
)

# Small sizes keep every test well under a second on a CPU.
SMALL_DATA = {
    "synthetic_vectors": {"num_samples": 64, "in_features": 8, "num_classes": 3},
    "synthetic_images": {"num_samples": 32, "channels": 3, "height": 8, "width": 8, "num_classes": 4},
    "synthetic_tokens": {"num_samples": 32, "seq_len": 12, "vocab_size": 20},
}
SMALL_MODEL = {
    "mlp": {"hidden": 16},
    "cnn": {"width": 4},
    "gpt": {"d_model": 16, "n_layers": 2, "n_heads": 2},
}
COMBOS = [(m, d) for m, datas in WORKLOADS.items() for d in datas]


def _build(model: str, data: str, seed: int = 0, **model_opts) -> Workload:
    return build_workload(
        {"name": model, **SMALL_MODEL[model], **model_opts}, {"name": data, **SMALL_DATA[data]}, seed
    )


def _first_batch(w: Workload, batch_size: int = 8) -> tuple[torch.Tensor, ...]:
    return next(iter(BatchLoader(w.dataset, ResumableSampler(len(w.dataset), seed=0), batch_size)))


def _datasets(seed: int) -> list[torch.utils.data.Dataset]:
    return [
        SyntheticVectors(16, 5, 3, seed),
        SyntheticImages(16, 2, 6, 6, 3, seed),
        SyntheticTokens(16, 9, 11, seed),
    ]


def _items_equal(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------- datasets


@pytest.mark.parametrize("which", range(3))
def test_items_identical_across_instances_and_access_order(which: int) -> None:
    a, b = _datasets(5)[which], _datasets(5)[which]
    forward = [a[i] for i in range(len(a))]
    backward = [b[i] for i in reversed(range(len(b)))][::-1]
    assert all(isinstance(item, tuple) and all(isinstance(t, torch.Tensor) for t in item) for item in forward)
    assert all(_items_equal(x, y) for x, y in zip(forward, backward))
    assert _items_equal(a[-1], a[len(a) - 1])
    with pytest.raises(IndexError):
        a[len(a)]


@pytest.mark.parametrize("which", range(3))
def test_items_depend_on_seed_and_index_but_not_global_rng(which: int) -> None:
    ds, other = _datasets(5)[which], _datasets(6)[which]
    assert not _items_equal(ds[0], other[0])
    assert not all(_items_equal(ds[0], ds[i]) for i in range(1, 4))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = ds[3]
    assert torch.equal(torch.get_rng_state(), before), "dataset touched the global RNG"
    torch.manual_seed(999)
    assert _items_equal(first, ds[3])


def test_token_items_are_shifted_next_token_pairs_with_bigram_structure() -> None:
    ds = SyntheticTokens(8, seq_len=10, vocab_size=13, seed=0)
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == y.dtype == torch.int64
        assert x.shape == y.shape == (10,)
        assert torch.equal(x[1:], y[:-1])
        assert int(torch.cat([x, y]).max()) < 13
        for prev, nxt in zip(x.tolist(), y.tolist()):
            assert nxt in ds.successors[prev]


def test_vector_and_image_items_shapes_and_label_ranges() -> None:
    x, y = SyntheticVectors(4, 5, 3, 0)[0]
    assert x.shape == (5,) and x.dtype == torch.float32 and y.dtype == torch.int64 and 0 <= int(y) < 3
    x, y = SyntheticImages(4, 2, 6, 7, 3, 0)[1]
    assert x.shape == (2, 6, 7) and y.shape == () and 0 <= int(y) < 3


# ------------------------------------------------------------------ models


@pytest.mark.parametrize("model, data", COMBOS)
def test_every_workload_runs_forward_and_backward(model: str, data: str) -> None:
    w = _build(model, data)
    inputs, target = _first_batch(w)
    out = w.model(inputs)
    loss = w.loss_fn(out, target)
    assert loss.dim() == 0 and math.isfinite(loss.item())
    loss.backward()
    grads = [p.grad for p in w.model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    metrics = w.metric_fn(out, target)
    assert isinstance(metrics["accuracy"], float) and 0.0 <= metrics["accuracy"] <= 1.0


@pytest.mark.parametrize("model, data", COMBOS)
def test_model_weights_are_a_function_of_the_seed_only(model: str, data: str) -> None:
    torch.manual_seed(1)
    a = _build(model, data, seed=3).model.state_dict()
    torch.manual_seed(2)
    rng_before = torch.get_rng_state()
    b = _build(model, data, seed=3).model.state_dict()
    assert torch.equal(torch.get_rng_state(), rng_before), "build_workload perturbed the global RNG"
    c = _build(model, data, seed=4).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_mlp_loss_goes_down_with_a_few_optimizer_steps() -> None:
    w = build_workload({"name": "mlp", "hidden": 32}, {"name": "synthetic_vectors", "num_samples": 256}, seed=0)
    loader = BatchLoader(w.dataset, ResumableSampler(len(w.dataset), seed=0), batch_size=64)
    opt = torch.optim.Adam(w.model.parameters(), lr=1e-2)
    eval_x, eval_y = next(iter(BatchLoader(w.dataset, ResumableSampler(len(w.dataset), seed=99), 256)))
    with torch.no_grad():
        before = w.loss_fn(w.model(eval_x), eval_y).item()
    for epoch in range(5):
        loader.sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            w.loss_fn(w.model(x), y).backward()
            opt.step()
    with torch.no_grad():
        after = w.loss_fn(w.model(eval_x), eval_y).item()
    assert after < 0.7 * before


def test_gpt_is_causal_and_ties_weights() -> None:
    torch.manual_seed(0)
    model = GPT(vocab_size=17, seq_len=8, d_model=16, n_layers=1, n_heads=4).eval()
    ids = torch.randint(17, (2, 8))
    changed = ids.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 17
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert a.shape == (2, 8, 17)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)  # the past ignores the future
    assert not torch.allclose(a[:, 5:], b[:, 5:])
    assert model.head.weight is model.tok_emb.weight
    untied = GPT(17, 8, 16, 1, 4, tie_weights=False)
    assert untied.head.weight is not untied.tok_emb.weight
    with pytest.raises(ValueError, match="divisible"):
        GPT(17, 8, 10, 1, 4)


# ------------------------------------------------------------------ config


def test_shapes_are_taken_from_the_data_or_pushed_into_it() -> None:
    w = build_workload(
        {"name": "gpt", "d_model": 16, "n_heads": 2}, {"name": "synthetic_tokens", "vocab_size": 30, "seq_len": 6}, 0
    )
    assert w.model.tok_emb.num_embeddings == 30 and w.model.seq_len == 6
    w = build_workload(
        {"name": "mlp", "in_features": 5, "num_classes": 7}, {"name": "synthetic_vectors", "num_samples": 8}, 0
    )
    assert w.dataset.in_features == 5 and w.dataset.num_classes == 7
    assert w.model(w.dataset[0][0].unsqueeze(0)).shape == (1, 7)
    w = build_workload({"name": "mlp"}, {"name": "synthetic_images", **SMALL_DATA["synthetic_images"]}, 0)
    assert w.model.net[0].in_features == 3 * 8 * 8


def test_dataset_seed_defaults_to_build_seed_and_can_be_overridden() -> None:
    data = {"name": "synthetic_vectors", "num_samples": 8}
    assert build_workload({"name": "mlp"}, data, 5).dataset.seed == 5
    assert build_workload({"name": "mlp"}, {**data, "seed": 1}, 5).dataset.seed == 1


@pytest.mark.parametrize(
    "model_cfg, data_cfg, match",
    [
        ({"name": "resnet"}, {"name": "synthetic_vectors"}, r"'resnet'.*mlp, cnn, gpt"),
        ({"name": "mlp"}, {"name": "imagenet"}, r"'imagenet'.*synthetic_vectors"),
        ({"hidden": 3}, {"name": "synthetic_vectors"}, "name"),
        ({"name": "mlp", "hiden": 3}, {"name": "synthetic_vectors"}, r"'hiden'.*valid options: hidden"),
        ({"name": "mlp"}, {"name": "synthetic_vectors", "samples": 3}, r"'samples'.*num_samples"),
        ({"name": "gpt"}, {"name": "synthetic_vectors"}, r"'gpt'.*synthetic_tokens"),
        ({"name": "cnn"}, {"name": "synthetic_tokens"}, r"'cnn'.*synthetic_images"),
        ({"name": "gpt", "vocab_size": 10}, {"name": "synthetic_tokens", "vocab_size": 12}, "vocab_size"),
        ({"name": "mlp", "in_features": 5}, {"name": "synthetic_images"}, "in_features"),
        ({"name": "mlp", "hidden": 0}, {"name": "synthetic_vectors"}, "hidden"),
        ({"name": "gpt", "n_heads": 3}, {"name": "synthetic_tokens"}, "n_heads"),
        ("mlp", {"name": "synthetic_vectors"}, "dict"),
    ],
)
def test_bad_config_raises_one_line_value_error(model_cfg, data_cfg, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        build_workload(model_cfg, data_cfg, 0)
    assert "\n" not in str(info.value)


def test_build_does_not_mutate_the_configs() -> None:
    model_cfg = {"name": "mlp", "in_features": 5}
    data_cfg = {"name": "synthetic_vectors", "num_samples": 8}
    build_workload(model_cfg, data_cfg, 0)
    assert model_cfg == {"name": "mlp", "in_features": 5}
    assert data_cfg == {"name": "synthetic_vectors", "num_samples": 8}


def test_list_workloads_mentions_every_model_and_dataset() -> None:
    text = "\n".join(list_workloads())
    for name in ["mlp", "cnn", "gpt", "synthetic_vectors", "synthetic_images", "synthetic_tokens"]:
        assert name in text


# ------------------------------------------------------------- entry point


def test_load_entry_point_imports_a_user_builder(tmp_path, monkeypatch) -> None:
    pkg = tmp_path / "userpkg_wl"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "builders.py").write_text(
        textwrap.dedent(
            """
            import torch
            from harness.workloads import Workload, SyntheticVectors

            NOT_CALLABLE = 3

            def build(model_cfg, data_cfg, seed):
                torch.manual_seed(seed)
                ds = SyntheticVectors(8, 4, 2, seed)
                return Workload(torch.nn.Linear(4, 2), ds, torch.nn.functional.cross_entropy)

            class Factory:
                @staticmethod
                def make(model_cfg, data_cfg, seed):
                    return build(model_cfg, data_cfg, seed)
            """
        )
    )
    (tmp_path / "broken_wl.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    fn = load_entry_point("userpkg_wl.builders:build")
    w = fn({}, {}, 0)
    assert isinstance(w, Workload) and len(w.dataset) == 8
    assert load_entry_point("userpkg_wl.builders:Factory.make")({}, {}, 0).model.out_features == 2

    with pytest.raises(ValueError, match="package.module:function"):
        load_entry_point("userpkg_wl.builders.build")
    with pytest.raises(ValueError, match="package.module:function"):
        load_entry_point("a:b:c")
    with pytest.raises(ValueError, match="cannot import.*no_such_module_xyz"):
        load_entry_point("no_such_module_xyz:build")
    with pytest.raises(ValueError, match="boom at import"):
        load_entry_point("broken_wl:build")
    with pytest.raises(ValueError, match="no attribute 'missing'"):
        load_entry_point("userpkg_wl.builders:missing")
    with pytest.raises(ValueError, match="not callable"):
        load_entry_point("userpkg_wl.builders:NOT_CALLABLE")


def _linear_workload(model_cfg, data_cfg, seed):
    return Workload(torch.nn.Linear(4, 2), SyntheticVectors(8, 4, 2, seed), torch.nn.functional.cross_entropy)


@pytest.mark.parametrize("builder, message", [
    (lambda model_cfg: None, "cannot be called as build(model_cfg: dict, data_cfg: dict, seed: int)"),
    (lambda a, b, c, d: None, "cannot be called as build"),
    (lambda m, d, s: None, "returned NoneType, not a harness.workloads.Workload"),
    (lambda m, d, s: (torch.nn.Linear(4, 2), [], None), "returned tuple, not a harness.workloads.Workload"),
    (lambda m, d, s: Workload("net", iter([]), 3, metric_fn=4),
     "model is str, not a torch.nn.Module; dataset (list_iterator) is not map-style (no __len__/__getitem__); "
     "loss_fn is not callable; metric_fn is neither None nor callable"),
])
def test_a_builder_that_cannot_work_is_a_config_error_before_training(builder, message) -> None:
    """Wrong signature or a wrong result: a ConfigError naming the problem (exit 2, never retried), instead of a
    TypeError/AttributeError in every worker on every restart (exit 1 after the agent's restarts)."""
    from harness.config import Config
    from harness.errors import ConfigError
    from harness.recipe import workload
    with pytest.raises(ConfigError) as caught:
        workload(Config(), builder)
    assert message in str(caught.value)


def test_builders_of_every_valid_shape_are_called() -> None:
    """Defaults, *args and keyword-or-positional parameters all bind; a TypeError raised inside a builder is the
    builder's own error, not a signature error."""
    from harness.config import Config
    from harness.recipe import workload

    def with_default(model_cfg, data_cfg, seed, extra=None):
        return _linear_workload(model_cfg, data_cfg, seed)

    def raises_inside(model_cfg, data_cfg, seed):
        return len(seed)  # a bug in the user's code

    for ok in (_linear_workload, with_default, lambda *a: _linear_workload(*a)):
        assert isinstance(workload(Config(), ok).model, torch.nn.Linear)
    with pytest.raises(TypeError, match="has no len"):
        workload(Config(), raises_inside)


def test_schedule_changes_name_what_shapes_the_schedule_and_nothing_else() -> None:
    from harness.config import load
    from harness.recipe import safe_metadata, schedule_changes
    cosine = load(None, ["scheduler.name='cosine'", "train.max_steps=100"])
    saved = safe_metadata(cosine)["config"]
    assert schedule_changes(saved, cosine) == []
    assert schedule_changes(None, cosine) == [] and schedule_changes({}, cosine) == []  # nothing saved: silent
    longer = load(None, ["scheduler.name='cosine'", "train.max_steps=200", "scheduler.gamma=0.9"])
    assert schedule_changes(saved, longer) == ["train.max_steps 100 -> 200"]  # gamma does not shape cosine
    stepped = load(None, ["scheduler.name='step'", "train.max_steps=200", "scheduler.gamma=0.9"])
    assert schedule_changes(saved, stepped) == ["scheduler.name 'cosine' -> 'step'", "scheduler.gamma 0.5 -> 0.9",
                                                "train.max_steps 100 -> 200"]
    constant = load(None, ["scheduler.name='none'", "train.max_steps=200"])
    assert schedule_changes(safe_metadata(constant)["config"], load(None, ["scheduler.name='none'"])) == []


def test_train_from_python_takes_a_config_its_dict_or_a_toml_path(tmp_path) -> None:
    """`harness.trainer.train(...)` given a TOML path or the dict TOML gives failed with "'str' object has no
    attribute 'train'"; a 'module:function' string as the builder with "'str' object is not callable" once
    training was set up. Paths and dicts are read as `harness train` reads them; the rest is a TypeError."""
    from trainer_helpers import python_c
    (tmp_path / "c.toml").write_text('[train]\nmax_steps = 2\n[checkpoint]\ndir = "ck-a"\nevery_steps = 1\n')
    script = (
        "import pathlib, pytest, harness.config as config\n"
        "from harness.trainer import train\n"
        "assert train(pathlib.Path('c.toml')) == 0\n"
        "assert train({'train': {'max_steps': 3}, 'checkpoint': {'dir': 'ck-b'}}) == 0\n"
        "for bad, message in [((42,), 'train takes a Config, a dict or a TOML'),\n"
        "                     ((config.Config(), 'pkg:build'), 'goes in train.entry')]:\n"
        "    with pytest.raises(TypeError, match=message):\n"
        "        train(*bad)\n"
        "assert config.load(None, 'train.max_steps=5').train.max_steps == 5\n"
        "print('ok')\n")
    assert python_c(script, tmp_path, timeout=300).stdout.strip().endswith("ok")
    assert (tmp_path / "ck-a" / "step-000000002" / "COMMIT").exists()
    assert (tmp_path / "ck-b" / "step-000000003" / "COMMIT").exists()


def test_training_state_bytes_counts_weights_grads_and_moments_as_sharded() -> None:
    from harness.config import load
    from harness.recipe import training_state_bytes, workload
    sets = ["model.name='gpt'", "data.name='synthetic_tokens'", "model.d_model=64", "model.n_layers=2",
            "model.n_heads=4"]
    cfg = load(None, sets)
    model = workload(cfg, deferred=True).model  # the meta device: nothing allocated
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert training_state_bytes(cfg, model, 4) == weights * 4  # weights, grads, AdamW's two moments
    assert training_state_bytes(load(None, [*sets, "optim.name='sgd'"]), model, 4) == weights * 3
    assert training_state_bytes(load(None, [*sets, "optim.name='sgd'", "optim.momentum=0"]), model, 4) == weights * 2
    assert training_state_bytes(load(None, [*sets, "train.parallel='zero'"]), model, 4) == weights * 2 + weights // 2
    assert training_state_bytes(load(None, [*sets, "train.parallel='fsdp'"]), model, 4) == weights


def test_a_cpu_run_too_large_for_the_host_is_warned_about_before_any_worker(capsys) -> None:
    """Each rank failed at its first large allocation ("out of host memory"), restarted into the same failure."""
    from harness import launch
    from harness.config import load
    from harness.hostinfo import available_memory
    assert available_memory() is not None and available_memory() > 0  # Linux: MemAvailable (cgroup v2 limit)
    launch._warn_host_memory(load(None, ["train.device='cpu'"]), 10 ** 15, 2)  # a petabyte a rank: no host has it
    err = capsys.readouterr().err
    assert err.startswith("harness launch: warning: 2 rank(s) on this node need at least 2000000.0 GB for the "
                          "model's weights, gradients and adamw state on the CPU (1000000.0 GB each, before "
                          "activations); ") and err.rstrip().endswith("available: expect 'out of host memory'"), err
    launch._warn_host_memory(load(None, ["train.device='cpu'"]), 1 << 20, 2)  # 1 MiB a rank: nothing to say
    assert capsys.readouterr().err == ""


def test_a_builder_beside_the_config_is_found_by_the_console_script(tmp_path) -> None:
    """`harness train --set train.entry=mymod:build` with mymod.py in the working directory: the console script
    (unlike `python -m harness`) has no working directory on sys.path: "No module named 'mymod'", exit 2. It is
    searched last now, as `python -m` would find it, without shadowing an installed module."""
    from trainer_helpers import python_c
    (tmp_path / "mymod_wl.py").write_text("def build(model_cfg, data_cfg, seed):\n    return None\n")
    (tmp_path / "colorsys.py").write_text("raise SystemExit('the stdlib colorsys was shadowed')\n")
    script = ("import os, sys\n"
              "sys.path[:] = [p for p in sys.path if p not in ('', os.getcwd())]  # as the console script starts\n"
              "from harness.workloads import load_entry_point\n"
              "assert load_entry_point('mymod_wl:build').__module__ == 'mymod_wl'\n"
              "assert sys.path[-1] == os.getcwd()\n"
              "assert 'colorsys' not in sys.modules\n"
              "import colorsys; assert colorsys.__file__.startswith(sys.base_prefix), colorsys.__file__\n"
              "print('ok')\n")
    assert python_c(script, tmp_path).stdout.strip() == "ok"
