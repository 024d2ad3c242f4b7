"""One storage problem, one line, one exit code: `harness ckpt list` and `harness train` say the same thing
(exit 3) for a missing bucket, rejected credentials and an unreachable endpoint; retries log one line when
they start and one when they end."""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from harness.cli import main
from harness.errors import StorageError
from harness.storage import Storage

REPO = Path(__file__).resolve().parent.parent
WRONG_KEY = "AKIAWRONGKEYHARNESS7"
WRONG_SECRET = "wRoNg-SeCrEt-storage-errors-must-not-leak"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _case(case: str, request) -> tuple[str, dict]:
    """(checkpoint URL, storage options) for one storage problem."""
    request.getfixturevalue("s3_server")
    quick = {"harness_retry_budget_s": 1.5, "config_kwargs": {"connect_timeout": 0.5, "read_timeout": 1.0}}
    if case == "missing-bucket":
        return f"s3://harness-missing-{uuid.uuid4().hex[:8]}/run", {}
    bucket = request.getfixturevalue("s3_bucket")
    if case == "rejected-credentials":
        proxy = request.getfixturevalue("fault_proxy")
        proxy.deny[WRONG_KEY] = "invalid"
        return f"s3://{bucket}/run", {"endpoint_url": proxy.url, "key": WRONG_KEY, "secret": WRONG_SECRET}
    return f"s3://{bucket}/run", {"endpoint_url": f"http://127.0.0.1:{_closed_port()}", **quick}


def _toml(value: object) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_toml(v)}" for k, v in value.items()) + "}"
    return f'"{value}"' if isinstance(value, str) else str(value)


def _flat(options: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in options.items():
        out += _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}={v}"]
    return out


def _same(line: str) -> str:
    return re.sub(r"\d+(\.\d+)?", "N", line).replace("attempts", "attempt")  # counts and times vary


# An endpoint that refuses connections for the whole retry budget is unreachable, not unusable: exit 1
# (retryable: the scheduler tries again later), where a missing bucket or rejected credentials are 3.
@pytest.mark.parametrize("case,words,code,prefix", [
    ("missing-bucket", "does not exist", 3, "harness: checkpoint error: "),
    ("rejected-credentials", "rejected the credentials", 3, "harness: checkpoint error: "),
    ("unreachable-endpoint", "cannot list bucket", 1, "harness: storage unreachable (retryable, exit 1): ")])
def test_ckpt_and_train_agree(case, words, code, prefix, request, tmp_path, capsys):
    url, options = _case(case, request)
    argv = ["ckpt", "list", url]
    for item in _flat(options):
        argv += ["--storage-option", item]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(prefix) and words in err, err
    assert WRONG_SECRET not in err and WRONG_KEY not in err

    cmd = [sys.executable, "-m", "harness", "train", "--config", str(REPO / "configs/quickstart.toml"),
           "--set", f"checkpoint.dir={url}", "--set", f"run.output_dir={tmp_path / 'out'}",
           "--set", "train.max_steps=2"]
    if options:
        cmd += ["--set", f"checkpoint.storage_options={_toml(options)}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert _same(last) == _same(err.strip()), (last, err)
    assert "Traceback" not in proc.stderr and WRONG_SECRET not in proc.stderr


def test_retries_log_one_line_at_start_and_one_at_end(s3_server, caplog):
    caplog.set_level(logging.DEBUG, logger="harness")
    opts = {"endpoint_url": f"http://127.0.0.1:{_closed_port()}", "harness_retry_budget_s": 4,
            "config_kwargs": {"connect_timeout": 0.5}}
    with pytest.raises(StorageError, match="cannot list bucket") as exc:
        Storage("s3://some-bucket/run", opts).check_access(write=False)
    attempts = int(re.search(r"after (\d+) attempt", str(exc.value)).group(1))
    s3_lines = [r for r in caplog.records if r.name == "harness" and r.getMessage().startswith("S3 ")]
    info = [r.getMessage() for r in s3_lines if r.levelno == logging.INFO]
    debug = [r for r in s3_lines if r.levelno == logging.DEBUG]
    assert len(debug) == attempts - 1            # each retry, for those who ask for DEBUG
    if attempts < 3:                             # a very slow machine: two blips are not worth a line
        assert info == []
        return
    assert len(info) == 2, info
    assert "retrying" in info[0] and f"gave up after {attempts} attempts" in info[1], info
