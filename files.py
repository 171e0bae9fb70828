"""Artefact files in one place: atomic writes, safetensors with JSON metadata, torch files without pickle.

Every weight, cache item and checkpoint speakerbox writes or reads goes through here, so these hold
everywhere:
  - a file appears complete or not at all: it is written to a temp file in the same directory (a
    rename cannot cross file systems), flushed to disk (fsync), then renamed over the target;
  - what others must read is mode 0644 (safetensors' save_file creates 0600 files, which a ComfyUI
    service running as another user cannot open);
  - a missing, truncated, text or foreign file gives one error naming the file, never a parser's
    traceback, and tensors holding NaN / Inf are refused by name, on reading and on writing;
  - torch files are read with weights_only=True: a pickle that would run code is refused, never run.

This is the lowest layer: it imports nothing of the project.
"""

import hashlib
import json
import os
import pickle
import struct

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FILE_MODE = 0o644
HEADER_LIMIT = 100 << 20  # safetensors refuses JSON headers over 100 MB itself
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # as configs and flags spell them


class BadFile(ValueError):
    """A file that is damaged, truncated, of another format, holds NaN / Inf or is a pickle we do
    not load; the message names the file. Callers let it through as it is (it says everything)."""


ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


# -----------------------------------------------------------------------------------------------
# atomic writes


