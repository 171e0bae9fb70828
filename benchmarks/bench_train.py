"""Stage-1 training step costs: fp32 master-weight offload, and LoRA vs the frozen base.

    python benchmarks/bench_train.py            # D=512 (8x64), 8 layers, B=4, T=250, LoRA r64 on laionbox, bf16
    python benchmarks/bench_train.py --quick    # 3 timed steps, no RSS subprocesses

(a) One full optimizer step of the LoRA-injected model with bf16 LoRA weights, two ways on the same
model, batch, σ and noise: "bf16 AdamW" (the optimizer steps the bf16 params: the bf16 freeze) and
"fp32 masters" (train.MasterWeights with offload=True: grads cast up into CPU fp32 masters, AdamW on
the masters, results copied back in place). Ratio masters/bf16 against the ≤ 1.05 target. On this
CPU "offload" is a CPU→CPU dtype cast; on CUDA it is a host↔device copy over pinned memory, which
this measurement cannot show.
(b) Forward+backward (no optimizer) of the LoRA-injected model vs the same weights without any
adapter. The frozen base has nothing to differentiate, so its backward is taken to the input
latents (x0 requires grad): activation gradients through every block, no weight gradients; the
LoRA model's backward computes those activation gradients plus the LoRA A/B gradients.

Times: every variant once per round, the order flipping every round (timing.py); each ratio is
the median of per-round ratios, with its spread and the load average before and after. Memory:
peak RSS growth (VmHWM − VmRSS, reset through /proc/self/clear_refs) of one warm step, each variant
in a fresh subprocess with glibc set to unmap freed blocks (peak_rss.py); plus exact bytes of the
optimizer-side tensors (masters, Adam moments).
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import files  # noqa: E402
import peak_rss  # noqa: E402
import timing  # noqa: E402
import lora  # noqa: E402
import model as model_lib  # noqa: E402
import text as text_lib  # noqa: E402
import train  # noqa: E402
from config import Config  # noqa: E402

VARIANTS = ("bf16_adamw", "fp32_masters", "base_fwd_bwd", "lora_fwd_bwd")


def synthetic_batch(B, T, text_len, text_dim, latent_dim=128, seed=0):
    """A train.py micro-batch (data.pad_examples keys) of random targets, no reference, no speaker."""
    g = torch.Generator().manual_seed(seed)
    examples = [{"target": torch.randn(T, latent_dim, generator=g), "ref": None,
                 "text": torch.randn(text_len, text_dim, generator=g), "speaker": None,
                 "id": f"synthetic{b}", "mode": "uncond", "source": "synthetic"} for b in range(B)]
    return data.pad_examples(examples, ref_offset_s=0.5, tokens_per_second=25, max_text_len=text_len)


def build_parts(cfg, args, with_lora):
    """train.build's stage-1 assembly at a benchmark-sized DiT (train.build only knows the presets):
    frozen DiT + a 2-layer text connector of the DiT's width (the 2.3 block modulates the text with
    a D-wide table, so text width = D) in param_dtype, LoRA injected after seeding as train.build."""
    param_dtype = files.DTYPES[cfg.param_dtype]
    torch.manual_seed(cfg.seed)
    dit_cfg = model_lib.DiTConfig(num_layers=args.layers, heads=args.dim // 64, head_dim=64,
                                  cross_attention_dim=args.dim)
    dit = model_lib.AudioDiT(dit_cfg)
    connector = text_lib.TextConnector(**dict(text_lib.CONNECTOR_PRESETS["tiny"], heads=args.dim // 64))
    dit.requires_grad_(False)
    connector.requires_grad_(False)
    if with_lora:
        torch.manual_seed(cfg.seed)
        lora.inject_lora(dit, cfg.lora_targets, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    dit.to(dtype=param_dtype)
    connector.to(dtype=param_dtype)
    trainable = [(n, p) for n, p in dit.named_parameters() if p.requires_grad]
    for _, p in trainable:
        p.data = p.data.to(param_dtype)
    return {"dit": dit, "connector": connector, "adaln": None, "trainable": trainable}


class Bench:
    """Models, optimizers and one closure per variant."""

    def __init__(self, args):
        self.cfg = Config(stage="lora", model="tiny", param_dtype="bf16", dtype="bf16", lora_targets=["laionbox"],
                          lora_rank=args.rank, lora_alpha=float(args.rank), lr=4e-5, max_text_len=args.text_len)
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        self.batch = synthetic_batch(args.batch, args.tokens, args.text_len, args.dim)
        self.lora_parts = build_parts(self.cfg, args, with_lora=True)
        self.base_parts = build_parts(self.cfg, args, with_lora=False)
        self.params = [p for _, p in self.lora_parts["trainable"]]
        self.masters = train.MasterWeights(self.params, offload=True)
        self.opt = {"bf16_adamw": torch.optim.AdamW(self.params, lr=self.cfg.lr),
                    "fp32_masters": torch.optim.AdamW(self.masters.masters, lr=self.cfg.lr)}
        self.copy_s = []  # seconds of grads_to_masters + masters_to_params per fp32_masters step
        self.opt_s = {"bf16_adamw": [], "fp32_masters": []}  # seconds of clip + AdamW step

    def loss(self, parts, batch):
        gen = train.micro_generator(self.cfg, 0, 0)  # the same σ and noise every step
        return train.micro_loss(self.cfg, parts, batch, gen, self.autocast, None)[0]

    def step(self, variant):
        if variant in ("bf16_adamw", "fp32_masters"):
            self.loss(self.lora_parts, self.batch).backward()
            opt_params = self.params
            if variant == "fp32_masters":
                t0 = time.perf_counter()
                self.masters.grads_to_masters()
                copy = time.perf_counter() - t0
                opt_params = self.masters.masters
            t0 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(opt_params, self.cfg.grad_clip)
            self.opt[variant].step()
            self.opt_s[variant].append(time.perf_counter() - t0)
            self.opt[variant].zero_grad(set_to_none=True)
            for p in self.params:
                p.grad = None
            if variant == "fp32_masters":
                t0 = time.perf_counter()
                self.masters.masters_to_params()
                self.copy_s.append(copy + time.perf_counter() - t0)
        elif variant == "lora_fwd_bwd":
            self.loss(self.lora_parts, self.batch).backward()
            for p in self.params:
                p.grad = None
        else:  # base: backward to the input latents only (nothing in the frozen base requires grad)
            batch = dict(self.batch, x0=self.batch["x0"].clone().requires_grad_(True))
            self.loss(self.base_parts, batch).backward()

    def optimizer_bytes(self, variant):
        """Bytes the variant keeps besides the model: fp32 masters (if any) and Adam moments."""
        tensors = [t for s in self.opt[variant].state.values() for t in s.values() if torch.is_tensor(t)]
        if variant == "fp32_masters":
            tensors += self.masters.masters
        return sum(t.numel() * t.element_size() for t in tensors)


def rss_child(args, variant):
    """Peak RSS growth (bytes) of one warm step of `variant`, in a fresh interpreter."""
    return peak_rss.rss_child(__file__, variant, [f"--{k}={getattr(args, k)}" for k in
                                                  ("layers", "dim", "rank", "tokens", "batch", "text_len", "threads")])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=250, help="target latent tokens per item (25 per second)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text_len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rss-of", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bench = Bench(args)

    if args.rss_of:  # child: two warm steps (optimizer state exists), reset the high-water mark, one more
        bench.step(args.rss_of)
        peak_rss.print_step_growth(lambda: bench.step(args.rss_of))
        return

    steps = 3 if args.quick else args.steps
    n_lora = sum(p.numel() for p in bench.params)
    n_base = sum(p.numel() for p in bench.base_parts["dit"].parameters())
    print(f"config: D={args.dim} ({args.dim // 64}x64) layers={args.layers} B={args.batch} T={args.tokens} "
          f"text={args.text_len}; LoRA r={args.rank} alpha={args.rank} on {bench.cfg.lora_targets} = {n_lora:,} "
          f"params (base DiT {n_base:,}); params bf16, bf16 autocast; torch {torch.__version__}, "
          f"torch.set_num_threads({args.threads})")
    for v in VARIANTS:  # warm-up (also creates the Adam state)
        bench.step(v)
    bench.copy_s.clear()
    for v in bench.opt_s:
        bench.opt_s[v].clear()
    load0, t_start = timing.load(), time.perf_counter()
    times = timing.paired_times({v: (lambda v=v: bench.step(v)) for v in VARIANTS}, steps, warmup=0)
    load1 = timing.load()
    wall = time.perf_counter() - t_start
    rss = {v: None for v in VARIANTS} if args.quick else {v: rss_child(args, v) for v in VARIANTS}

    print(f"\n{'variant':14s} {'peak RSS growth':>16s} {'optimizer-side':>15s}  step time")
    for v in VARIANTS:
        mem = "-" if rss[v] is None else f"{rss[v] / 2**20:.1f} MiB"
        opt = f"{bench.optimizer_bytes(v) / 2**20:.1f} MiB" if v in bench.opt else "-"
        print(f"{v:14s} {mem:>16s} {opt:>15s}  " + timing.describe("ms", times[v], scale=1e3, fmt=".1f"))
    bf16 = timing.spread(times["bf16_adamw"])[0]
    copy = timing.spread(bench.copy_s)[0]
    print("\n(a) " + timing.describe("fp32 masters / bf16 AdamW step time (target <= 1.05)",
                                     timing.ratios(times["fp32_masters"], times["bf16_adamw"])))
    print(f"    of which grads_to_masters + masters_to_params: {copy * 1e3:.1f} ms = {100 * copy / bf16:.1f}% of a "
          f"step; clip + AdamW step: {timing.spread(bench.opt_s['fp32_masters'])[0] * 1e3:.1f} ms on fp32 masters "
          f"vs {timing.spread(bench.opt_s['bf16_adamw'])[0] * 1e3:.1f} ms on bf16 params")
    print("(b) " + timing.describe("LoRA fwd+bwd / frozen base fwd+bwd (to the input)",
                                   timing.ratios(times["lora_fwd_bwd"], times["base_fwd_bwd"])))
    print(timing.load_line(load0, load1, args.threads) + f"; {steps} paired rounds after 1 warm-up each, "
          f"timing wall {wall:.0f} s" + ("" if args.quick else "; RSS: one warm step per variant in a fresh subprocess"))


if __name__ == "__main__":
    main()
