"""Training entry point: one file, one loop, three stages.

    python train.py configs/tiny_base.yaml             # CPU, one process
    ./run.sh --gpus 8 configs/run7.yaml                 # torchrun, hand-written DDP over NCCL

`stage` picks what trains:
  base   the whole DiT + text connector from scratch (the tiny CPU preset's stand-in for LTX-2.3)
  lora   stage 1: LoRA adapters on a frozen DiT (LAIONBox run 7)
  adaln  stage 2: a fresh SpeakerAdaLNZero on the frozen merged DiT, flow + ReFL losses (run 8)

Distributed by hand (STYLE.md §6): trainable params are broadcast from rank 0 at start; after the
last micro-step their gradients are averaged with all-reduce in flat fp32 buckets; nothing else is
shared. Each micro-batch draws its σ and noise from a generator seeded by (seed, step, global
micro-batch index), so 1 process × 2 micro-steps and 2 processes × 1 micro-step see the same data,
noise and σ.
"""

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import adaln as adaln_lib
import codec as codec_lib
import data
import lora
import losses
import model as model_lib
import speaker as speaker_lib
import text as text_lib
from config import config_dict, format_config, load_config

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


# -----------------------------------------------------------------------------------------------
# distributed, by hand


def setup_distributed(cfg):
    """(rank, world, device) from torchrun's environment; NCCL on GPU, gloo on CPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return rank, world, device


def broadcast_params(params, world):
    """Every rank starts from rank 0's trainable weights."""
    if world > 1:
        for p in params:
            dist.broadcast(p.data, src=0)


def allreduce_grads(params, world, bucket_numel=1 << 24):
    """Average the gradients of `params` over ranks in flat fp32 buckets (one all-reduce each)."""
    if world == 1:
        return
    bucket, numel = [], 0
    for p in params + [None]:
        if p is not None:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            bucket.append(p)
            numel += p.numel()
        if bucket and (p is None or numel >= bucket_numel):
            flat = torch.cat([q.grad.reshape(-1).float() for q in bucket])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for q in bucket:
                q.grad.copy_(flat[offset : offset + q.numel()].view_as(q.grad))
                offset += q.numel()
            bucket, numel = [], 0


# -----------------------------------------------------------------------------------------------
# fp32 master weights: the fix for the bf16 freeze (SPEC §6)


class MasterWeights:
    """fp32 copies of low-precision trainable params, optionally offloaded to (pinned) CPU memory.

    bf16 has 8 mantissa bits: near 0.01 its spacing is 6.1e-5, so Adam steps of ~1e-5 applied to
    bf16 weights round to nothing and training silently stops. The optimizer steps these masters
    instead; results are copied back (rounded) into the model's params after every step.
    """

    def __init__(self, params, offload=True):
        self.params = params
        pin = offload and torch.cuda.is_available() and params[0].is_cuda
        self.masters = []
        for p in params:
            m = p.detach().to("cpu" if offload else p.device, torch.float32, copy=True)
            self.masters.append((m.pin_memory() if pin else m).requires_grad_(True))

    def grads_to_masters(self):
        for p, m in zip(self.params, self.masters):
            m.grad = None if p.grad is None else p.grad.detach().to(m.device, torch.float32, non_blocking=True)
        if self.params[0].is_cuda:
            torch.cuda.synchronize()

    @torch.no_grad()
    def masters_to_params(self):
        for p, m in zip(self.params, self.masters):
            p.copy_(m, non_blocking=True)


def weight_change(named_params, init):
    """Per tensor group: a short hash and the % of elements changed since `init` (the freeze alarm)."""
    groups = {}
    for name, p in named_params:
        group = name.split(".")[-2] if "lora" in name else name.split(".")[0]
        changed = (p.detach().float().cpu() != init[name]).sum().item()
        g = groups.setdefault(group, [0, 0, hashlib.sha1()])
        g[0] += changed
        g[1] += p.numel()
        g[2].update(p.detach().float().cpu().numpy().tobytes())
    return {k: {"hash": h.hexdigest()[:10], "changed_pct": round(100.0 * c / n, 3)} for k, (c, n, h) in groups.items()}


# -----------------------------------------------------------------------------------------------
# model assembly per stage


