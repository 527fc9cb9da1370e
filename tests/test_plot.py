"""The detection figure: drawn from a scan, with the planted super weights marked where they are."""

from click.testing import CliRunner

from superweight.scanner.plot import figure_data, plot
from superweight.scanner.scan import scan
from superweight.cli import cli
from tests.checkpoints import Plant, make_checkpoint

PLANTS = [Plant(2, 10, 20), Plant(5, 7, 99)]


def test_the_figure_marks_the_planted_weights_at_their_layers_peaks(tmp_path):
    result = scan(str(make_checkpoint(tmp_path / "ckpt", "llama", PLANTS)))
    data = plot(result, tmp_path / "figure.png")

    assert (tmp_path / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data.layers == list(range(result.num_layers))
    assert [(layer, row, col) for layer, row, col, _ in data.super_weights] == [(2, 10, 20), (5, 7, 99)]
    first = data.super_weights[0]
    assert first[3] == data.max_output[2]  # the first super activation is its layer's peak in the first pass
    quiet = [v for layer, v in zip(data.layers, data.max_output) if layer not in (2, 5)]
    assert min(data.max_output[2], data.max_output[5]) > 100 * max(quiet)  # the spikes stand out


def test_a_model_without_super_weights_has_no_marks(tmp_path):
    data = figure_data(scan(str(make_checkpoint(tmp_path / "ckpt", "llama", []))))
    assert data.super_weights == [] and len(data.layers) == 8


def test_the_command_scans_and_draws(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", "llama", PLANTS[:1])
    result = CliRunner().invoke(cli, ["plot", str(ckpt), "--out", str(tmp_path / "out" / "f.png")])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{tmp_path / 'out' / 'f.png'}: 8 layers, layer 2 [10, 20]\n"
    assert (tmp_path / "out" / "f.png").is_file()


def test_a_bad_source_is_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["plot", str(tmp_path / "missing"), "--out", str(tmp_path / "f.png")])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {tmp_path / 'missing'}: ") and result.output.count("\n") == 1
    assert not (tmp_path / "f.png").exists()


def test_verify_adds_the_effect_of_zeroing_each_super_weight(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", "llama", [Plant(2, 10, 20), Plant(2, 30, 40, value=2.6, boost=1.0)])
    result = CliRunner().invoke(cli, ["plot", str(ckpt), "--verify", "--out", str(tmp_path / "f.png")])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{tmp_path / 'f.png'}: 8 layers, layer 2 [10, 20]; zeroed: ppl x")
    assert "(control x1)" in result.stdout  # the decoy, zeroed as the control, changes nothing

    scanned = scan(str(ckpt))
    assert figure_data(scanned).effects == ()  # an unverified scan has no effect panel
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
