"""Files on disk: writing aside and renaming into place, cleaning up what a failure leaves, and
reading only regular files that lie inside the folder they belong to; and which of a checkpoint's
files hold weights a scan reads (safetensors, or one GGUF file; never pickles)."""

import json
import os
import re
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .config import PICKLE_SUFFIXES
from .errors import CorruptCheckpoint, Refused, ScanError, SourceNotFound, UnsafeCheckpoint

GGUF_SUFFIX = ".gguf"


@contextmanager
def written_aside(dest: Path) -> Iterator[Path]:
    """A temporary path beside `dest` to write; renamed over `dest` when the block succeeds.

    Readers see the old `dest` or the new one, never half of one. When the block fails, or the
    rename does, the temporary file or folder is deleted; one left by a process that was killed is
    deleted by the next writer of `dest` (`remove_stale`).
    """
    dest = Path(dest)
    remove_stale(dest)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if tmp.is_dir() and dest.is_dir():
            shutil.rmtree(dest)
        tmp.replace(dest)
    except BaseException:
        _remove(tmp)
        raise


def remove_stale(dest: Path) -> None:
    """Delete what `written_aside` left beside `dest` in processes that no longer run."""
    for tmp in Path(dest).parent.glob(f".{Path(dest).name}.*.tmp"):
        pid = tmp.name.removeprefix(f".{Path(dest).name}.").removesuffix(".tmp")
        if pid.isdigit() and int(pid) != os.getpid() and not alive(int(pid)):
            _remove(tmp)


def inside(path: Path, root: Path, *, what: str = "file") -> Path:
    """`path` if it is a regular file that resolves inside `root`, else UnsafeCheckpoint.

    A checkpoint is untrusted: a link or a shard index may point anywhere on the machine, and a
    FIFO or a device would block a read forever.
    """
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if not resolved.is_relative_to(base):
        raise UnsafeCheckpoint(f"the {what} lies outside {root} (it resolves to {resolved}); "
                               "only files inside the checkpoint are read", where=path)
    try:
        mode = resolved.stat().st_mode
    except OSError as e:
        raise UnsafeCheckpoint(f"cannot read the {what} ({e.strerror})", where=path) from None
    if not stat.S_ISREG(mode):
        raise UnsafeCheckpoint(f"the {what} is not a regular file; only regular files are read", where=path)
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def alive(pid: int) -> bool:
    """Whether process `pid` runs (on this host)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def no_weights(names: list[str], where) -> ScanError:
    """Why a checkpoint whose files are `names` has nothing superweight reads: pickles are refused."""
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        return UnsafeCheckpoint(f"only pickle weights ({', '.join(pickles[:3])}); superweight never unpickles: "
                                "it reads safetensors and GGUF. Convert the checkpoint to safetensors first",
                                where=where)
    return CorruptCheckpoint("no .safetensors or .gguf weights found", where=where)


def require_weights(names: list[str], where) -> None:
    """Raise `no_weights` unless a Hub repo whose files are `names` holds safetensors or GGUF weights."""
    if not any(n.endswith((".safetensors", GGUF_SUFFIX)) for n in names):
        raise no_weights(names, where)


_SPLIT_GGUF = re.compile(r"-\d{5}-of-\d{5}\.gguf$")  # llama.cpp's gguf-split parts: model-00001-of-00003.gguf


def gguf_only(names: list[str]) -> bool:
    """Whether a folder whose files are `names` is read as GGUF: it holds GGUF files and no safetensors."""
    return any(n.endswith(GGUF_SUFFIX) for n in names) and not any(n.endswith(".safetensors") for n in names)


def pick_gguf(names: list[str], wanted: str | None, where) -> str:
    """The GGUF file a scan reads, of a repo or folder whose files are `names`.

    Args:
        wanted: a file name, or a quantization type (`Q4_K_M`, any case) that names exactly one file;
            None: the one GGUF file there is.

    Raises:
        SourceNotFound: no such file, or several GGUF files and none chosen.
        Refused: the file is one part of a split GGUF.
    """
    ggufs = sorted(n for n in names if n.endswith(GGUF_SUFFIX))
    if wanted is not None and wanted not in ggufs:  # a quantization, between non-alphanumerics: not Q4_K in Q4_K_M
        quant = re.compile(rf"(?<![A-Za-z0-9]){re.escape(wanted)}(?![A-Za-z0-9_])", re.IGNORECASE)
        found = [n for n in ggufs if quant.search(n.removesuffix(GGUF_SUFFIX))]
    else:
        found = [wanted] if wanted is not None else ggufs
    few = ", ".join(found[:3] or ggufs[:3]) + (", ..." if len(found or ggufs) > 3 else "")
    if not found:
        raise SourceNotFound(f"no GGUF file named {wanted!r} or quantized so" + (f"; it holds {few}" if ggufs else ""),
                             where=where)
    if len(found) > 1:
        what = f"{wanted!r} matches {len(found)}" if wanted is not None else str(len(found))
        raise SourceNotFound(f"{what} GGUF files ({few}); pass --file with one file name or quantization (Q8_0)",
                             where=where)
    if _SPLIT_GGUF.search(found[0]):
        raise Refused(f"{found[0]} is one part of a split GGUF; superweight reads a GGUF held in one file", where=where)
    return found[0]


def gguf_tensor_name(layer: int, expert: int | None, tensor: str | None = None) -> str:
    """The GGUF tensor of a layer's MLP down projection (llama.cpp names every one `ffn_down`, fused experts
    `ffn_down_exps`); `tensor` when it is a GGUF name already."""
    if tensor and tensor.startswith("blk."):
        return tensor
    return f"blk.{layer}.ffn_down{'_exps' if expert is not None else ''}.weight"


def find_weight_files(path: Path, *, root: Path | None = None) -> list[Path]:
    """The safetensors files that hold the model, refusing pickle-only checkpoints.

    Every file must be a regular file inside `root` (default `path`): a shard index or a link
    pointing elsewhere on the machine, or a FIFO, is refused.
    """
    root = root or path
    index = path / "model.safetensors.index.json"
    if index.exists() or index.is_symlink():
        inside(index, root, what="shard index")
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError, UnicodeDecodeError) as e:
            raise CorruptCheckpoint(f"not a valid shard index ({e})", where=index) from e
        missing = [n for n in names if not isinstance(n, str) or not (path / n).exists()]
        if missing:
            raise CorruptCheckpoint(f"names shard(s) that are missing: {', '.join(map(str, missing))}", where=index)
        return [inside(path / n, root, what="weight file") for n in names]
    if (path / "model.safetensors").exists() or (path / "model.safetensors").is_symlink():
        return [inside(path / "model.safetensors", root, what="weight file")]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return [inside(f, root, what="weight file") for f in files]
    raise no_weights([p.name for p in path.iterdir()], path)
