"""Stage-2 step time with the ReFL auxiliary losses on vs off, and what the aux pieces cost.

    python benchmarks/bench_stage2.py            # tiny DiT, mel codec, B=4 (run 8's micro-batch), T=100 (4 s)
    python benchmarks/bench_stage2.py --quick    # 2 timed steps, no RSS subprocesses

The config is the tiny pipeline's stage 2 (configs/tiny.yaml + configs/tiny_adaln.yaml: tiny DiT
frozen, fp32 params under bf16 autocast, fp32 SpeakerAdaLNZero on mel_stats features, mel codec,
speaker + DNSMOS ReFL losses) with run 8's gate, aux_sigma_max = 0.4 (the tiny pipeline itself
runs 0.01), one clip per micro-batch (aux_clips = 1), clips ≤ 10 s. Inputs are synthetic (random
latents, text and speaker features, every item with a speaker, no reference tokens).

A full step is micro_loss + backward + clip + AdamW on the AdaLN, via train.py's functions:
  aux_off    AuxLosses absent (flow loss only)
  aux_fire   AuxLosses present and one clip decoded and scored (σ fixed at 0.3 for both variants so
             the gate opens; the gate itself is unchanged)
Amortised: with the stretched shifted-logit-normal σ sampler a micro-batch fires when any of its B
items draws σ < aux_sigma_max; that probability q is estimated from 200,000 draws of
losses.sample_sigma at this token count, and amortised = off + q·(fire − off).
The aux pieces are timed alone, forward+backward on one clip of the same length: codec decode to
16 kHz (mel pseudo-inverse + Griffin-Lim, differentiable), DNSMOS OVR, speaker embedding (mel_stats).

Times: both variants once per round, the order flipping every round (timing.py); the fire ratio
is the median of per-round ratios, with its spread and the load average before and after. The
pieces run the same way among themselves. Memory: peak RSS growth (VmHWM − VmRSS after
/proc/self/clear_refs) of one warm step in a fresh subprocess per variant (peak_rss.py), glibc set
to unmap freed blocks.
"""

import argparse
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import files  # noqa: E402
import peak_rss  # noqa: E402
import timing  # noqa: E402
import losses  # noqa: E402
import train  # noqa: E402
from config import load_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("aux_off", "aux_fire")


def synthetic_batch(B, T, text_len, text_dim, speaker_dim, latent_dim=128, seed=0):
    """A train.py micro-batch (data.pad_examples keys): random targets, text and speaker features."""
    g = torch.Generator().manual_seed(seed)
    examples = [{"target": torch.randn(T, latent_dim, generator=g), "ref": None,
                 "text": torch.randn(text_len, text_dim, generator=g),
                 "speaker": torch.randn(speaker_dim, generator=g),
                 "id": f"synthetic{b}", "mode": "uncond", "source": "synthetic"} for b in range(B)]
    return data.pad_examples(examples, ref_offset_s=0.5, tokens_per_second=25, max_text_len=text_len)


class Bench:
    def __init__(self, args):
        cfg = load_config([os.path.join(ROOT, "configs/tiny.yaml"), os.path.join(ROOT, "configs/tiny_adaln.yaml"),
                           "--stage=adaln", "--aux_sigma_max=0.4", "--aux_clips=1", "--aux_max_seconds=10"])
        self.cfg = cfg
        self.fire_cfg = dataclasses.replace(cfg, sigma_sampler="fixed", sigma_fixed=0.3)
        self.aux = train.AuxLosses(cfg, torch.device("cpu"))
        text_dim = train.model_lib.PRESETS[cfg.model].cross_attention_dim
        self.batch = synthetic_batch(args.batch, args.tokens, cfg.max_text_len, text_dim, self.aux.speaker.dim)
        self.parts = train.build(cfg, torch.device("cpu"), self.batch)
        self.params = [p for _, p in self.parts["trainable"]]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr)
        self.autocast = torch.autocast("cpu", dtype=files.DTYPES[cfg.dtype])
        self.fired = []

    def step(self, variant):
        aux = self.aux if variant == "aux_fire" else None
        gen = train.micro_generator(self.cfg, 0, 0)
        loss, logs = train.micro_loss(self.fire_cfg, self.parts, self.batch, gen, self.autocast, aux)
        loss.backward()
        if aux is not None:
            self.fired.append(any(k.startswith("aux_") for k in logs))
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def pieces(self, rounds):
        """{piece: [seconds per round]} of forward+backward of each aux piece on one clip of the
        batch's length, the pieces alternating (timing.paired_times)."""
        T = self.batch["x0"].shape[1]
        x0_hat = torch.randn(1, T, self.batch["x0"].shape[2]).requires_grad_(True)
        mask_batch = {"loss_mask": torch.ones(1, T, dtype=torch.bool)}
        clip = self.aux.decode16(x0_hat.detach(), mask_batch, [0])[0].detach()  # (N,) at 16 kHz
        ref = self.batch["speaker"][:1]

        def decode():
            self.aux.decode16(x0_hat, mask_batch, [0])[0].square().mean().backward()

        def decode_nograd():
            with torch.no_grad():
                self.aux.decode16(x0_hat, mask_batch, [0])

        def dnsmos():
            wav = clip.clone().requires_grad_(True)
            (-self.aux.dnsmos(wav, max_windows=1)["ovr"].mean()).backward()  # as AuxLosses scores it

        def speaker():
            wav = clip.clone().requires_grad_(True)
            losses.speaker_cosine_loss(self.aux.speaker.embed([wav], differentiable=True), ref).backward()

        fns = {"codec decode fwd+bwd (GL)": decode, "codec decode fwd only": decode_nograd,
               "DNSMOS OVR fwd+bwd": dnsmos, "speaker embed fwd+bwd": speaker}
        return timing.paired_times(fns, rounds), clip.shape[0] / 16000


