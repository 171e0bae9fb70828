"""Forward+backward of our AudioDiT vs ltx-core 1.0.0's audio-only LTXModel, same weights, same inputs.

    python benchmarks/bench_dit.py                        # D=512 (8x64), 8 layers, T=250, B=4, L=128
    python benchmarks/bench_dit.py --steps=3 --layers=4   # quicker

Prints per-step time (median of interleaved runs, so CPU contention hits both alike), the ratio
ours/reference, memory (bytes of tensors saved for backward, deduplicated by storage; and the peak
RSS growth of one step in a fresh subprocess per model, glibc set to unmap freed blocks), and the
achieved FLOP/s (FlopCounterMode count of one step) against this machine's measured fp32 matmul peak.
"""

import argparse
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model as M  # noqa: E402
import peak_rss  # noqa: E402


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
                                                ("layers", "dim", "tokens", "batch", "context")])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=250)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rss-of", default="")
    args = ap.parse_args()

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
          f"T={args.tokens} L={args.context}, fp32, torch {torch.__version__}, threads={torch.get_num_threads()}")
    with FlopCounterMode(display=False) as fc:
        steps["ours"]()
    flops = fc.get_total_flops()
    for s in steps.values():  # warm-up
        s()
    times = {"ours": [], "ref": []}
    for _ in range(args.steps):  # interleaved so that load from other processes hits both alike
        for w, s in steps.items():
            t0 = time.perf_counter()
            s()
            times[w].append(time.perf_counter() - t0)
    peak = matmul_peak()
    med = {w: statistics.median(t) for w, t in times.items()}
    for w in ("ours", "ref"):
        spread = max(times[w]) - min(times[w])
        print(f"{w:5s}: {med[w] * 1e3:8.1f} ms/step (median of {args.steps}, spread {spread * 1e3:.1f} ms)  "
              f"saved-for-backward {saved_bytes(steps[w]) / 2**20:7.1f} MiB  "
              f"peak RSS growth {rss_child(args, w) / 2**20:7.1f} MiB  "
              f"{flops / med[w] / 1e9:6.1f} GFLOP/s")
    print(f"ratio ours/ref: {med['ours'] / med['ref']:.3f}")
    print(f"FLOPs per step: {flops / 1e9:.1f} GFLOP; matmul peak {peak / 1e9:.1f} GFLOP/s; "
          f"ours at {100 * flops / med['ours'] / peak:.0f}% of peak")


if __name__ == "__main__":
    main()
