"""One suite every storage backend runs: local disk, memory:// (generic fsspec) and S3 (moto over HTTP).

Covers the Backend protocol through the Storage facade (write, read, ranged reads, list, remove), the
durability contract (the commit record is written last and atomically), abort_incomplete_uploads, errors,
the registry (a new backend is one registration) and the lazy import of the S3 stack."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import threading
import uuid

import fsspec
import pytest
import torch

from harness import CheckpointManager, faults
from harness.checkpoint.discovery import list_checkpoints
from harness.checkpoint.format import COMMIT_FILE, MANIFEST_FILE
from harness.errors import StorageError
from harness.storage import Backend, Storage, atomic_file, atomic_write, open_url, register
from harness.storage.fsspec_backend import open_fsspec
from harness.storage.redact import Redactor, one_line, redact_url

KINDS = ["local", "memory", "s3"]
SMALL_PARTS = {"harness_part_size_mb": 16 / 1024, "harness_max_concurrency": 3}


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def url(kind, tmp_path, request):
    if kind == "local":
        yield str(tmp_path / "store")
    elif kind == "memory":
        u = f"memory://backends-{uuid.uuid4().hex}"
        yield u
        fsspec.filesystem("memory").rm(u, recursive=True) if fsspec.filesystem("memory").exists(u) else None
    else:
        yield request.getfixturevalue("s3_url")


@pytest.fixture
def store(url) -> Storage:
    st = Storage(url, SMALL_PARTS)
    st.check_access(write=True)
    return st


def test_every_backend_satisfies_the_protocol(store):
    assert isinstance(store.backend, Backend)


def test_write_read_list_remove(store):
    store.makedirs("a")
    with store.open_write("a/data.bin") as f:
        f.write(b"x" * 100_000)                 # several 16 KiB parts on S3
        f.write(memoryview(b"yz"))
    store.write_bytes("a/small", b"abc")
    store.sync_dir("a")
    store.commit_bytes("a/COMMIT", b"{}")
    store.refresh()
    assert store.listdir() == ["a"]
    assert store.listdir("a") == ["COMMIT", "data.bin", "small"]
    assert store.listdir("nope") == []
    assert store.is_dir("a") and store.is_dir() and not store.is_dir("a/small") and not store.is_dir("nope")
    assert store.exists("a") and store.exists("a/small") and not store.exists("a/nope")
    assert store.size("a/data.bin") == 100_002 and store.size("a/small") == 3 and store.size("a/nope") is None
    assert store.du("a") == 100_002 + 3 + 2
    assert store.read_bytes("a/small") == b"abc" and store.read_bytes("a/COMMIT") == b"{}"
    store.remove("a/small")
    assert store.listdir("a") == ["COMMIT", "data.bin"]
    store.remove_tree("a")
    assert store.listdir() == [] and not store.exists("a")


def test_a_child_folder_is_a_storage_on_the_same_backend(store):
    store.makedirs("sub/inner")
    store.write_bytes("sub/inner/x", b"abc")
    store.write_bytes("sub/y", b"de")
    child = store.child("sub")
    assert child.backend is store.backend and child.url == f"{store.url.rstrip('/')}/sub"
    assert child.listdir() == ["inner", "y"] and child.read_bytes("inner/x") == b"abc"
    assert {k: v for k, v in child.list_tree("").items() if v is not None} == {"inner/x": 3, "y": 2}
    with pytest.raises(StorageError, match="leaves the checkpoint folder"):
        store.child("../elsewhere")


def test_list_tree_is_one_listing_with_sizes(store, kind):
    """Discovery's one listing: every file under a folder with its size (folders as None where the store
    has them; S3 has only objects), by path relative to the folder; empty for a folder that is not there."""
    store.makedirs("s/a")
    store.write_bytes("s/a/data.bin", b"x" * 1000)
    store.commit_bytes("s/a/COMMIT", b"{}")
    store.makedirs("s/b/c")
    store.write_bytes("s/b/c/deep", b"yz")
    store.write_bytes("s/top", b"")
    store.write_bytes("elsewhere", b"not under s")
    store.refresh()
    files = {"a/data.bin": 1000, "a/COMMIT": 2, "b/c/deep": 2, "top": 0}
    folders = {} if kind == "s3" else {"a": None, "b": None, "b/c": None}
    assert store.list_tree("s") == {**files, **folders}
    assert store.list_tree("s/b") == {"c/deep": 2, **({} if kind == "s3" else {"c": None})}
    assert store.list_tree("nope") == {} and store.list_tree("s/top") == {}



def test_list_tree_prefix_lists_only_matching_entries(store, kind, monkeypatch):
    """Discovery lists ``step-*`` only: other things a user keeps in the checkpoint folder (a TensorBoard
    tree, exports) are not in the answer, and are not walked: on S3 the request's Prefix is narrowed, on
    walked stores no folder outside the prefix is listed."""
    for rel in ("step-1/a", "step-1/sub/b", "step-2/COMMIT", "stepx", "tb/step-9/ev", "tb/deep/more/x"):
        store.makedirs(os.path.dirname(f"s/{rel}"))
        store.write_bytes(f"s/{rel}", b"12")
    store.refresh()
    want = {"step-1/a": 2, "step-1/sub/b": 2, "step-2/COMMIT": 2}
    listed: list[str] = []
    if kind != "s3":
        want.update({"step-1": None, "step-1/sub": None, "step-2": None})
        owner, attr = (os, "scandir") if kind == "local" else (store.backend.fs, "ls")  # local: os.scandir
        real = getattr(owner, attr)

        def spy(path, *args, **kwargs):  # records what the walk opens; the listing itself is the real one
            listed.append(str(path))
            return real(path, *args, **kwargs)
        monkeypatch.setattr(owner, attr, spy)
    assert store.list_tree("s", prefix="step-") == want
    assert kind == "s3" or any(p.endswith("step-1/sub") for p in listed), listed  # the spy saw the walk
    assert not any("/tb" in p for p in listed), listed
    assert store.list_tree("s", prefix="none-") == {} and store.list_tree("nope", prefix="step-") == {}


def test_ranged_reads(store):
    data = random.Random(1).randbytes(200_003)
    with store.open_write("blob") as f:
        f.write(data)
    assert store.read_bytes("blob") == data
    assert store.read_bytes("blob", 12_345, 99_999) == data[12_345:99_999]
    assert store.read_bytes("blob", 200_000) == data[200_000:]
    assert store.read_bytes("blob", 5, 5) == b""
    with store.open_read("blob") as f:
        assert f.seekable()
        f.seek(150_000)
        small = bytearray(10)
        assert f.readinto(small) == 10 and small == data[150_000:150_010]
        big = bytearray(40_000)                  # more than a part: straight ranged GETs on S3
        assert f.readinto(big) == 40_000 and big == data[150_010:190_010]
        f.seek(-3, io.SEEK_END)
        assert f.read() == data[-3:]
        f.seek(0)
        assert f.read(4) == data[:4]


def test_open_url_reads_one_file_by_url(store):
    """What the importer and inference use for a single file: any backend, by URL, seekable."""
    store.makedirs("sub")
    store.write_bytes("sub/model.pt", b"0123456789")
    with open_url(f"{store.url}/sub/model.pt", SMALL_PARTS) as f:
        f.seek(4)
        assert f.read() == b"456789"
    with pytest.raises(FileNotFoundError):
        open_url(f"{store.url}/sub/missing.pt", SMALL_PARTS)
    assert not Storage(f"{store.url}/sub/model.pt").is_dir() and Storage(f"{store.url}/sub").is_dir()


def test_commit_is_atomic_under_concurrent_readers(store):
    """Readers never see a torn or empty record while it is replaced again and again."""
    records = [bytes([i]) * 70_000 for i in range(12)]   # over the one-PUT body threshold on S3
    store.commit_bytes("COMMIT", records[0])
    seen: list[bytes] = []
    stop = threading.Event()

    def read() -> None:
        reader = Storage(store.url, SMALL_PARTS)
        while not stop.is_set():
            seen.append(reader.read_bytes("COMMIT"))

    t = threading.Thread(target=read)
    t.start()
    try:
        for r in records[1:]:
            store.commit_bytes("COMMIT", r)
    finally:
        stop.set()
        t.join()
    assert seen and all(s in records for s in seen)
    assert store.read_bytes("COMMIT") == records[-1]
    assert store.listdir() == ["COMMIT"]          # no temp file left behind


def test_commit_record_is_written_last(url):
    """A save killed just before its commit record leaves an uncommitted folder no reader loads; the
    record appears only after the data and manifest exist."""
    seen: dict[str, list[str]] = {}
    storage = Storage(url, SMALL_PARTS)

    def hook(name: str, info: dict) -> None:
        if name in ("save.before_commit", "save.after_commit"):
            folder = [n for n in storage.listdir() if n.startswith("step-")][-1]
            seen[name] = storage.listdir(folder)
        if name == "save.before_commit" and info.get("step") == 2:
            raise faults.FaultInjected("killed before the commit record")

    model = torch.nn.Linear(64, 64)
    mgr = CheckpointManager(url, storage_options=SMALL_PARTS)
    faults.install(hook)
    try:
        mgr.save(1, models=model)
        assert COMMIT_FILE not in seen["save.before_commit"] and MANIFEST_FILE in seen["save.before_commit"]
        assert any(n.startswith("data-") for n in seen["save.before_commit"])
        assert COMMIT_FILE in seen["save.after_commit"]
        with pytest.raises(Exception, match="killed before the commit record"):
            mgr.save(2, models=model)
            mgr.wait()
    finally:
        faults.install(None)
        mgr.close()
    assert [i.step for i in list_checkpoints(storage)] == [1]
    assert [i.step for i in list_checkpoints(storage, committed_only=False)] == [1, 2]


def test_abort_incomplete_uploads(store, kind, request):
    if kind != "s3":
        assert store.abort_incomplete_uploads() == [] and store.abort_incomplete_uploads("step-1") == []
        return
    server = request.getfixturevalue("s3_server")
    bucket, prefix = store.url[len("s3://"):].split("/", 1)
    client = server.client()
    inside = f"{prefix}/step-000000002/data-r00000-000.bin"
    outside = f"elsewhere/{uuid.uuid4().hex}.bin"
    for key in (inside, outside):
        up = client.create_multipart_upload(Bucket=bucket, Key=key)
        client.upload_part(Bucket=bucket, Key=key, UploadId=up["UploadId"], PartNumber=1, Body=b"z" * 1000)
    assert store.abort_incomplete_uploads("step-000000001") == []
    assert store.abort_incomplete_uploads() == [f"s3://{bucket}/{inside}"]
    assert [u["Key"] for u in server.uploads(bucket)] == [outside]


def test_errors(store, kind):
    with pytest.raises(FileNotFoundError):
        store.read_bytes("missing")
    with pytest.raises(FileNotFoundError):
        store.open_read("missing")
    with pytest.raises(StorageError, match="leaves the checkpoint folder"):
        store.path("../escape")
    with pytest.raises(StorageError, match="unknown storage option"):
        Storage(store.url, {"harness_part_sise_mb": 1})


def test_unusable_root_is_one_line(kind, tmp_path, request):
    if kind == "local":
        (tmp_path / "file").write_bytes(b"not a folder")
        url = str(tmp_path / "file")
    elif kind == "memory":
        url = f"memory://backends-{uuid.uuid4().hex}/file"
        fsspec.filesystem("memory").pipe_file(url, b"not a folder")
    else:
        request.getfixturevalue("s3_server")
        url = f"s3://harness-missing-{uuid.uuid4().hex[:8]}/run"
    with pytest.raises(StorageError) as info:
        Storage(url).check_access(write=True)
    assert "\n" not in str(info.value) and redact_url(url).split("://")[-1].split("/")[0] in str(info.value)


# -- one atomic local writer ---------------------------------------------------------------------------

def test_atomic_write_and_file_keep_the_old_file_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write(target, lambda f: f.write(b"first"))
    with pytest.raises(RuntimeError):
        atomic_write(target, lambda f: (f.write(b"half"), (_ for _ in ()).throw(RuntimeError("died"))))
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            torch.save({"x": 1}, tmp)
            raise RuntimeError("died after writing")
    assert target.read_bytes() == b"first" and os.listdir(tmp_path) == ["out.bin"]
    with atomic_file(target) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)
        torch.save({"x": 2}, tmp)
    assert torch.load(target)["x"] == 2 and os.listdir(tmp_path) == ["out.bin"]


# -- the registry and lazy imports -----------------------------------------------------------------------

def test_a_new_backend_is_one_registration():
    register("tier", lambda url, options, tuning, secrets: open_fsspec(url.replace("tier://", "memory://"),
                                                                        options, tuning, secrets))
    url = f"tier://reg-{uuid.uuid4().hex}"
    st = Storage(url)
    st.check_access(write=True)
    st.commit_bytes("COMMIT", b"ok")
    assert Storage(url.replace("tier://", "memory://")).read_bytes("COMMIT") == b"ok"


def test_s3_stack_is_imported_only_for_s3_urls():
    code = ("import sys, harness\n"
            "from harness.storage import Storage\n"
            "Storage('memory://lazy').listdir(); Storage('.').listdir()\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('s3fs', 'botocore', 'aiobotocore', 'boto3')\n"
            "       or m.startswith('harness.storage.s3')]\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- one redactor ---------------------------------------------------------------------------------------

def test_redactor_blanks_every_kind_of_secret():
    assert redact_url("s3://AKIA:pw@bucket/x") == "s3://***@bucket/x"
    scrub = Redactor(["supersecret", "short"])
    assert scrub("key supersecret at http://u:p@host/x") == "key *** at http://***@host/x"
    assert "short" in scrub("short")                   # under 6 characters: ordinary words stay
    assert one_line("a\n  b supersecret", ["supersecret"]) == "a b ***"
