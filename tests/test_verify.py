"""Verification: the effect of zeroing each super weight, all of them, and a control, measured on the
streamed model, checked against zeroing the weight in a whole in-memory model."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet
import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM

from index.catalog import Catalog
from scanner.detect import Detector
from scanner.config import DetectConfig
from scanner.loader import StreamingModel
from scanner.scan import ScanOptions, prompt_ids, scan_source
from scanner.tokens import load_tokenizer
from scanner.verify import PROMPTS, STOPWORDS, VerifyConfig, _inputs, verify
from tests.checkpoints import ARCHS, MOE_ARCHS, Plant, make_checkpoint

CLI = str(Path(sys.executable).with_name("superweight"))
# Small enough to be quick; head_rows below the vocabulary (256) so the head is read in slices.
QUICK = VerifyConfig(tokens=256, context=64, head_rows=100)


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
    arch, overrides = WHOLE_MODEL_CASES[case]
    plants = [Plant(2, 10, 20, expert=1 if arch in MOE_ARCHS else None), Plant(5, 7, 99)]
    if arch in MOE_ARCHS:
        plants[1] = Plant(5, 7, 99, expert=0)
    ckpt = make_checkpoint(tmp_path / arch, arch, plants, **overrides)
    dtype = overrides.get("dtype", torch.float32)
    rel = 1e-4 if dtype == torch.float32 else 2e-2
    sm = StreamingModel(ckpt)
    ids, _ = prompt_ids(ckpt, DetectConfig().prompt, sm.config)
    detection = Detector(sm, DetectConfig()).run(sm.load_static(ids))
    assert len(detection.super_weights) == 2
    figures = verify(sm, detection, config=QUICK)

    text = _inputs(sm, None, QUICK).text  # (B, T): the same sequences the streamed pass read
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()
    base = _log_probs(model, text)
    zeroed = []
    for w in detection.super_weights:
        with _zeroed(model, [(w.layer, w.expert, w.out_channel, w.in_channel)]):
            zeroed.append(_log_probs(model, text))
    with _zeroed(model, [(w.layer, w.expert, w.out_channel, w.in_channel) for w in detection.super_weights]):
        joint = _log_probs(model, text)

    for w, logp, effect in zip(detection.super_weights, zeroed, figures["per_weight"]):
        assert effect["ppl_ratio"] == pytest.approx(_ppl(logp, text) / _ppl(base, text), rel=rel)
        assert effect["kl"] == pytest.approx(_kl(base, logp), rel=10 * rel, abs=1e-5)
        control = effect["control"]
        with _zeroed(model, [(w.layer, w.expert, control["out_channel"], control["in_channel"])]):
            assert control["ppl_ratio"] == pytest.approx(_ppl(_log_probs(model, text), text) / _ppl(base, text),
                                                         rel=rel)
    assert figures["joint_ppl_ratio"] == pytest.approx(_ppl(joint, text) / _ppl(base, text), rel=rel)
    assert figures["base_ppl"] == pytest.approx(_ppl(base, text), rel=rel)


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
    result = scan_source(str(make_checkpoint(tmp_path / "m", "llama", planted("llama"))))
    assert result["verification"] is None and "effect" not in result["super_weights"][0]
    with Catalog(tmp_path / "c.duckdb") as catalog:
        catalog.record_scan(result)
        assert catalog.con.execute("SELECT ppl_ratio, kl, eval_tokens FROM catalog").fetchall() == [(None, None, None)]
        assert catalog.has_scan(result["source"], result["revision"], result["scanner_version"])
        assert not catalog.has_scan(result["source"], result["revision"], result["scanner_version"], verified=True)


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
    inputs = _inputs(StreamingModel(ckpt), load_tokenizer(ckpt), QUICK)
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

    result = scan_source(str(ckpt), ScanOptions(verify=QUICK))
    assert [(w["layer"], w["out_channel"], w["in_channel"]) for w in result["super_weights"]] == [(2, 10, 20)]
    assert "no language-model head" in result["verification"]["skipped"]
    with Catalog(tmp_path / "c.duckdb") as catalog:
        catalog.record_scan(result)
        assert catalog.con.execute("SELECT layer, ppl_ratio, eval_tokens FROM catalog").fetchall() == [(2, None, 0)]
        # Tried, so a verifying crawl does not scan it again and again.
        assert catalog.has_scan(result["source"], result["revision"], result["scanner_version"], verified=True)


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
        from scanner.arch import find_decoder_layers, find_out_proj

        tcfg = model.config.get_text_config()
        _, layers = find_decoder_layers(model.base_model, tcfg.num_hidden_layers)
        self.cells = []
        for layer, expert, row, col in coords:
            spec = find_out_proj(layers[layer], tcfg.hidden_size)
            weight = getattr(layers[layer].get_submodule(spec.module_path), spec.param_name)
            index = (expert, row, col) if spec.kind == "experts" else (col, row) if spec.kind == "conv1d" else (row, col)
            self.cells.append((weight, index))

    def __enter__(self):
        self.saved = [weight.data[index].item() for weight, index in self.cells]
        for weight, index in self.cells:
            weight.data[index] = 0.0

    def __exit__(self, *exc):
        for (weight, index), value in zip(self.cells, self.saved):
            weight.data[index] = value
