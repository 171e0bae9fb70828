"""Peak host memory of train.py's stages at the real LTX-2.3 size, on random weights.

    python benchmarks/bench_host_memory.py                  # the 3,286,408,320-parameter audio DiT, bf16 (6.6 GB file)
    python benchmarks/bench_host_memory.py --layers=8       # the same widths, 8 of the 48 blocks
    python benchmarks/bench_host_memory.py --layout=tiny    # the same phases on the tiny preset (seconds)

Writes a random-weight checkpoint in the official layout (`model.diffusion_model.` keys of the audio
DiT and its `audio_embeddings_connector`, the transformer config in the metadata) tensor by tensor,
so the writer never holds more than one tensor, into --dir (default /tmp; removed afterwards unless
--keep). Then each phase runs in a fresh interpreter, with train.py's own functions:

  imports           nothing: the interpreter with torch and the project imported (the floor)
  load_dit          model.load_dit of the file in bf16 (memory-mapped: the frozen weights are pages of
                    the file, shared by every rank of a node)
  build_lora        train.build of run 7 (stage 1: LoRA r64 on the laionbox targets, param_dtype bf16)
  build_lora_fp32   the same with the DiT and connector loaded in fp32 and cast afterwards (what
                    train.build did before: both copies at once)
  step_lora         build_lora + fp32 masters + AdamW + one micro-batch step (flow loss, backward,
                    clip, update) + the freeze alarm's snapshot and report + a checkpoint written
  build_adaln       train.build of run 8 (stage 2: a 455M-parameter fp32 SpeakerAdaLNZero on the frozen DiT)
  build_adaln_fp32  the same, fp32 load then cast
  step_adaln        build_adaln + AdamW + one step (flow loss only: the ReFL losses need the LTX audio
                    VAE and the speaker models, which have no random stand-in here)

Per phase: peak RSS (VmHWM, file pages included), peak anonymous memory (RssAnon sampled every
10 ms: what each torchrun rank pays privately), wall seconds, and for the step phases the
anonymous memory the step adds on top of the built model (records/2026-11-29_host_memory.md).
A micro-batch is 1 clip of 25 tokens (1 s) and 32 text tokens: the activations are small, the
weights, masters, gradients and optimizer state are what is measured. A phase is skipped, and
says so, when MemAvailable is below its expected need (this runs on shared machines).
"""

import argparse
import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import model as model_lib  # noqa: E402
import text as text_lib  # noqa: E402
import train  # noqa: E402
from config import load_config  # noqa: E402

PHASES = ("imports", "load_dit", "build_lora", "build_lora_fp32", "step_lora", "build_adaln", "build_adaln_fp32",
          "step_adaln")
# memory a phase is expected to need, in bytes per DiT parameter (estimated from the sizes: an fp32
# DiT is 4, an fp32 AdaLN with its gradient and Adam moments 2.2), to skip it on a full machine
NEED_PER_PARAM = {"imports": 0.0, "load_dit": 0.3, "build_lora": 1.0, "build_lora_fp32": 4.8, "step_lora": 1.5,
                  "build_adaln": 1.0, "build_adaln_fp32": 5.2, "step_adaln": 3.0}
SPEAKER_DIM = 2176  # run 8's speaker features: WavLM-SV + Orange-tbr + 2 x CLAP (adaln.py's 22B figure)
TOKENS, TEXT_TOKENS = 25, 32


