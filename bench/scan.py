"""Benchmark the streaming scan against a full-load detector and a read-every-tensor floor.

Usage: python bench/scan.py [--out-dir DIR] [--keep] [--repeats N] [--diagnose]

bench/README.md says what the modes run and what the ratios mean. In short: one run generates a
Llama-3.2-1B-shaped checkpoint with one planted super weight (in a child process; unless --out-dir
holds one), warms the page cache, then measures `scan` (the real CLI, --no-record), `record` (the
CLI recording, its content hash computed cold), `full` (from_pretrained, hooks, one forward pass)
and `floor` (every tensor read once), interleaved, each in a fresh process. It prints the median
wall time and max peak RSS per mode and the ratios against the targets (peak RSS scan/full <= 0.3,
wall scan/floor <= 1.5, wall record/floor <= 1.3); exits 1 only when a mode fails or
finds the wrong coordinate. --diagnose also times the scan's phases in one more child.

Method. Each child is started with subprocess.Popen and reaped with os.wait4(pid), whose rusage is
that child's alone (ru_maxrss: its peak RSS, mmap pages included, page cache not). Wall time runs
from just before the spawn to the reap, imports included for all modes. Linux carries a process's
RSS high-water mark over fork and execve, so this process never imports torch and stays near
100 MB, far below every mode.
"""

import argparse
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger("bench.scan")

REPO_ROOT = Path(__file__).resolve().parent.parent
PLANT_FILE = "bench-plant.json"  # sidecar naming the planted coordinate; the scan ignores it
MODES = ("scan", "record", "full", "floor")
RSS_TARGET = 0.3  # peak RSS scan / full
WALL_TARGET = 1.5  # wall scan / floor
RECORD_TARGET = 1.3  # wall record / floor

# Llama-3.2-1B's shape, with the LM head untied so that it exists (0.26 B parameters) and the scan
# has a large tensor it must not read.
LLAMA_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
    rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False,
)
PLANT = dict(layer=1, row=1384, col=2427, value=2.5)  # Meta-Llama-3-8B's published coordinate, scaled down


@dataclass(frozen=True)
class Coordinate:
    """A super weight: W[row, col] of decoder layer `layer`'s MLP down projection."""

    layer: int
    row: int
    col: int


@dataclass(frozen=True)
class Sample:
    """One measured process."""

    mode: str
    wall_s: float
    cpu_s: float  # user + system time of the child: less sensitive than wall to other load
    peak_rss_bytes: int
    found: list[Coordinate]


# -- generation ---------------------------------------------------------------------------------

def generate(path: Path) -> Coordinate:
    """Write the seeded 1.5 B-parameter checkpoint with a planted super weight to `path`."""
    sys.path.insert(0, str(REPO_ROOT))
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.checkpoints import Plant, plant

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_1B), dtype=torch.bfloat16).eval()
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("built %.2f B parameters in %.1f s", n_params / 1e9, time.perf_counter() - start)
    plant(model, [Plant(**PLANT)])
    logger.info("planted %s at %.1f s", PLANT, time.perf_counter() - start)
    model.save_pretrained(path, max_shard_size="1GB")  # the default (50GB) would write one file
    coordinate = Coordinate(PLANT["layer"], PLANT["row"], PLANT["col"])
    (path / PLANT_FILE).write_text(json.dumps(asdict(coordinate)))
    logger.info("saved to %s at %.1f s", path, time.perf_counter() - start)
    return coordinate


