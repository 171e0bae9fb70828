"""Sampling speed on CPU for the tiny preset, and one model forward per step whatever the guidance.

    python benchmarks/bench_sample.py            # tiny DiT, mel codec, 4 s clips, 16 steps, batch 1 and 8
    python benchmarks/bench_sample.py --quick    # 4 steps, 2 rounds

Calls sample.sample() (byte text encoder, tiny text connector, mel codec with the tiny pipeline's
16 Griffin-Lim iterations, SpeakerAdaLNZero on mel_stats features of a 3 s synthetic reference,
ref_mode adaln; random weights, fp32) for four guidance settings:
  cond            cfg 1, stg 0, spk_cfg 1   (1 pass: the reference of the ratios)
  cfg             cfg 3                      (2 passes)
  cfg+stg         cfg 3, stg 1               (3 passes)
  cfg+stg+spk     cfg 3, stg 1, spk_cfg 3    (4 passes)
A forward pre-hook on the DiT counts its calls, records the batch each call sees and when it
starts: forwards/step = calls / steps (must be 1: every pass in one batched forward); s/step = the
median interval between consecutive forward starts (forward + guidance + Euler update). RTF = wall
seconds of the whole sample() call (text, speaker deltas, denoising, Griffin-Lim decode) / seconds
of audio it returns (batch × duration); below 1 is faster than real time.
Each batch size runs every guidance setting once per round, the order flipping every round
(timing.py); "vs cond" is the median of per-round ratios to the cond run of the same round, with
its spread; the load average before and after says whether the machine was shared.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import codec as codec_lib  # noqa: E402
import duration  # noqa: E402
import model as model_lib  # noqa: E402
import sampler  # noqa: E402
import timing  # noqa: E402
import speaker as speaker_lib  # noqa: E402
import text as text_lib  # noqa: E402
from adaln import SpeakerAdaLNZero  # noqa: E402

GUIDANCE = {"cond": dict(cfg=1.0, stg=0.0, spk_cfg=1.0), "cfg": dict(cfg=3.0, stg=0.0, spk_cfg=1.0),
            "cfg+stg": dict(cfg=3.0, stg=1.0, spk_cfg=1.0), "cfg+stg+spk": dict(cfg=3.0, stg=1.0, spk_cfg=3.0)}
PROMPT = "A calm narrator, close microphone. 'The quick brown fox jumps over the lazy dog.'"


def build():
    """(model, codec, text_encoder, connector, adaln, speaker): the tiny stack, random weights."""
    torch.manual_seed(0)
    model = model_lib.AudioDiT(model_lib.PRESETS["tiny"]).eval()
    codec = codec_lib.build_codec("mel", n_mels=32, griffin_lim_iters=16).eval()
    width = model.cfg.cross_attention_dim
    text_encoder = text_lib.build_text_encoder("byte", max_text_len=80, device="cpu", dtype=torch.float32, dim=width)
    connector = text_lib.build_text_connector("tiny", dim=width).eval()
    speaker = speaker_lib.build_speaker_extractors(["mel_stats"], {}, "cpu")
    adaln = SpeakerAdaLNZero(speaker.dim, model.cfg.num_layers, model.cfg.dim, rows=model.cfg.ada_rows,
                             hidden=256).eval()
    with torch.no_grad():  # non-zero heads, so the speaker pass really differs from the no-speaker one
        for head in adaln.heads:
            head.weight.normal_(0, 0.01)
    return model, codec, text_encoder, connector, adaln, speaker


class ForwardProbe:
    """Counts the DiT's forward calls, their batch sizes and start times (a forward pre-hook)."""

    def __init__(self, model):
        self.calls, self.batches, self.starts = 0, [], []
        model.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.calls += 1
        self.batches.append(args[0].shape[0])
        self.starts.append(time.perf_counter())

    def reset(self):
        self.calls, self.batches, self.starts = 0, [], []


def run(stack, probe, batch, steps, seconds, guidance):
    """One sample() call; returns (wall s, audio s, forwards, forward batches, median s/step)."""
    model, codec, text_encoder, connector, adaln, speaker = stack
    ref = 0.1 * torch.randn(1, 3 * codec.sample_rate, generator=torch.Generator().manual_seed(1))
    probe.reset()
    t0 = time.perf_counter()
    wavs = sampler.sample(model, codec, text_encoder, connector, [PROMPT] * batch, seeds=list(range(batch)),
                             ref_wavs=[ref] * batch, ref_mode="adaln", adaln=adaln, speaker=speaker, steps=steps,
                             rescale=0.0, duration=seconds, batch_size=batch, progress=False, **guidance)
    wall = time.perf_counter() - t0
    audio = sum(w.shape[-1] for w in wavs) / codec.output_rate
    intervals = [b - a for a, b in zip(probe.starts, probe.starts[1:])]
    return wall, audio, probe.calls, sorted(set(probe.batches)), statistics.median(intervals)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=3, help="sample() calls per guidance setting and batch size")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps, rounds = (4, 2) if args.quick else (args.steps, args.rounds)
    stack = build()
    probe = ForwardProbe(stack[0])
    print(f"config: tiny DiT ({sum(p.numel() for p in stack[0].parameters()):,} params, fp32), mel codec "
          f"(Griffin-Lim 16 iters), {args.seconds:g} s clips ({duration.n_latent_tokens(args.seconds)} tokens), "
          f"{steps} Euler steps, ref_mode adaln, {rounds} paired rounds; torch {torch.__version__}, "
          f"torch.set_num_threads({args.threads})")
    load0, t_start = timing.load(), time.perf_counter()
    print(f"\n{'B':>2s} {'guidance':12s} {'passes':>6s} {'fwd/step':>8s} {'fwd batch':>9s} {'s/step':>8s} "
          f"{'wall s':>7s} {'audio s':>7s} {'RTF':>6s}  s/step vs cond (paired)")
    bad = []
    for B in [int(b) for b in args.batches.split(",")]:
        results = {name: [] for name in GUIDANCE}

        def runner(name, B=B, results=results):
            return lambda: results[name].append(run(stack, probe, B, steps, args.seconds, GUIDANCE[name]))
        timing.paired_times({name: runner(name) for name in GUIDANCE}, rounds)
        cond = [r[4] for r in results["cond"][1:]]  # [1:]: the warm-up call
        for name, g in GUIDANCE.items():
            runs = results[name][1:]
            passes = len(sampler._guidance_passes(g["cfg"], g["stg"], g["spk_cfg"], True))
            for wall, audio, calls, batches, step_s in runs:
                if calls != steps or batches != [passes * B]:
                    bad.append(f"B={B} {name}: {calls} forwards for {steps} steps, batches {batches}")
            wall = timing.spread([r[0] for r in runs])[0]
            step_s = timing.spread([r[4] for r in runs])[0]
            vs = timing.describe("", timing.ratios([r[4] for r in runs], cond), fmt=".2f")[2:]
            print(f"{B:2d} {name:12s} {passes:6d} {runs[0][2] / steps:8.2f} {','.join(map(str, runs[0][3])):>9s} "
                  f"{step_s:8.3f} {wall:7.1f} {runs[0][1]:7.1f} {wall / runs[0][1]:6.3f}  {vs}")
    load1 = timing.load()
    print("\none forward per step regardless of guidance terms: " + ("yes" if not bad else "NO: " + "; ".join(bad)))
    print(timing.load_line(load0, load1, args.threads) + f"; wall {time.perf_counter() - t_start:.0f} s")
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