def build(cfg, device, example):
    """DiT (+ LoRA or SpeakerAdaLNZero) and text connector for `cfg.stage`; returns a dict of parts."""
    param_dtype = DTYPES[cfg.param_dtype]
    latent_dim, text_dim = example["x0"].shape[-1], example["text"].shape[-1]
    if cfg.ckpt:
        dit = model_lib.load_dit(cfg.ckpt, device="cpu", dtype=torch.float32)
    else:
        torch.manual_seed(cfg.seed)
        dit_cfg = model_lib.PRESETS[cfg.model]
        dit = model_lib.AudioDiT(dataclasses.replace(dit_cfg, in_channels=latent_dim, cross_attention_dim=text_dim))
    dit.grad_checkpointing = cfg.grad_checkpointing
    connector = text_lib.build_text_connector(cfg.model, ckpt=cfg.text_ckpt or cfg.ckpt, dim=text_dim,
                                              register_layout=cfg.register_layout, seed=cfg.seed)
    parts = {"dit": dit, "connector": connector, "adaln": None}
    if cfg.stage == "base":
        trainable = list(dit.named_parameters()) + [("connector." + n, p) for n, p in connector.named_parameters()]
    else:
        dit.requires_grad_(False)
        connector.requires_grad_(False)
        if cfg.stage == "lora":
            torch.manual_seed(cfg.seed)
            lora.inject_lora(dit, cfg.lora_targets, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
            trainable = [(n, p) for n, p in dit.named_parameters() if p.requires_grad]
        elif cfg.stage == "adaln":
            torch.manual_seed(cfg.seed)
            # dropout=0 here: micro_loss drops speakers with the micro-batch's own generator
            parts["adaln"] = adaln_lib.SpeakerAdaLNZero(
                example["speaker"].shape[-1], num_blocks=dit.cfg.num_layers, dim=dit.cfg.dim,
                rows=dit.cfg.ada_rows, hidden=cfg.adaln_hidden)
            trainable = [("adaln." + n, p) for n, p in parts["adaln"].named_parameters()]
        else:
            raise ValueError(f"config key 'stage': unknown stage {cfg.stage!r} (base | lora | adaln)")
    # the frozen base is stored in param_dtype; stage-2 AdaLN stays fp32 (SPEC §6)
    dit.to(device, param_dtype)
    connector.to(device, param_dtype)
    if parts["adaln"] is not None:
        parts["adaln"].to(device, torch.float32)
    if cfg.stage == "lora":
        for _, p in trainable:  # LoRA weights live in the base dtype; masters keep them exact
            p.data = p.data.to(param_dtype)
    parts["trainable"] = trainable
    return parts


# -----------------------------------------------------------------------------------------------
# the loss of one micro-batch


def micro_generator(cfg, step, micro_index):
    """σ/noise RNG of one micro-batch: a function of (seed, step, global micro index) only."""
    return torch.Generator().manual_seed(hash((cfg.seed, step, micro_index)) % (2**63))


def noised_inputs(batch, gen, cfg):
    """x_t, σ per sample, per-token timesteps (0 on reference tokens) and the noise."""
    x0 = batch["x0"]  # (B, T, F)
    B = x0.shape[0]
    n_tokens = int(batch["loss_mask"].sum(1).float().mean().item())
    sigma = losses.sample_sigma(B, n_tokens, mode=cfg.sigma_sampler, generator=gen, fixed_value=cfg.sigma_fixed)
    noise = torch.randn(x0.shape, generator=gen)
    sigma, noise = sigma.to(x0.device), noise.to(x0.device)
    frozen = batch["ref_mask"]  # (B, T) reference tokens keep σ = 0
    timesteps = torch.where(frozen, torch.zeros_like(x0[..., 0]), sigma[:, None].expand(B, x0.shape[1]))
    x_t = (1 - timesteps[..., None]) * x0 + timesteps[..., None] * noise
    return x_t, sigma, timesteps, noise


def predict(parts, batch, x_t, sigma, timesteps, autocast, keep_speaker=None):
    """One DiT forward on a batch: text through the connector, speaker features through AdaLN."""
    with autocast:
        context = parts["connector"](batch["text"], batch["text_mask"])
        deltas = None
        if parts["adaln"] is not None:
            keep = batch["speaker_present"] if keep_speaker is None else batch["speaker_present"] & keep_speaker
            deltas = parts["adaln"](batch["speaker"], keep=keep)
        v = parts["dit"](x_t, sigma, context, timesteps=timesteps, positions=batch["positions"],
                         attn_mask=batch["attn_mask"], block_deltas=deltas)
    return v.float()


def micro_loss(cfg, parts, batch, gen, autocast, aux):
    """Flow loss (+ ReFL auxiliary losses in stage 2) of one micro-batch; returns (loss, logs)."""
    x_t, sigma, timesteps, noise = noised_inputs(batch, gen, cfg)
    keep = None
    if parts["adaln"] is not None:  # speaker-feature dropout keeps unconditioned generation good
        keep = (torch.rand(sigma.shape[0], generator=gen) >= cfg.speaker_dropout).to(sigma.device)
    v_pred = predict(parts, batch, x_t, sigma, timesteps, autocast, keep_speaker=keep)
    per_sample = losses.flow_loss(v_pred, batch["x0"], noise, batch["loss_mask"])
    flow = per_sample.mean()
    logs = {"flow": flow.detach(), "per_sample": per_sample.detach(), "sigma": sigma.detach()}
    if aux is None:
        return flow, logs
    aux_values = aux.losses(batch, x_t, v_pred, sigma)
    total, coefs = aux.coefs.combine(flow, aux_values)
    logs.update({f"aux_{k}": v.detach() for k, v in aux_values.items()})
    logs.update({f"coef_{k}": torch.tensor(float(c)) for k, c in coefs.items()})
    return total, logs


class AuxLosses:
    """Stage-2 ReFL losses: one-step x0̂ = x_t − σ·v̂ decoded through the frozen codec and scored.

    Gated to σ < aux_sigma_max and clips ≤ aux_max_seconds; at most `aux_clips` clips per
    micro-batch are decoded (decoder and scorers gradient-checkpointed) to bound the cost.
    """

    def __init__(self, cfg, device):
        self.cfg = cfg
        self.codec = codec_lib.build_codec(cfg.codec, cfg.codec_ckpt, **codec_lib.codec_kwargs(cfg)).to(device).eval()
        self.codec.requires_grad_(False)
        self.codec.grad_checkpointing = True
        self.speaker = speaker_lib.build_speaker_extractors(cfg.speaker_extractors, cfg.speaker_paths, device)
        self.dnsmos = None
        if "dnsmos" in cfg.aux_losses:
            import dnsmos

            self.dnsmos = dnsmos.DNSMOS().to(device).eval().requires_grad_(False)
        self.coefs = losses.AdaptiveCoefficients(
            {k: r for k, r in cfg.aux_ratios.items() if k in cfg.aux_losses}, cap=cfg.aux_cap, decay=cfg.aux_decay)

    def decode16(self, x0_hat, batch, idx):
        """Target tokens of items `idx` decoded to mono 16 kHz clips (a list of (N,) tensors)."""
        clips = []
        for i in idx:
            tokens = x0_hat[i][batch["loss_mask"][i]][None]  # (1, T_target, F): no reference, no padding
            wav = self.codec.decode(tokens.float()).mean(1)  # (1, N) mono at the codec's rate
            clips.append(codec_lib.resample(wav, self.codec.output_rate, 16000)[0])
        return clips

    def losses(self, batch, x_t, v_pred, sigma):
        """{name: loss} on at most aux_clips gated clips of the micro-batch ({} when none qualifies)."""
        cfg = self.cfg
        x0_hat = x_t - sigma[:, None, None] * v_pred  # (B, T, F) one-step estimate
        n_target = batch["loss_mask"].sum(1)
        ok = (sigma < cfg.aux_sigma_max) & (n_target <= cfg.aux_max_seconds * self.codec.tokens_per_second)
        ok &= batch["speaker_present"]
        idx = ok.nonzero().flatten()[: cfg.aux_clips].tolist()
        if not idx:
            return {}
        clips = self.decode16(x0_hat, batch, idx)
        out = {}
        if "speaker" in cfg.aux_losses:
            emb = self.speaker.embed(clips, differentiable=True)  # (b, dim)
            out["speaker"] = losses.speaker_cosine_loss(emb, batch["speaker"][idx])
        if self.dnsmos is not None:  # one 9.01 s window per clip, recomputed in backward (memory)
            ovr = [checkpoint(lambda c: self.dnsmos(c, max_windows=1)["ovr"], c, use_reentrant=False) for c in clips]
            out["dnsmos"] = -torch.cat(ovr).mean()
        return out

    @torch.no_grad()
    def speaker_similarity(self, batch, x_t, v_pred, sigma):
        """Per item with a reference: cosine between the speaker features of its decoded one-step
        x0̂ and the reference's cached features (validation's speaker-similarity proxy)."""
        x0_hat = x_t - sigma[:, None, None] * v_pred
        idx = batch["speaker_present"].nonzero().flatten().tolist()
        if not idx:
            return []
        emb = self.speaker.embed(self.decode16(x0_hat, batch, idx))
        return F.cosine_similarity(emb, batch["speaker"][idx].float(), dim=-1).tolist()


# -----------------------------------------------------------------------------------------------
# checkpoints: plain dicts, written atomically


def git_hash():
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], stderr=subprocess.DEVNULL,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).decode().strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def atomic_save(obj, path):
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(trainable, masters):
    """Trainable weights by name, from the fp32 masters when they exist (never the frozen base)."""
    tensors = masters.masters if masters is not None else [p for _, p in trainable]
    return {n: t.detach().cpu().clone() for (n, _), t in zip(trainable, tensors)}


