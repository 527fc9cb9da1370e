"""Verification: the effect of zeroing each super weight, all of them, and a control, measured on the
streamed model, checked against zeroing the weight in a whole in-memory model."""

import copy
import math
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet
import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM

from superweight.index.catalog import Catalog
from superweight.scanner.detect import Detector
from superweight.scanner.config import DetectConfig
from superweight.scanner.scan import ScanOptions, prompt_ids, scan, scan_source
from superweight.scanner.tokens import load_tokenizer
from superweight.scanner.evaluation import PROMPTS, STOPWORDS, evaluation_inputs
from superweight.scanner.verify import VerifyConfig, verdict, verify
from tests.checkpoints import ARCHS, MOE_ARCHS, Plant, make_checkpoint, streaming

CLI = str(Path(sys.executable).with_name("superweight"))
# Small enough to be quick; head_slice_rows below the vocabulary (256) so the head is read in slices.
QUICK = VerifyConfig(tokens=256, context=64, head_slice_rows=100)


def planted(arch: str) -> list[Plant]:
    """A super weight and, in the same layer (and expert), a decoy as large on a quiet input."""
    expert = 1 if arch in MOE_ARCHS else None
    return [Plant(2, 10, 20, expert=expert), Plant(2, 30, 40, value=2.6, boost=1.0, expert=expert)]


@pytest.mark.parametrize("arch", ARCHS)
def test_zeroing_a_planted_super_weight_moves_predictions_far_more_than_its_decoy(tmp_path, arch):
    result = scan_source(str(make_checkpoint(tmp_path / arch, arch, planted(arch))), ScanOptions(verify=QUICK))

    (weight,) = result["super_weights"]
    effect, control = weight["effect"], weight["effect"]["control"]
    # The decoy is the weight closest in magnitude outside the super weight's row and column: the control.
    assert (control["out_channel"], control["in_channel"]) == (30, 40)
    assert control["weight"] == pytest.approx(2.6)
    assert effect["kl"] > 1e-3 and effect["kl"] > 5 * control["kl"]
    assert result["verification"]["tokens"] == 256 and result["verification"]["tokenizer"] is False
    assert effect["expected_prob"] is None  # without a tokenizer there is no expected word


# Dense, Conv1D, fused experts; soft-capped logits (Gemma 2), a head with a bias (Phi), scaled
# logits (Cohere multiplies, Granite divides); and bfloat16, where subtracting the zeroed weight's
# product from a rounded super activation would be off by its rounding step.
WHOLE_MODEL_CASES = {
    "llama": ("llama", {}), "gpt2": ("gpt2", {}), "mixtral": ("mixtral", {}), "gemma2": ("gemma2", {}),
    "phi": ("phi", {}), "cohere": ("cohere", {"logit_scale": 0.25}), "granite": ("granite", {"logits_scaling": 4.0}),
    "llama-bf16": ("llama", {"dtype": torch.bfloat16}),
}


