"""The real SmolLM2-135M model: its super weight is found, and it matters (perplexity x10+, recorded)."""

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from superweight.index.catalog import Catalog
from superweight.scanner.result import ScanResult
from superweight.scanner.scan import ScanOptions, scan_source
from superweight.scanner.verify import VerifyConfig

pytestmark = pytest.mark.slow  # the real SmolLM2, verified (about a minute)

TEXT = Path(__file__).parent / "data" / "GPL-3.txt"
TOKENS, CONTEXT = 1024, 512  # half the scanner's default evaluation: the same verdicts, half the CPU time


@pytest.fixture(scope="module")
def scanned(smollm2):
    return scan_source(str(smollm2), ScanOptions(verify=VerifyConfig(tokens=TOKENS, context=CONTEXT)))


@pytest.fixture(scope="module")
def recorded(scanned, tmp_path_factory) -> list[dict]:
    """The catalog rows of the verified scan, as recorded and read back."""
    with Catalog(tmp_path_factory.mktemp("catalog") / "c.duckdb") as catalog:
        catalog.record_scan(ScanResult.from_json(scanned))  # as the JSON a user sees, read back
        return catalog.fetch_dicts("SELECT * FROM catalog ORDER BY out_channel, in_channel")


@pytest.fixture(scope="module")
def model(smollm2):
    return AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def text_ids(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)(TEXT.read_text(), return_tensors="pt")["input_ids"][:, :TOKENS]


@torch.no_grad()
def perplexity(model, ids) -> float:
    nll, count = 0.0, 0
    for start in range(0, ids.shape[1], CONTEXT):
        chunk = ids[:, start : start + CONTEXT]
        nll += model(chunk, labels=chunk).loss.item() * (chunk.shape[1] - 1)
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


def ppl_without(model, ids, layer, row, col) -> float:
    weight = model.model.layers[layer].mlp.down_proj.weight
    saved = weight[row, col].item()
    weight.data[row, col] = 0.0
    try:
        return perplexity(model, ids)
    finally:
        weight.data[row, col] = saved


def test_finds_the_super_weight_of_smollm2(scanned):
    first = scanned["super_weights"][0]
    assert (first["layer"], first["out_channel"], first["in_channel"]) == (11, 507, 1229)
    assert first["tensor"] == "model.layers.11.mlp.down_proj.weight" and first["index"] == [507, 1229]
    assert first["weight"] == pytest.approx(5.8757, abs=1e-3)
    assert first["token"] == 0
    assert first["spike_ratio"] > 300  # hundreds of times the median layer's peak
    assert scanned["tokens"][0] == "Apple"  # the checkpoint's own tokenizer read the prompt


def test_late_opposite_spike_is_not_reported(scanned):
    """Layers 28-29 spike in channel 507 with the opposite sign: they cancel, they do not create."""
    assert all(w["layer"] < 20 for w in scanned["super_weights"])
    late = [r for r in scanned["rejected"] if r["layer"] == 28 and r["out_channel"] == 507]
    assert late and "cancels" in late[0]["reason"]


def test_the_recorded_effect_of_its_super_weight_is_large_and_its_control_none(recorded):
    first = next(r for r in recorded if (r["layer"], r["out_channel"], r["in_channel"]) == (11, 507, 1229))
    assert first["ppl_ratio"] > 10  # zeroing one scalar of 135 million
    assert first["control_ppl_ratio"] == pytest.approx(1.0, abs=0.01)
    assert first["kl"] > 1000 * first["control_kl"]
    assert first["expected_prob"] < first["base_expected_prob"] / 10  # " cold" after "Winter is", ...
    assert first["stopword_share"] > first["base_stopword_share"]  # the paper's shift towards stopwords
    assert first["joint_ppl_ratio"] > first["ppl_ratio"] and first["eval_tokens"] == TOKENS


def test_its_verdicts_super_alone_and_group_with_the_second_weight(scanned, recorded):
    """W[507, 1229] breaks the model alone; W[507, 1487] only together with it (x1.2 alone)."""
    verdicts = {(w["out_channel"], w["in_channel"]): w["verdict"] for w in scanned["super_weights"]}
    assert verdicts == {(507, 1229): "super", (507, 1487): "group"}
    (activation,) = scanned["super_activations"]
    assert activation["channel"] == 507 and activation["value"] > 20_000 and activation["token"] == 0
    assert activation["effect"]["matters"] and activation["effect"]["ppl_ratio"] > 1000
    assert activation["effect"]["control"]["ppl_ratio"] == pytest.approx(1.0, abs=0.01)
    assert {(r["in_channel"], r["verdict"], r["super_activation"]) for r in recorded} == {
        (1229, "super", 0), (1487, "group", 0)}
    assert all(r["group_ppl_ratio"] == r["joint_ppl_ratio"] > 1000 for r in recorded)


def test_the_prompts_are_scored_on_their_expected_words(scanned):
    expected = scanned["verification"]["expected"]
    assert expected[:3] == [" cold", " Paris", " five"]  # the first token of each expected word


def test_zeroing_the_rejected_late_spike_changes_little(scanned, model, text_ids):
    late = next(r for r in scanned["rejected"] if r["layer"] == 28 and r["out_channel"] == 507)
    base = perplexity(model, text_ids)
    assert ppl_without(model, text_ids, 28, 507, late["in_channel"]) / base < 1.1
