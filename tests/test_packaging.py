"""One installed name: the wheel puts only `superweight` at the top of site-packages, and the command
works from a folder whose own files are called index.py and scanner.py (as a user's may be)."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from superweight.scanner import __version__
from tests.checkpoints import Plant, make_checkpoint

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_the_wheel_installs_one_name_and_the_cli_ignores_a_users_index_and_scanner_files(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(tmp_path / "dist"), str(ROOT)], check=True, timeout=600, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("superweight-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=300, capture_output=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())

    (record,) = site.glob("superweight-*.dist-info/RECORD")
    paths = [line.split(",")[0] for line in record.read_text().splitlines() if line.strip()]
    in_site = {p.split("/")[0] for p in paths if not p.startswith("..")}
    assert in_site == {"superweight", f"superweight-{__version__}.dist-info"}
    assert [p for p in paths if p.startswith("..")] == ["../../../bin/superweight"]  # the console script
    assert (site / "superweight" / "scanner" / "data" / "us-constitution.txt").is_file()
    assert (site / "superweight" / "index" / "migrations" / "versions" / "0002_leases.py").is_file()

    # The dependencies come from this environment (a path in a .pth: its own .pth files, this
    # checkout's editable install among them, are not read).
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    user = tmp_path / "user"
    user.mkdir()
    for name in ("index.py", "scanner.py"):
        (user / name).write_text("raise SystemExit('a user file was imported in place of superweight')\n")
    ckpt = make_checkpoint(tmp_path / "ckpt", "llama", [Plant(3, 10, 20)])
    env = {**os.environ, "SUPERWEIGHT_HOME": str(tmp_path / "home"), "PYTHONPATH": ""}

    done = subprocess.run([str(python), "-m", "superweight.cli", "scan", str(ckpt), "--json", "--no-record"],
                          cwd=user, env=env, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [(w["layer"], w["out_channel"], w["in_channel"]) for w in result["super_weights"]] == [(3, 10, 20)]
    assert done.stdout.count("\n") == 1

    # Offline, with no catalog of its own and nothing downloaded, it reads the index the wheel ships.
    done = subprocess.run([str(python), "-m", "superweight.cli", "query", "SELECT count(*) AS n FROM catalog", "--json"],
                          cwd=user, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    shipped = json.loads((site / "superweight" / "index" / "data" / "catalog.json").read_text())
    assert json.loads(done.stdout) == {"n": shipped["rows"]}
    assert "the index shipped with superweight" in done.stderr