@pytest.mark.parametrize("case", WHOLE_MODEL_CASES)
def test_the_figures_equal_zeroing_the_weight_in_a_whole_model(tmp_path, case):
    """Three super weights in two super activations: a layer-5 weight that amplifies the layer-2
    one's channel, and one of its own. Every figure (each weight alone, each super activation's
    weights together, all together, each control and each group's controls) equals zeroing the
    same weights in a whole in-memory model."""
    arch, overrides = WHOLE_MODEL_CASES[case]
    expert = 1 if arch in MOE_ARCHS else None
    plants = [Plant(2, 10, 20, expert=expert), Plant(5, 10, 99, reads=10, expert=expert),
              Plant(3, 7, 50, expert=0 if arch in MOE_ARCHS else None)]
    ckpt = make_checkpoint(tmp_path / arch, arch, plants, **overrides)
    dtype = overrides.get("dtype", torch.float32)
    rel = 1e-4 if dtype == torch.float32 else 2e-2
    sm = streaming(ckpt)
    ids, _ = prompt_ids(DetectConfig().prompt, sm.config)
    detection = Detector(sm, DetectConfig()).run(sm.load_static(ids))
    coords = [(w.layer, w.expert, w.out_channel, w.in_channel) for w in detection.super_weights]
    assert sorted(coords) == sorted((p.layer, p.expert, p.row, p.col) for p in plants)
    everything = VerifyConfig(tokens=256, context=64, head_slice_rows=100, matters=0.0)  # every group "matters"
    figures = verify(sm, detection, config=everything)

    text = evaluation_inputs(sm, None, QUICK).text  # (B, T): the same sequences the streamed pass read
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()
    base = _log_probs(model, text)

    def expect(effect: dict, zero: list[tuple]) -> None:
        with _zeroed(model, zero):
            logp = _log_probs(model, text)
        assert effect["ppl_ratio"] == pytest.approx(_ppl(logp, text) / _ppl(base, text), rel=rel)
        assert effect["kl"] == pytest.approx(_kl(base, logp), rel=10 * rel, abs=1e-5)

    def control_of(k: int) -> tuple:
        control = detection.super_weights[k].effect["control"]
        return control["layer"], control["expert"], control["out_channel"], control["in_channel"]

    for k, weight in enumerate(detection.super_weights):
        expect(weight.effect, [coords[k]])
        expect(weight.effect["control"], [control_of(k)])
    for activation in detection.super_activations:
        expect(activation.effect, [coords[k] for k in activation.weights])
        expect(activation.effect["control"], [control_of(k) for k in activation.weights])
    assert [len(a.weights) for a in detection.super_activations] == [2, 1]  # channel 10 twice, channel 7
    with _zeroed(model, coords):
        assert figures.joint_ppl_ratio == pytest.approx(_ppl(_log_probs(model, text), text) / _ppl(base, text),
                                                        rel=rel)
    assert figures.base_ppl == pytest.approx(_ppl(base, text), rel=rel)
    assert figures.passes == 4  # the groups, then the weights of the two-weight group alone


def test_weights_alone_are_measured_only_inside_super_activations_that_matter(tmp_path):
    """Five weights in two super activations: with the default threshold a random model's groups are
    inert, so only the groups are measured (one stage); with every group mattering, the weights
    of multi-weight groups are measured alone too (a second stage)."""
    plants = [Plant(2, 10, 20), Plant(2, 10, 21), Plant(4, 10, 30, reads=10), Plant(3, 40, 50), Plant(3, 41, 50)]
    ckpt = make_checkpoint(tmp_path / "m", "llama", plants)

    inert = scan_source(str(ckpt), ScanOptions(verify=QUICK))
    assert [len(a["weights"]) for a in inert["super_activations"]] == [3, 1, 1]
    assert (inert["verification"]["passes"], inert["verification"]["copies"]) == (2, 8)  # 1 + 3 + joint + 3
    assert [a["effect"]["matters"] for a in inert["super_activations"]] == [False] * 3
    assert [w["verdict"] for w in inert["super_weights"]] == ["inert"] * 5
    alone = {(w["layer"], w["out_channel"]): w["effect"] for w in inert["super_weights"]}
    assert alone[(2, 10)] is None and alone[(3, 40)] is not None  # a one-weight group is its weight

    matters = scan_source(str(ckpt), ScanOptions(verify=VerifyConfig(tokens=256, context=64, head_slice_rows=100,
                                                                      matters=0.0)))
    # The second stage reuses the original's hidden states: 3 weights alone and their 3 controls.
    assert (matters["verification"]["passes"], matters["verification"]["copies"]) == (4, 8 + 6)
    assert all(w["effect"] is not None for w in matters["super_weights"])
    assert [w["verdict"] for w in matters["super_weights"]] == ["super"] * 5

    # Two copies per pass: the same figures, in more passes.
    small = scan_source(str(ckpt), ScanOptions(verify=VerifyConfig(tokens=256, context=64, head_slice_rows=100,
                                                                   matters=0.0, max_copies=2)))
    # Stage 1: the original and 1 variant, then 2, 2, 2; stage 2: 2, 2, 2. Two passes (text, prompts) each.
    assert small["verification"]["passes"] == 2 * (4 + 3)
    for a, b in zip(small["super_weights"], matters["super_weights"], strict=True):
        assert a["effect"]["ppl_ratio"] == pytest.approx(b["effect"]["ppl_ratio"], rel=1e-5)
        assert a["effect"]["control"]["kl"] == pytest.approx(b["effect"]["control"]["kl"], rel=1e-4, abs=1e-9)


