"""`compile: true` on CPU: each transformer block compiled (torch.compile, inductor) vs eager.

    python benchmarks/bench_compile.py                 # tiny preset, B=4, T=100 (4 s), L=64, fp32
    python benchmarks/bench_compile.py --model=micro   # quicker

Builds the DiT twice with the same weights and compiles every block of one copy the way
train.build does under `compile: true` (`block.compile()`: regional, one graph per block, see the
no-graph-break tests in tests/test_model.py). Reports the one-off compile time (the first
forward + backward), then the paired ratio compiled / eager of forward + backward steps timed
alternately in this process (timing.py), its spread, and the load average before and after.
Also checks that both copies give the same loss (fp32: within 1e-4 relative).
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model as model_lib  # noqa: E402
import timing  # noqa: E402


def build(args):
    """(eager, compiled, inputs): two copies of one random DiT; the second one's blocks compiled."""
    cfg = model_lib.PRESETS[args.model]
    torch.manual_seed(0)
    eager = model_lib.AudioDiT(cfg).train()
    with torch.no_grad():  # adaLN-zero makes a fresh DiT an identity: random weights instead
        for p in eager.parameters():
            p.normal_(0, 0.02)
    compiled = model_lib.AudioDiT(cfg).train()
    compiled.load_state_dict(eager.state_dict())
    for block in compiled.transformer_blocks:
        block.compile()
    B, T, L = args.batch, args.tokens, args.context
    inputs = (torch.randn(B, T, cfg.in_channels), torch.rand(B), torch.randn(B, L, cfg.cross_attention_dim))
    return eager, compiled, inputs


def step_fn(dit, inputs):
    """A closure running one forward + backward of `dit`; returns the loss."""
    x, sigma, ctx = inputs

    def step():
        dit.zero_grad(set_to_none=True)
        loss = dit(x, sigma, ctx).square().mean()
        loss.backward()
        return loss.item()
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="timed rounds (each runs both copies once)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    eager, compiled, inputs = build(args)
    steps = {"compiled": step_fn(compiled, inputs), "eager": step_fn(eager, inputs)}
    print(f"config: {args.model} DiT ({sum(p.numel() for p in eager.parameters()):,} params), B={args.batch} "
          f"T={args.tokens} L={args.context}, fp32; torch {torch.__version__}, torch.set_num_threads({args.threads})")
    t0 = time.perf_counter()
    loss_compiled = steps["compiled"]()
    print(f"compile (first forward + backward of the compiled copy): {time.perf_counter() - t0:.1f} s")
    loss_eager = steps["eager"]()
    assert abs(loss_compiled - loss_eager) <= 1e-4 * abs(loss_eager), (loss_compiled, loss_eager)
    load0, t_start = timing.load(), time.perf_counter()
    times = timing.paired_times(steps, args.steps)
    load1 = timing.load()
    for name, t in times.items():
        print(f"{name:8s} " + timing.describe("ms/step", t, scale=1e3, fmt=".1f"))
    print(timing.describe("ratio compiled/eager per round", timing.ratios(times["compiled"], times["eager"])))
    print(timing.load_line(load0, load1, args.threads) + f"; timing wall {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