def export_weights(cfg, parts, trainable, masters, run_dir, tag=""):
    """The stage's deliverable: a DiT safetensors (base), a LoRA file (lora) or the AdaLN (adaln).

    tag "_best" writes the best-by-validation copy beside the final one (dit_best.safetensors, ...).
    """
    state = trainable_state(trainable, masters)
    if cfg.stage == "base":
        dit, connector = parts["dit"], parts["connector"]
        dit.load_state_dict({k: v for k, v in state.items() if not k.startswith("connector.")})
        connector.load_state_dict({k[len("connector."):]: v for k, v in state.items() if k.startswith("connector.")})
        path = os.path.join(run_dir, f"dit{tag}.safetensors")
        meta = json.loads(model_lib.metadata_from_dit_config(dit.cfg)["config"])
        meta["transformer"].update(text_lib.connector_metadata(connector))
        model_lib.save_dit(dit, path, metadata={"config": json.dumps(meta)},
                           extra=text_lib.connector_checkpoint_tensors(connector))
    elif cfg.stage == "lora":
        path = os.path.join(run_dir, f"lora{tag}.safetensors")
        lora.save_lora(parts["dit"], path, base_model_id=cfg.ckpt or cfg.model, state=state)
    else:
        path = os.path.join(run_dir, f"adaln{tag}.pt")
        atomic_save({"state_dict": {k[len("adaln."):]: v for k, v in state.items()}, "config": config_dict(cfg),
                     "speaker_extractors": cfg.speaker_extractors}, path)
    return path