def generate_in_child(path: Path) -> Coordinate:
    """Run generate() in its own process, keeping this one small (see the module docstring)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--generate", str(path)], cwd=REPO_ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"generating the checkpoint in {path} failed (exit {done.returncode})")
    logger.info("generation took %.1f s (not compared)", time.perf_counter() - start)
    planted = existing_checkpoint(path)
    if planted is None:
        raise RuntimeError(f"generation wrote no {PLANT_FILE} in {path}")
    return planted


def existing_checkpoint(path: Path) -> Coordinate | None:
    """The planted coordinate of a checkpoint an earlier run left in `path`, or None."""
    marker = path / PLANT_FILE
    if not (marker.is_file() and (path / "config.json").is_file()):
        return None
    return Coordinate(**json.loads(marker.read_text()))


def warm_page_cache(path: Path) -> None:
    """Read every file of the checkpoint once so that no mode pays for the disk."""
    total = 0
    for file in sorted(path.iterdir()):
        with open(file, "rb") as f:
            while chunk := f.read(64 << 20):
                total += len(chunk)
    logger.info("warmed the page cache with %.2f GB", total / 1e9)


# -- measured children --------------------------------------------------------------------------

def run_full(checkpoint: Path) -> list[Coordinate]:
    """The naive detector: load the whole model, hook every down_proj, one forward pass."""
    start = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM

    from superweight.scanner.config import DEFAULT_PROMPT
    from superweight.scanner.scan import prompt_ids

    imported = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    loaded = time.perf_counter()
    peaks = []  # per layer: (max |output|, row, max |input| channel)

    def hook(module, args, output):
        x = args[0].float().abs().reshape(-1, args[0].shape[-1])  # (T, I)
        y = output.float().abs().reshape(-1, output.shape[-1])  # (T, H)
        peaks.append((float(y.max()), int(y.max(dim=0).values.argmax()), int(x.max(dim=0).values.argmax())))

    for layer in model.model.layers:
        layer.mlp.down_proj.register_forward_hook(hook)
    ids, _ = prompt_ids(DEFAULT_PROMPT, model.config)  # the scan's own ids (no tokenizer here: one id per word after BOS)
    with torch.no_grad():
        model(torch.tensor([ids]), use_cache=False)
    layer = max(range(len(peaks)), key=lambda i: peaks[i][0])
    logger.info("full: import %.2f s, from_pretrained %.2f s, forward %.2f s",
                imported - start, loaded - imported, time.perf_counter() - loaded)
    return [Coordinate(layer, peaks[layer][1], peaks[layer][2])]


def run_floor(checkpoint: Path) -> list[Coordinate]:
    """Import what the scan imports, then read every tensor once."""
    start = time.perf_counter()
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from safetensors import safe_open
    from transformers import LlamaForCausalLM  # noqa: F401

    imported = time.perf_counter()
    count = 0
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                tensor = f.get_tensor(name).clone()  # get_tensor alone maps the bytes, it reads none
                del tensor
                count += 1
    logger.info("floor: import %.2f s, read %d tensors %.2f s", imported - start, count,
                time.perf_counter() - imported)
    return []


def run_phases(checkpoint: Path) -> dict:
    """The scan in-process, each phase timed and memory read after every freed layer (--diagnose)."""
    start = time.perf_counter()
    import superweight.scanner.checkpoint as checkpoints
    import superweight.scanner.detect as detect
    import superweight.scanner.loader as loader
    import superweight.scanner.scan as scan
    from torch import nn

    times = {"import": time.perf_counter() - start}
    _time_method(loader.StreamingModel, "__init__", "skeleton+headers", times)
    _time_method(detect.Detector, "first_pass", "first_pass", times)
    _time_method(detect.Detector, "replay", "replay", times)
    _time_method(checkpoints.Checkpoint, "revision", "content hash (background thread)", times)
    _time_method(nn.Linear, "forward", "nn.Linear total", times)  # inside first_pass and replay
    memory = []
    free_layer = loader.StreamingModel.free_layer

    def logged_free(self, index: int) -> None:
        free_layer(self, index)
        memory.append({"layer": index, **_proc_status()})

    loader.StreamingModel.free_layer = logged_free
    begin = time.perf_counter()
    result = scan.scan_source(str(checkpoint))
    times["scan_source"] = time.perf_counter() - begin
    return {"tokens": len(result["tokens"]), "rounds": result["rounds"],
            "seconds": {k: round(v, 2) for k, v in times.items()}, "memory_mb": memory}


def _time_method(owner: object, name: str, label: str, times: dict[str, float]) -> None:
    """Replace owner.name by a wrapper that adds its wall time to times[label]."""
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            times[label] = times.get(label, 0.0) + time.perf_counter() - begin

    setattr(owner, name, timed)


def _proc_status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and VmHWM of this process, in MB."""
    fields = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) // 1024 for k, _, v in (line.partition(":") for line in f) if k in fields}


