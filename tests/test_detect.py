"""Detection on tiny random checkpoints of every supported family, with planted super weights."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from superweight.scanner.scan import scan_source
from tests.checkpoints import ARCHS, MOE_ARCHS, Plant, coordinates, make_checkpoint


def _decoy(layer, expert):
    """A weight larger than any planted one, in a column whose input stays quiet."""
    return Plant(layer, 33, 50, value=8.0, boost=1.0, expert=expert)


def scenarios(expert):
    return {
        "one": ([Plant(3, 10, 20, expert=expert)], [_decoy(3, expert)]),
        "two_in_one_layer": ([Plant(3, 10, 20, expert=expert), Plant(3, 40, 70, expert=expert)], [_decoy(3, expert)]),
        "two_layers": ([Plant(2, 10, 20, expert=expert), Plant(5, 7, 99, expert=expert)], [_decoy(4, expert)]),
        "none": ([], [_decoy(4, expert)]),
    }


CASES = [(arch, name) for arch in ARCHS for name in scenarios(None)]


@pytest.mark.parametrize("arch,scenario", CASES)
def test_finds_exactly_the_planted_super_weights(tmp_path, arch, scenario):
    expert = 1 if arch in MOE_ARCHS else None
    plants, decoys = scenarios(expert)[scenario]
    make_checkpoint(tmp_path, arch, plants + decoys)

    result = scan_source(str(tmp_path))

    assert coordinates(result) == {(p.layer, p.expert, p.row, p.col) for p in plants}
    assert result["model_type"] == arch
    assert result["num_layers"] == 8
    assert not result["truncated"]


# Later super weights of one super activation (OLMo-7B layers 1, 2, 7 and 24, all row 269; Llama-30B
# layers 3 and 10, row 5633): each reads the channel the earlier one made massive and writes the same
# row with the same sign, 1, 7 and 20 layers later. Their neurons are aimed weakly (boost 1.5), so they
# fire only on the massive channel: removing the first weight silences them (the detection before
# this rule lost 11 of 42 such cases, one later weight each), so they must be read off the
# unmodified model. A canceller of the same shape, with the opposite sign, is not a super weight.
def _later(expert):
    return [Plant(2, 10, 20, expert=expert)] + [Plant(2 + gap, 10, 30 + gap, reads=10, boost=1.5, expert=expert)
                                                for gap in (1, 7, 20)]


def _canceller(expert):
    return Plant(9, 10, 44, value=-2.5, reads=10, boost=1.5, expert=expert)


@pytest.mark.parametrize("arch", ARCHS)
def test_later_layers_writing_the_same_channel_are_found_and_a_canceller_is_not(tmp_path, arch):
    expert = 1 if arch in MOE_ARCHS else None
    amplifiers = make_checkpoint(tmp_path / "amplifiers", arch, _later(expert), num_hidden_layers=24)
    cancelled = make_checkpoint(tmp_path / "cancelled", arch, [Plant(2, 10, 20, expert=expert), _canceller(expert)],
                                num_hidden_layers=24)

    found = scan_source(str(amplifiers))
    assert coordinates(found) == {(p.layer, p.expert, p.row, p.col) for p in _later(expert)}
    assert [w["round"] for w in found["super_weights"]] == [1, 1, 1, 1]  # all in the unmodified model
    assert found["rounds"] == 2  # one replay confirms that nothing was masked
    (activation,) = found["super_activations"]  # one residual channel, written by four layers
    assert (activation["channel"], activation["layers"], activation["weights"]) == (10, [2, 3, 9, 22], [0, 1, 2, 3])
    assert len(found["super_neurons"]) == 4

    cancelling = scan_source(str(cancelled))
    assert coordinates(cancelling) == {(2, expert, 10, 20)}
    reasons = {(r["layer"], r["out_channel"], r["in_channel"]): r["reason"] for r in cancelling["rejected"]}
    assert "cancels" in reasons[(9, 10, 44)]


def test_a_masked_weight_is_found_by_a_replay(tmp_path):
    """Two weights write one row; the second explains less than min_share of it until the first is gone."""
    make_checkpoint(tmp_path, "llama", [Plant(3, 10, 20, value=2.5), Plant(3, 10, 21, value=0.4)])

    result = scan_source(str(tmp_path))

    assert [(w["in_channel"], w["round"]) for w in result["super_weights"]] == [(20, 1), (21, 2)]
    assert result["rounds"] == 3  # masking depth 2, and a last pass that finds nothing
    assert [w["activation"] for w in result["super_weights"]] == [0, 0]


def test_two_weights_sharing_a_row_are_found_in_one_pass(tmp_path):
    """Llama-13B layer 2, row 2231: two columns of one row, each explaining half of it."""
    make_checkpoint(tmp_path, "llama", [Plant(2, 10, 20), Plant(2, 10, 21)])

    result = scan_source(str(tmp_path))

    assert coordinates(result) == {(2, None, 10, 20), (2, None, 10, 21)}
    assert [w["round"] for w in result["super_weights"]] == [1, 1] and result["rounds"] == 2
    assert all(0.25 < w["share"] < 0.75 for w in result["super_weights"])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral", "qwen3_moe", "phi3", "gpt_neox"])
def test_reported_index_points_at_the_stored_weight(tmp_path, arch):
    """`tensor` and `index` locate the weight in the checkpoint as stored (GPT-2 Conv1D is [col, row])."""
    expert = 1 if arch in MOE_ARCHS else None
    make_checkpoint(tmp_path, arch, [Plant(3, 10, 20, value=2.75, expert=expert)])

    (weight,) = scan_source(str(tmp_path))["super_weights"]

    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        stored = f.get_tensor(weight["tensor"])
    assert stored[tuple(weight["index"])].item() == pytest.approx(2.75)
    assert weight["weight"] == pytest.approx(2.75)
    expected_index = [20, 10] if arch == "gpt2" else [10, 20]
    assert weight["index"] == expected_index


def test_super_weight_fields_and_layers(tmp_path):
    make_checkpoint(tmp_path, "llama", [Plant(3, 10, 20)])

    result = scan_source(str(tmp_path))

    (w,) = result["super_weights"]
    assert w["token"] == 0  # the plant is aimed at the first token, like real super activations
    assert abs(w["output_activation"]) > 50 * abs(w["weight"])  # it is driven by a large input
    assert w["input_activation"] * w["weight"] * w["output_activation"] > 0  # signs agree
    assert len(result["layers"]) == 8
    loudest = max(result["layers"], key=lambda p: p["max_output"])
    assert (loudest["layer"], loudest["output_channel"], loudest["input_channel"]) == (3, 10, 20)
    assert len(result["revision"]) == 64  # sha256 content hash of a local folder


def test_decoy_alone_is_rejected_with_a_reason(tmp_path):
    """A very large weight on a quiet input spikes, but is not a super weight."""
    make_checkpoint(tmp_path, "llama", [Plant(4, 33, 50, value=40.0, boost=1.0)])

    result = scan_source(str(tmp_path))

    assert result["super_weights"] == []
    reasons = {(r["layer"], r["out_channel"], r["in_channel"]): r["reason"] for r in result["rejected"]}
    assert "quiet input" in reasons[(4, 33, 50)]


def test_bfloat16_checkpoint_scans_in_its_own_dtype(tmp_path):
    make_checkpoint(tmp_path, "llama", [Plant(3, 10, 20)], dtype=torch.bfloat16)

    result = scan_source(str(tmp_path))

    assert (result["dtype"], result["compute_dtype"]) == ("bfloat16", "bfloat16")
    assert coordinates(result) == {(3, None, 10, 20)}


def test_content_hash_changes_with_the_weights(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_checkpoint(a, "llama", [Plant(3, 10, 20)])
    make_checkpoint(b, "llama", [Plant(3, 10, 21)])

    assert scan_source(str(a))["revision"] == scan_source(str(a))["revision"]
    assert scan_source(str(a))["revision"] != scan_source(str(b))["revision"]


def test_layers_with_different_mlps(tmp_path):
    """Qwen3-MoE with a dense first layer (mlp_only_layers): each layer's projection is found on its own."""
    make_checkpoint(tmp_path, "qwen3_moe", [Plant(0, 10, 20), Plant(3, 7, 99, expert=1)], mlp_only_layers=[0])

    result = scan_source(str(tmp_path))

    assert coordinates(result) == {(0, None, 10, 20), (3, 1, 7, 99)}
    tensors = {w["layer"]: (w["tensor"], w["index"]) for w in result["super_weights"]}
    assert tensors[0] == ("model.layers.0.mlp.down_proj.weight", [10, 20])
    assert tensors[3] == ("model.layers.3.mlp.experts.1.down_proj.weight", [7, 99])
    assert result["out_proj"] == ["model.layers.N.mlp.down_proj", "model.layers.N.mlp.experts"]


def test_tied_checkpoint_that_stores_only_the_head(tmp_path):
    """Tied embeddings saved under lm_head.weight (transformers loads these) are the embedding."""
    make_checkpoint(tmp_path, "llama", [Plant(3, 10, 20)], tie_word_embeddings=True)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, path, metadata={"format": "pt"})

    assert coordinates(scan_source(str(tmp_path))) == {(3, None, 10, 20)}
