"""The collector during start-up imports (harness/gcpause.py): paused, then what the imports built frozen
and the collector back on; nothing changes in a process that did not pause it (a test calling the CLI in
process). Each case runs in a fresh interpreter: a freeze is for good. What workers see is checked on real
launches in tests/test_workerstart.py."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from trainer_helpers import base_env


def _run(script: str, from_stderr: bool = False) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=base_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((out.stderr if from_stderr else out.stdout).strip().splitlines()[-1])


def test_imports_run_paused_then_are_frozen_and_the_collector_is_back_on():
    seen = _run("""
        import gc, json
        from harness import gcpause
        with gcpause.imports():
            paused = not gc.isenabled()
            import decimal, email.mime.multipart  # something to build
        print(json.dumps({"paused": paused, "on": gc.isenabled(), "frozen": gc.get_freeze_count()}))
    """)
    assert seen["paused"] and seen["on"] and seen["frozen"] > 1000, seen


def test_resuming_what_nobody_paused_changes_nothing():
    seen = _run("""
        import gc, json
        start = gc.get_freeze_count()  # Python 3.12 starts with a few hundred objects frozen; 3.11 and 3.13 none
        from harness import gcpause
        gcpause.freeze_and_resume()
        first = {"on": gc.isenabled(), "frozen": gc.get_freeze_count() - start}
        gc.disable()  # paused by someone else: left to them
        with gcpause.imports():
            pass
        print(json.dumps({**first, "still_off": not gc.isenabled(), "frozen_after": gc.get_freeze_count() - start}))
    """)
    assert seen == {"on": True, "frozen": 0, "still_off": True, "frozen_after": 0}, seen


def test_the_launcher_turns_the_collector_back_on_once_torchs_launcher_is_imported():
    """`harness launch` is paused by the entry point and runs the agent for the whole job: it must not stay
    paused."""
    seen = _run("""
        import gc, json
        from harness import gcpause, launch
        gcpause.pause()
        launch._setup_logging()
        print(json.dumps({"on": gc.isenabled(), "frozen": gc.get_freeze_count()}))
    """)
    assert seen["on"] and seen["frozen"] > 100_000, seen


def test_a_ckpt_command_turns_the_collector_back_on_once_torch_is_imported(tmp_path):
    """`harness ckpt ...` is paused by the entry point too (its start-up imports torch: `ckpt list` took 1.55 s
    and takes 1.1): the command itself runs with the collector on."""
    seen = _run(f"""
        import gc, json, sys
        from harness import cli, gcpause
        gcpause.pause()
        cli.run(["ckpt", "list", {str(tmp_path)!r}])
        print(json.dumps({{"on": gc.isenabled(), "frozen": gc.get_freeze_count(), "torch": "torch" in sys.modules}}),
              file=sys.stderr)
    """, from_stderr=True)
    assert seen["on"] and seen["torch"] and seen["frozen"] > 100_000, seen
