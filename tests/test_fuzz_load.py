"""Property-based fuzzing of the load path (hypothesis): commit records, manifests and data files, made up from
scratch or mutated from a valid checkpoint. Every input either loads as a valid checkpoint or is refused with
harness.errors.CheckpointError (or a subclass): never another exception, never a write anywhere (not even
inside the checkpoint folder), never code execution (pickle payloads planted in every file stay inert).

The default example counts keep CI fast; ``pytest -m campaign tests/test_fuzz_load.py --fuzz-examples N`` runs
the same properties with many more examples.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpt_helpers import simple_run
from harness.checkpoint import CheckpointManager
from harness.checkpoint.discovery import list_checkpoints, open_checkpoint, verify_checkpoint
from harness.checkpoint.format import COMMIT_FILE, MANIFEST_FILE, dumps, make_commit, parse_commit, parse_manifest
from harness.checkpoint.load import read_state
from harness.errors import CheckpointError
from harness.storage import Storage

FAST = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)

MARKER = Path(tempfile.gettempdir()) / f"harness-fuzz-pwned-{os.getpid()}"


class _Boom:
    """Unpickling this creates MARKER: if the file ever exists, something unpickled checkpoint bytes."""

    def __reduce__(self):
        return (open, (str(MARKER), "w"))


PICKLE = pickle.dumps(_Boom())
TORCH_PICKLE = None


def _torch_payload() -> bytes:
    global TORCH_PICKLE
    if TORCH_PICKLE is None:
        import io
        buf = io.BytesIO()
        torch.save({"x": _Boom()}, buf)
        TORCH_PICKLE = buf.getvalue()
    return TORCH_PICKLE


# -- a valid checkpoint, as bytes ---------------------------------------------------------------------------

_VALID: dict | None = None


def valid_files() -> tuple[str, dict[str, bytes]]:
    """(folder name, {file: bytes}) of one small valid checkpoint (several data files)."""
    global _VALID
    if _VALID is None:
        url = f"memory://fuzz-src-{uuid.uuid4().hex}/run"
        model, opt, sched = simple_run(seed=3)
        mgr = CheckpointManager(url, keep_last=0, max_file_bytes=512)
        mgr.save(7, models=model, optimizers=opt, schedulers=sched, loss=0.5, metrics={"acc": 0.25}, epoch=1,
                 position={"cursor": 3})
        mgr.close()
        storage = Storage(url)
        name = list_checkpoints(storage)[-1].name
        _VALID = {"name": name, "files": {f: storage.read_bytes(f"{name}/{f}") for f in storage.listdir(name)}}
    return _VALID["name"], dict(_VALID["files"])


def _load_all(storage: Storage, name: str) -> None:
    """Everything a reader does: list, open, verify every checksum, decode the state of every rank."""
    list_checkpoints(storage, committed_only=False)
    open_checkpoint(storage, name)
    verify_checkpoint(storage, name, threads=2)
    read_state(storage, name, ranks=None)


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def check_loads_or_refuses(name: str, files: dict[str, bytes], local: bool = False) -> bool:
    """Write ``files`` as checkpoint ``name``; loading must succeed or raise CheckpointError, and write
    nothing. Returns True when it loaded."""
    if local:
        root = Path(tempfile.mkdtemp(prefix="harness-fuzz-"))
        url = str(root / "ck")
    else:
        root, url = None, f"memory://fuzz-{uuid.uuid4().hex}/ck"
    storage = Storage(url)
    try:
        storage.makedirs(name)
        for f, data in files.items():
            storage.write_bytes(f"{name}/{f}", data)
        before = _snapshot(root) if local else dict(MemoryFileSystem.store)
        try:
            _load_all(storage, name)
            loaded = True
        except CheckpointError:
            loaded = False
        after = _snapshot(root) if local else dict(MemoryFileSystem.store)
        assert after == before, "the load path wrote something"
        assert not MARKER.exists(), "a pickle payload was executed"
        return loaded
    finally:
        if local:
            shutil.rmtree(root, ignore_errors=True)
        else:
            for k in [k for k in MemoryFileSystem.store if k.startswith(url.removeprefix("memory:/"))]:
                MemoryFileSystem.store.pop(k, None)


# -- strategies ---------------------------------------------------------------------------------------------

json_scalar = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(1 << 70), max_value=1 << 70),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
                        st.sampled_from(["../../etc/passwd", "/abs/path", "data-r00000-000.bin", "manifest.json",
                                         "COMMIT", "float32", "int64", "bool", "..", "a/b", "\x00", "step-000000007",
                                         PICKLE.decode("latin-1"), "__reduce__", "xxh3_64", "0" * 16]))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                               st.dictionaries(st.text(max_size=8), inner,
                                                                               max_size=4)), max_leaves=12)
huge_ints = st.sampled_from([-1, 0, 1, 2**31, 2**32, 2**46, 2**63 - 1, 2**64, 10**30])


def _paths(obj, prefix=()):
    """Every (path, value) in a JSON tree."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _set(obj, path, value):
    if not path:
        return value
    node = obj
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return obj


