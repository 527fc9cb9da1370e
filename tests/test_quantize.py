"""The quantization lab: fake round-to-nearest quantization, the variants, and `superweight quantize`."""

import dataclasses
import json
import re

import duckdb
import pytest
import torch
from click.testing import CliRunner

from superweight.cli import cli
from superweight.index.catalog import Catalog
from superweight.scanner.config import DetectConfig
from superweight.scanner.detect import Detector
from superweight.scanner.quantize import QuantConfig, Variant, _Plan, fake_quantize, quantize_activation, variants
from superweight.scanner.scan import ScanOptions, prompt_ids, scan
from superweight.scanner.verify import VerifyConfig
from tests.checkpoints import Plant, make_checkpoint, streaming
from tests.test_errors import assert_one_line_error

QUICK = VerifyConfig(tokens=256, context=64, head_slice_rows=100)
SMALL = QuantConfig(bits=(8, 3), block_sizes=(None,), group_sizes=(64,), z=(3.0,), evaluation=QUICK, max_copies=12)
SMALL_ARGS = ["--bits", "8,3", "--block-size", "tensor", "--group-size", "64", "--z", "3", "--tokens", "256"]


def levels_per_run(q: torch.Tensor, n: int) -> int:
    flat = q.reshape(-1)
    return max(len(torch.unique(flat[i:i + n])) for i in range(0, flat.numel(), n))


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_round_to_nearest_has_2_to_the_bits_levels_and_half_a_step_of_error(bits):
    torch.manual_seed(0)
    w = torch.randn(48, 100)
    for kwargs, runs in (({"block_size": 1000}, [w.reshape(-1)[i:i + 1000] for i in range(0, 4800, 1000)]),
                         ({"group_size": 64}, [w[r, g:g + 64] for r in range(48) for g in (0, 64)]),
                         ({}, [w.reshape(-1)])):
        q = fake_quantize(w, bits, **kwargs)
        assert q.shape == w.shape and q.dtype == torch.float32
        for run, start in zip(runs, range(len(runs)), strict=True):
            step = float(run.max() - run.min()) / (2 ** bits - 1)
            qrun = fake_quantize(run.reshape(1, -1), bits)
            assert len(torch.unique(qrun)) <= 2 ** bits
            assert float((qrun - run).abs().max()) <= step / 2 + 1e-5
        if "block_size" in kwargs:  # the blocks are runs of the flattened matrix, the last one shorter
            assert torch.equal(q.reshape(-1)[4000:], fake_quantize(w.reshape(-1)[4000:].reshape(1, -1), bits)[0])
        if "group_size" in kwargs:  # groups are runs of a row: 64 inputs, then the other 36
            assert torch.equal(q[5, 64:], fake_quantize(w[5, 64:].reshape(1, -1), bits)[0])


def test_clipping_bounds_each_block_before_quantizing():
    torch.manual_seed(0)
    w = torch.randn(32, 32) * 0.02
    w[3, 4] = 5.0  # an outlier that would set the scale
    a = w.abs()
    bound = float(a.mean() + 3 * a.std(unbiased=False))
    q = fake_quantize(w, 4, z=3.0)
    assert float(q.abs().max()) <= bound * 1.01
    assert torch.allclose(q, fake_quantize(w.clamp(-bound, bound), 4), atol=1e-6)  # clip, then round to nearest
    assert float((q - w)[w.abs() < bound].abs().mean()) < float((fake_quantize(w, 4) - w)[w.abs() < bound].abs().mean())


def test_an_activation_channel_kept_out_neither_sets_the_scale_nor_is_rounded():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 64)
    x[:, 0, 7] = 3000.0  # a super activation: one channel, one token
    kept = quantize_activation(x, 8, [7])
    assert torch.equal(kept[..., 7], x[..., 7])
    plain = quantize_activation(x, 8, [])
    others = torch.ones(64, dtype=torch.bool)
    others[7] = False
    assert float((kept - x)[..., others].abs().max()) < 0.05 < float((plain - x)[..., others].abs().max())


