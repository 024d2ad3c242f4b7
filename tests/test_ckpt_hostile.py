"""Hostile checkpoints: hand-made manifests with matching commit records (so every checksum agrees)
that try path traversal, absurd sizes and offsets, unknown dtypes and tags, deep nesting and pickle
payloads. Each is refused with a CheckpointError that says why, before any tensor byte is used, and no
code from the checkpoint ever runs."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import pickle
import tracemalloc

import pytest
import torch

from ckpt_helpers import Net, read_manifest, simple_run, write_manifest
from harness import CheckpointManager
from harness.checkpoint.discovery import open_checkpoint, verify_checkpoint
from harness.checkpoint.format import (MANIFEST_FILE, MAX_MANIFEST_BYTES, checksum, dumps, make_commit,
                                       parse_manifest)
from harness.errors import CheckpointError, CheckpointFormatError
from harness.storage import Storage

NAME = "step-000000001"


@pytest.fixture
def base(ckpt_url):
    """A genuine one-checkpoint folder and its parsed manifest, to be tampered with."""
    model, opt, _ = simple_run()
    CheckpointManager(ckpt_url).save(1, models=model, optimizers=opt)
    return ckpt_url, read_manifest(ckpt_url, NAME)


def _refused(url, match):
    """Both the verifier and restore refuse the checkpoint with a CheckpointError saying why."""
    with pytest.raises(CheckpointError, match=match) as exc:
        verify_checkpoint(Storage(url), NAME)
    with pytest.raises(CheckpointError, match=match):
        CheckpointManager(url).restore(models=Net(), optimizers=None)
    return exc.value


def _first(man):
    return man["tensors"][0]


def _retarget_file(man, new):
    old = _first(man)["file"]
    man["files"][new] = man["files"].pop(old)
    for e in man["tensors"]:
        if e["file"] == old:
            e["file"] = new


@pytest.mark.parametrize("fname", ["../evil.bin", "../../etc/passwd", "sub/x.bin", "/etc/passwd", "..", ".",
                                   "", "COMMIT", "manifest.json", "a\\..\\b", "data\x00.bin", "x" * 200])
def test_data_file_names_outside_the_folder(base, fname):
    url, man = base
    _retarget_file(man, fname)
    write_manifest(url, NAME, man)
    _refused(url, "refusing data file name")


@pytest.mark.parametrize("field,value,match", [
    ("offset", -1, "non-negative"),
    ("length", -4, "non-negative"),
    ("offset", 2 ** 62, "lie outside"),
    ("offset", 1.5, "non-negative integers"),
    ("offset", "0", "non-negative integers"),
    ("length", 2 ** 70, "length says"),
    ("shape", [2 ** 40, 2 ** 40], "length says"),
    ("shape", [-1], "shape must be"),
    ("shape", [1] * 40, "shape must be"),
    ("shape", "8", "shape must be"),
    ("dtype", "object", "unknown dtype"),
    ("dtype", "pickle", "unknown dtype"),
    ("dtype", None, "unknown dtype"),
    ("checksum", "../../x", "bad checksum"),
    ("file", "data-r00000-999.bin", "is not listed"),
    ("key", {"a": 1}, "valid key"),
])
def test_bad_tensor_entries(base, field, value, match):
    url, man = base
    _first(man)[field] = value
    write_manifest(url, NAME, man)
    _refused(url, match)


def test_offset_plus_length_beyond_the_file(base):
    url, man = base
    e = max(man["tensors"], key=lambda e: e["offset"])
    e["offset"] = man["files"][e["file"]]["size"] - e["length"] + 4  # 64-aligned no more, 4 bytes past the end
    write_manifest(url, NAME, man)
    _refused(url, "lie outside")


def test_shape_disagrees_with_length(base):
    url, man = base
    e = next(e for e in man["tensors"] if len(e["shape"]) == 2)
    e["shape"] = [e["shape"][0] + 1, e["shape"][1]]
    write_manifest(url, NAME, man)
    _refused(url, "length says")


def test_claimed_data_file_size_disagrees_with_storage(base):
    url, man = base
    f = _first(man)["file"]
    man["files"][f]["size"] += 1 << 40  # claims a terabyte: checked against the real size, nothing allocated
    write_manifest(url, NAME, man)
    _refused(url, "manifest says")


def test_huge_manifest_claimed_in_commit_is_refused_without_reading(base):
    url, man = base
    st = Storage(url)
    commit = json.loads(st.read_bytes(f"{NAME}/COMMIT"))
    commit["manifest"]["size"] = 300 << 20
    assert commit["manifest"]["size"] > MAX_MANIFEST_BYTES
    st.write_bytes(f"{NAME}/COMMIT", dumps(commit))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointFormatError, match="manifest size must be"):
            open_checkpoint(st, NAME)
        with pytest.raises(CheckpointError, match="manifest size must be"):
            CheckpointManager(url).restore(models=Net())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak


def test_huge_manifest_file_is_refused_from_its_size(tmp_path):
    """A manifest file of hundreds of MB (sparse) under a commit record that claims a sane size: the size
    is checked before a byte is read."""
    url = str(tmp_path / "ckpt")
    model, _, _ = simple_run()
    CheckpointManager(url).save(1, models=model)
    path = tmp_path / "ckpt" / NAME / MANIFEST_FILE
    with open(path, "r+b") as f:
        f.truncate(400 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="manifest.json is 419430400 bytes"):
            open_checkpoint(Storage(url), NAME)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak


def test_huge_commit_record_is_refused_from_its_size(tmp_path):
    url = str(tmp_path / "ckpt")
    model, _, _ = simple_run()
    CheckpointManager(url).save(1, models=model)
    with open(tmp_path / "ckpt" / NAME / "COMMIT", "r+b") as f:
        f.truncate(200 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="commit record is 209715200 bytes"):
            verify_checkpoint(Storage(url), NAME)
        with pytest.raises(CheckpointError, match="commit record is 209715200 bytes"):
            CheckpointManager(url).restore(models=Net())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak


def _nested(depth):
    tree = {"leaf": 1}
    for _ in range(depth):
        tree = {"x": tree}
    return tree


def test_state_nested_too_deep(base):
    url, man = base
    man["state"]["extra"] = {"deep": _nested(200)}
    write_manifest(url, NAME, man)
    _refused(url, "nested deeper")


def test_json_nested_beyond_the_parser(base):
    url, man = base
    raw = dumps(man)
    deep = b"[" * 200_000 + b"]" * 200_000
    raw = raw[:-1] + b',"junk":' + deep + b"}"
    write_manifest(url, NAME, man, raw=raw)
    _refused(url, "not valid JSON")


@pytest.mark.parametrize("tree", [
    {"__pickle__": "gASVKAAAAAAAAACMBXBvc2l4lIwGc3lzdGVtlJOUjAV0b3VjaJSFlFKULg=="},
    {"__class__": "os.system"},
    {"__tensor__": 5},
    {"__float__": "NaN!"},
    {"__dtype__": "nn"},
    {"__dtype__": "__builtins__"},
    {"__tuple__": "abc"},
    {"__dict__": [[1]]},
    {"__dict__": [[[1, 2], 3]]},
    {"__dict__": [[{"__tuple__": [[1]]}, 3]]},
    {"__tuple__": [], "x": 1},
])
def test_unknown_or_malformed_tags(base, tree):
    url, man = base
    man["state"]["extra"] = {"evil": tree}
    write_manifest(url, NAME, man)
    _refused(url, "tag|__dict__|unhashable|reference")


@pytest.mark.parametrize("where,value,match", [
    ("state", [1, 2], "must be objects"),
    ("state", None, "must be objects"),
    ("ranks", [[1]], "must be objects"),
    ("ranks", [], "one entry per rank"),
    ("epoch", "1", "bad epoch"),
    ("world_size", 0, "world_size"),
    ("step", 2, "disagrees"),
    ("files", [], "'files' must be"),
    ("tensors", {}, "'tensors' must be"),
    ("checksum_algorithm", "md5", "checksum algorithm"),
    ("metrics", {"x": {"__tensor__": "state/models/model/fc1.weight"}}, "refers to tensors"),
    ("loss", {"__eval__": "1"}, "tag"),
])
def test_malformed_manifest_structure(base, where, value, match):
    url, man = base
    original = copy.deepcopy(man)
    man[where] = value
    write_manifest(url, NAME, man, commit_from=original)
    _refused(url, match)


def test_state_refers_to_an_unlisted_tensor(base):
    url, man = base
    man["state"]["extra"] = {"t": {"__tensor__": "nowhere"}}
    write_manifest(url, NAME, man)
    _refused(url, "unknown tensors")


def test_duplicate_tensor_entries(base):
    url, man = base
    man["tensors"].append(copy.deepcopy(_first(man)))
    write_manifest(url, NAME, man)
    _refused(url, "listed twice")


class _Boom:
    """Unpickling this creates the marker file: proof that code from the checkpoint ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickle_payload_is_only_ever_raw_bytes(base, tmp_path):
    url, man = base
    marker = tmp_path / "PWNED"
    payloads = {
        "reduce": pickle.dumps(_Boom(str(marker))),
        "os_system": b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.",
    }
    st = Storage(url)
    for i, (kind, payload) in enumerate(payloads.items()):
        fname = f"data-r00000-9{i:02d}.bin"
        st.write_bytes(f"{NAME}/{fname}", payload)
        man["files"][fname] = {"size": len(payload), "rank": 0}
        key = f"state/extra/{kind}"
        man["tensors"].append({"key": key, "dtype": "uint8", "shape": [len(payload)], "file": fname, "offset": 0,
                               "length": len(payload), "checksum": checksum(payload), "rank": 0})
        man["state"]["extra"][kind] = {"__tensor__": key}
    write_manifest(url, NAME, man)

    verify_checkpoint(st, NAME)  # well-formed: a checkpoint holding bytes
    res = CheckpointManager(url).restore(models=Net())
    for kind, payload in payloads.items():
        t = res.extra[kind]
        assert isinstance(t, torch.Tensor) and t.dtype == torch.uint8
        assert t.numpy().tobytes() == payload
    assert not marker.exists()
    assert not os.path.exists("PWNED")


def test_tampered_manifest_without_matching_commit_is_refused(base):
    """Changing the manifest without rewriting the commit record is caught by the manifest checksum."""
    url, man = base
    man["state"]["extra"] = {"x": 1}
    raw = dumps(man)
    st = Storage(url)
    commit = json.loads(st.read_bytes(f"{NAME}/COMMIT"))
    raw = raw + b" " * (commit["manifest"]["size"] - len(raw)) if len(raw) < commit["manifest"]["size"] else raw
    st.write_bytes(f"{NAME}/{MANIFEST_FILE}", raw)
    _refused(url, "manifest")


def test_parse_manifest_directly_rejects_non_object():
    raw = b"[1, 2, 3]"
    commit = json.loads(make_commit({"files": {}}, raw))
    with pytest.raises(CheckpointFormatError, match="JSON object"):
        parse_manifest(raw, commit)