def test_what_verifying_fifteen_weights_costs(tmp_path):
    """The 1.5B Qwen2-family pattern (bench/rounds.py), tiny: one channel writes five rows in layer 1,
    three channels write the same rows in layer 2. 15 weights in 5 super activations: 12 copies in
    one pass when the groups are inert (weight by weight it was 32); 42 in 8 when all of them matter."""
    rows = (10, 11, 12, 13, 14)
    plants = [Plant(1, r, 20) for r in rows] + [Plant(2, r, 21, token=1) for r in rows]
    plants += [Plant(2, r, 22, token=1) for r in rows[:3]] + [Plant(2, r, 23, token=1) for r in rows[3:]]
    ckpt = make_checkpoint(tmp_path / "m", "qwen2", plants)

    inert = scan_source(str(ckpt), ScanOptions(verify=QUICK))
    assert len(inert["super_weights"]) == 15 and len(inert["super_activations"]) == 5
    assert (inert["verification"]["copies"], inert["verification"]["passes"]) == (1 + 5 + 1 + 5, 2)

    matters = scan_source(str(ckpt), ScanOptions(verify=VerifyConfig(tokens=256, context=64, head_slice_rows=100,
                                                                     matters=0.0)))
    assert (matters["verification"]["copies"], matters["verification"]["passes"]) == (12 + 30, 2 + 2 * 3)


def _effect(ratio: float, control: float = 1.0) -> dict:
    return {"ppl_ratio": ratio, "control": {"ppl_ratio": control}}


@pytest.mark.parametrize("alone,group,expected", [
    (_effect(20.8), _effect(51880.0), "super"),  # SmolLM2's W[507, 1229]
    (_effect(1.21), _effect(51880.0), "group"),  # SmolLM2's W[507, 1487]: matters only with the other
    (None, _effect(51880.0), "group"),  # not measured alone, in a group that matters
    (_effect(1.017), _effect(1.05), "inert"),  # the Qwen2.5-0.5B-family spikes
    (None, _effect(1.05), "inert"),
    (_effect(3.0, control=2.0), _effect(3.0, control=2.0), "inert"),  # no more than zeroing its control does
    (None, None, "unverified"),
])
def test_verdicts(alone, group, expected):
    assert verdict(alone, group, VerifyConfig()) == expected


