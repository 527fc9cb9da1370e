"""Shared test setup: isolated homes and caches, no network, and the real SmolLM2 checkpoint."""

import atexit
import fcntl
import os
import shutil
import tempfile

# Before anything imports huggingface_hub or scanner.config (both read the environment at import).
_TMP = tempfile.mkdtemp(prefix="superweight-tests-")
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)
os.environ["SUPERWEIGHT_HOME"] = os.path.join(_TMP, "home")
os.environ["HF_HOME"] = os.path.join(_TMP, "hf")  # never the user's cache
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"  # a dead loopback port: no test reaches the real Hub
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["SUPERWEIGHT_HUB_BACKOFF"] = "0.05"  # seconds before a range read is retried (1 s by default)
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ.pop("HF_TOKEN", None)
# Ray on loopback only, no telemetry, no auth (NOTES.md "Ray 2.60 on one machine"); read at import.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.pop("RAY_ADDRESS", None)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import transformers  # noqa: E402

from superweight.scanner.config import SUPERWEIGHT_HOME  # noqa: E402
from superweight.scanner.examples import EXAMPLES, example_checkpoint  # noqa: E402
from superweight.scanner.digest import content_hash  # noqa: E402

transformers.utils.logging.set_verbosity_error()

# The local Hub (olah) is one session fixture for every test module that asks for it.
pytest_plugins = ["tests.hub_server"]


@pytest.fixture(scope="session")
def smollm2(request) -> Path:
    """The real SmolLM2-135M checkpoint as safetensors, converted once and kept in pytest's cache.

    It is also linked where `example:smollm2` looks in this session's SUPERWEIGHT_HOME, so scans
    of the example do not convert it again.
    """
    example = EXAMPLES["smollm2"]
    gguf = example.gguf()
    revision = content_hash([gguf], gguf.parent)
    cache = Path(request.config.cache.mkdir("smollm2-example"))
    with open(cache / ".lock", "w") as lock:  # test processes running side by side (pytest -n) convert once
        fcntl.flock(lock, fcntl.LOCK_EX)
        dest = example_checkpoint(example, revision, home=cache)
    linked = SUPERWEIGHT_HOME / "examples" / example.name
    if not linked.exists():
        linked.mkdir(parents=True)
        for file in dest.iterdir():
            try:
                os.link(file, linked / file.name)
            except OSError:  # another file system
                shutil.copy2(file, linked / file.name)
    return dest


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty SUPERWEIGHT_HOME for this test's CLI calls (the CLI reads it at import, so patch the module)."""
    home = tmp_path / "home"
    monkeypatch.setattr("superweight.cli.SUPERWEIGHT_HOME", home)
    monkeypatch.delenv("SUPERWEIGHT_LEDGER_URL", raising=False)
    return home


@pytest.fixture(scope="session")
def ray_cluster():
    from superweight.index.crawl import PRELOADED

    """One local Ray for the session (2 CPUs, no dashboard, every port on loopback); yields its address.

    It also declares one GPU, which this machine does not have: Ray schedules on the count alone, so
    tests can check that GPU workers each take one (the scan itself then runs on the CPU). Its worker
    processes import the scan worker (torch, transformers) before they are handed an actor, as
    `superweight crawl` has its local Ray do (superweight/cli_crawl.py), so a crawl's actors start in a
    fraction of a second.
    """
    import ray

    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    context = ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
                       _temp_dir=temp, _system_config={"preload_python_modules": list(PRELOADED)})
    yield context.address_info["gcs_address"]
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def small_disk(tmp_path):
    """A factory of real small file systems (tmpfs): `small_disk("name", "64k")` -> a folder that holds
    at most that much; `small_disk("name", read_only=True)` -> one that cannot be written at all.

    Mounting needs root (CI runs as root and must run these tests); elsewhere they are skipped.
    """
    import subprocess

    if os.geteuid() != 0:
        if os.getenv("CI"):
            pytest.fail("CI runs as root and must run the full-disk and read-only tests")
        pytest.skip("a real full or read-only disk needs root to mount a tmpfs")
    mounted = []

    def make(name: str, size: str = "1m", *, read_only: bool = False, files: dict[str, bytes] | None = None) -> Path:
        path = tmp_path / name
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        mounted.append(path)
        for rel, data in (files or {}).items():
            (path / rel).parent.mkdir(parents=True, exist_ok=True)
            (path / rel).write_bytes(data)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        return path

    yield make
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)