def measure_child(mode: str, checkpoint: Path) -> None:
    """Body of a measured child: do the work, print what it found as JSON on stdout."""
    if mode == "phases":
        print(json.dumps(run_phases(checkpoint)))
        return
    found = run_full(checkpoint) if mode == "full" else run_floor(checkpoint)
    print(json.dumps([asdict(c) for c in found]))


# -- the parent ---------------------------------------------------------------------------------


def command(mode: str, checkpoint: Path) -> list[str]:
    if mode in ("scan", "record"):
        cli = Path(sys.executable).parent / "superweight"
        base = [str(cli)] if cli.is_file() else [sys.executable, "-m", "superweight.cli"]
        # record: as users run it, into the run's fresh SUPERWEIGHT_HOME (content hash computed cold).
        return [*base, "scan", str(checkpoint), "--json", *(["--no-record"] if mode == "scan" else [])]
    return [sys.executable, str(Path(__file__).resolve()), "--measure", mode, "--checkpoint", str(checkpoint)]


def measure(mode: str, checkpoint: Path, workdir: Path) -> Sample:
    """Run one mode in a fresh process; wall time from spawn to reap, peak RSS from wait4."""
    out, err = workdir / f"{mode}.out", workdir / f"{mode}.err"
    # A fresh, empty SUPERWEIGHT_HOME for every run: the scan's per-file digest cache would otherwise
    # spare later runs the hashing of the whole checkpoint, which a first scan pays.
    home = Path(tempfile.mkdtemp(prefix="home-", dir=workdir))
    env = {**os.environ, "SUPERWEIGHT_HOME": str(home)}
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        start = time.perf_counter()
        proc = subprocess.Popen(command(mode, checkpoint), stdout=stdout, stderr=stderr, cwd=REPO_ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    for line in err.read_text().splitlines():
        logger.debug("%s: %s", mode, line)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} exited {proc.returncode}: {err.read_text().strip()[-2000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    return Sample(mode, wall, cpu, usage.ru_maxrss * 1024, parse_found(mode, out.read_text()))


def diagnose(checkpoint: Path) -> str:
    """Run the phase-timed scan once in a fresh process and format what it saw."""
    home = tempfile.mkdtemp(prefix="superweight-home-")  # cold digest cache, as in the measured runs
    done = subprocess.run(command("phases", checkpoint), cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, "SUPERWEIGHT_HOME": home})
    shutil.rmtree(home, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"the diagnostic scan failed: {done.stderr.strip()[-2000:]}")
    phases = json.loads(done.stdout)
    lines = [f"diagnostic scan: {phases['tokens']} prompt tokens, {phases['rounds']} rounds",
             "  seconds: " + ", ".join(f"{k} {v}" for k, v in phases["seconds"].items()),
             "  MB after each freed layer (layer: RSS anon+file, high-water):"]
    for m in phases["memory_mb"]:
        lines.append(f"    {m['layer']:>3}: {m['VmRSS']:>5} = {m['RssAnon']:>5} + {m['RssFile']:>5}, HWM {m['VmHWM']}")
    return "\n".join(lines)


def parse_found(mode: str, stdout: str) -> list[Coordinate]:
    """The coordinates a mode reported on stdout."""
    if mode not in ("scan", "record"):
        return [Coordinate(**c) for c in json.loads(stdout)]
    result = json.loads(stdout.strip().splitlines()[-1])
    if result.get("status") != "ok":
        raise RuntimeError(f"scan failed: {result.get('error')}")
    return [Coordinate(w["layer"], w["out_channel"], w["in_channel"]) for w in result["super_weights"]]


def report(samples: list[Sample]) -> str:
    """The table of median wall time and max peak RSS per mode, then the ratios and verdicts."""
    wall = {m: statistics.median(s.wall_s for s in samples if s.mode == m) for m in MODES}
    rss = {m: max(s.peak_rss_bytes for s in samples if s.mode == m) for m in MODES}
    cpu = {m: statistics.median(s.cpu_s for s in samples if s.mode == m) for m in MODES}
    lines = [f"{'mode':<6} {'runs (wall s)':<24} {'median wall s':>13} {'median cpu s':>12} {'max peak RSS GB':>16}"]
    for m in MODES:
        runs = " ".join(f"{s.wall_s:.2f}" for s in samples if s.mode == m)
        lines.append(f"{m:<6} {runs:<24} {wall[m]:>13.2f} {cpu[m]:>12.2f} {rss[m] / 1e9:>16.3f}")
    lines.append("")
    for name, value, target in [("peak RSS scan / full", rss["scan"] / rss["full"], RSS_TARGET),
                                ("wall scan / floor", wall["scan"] / wall["floor"], WALL_TARGET),
                                ("wall record / floor", wall["record"] / wall["floor"], RECORD_TARGET),
                                ("wall scan / full", wall["scan"] / wall["full"], None),
                                ("cpu scan / floor", cpu["scan"] / cpu["floor"], None)]:
        verdict = "" if target is None else f"  target <= {target}: {'PASS' if value <= target else 'MISS'}"
        lines.append(f"{name:<22} {value:6.3f}{verdict}")
    return "\n".join(lines)


def benchmark(checkpoint: Path, planted: Coordinate, repeats: int) -> list[Sample]:
    """Run every mode `repeats` times, interleaved, checking each answer."""
    samples = []
    with tempfile.TemporaryDirectory(prefix="superweight-bench-logs-") as workdir:
        for round_ in range(repeats):
            for mode in MODES:
                sample = measure(mode, checkpoint, Path(workdir))
                if sample.mode != "floor" and planted not in sample.found:
                    raise RuntimeError(f"{sample.mode} found {sample.found}, not the planted {planted}")
                logger.info("round %d %-5s wall %6.2f s  cpu %6.2f s  %.3f GB  load %.2f  found %s",
                            round_ + 1, mode, sample.wall_s, sample.cpu_s, sample.peak_rss_bytes / 1e9,
                            os.getloadavg()[0], [tuple(asdict(c).values()) for c in sample.found])
                samples.append(sample)
    return samples


def prepare_checkpoint(path: Path) -> Coordinate:
    """Reuse or generate the checkpoint in `path`, then warm the page cache; returns the plant."""
    path.mkdir(parents=True, exist_ok=True)
    planted = existing_checkpoint(path)
    if planted is not None:
        logger.info("reusing the checkpoint in %s (planted %s)", path, planted)
    planted = planted or generate_in_child(path)
    files = sorted(path.glob("*.safetensors"))
    logger.info("%d shards, %.2f GB", len(files), sum(f.stat().st_size for f in files) / 1e9)
    warm_page_cache(path)
    return planted


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, help="checkpoint folder to reuse or create; never deleted")
    parser.add_argument("--keep", action="store_true", help="keep the temporary checkpoint (default: deleted)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode (default 3)")
    parser.add_argument("--diagnose", action="store_true", help="also time the scan's phases in-process")
    parser.add_argument("-v", "--verbose", action="store_true", help="also log the children's stderr")
    parser.add_argument("--measure", choices=("full", "floor", "phases"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--generate", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.measure:
        measure_child(args.measure, args.checkpoint)
        return 0
    if args.generate:
        generate(args.generate)
        return 0
    path = args.out_dir or Path(tempfile.mkdtemp(prefix="superweight-bench-", dir="/tmp"))
    remove = args.out_dir is None and not args.keep  # a folder the user named is always kept
    try:
        planted = prepare_checkpoint(path)
        samples = benchmark(path, planted, args.repeats)
        diagnosis = diagnose(path) if args.diagnose else None
    except (RuntimeError, ValueError) as e:  # ValueError: a child printed no valid JSON
        logger.error("%s", e)
        return 1
    finally:
        if remove:
            shutil.rmtree(path, ignore_errors=True)
        elif args.keep or args.out_dir:
            logger.info("checkpoint kept in %s", path)
    own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    logger.info("this process's own peak RSS: %.3f GB (a floor under every child's)", own_peak / 1e9)
    print(report(samples))
    if diagnosis:
        print("\n" + diagnosis)
    return 0


if __name__ == "__main__":
    sys.exit(main())
