"""train.make_optimizer's fused AdamW against the per-tensor loop AdamW it replaced, in one process.

    python benchmarks/bench_optimizer.py                  # tiny192 base step, the tiny pipeline's batch
    python benchmarks/bench_optimizer.py --model=micro --steps=4

Two copies of the same base-stage training step (bench_presets.Step: DiT + text connector from
scratch, fp32, batch 16 of 63 latents with 74 text tokens), one stepping the AdamW that
`train.make_optimizer` builds (fused), the other `torch.optim.AdamW(..., foreach=False)` (what
torch runs on CPU by default). Reports the median of the per-round ratios fused / loop of whole
training steps (timing.py: alternating, the order flipping every round) and of the optimizer
update alone, their spread, the load average before and after; then the peak RSS growth of one
warm step of each in a fresh process (peak_rss.py). Also checks that both make the same update:
two fresh copies, 10 updates from the same gradients, weights within 1e-6.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import peak_rss  # noqa: E402
import timing  # noqa: E402
import train  # noqa: E402
from bench_presets import Step, add_step_args  # noqa: E402

VARIANTS = ("fused", "loop")


def make_step(variant, args):
    """A Step whose optimizer is train.make_optimizer's ("fused") or the per-tensor loop ("loop")."""
    step = Step(args.model, args)
    params = list(step.opt.param_groups[0]["params"])
    if variant == "fused":
        _, step.opt = train.make_optimizer(step.cfg, params)
        assert step.opt.defaults["fused"], "train.make_optimizer no longer builds a fused AdamW"
    else:
        step.opt = torch.optim.AdamW(params, lr=step.cfg.lr, betas=(step.cfg.beta1, step.cfg.beta2),
                                     weight_decay=step.cfg.weight_decay, foreach=False)
    return step


def update_only(step):
    """A closure running only the optimizer update on fixed gradients."""
    gen = torch.Generator().manual_seed(0)  # the same gradients for both variants
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in step.opt.param_groups[0]["params"]]

    def run():
        for p, g in zip(step.opt.param_groups[0]["params"], grads):
            p.grad = g
        step.opt.step()
    return run


def same_updates(args, n=10):
    """Max |fused - loop| over the weights of two fresh copies after `n` updates from the same
    gradients (the training steps above drift apart: they feed each update's rounding back in)."""
    fresh = [make_step(v, args) for v in VARIANTS]
    runs = [update_only(s) for s in fresh]
    for _ in range(n):
        for run in runs:
            run()
    pairs = zip(*(s.opt.param_groups[0]["params"] for s in fresh))
    worst = max((a - b).abs().max().item() for a, b in pairs)
    assert worst <= 1e-6, f"fused and loop AdamW weights differ by {worst:.2e} after {n} updates"
    return worst


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny192")
    add_step_args(ap, steps=16)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    flags = [f"--model={args.model}", f"--batch={args.batch}", f"--tokens={args.tokens}",
             f"--text_len={args.text_len}", f"--threads={args.threads}"]
    if args.rss_of:  # child of the memory measurement: one variant, one warm step
        step = make_step(args.rss_of, args)
        step()
        peak_rss.print_step_growth(step)
        return
    steps = {v: make_step(v, args) for v in VARIANTS}
    print(f"config: {args.model} base step ({steps['fused'].n_params:,} params, DiT + connector), "
          f"B={args.batch} T={args.tokens} L={args.text_len}, fp32; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    before = timing.load()
    times = timing.paired_times(steps, args.steps)
    updates = timing.paired_times({v: update_only(s) for v, s in steps.items()}, args.steps * 4)
    after = timing.load()
    print(timing.describe("ratio fused/loop, whole step", timing.ratios(times["fused"], times["loop"])))
    for v in VARIANTS:
        print(timing.describe(f"{v:5s} ms/step", times[v], scale=1e3, fmt=".1f"))
    print(timing.describe("ratio fused/loop, update only", timing.ratios(updates["fused"], updates["loop"])))
    for v in VARIANTS:
        print(timing.describe(f"{v:5s} ms/update", updates[v], scale=1e3, fmt=".2f"))
    print(timing.load_line(before, after, torch.get_num_threads()))
    print(f"the same weights after 10 updates from the same gradients: max |fused - loop| {same_updates(args):.1e}")
    for v in VARIANTS:
        rss = peak_rss.rss_child(__file__, v, flags)
        print(f"{v}: peak RSS growth of one step {rss / 2**20:.0f} MiB (fresh process)")


if __name__ == "__main__":
    main()