# -----------------------------------------------------------------------------------------------


def lr_at(cfg, step):
    """Linear warmup then cosine decay to lr·min_lr_ratio."""
    warmup = max(1, int(cfg.warmup_frac * cfg.max_steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.max_steps - warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def validate(cfg, parts, val_set, device, autocast, aux=None):
    """Held-out metrics at fixed σ and noise (comparable across evaluations): `val_loss`, the mean
    flow loss at σ spread over [0.1, 0.9]; with stage-2 auxiliary models also `val_spk_sim`, the
    speaker similarity of one-step x0̂ at σ = val_spk_sigma to each item's reference."""
    if val_set is None:
        return {}
    total, count, sims = 0.0, 0, []
    gen = torch.Generator().manual_seed(cfg.seed + 12345)
    for batch in data.iterate_batches(val_set, cfg.micro_batch):
        batch = data.to_device(batch, device)
        x0 = batch["x0"]
        B = x0.shape[0]
        noise = torch.randn(x0.shape, generator=gen).to(device)

        def forward(sigma):
            sigma = sigma.to(device)
            timesteps = torch.where(batch["ref_mask"], torch.zeros_like(x0[..., 0]), sigma[:, None].expand_as(x0[..., 0]))
            x_t = (1 - timesteps[..., None]) * x0 + timesteps[..., None] * noise
            return x_t, predict(parts, batch, x_t, sigma, timesteps, autocast), sigma

        x_t, v, sigma = forward(torch.linspace(0.1, 0.9, B) if B > 1 else torch.tensor([0.5]))
        total += losses.flow_loss(v, x0, noise, batch["loss_mask"]).sum().item()
        count += B
        if aux is not None:
            sims += aux.speaker_similarity(batch, *forward(torch.full((B,), cfg.val_spk_sigma)))
    out = {"val_loss": total / max(count, 1)}
    if sims:
        out["val_spk_sim"] = sum(sims) / len(sims)
    return out


def main(argv=None):
    cfg = load_config(argv)
    rank, world, device = setup_distributed(cfg)
    master = rank == 0
    assert cfg.global_batch % (cfg.micro_batch * world) == 0, (
        f"global_batch {cfg.global_batch} must be a multiple of micro_batch {cfg.micro_batch} × world {world}")
    grad_accum = cfg.global_batch // (cfg.micro_batch * world)
    run_dir = os.path.join(cfg.out_dir, cfg.name)
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    if master:
        os.makedirs(run_dir, exist_ok=True)
        header = {"command": " ".join(sys.argv), "git": git_hash(), "torch": torch.__version__,
                  "world": world, "grad_accum": grad_accum, "device": str(device)}
        print(json.dumps(header))
        print(format_config(cfg))
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump({**header, "config": config_dict(cfg)}, f, indent=1)

    train_set = data.load_cached(cfg, cfg.manifest, split="train")
    val_set = data.load_cached(cfg, cfg.val_manifest, split="val") if cfg.val_manifest else None
    sampler = data.BatchSampler(train_set, cfg.global_batch, seed=cfg.seed, source_weights=cfg.sources)
    parts = build(cfg, device, data.collate(train_set, [0], cfg, epoch=0))
    trainable = parts["trainable"]
    params = [p for _, p in trainable]
    if master:
        if cfg.stage == "lora":
            print(lora.lora_table(parts["dit"]))
        print(f"stage {cfg.stage}: {sum(p.numel() for p in params):,} trainable parameters")
    broadcast_params(params, world)
    low_precision = params[0].dtype != torch.float32
    masters = MasterWeights(params, offload=cfg.offload_masters) if low_precision and cfg.master_weights else None
    opt_params = masters.masters if masters is not None else params
    optimizer = torch.optim.AdamW(opt_params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    aux = AuxLosses(cfg, device) if cfg.stage == "adaln" and cfg.aux_losses else None
    if cfg.best_by not in ("val_loss", "val_spk_sim") or (cfg.best_by == "val_spk_sim" and aux is None):
        raise ValueError(f"config key 'best_by': {cfg.best_by!r} needs to be val_loss, or val_spk_sim in stage "
                         "adaln with aux_losses (its speaker models compute the similarity)")
    autocast = (torch.autocast(device.type, dtype=DTYPES[cfg.dtype]) if cfg.dtype != "fp32" else contextlib.nullcontext())
    step, best_val = 0, float("inf")
    if cfg.resume and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        state = ckpt["trainable"]
        with torch.no_grad():
            for (name, p), t in zip(trainable, opt_params):
                t.copy_(state[name])
        if masters is not None:
            masters.masters_to_params()
        optimizer.load_state_dict(ckpt["optimizer"])
        sampler.load_state_dict(ckpt["data"])
        if aux is not None:
            aux.coefs.load_state_dict(ckpt["aux"])
        set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        step, best_val = ckpt["step"], ckpt["best_val"]
        if master:
            print(f"resumed from {ckpt_path} at step {step}")
    init = {n: p.detach().float().cpu().clone() for n, p in trainable} if master else None

    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    metrics = open(os.path.join(run_dir, "metrics.jsonl"), "a") if master else None

    def save(step):
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if master:
            atomic_save({"step": step, "config": config_dict(cfg), "trainable": trainable_state(trainable, masters),
                         "optimizer": optimizer.state_dict(), "data": sampler.state_dict(), "rng": rngs,
                         "aux": aux.coefs.state_dict() if aux is not None else None, "best_val": best_val,
                         "git": git_hash()}, ckpt_path)

    while step < cfg.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = sampler.next_batch()  # the same global batch on every rank
        logs_all, n_tokens = [], 0
        for m, micro in enumerate(data.micro_batches(indices, cfg.micro_batch, rank, world)):
            g = rank * grad_accum + m  # global micro-batch index: seeds this micro-batch's σ and noise
            batch = data.collate(train_set, micro, cfg, epoch=sampler.epoch, step=step)
            batch = data.to_device(batch, device)
            loss, logs = micro_loss(cfg, parts, batch, micro_generator(cfg, step, g), autocast, aux)
            (loss / grad_accum).backward()
            logs_all.append(logs)
            n_tokens += int(batch["loss_mask"].sum())
        allreduce_grads(params, world)
        if masters is not None:
            masters.grads_to_masters()
        grad_norm = torch.nn.utils.clip_grad_norm_(opt_params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for p in params:
            p.grad = None
        if masters is not None:
            masters.masters_to_params()
        step += 1
        if master and (step % cfg.log_every == 0 or step == cfg.max_steps):
            log_step(cfg, step, lr, grad_norm, logs_all, n_tokens * world, t0, device, metrics)
        stopping = stop["flag"] or os.path.exists(os.path.join(run_dir, "STOP"))
        if world > 1:
            flag = torch.tensor([float(stopping)], device=device)
            dist.all_reduce(flag)
            stopping = flag.item() > 0
        if step % cfg.val_every == 0 or step == cfg.max_steps:
            val = validate(cfg, parts, val_set, device, autocast, aux) if master else {}
            if val:
                record = {"step": step, **{k: round(v, 6) for k, v in val.items()}}
                score = -val["val_spk_sim"] if cfg.best_by == "val_spk_sim" else val["val_loss"]
                if score < best_val:
                    best_val = score
                    record["best"] = True
                    record["best_path"] = export_weights(cfg, parts, trainable, masters, run_dir, tag="_best")
                record["weights"] = weight_change(trainable if masters is None else
                                                  list(zip([n for n, _ in trainable], masters.masters)), init)
                print(json.dumps(record))
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps or stopping:
            save(step)
        if stopping:
            if master:
                with contextlib.suppress(FileNotFoundError):  # honoured: a resumed run must not stop again
                    os.remove(os.path.join(run_dir, "STOP"))
                print(f"stopped at step {step} (STOP file or SIGTERM); resume with --resume=true")
            break
    if master and step == cfg.max_steps:
        path = export_weights(cfg, parts, trainable, masters, run_dir)
        print(f"done: {step} steps; weights in {path}" + (f" (best by {cfg.best_by}: *_best)" if val_set else ""))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def log_step(cfg, step, lr, grad_norm, logs_all, tokens, t0, device, metrics):
    """One line per step to stdout and metrics.jsonl; flow loss also per σ bucket."""
    flow = torch.stack([l["flow"] for l in logs_all]).mean().item()
    per_sample = torch.cat([l["per_sample"] for l in logs_all])
    sigma = torch.cat([l["sigma"].cpu() for l in logs_all])
    dt = time.perf_counter() - t0
    rec = {"step": step, "loss": round(flow, 6), "lr": lr, "grad_norm": round(float(grad_norm), 4),
           "step_ms": round(1000 * dt, 1), "tok/s": round(tokens / dt, 1)}
    for k in logs_all[0]:
        if k.startswith(("aux_", "coef_")):
            rec[k] = round(torch.stack([l[k] for l in logs_all if k in l]).float().mean().item(), 5)
    if device.type == "cuda":
        rec["mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    rec["sigma_buckets"] = losses.sigma_bucket_losses(per_sample.cpu(), sigma)
    print(" ".join(f"{k}:{v}" for k, v in rec.items() if k != "sigma_buckets"))
    metrics.write(json.dumps(rec) + "\n")
    metrics.flush()


if __name__ == "__main__":
    main()
