"""Fold a LoRA into an LTX-2 checkpoint: a drop-in replacement file, official names and metadata kept.

    python merge.py --ckpt ltx-2.3-22b-dev.safetensors --lora runs/run7/lora.safetensors \
        --out merged_dit.safetensors [--dtype bf16] [--strength 1.0]

Each adapted weight becomes `W + B @ A` (computed in fp32, then cast; the factors of the file —
alpha/r when it has `.alpha` keys, and --strength — applied as `lora.read_lora_file` does). Every
other tensor of the base file (video stream, VAE, vocoder, text projection, ...) is copied through
byte for byte, so the result loads wherever the base file does. --dtype sets the dtype of the
transformer's floating tensors (`model.diffusion_model.*`); `keep` leaves them as they are.

The file is streamed one tensor at a time (the output header is planned from the input header),
so merging the 22B checkpoint needs memory for one weight matrix, not for the model, and the
output appears only when complete (files.atomic_write), mode 0644. A LoRA without tensors, or a
base, LoRA or result holding NaN / Inf, is refused naming the file and the tensor.
"""

import argparse
import json
import os
import struct

import torch
from safetensors import safe_open

import files
from config import run_cli
from lora import read_lora_file
from model import PREFIX

TARGET_DTYPES = {**files.DTYPES, "keep": None}  # "keep": each tensor stays in the dtype it has
# safetensors dtype codes of the dtypes we may write (the format's spelling)
ST_CODE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
FLOAT_CODES = ("F32", "BF16", "F16")  # cast by --dtype; fp8 and integer tensors are copied as they are
ITEMSIZE = files.ST_ITEMSIZE
COPY_CHUNK = 64 << 20


def _tensor_bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _copy_bytes(src, dst, start, length, what):
    """Copy `length` bytes of `src` from `start` to `dst`, in chunks (a tensor may be gigabytes)."""
    src.seek(start)
    while length:
        chunk = src.read(min(length, COPY_CHUNK))
        if not chunk:
            raise ValueError(f"{what}: the file ends early (truncated)")
        dst.write(chunk)
        length -= len(chunk)


def merge_checkpoint(ckpt, lora_path, out, dtype="bf16", strength=1.0):
    """Write `out`: `ckpt` with the LoRA at `lora_path` folded in. Returns a summary dict."""
    ckpt, lora_path, out = os.fspath(ckpt), os.fspath(lora_path), os.fspath(out)
    if dtype not in TARGET_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(TARGET_DTYPES)}, got {dtype!r}")
    target = TARGET_DTYPES[dtype]
    header, meta, data_start = files.read_header(ckpt)
    updates, unmatched = read_lora_file(lora_path, strength)  # refuses NaN / Inf and damaged files
    if not updates:
        raise ValueError(f"{lora_path}: no LoRA A/B pairs inside ({len(unmatched)} other tensors): nothing to merge")
    if unmatched:
        raise ValueError(f"{lora_path}: {len(unmatched)} keys are not LoRA A/B pairs: {unmatched[:10]}")
    missing, wrong = [], []
    for module, (a, b) in updates.items():
        key = f"{PREFIX}{module}.weight"
        if key not in header:
            missing.append(key)
        elif header[key]["shape"] != [b.shape[0], a.shape[1]]:
            wrong.append(f"{key}: base {header[key]['shape']} vs LoRA {[b.shape[0], a.shape[1]]}")
        elif header[key]["dtype"] not in FLOAT_CODES:
            wrong.append(f"{key}: base dtype {header[key]['dtype']} (fp8/quantised bases cannot be merged "
                         "exactly; use the bf16 checkpoint)")
    if missing or wrong:
        raise ValueError(f"{lora_path} does not fit {ckpt}:\n" + "\n".join(
            ([f"  {len(missing)} LoRA layers missing from the base: {missing[:10]}"] if missing else []) + wrong))
    merged_keys = {f"{PREFIX}{m}.weight": m for m in updates}

    # plan: output dtype code of every tensor, in the base file's data order
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    plan, offset = {}, 0
    for key in order:
        info = header[key]
        code = info["dtype"]
        if key.startswith(PREFIX) and code in FLOAT_CODES and target is not None:
            code = ST_CODE[target]
        n = 1
        for s in info["shape"]:
            n *= s
        size = n * ITEMSIZE[code] if (key in merged_keys or code != info["dtype"]) else (
            info["data_offsets"][1] - info["data_offsets"][0])
        plan[key] = {"dtype": code, "shape": info["shape"], "data_offsets": [offset, offset + size]}
        offset += size
    lora_meta = files.read_safetensors_metadata(lora_path)
    out_meta = dict(meta)  # the original metadata (config included), plus a record of what was merged
    out_meta["merged_lora"] = json.dumps({
        "file": os.path.basename(lora_path), "strength": strength, "layers": len(updates),
        **{k: lora_meta[k] for k in ("base_model", "lora_rank", "lora_alpha") if k in lora_meta}})
    head = json.dumps({"__metadata__": out_meta, **plan}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to 8-byte alignment

    counts = {"merged": 0, "cast": 0, "copied": 0}

    def write(tmp):
        with safe_open(ckpt, framework="pt", device="cpu") as src, open(ckpt, "rb") as raw, open(tmp, "wb") as dst:
            dst.write(struct.pack("<Q", len(head)) + head)
            for key in order:
                info, want = header[key], plan[key]
                if key in merged_keys:
                    a, b = updates[merged_keys[key]]
                    w = src.get_tensor(key)
                    merged = (w.float() + b @ a).to(target or w.dtype)  # fp32 sum, one rounding
                    files.check_finite({key: merged}, f"{out} (merging {lora_path} into {ckpt})")
                    dst.write(_tensor_bytes(merged))
                    counts["merged"] += 1
                    continue
                files.check_finite({key: src.get_tensor(key)}, ckpt)  # a damaged base is not passed on
                if want["dtype"] != info["dtype"]:
                    dst.write(_tensor_bytes(src.get_tensor(key).to(target)))
                    counts["cast"] += 1
                else:
                    _copy_bytes(raw, dst, data_start + info["data_offsets"][0],
                                info["data_offsets"][1] - info["data_offsets"][0], f"{ckpt}: tensor {key}")
                    counts["copied"] += 1

    files.atomic_write(out, write)
    return {**counts, "bytes": 8 + len(head) + offset, "out": out}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="base checkpoint (official LTX-2 safetensors)")
    p.add_argument("--lora", required=True, help="LoRA safetensors (ours, ComfyUI or ltx-core layout)")
    p.add_argument("--out", required=True, help="merged safetensors to write")
    p.add_argument("--dtype", default="bf16", choices=list(TARGET_DTYPES), help="dtype of the transformer tensors")
    p.add_argument("--strength", type=float, default=1.0, help="multiplier of the LoRA update")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    for flag, path in (("--ckpt", args.ckpt), ("--lora", args.lora)):
        files.check_file(path, flag)
    s = merge_checkpoint(args.ckpt, args.lora, args.out, dtype=args.dtype, strength=args.strength)
    print(f"{s['out']}: {s['merged']} weights merged, {s['cast']} cast to {args.dtype}, "
          f"{s['copied']} copied unchanged, {s['bytes'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    run_cli(main)