def test_each_super_weight_gets_its_own_control_outside_their_rows_and_columns(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", "llama", [Plant(2, 10, 20), Plant(2, 11, 21, value=2.4)])
    result = scan_source(str(ckpt), ScanOptions(verify=QUICK))
    controls = [(w["effect"]["control"]["out_channel"], w["effect"]["control"]["in_channel"])
                for w in result["super_weights"]]
    assert len(result["super_weights"]) == 2 and len(set(controls)) == 2
    assert all(r not in (10, 11) and c not in (20, 21) for r, c in controls)


def test_a_model_without_super_weights_has_nothing_to_verify(tmp_path):
    result = scan_source(str(make_checkpoint(tmp_path / "m", "llama", [])), ScanOptions(verify=QUICK))
    assert result["super_weights"] == [] and result["verification"] is None


def test_scan_verify_records_the_effects_in_the_catalog_and_its_export(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", "llama", planted("llama"))
    env_home = {"SUPERWEIGHT_HOME": str(tmp_path / "home"), "PATH": str(Path(sys.executable).parent)}
    scan = subprocess.run([CLI, "scan", str(ckpt), "--verify", "--catalog", str(tmp_path / "c.duckdb")],
                          capture_output=True, text=True, env=env_home, timeout=600)
    assert scan.returncode == 0, scan.stderr
    assert "zeroed, on 2048 tokens of us-constitution.txt + pride-and-prejudice-1-3.txt" in scan.stdout
    export = subprocess.run([CLI, "export", "--catalog", str(tmp_path / "c.duckdb"), "--out", str(tmp_path / "c.parquet")],
                            capture_output=True, text=True, env=env_home, timeout=120)
    assert export.returncode == 0, export.stderr

    (row,) = pyarrow.parquet.read_table(tmp_path / "c.parquet").to_pylist()
    assert (row["layer"], row["out_channel"], row["in_channel"]) == (2, 10, 20)
    assert row["hf_tensor"] == "model.layers.2.mlp.down_proj.weight" and row["hf_index"] == [10, 20]
    assert row["eval_tokens"] == 2048 and row["base_ppl"] > 1
    assert row["kl"] > 5 * row["control_kl"] and row["control_ppl_ratio"] == pytest.approx(1, abs=0.05)
    assert row["joint_ppl_ratio"] == row["ppl_ratio"]  # one super weight: all of them is this one
    assert row["expected_prob"] is None and row["base_expected_prob"] is None  # no tokenizer


def test_an_unverified_scan_has_null_effects(tmp_path):
    result = scan(str(make_checkpoint(tmp_path / "m", "llama", planted("llama"))))
    (weight,) = result.super_weights
    assert result.verification is None and (weight.effect, weight.verdict) == (None, "unverified")
    with Catalog(tmp_path / "c.duckdb") as catalog:
        catalog.record_scan(result)
        assert catalog.fetch("SELECT ppl_ratio, group_ppl_ratio, kl, eval_tokens, verdict FROM catalog") == [
            (None, None, None, None, "unverified")]
        assert catalog.has_scan(result.source, result.revision, result.scanner_version)
        assert not catalog.has_scan(result.source, result.revision, result.scanner_version, verified=True)


def sentencepiece_tokenizer():
    """A tiny Llama-2-style tokenizer: SentencePiece pieces with a "▁" word prefix, BOS first."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {w.strip() for _, w in PROMPTS} | {w.strip() for w in STOPWORDS if w.strip()}
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("▁", -2.0)] + [("▁" + w, -1.0) for w in sorted(words)]
    pieces += [(ch, -5.0) for ch in string.printable if ch.strip()] + [("\n", -5.0)]
    model = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=False))
    model.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    model.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    model.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_with_a_tokenizer_the_prompt_figures_are_those_of_the_expected_words(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", "llama", planted("llama"))
    tokenizer = sentencepiece_tokenizer()
    tokenizer.save_pretrained(ckpt)
    inputs = evaluation_inputs(streaming(ckpt), load_tokenizer(ckpt), QUICK)
    # Continuations, not words encoded alone (which would give the bare "▁" piece first).
    assert tokenizer.convert_ids_to_tokens(inputs.expected) == ["▁" + w.strip() for _, w in PROMPTS]
    assert {",", ".", "▁the", "▁and"} <= set(tokenizer.convert_ids_to_tokens(inputs.stopwords))
    assert set(inputs.text[:, 0].tolist()) == {tokenizer.bos_token_id}  # every sequence starts with BOS

    result = scan_source(str(ckpt), ScanOptions(verify=QUICK))
    (weight,) = result["super_weights"]
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    base = _prompt_reference(model, inputs)
    with _zeroed(model, [(2, None, 10, 20)]):
        zeroed = _prompt_reference(model, inputs)
    assert result["verification"]["tokenizer"] is True
    assert result["verification"]["base_expected_prob"] == pytest.approx(base[0], rel=1e-4)
    assert result["verification"]["base_stopword_share"] == pytest.approx(base[1], rel=1e-4)
    assert (weight["effect"]["expected_prob"], weight["effect"]["stopword_share"]) == pytest.approx(zeroed, rel=1e-4)


def test_sequences_are_cut_to_the_models_positions(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", "gpt2", planted("gpt2"))  # n_positions 128 < the default 512
    result = scan_source(str(ckpt), ScanOptions(verify=VerifyConfig(tokens=512)))
    assert result["verification"]["context"] == 128 and result["verification"]["tokens"] == 512


def test_a_model_that_cannot_be_verified_keeps_its_coordinates_and_says_why(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", "llama", planted("llama"))  # untied: the head is its own tensor
    weights = safetensors.torch.load_file(ckpt / "model.safetensors")
    del weights["lm_head.weight"]  # the scan never reads the head; verification needs it
    safetensors.torch.save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})

    result = scan(str(ckpt), ScanOptions(verify=QUICK))
    assert [(w.layer, w.out_channel, w.in_channel) for w in result.super_weights] == [(2, 10, 20)]
    assert "no language-model head" in result.verification.skipped
    with Catalog(tmp_path / "c.duckdb") as catalog:
        catalog.record_scan(result)
        assert catalog.fetch("SELECT layer, ppl_ratio, eval_tokens FROM catalog") == [(2, None, 0)]
        # Tried, so a verifying crawl does not scan it again and again.
        assert catalog.has_scan(result.source, result.revision, result.scanner_version, verified=True)


# -- the reference: a whole model in memory ----------------------------------------------------------

@torch.no_grad()
def _log_probs(model, text: torch.Tensor) -> torch.Tensor:
    """log p(next token) over the vocabulary at every position but the last: (B, T-1, V)."""
    return torch.log_softmax(model(text).logits[:, :-1].float(), dim=-1)


@torch.no_grad()
def _prompt_reference(model, inputs) -> tuple[float, float]:
    """Mean p(expected word) and mean stopword share at the prompts' last tokens, from the whole model."""
    probs = torch.softmax(model(inputs.prompts).logits.float(), dim=-1)  # (P, Tp, V)
    last = probs[torch.arange(len(inputs.prompt_last)), inputs.prompt_last]  # (P, V)
    expected = last[torch.arange(len(last)), inputs.expected].mean().item()
    return expected, last[:, inputs.stopwords].sum(dim=1).mean().item()


def _ppl(log_probs: torch.Tensor, text: torch.Tensor) -> float:
    return math.exp(-log_probs.gather(2, text[:, 1:, None]).mean().item())


def _kl(base: torch.Tensor, other: torch.Tensor) -> float:
    return (base.exp() * (base - other)).sum(dim=-1).mean().item()


class _zeroed:
    """Zero (layer, expert, row, col) weights of the MLP output projections of a whole model, then restore."""

    def __init__(self, model, coords):
        from superweight.scanner.arch import find_decoder_layers, find_out_proj

        tcfg = model.config.get_text_config()
        _, layers = find_decoder_layers(model.base_model, tcfg.num_hidden_layers)
        self.cells = []
        for layer, expert, row, col in coords:
            spec = find_out_proj(layers[layer], tcfg.hidden_size)
            weight = getattr(layers[layer].get_submodule(spec.module_path), spec.param_name)
            index = tuple(spec.layout.hf_index(row, col, expert))
            self.cells.append((weight, index))

    def __enter__(self):
        self.saved = [weight.data[index].item() for weight, index in self.cells]
        for weight, index in self.cells:
            weight.data[index] = 0.0

    def __exit__(self, *exc):
        for (weight, index), value in zip(self.cells, self.saved):
            weight.data[index] = value


def test_a_plain_rescan_keeps_the_effects_measured_for_the_same_coordinates(tmp_path, caplog):
    ckpt = make_checkpoint(tmp_path / "m", "llama", planted("llama"))
    verified = scan(str(ckpt), ScanOptions(verify=QUICK))
    plain = scan(str(ckpt))
    figures = "SELECT ppl_ratio, kl, control_ppl_ratio, group_ppl_ratio, verdict, eval_tokens, base_ppl FROM catalog"
    with Catalog(tmp_path / "c.duckdb") as catalog:
        catalog.record_scan(verified)
        before = catalog.fetch(figures)
        assert before[0][0] is not None and before[0][5] == 256

        assert catalog.record_scan(plain) == "kept the effects measured by the earlier verified scan (same coordinates)"
        assert catalog.fetch(figures) == before

        moved = copy.deepcopy(plain)
        moved.super_weights[0].in_channel = 21
        assert "replaced a verified scan whose coordinates differ" in catalog.record_scan(moved)
        assert catalog.fetch(figures) == [(None, None, None, None, "unverified", None, None)]
    assert "replaced a verified scan" in caplog.text  # said, not silently dropped