def check_file(path, flag=""):
    """FileNotFoundError naming `path` (and the `flag` it came from) unless it is a file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag + ' ' if flag else ''}{os.fspath(path)}: file not found")


def temp_path(path):
    """The temp file a write of `path` goes through: beside it, tagged with the writer's pid."""
    return f"{os.fspath(path)}.tmp.{os.getpid()}"


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write, mode=FILE_MODE, durable=True):
    """Call `write(tmp)` to fill a temp file beside `path`, give it `mode` and rename it over
    `path`. The temp file is removed if anything fails; returns `path`.

    durable: fsync the file before the rename and the directory after it, so the new file survives
    a power loss, not only a crash of the process (~14 ms a file here, 20x a plain write: `False`
    for many small files that are checked and re-made when damaged, like cache items)."""
    path = os.fspath(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        if durable:
            _fsync(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if durable:
        try:  # the rename itself is durable only once the directory is
            _fsync(os.path.dirname(os.path.abspath(path)))
        except OSError:  # some file systems cannot fsync a directory
            pass
    return path


def write_text(path, text):
    """`text` (UTF-8) to `path`, atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return atomic_write(path, write)


def torch_save(obj, path):
    """torch.save(obj) to `path`, atomically. Keep `obj` to tensors, numbers, strings and plain
    containers so that `torch_load` (weights_only) can read it back."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


# -----------------------------------------------------------------------------------------------
# torch files: never unpickle code


def torch_load(path, mmap=False):
    """torch.load with weights_only=True: tensors, numbers, strings and plain containers only.

    A pickle that needs any other object (a class, a function: possibly code that runs on
    loading) is refused, as is a truncated or damaged file, with a BadFile naming the file.
    """
    path = os.fspath(path)
    check_file(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] != b"PK" and magic[:1] != b"\x80":  # torch.save's zip archive, or a legacy pickle
        raise BadFile(f"{path}: not a torch file (neither torch.save's zip archive nor a pickle; "
                      f"it starts with {magic!r})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        detail = str(e).strip().splitlines()
        needs = next((line.strip() for line in detail if "GLOBAL" in line or "Unsupported" in line), "")
        raise BadFile(f"{path} is a pickle with code/objects we do not load ({needs or 'not plain tensors'}); "
                      "only tensors, numbers, strings and lists/dicts of them are read, never code "
                      "(use the safetensors files speakerbox writes)") from None
    except (RuntimeError, EOFError, OSError, ValueError, struct.error) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadFile(f"{path}: not a readable torch file, truncated or damaged ({reason})") from None


# -----------------------------------------------------------------------------------------------
# safetensors


def read_header(path):
    """(tensor table, metadata, byte offset of the data) of a safetensors file, checked against the
    file's size, so that text, other formats and truncated files get one clear BadFile naming
    the file (safetensors itself raises its own error types, or MemoryError on a bogus length)."""
    path = os.fspath(path)
    check_file(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise BadFile(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(HEADER_LIMIT, size - 8):
            if all(32 <= b < 127 or b in (9, 10, 13) for b in raw):
                raise BadFile(f"{path}: not a safetensors file (it starts with text: {raw.decode()!r})")
            raise BadFile(f"{path}: not a safetensors file, or truncated (its first 8 bytes announce a "
                          f"{n}-byte header, the file has {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadFile(f"{path}: not a safetensors file (the header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise BadFile(f"{path}: not a safetensors file (the header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    end = 0
    for key, info in header.items():
        try:
            begin, stop = info["data_offsets"]
            count = 1
            for s in info["shape"]:
                count *= int(s)
            want = count * ST_ITEMSIZE[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise BadFile(f"{path}: not a safetensors file (bad header entry for {key!r})") from None
        if stop - begin != want:
            raise BadFile(f"{path}: damaged header: tensor {key!r} holds {stop - begin} bytes, its shape needs {want}")
        end = max(end, stop)
    if 8 + n + end > size:
        raise BadFile(f"{path}: truncated: the header describes {8 + n + end} bytes, the file has {size}")
    if not all(isinstance(v, str) for v in meta.values()):
        raise BadFile(f"{path}: not a safetensors file (__metadata__ values must be strings)")
    return header, meta, 8 + n


def read_safetensors_metadata(path):
    """The `__metadata__` dict (str -> str) of a safetensors file, {} when it has none."""
    return dict(read_header(path)[1])


def read_json_metadata(path, key):
    """`__metadata__[key]` parsed as JSON, or None when the file has no such key."""
    meta = read_safetensors_metadata(path)
    if key not in meta:
        return None
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise BadFile(f"{path}: __metadata__[{key!r}] is not valid JSON ({e})") from None


def read_checkpoint_config(path):
    """The parsed JSON `__metadata__["config"]` of an LTX-2 checkpoint, with a clear error if absent."""
    config = read_json_metadata(path, "config")
    if config is None:
        meta = read_safetensors_metadata(path)
        raise ValueError(f"{path}: no __metadata__['config']; not an LTX-2 checkpoint (metadata keys: {sorted(meta)})")
    return config


def nonfinite(t):
    """True when the floating tensor `t` holds a NaN or Inf (integer tensors never do)."""
    if not t.is_floating_point():
        return False
    if t.element_size() == 1:  # fp8: isfinite has no kernel for it; its values fit in fp16
        t = t.to(torch.float16)
    return not bool(torch.isfinite(t).all())


def check_finite(tensors, path):
    """Raise a BadFile naming `path` and the first tensor (in key order) holding NaN / Inf."""
    bad = [k for k, t in tensors.items() if nonfinite(t)]
    if bad:
        raise BadFile(f"{path}: tensor {bad[0]!r} holds NaN or Inf values ({len(bad)} of {len(tensors)} "
                      "tensors do): a diverged or damaged file")


def load_safetensors(path, keep=None, *, device="cpu", dtype=None, finite=True):
    """{key: tensor} of a safetensors file, read one tensor at a time (safetensors memory-maps the
    file, so only the kept tensors are read). keep: predicate on the key; dtype: cast floating
    tensors to it. Unreadable files and (finite) tensors with NaN / Inf raise a BadFile naming
    the file and the key."""
    path = os.fspath(path)
    read_header(path)
    out = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                if keep is not None and not keep(key):
                    continue
                t = f.get_tensor(key)
                if finite and nonfinite(t):
                    check_finite({key: t}, path)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                out[key] = t.to(device)
    except (OSError, SafetensorError) as e:
        raise BadFile(f"{path}: cannot read tensors ({e})") from None
    return out


def load_prefixed_state(path, prefix, keep=None, device="cpu", dtype=None):
    """Tensors whose key starts with `prefix`, returned with the prefix removed (see load_safetensors).
    keep: optional predicate on the stripped name."""
    n = len(prefix)
    state = load_safetensors(path, lambda k: k.startswith(prefix) and (keep is None or keep(k[n:])),
                             device=device, dtype=dtype)
    return {k[n:]: v for k, v in state.items()}


def save_safetensors(tensors, path, metadata=None, durable=True):
    """Write `tensors` (key -> tensor) to `path` atomically, mode 0644 (`durable`: see atomic_write).
    metadata: values that are not strings are stored as JSON. A tensor with NaN / Inf is refused (BadFile naming it): no
    diverged weights are ever written."""
    path = os.fspath(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    check_finite(tensors, path)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), durable=durable)


def file_digest(path, nbytes=1 << 20):
    """A short content id of a (possibly huge) file: sha256 of its size, its first and its last MiB.
    Names a checkpoint in metadata without giving away where it lives on this machine."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(nbytes))
        if size > nbytes:
            f.seek(max(nbytes, size - nbytes))
            h.update(f.read(nbytes))
    return h.hexdigest()[:16]