@st.composite
def mutated_json(draw, doc: dict):
    """``doc`` with 1..4 nodes replaced by random JSON, huge integers, or deleted."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p, _ in _paths(doc)]
        path = draw(st.sampled_from(paths))
        how = draw(st.sampled_from(["value", "int", "delete"]))
        if how == "delete" and path:
            parent = doc
            for k in path[:-1]:
                parent = parent[k]
            del parent[path[-1]]
        else:
            doc = _set(doc, path, draw(huge_ints if how == "int" else json_value))
    return doc


@st.composite
def byte_mutation(draw, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "pickle", "append"]))
        pos = draw(st.integers(0, max(0, len(buf) - 1)))
        if how == "flip" and buf:
            buf[pos] ^= draw(st.integers(1, 255))
        elif how == "truncate":
            del buf[pos:]
        elif how == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif how == "delete":
            del buf[pos:pos + draw(st.integers(1, 16))]
        elif how == "pickle":
            buf[pos:pos] = draw(st.sampled_from([PICKLE, _torch_payload()[:4096]]))
        else:
            buf += draw(st.binary(max_size=64))
    return bytes(buf)


# -- properties ---------------------------------------------------------------------------------------------

def _parse_commit_ok(raw: bytes) -> None:
    try:
        parse_commit(raw)
    except CheckpointError:
        pass


def _parse_manifest_ok(raw: bytes, commit: dict) -> None:
    try:
        parse_manifest(raw, commit)
    except CheckpointError:
        pass


def _commit_for(raw_manifest: bytes) -> dict:
    """A commit record that vouches for these manifest bytes (so parsing goes past the checksum)."""
    try:
        manifest = json.loads(raw_manifest)
        files = manifest["files"] if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else {}
        summary = manifest if isinstance(manifest, dict) else {}
        step = summary.get("step", 7)
    except (ValueError, UnicodeDecodeError):
        files, summary, step = {}, {}, 7
    sizes_ok = all(isinstance(f, dict) and isinstance(f.get("size"), int) for f in files.values())
    doc = {"files": files if sizes_ok else {}, **{k: v for k, v in summary.items() if k != "files"}}
    raw = make_commit(doc, raw_manifest) if raw_manifest else dumps({})
    commit = json.loads(raw)
    commit["step"] = step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else 7
    return commit


def _fuzz_properties(s: settings):
    """The fuzz tests, with the given settings (small in CI, large in the campaign)."""

    @s
    @given(st.binary(max_size=2048))
    def commit_from_bytes(raw):
        _parse_commit_ok(raw)

    @s
    @given(st.data())
    def commit_from_mutated_valid(data):
        _, files = valid_files()
        doc = data.draw(mutated_json(json.loads(files[COMMIT_FILE])))
        _parse_commit_ok(json.dumps(doc).encode())

    @s
    @given(st.binary(max_size=4096))
    def manifest_from_bytes(raw):
        if raw:
            _parse_manifest_ok(raw, _commit_for(raw))

    @s
    @given(st.data())
    def manifest_from_mutated_valid(data):
        _, files = valid_files()
        doc = data.draw(mutated_json(json.loads(files[MANIFEST_FILE])))
        raw = json.dumps(doc).encode()
        _parse_manifest_ok(raw, _commit_for(raw))

    @s
    @given(st.data())
    def checkpoint_with_mutated_manifest_and_matching_commit(data):
        """A crafted checkpoint: manifest mutated, commit record recomputed to vouch for it (what an attacker
        can write), data files untouched or also mutated."""
        name, files = valid_files()
        doc = data.draw(mutated_json(json.loads(files[MANIFEST_FILE])))
        raw = json.dumps(doc).encode()
        files[MANIFEST_FILE] = raw
        files[COMMIT_FILE] = json.dumps(_commit_for(raw)).encode()
        if data.draw(st.booleans()):
            victim = data.draw(st.sampled_from(sorted(f for f in files if f.startswith("data-"))))
            files[victim] = data.draw(byte_mutation(files[victim]))
        check_loads_or_refuses(name, files, local=data.draw(st.booleans()))

    @s
    @given(st.data())
    def checkpoint_with_mutated_bytes(data):
        """Byte-level damage to any of a valid checkpoint's files (or several), on memory:// and local disk."""
        name, files = valid_files()
        for victim in data.draw(st.lists(st.sampled_from(sorted(files)), min_size=1, max_size=3, unique=True)):
            files[victim] = data.draw(byte_mutation(files[victim]))
        loaded = check_loads_or_refuses(name, files, local=data.draw(st.booleans()))
        if loaded:  # only harmless damage may load: a data file's alignment padding, a COMMIT summary field
            assert files[MANIFEST_FILE] == valid_files()[1][MANIFEST_FILE]

    @s
    @given(st.dictionaries(st.sampled_from([COMMIT_FILE, MANIFEST_FILE, "data-r00000-000.bin",
                                            "data-r00001-000.bin"]),
                           st.one_of(st.binary(max_size=512), st.just(PICKLE)), min_size=1))
    def checkpoint_from_random_files(files):
        check_loads_or_refuses("step-000000007", files)

    return [commit_from_bytes, commit_from_mutated_valid, manifest_from_bytes, manifest_from_mutated_valid,
            checkpoint_with_mutated_manifest_and_matching_commit, checkpoint_with_mutated_bytes,
            checkpoint_from_random_files]


PROPERTIES = [f.__name__ for f in _fuzz_properties(FAST)]


def test_valid_checkpoint_loads():
    name, files = valid_files()
    assert check_loads_or_refuses(name, files) and check_loads_or_refuses(name, files, local=True)


@pytest.mark.parametrize("prop", PROPERTIES)
def test_fuzz(prop):
    dict(zip(PROPERTIES, _fuzz_properties(FAST)))[prop]()
    assert not MARKER.exists()


@pytest.mark.campaign
@pytest.mark.parametrize("prop", PROPERTIES)
def test_fuzz_campaign(prop, request):
    n = request.config.getoption("--fuzz-examples")
    props = _fuzz_properties(settings(FAST, max_examples=n))
    dict(zip(PROPERTIES, props))[prop]()
    assert not MARKER.exists()
