"""Getting a published catalog.parquet: fetch it with its manifest, verify, replace the local copy.

A source is a folder or file path, an http(s) URL of catalog.parquet, or hf://datasets/OWNER/NAME
(through huggingface_hub, so HF_ENDPOINT, HF_TOKEN and the cache apply). catalog.json is fetched
from beside catalog.parquet.
"""

import json
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

import httpx2  # huggingface_hub 2.x's HTTP client
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError

from scanner.errors import first_line
from scanner.hub import file_sha256

from .errors import ChecksumMismatch, DownloadFailed

# Where `superweight publish` pushes the index; overridable for mirrors.
DEFAULT_INDEX = os.getenv("SUPERWEIGHT_INDEX_URL", "hf://datasets/superweight/index")
PARQUET, MANIFEST = "catalog.parquet", "catalog.json"


def download(source: str, dest: Path) -> dict:
    """Fetch `source`'s catalog.parquet and catalog.json, check the sha256, and replace `dest` atomically.

    Returns:
        The manifest.

    Raises:
        ChecksumMismatch: the file does not match its manifest; `dest` is left as it was.
        DownloadFailed: either file could not be fetched or the manifest is unreadable.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        parquet, manifest_file = Path(tmp) / PARQUET, Path(tmp) / MANIFEST
        fetch(source, PARQUET, parquet)
        fetch(source, MANIFEST, manifest_file)
        try:
            manifest = json.loads(manifest_file.read_text())
            expected = manifest["sha256"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise DownloadFailed(f"{source}: {MANIFEST} is not a catalog manifest ({e})") from None
        actual = file_sha256(parquet)
        if actual != expected:
            raise ChecksumMismatch(
                f"{source}: {PARQUET} has sha256 {actual[:16]}..., its manifest says {expected[:16]}...; "
                f"kept the local copy {dest}"
            )
        parquet.replace(dest)  # same folder as dest: an atomic rename
        manifest_file.replace(dest.with_name(MANIFEST))
    return manifest


def fetch(source: str, name: str, target: Path) -> None:
    """Copy file `name` of `source` (folder, file beside it, URL, or hf://datasets/...) to `target`."""
    try:
        if source.startswith("hf://datasets/"):
            repo_id = source.removeprefix("hf://datasets/").strip("/")
            shutil.copyfile(hf_hub_download(repo_id, name, repo_type="dataset"), target)
        elif source.startswith(("http://", "https://")):
            url = source if name == PARQUET else source.rsplit("/", 1)[0] + "/" + name
            with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:  # noqa: S310
                shutil.copyfileobj(response, out)
        else:
            path = Path(source)
            shutil.copyfile(path / name if path.is_dir() else path.with_name(name), target)
    except (OSError, HfHubHTTPError, httpx2.HTTPError) as e:  # URL, HTTP, Hub and file errors alike
        raise DownloadFailed(f"{source}: cannot fetch {name} ({first_line(e)})") from None
