"""Publishing catalog.parquet, and getting a published one back.

`publish` puts an export (catalog.parquet, its catalog.json manifest and a dataset card README.md
that documents the columns) into a folder, or into a Hugging Face dataset repo in one commit.
`download` fetches a published catalog.parquet with its manifest, verifies it and replaces the
local copy. A source is a folder or file path, an http(s) URL of catalog.parquet, or hf://datasets/OWNER/NAME
(through huggingface_hub, so HF_ENDPOINT, HF_TOKEN and the cache apply). catalog.json is fetched
from beside catalog.parquet.
"""

import json
import os
import re
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import duckdb
import httpx2  # huggingface_hub 2.x's HTTP client
import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub import CommitOperationAdd, DatasetCard, DatasetCardData, HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError

from superweight.scanner.errors import first_line, shown
from superweight.scanner.files import written_aside
from superweight.scanner.digest import file_sha256
from superweight.scanner.hub import use_timeouts

from .errors import ChecksumMismatch, DownloadFailed, NotACatalog, PublishFailed
from .schema import QUANT_PARQUET
from .untrusted import CLOSED, check_index, quoted

# Where `superweight publish` pushes the index; overridable for mirrors.
DEFAULT_INDEX = os.getenv("SUPERWEIGHT_INDEX_URL", "hf://datasets/superweight/index")
PARQUET, MANIFEST, CARD = "catalog.parquet", "catalog.json", "README.md"
HUB_DATASETS = "hf://datasets/"


@dataclass(frozen=True)
class Published:
    """Where a catalog went: the target, the manifest published with it, and the Hub commit if any."""

    target: str
    manifest: dict
    commit_url: str | None = None


def publish(target: str, parquet: Path, *, endpoint: str | None = None, private: bool = False) -> Published:
    """Publish the export `parquet` (with its manifest beside it) and a dataset card to `target`.

    `target` is a folder (created if missing; each file is written aside and renamed, the manifest
    last) or hf://datasets/OWNER/NAME: the dataset repo is created if missing (`private` then
    applies) and the three files go up in one commit. The token comes only from HF_TOKEN in the
    environment and is never shown, not even in an error.

    Raises:
        PublishFailed: the export does not match its manifest, the target is not a folder or a
            dataset repo, there is no token, or the Hub refused.
    """
    manifest = _verified_manifest(Path(parquet))
    if target.startswith(HUB_DATASETS):
        return _publish_to_hub(target, Path(parquet), manifest, endpoint=endpoint, private=private)
    if "://" in target:
        raise PublishFailed(f"{target}: publish to a folder or to {HUB_DATASETS}OWNER/NAME")
    return _publish_to_folder(target, Path(parquet), manifest)


def publish_catalog(catalog, target: str, *, private: bool = False) -> Published:
    """Export `catalog` (an index.catalog.Catalog, open for reading or writing) and publish it to `target`."""
    with tempfile.TemporaryDirectory(prefix="superweight-publish-") as tmp:
        catalog.export(Path(tmp) / PARQUET)
        return publish(target, Path(tmp) / PARQUET, private=private)


def _verified_manifest(parquet: Path) -> dict:
    """The manifest beside `parquet` (as export writes it), checked with the file, renamed to PARQUET."""
    manifest_path = parquet.with_suffix(".json")
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise PublishFailed(f"{parquet}: no manifest {manifest_path.name} beside it; write both with 'superweight export'") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PublishFailed(f"{manifest_path}: not a catalog manifest ({first_line(e)})") from None
    try:
        check_export(parquet, manifest, where=str(parquet))
    except ChecksumMismatch:
        raise PublishFailed(f"{parquet}: does not match the sha256 in {manifest_path.name}; export it again") from None
    return {**manifest, "file": PARQUET}


