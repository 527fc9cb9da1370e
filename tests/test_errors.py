"""Untrusted and broken input: one-line errors naming the input, non-zero exits, nothing unpickled."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from superweight.cli import cli
from tests.checkpoints import Plant, make_checkpoint


def run(*args):
    return CliRunner().invoke(cli, ["scan", *map(str, args)])


def assert_one_line_error(result, *fragments, code=1):
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output


class Boom:
    """Unpickling this writes a marker file: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def good(tmp_path):
    return make_checkpoint(tmp_path / "good", "llama", [Plant(3, 10, 20)])


def test_missing_path(tmp_path):
    assert_one_line_error(run(tmp_path / "nope"), str(tmp_path / "nope"), "no such folder")


def test_a_file_is_not_a_checkpoint(good):
    assert_one_line_error(run(good / "config.json"), "not a folder")


def test_missing_config(good):
    (good / "config.json").unlink()
    assert_one_line_error(run(good), str(good), "no config.json")


def test_config_that_is_not_json(good):
    (good / "config.json").write_text("{not json")
    assert_one_line_error(run(good), "config.json", "not valid JSON")


def test_pickle_only_checkpoint_is_refused_without_unpickling(tmp_path, good):
    marker = tmp_path / "unpickled"
    for f in good.glob("*.safetensors"):
        f.unlink()
    with open(good / "pytorch_model.bin", "wb") as f:
        pickle.dump(Boom(str(marker)), f)

    assert_one_line_error(run(good), "only pickle weights (pytorch_model.bin)", "never unpickles")
    assert not marker.exists()


def test_pickle_beside_safetensors_is_ignored(tmp_path, good):
    marker = tmp_path / "unpickled"
    with open(good / "pytorch_model.bin", "wb") as f:
        pickle.dump(Boom(str(marker)), f)

    result = run(good, "--json")

    assert result.exit_code == 0
    assert json.loads(result.stdout)["super_weights"][0]["layer"] == 3
    assert not marker.exists()


