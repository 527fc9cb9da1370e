"""A real local Hugging Face Hub for tests: olah serving git repos of tiny generated checkpoints.

`local_hub` (session scope) builds the repos below, starts `olah-cli` on a free loopback port and
yields a LocalHub. olah reads its settings from a TOML file only; see NOTES.md "A local Hugging
Face Hub: olah" for the keys and quirks (always pass a revision, offline = true).

Repos:
    testorg/tiny-llama          two commits: Plant(3, 10, 20), then Plant(5, 7, 99); main also
                                holds a stray pytorch_model.bin and README.md a scan must not fetch
    testorg/tiny-llama-sharded  one commit: Plant(3, 10, 20), saved in shards with an index, plus a
                                consolidated.safetensors a scan must not fetch
    testorg/pickle-only         config.json and pytorch_model.bin, no safetensors
    testorg/tiny-gguf           GGUF files alone: Plant(3, 10, 20) as tiny-Q8_0.gguf and tiny-F16.gguf, each
                                with a byte-level tokenizer and a 300 kB model card (a header longer
                                than a scan's first read), and a README.md
    testorg/one-gguf            one GGUF file alone: tiny-Q8_0.gguf as above
"""

import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from time import monotonic

import pytest
from gguf import GGMLQuantizationType

from tests.checkpoints import Plant, build_model, make_checkpoint, make_gguf, plant

FIRST_PLANT = Plant(3, 10, 20)  # testorg/tiny-llama's first commit, and the sharded repo
LATEST_PLANT = Plant(5, 7, 99)  # testorg/tiny-llama's main
GGUF_REPO, ONE_GGUF_REPO = "testorg/tiny-gguf", "testorg/one-gguf"
GGUF_FILES = {"Q8_0": "tiny-Q8_0.gguf", "F16": "tiny-F16.gguf"}
READY_PROBE = "testorg/tiny-llama"
START_TIMEOUT = 30.0  # seconds; olah is ready in about 1.5 s

# Our git commands ignore the user's and the system's git config (signing, hooks, default branch).
_GIT_ENV = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
_GIT_IDENTITY = ["-c", "user.name=superweight tests", "-c", "user.email=tests@superweight.invalid"]


@dataclass(frozen=True)
class LocalHub:
    """A running olah server and the git repos it serves."""

    endpoint: str  # http://127.0.0.1:PORT, for endpoint= or HF_ENDPOINT
    mirrors: Path  # holds models/<org>/<name> git repos
    log: Path  # olah's stdout and stderr

    def repo(self, repo_id: str) -> Path:
        return self.mirrors / "models" / repo_id

    def sha(self, repo_id: str, rev: str = "main") -> str:
        """The commit sha `rev` points to in `repo_id`."""
        return git(self.repo(repo_id), "rev-parse", rev).strip()

    def shas(self, repo_id: str) -> list[str]:
        """Commit shas of main, oldest first."""
        return git(self.repo(repo_id), "rev-list", "--reverse", "main").split()

    def git_files(self, repo_id: str, rev: str = "main") -> list[str]:
        """The files committed in `repo_id` at `rev`."""
        return git(self.repo(repo_id), "ls-tree", "-r", "--name-only", rev).split()


def git(repo: Path, *args: str) -> str:
    """Run git in `repo` and return its stdout."""
    done = subprocess.run(["git", *_GIT_IDENTITY, *args], cwd=repo, env=_GIT_ENV,
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} in {repo} failed: {done.stderr.strip()}")
    return done.stdout


def commit_folder(repo: Path, message: str, *, date: str | None = None) -> str:
    """Commit everything in `repo` (a git repo on main, created if needed) as of `date`; return the sha."""
    if not (repo / ".git").is_dir():
        git(repo, "init", "--quiet", "--initial-branch=main")
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "--no-verify", "-m", message, *([f"--date={date}"] if date else []))
    return git(repo, "rev-parse", "HEAD").strip()


def sharded_checkpoint(path: Path, plants: list[Plant], *, max_shard_size: str = "300KB") -> Path:
    """Like make_checkpoint, but in several safetensors shards with model.safetensors.index.json."""
    model = build_model("llama")
    plant(model, plants)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


def build_mirrors(mirrors: Path) -> None:
    """Create the test repos (see the module docstring) under `mirrors`/models."""
    models = mirrors / "models"

    tiny = models / "testorg" / "tiny-llama"
    make_checkpoint(tiny, "llama", [FIRST_PLANT])
    commit_folder(tiny, "tiny llama, super weight at layer 3")
    for file in tiny.glob("*.safetensors"):
        file.unlink()
    make_checkpoint(tiny, "llama", [LATEST_PLANT])
    # Files a scan must never fetch: pickle weights next to the safetensors, and a model card.
    (tiny / "pytorch_model.bin").write_bytes(b"not a pickle: a scan never downloads this file\n")
    (tiny / "README.md").write_text("# tiny-llama\n\nA test checkpoint.\n")
    commit_folder(tiny, "move the super weight to layer 5; add a pickle and a card")

    sharded = models / "testorg" / "tiny-llama-sharded"
    sharded_checkpoint(sharded, [FIRST_PLANT])
    # Mistral repos also ship the original weights as one consolidated.safetensors: a scan of the
    # HF layout must fetch only the shards its index names.
    shutil.copy(sorted(sharded.glob("model-*.safetensors"))[0], sharded / "consolidated.safetensors")
    commit_folder(sharded, "sharded tiny llama")

    pickle_only = models / "testorg" / "pickle-only"
    pickle_only.mkdir(parents=True)
    shutil.copy(tiny / "config.json", pickle_only / "config.json")
    # ASCII on purpose: olah answers 500 for some small non-UTF-8 files (NOTES.md).
    (pickle_only / "pytorch_model.bin").write_bytes(b"not a pickle: a scan never downloads this file\n")
    commit_folder(pickle_only, "pickle weights only")

    for repo_id, quants in ((GGUF_REPO, GGUF_FILES), (ONE_GGUF_REPO, {"Q8_0": GGUF_FILES["Q8_0"]})):
        repo = models / repo_id
        repo.mkdir(parents=True)
        for quant, name in quants.items():
            plain = make_gguf(repo / f"plain-{name}", "llama", [FIRST_PLANT], qtype=GGMLQuantizationType[quant])
            tokenized_gguf(plain, repo / name)
            plain.unlink()
        (repo / "README.md").write_text(f"# {repo.name}\n\nGGUF files of a test checkpoint.\n")
        commit_folder(repo, "GGUF files alone")


