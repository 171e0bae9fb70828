"""A base-stage training step of one DiT preset against another's, timed alternately in one process.

    python benchmarks/bench_presets.py                              # tiny192 vs tiny, the tiny pipeline's batch
    python benchmarks/bench_presets.py --model=micro --ref=tiny --steps=4

What the tiny pipeline's base stage does per step, on random data: the whole DiT and its text
connector trained from scratch (fp32, AdamW), batch 16 of 63 latents (2.5 s) with 74 text tokens.
Reports the median of the per-round ratios model / ref (timing.py: each round runs both once, the
order flips every round), its spread, each preset's median step time and the load average before
and after; then the peak RSS growth of one warm step of each in a fresh process (peak_rss.py).
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import peak_rss  # noqa: E402
import timing  # noqa: E402
import model as model_lib  # noqa: E402
import text as text_lib  # noqa: E402
import train  # noqa: E402
from bench_train import synthetic_batch  # noqa: E402
from config import Config  # noqa: E402


class Step:
    """One preset's DiT + connector, its AdamW, a fixed batch; calling it runs one training step."""

    def __init__(self, name, args):
        dit_cfg = model_lib.PRESETS[name]
        width = dit_cfg.cross_attention_dim
        self.cfg = Config(stage="base", model=name, dtype="fp32", param_dtype="fp32", lr=4e-3,
                          max_text_len=args.text_len)
        torch.manual_seed(0)
        self.parts = {"dit": model_lib.AudioDiT(dit_cfg), "connector": text_lib.build_text_connector(name, dim=width),
                      "adaln": None}
        params = list(self.parts["dit"].parameters()) + list(self.parts["connector"].parameters())
        self.n_params = sum(p.numel() for p in params)
        self.opt = torch.optim.AdamW(params, lr=self.cfg.lr)
        self.batch = synthetic_batch(args.batch, args.tokens, args.text_len, width, latent_dim=dit_cfg.in_channels)
        self.autocast = torch.autocast("cpu", enabled=False)

    def __call__(self):
        gen = train.micro_generator(self.cfg, 0, 0)  # the same σ and noise every step
        train.micro_loss(self.cfg, self.parts, self.batch, gen, self.autocast, None)[0].backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def add_step_args(ap, steps):
    """The batch, timing and memory-child flags of a benchmark built on `Step` (also bench_optimizer.py)."""
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=63, help="audio latents per clip (25 per second)")
    ap.add_argument("--text_len", type=int, default=74)
    ap.add_argument("--steps", type=int, default=steps, help="timed rounds")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--rss-of", dest="rss_of", default="", help=argparse.SUPPRESS)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny192", help="the preset timed")
    ap.add_argument("--ref", default="tiny", help="the preset it is timed against")
    add_step_args(ap, steps=10)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    flags = [f"--batch={args.batch}", f"--tokens={args.tokens}", f"--text_len={args.text_len}",
             f"--threads={args.threads}"]
    if args.rss_of:  # child of the memory measurement: one preset, one warm step
        step = Step(args.rss_of, args)
        step()
        peak_rss.print_step_growth(step)
        return
    steps = {name: Step(name, args) for name in (args.model, args.ref)}
    for name, step in steps.items():
        print(f"{name}: {step.n_params:,} params (DiT + connector)")
    before = timing.load()
    times = timing.paired_times(steps, args.steps)
    after = timing.load()
    print(timing.describe(f"ratio {args.model}/{args.ref} per round",
                          timing.ratios(times[args.model], times[args.ref])))
    for name in steps:
        print(timing.describe(f"{name} ms/step", times[name], scale=1e3, fmt=".1f"))
    print(timing.load_line(before, after, torch.get_num_threads()))
    for name in steps:
        rss = peak_rss.rss_child(__file__, name, flags)
        print(f"{name}: peak RSS growth of one step {rss / 2**20:.0f} MiB (fresh process)")


if __name__ == "__main__":
    main()