def gate_fraction(cfg, B, T, draws=200_000):
    """(p, q): P(σ < aux_sigma_max) of one item, P(a micro-batch of B items fires), at T tokens."""
    sigma = losses.sample_sigma(draws, T, mode="shifted_logit_normal", generator=torch.Generator().manual_seed(0))
    p = (sigma < cfg.aux_sigma_max).float().mean().item()
    return p, 1 - (1 - p) ** B


def rss_child(args, variant):
    """Peak RSS growth (bytes) of one warm step of `variant`, in a fresh interpreter."""
    return peak_rss.rss_child(__file__, variant, [f"--{k}={getattr(args, k)}" for k in ("tokens", "batch", "threads")])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=100, help="target latent tokens per item (25 per second)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rss-of", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bench = Bench(args)

    if args.rss_of:  # child: one warm step, reset the high-water mark, one more
        peak_rss.print_step_growth(lambda: bench.step(args.rss_of))
        return

    cfg = bench.cfg
    steps = 2 if args.quick else args.steps
    n_adaln = sum(p.numel() for p in bench.params)
    print(f"config: tiny DiT (frozen, {cfg.param_dtype} params, {cfg.dtype} autocast), AdaLN {n_adaln:,} fp32 params "
          f"on {cfg.speaker_extractors} ({bench.aux.speaker.dim}-d); B={args.batch} T={args.tokens} "
          f"({args.tokens / 25:.1f} s) text={cfg.max_text_len}; aux {cfg.aux_losses}, aux_clips={cfg.aux_clips}, "
          f"aux_sigma_max={cfg.aux_sigma_max}, codec {cfg.codec} (Griffin-Lim {cfg.griffin_lim_iters} iters); "
          f"torch {torch.__version__}, torch.set_num_threads({args.threads})")
    load0, t_start = timing.load(), time.perf_counter()
    times = timing.paired_times({v: (lambda v=v: bench.step(v)) for v in VARIANTS}, steps)
    assert all(bench.fired), "the aux_fire variant decoded no clip: the benchmark measured nothing"
    rounds = 2 if args.quick else 3
    pieces, clip_s = bench.pieces(rounds)
    load1 = timing.load()
    wall = time.perf_counter() - t_start
    rss = {v: None for v in VARIANTS} if args.quick else {v: rss_child(args, v) for v in VARIANTS}
    p, q = gate_fraction(cfg, args.batch, args.tokens)
    p_tiny, q_tiny = gate_fraction(dataclasses.replace(cfg, aux_sigma_max=0.01), args.batch, args.tokens)

    print(f"\n{'variant':10s} {'peak RSS growth':>16s}  step time")
    for v in VARIANTS:
        mem = "-" if rss[v] is None else f"{rss[v] / 2**20:.1f} MiB"
        print(f"{v:10s} {mem:>16s}  " + timing.describe("ms", times[v], scale=1e3, fmt=".1f"))
    per_round = timing.ratios(times["aux_fire"], times["aux_off"])
    fire = timing.spread(per_round)[0]
    amort = 1 + q * (fire - 1)
    print("\n" + timing.describe("ratio per step when an aux clip fires (target <= 1.5)", per_round))
    print(f"gate: P(σ < {cfg.aux_sigma_max}) = {p:.3f} per item at {args.tokens} tokens -> a micro-batch of "
          f"{args.batch} fires with q = {q:.3f}; amortised ratio = 1 + q·(fire − 1) = {amort:.2f}x")
    print(f"(tiny pipeline's aux_sigma_max = 0.01: p = {p_tiny:.4f}, q = {q_tiny:.4f}, amortised "
          f"{1 + q_tiny * (fire - 1):.2f}x)")
    aux_extra = timing.spread(times["aux_fire"])[0] - timing.spread(times["aux_off"])[0]
    print(f"\naux pieces, one {clip_s:.2f} s clip at 16 kHz (DNSMOS repeats it to >= 9.01 s and scores one "
          f"9.01 s window, as AuxLosses does); share of the extra {aux_extra * 1e3:.0f} ms/step:")
    for name, t in pieces.items():
        share = 100 * timing.spread(t)[0] / aux_extra
        print(f"  {name:28s} " + timing.describe("ms", t, scale=1e3, fmt=".1f") + f"  {share:.1f}%")
    print(timing.load_line(load0, load1, args.threads) + f"; {steps} paired rounds after 1 warm-up each, "
          f"timing wall {wall:.0f} s")


if __name__ == "__main__":
    main()