def tokenized_gguf(source: Path, dest: Path) -> Path:
    """`source` (a GGUF of tests.checkpoints, without a tokenizer) copied to `dest` with a byte-level
    tokenizer of the tiny models' 256 ids and a 300 kB model card, by the gguf package's own
    metadata editor: a header longer than the 256 KiB a scan reads first."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    reader = GGUFReader(source)
    tokens = [bytes_to_unicode()[byte] for byte in range(256)]  # GPT-2's spelling of each byte
    new = {
        "tokenizer.ggml.model": MetadataDetails(GGUFValueType.STRING, "gpt2"),
        "tokenizer.ggml.tokens": MetadataDetails(GGUFValueType.ARRAY, tokens),
        "tokenizer.ggml.token_type": MetadataDetails(GGUFValueType.ARRAY, [1] * len(tokens)),  # 1: normal
        "tokenizer.ggml.scores": MetadataDetails(GGUFValueType.ARRAY, [0.0] * len(tokens)),  # no merges: bytes
        "general.description": MetadataDetails(GGUFValueType.STRING, "A tiny test model. " * 16_000),
    }
    writer = GGUFWriter(dest, reader.fields["general.architecture"].contents())
    copy_with_new_metadata(reader, writer, new, remove_metadata=[])
    return dest


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, *, port: int, mirrors: Path, repos: Path) -> Path:
    """olah's TOML config: serve `mirrors` on loopback, with the upstream at a dead port."""
    here = f"127.0.0.1:{port}"
    path.write_text(
        "[basic]\n"
        'host = "127.0.0.1"\n'
        f"port = {port}\n"
        f'repos-path = "{repos}"\n'
        f'mirrors-path = ["{mirrors}"]\n'
        'mirror-scheme = "http"\n'
        f'mirror-netloc = "{here}"\n'
        f'mirror-lfs-netloc = "{here}"\n'
        'hf-scheme = "http"\n'
        'hf-netloc = "127.0.0.1:9"\n'
        'hf-lfs-netloc = "127.0.0.1:9"\n'
        "\n[accessibility]\n"
        "offline = true  # otherwise every request probes the (dead) upstream and answers 504\n"
    )
    return path


def _log_tail(log: Path, lines: int = 30) -> str:
    text = log.read_text(errors="replace") if log.is_file() else ""
    return "\n".join(text.splitlines()[-lines:])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def olah_server(mirrors: Path, workdir: Path, *, probe_repo: str = READY_PROBE) -> Iterator[LocalHub]:
    """Run olah-cli serving `mirrors` until the block ends; its config, scratch and log go in `workdir`.

    It is ready when it answers for `probe_repo`, one of the repos in `mirrors`.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = write_config(workdir / "olah.toml", port=port, mirrors=mirrors, repos=workdir / "repos")
    log = workdir / "olah.log"
    hub = LocalHub(endpoint=f"http://127.0.0.1:{port}", mirrors=mirrors, log=log)
    probe = f"{hub.endpoint}/api/models/{probe_repo}/refs"
    with open(log, "wb") as out:
        proc = subprocess.Popen([shutil.which("olah-cli") or "olah-cli", "-c", str(config)], cwd=workdir,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = monotonic() + START_TIMEOUT
        while not _answers(probe):
            if monotonic() > deadline:
                pytest.fail(f"olah did not answer {probe} within {START_TIMEOUT:.0f} s:\n{_log_tail(log)}")
            try:
                code = proc.wait(timeout=0.2)  # doubles as the pause between probes
            except subprocess.TimeoutExpired:
                continue
            pytest.fail(f"olah-cli exited early with code {code}:\n{_log_tail(log)}")
        yield hub
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def local_hub(tmp_path_factory) -> Iterator[LocalHub]:
    """The test repos served by a real olah on 127.0.0.1 for the whole session, behind a front that
    honours Range as the Hub does (olah ignores it; tests/hub_front.py)."""
    from tests.hub_front import HubFront, serve  # it imports this module's git()

    root = tmp_path_factory.mktemp("local-hub")
    mirrors = root / "mirrors"
    build_mirrors(mirrors)
    with olah_server(mirrors, root / "olah") as hub:
        front = serve(HubFront(upstream=hub.endpoint, mirrors=mirrors))
        try:
            yield LocalHub(endpoint=front.url, mirrors=mirrors, log=hub.log)
        finally:
            front.stop()