def check_export(parquet: Path, manifest, *, where: str) -> None:
    """Raise unless `parquet` is a catalog export that its `manifest` describes.

    Raises:
        NotACatalog: the manifest is not one (a sha256 of 64 hex digits, rows, a schema version
            this superweight knows), or the file is not Parquet with the catalog's columns and rows.
        ChecksumMismatch: the file is not the one the manifest names.
    """
    from .schema import COLUMNS, EXPORT_VERSION, KEY_COLUMNS

    if not isinstance(manifest, dict):
        raise NotACatalog(f"{where}: {MANIFEST} is not a catalog manifest (not a JSON object)")
    sha, rows, version = manifest.get("sha256"), manifest.get("rows"), manifest.get("schema_version")
    if not _is_time(manifest.get("created")):
        raise NotACatalog(f"{where}: {MANIFEST} is not a catalog manifest (created {shown(manifest.get('created'))} "
                          "is not an ISO 8601 time)")
    if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise NotACatalog(f"{where}: {MANIFEST} is not a catalog manifest (sha256 {sha!r} is not 64 hex digits)")
    for name, value in (("rows", rows), ("schema_version", version)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise NotACatalog(f"{where}: {MANIFEST} is not a catalog manifest ({name} is {value!r}, not a count)")
    if version > EXPORT_VERSION:
        raise NotACatalog(f"{where}: the catalog has schema {version}, newer than this superweight's "
                          f"({EXPORT_VERSION}); upgrade superweight")
    actual = file_sha256(parquet)
    if actual != sha:
        raise ChecksumMismatch(f"{where}: {PARQUET} has sha256 {actual[:16]}..., its manifest says {sha[:16]}...")
    try:
        metadata = pq.ParquetFile(parquet).metadata
        names = metadata.schema.to_arrow_schema().names
    except (pa.ArrowException, OSError) as e:
        raise NotACatalog(f"{where}: {PARQUET} is not a Parquet file ({first_line(e)})") from None
    missing = [c for c in KEY_COLUMNS if c not in names]
    if missing or (version == EXPORT_VERSION and names != list(COLUMNS)):
        raise NotACatalog(f"{where}: {PARQUET} does not have the catalog's columns "
                          f"({'lacks ' + ', '.join(missing[:3]) if missing else 'other columns than schema ' + str(version)})")
    if metadata.num_rows != rows:
        raise NotACatalog(f"{where}: {PARQUET} has {metadata.num_rows} rows, its manifest says {rows}")
    with duckdb.connect(config=CLOSED) as con:
        check_index(con, f"read_parquet('{quoted(parquet)}')", where=f"{where}: {PARQUET}")


def _is_time(value) -> bool:
    try:
        datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return False
    return True


def _publish_to_folder(target: str, parquet: Path, manifest: dict) -> Published:
    folder = Path(target)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Each file is written aside and renamed into place as the blocks close, innermost first:
        # the parquet, then the card, the manifest last.
        quant = _quantization_file(parquet)
        if quant is not None:  # before the catalog's files, so the manifest is still renamed last
            with written_aside(folder / QUANT_PARQUET) as staged_quant:
                shutil.copyfile(quant, staged_quant)
        with (written_aside(folder / MANIFEST) as manifest_file, written_aside(folder / CARD) as card,
              written_aside(folder / PARQUET) as staged):
            shutil.copyfile(parquet, staged)
            card.write_text(dataset_card(staged, manifest, where=str(folder)))
            manifest_file.write_text(json.dumps(manifest, indent=2) + "\n")
    except OSError as e:
        raise PublishFailed(f"{target}: cannot publish here ({first_line(e)})") from None
    return Published(str(folder), manifest)


def _publish_to_hub(target: str, parquet: Path, manifest: dict, *, endpoint: str | None,
                    private: bool) -> Published:
    repo_id = target.removeprefix(HUB_DATASETS).strip("/")
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise PublishFailed(f"{target}: publishing to the Hub needs a write token in the HF_TOKEN environment variable")
    card = dataset_card(parquet, manifest, where=target)
    use_timeouts()
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        commit = api.create_commit(
            repo_id,
            repo_type="dataset",
            operations=[
                CommitOperationAdd(PARQUET, str(parquet)),
                CommitOperationAdd(MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode()),
                CommitOperationAdd(CARD, card.encode()),
                *([CommitOperationAdd(QUANT_PARQUET, str(quant))] if (quant := _quantization_file(parquet)) else []),
            ],
            commit_message=f"superweight index: {manifest['rows']} rows, sha256 {manifest['sha256'][:12]}",
        )
    except (OSError, ValueError, HfHubHTTPError, httpx2.HTTPError) as e:  # HTTP, network, offline, bad card
        reason = first_line(e).replace(token, "***")
        raise PublishFailed(f"{target}: upload failed ({reason})") from None
    return Published(target, manifest, commit.commit_url)


def _quantization_file(parquet: Path) -> Path | None:
    """The quantization.parquet an export wrote beside `parquet`, if any."""
    quant = Path(parquet).with_name(QUANT_PARQUET)
    return quant if quant.is_file() else None


def _column_table(parquet: Path, columns: dict[str, str]) -> str:
    """The rows of a card's column table: each column `parquet` has (an older export has fewer), its
    type there, and its meaning."""
    schema = pq.read_schema(parquet)
    return "\n".join(f"| `{name}` | {schema.field(name).type} | {meaning} |" for name, meaning in columns.items()
                     if name in schema.names)


def _quantization_section(quant: Path | None) -> str:
    """The dataset card's section on quantization.parquet (empty without one)."""
    from .schema import QUANT_COLUMNS

    if quant is None:
        return ""
    columns = _column_table(quant, QUANT_COLUMNS)
    return f"""
## `{QUANT_PARQUET}`: what keeping the super weights buys quantization

One row per model revision, variant, bit width, weight layout and clipping threshold, measured by
`superweight quantize`: every linear layer of the decoder layers fake-quantized (round to nearest),
perplexity on the same evaluation text as the verdicts, against the unquantized model's.

| column | type | meaning |
| --- | --- | --- |
{columns}
"""


def dataset_card(parquet: Path, manifest: dict, *, where: str) -> str:
    """The README.md of a published index: metadata, what it is, its columns, how to read it."""
    from .catalog import COLUMNS

    quant = _quantization_file(parquet)
    models = len(set(pq.read_table(parquet, columns=["repo_id"]).column("repo_id").to_pylist()))
    rows = manifest["rows"]
    size = "n<1K" if rows < 1_000 else "1K<n<10K" if rows < 10_000 else "10K<n<100K" if rows < 100_000 else "100K<n<1M"
    data = DatasetCardData(
        license="apache-2.0",
        pretty_name="Super weights of open LLM checkpoints",
        tags=["super-weight", "quantization", "pruning", "interpretability"],
        size_categories=[size],
        configs=[{"config_name": "default", "data_files": PARQUET},
                 *([{"config_name": "quantization", "data_files": QUANT_PARQUET}] if quant else [])],
    )
    columns = _column_table(parquet, COLUMNS)
    body = f"""
# Super weights of open LLM checkpoints

Coordinates of the *super weights* of open model checkpoints: the few scalars in an MLP output
projection (`mlp.down_proj`) whose removal destroys a model ("The Super Weight in Large Language
Models", arXiv 2411.07191). Each row of `{PARQUET}` is one super weight, or one row with empty
coordinates for a model that was scanned and has none. Rows with `source = 'scan'` were found by
the `superweight` scanner in one forward pass of one prompt; rows with `source = 'literature'` are
published coordinates, with their source in `note`.

A row is a claim until it is measured. `verdict` says what zeroing the weight did on 2,048 tokens
of public-domain English: `super` (alone it multiplies perplexity by 2 or more, and 2x more than
zeroing a weight of the same layer and magnitude does), `group` (only together with the other
weights of its super activation, the rows sharing `super_activation`), `inert` (neither: a spike in
the activations that the model does not need; some real models have only these) or `unverified`
(not measured: a spike that met the detection criteria, or for literature rows a published claim).
Use the coordinates of `unverified` and `inert` rows as candidates, not as super weights.

This snapshot: {rows} rows, {models} models, schema version {manifest['schema_version']},
created {manifest['created']}; `{MANIFEST}` holds the sha256 of `{PARQUET}`
(`{manifest['sha256']}`).

## Columns

| column | type | meaning |
| --- | --- | --- |
{columns}

## Reading it

```bash
superweight download {where}
superweight query "SELECT repo_id, layer, out_channel, in_channel, verdict FROM catalog WHERE verdict IN ('super', 'group')" --from {where}
superweight query "SELECT repo_id, count(DISTINCT super_activation) AS activations, max(abs(super_activation_value)) AS largest FROM catalog WHERE source = 'scan' GROUP BY repo_id" --from {where}
```
{_quantization_section(quant)}"""
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def download(source: str, dest: Path) -> dict:
    """Fetch `source`'s catalog.parquet and catalog.json, check the sha256, and replace `dest` atomically.

    Returns:
        The manifest.

    Raises:
        ChecksumMismatch: the file does not match its manifest; `dest` is left as it was.
        DownloadFailed: either file could not be fetched or the manifest is unreadable.
    """
    try:  # both written aside; renamed into place, the manifest last, only once the checksum holds
        dest.parent.mkdir(parents=True, exist_ok=True)
        with written_aside(dest.with_name(MANIFEST)) as manifest_file, written_aside(dest) as parquet:
            fetch(source, PARQUET, parquet)
            fetch(source, MANIFEST, manifest_file)
            try:
                manifest = json.loads(manifest_file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DownloadFailed(f"{source}: {MANIFEST} is not a catalog manifest ({e})") from None
            try:
                check_export(parquet, manifest, where=source)
            except ChecksumMismatch as e:
                raise ChecksumMismatch(f"{e}; kept the local copy {dest}") from None
    except OSError as e:
        raise DownloadFailed(f"{dest.parent}: cannot write the download here ({e.strerror})") from None
    return manifest


def fetch(source: str, name: str, target: Path) -> None:
    """Copy file `name` of `source` (folder, file beside it, URL, or hf://datasets/...) to `target`."""
    try:
        use_timeouts()
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
