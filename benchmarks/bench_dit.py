"""Forward+backward of our AudioDiT vs ltx-core 1.0.0's audio-only LTXModel, same weights, same inputs.

    python benchmarks/bench_dit.py                        # D=512 (8x64), 8 layers, T=250, B=4, L=128
    python benchmarks/bench_dit.py --steps=5 --layers=4   # quicker

Times both models alternately in one process (timing.py: a round runs each once, the order flips
every round), and reports the median of the per-round ratios ours/reference with its spread, each
model's median step time, and the load average before and after. Memory, measured after the timing:
bytes of tensors saved for backward (deduplicated by storage, in this process: exact, not RSS) and
the peak RSS growth of one step in a fresh subprocess per model (peak_rss.py). Also the achieved
FLOP/s (FlopCounterMode count of one step) against this machine's measured fp32 matmul peak.
"""

import argparse
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model as M  # noqa: E402
import peak_rss  # noqa: E402
import timing  # noqa: E402


def build(args):
    """(ours, reference, inputs) at the benchmark config, sharing random weights."""
    from ltx_core.model.transformer.attention import AttentionFunction
    from ltx_core.model.transformer.model import LTXModel, LTXModelType
    from ltx_core.model.transformer.rope import LTXRopeType

    cfg = M.DiTConfig(num_layers=args.layers, heads=args.dim // 64, head_dim=64, cross_attention_dim=args.dim)
    torch.manual_seed(0)
    ref = LTXModel(model_type=LTXModelType.AudioOnly, num_layers=cfg.num_layers, audio_num_attention_heads=cfg.heads,
                   audio_attention_head_dim=cfg.head_dim, audio_cross_attention_dim=cfg.cross_attention_dim,
                   attention_type=AttentionFunction.PYTORCH, rope_type=LTXRopeType.SPLIT,
                   double_precision_rope=True, apply_gated_attention=True, cross_attention_adaln=True)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    ours = M.AudioDiT(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    B, T, L = args.batch, args.tokens, args.context
    x = torch.randn(B, T, cfg.in_channels)
    sigma = torch.rand(B)
    timesteps = sigma[:, None].expand(B, T).clone()  # per-token, as training with reference tokens
    ctx = torch.randn(B, L, cfg.cross_attention_dim)
    ctx_mask = torch.ones(B, L, dtype=torch.bool)
    ctx_mask[:, : L // 4] = False
    return cfg, ours.train(), ref.train(), (x, sigma, timesteps, ctx, ctx_mask)


def step_fn(which, ours, ref, inputs):
    """A closure running one forward+backward of `which` ("ours" | "ref")."""
    from ltx_core.components.patchifiers import AudioPatchifier
    from ltx_core.guidance.perturbations import BatchedPerturbationConfig
    from ltx_core.model.transformer.modality import Modality

    x, sigma, timesteps, ctx, ctx_mask = inputs
    B, T, _ = x.shape
    if which == "ours":
        def run():
            ours(x, sigma, ctx, timesteps=timesteps, context_mask=ctx_mask).square().mean().backward()
    else:
        positions = AudioPatchifier(patch_size=16)._compute_audio_timings(B, T)
        audio = Modality(latent=x, sigma=sigma, timesteps=timesteps, positions=positions, context=ctx,
                         context_mask=ctx_mask.long())
        none = BatchedPerturbationConfig.empty(B)

        def run():
            ref(video=None, audio=audio, perturbations=none)[1].square().mean().backward()
    model = ours if which == "ours" else ref

    def step():
        model.zero_grad(set_to_none=True)
        run()
    return step


def saved_bytes(step):
    """Bytes of distinct storages autograd saves for backward during one step (activation memory)."""
    seen = {}

    def pack(t):
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def matmul_peak(n=2048, seconds=2.0):
    """Measured fp32 GEMM FLOP/s on this machine (same thread count as the benchmark)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def rss_child(args, which):
    """Peak RSS growth (bytes) of one step of `which`, measured in a fresh interpreter."""
    return peak_rss.rss_child(__file__, which, [f"--{k}={getattr(args, k)}" for k in
                                                ("layers", "dim", "tokens", "batch", "context", "threads")])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=250)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="timed rounds (each runs both models once)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rss-of", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg, ours, ref, inputs = build(args)
    if args.rss_of:  # child: one warm step, then reset the RSS high-water mark and measure a second
        step = step_fn(args.rss_of, ours, ref, inputs)
        step()
        ours.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        peak_rss.print_step_growth(step)
        return

    steps = {w: step_fn(w, ours, ref, inputs) for w in ("ours", "ref")}
    print(f"config: D={cfg.dim} ({cfg.heads}x{cfg.head_dim}) layers={cfg.num_layers} B={args.batch} "
          f"T={args.tokens} L={args.context}, fp32, torch {torch.__version__}, threads={args.threads}")
    with FlopCounterMode(display=False) as fc:
        steps["ours"]()
    flops = fc.get_total_flops()
    load0, t_start = timing.load(), time.perf_counter()
    times = timing.paired_times(steps, args.steps)
    load1 = timing.load()
    per_round = timing.ratios(times["ours"], times["ref"])
    print(timing.describe("ratio ours/ref per round", per_round)
          + "; rounds: " + " ".join(f"{r:.3f}" for r in per_round))
    print(timing.load_line(load0, load1, args.threads) + f"; timing wall {time.perf_counter() - t_start:.0f} s")
    med = {w: timing.spread(t)[0] for w, t in times.items()}
    for w in ("ours", "ref"):
        print(f"{w:5s}: " + timing.describe("ms/step", times[w], scale=1e3, fmt=".1f")
              + f"  saved-for-backward {saved_bytes(steps[w]) / 2**20:.1f} MiB"
              + f"  peak RSS growth {rss_child(args, w) / 2**20:.1f} MiB (fresh process)"
              + f"  {flops / med[w] / 1e9:.1f} GFLOP/s")
    peak = matmul_peak()
    print(f"FLOPs per step: {flops / 1e9:.1f} GFLOP; matmul peak {peak / 1e9:.1f} GFLOP/s; "
          f"ours at {100 * flops / med['ours'] / peak:.0f}% of peak")


if __name__ == "__main__":
    main()
