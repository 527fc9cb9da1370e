"""Benchmark how detection's passes grow with the number of super weights: rounds and bytes read.

Usage: python bench/rounds.py [--out-dir DIR] [--keep] [--cli CMD] [--no-smollm2]

Detection reads every decoder layer once, then re-reads the layers from the earliest super weight
on for each further pass. A pass that removes one weight at a time costs one pass per weight; one
that removes every qualifying weight of a pass at once costs one pass per level of masking. This
script measures that, in one run:

1. It generates (unless --out-dir already holds it) a Qwen2-1.5B-shaped checkpoint (hidden 1536,
   intermediate 8960, 28 layers, 151,936-token tied vocabulary, bfloat16, 3.1 GB) with the
   pattern seen on a real 1.5B Qwen2-family model: in layer 1 one intermediate channel writes five
   residual rows; in layer 2 three channels write the same five rows (one writes all five, one the
   first three, one the last two), so each row there is shared by two weights. 15 super weights.
   The same model is also written as a Q8_0 GGUF file (1.6 GB), dequantized layer by layer when
   scanned, like the real model's Q4_K_M file.
2. It scans both with `CMD scan SOURCE --json --no-record` (default: this checkout's
   `superweight`; to compare with another checkout, run this script from that checkout's folder
   with `--cli "python -m superweight.cli"`), and the real SmolLM2 (`example:smollm2`), each in a
   fresh process, with the files in the page cache.
3. It prints, per model: the super weights found and whether they are exactly the planted ones,
   the rounds (passes over the layers), the tensor bytes read against the bytes of the decoder
   layers read once (target <= 3.5), and the wall time. Exits 1 when a planted weight is missed.

The checkpoint has no tokenizer: the prompt is read one hashed id per word, as for any folder
without one. Generation takes about 2 minutes on 2 cores and is not timed.
"""

import argparse
import json
import logging
import math
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("bench.rounds")

REPO_ROOT = Path(__file__).resolve().parent.parent
PLANT_FILE = "bench-plants.json"  # sidecar listing the planted coordinates; the scan ignores it
BYTES_TARGET = 3.5  # tensor bytes read / bytes of the decoder layers read once

QWEN2_15B = dict(
    hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
    num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True,
    rope_theta=1000000.0, bos_token_id=151643, eos_token_id=151643,
)
ROWS = (71, 243, 911, 1024, 1377)  # the five residual rows
GGUF_FILE = "model-Q8_0.gguf"  # the same model as llama.cpp would store it, in gguf/


def plants() -> list[dict]:
    """Layer 1: channel 4000 writes all five rows. Layer 2: channel 7000 writes all five, 7001 the
    first three and 7002 the last two, aimed at the second token so that they do not depend on
    layer 1's super activation (the weight-at-a-time detection also finds them, one per pass)."""
    layer1 = [dict(layer=1, row=r, col=4000) for r in ROWS]
    layer2 = [dict(layer=2, row=r, col=7000, token=1) for r in ROWS]
    layer2 += [dict(layer=2, row=r, col=7001, token=1) for r in ROWS[:3]]
    layer2 += [dict(layer=2, row=r, col=7002, token=1) for r in ROWS[3:]]
    return layer1 + layer2


def generate(path: Path) -> None:
    """Write the seeded checkpoint with the planted weights to `path` (runs in a child process)."""
    sys.path.insert(0, str(REPO_ROOT))
    import torch
    import transformers
    from gguf import GGMLQuantizationType

    from tests.checkpoints import Plant, build_model, gguf_tensors, plant, write_gguf

    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    model = build_model("qwen2", dtype=torch.bfloat16, **QWEN2_15B)  # seeded
    plant(model, [Plant(**p) for p in plants()])
    model.save_pretrained(path, max_shard_size="1GB")
    logger.info("saved the safetensors at %.1f s", time.perf_counter() - start)
    (path / "gguf").mkdir()
    write_gguf(path / "gguf" / GGUF_FILE, model.config, gguf_tensors(model), qtype=GGMLQuantizationType.Q8_0)
    (path / PLANT_FILE).write_text(json.dumps(plants()))
    logger.info("generated %s in %.1f s", path, time.perf_counter() - start)


def layer_bytes(path: Path) -> int:
    """Bytes of the decoder layers' tensors, from the safetensors headers."""
    from safetensors import safe_open

    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="np") as f:
            for name in f.keys():
                if ".layers." in name:
                    info = f.get_slice(name)
                    size = {"BF16": 2, "F16": 2, "F32": 4}[info.get_dtype()]
                    total += size * math.prod(info.get_shape())
    return total


def gguf_layer_bytes(path: Path) -> int:
    """Bytes of the decoder layers' tensors (blk.N.*) as stored in a GGUF file."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors if t.name.startswith("blk."))


def scan(cli: list[str], source: str) -> tuple[dict, float]:
    """One scan in a fresh process: its JSON result and the wall time."""
    start = time.perf_counter()
    done = subprocess.run([*cli, "scan", source, "--json", "--no-record"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"scan of {source} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout), wall


def report(name: str, result: dict, wall: float, layers_once: int, planted: set | None) -> bool:
    found = {(w["layer"], w["out_channel"], w["in_channel"]) for w in result["super_weights"]}
    exact = planted is None or found == planted
    ratio = result["bytes_read"] / layers_once
    print(f"{name}: {len(found)} super weights{'' if planted is None else (' (exactly the planted ones)' if exact else ' (NOT the planted ones)')}, "
          f"{result['rounds']} rounds, bytes read {result['bytes_read'] / 1e9:.2f} GB = {ratio:.2f}x the layers "
          f"read once ({'PASS' if ratio <= BYTES_TARGET else 'MISS'} <= {BYTES_TARGET}), wall {wall:.1f} s")
    return exact


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, help="generate into (or reuse) this folder, kept afterwards")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint in /tmp")
    parser.add_argument("--cli", default=str(Path(sys.executable).with_name("superweight")),
                        help="the command that runs superweight (default: this environment's)")
    parser.add_argument("--no-smollm2", action="store_true", help="skip the real SmolLM2")
    parser.add_argument("--generate", type=Path, help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    if args.generate:
        generate(args.generate)
        return 0
    path = args.out_dir or Path(tempfile.mkdtemp(prefix="bench-rounds-"))
    try:
        if not (path / PLANT_FILE).is_file():
            subprocess.run([sys.executable, __file__, "--generate", str(path)], check=True, cwd=REPO_ROOT)
        planted = {(p["layer"], p["row"], p["col"]) for p in json.loads((path / PLANT_FILE).read_text())}
        for file in sorted(path.rglob("*")):  # warm the page cache: the bytes come from memory for every run
            if file.is_file():
                with open(file, "rb") as f:
                    while f.read(64 << 20):
                        pass
        cli = shlex.split(args.cli)
        layers_once = layer_bytes(path)
        ok = report("qwen2-1.5B-shaped, 15 super weights, bf16 safetensors", *scan(cli, str(path)), layers_once, planted)
        gguf = path / "gguf" / GGUF_FILE
        ok &= report(f"the same, Q8_0 GGUF ({gguf.stat().st_size / 1e9:.1f} GB)", *scan(cli, str(gguf)),
                     gguf_layer_bytes(gguf), planted)
        if not args.no_smollm2:
            result, wall = scan(cli, "example:smollm2")
            report("SmolLM2-135M (example:smollm2)", result, wall, layer_bytes(Path(result["path"])), None)
        return 0 if ok else 1
    finally:
        if not (args.out_dir or args.keep):
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
