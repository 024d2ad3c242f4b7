"""harness.storage.s3's multipart writer, ranged reader, part plan and retry policy, against moto over HTTP."""

from __future__ import annotations

import io
import random

import pytest

from harness.storage import s3
from harness.storage.s3 import reader
from harness.errors import StorageError
from harness.storage import Storage

KIB = 1024


def _storage(url: str, **opts) -> Storage:
    base = {"harness_part_size_mb": 16 / 1024, "harness_max_concurrency": 3}
    return Storage(url, {**base, **opts})


def test_part_plan_fits_objects_over_5gb():
    base = 16 << 20
    tier = s3.PARTS_PER_TIER
    assert s3.part_size_for(1, base) == base and s3.part_size_for(tier, base) == base
    assert s3.part_size_for(tier + 1, base) == 2 * base
    six_gb = 6 * 10**9                       # over S3's 5 GB single-PUT limit: must be multipart
    assert s3.parts_needed(six_gb, base) < s3.MAX_PARTS
    five_tib = 5 << 40                       # S3's largest object, even with the smallest legal parts
    n = s3.parts_needed(five_tib, 5 << 20)
    assert n <= s3.MAX_PARTS
    assert max(s3.part_size_for(i, 5 << 20) for i in range(1, n + 1)) <= s3.MAX_PART_BYTES


def test_options_are_parsed_and_stripped():
    tuning, rest = s3.split_options({"harness_part_size_mb": 8, "harness_max_concurrency": 4,
                                     "harness_retry_budget_s": 5, "anon": False})
    assert (tuning.part_size, tuning.max_concurrency, tuning.retry_budget_s) == (8 << 20, 4, 5.0)
    assert rest == {"anon": False}
    with pytest.raises(ValueError, match="harness_part_sise_mb"):
        s3.split_options({"harness_part_sise_mb": 8})
    with pytest.raises(ValueError, match="harness_max_concurrency"):
        s3.split_options({"harness_max_concurrency": 0})
    # local storage accepts (and ignores) the S3 tuning keys, so one config works everywhere
    Storage("memory://x", {"harness_part_size_mb": 8})


def test_retry_policy_backoff_is_jittered_and_capped():
    p = s3.RetryPolicy(budget_s=10, base_s=0.1, cap_s=2.0)
    rng = random.Random(0)
    delays = [p.delay(a, "transient", rng) for a in range(1, 12) for _ in range(50)]
    assert max(delays) <= 2.0 and min(delays) >= 0
    assert len({round(d, 6) for d in delays}) > 100            # jitter: no two alike
    early = [p.delay(1, "transient", rng) for _ in range(200)]
    late = [p.delay(8, "transient", rng) for _ in range(200)]
    assert sum(late) > 4 * sum(early)                           # exponential growth until the cap
    assert sum(p.delay(2, "throttle", rng) for _ in range(200)) > 2 * sum(p.delay(2, "transient", rng)
                                                                        for _ in range(200))


def test_multipart_write_then_ranged_reads(s3_url, s3_server):
    st = _storage(s3_url)
    data = random.Random(1).randbytes(1_000_003)               # ~61 parts of 16 KiB, an odd tail
    with st.open_write("blob.bin") as f:
        pos = 0
        rng = random.Random(2)
        while pos < len(data):                                  # writes of every size, across part edges
            n = rng.choice([1, 100, 5000, 16 * KIB, 70_000])
            assert f.write(memoryview(data)[pos:pos + n]) == len(data[pos:pos + n])
            pos += n
    assert 1 < st.backend.client.peak_inflight_parts <= 3
    bucket, key = s3_url[5:].split("/", 1)
    head = s3_server.client().head_object(Bucket=bucket, Key=f"{key}/blob.bin")
    assert head["ContentLength"] == len(data) and head["ETag"].strip('"').endswith("-62")

    assert st.size("blob.bin") == len(data)
    assert st.read_bytes("blob.bin") == data
    assert st.read_bytes("blob.bin", 12345, 99_999) == data[12345:99_999]
    buf = bytearray(300_000)
    reader.read_into(st.backend.client, st.path("blob.bin"), 7, memoryview(buf))  # 19 concurrent ranged GETs
    assert buf == data[7:300_007]
    with pytest.raises(EOFError):
        reader.read_into(st.backend.client, st.path("blob.bin"), len(data) - 10, memoryview(bytearray(11)))
    with st.open_read("blob.bin") as f:                         # the reader blobs.py uses
        f.seek(500_000)
        small = bytearray(100)
        assert f.readinto(small) == 100 and small == data[500_000:500_100]
        big = bytearray(200_000)
        assert f.readinto(big) == 200_000 and big == data[500_100:700_100]
        f.seek(-3, io.SEEK_END)
        assert f.read() == data[-3:]
    with pytest.raises(FileNotFoundError):
        st.read_bytes("missing.bin")
    assert st.size("missing.bin") is None and not st.exists("missing.bin") and st.exists("blob.bin")


def test_failed_upload_leaves_nothing(s3_url, s3_server):
    st = _storage(s3_url)
    with pytest.raises(RuntimeError, match="writer died"):
        with st.open_write("half.bin") as f:
            f.write(b"x" * 100_000)                             # several parts already uploaded
            raise RuntimeError("writer died")
    bucket = s3_url[5:].split("/", 1)[0]
    assert not st.exists("half.bin") and st.listdir() == []
    assert s3_server.uploads(bucket) == []                      # the multipart upload was aborted


def test_small_objects_are_one_put_and_empty_objects_work(s3_url, s3_server):
    st = _storage(s3_url)
    with st.open_write("empty.bin"):
        pass
    with st.open_write("small.bin") as f:
        f.write(b"abc")
    st.commit_bytes("dir/COMMIT", b"{}")
    assert st.read_bytes("empty.bin") == b"" and st.read_bytes("small.bin") == b"abc"
    assert st.listdir() == ["dir", "empty.bin", "small.bin"] and st.listdir("dir") == ["COMMIT"]
    assert st.exists("dir") and not st.exists("nope")
    st.remove_tree("dir")
    assert st.listdir() == ["empty.bin", "small.bin"]


def test_retries_exhausted_is_one_clear_line_and_nothing_visible(s3_bucket, fault_proxy):
    url = f"s3://{s3_bucket}/run"
    st = _storage(url, endpoint_url=fault_proxy.url, harness_retry_budget_s=2.0)
    fault_proxy.configure(rate=1.0, seed=0, kinds={"503": 1})
    with pytest.raises(StorageError) as info:
        with st.open_write("data.bin") as f:
            f.write(b"y" * 100_000)
    msg = str(info.value)
    print(msg)
    assert "\n" not in msg and "SlowDown" in msg and "retry budget" in msg and s3_bucket in msg
    assert fault_proxy.counts["503"] >= 3                       # it did retry, with backoff, then gave up
    fault_proxy.configure(rate=0.0)
    assert not st.exists("data.bin") and st.listdir() == []