def test_variants_cover_the_grid_and_name_what_they_keep():
    found = variants(QuantConfig(bits=(4,), block_sizes=(128 ** 2, None), group_sizes=(64,), z=(3.0, 5.0)))
    assert len(found) == 3 * (2 + 2 + 1 + 2) + 2  # per shape: rtn, keep, 2 clips, control, 2 clip controls; W8A8
    assert {v.keep for v in found if v.variant == "rtn+keep+clip"} == {"weights"}
    assert {v.keep for v in found if v.variant.endswith("-control")} == {"control"}
    assert {v.keep for v in found if v.variant in ("rtn", "w8a8", "w8a8+keep-act")} == {None}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    folder = make_checkpoint(tmp_path_factory.mktemp("quant") / "llama", "llama", [Plant(2, 10, 20)])
    model = streaming(folder)
    ids, _ = prompt_ids(DetectConfig().prompt, model.config)
    return folder, model, Detector(model, DetectConfig()).run(model.load_static(ids))


def test_copies_per_pass_follow_memory(planted):
    from superweight.scanner.quantize import copies_per_pass

    _, model, _ = planted
    one = 4 * 256 * (2 * 128 + 7 * 64 + 4 * 64)  # a copy of 256 tokens in sequences of 64: 983,040 bytes
    assert copies_per_pass(model, 256, 64, budget=10 * one) == 10
    assert copies_per_pass(model, 256, 64, budget=one // 2) == 1  # one copy at least
    assert copies_per_pass(model, 256, 64, budget=10 ** 12) == 256  # and a bound on the batch


def test_keep_restores_the_super_weight_and_the_control_restores_another(planted):
    _, model, detection = planted
    plan = _Plan(model, detection)
    model.load_layer(2)
    try:
        w = model.out_proj_weight(2).detach()
        name = model.out_projs[2].module_path
        kept = plan.weight(2, name, w, Variant("rtn+keep+clip", 3, z=3.0))
        control = plan.weight(2, name, w, Variant("rtn+keep+clip-control", 3, z=3.0))
        (r, c), = plan.controls[2]
    finally:
        model.free_layer(2)
    assert float(kept[10, 20]) == pytest.approx(2.5) and float(control[10, 20]) < 0.5  # clipped, not restored
    assert (r, c) != (10, 20) and float(control[r, c]) == float(w[r, c])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D layers, weight (in, out)
def test_the_lab_measures_the_base_perplexity_verify_reports(planted, arch, tmp_path):
    folder = planted[0] if arch == "llama" else make_checkpoint(tmp_path / arch, arch, [Plant(2, 10, 20)])
    verified = scan(str(folder), ScanOptions(verify=QUICK, quantize=SMALL))
    lab = verified.quantization
    assert lab["base_ppl"] == pytest.approx(verified.verification.base_ppl, rel=1e-4)
    assert lab["tokens"] == verified.verification.tokens
    by = {(r["variant"], r["bits"], r["group_size"], r["z"]): r for r in lab["results"]}
    assert abs(by[("rtn", 8, 64, None)]["ppl_ratio"] - 1) < 0.01  # 8 bits over groups: near lossless
    assert all(r["ppl"] == pytest.approx(r["ppl_ratio"] * lab["base_ppl"]) for r in lab["results"])
    assert lab["passes"] == 2  # 23 copies (22 variants and the original), 12 a pass


def test_quantize_prints_json_records_and_exports_the_figures(planted, tmp_path):
    folder, *_ = planted
    catalog = tmp_path / "catalog.duckdb"
    result = CliRunner().invoke(cli, ["quantize", str(folder), *SMALL_ARGS, "--catalog", str(catalog), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["status"] == "ok" and report["super_weights"] == 1 and len(report["results"]) == 22
    assert set(report["results"][0]) == {"variant", "bits", "block_size", "group_size", "z", "ppl", "ppl_ratio"}
    rows = duckdb.connect(str(catalog), read_only=True).execute(
        "SELECT count(*), count(DISTINCT variant), min(eval_tokens) FROM quantization").fetchone()
    assert rows == (22, 7, 256)
    export = CliRunner().invoke(cli, ["export", "--catalog", str(catalog), "--out", str(tmp_path / "catalog.parquet")])
    assert export.exit_code == 0, export.output
    assert duckdb.sql(f"SELECT count(*) FROM '{tmp_path / 'quantization.parquet'}'").fetchall() == [(22,)]


def test_quantize_prints_a_table(planted):
    folder, *_ = planted
    result = CliRunner().invoke(cli, ["quantize", str(folder), *SMALL_ARGS, "--no-record", "--no-controls",
                                      "--no-activations"])
    assert result.exit_code == 0, result.output
    assert "base perplexity" in result.stdout and "rtn+keep+clip" in result.stdout and "group 64" in result.stdout


def test_a_model_with_fused_experts_fails_in_one_line_before_detection(tmp_path):
    folder = make_checkpoint(tmp_path / "mixtral", "mixtral", [Plant(2, 10, 20, expert=1)])
    result = CliRunner().invoke(cli, ["quantize", str(folder), *SMALL_ARGS, "--no-record", "--json"])
    assert_one_line_error(result, "fused parameters")
    report = json.loads(result.stdout)
    assert report["status"] == "failed" and "fused parameters" in report["error"]


# Each would overflow, spin in parsing, allocate terabytes or compute nonsense if it were accepted.
BAD_SETTINGS = [["--bits", "0"], ["--bits", "17"], ["--bits", "64"], ["--bits", "1000"], ["--bits", "2^2000"],
                ["--block-size", "big"], ["--block-size", "3^99999999"], ["--block-size", "0"],
                ["--block-size", "1" + "0" * 60], ["--group-size", "2^2000"], ["--z", ""], ["--z", "nan"],
                ["--z", "inf"], ["--tokens", "1"], ["--tokens", "100000"]]


@pytest.mark.parametrize("args", BAD_SETTINGS, ids=" ".join)
def test_bad_settings_are_usage_errors_before_anything_runs(planted, args):
    folder, *_ = planted
    result = CliRunner().invoke(cli, ["quantize", str(folder), *args, "--no-record"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.splitlines()[-1].startswith(f"Error: Invalid value for '{args[0]}'")


def test_too_few_tokens_for_the_models_sequences_fail_before_detection(planted, tmp_path, monkeypatch):
    folder, *_ = planted
    catalog = tmp_path / "catalog.duckdb"
    monkeypatch.setenv("SUPERWEIGHT_LEDGER_URL", f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    result = CliRunner().invoke(cli, ["quantize", str(folder), "--tokens", "255", "--catalog", str(catalog)])
    assert_one_line_error(result, "--tokens 255: the evaluation needs at least 256 tokens on this model")
    assert "detect" not in result.stderr  # no pass ran
    assert duckdb.connect(str(catalog), read_only=True).execute("SELECT count(*) FROM scans").fetchone() == (0,)


def test_blocks_and_groups_larger_than_the_matrix_are_the_matrix_and_the_row():
    torch.manual_seed(0)
    w = torch.randn(16, 24)
    assert torch.equal(fake_quantize(w, 4, block_size=10 ** 12), fake_quantize(w, 4))
    assert torch.equal(fake_quantize(w, 4, group_size=2 ** 31), fake_quantize(w, 4, group_size=24))


def test_a_rerun_with_other_settings_keeps_the_figures_of_the_first(planted, tmp_path):
    folder, *_ = planted
    catalog = tmp_path / "catalog.duckdb"
    common = ["--block-size", "tensor", "--group-size", "64", "--tokens", "256", "--no-controls", "--no-activations",
              "--catalog", str(catalog)]
    for bits in ("8", "4", "4"):  # the second 4-bit run replaces only its own rows
        assert CliRunner().invoke(cli, ["quantize", str(folder), "--bits", bits, *common]).exit_code == 0
    rows = duckdb.connect(str(catalog), read_only=True).execute(
        "SELECT bits, count(*) FROM quantization GROUP BY bits ORDER BY bits").fetchall()
    assert rows == [(4, 6), (8, 6)]  # rtn, rtn+keep and rtn+keep+clip over two layouts, once each


def test_a_nan_in_the_lm_head_fails_the_source_in_the_ledger_with_an_error_line(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    folder = make_checkpoint(tmp_path / "nan-head", "llama", [Plant(2, 10, 20)])
    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"][5, 3] = float("nan")
    save_file(tensors, folder / "model.safetensors")
    monkeypatch.setenv("SUPERWEIGHT_LEDGER_URL", f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    result = CliRunner().invoke(cli, ["quantize", str(folder), *SMALL_ARGS, "--catalog", str(tmp_path / "c.duckdb")])
    assert_one_line_error(result, "perplexity on the evaluation text is not finite")
    ledger = CliRunner().invoke(cli, ["ledger", "--json"])
    (record,) = [json.loads(line) for line in ledger.stdout.splitlines()]
    assert record["state"] == "failed" and "not finite" in record["error"]


def test_the_plan_comes_before_the_work_and_the_first_pass_gives_an_estimate(planted, monkeypatch):
    from superweight.scanner.progress import Progress
    from superweight.scanner.quantize import quantize_lab

    folder, model, detection = planted
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS")  # a line per phase, as in a log
    result = CliRunner().invoke(cli, ["quantize", str(folder), *SMALL_ARGS, "--no-record", "--no-controls"])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    (plan,) = [i for i, line in enumerate(lines) if "variants and the unquantized model" in line]
    assert lines[plan] == (f"{folder}: quantize: 14 variants and the unquantized model, 15 copies of 256 tokens, "
                           "256 per pass: 1 pass(es) over 8 layers")
    assert all("quantize: " not in line for line in lines[:plan])  # before the first pass

    class Told(Progress):
        def __init__(self):
            self.events = []

        def phase(self, name, total):
            self.events.append(name)

        def note(self, text):
            self.events.append(text)

    told = Told()
    quantize_lab(model, detection, config=dataclasses.replace(SMALL, max_copies=10), progress=told)
    notes = [e for e in told.events if "pass 1 of" in e or "variants" in e]
    assert notes[0].startswith("quantize: 22 variants and the unquantized model, 23 copies") and \
        notes[0].endswith("10 per pass: 3 pass(es) over 8 layers")
    assert re.fullmatch(r"quantize: pass 1 of 3 took \d+ s; about \d+ s to go", notes[1])
    assert told.events.index(notes[1]) == 3 + told.events.index(notes[0])  # after pass 1 and its head read


def test_an_interrupted_quantize_is_failed_in_the_ledger_not_running(planted, tmp_path):
    from superweight.index.ledger import Ledger
    from superweight.index.record import scan_and_record
    from superweight.scanner.progress import Progress

    folder, *_ = planted

    class CtrlC(Progress):
        def phase(self, name, total):
            if name.startswith("quantize"):
                raise KeyboardInterrupt

    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    with Catalog(tmp_path / "catalog.duckdb") as catalog, pytest.raises(KeyboardInterrupt):
        scan_and_record(str(folder), ScanOptions(quantize=SMALL), catalog=catalog, ledger=ledger, progress=CtrlC())
    (record,) = ledger.records()
    assert (record["state"], record["error"]) == ("failed", "interrupted before it finished (SIGINT or SIGTERM)")
    ledger.close()


def test_the_quantization_figure_is_drawn_from_the_catalog(planted, tmp_path):
    from superweight.scanner.plot_quant import quant_series

    folder, *_ = planted
    catalog = tmp_path / "catalog.duckdb"
    assert CliRunner().invoke(cli, ["quantize", str(folder), *SMALL_ARGS, "--block-size", "1024,tensor",
                                    "--catalog", str(catalog)]).exit_code == 0
    out = tmp_path / "quant.png"
    result = CliRunner().invoke(cli, ["plot", str(folder), "--quant", "--out", str(out), "--catalog", str(catalog)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "10 line(s) over 3 weight layout(s)" in result.stdout
    cursor = duckdb.connect(str(catalog), read_only=True).execute("SELECT * FROM quantization")
    rows = [dict(zip([d[0] for d in cursor.description], row)) for row in cursor.fetchall()]
    labels, series = quant_series(rows)
    assert labels == ["g64", "32²", "tensor"] and sorted(series) == [3, 8]
    missing = CliRunner().invoke(cli, ["plot", "nobody/nothing", "--quant", "--out", str(out), "--catalog", str(catalog)])
    assert missing.exit_code == 1 and "run 'superweight quantize nobody/nothing' first" in missing.output


def test_a_published_index_carries_the_figures_and_documents_them(planted, tmp_path):
    folder, *_ = planted
    catalog = tmp_path / "catalog.duckdb"
    assert CliRunner().invoke(cli, ["quantize", str(folder), *SMALL_ARGS, "--catalog", str(catalog)]).exit_code == 0
    result = CliRunner().invoke(cli, ["publish", str(tmp_path / "site"), "--catalog", str(catalog)])
    assert result.exit_code == 0, result.output
    card = (tmp_path / "site" / "README.md").read_text()
    assert duckdb.sql(f"SELECT count(*) FROM '{tmp_path / 'site' / 'quantization.parquet'}'").fetchall() == [(22,)]
    assert "config_name: quantization" in card and "| `ppl_ratio` | double |" in card


@pytest.mark.slow
def test_on_the_real_smollm2_keeping_the_super_weight_is_what_makes_clipping_work(smollm2):
    """4-bit round to nearest over whole tensors: SmolLM2's super weight (5.9) stretches the scale of
    its down projection. Clipping outliers and restoring the super weight fixes that; clipping and
    restoring a same-magnitude ordinary weight instead leaves the super weight clipped and breaks
    the model. Keeping the super activation out of W8A8's activation scale helps too."""
    config = QuantConfig(bits=(4,), block_sizes=(None,), group_sizes=(), z=(5.0,),
                         evaluation=VerifyConfig(tokens=256, context=128))
    lab = scan(str(smollm2), ScanOptions(quantize=config)).quantization
    ratio = {r["variant"]: r["ppl_ratio"] for r in lab["results"]}
    assert ratio["rtn"] > 100 and ratio["rtn+keep"] == pytest.approx(ratio["rtn"], rel=0.05)
    assert ratio["rtn+keep+clip"] < ratio["rtn"] / 10
    assert ratio["rtn+keep+clip-control"] > 10 * ratio["rtn+keep+clip"]
    assert ratio["w8a8+keep-act"] < ratio["w8a8"]


def test_a_pass_that_fails_midway_leaves_every_layer_as_it_was(planted, monkeypatch):
    from superweight.scanner import quantize

    _, model, detection = planted
    stream = quantize._QuantStream(model, [None, Variant("rtn", 3)], _Plan(model, detection))
    original, entered = quantize._QuantStream.entering, []

    def entering(self, index, args, kwargs):  # patches the layer's linear layers, then fails in layer 3
        original(self, index, args, kwargs)
        entered.append(index)
        if index == 3:
            raise RuntimeError("a layer failed")

    monkeypatch.setattr(quantize._QuantStream, "entering", entering)
    with pytest.raises(RuntimeError, match="a layer failed"):
        stream.run(torch.tensor([[1, 2, 3, 4]]))
    assert entered == [0, 1, 2, 3]
    assert not any("forward" in vars(m) for layer in model.layers for m in layer.modules())


@pytest.mark.slow  # a CLI subprocess: about 6 s of imports
def test_sigterm_mid_lab_ends_the_attempt_failed_in_the_ledger(planted, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    folder, *_ = planted
    env = {**os.environ, "SUPERWEIGHT_HOME": str(tmp_path / "home")}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS")  # a line per phase on stderr: the plan says when the lab starts
    cli_path = str(Path(sys.executable).with_name("superweight"))
    lab = subprocess.Popen([cli_path, "quantize", str(folder), "--full", "--tokens", "6144"], env=env,
                           stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        for line in lab.stderr:
            if "variants and the unquantized model" in line:
                lab.send_signal(signal.SIGTERM)
                break
        assert lab.wait(timeout=120) != 0
    finally:
        lab.kill()
    ledger = subprocess.run([cli_path, "ledger", "--json"], env=env, capture_output=True, text=True, timeout=120)
    (record,) = [json.loads(line) for line in ledger.stdout.splitlines()]
    assert (record["state"], record["error"]) == ("failed", "interrupted before it finished (SIGINT or SIGTERM)")