def proc_status():
    """{field: bytes} of /proc/self/status's memory lines."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS", "RssAnon", "RssFile")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def mem_available():
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))


# -----------------------------------------------------------------------------------------------
# the random checkpoint, written one tensor at a time


def scaled_preset(preset, layers):
    """`preset` with `layers` blocks (same widths), registered as a preset of its own; 0 = unchanged."""
    if not layers:
        return preset
    name = f"{preset}_{layers}blocks"
    model_lib.PRESETS[name] = dataclasses.replace(model_lib.PRESETS[preset], num_layers=layers)
    text_lib.CONNECTOR_PRESETS[name] = text_lib.CONNECTOR_PRESETS[preset]
    return name


def layout(preset):
    """{key: shape} of the official file for `preset` (DiT + audio text connector) and its metadata."""
    with torch.device("meta"):
        dit = model_lib.AudioDiT(model_lib.PRESETS[preset])
        connector = text_lib.TextConnector(**text_lib.CONNECTOR_PRESETS[preset])
    shapes = {model_lib.PREFIX + k: tuple(v.shape) for k, v in dit.state_dict().items()}
    shapes.update({text_lib.CONNECTOR_PREFIX + k: tuple(v.shape) for k, v in connector.state_dict().items()})
    meta = json.loads(model_lib.metadata_from_dit_config(dit.cfg)["config"])
    meta["transformer"].update(text_lib.connector_metadata(connector))
    return shapes, {"config": json.dumps(meta)}, sum(p.numel() for p in dit.parameters())


def write_random_checkpoint(path, preset):
    """A bf16 safetensors file of N(0, 0.02) values (slices of one random pool, so writing is disk-
    bound); returns the DiT's parameter count."""
    shapes, meta, n_dit = layout(preset)
    header, offset = {"__metadata__": meta}, 0
    for key, shape in shapes.items():
        n = 2 * int(torch.Size(shape).numel())
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    pool = (0.02 * torch.randn(1 << 22, generator=torch.Generator().manual_seed(0))).to(torch.bfloat16)
    pool = pool.view(torch.int16).numpy().tobytes()  # 8 MB
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for i, shape in enumerate(shapes.values()):
            left, start = 2 * int(torch.Size(shape).numel()), (7919 * 2 * i) % len(pool)
            while left:
                chunk = pool[start:start + left]
                f.write(chunk)
                left -= len(chunk)
                start = 0
    return n_dit


# -----------------------------------------------------------------------------------------------
# the phases (each in its own process)


def run_config(stage, ckpt):
    yaml = os.path.join(ROOT, "configs", "run7.yaml" if stage == "lora" else "run8.yaml")
    return load_config([yaml, f"--ckpt={ckpt}", f"--max_text_len={TEXT_TOKENS}", "--micro_batch=1",
                        "--global_batch=1", "--device=cpu", "--aux_losses=[]", "--best_by=val_loss"])


def example_batch(cfg, text_dim):
    """One clip of TOKENS random latent tokens, TEXT_TOKENS text features, run 8's speaker width."""
    g = torch.Generator().manual_seed(0)
    ex = {"target": torch.randn(TOKENS, 128, generator=g), "ref": None, "text": torch.randn(TEXT_TOKENS, text_dim,
                                                                                              generator=g),
          "speaker": torch.randn(SPEAKER_DIM, generator=g), "id": "random", "mode": "uncond", "source": "random"}
    return data.pad_examples([ex], ref_offset_s=cfg.ref_offset_s, tokens_per_second=25, max_text_len=TEXT_TOKENS)


def fp32_then_cast():
    """Make train.build load as it did before: DiT and connector in fp32, cast to param_dtype after."""
    load_dit, build_connector = model_lib.load_dit, text_lib.build_text_connector
    model_lib.load_dit = lambda path, **kw: load_dit(path, **{**kw, "dtype": torch.float32})
    text_lib.build_text_connector = lambda *a, **kw: build_connector(*a, **{**kw, "dtype": torch.float32})


def one_step(cfg, parts, batch, out_dir):
    """train.main's optimizer step on one micro-batch, the freeze alarm, and (LoRA) a checkpoint."""
    trainable = parts["trainable"]
    params = [p for _, p in trainable]
    masters = train.MasterWeights(params) if params[0].dtype != torch.float32 else None
    opt_params = masters.masters if masters is not None else params
    optimizer = torch.optim.AdamW(opt_params, lr=cfg.lr)
    init = train.weight_snapshot(trainable)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    train.micro_step(cfg, parts, batch, train.micro_generator(cfg, 0, 0), autocast, 1.0)
    train.optimizer_step(optimizer, params, masters, cfg.grad_clip)
    train.weight_change(trainable if masters is None else list(zip([n for n, _ in trainable], masters.masters)), init)
    if cfg.stage == "lora":  # at stage 2 the checkpoint is 5.5 GB of disk writes: not part of this run
        path = os.path.join(out_dir, "checkpoint.pt")
        train.atomic_save({"trainable": train.trainable_state(trainable, masters),
                           "optimizer": optimizer.state_dict()}, path)
        os.remove(path)


