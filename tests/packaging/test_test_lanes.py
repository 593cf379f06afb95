"""scripts/test_lanes.py, which `make test` runs: two lanes of pytest sessions side by side.

A stand-in for pytest prints what it was asked to run and fails for a folder named ``bad*``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LANES = ROOT / "scripts" / "test_lanes.py"

FAKE_PYTEST = textwrap.dedent("""
    import sys, time
    args = sys.argv[1:]
    temp = next(a.split("=", 1)[1] for a in args if a.startswith("--basetemp="))
    folders = [a for a in args if not a.startswith("--")]
    ignored = [a.split("=", 1)[1] for a in args if a.startswith("--ignore=")]
    if not folders:
        time.sleep(0.5)  # the first lane: still running while the second one prints
    print("ran", folders or "the rest", "ignoring", ignored, "in", temp, flush=True)
    sys.exit(3 if any(f.startswith("bad") for f in folders) else 0)
""")


def _lanes(tmp_path: Path, *beside: str) -> subprocess.CompletedProcess[str]:
    fake = tmp_path / "fake_pytest.py"
    fake.write_text(FAKE_PYTEST)
    args = [a for folder in beside for a in ("--beside", folder)]
    return subprocess.run([sys.executable, str(LANES), *args, "--", sys.executable, str(fake)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)


def _temps(out: str) -> list[Path]:
    return [Path(line.rsplit(" in ", 1)[1]) for line in out.splitlines() if line.startswith("ran ")]


def test_both_lanes_pass_the_second_prints_after_the_first_and_temp_folders_go(tmp_path: Path) -> None:
    res = _lanes(tmp_path, "e2e", "faults", "kube")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    ran = [line for line in lines if line.startswith("ran ")]
    # the first lane ignores every folder the second one runs, so no test runs twice
    assert ran[0].startswith("ran the rest ignoring ['e2e', 'faults', 'kube']")
    sessions = [line.split(" ignoring")[0] for line in ran[1:]]
    assert sessions == ["ran ['e2e']", "ran ['faults']", "ran ['kube']"]
    header = lines.index("===== second lane (e2e, faults, kube): output =====")
    assert lines.index(ran[0]) < header < lines.index(ran[1])  # whole, after the first lane's output
    assert "test lanes: first lane (the rest) passed" in res.stdout
    assert "test lanes: second lane (e2e, faults, kube) passed" in res.stdout
    temps = _temps(res.stdout)
    assert len(set(temps)) == 4  # a basetemp per session
    assert not temps[0].parent.exists()  # removed once everything passed


def test_a_failing_session_stops_its_lane_fails_the_run_and_keeps_the_temp_folders(tmp_path: Path) -> None:
    res = _lanes(tmp_path, "e2e", "bad-faults", "kube")
    assert res.returncode == 3
    ran = [line.split(" ignoring")[0] for line in res.stdout.splitlines() if line.startswith("ran ")]
    assert ran == ["ran the rest", "ran ['e2e']", "ran ['bad-faults']"]  # kube never started
    assert "test lanes: second lane (e2e, bad-faults, kube) FAILED (exit status 3)" in res.stdout
    assert "test lanes: first lane (the rest) passed" in res.stdout
    temps = _temps(res.stdout)
    assert temps[0].parent.is_dir()
    assert f"temporary folders are kept in {temps[0].parent}" in res.stdout
    shutil.rmtree(temps[0].parent)


def test_the_pytest_command_is_required(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(LANES), "--beside", "e2e"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert res.returncode == 2
    assert "give the pytest command after --" in res.stderr
