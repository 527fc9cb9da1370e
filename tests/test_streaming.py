"""The scan streams: one decoder layer in memory at a time, no LM head, replays from the changed layer."""

import gc
import os
from pathlib import Path

import pytest

from superweight.scanner.config import DetectConfig
from superweight.scanner.errors import CorruptCheckpoint
from superweight.scanner.fetch import LocalFile, Transfer
from superweight.scanner.detect import Detector
from superweight.scanner.scan import prompt_ids, scan_source
from tests.checkpoints import Plant, make_checkpoint, streaming


def resident_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")


@pytest.fixture
def streamed(tmp_path, monkeypatch):
    """Scan a planted llama while recording every layer load and the resident weights after it."""
    make_checkpoint(tmp_path, "llama", [Plant(5, 10, 20)])
    model = streaming(tmp_path)
    loads, resident = [], []
    real_load = model.load_layer

    def load_layer(index):
        real_load(index)
        loads.append(index)
        resident.append(resident_bytes(model.model))

    monkeypatch.setattr(model, "load_layer", load_layer)
    ids, _ = prompt_ids(DetectConfig().prompt, model.config)
    detection = Detector(model, DetectConfig()).run(model.load_static(ids))
    return model, detection, loads, resident, ids


def test_at_most_one_decoder_layer_is_resident(streamed):
    model, detection, loads, resident, ids = streamed
    layer_bytes = sum(p.numel() * p.element_size() for p in model.layers[0].parameters())
    embed_rows = len(set(ids)) * model.hidden_size * 4
    static = 2 * layer_bytes // 100  # the final norm: tiny next to a layer
    assert max(resident) <= layer_bytes + embed_rows + static
    assert resident_bytes(model.model) < layer_bytes  # and the last layer was freed too


def test_lm_head_and_full_embedding_are_never_loaded(streamed):
    model, *_, ids = streamed
    assert model.model.lm_head.weight.device.type == "meta"
    assert model.model.get_input_embeddings().weight.shape[0] == len(set(ids))


def test_replay_starts_at_the_layer_that_changed(streamed):
    _, detection, loads, *_ = streamed
    assert [(w.layer, w.out_channel, w.in_channel) for w in detection.super_weights] == [(5, 10, 20)]
    assert loads == list(range(8)) + [5, 6, 7]  # first pass, then layers 5.. once after the removal


def test_checkpoint_files_are_unmapped_after_a_scan(tmp_path):
    """safetensors handles are closed after each layer, so file pages do not pile up in RSS."""
    make_checkpoint(tmp_path, "llama", [Plant(3, 10, 20)])
    scan_source(str(tmp_path))
    maps = Path("/proc/self/maps").read_text()
    assert str(tmp_path / "model.safetensors") not in maps


def test_removed_weights_are_restored_after_detection(streamed):
    model, *_ = streamed
    model.load_layer(5)  # outside `zeroed`: as stored
    assert model.out_proj_weight(5)[10, 20].item() == pytest.approx(2.5)


def test_bytes_read_counts_the_layers_read_and_replayed(streamed):
    model, detection, loads, *_ = streamed
    layer_bytes = sum(p.numel() * p.element_size() for p in model.layers[0].parameters())
    static = model.bytes_read - len(loads) * layer_bytes  # the final norm and the prompt's embedding rows
    assert 0 < static < layer_bytes // 10


def test_a_local_span_is_mapped_copy_on_write_and_unmapped_when_dropped(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 64)  # 16 KiB
    file = LocalFile(path, Transfer())
    try:
        view = file.read(5000, 100)
        assert bytes(view) == path.read_bytes()[5000:5100]
        view[0] = 255 - view[0]  # the loader may change a weight in place: never in the file
        assert path.read_bytes()[5000] == 5000 % 256
        assert str(path) in Path("/proc/self/maps").read_text()
        del view
        gc.collect()
        assert str(path) not in Path("/proc/self/maps").read_text()
    finally:
        file.close()


def test_a_file_cut_short_after_opening_is_an_error_not_a_crash(tmp_path):
    """A mapped page past the end of a file is SIGBUS when touched; the read faults pages in first."""
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\1" * (1 << 20))
    file = LocalFile(path, Transfer())
    try:
        os.truncate(path, 1 << 16)
        with pytest.raises(CorruptCheckpoint, match="the file is truncated"):
            file.read(1 << 19, 1 << 18)
    finally:
        file.close()