def phase(name, ckpt, preset, out_dir):
    """Run phase `name`; returns its measurements."""
    torch.set_num_threads(1)
    peak = {"anon": 0}
    done = threading.Event()

    def sample():
        while not done.wait(0.01):
            peak["anon"] = max(peak["anon"], proc_status()["RssAnon"])

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    built_anon = step_peak = None
    if name == "load_dit":
        model_lib.load_dit(ckpt, dtype=torch.bfloat16)
    elif name != "imports":
        if name.endswith("_fp32"):
            fp32_then_cast()
        cfg = run_config("lora" if "lora" in name else "adaln", ckpt)
        batch = example_batch(cfg, model_lib.PRESETS[preset].cross_attention_dim)
        parts = train.build(cfg, torch.device("cpu"), batch)
        if name.startswith("step"):
            built_anon, build_peak = proc_status()["RssAnon"], peak["anon"]
            peak["anon"] = 0  # from here on: what the step itself adds on top of the built model
            one_step(cfg, parts, batch, out_dir)
            step_peak = max(peak["anon"], proc_status()["RssAnon"])
            peak["anon"] = max(build_peak, step_peak)
    seconds = time.perf_counter() - t0
    done.set()
    st = proc_status()
    out = {"phase": name, "peak_rss_gib": st["VmHWM"] / 2**30, "end_file_gib": st["RssFile"] / 2**30,
           "peak_anon_gib": max(peak["anon"], st["RssAnon"]) / 2**30, "seconds": seconds}
    if step_peak is not None:  # the step's own growth: masters, gradients, Adam moments, activations, checkpoint
        out["step_growth_gib"] = (step_peak - built_anon) / 2**30
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layout", default="ltx23_audio", help="a model.PRESETS name with a text connector preset")
    ap.add_argument("--dir", default="/tmp", help="where the random checkpoint is written (and removed)")
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--layers", type=int, default=0, help="blocks of a scaled layout (same widths; 0 = the preset's)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint (and reuse it next time)")
    ap.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase in this process
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    preset = scaled_preset(args.layout, args.layers)
    if args.phase:
        print(json.dumps(phase(args.phase, args.ckpt, preset, os.path.dirname(args.ckpt))))
        return
    work = os.path.join(args.dir, f"speakerbox_host_memory_{preset}")
    os.makedirs(work, exist_ok=True)
    ckpt = os.path.join(work, "dit.safetensors")
    shapes, _, n_dit = layout(preset)
    size = 2 * sum(int(torch.Size(s).numel()) for s in shapes.values())
    if not os.path.isfile(ckpt) or os.path.getsize(ckpt) < size:
        free = shutil.disk_usage(work).free
        if free < size + (2 << 30):
            raise SystemExit(f"{work}: {free / 2**30:.1f} GiB free, the checkpoint needs {size / 2**30:.1f} GiB")
        t0 = time.perf_counter()
        write_random_checkpoint(ckpt, preset)
        print(f"wrote {ckpt}: {size / 2**30:.2f} GiB, {n_dit:,} DiT parameters, in {time.perf_counter() - t0:.0f} s")
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
          f"MemAvailable {mem_available() / 2**30:.1f} GiB")
    print(f"{'phase':<18} {'peak RSS GiB':>12} {'peak anon GiB':>13} {'file GiB':>9} {'wall s':>7} "
          f"{'step growth GiB':>15}")
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    results = []
    try:
        for name in args.phases.split(","):
            need = NEED_PER_PARAM[name] * n_dit
            if mem_available() < need + (2 << 30):
                print(f"{name:<18} skipped: needs ~{need / 2**30:.1f} GiB, "
                      f"MemAvailable {mem_available() / 2**30:.1f} GiB")
                continue
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--phase={name}", f"--ckpt={ckpt}",
                                   f"--layout={args.layout}", f"--layers={args.layers}"],
                                  capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"{name:<18} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(r)
            growth = f"{r['step_growth_gib']:>15.2f}" if "step_growth_gib" in r else ""
            print(f"{name:<18} {r['peak_rss_gib']:>12.2f} {r['peak_anon_gib']:>13.2f} {r['end_file_gib']:>9.2f} "
                  f"{r['seconds']:>7.1f} {growth}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print(json.dumps({"layout": preset, "dit_params": n_dit, "results": results}))


if __name__ == "__main__":
    main()