def test_remote_code_is_refused_unless_trusted(good):
    config = json.loads((good / "config.json").read_text())
    config.update(model_type="my_custom_llm", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (good / "config.json").write_text(json.dumps(config))

    assert_one_line_error(run(good), "custom code", "--trust-remote-code")
    # Trusted, transformers now looks for the repo's code, which is not there: a different error.
    assert_one_line_error(run(good, "--trust-remote-code"), "config.json: transformers cannot read it")


def test_auto_map_of_a_native_architecture_uses_the_native_code(good):
    config = json.loads((good / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.Custom"}
    (good / "config.json").write_text(json.dumps(config))

    result = run(good, "--json")
    assert result.exit_code == 0
    assert [(w["layer"], w["out_channel"], w["in_channel"]) for w in json.loads(result.stdout)["super_weights"]] == [(3, 10, 20)]


def test_config_that_transformers_rejects(good):
    config = json.loads((good / "config.json").read_text())
    config["num_attention_heads"] = 7  # does not divide hidden_size 64
    (good / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run(good, "--no-record"), "config.json", "transformers cannot read it")


def test_unknown_architecture(good):
    config = json.loads((good / "config.json").read_text())
    config["model_type"] = "no_such_family"
    (good / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run(good), "'no_such_family'", "unknown to transformers")


def test_moe_with_a_shared_expert_is_refused(tmp_path):
    make_checkpoint(tmp_path / "moe", "qwen3_moe", [])
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    config.update(model_type="qwen2_moe", shared_expert_intermediate_size=64)
    (tmp_path / "moe" / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run(tmp_path / "moe"), "shared dense expert")


def test_truncated_safetensors(good):
    path = good / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_one_line_error(run(good), str(path), "the file is truncated")


def test_corrupt_safetensors_header(good):
    path = good / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))
    assert_one_line_error(run(good), str(path), "not a readable safetensors")


def rewrite(path, change):
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_shape_that_disagrees_with_the_config(good):
    name = "model.layers.2.mlp.down_proj.weight"
    rewrite(good / "model.safetensors", lambda t: t.__setitem__(name, t[name][:, :64].contiguous()))
    assert_one_line_error(run(good), name, "has shape [64, 64]", "config implies [64, 128]")


def test_missing_tensor(good):
    rewrite(good / "model.safetensors", lambda t: t.pop("model.layers.6.self_attn.q_proj.weight"))
    assert_one_line_error(run(good), "lacks 1 tensor", "model.layers.6.self_attn.q_proj.weight")


def test_quantized_tensor_is_refused(good):
    name = "model.layers.1.mlp.down_proj.weight"
    rewrite(good / "model.safetensors", lambda t: t.__setitem__(name, t[name].to(torch.int8)))
    assert_one_line_error(run(good), name, "dtype I8", "unquantized")


def test_shard_index_naming_a_missing_shard(good):
    (good / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00002.safetensors"}}))
    assert_one_line_error(run(good), "missing: model-00002.safetensors")


def test_one_bad_source_does_not_stop_the_others(tmp_path, good):
    result = run(tmp_path / "nope", good, "--json")

    assert result.exit_code == 3
    failed, ok = [json.loads(line) for line in result.stdout.splitlines()]
    assert failed["status"] == "failed" and "no such folder" in failed["error"]
    assert ok["status"] == "ok" and ok["super_weights"][0]["layer"] == 3
    assert result.stderr.count("Error: ") == 1


def test_traceback_only_with_superweight_debug(tmp_path):
    env = {**os.environ, "SUPERWEIGHT_DEBUG": "1"}
    missing = str(tmp_path / "nope")
    proc = subprocess.run([sys.executable, "-m", "superweight.cli", "scan", missing],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and f"Error: {missing}: no such folder" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_a_gpu(good):
    assert_one_line_error(run(good, "--device", "cuda"), "--device cuda", "0 CUDA device(s)", "--device cpu")


def test_device_that_is_not_a_device(good):
    assert_one_line_error(run(good, "--device", "toaster"), "--device toaster: not a device name")


def test_missing_final_norm(good):
    rewrite(good / "model.safetensors", lambda t: t.pop("model.norm.weight"))
    assert_one_line_error(run(good), "lacks 1 tensor", "model.norm.weight")


def test_too_few_layers(tmp_path):
    path = make_checkpoint(tmp_path / "two", "llama", [], num_hidden_layers=2)
    assert_one_line_error(run(path), "2 decoder layer(s)", "at least 3")


def test_empty_prompt_without_bos(tmp_path):
    path = make_checkpoint(tmp_path / "gpt2", "gpt2", [], bos_token_id=None)
    assert_one_line_error(run(path, "--prompt", " "), "the prompt gives no tokens")


def test_prompt_longer_than_the_model(good):
    assert_one_line_error(run(good, "--prompt", "word " * 200), "the prompt has 201 tokens", "128 positions")  # BOS + 200 words


def test_device_that_is_not_supported(good):
    assert_one_line_error(run(good, "--device", "meta"), "--device meta: only cpu and cuda devices are supported")


# -- files outside the checkpoint, and files that are not files ----------------------------------

def test_a_weight_linked_from_outside_the_checkpoint_is_refused(tmp_path, good):
    outside = tmp_path / "elsewhere.safetensors"
    (good / "model.safetensors").rename(outside)
    (good / "model.safetensors").symlink_to(outside)
    assert_one_line_error(run(good, "--no-record"), "model.safetensors", "lies outside", str(good))


def test_a_shard_index_naming_a_file_outside_the_checkpoint_is_refused(tmp_path, good):
    outside = tmp_path / "x.safetensors"
    (good / "model.safetensors").rename(outside)
    (good / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../x.safetensors"}}))
    assert_one_line_error(run(good, "--no-record"), "x.safetensors", "lies outside")


def test_a_tokenizer_linked_from_outside_is_refused(tmp_path, good):
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (good / "tokenizer.json").symlink_to(secret)
    assert_one_line_error(run(good, "--no-record"), "tokenizer.json", "lies outside")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_fifo_in_place_of_a_file_is_refused_without_blocking(good, name):
    (good / name).unlink()
    os.mkfifo(good / name)
    proc = subprocess.run([sys.executable, "-m", "superweight.cli", "scan", str(good), "--no-record"],
                          capture_output=True, text=True, timeout=120)  # a blocked open would hang here
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "not a regular file" in proc.stderr and name in proc.stderr


def test_a_gguf_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "model.gguf")
    proc = subprocess.run([sys.executable, "-m", "superweight.cli", "scan", str(tmp_path / "model.gguf"), "--no-record"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "not a regular file" in proc.stderr


# -- numbers that are not numbers, sizes that are not sizes --------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_weight_fails_the_scan_in_one_line_and_records_nothing(good, tmp_path, value):
    name = "model.layers.2.mlp.down_proj.weight"
    rewrite(good / "model.safetensors", lambda t: t[name].__setitem__((5, 5), value))
    catalog = tmp_path / "c.duckdb"

    result = run(good, "--json", "--catalog", catalog)

    assert_one_line_error(result, "layer 2", "NaN or infinite", "broken")
    assert json.loads(result.stdout)["status"] == "failed"  # and the JSON line is valid JSON
    assert not catalog.exists() or catalog_rows(catalog) == []


def catalog_rows(path):
    import duckdb

    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute("SELECT * FROM catalog").fetchall()


@pytest.mark.parametrize("key,value,fragment", [
    ("rms_norm_eps", "NaN", "NaN"),
    ("rms_norm_eps", "1e999", "inf"),
    ("hidden_size", '"big"', "hidden_size is 'big', not a whole number"),
    ("num_hidden_layers", "null", "num_hidden_layers is None, not a whole number"),
    ("num_attention_heads", "-4", "num_attention_heads is -4, not a positive whole number"),
    ("vocab_size", "true", "vocab_size is True, not a whole number"),
])
def test_a_config_value_that_is_not_a_size_is_one_clear_line(good, key, value, fragment):
    text = (good / "config.json").read_text()
    config = json.loads(text)
    config[key] = "__VALUE__"
    (good / "config.json").write_text(json.dumps(config).replace('"__VALUE__"', value))
    assert_one_line_error(run(good, "--no-record"), "config.json", fragment)


@pytest.mark.parametrize("layers,fragment", [
    (1000, "config.json says 1000 decoder layers; the weights hold 8"),
    (100_000, "num_hidden_layers is 100000, beyond any model (at most 4096)"),
    (1_000_000_000, "num_hidden_layers is 1000000000, beyond any model"),
])
def test_a_config_claiming_more_layers_than_the_weights_hold_is_refused_at_once(good, layers, fragment):
    config = json.loads((good / "config.json").read_text())
    (good / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))
    assert_one_line_error(run(good, "--no-record"), fragment)  # it ran for minutes and grew past 1.9 GB


@pytest.mark.parametrize("key", ["hidden_size", "max_position_embeddings", "intermediate_size"])
def test_absurd_sizes_are_refused_before_anything_is_allocated(good, key):
    config = json.loads((good / "config.json").read_text())
    (good / "config.json").write_text(json.dumps({**config, key: 10**12}))
    # Allocating for it failed with "can't allocate 10^15 bytes"; now nothing is built for it.
    assert_one_line_error(run(good, "--no-record"), f"{key} is 1000000000000, beyond any model")


@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf"])
def test_a_spike_ratio_that_is_not_a_positive_number_is_a_usage_error(good, value):
    result = run(good, "--spike-ratio", value)
    assert result.exit_code == 2 and "Invalid value for '--spike-ratio'" in result.stderr


def test_a_hub_that_accepts_but_never_answers_times_out_in_one_line(tmp_path):
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections (the kernel does) and never answers
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}", "SUPERWEIGHT_HUB_TIMEOUT": "2",
           "SUPERWEIGHT_HOME": str(tmp_path)}
    try:
        proc = subprocess.run([sys.executable, "-m", "superweight.cli", "scan", "some/model", "--no-record"],
                              capture_output=True, text=True, timeout=120, env=env)
    finally:
        silent.close()
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("Error: some/model@main: Hub request to http://127.0.0.1:") and "timed out" in proc.stderr
