"""Training entry point: one file, one loop, three stages.

    python train.py configs/tiny_base.yaml             # CPU, one process
    ./run.sh --gpus 8 configs/run7.yaml                 # torchrun, hand-written DDP over NCCL

`stage` picks what trains:
  base   the whole DiT + text connector from scratch (the tiny CPU preset's stand-in for LTX-2.3)
  lora   stage 1: LoRA adapters on a frozen DiT (LAIONBox run 7)
  adaln  stage 2: a fresh SpeakerAdaLNZero on the frozen merged DiT, flow + ReFL losses (run 8)

Distributed by hand, visibly: trainable params are broadcast from rank 0 at start; after the
last micro-step their gradients are averaged with all-reduce in flat fp32 buckets; nothing else is
shared. Each micro-batch draws its σ and noise from a generator seeded by (seed, step, global
micro-batch index), so 1 process × 2 micro-steps and 2 processes × 1 micro-step see the same data,
noise and σ.
"""

import contextlib
import dataclasses
import glob
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import adaln as adaln_lib
import codec as codec_lib
import data
import files
import lora
import losses
import model as model_lib
import speaker as speaker_lib
import text as text_lib
from config import config_dict, format_config, load_config, run_cli

# -----------------------------------------------------------------------------------------------
# distributed, by hand


def setup_distributed(cfg):
    """(rank, world, device) from torchrun's environment; NCCL on GPU, gloo on CPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("config key 'device': cuda, but torch sees no CUDA GPU here (use --device=cpu or auto)")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
        dist.barrier()  # every rank has passed `preflight` before rank 0 writes into the run directory
    return rank, world, device


def preflight(cfg):
    """(run_dir, checkpoint path) once every check that needs no model has passed: the run directory
    (no run overwritten by accident, a checkpoint to resume), the data cache made with this config's
    settings, the av and best_by settings. Runs on every rank before any rank writes a file."""
    run_dir = os.path.join(cfg.out_dir, cfg.name)
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    check_run_dir(cfg, run_dir, ckpt_path)
    if cfg.av:
        check_av_config(cfg)
    else:
        for split, manifest in (("train", cfg.manifest), ("val", cfg.val_manifest)):
            if manifest:
                data.check_cache_settings(cfg, Path(cfg.cache_dir) / split)
    if cfg.best_by == "val_spk_sim" and not (cfg.stage == "adaln" and cfg.aux_losses):
        raise ValueError("config key 'best_by': val_spk_sim needs stage adaln with aux_losses (its speaker "
                         "models compute the similarity); use val_loss")
    return run_dir, ckpt_path


def grad_accum_steps(cfg, world):
    """Micro-steps per optimizer step: the global batch is the config, split over `world` processes."""
    if cfg.global_batch % (cfg.micro_batch * world):
        raise ValueError(f"config key 'global_batch': {cfg.global_batch} is not a multiple of micro_batch "
                         f"{cfg.micro_batch} x {world} processes")
    return cfg.global_batch // (cfg.micro_batch * world)


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
# fp32 master weights: the fix for the bf16 freeze (reproduced in tests/test_train_freeze.py)


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


def make_optimizer(cfg, params, lr_scales=None):
    """(fp32 masters or None, AdamW): with low-precision params and `master_weights` the optimizer
    steps fp32 copies of them; otherwise the params themselves. `lr_scales` (one per param, default 1)
    puts the params into one group per scale, each group's "lr_scale" times the schedule's rate."""
    low_precision = params[0].dtype != torch.float32
    masters = MasterWeights(params, offload=cfg.offload_masters) if low_precision and cfg.master_weights else None
    opt_params = masters.masters if masters is not None else params
    # One fused kernel over every tensor instead of torch's default loop of small ops per tensor: about a
    # quarter of the update's time, a 0.95x base step on a 2-core CPU (records/2026-11-30_fused_adamw.md).
    fused = all(p.device.type in ("cpu", "cuda") for p in opt_params)
    scales = lr_scales or [1.0] * len(opt_params)
    groups = [{"params": [p for p, s in zip(opt_params, scales) if s == scale], "lr_scale": scale}
              for scale in dict.fromkeys(scales)]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                                  fused=fused or None)
    return masters, optimizer


def optimizer_step(optimizer, params, masters, grad_clip, check=None):
    """One update from the accumulated (and all-reduced) gradients of `params`: gradients into the
    fp32 masters (when any), their global norm clipped to `grad_clip`, `check(grad_norm)` before
    anything changes (the NaN guard raises there), the AdamW step, every gradient cleared, and the
    updated masters rounded back into `params`. Returns the norm before clipping."""
    if masters is not None:
        masters.grads_to_masters()
    grad_norm = torch.nn.utils.clip_grad_norm_(masters.masters if masters is not None else params, grad_clip)
    if check is not None:
        check(grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for p in params:
        p.grad = None
    if masters is not None:
        masters.masters_to_params()
    return grad_norm


SNAPSHOT_ELEMENTS = 4096  # per tensor: enough to tell 0% from 0.1% changed, tiny next to the tensor


def snapshot_index(numel):
    """The flat element indices `weight_snapshot` keeps of a tensor: all of a small one, else a fixed
    random draw (a function of the size only, so the same on every rank and every run)."""
    if numel <= SNAPSHOT_ELEMENTS:
        return torch.arange(numel)
    return torch.randint(numel, (SNAPSHOT_ELEMENTS,), generator=torch.Generator().manual_seed(numel))


def sampled(t):
    """The snapshot elements of tensor `t`, as fp32 on the CPU: (≤ SNAPSHOT_ELEMENTS,)."""
    flat = t.detach().reshape(-1)
    return flat[snapshot_index(flat.numel()).to(flat.device)].float().cpu()


def weight_snapshot(named_params):
    """What the freeze alarm compares against: a few thousand elements per tensor, not a copy of
    every trainable weight (an fp32 copy of a 3.3B-parameter DiT would be 13 GB of host memory)."""
    return {name: sampled(p) for name, p in named_params}


def weight_change(named_params, init):
    """Per tensor group: a short hash of the weights and the % of snapshot elements changed since
    `init` (from `weight_snapshot`; a 0% group after many steps is the bf16 freeze)."""
    groups = {}
    for name, p in named_params:
        group = name.split(".")[-2] if "lora" in name else name.split(".")[0]
        now = sampled(p)
        g = groups.setdefault(group, [0, 0, hashlib.sha1()])
        g[0] += (now != init[name].reshape(-1).float()).sum().item()
        g[1] += now.numel()
        g[2].update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # raw bytes, no copy on CPU
    return {k: {"hash": h.hexdigest()[:10], "changed_pct": round(100.0 * c / n, 3)} for k, (c, n, h) in groups.items()}


# -----------------------------------------------------------------------------------------------
# model assembly per stage


def build(cfg, device, example, with_audio=True):
    """DiT (+ LoRA or SpeakerAdaLNZero) and text connector(s) for `cfg.stage`; returns a dict of parts.

    In `av` mode the DiT is the joint audio-video model and a video text connector joins the audio
    one; with_audio=False (a dataset without audio) creates no audio or cross-modal adapters.
    """
    param_dtype = files.DTYPES[cfg.param_dtype]
    latent_dim = example["audio_x0" if cfg.av else "x0"].shape[-1]
    text_dim = example["text"].shape[-1]
    if cfg.av and cfg.stage != "lora":
        raise ValueError(f"config key 'stage': av mode trains LoRA adapters (stage: lora), got {cfg.stage!r}")
    if cfg.ckpt:
        # straight into the storage dtype: an fp32 load then a cast holds both copies at once
        dit = model_lib.load_dit(cfg.ckpt, av=cfg.av, device="cpu", dtype=param_dtype)
    else:
        torch.manual_seed(cfg.seed)
        dit_cfg = dataclasses.replace(model_lib.PRESETS[cfg.model], in_channels=latent_dim, cross_attention_dim=text_dim,
                                      text_progress_theta=cfg.text_progress_theta)
        if cfg.av:
            if not dit_cfg.video:
                raise ValueError(f"config key 'model': av mode needs an audio-video preset (ltx23_av, tiny_av, "
                                 f"micro_av), got {cfg.model!r}")
            dit_cfg = dataclasses.replace(dit_cfg, video_in_channels=example["video_x0"].shape[-1],
                                          video_cross_attention_dim=example["video_text"].shape[-1])
        dit = model_lib.AudioDiT(dit_cfg)
    dit.grad_checkpointing = cfg.grad_checkpointing
    if cfg.compile:  # one graph per block, built at its first call (records/2026-11-29_compile_bench.md)
        for block in dit.transformer_blocks:
            block.compile()
    connector = text_lib.build_text_connector(cfg.model, ckpt=cfg.text_ckpt or cfg.ckpt, dim=text_dim,
                                              register_layout=cfg.register_layout, seed=cfg.seed, dtype=param_dtype)
    parts = {"dit": dit, "connector": connector, "adaln": None, "video_connector": None}
    if cfg.av:
        parts["video_connector"] = text_lib.build_text_connector(
            cfg.model, ckpt=cfg.text_ckpt or cfg.ckpt, dim=example["video_text"].shape[-1],
            register_layout=cfg.register_layout, seed=cfg.seed + 1, stream="video").requires_grad_(False)
    if cfg.stage == "base":
        if cfg.hold_text_gates:
            for block in dit.transformer_blocks:
                if block.audio_attn2.to_gate_logits is None:
                    raise ValueError(f"config key 'hold_text_gates': model {cfg.model!r} has no attention gates")
                block.audio_attn2.to_gate_logits.requires_grad_(False)
        trainable = [(n, p) for n, p in dit.named_parameters() if p.requires_grad]
        trainable += [("connector." + n, p) for n, p in connector.named_parameters()]
    else:
        dit.requires_grad_(False)
        connector.requires_grad_(False)
        if cfg.stage == "lora":
            torch.manual_seed(cfg.seed)
            lora.inject_lora(dit, cfg.lora_targets, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                             with_audio=with_audio, dtype=torch.float32)  # drawn in fp32, cast below
            trainable = [(n, p) for n, p in dit.named_parameters() if p.requires_grad]
            parts["audio_adapters"] = lora.audio_adapter_params(dit)
        elif cfg.stage == "adaln":
            trainable = []
        else:
            raise ValueError(f"config key 'stage': unknown stage {cfg.stage!r} (base | lora | adaln)")
        if cfg.stage == "adaln" or cfg.lora_speaker:
            parts["adaln"] = speaker_adaln(cfg, dit, example["speaker"].shape[-1])
            trainable += [("adaln." + n, p) for n, p in parts["adaln"].named_parameters()]
    # the frozen base is stored in param_dtype; stage-2 AdaLN stays fp32 (as LAIONBox trains it)
    dit.to(device, param_dtype)
    connector.to(device, param_dtype)
    if parts["video_connector"] is not None:
        parts["video_connector"].to(device, param_dtype)
    if parts["adaln"] is not None:
        parts["adaln"].to(device, torch.float32)
    if cfg.stage == "lora":
        for name, p in trainable:  # LoRA weights live in the base dtype; masters keep them exact
            if not name.startswith("adaln."):
                p.data = p.data.to(param_dtype)
    parts["trainable"] = trainable
    return parts


def speaker_adaln(cfg, dit, in_dim):
    """The SpeakerAdaLNZero of `dit`: zero heads, or the weights in `cfg.adaln_init`.

    A speaker-aware stage 1 (`lora_speaker`) trains it together with the LoRA, so that the LoRA
    learns to let the block modulation carry the voice; stage 2 then starts from it on the merged,
    frozen DiT. From zero heads on a backbone that never had a speaker input, AdaLN deltas alone
    move the spectrum toward the reference but not the voice (records/2026-11-29_speaker_path.md).
    """
    torch.manual_seed(cfg.seed)
    # dropout=0 here: micro_loss drops speakers with the micro-batch's own generator
    net = adaln_lib.SpeakerAdaLNZero(in_dim, num_blocks=dit.cfg.num_layers, dim=dit.cfg.dim, rows=dit.cfg.ada_rows,
                                     hidden=cfg.adaln_hidden)
    if cfg.adaln_init:
        state, _ = adaln_lib.read_adaln_file(cfg.adaln_init)
        want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        have = {k: tuple(v.shape) for k, v in state.items()}
        if have != want:
            bad = next(k for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k))
            raise ValueError(f"{cfg.adaln_init} (adaln_init): {bad} is {have.get(bad)}, this run needs "
                             f"{want.get(bad)} (speaker features {in_dim}-d, adaln_hidden {cfg.adaln_hidden}, "
                             f"{dit.cfg.num_layers} blocks)")
        net.load_state_dict(state)
    return net


# -----------------------------------------------------------------------------------------------
# the loss of one micro-batch


def micro_generator(cfg, step, micro_index):
    """σ/noise RNG of one micro-batch: a function of (seed, step, global micro index) only."""
    return torch.Generator().manual_seed(hash((cfg.seed, step, micro_index)) % (2**63))


def sigma_law(cfg):
    """The config's σ law as losses.sample_sigma keywords (audio and AV draws alike)."""
    return dict(mode=cfg.sigma_sampler, fixed_value=cfg.sigma_fixed, mu_offset=cfg.sigma_mu_offset)


def noised_inputs(batch, gen, cfg):
    """x_t, σ per sample, per-token timesteps (0 on reference tokens) and the noise."""
    x0 = batch["x0"]  # (B, T, F)
    B = x0.shape[0]
    n_tokens = int(batch["loss_mask"].sum(1).float().mean().item())
    sigma = losses.sample_sigma(B, n_tokens, generator=gen, **sigma_law(cfg))
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
                         attn_mask=batch["attn_mask"], block_deltas=deltas,
                         text_progress=batch.get("text_progress"), audio_progress=batch.get("audio_progress"))
    return v.float()


def check_text_progress(cfg, dit_cfg, train_set):
    """A progress rope (text_progress_theta) needs the byte text encoder, the official register layout
    (the progress of a text token is computed from its bytes, in place) and a cache that stores it; a
    checkpoint's own value rules."""
    if cfg.text_progress_theta and cfg.text_progress_theta != dit_cfg.text_progress_theta:
        raise ValueError(f"config key 'text_progress_theta' {cfg.text_progress_theta:g}: the checkpoint {cfg.ckpt} "
                         f"was trained with {dit_cfg.text_progress_theta:g} (set it only for a DiT built from scratch)")
    if dit_cfg.text_progress_theta and (cfg.text_encoder != "byte" or cfg.register_layout != "official"):
        raise ValueError(f"a DiT with text_progress_theta {dit_cfg.text_progress_theta:g} needs text_encoder 'byte' and "
                         f"register_layout 'official', got {cfg.text_encoder!r} / {cfg.register_layout!r}")
    if dit_cfg.text_progress_theta and not train_set.has_progress:
        raise ValueError(f"{train_set.cache_dir}: the cache holds no text progress, which this DiT's progress rope "
                         "needs (made by an older speakerbox or another text encoder): run `python data.py prepare`")


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
    total, coefs = aux.coefs.apply(flow, aux_values)
    logs.update({f"aux_{k}": v.detach() for k, v in aux_values.items() if torch.isfinite(v)})
    logs.update({f"coef_{k}": torch.tensor(float(c)) for k, c in coefs.items()})
    return total, logs


def micro_step(cfg, parts, batch, gen, autocast, scale, aux=None, balancer=None):
    """Forward and backward of one micro-batch, audio or audio-video: the gradients of its loss times
    `scale` (1/grad_accum) are added to the params' .grad; returns its logs. Both modes keep this
    contract (`audio_micro_step`, `av_micro_step`)."""
    if cfg.av:
        w_audio = balancer.weight if balancer is not None else cfg.audio_weight
        return av_micro_step(cfg, parts, batch, gen, autocast, w_audio, scale)
    return audio_micro_step(cfg, parts, batch, gen, autocast, aux, scale)


def audio_micro_step(cfg, parts, batch, gen, autocast, aux, scale):
    """Forward and backward of one audio micro-batch (`micro_loss` times `scale`); returns its logs."""
    loss, logs = micro_loss(cfg, parts, batch, gen, autocast, aux)
    (loss * scale).backward()
    return logs


def batch_tokens(cfg, batch):
    """Tokens a micro-batch trains on (for tok/s): target audio tokens, plus every video token in av mode."""
    if cfg.av:
        return int(batch["audio_mask"].sum()) + batch["video_x0"].shape[0] * batch["video_x0"].shape[1]
    return int(batch["loss_mask"].sum())


def global_mean(values, world, device):
    """Mean of a list of scalar tensors over this rank's micro-batches and all ranks (None if no
    rank has any). Every rank must call it, in the same order."""
    acc = torch.tensor([float(sum(float(v) for v in values)), float(len(values))], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(acc)
    return (acc[0] / acc[1]).item() if acc[1] > 0 else None


def update_loss_weights(aux, balancer, logs_all, world, device):
    """The stage-2 adaptive coefficients and the AV audio balancer see the step's losses averaged over
    all micro-batches of all ranks (collectives: every rank calls it)."""
    if aux is not None:
        flow = global_mean([l["flow"] for l in logs_all], world, device)
        means = {k: global_mean([l[f"aux_{k}"] for l in logs_all if f"aux_{k}" in l], world, device)
                 for k in aux.coefs.ratios}
        aux.coefs.update(flow, {k: v for k, v in means.items() if v is not None})
    if balancer is not None:
        loss_video = global_mean([l["loss_video"] for l in logs_all], world, device)
        loss_audio = global_mean([l["loss_audio"] for l in logs_all if "loss_audio" in l], world, device)
        if loss_audio is not None:
            balancer.update(loss_video, loss_audio)


# -----------------------------------------------------------------------------------------------
# audio-video mode: LoRA on the joint model, from an ltx-trainer precomputed dataset


@contextlib.contextmanager
def frozen(params):
    """Inside the block `params` take no gradient (requires_grad off); restored on exit."""
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


def av_inputs(cfg, batch, gen):
    """Noised streams of an AV micro-batch: σ per stream (independent, each shifted by its own token
    count, or shared); items without audio get σ_audio = 1, pure noise: nothing of their audio is
    known, so none is made up. Returns x_video, x_audio, σ_video, σ_audio, noise_video, noise_audio."""
    v0, a0 = batch["video_x0"], batch["audio_x0"]
    n_audio = int(batch["audio_mask"].sum(1).float().mean().item())
    sv, sa = losses.sample_av_sigmas(v0.shape[0], v0.shape[1], n_audio, independent=cfg.av_sigma == "independent",
                                     generator=gen, **sigma_law(cfg))
    sa = torch.where(batch["has_audio"].cpu(), sa, torch.ones_like(sa))
    nv = torch.randn(v0.shape, generator=gen).to(v0.device)
    na = torch.randn(a0.shape, generator=gen).to(a0.device)
    sv, sa = sv.to(v0.device), sa.to(a0.device)
    xv = torch.lerp(v0, nv, sv[:, None, None])  # (1-σ)·x0 + σ·ε
    xa = torch.lerp(a0, na, sa[:, None, None])
    return xv, xa, sv, sa, nv, na


def predict_av(parts, batch, xv, xa, sv, sa, autocast):
    """(v_video, v_audio) of one joint forward; the frozen connectors run without autograd."""
    with torch.no_grad(), autocast:
        ctx_audio = parts["connector"](batch["text"], batch["text_mask"])
        ctx_video = parts["video_connector"](batch["video_text"], batch["text_mask"])
    valid = batch["audio_mask"]  # padded audio keys are hidden; the diagonal keeps their rows finite
    attn = None if valid.all() else valid[:, None, :] | torch.eye(valid.shape[1], dtype=torch.bool,
                                                                   device=valid.device)[None]
    with autocast:
        v_video, v_audio = parts["dit"].forward_av(xv, xa, sv, sa, ctx_video, ctx_audio,
                                                   video_positions=batch["video_positions"], audio_attn_mask=attn)
    return v_video.float(), v_audio.float()


def av_micro_step(cfg, parts, batch, gen, autocast, w_audio, scale):
    """Forward and backward of one audio-video micro-batch; returns its logs.

    Items with audio: L = L_video + w_a·L_audio. Items without audio, by `audio_free`:
      mask      L_video only, with every audio and cross-modal adapter frozen for them (no gradient
                reaches those adapters from data that has no audio)
      preserve  L_video + preserve_weight·MSE(v̂_audio, v̂_audio of the same model, LoRA disabled):
                the adapters may not change what the base model does with the audio stream
    A micro-batch holding both kinds runs as two sub-batches; each item weighs 1/B. The loss is
    multiplied by `scale` (1/grad_accum) before backward.
    """
    xv, xa, sv, sa, nv, na = av_inputs(cfg, batch, gen)
    B = xv.shape[0]
    logs = {"loss_video": [], "loss_audio": [], "preserve": [], "per_sample": [], "sigma": []}
    for with_audio in (True, False):
        rows = (batch["has_audio"] == with_audio).nonzero().flatten()
        if len(rows) == 0:
            continue
        sub = {k: v[rows] for k, v in batch.items() if torch.is_tensor(v)}
        inputs = [t[rows] for t in (xv, xa, sv, sa)]
        block = with_audio or cfg.audio_free != "mask"
        with contextlib.nullcontext() if block else frozen(parts["audio_adapters"]):
            v_video, v_audio = predict_av(parts, sub, *inputs, autocast)
            loss_video = losses.flow_loss(v_video, sub["video_x0"], nv[rows])  # (b,)
            logs["loss_video"].append(loss_video.detach())
            loss = loss_video
            if with_audio:
                loss_audio = losses.flow_loss(v_audio, sub["audio_x0"], na[rows], sub["audio_mask"])
                loss = loss + w_audio * loss_audio
                logs["loss_audio"].append(loss_audio.detach())
                logs["per_sample"].append(loss_audio.detach())
                logs["sigma"].append(sa[rows].detach())
            elif cfg.audio_free == "preserve":
                with torch.no_grad(), lora.lora_disabled(parts["dit"]):
                    _, base_audio = predict_av(parts, sub, *inputs, autocast)
                preserve = losses.masked_mse(v_audio, base_audio, sub["audio_mask"])
                loss = loss + cfg.preserve_weight * preserve
                logs["preserve"].append(preserve.detach())
            if loss.requires_grad:  # mask mode with only audio adapters: nothing to learn from these
                (loss.sum() / B * scale).backward()
    out = {k: torch.cat(v).cpu() for k, v in logs.items() if v}
    out = {k: (v if k in ("per_sample", "sigma") else v.mean()) for k, v in out.items()}
    out.setdefault("per_sample", torch.zeros(0))
    out.setdefault("sigma", torch.zeros(0))
    out["flow"] = out["loss_video"] + w_audio * out.get("loss_audio", 0.0)
    out.update(sigma_video=sv.mean().cpu(), w_audio=torch.tensor(float(w_audio)),
               audio_free=(~batch["has_audio"]).sum().cpu().float())
    if batch["has_audio"].any():
        out["sigma_audio"] = sa[batch["has_audio"]].mean().cpu()
    return out


class AuxLosses:
    """Stage-2 ReFL losses: one-step x0̂ = x_t − σ·v̂ decoded through the frozen codec and scored.

    Gated to σ < aux_sigma_max and clips ≤ aux_max_seconds; at most `aux_clips` clips per
    micro-batch are decoded (decoder and scorers gradient-checkpointed), and of each only the
    middle `aux_crop_seconds` (a speaker embedding and a DNSMOS score need a few seconds, and at
    the official size the 16 kHz vocoder's backward is the dominant cost, linear in the length:
    benchmarks/bench_stage2_scale.py).
    """

    def __init__(self, cfg, device):
        self.cfg = cfg
        self.codec = codec_lib.codec_from_config(cfg).to(device).eval()
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
        crop = round(self.cfg.aux_crop_seconds * self.codec.tokens_per_second)
        for i in idx:
            tokens = x0_hat[i][batch["loss_mask"][i]][None]  # (1, T_target, F): no reference, no padding
            if 0 < crop < tokens.shape[1]:
                start = (tokens.shape[1] - crop) // 2
                tokens = tokens[:, start:start + crop]
            clips.append(self.codec.decode_16k(tokens.float()).mean(1)[0])  # (N,) mono at 16 kHz
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
    """torch.save through a temp file and a rename; plain containers only (read back weights_only)."""
    files.torch_save(obj, path)


def rng_state():
    """Every RNG's state in plain types (numpy's key array as a list), so the checkpoint loads with
    weights_only=True."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, keys.tolist(), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(trainable, masters):
    """Trainable weights by name, from the fp32 masters when they exist (never the frozen base).
    Detached views, not copies: callers write them out before the next optimizer step."""
    tensors = masters.masters if masters is not None else [p for _, p in trainable]
    return {n: t.detach().cpu() for (n, _), t in zip(trainable, tensors)}


CKPT_KEYS = ("step", "config", "trainable", "optimizer", "data", "rng", "aux", "balancer", "best_val")


def load_checkpoint(path, trainable, cfg):
    """The checkpoint dict at `path`, read without unpickling code and checked before anything is
    restored: complete, written for the same trainable tensors (names, shapes), every tensor finite
    (a diverged run is not continued), and not already past max_steps. Errors name the file."""
    hint = "delete it, or start the run again with --overwrite=true"
    try:
        ckpt = files.torch_load(path)
    except ValueError as e:
        raise ValueError(f"cannot resume: {e}; {hint}") from None
    missing = [k for k in CKPT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path}: not a train.py checkpoint (missing {', '.join(missing)}); {hint}")
    state = ckpt["trainable"]
    for name, p in trainable:
        if name not in state or tuple(state[name].shape) != tuple(p.shape):
            found = "missing" if name not in state else f"shape {tuple(state[name].shape)}"
            raise ValueError(f"{path}: written for other trainable weights ({name}: {found}, this run has "
                             f"{tuple(p.shape)}): stage, model or LoRA settings differ from the run's config.json")
    files.check_finite(state, path)
    moments = {f"optimizer.{i}.{k}": v for i, st in ckpt["optimizer"]["state"].items() for k, v in st.items()
               if torch.is_tensor(v)}
    files.check_finite(moments, path)
    if ckpt["step"] > cfg.max_steps:
        raise ValueError(f"{path}: the run is at step {ckpt['step']}, past --max_steps={cfg.max_steps}")
    return ckpt


def save_checkpoint(path, cfg, step, best_val, trainable, masters, stateful, rank, world):
    """Write the checkpoint of `step` (rank 0; every rank's RNG state gathered first): the trainable
    weights (fp32 masters when they exist), the state_dict of each of `stateful` (optimizer, data
    sampler, stage-2 coefficients, AV balancer; None when absent) and the RNGs. Mirrored by
    `resume_checkpoint`."""
    rngs = [None] * world
    if world > 1:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if rank != 0:
        return
    state = trainable_state(trainable, masters)
    files.check_finite(state, path)  # never replace the last good checkpoint with a diverged one
    saved = {k: v.state_dict() if v is not None else None for k, v in stateful.items()}
    atomic_save({"step": step, "config": config_dict(cfg), "trainable": state, "optimizer": saved["optimizer"],
                 "data": saved["data"], "rng": rngs, "aux": saved["aux"], "balancer": saved["balancer"],
                 "best_val": best_val, "git": git_hash()}, path)


def resume_checkpoint(path, cfg, trainable, masters, stateful, rank):
    """Restore what `save_checkpoint` wrote, in place: the trainable weights (into the masters and,
    rounded, the params), each of `stateful`, this rank's RNGs; rank 0 trims metrics.jsonl to the
    checkpoint's step (the steps after it run again). Returns (step, best_val)."""
    ckpt = load_checkpoint(path, trainable, cfg)
    state = ckpt["trainable"]
    with torch.no_grad():
        for (name, p), t in zip(trainable, masters.masters if masters is not None else [p for _, p in trainable]):
            t.copy_(state[name])
    if masters is not None:
        masters.masters_to_params()
    for k, v in stateful.items():
        if v is not None:
            try:
                v.load_state_dict(ckpt[k])
            except ValueError as e:  # e.g. an optimizer of other parameter groups (adaln_lr_scale 1 vs not)
                raise ValueError(f"{path}: its {k} state does not fit this run ({e}); resume with the settings "
                                 "it was written with, or start again with --overwrite=true") from None
    set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
    step, best_val = ckpt["step"], ckpt["best_val"]
    del ckpt, state  # at full size gigabytes of host memory, restored into place by now
    if rank == 0:
        trim_metrics(os.path.join(os.path.dirname(path), "metrics.jsonl"), step)
        print(f"resumed from {path} at step {step}")
    return step, best_val


def check_finite_step(step, loss, grad_norm, ckpt_path, saved_step):
    """Stop the run before the update of `step` if its loss or gradient norm is NaN / Inf: the
    weights are still those of the last finite step, the checkpoint on disk (of `saved_step`, None
    if none) is left as it is, and no weights are exported. Every rank sees the same values (a
    global mean, all-reduced gradients), so every rank stops."""
    grad_norm = float(grad_norm)
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    last = (f"the last good checkpoint is {ckpt_path} (step {saved_step})" if saved_step is not None
            else "no checkpoint was written yet")
    raise ValueError(f"step {step}: training diverged (flow loss {loss}, grad_norm {grad_norm}); stopped before "
                     f"the update: {last}, no weights exported. Lower lr or grad_clip, or check the data")


# -----------------------------------------------------------------------------------------------
# the run directory: never overwritten by accident, no leftovers


def run_files(run_dir):
    """The files of `run_dir` that a run wrote and a new run would destroy: its checkpoint, its
    metrics and its exported weights (config.json alone is not kept: it is rewritten at each start)."""
    names = ["checkpoint.pt", "metrics.jsonl"]
    names += [os.path.basename(p) for pattern in ("dit*.safetensors", "lora*.safetensors", "adaln*.pt",
                                                  "adaln*.safetensors")
              for p in glob.glob(os.path.join(glob.escape(run_dir), pattern))]
    return [n for n in dict.fromkeys(names) if os.path.isfile(os.path.join(run_dir, n))]


def check_run_dir(cfg, run_dir, ckpt_path):
    """A new run refuses a directory that holds a run (unless overwrite); a resume needs its checkpoint."""
    if cfg.resume and cfg.overwrite:
        raise ValueError("config keys 'resume' and 'overwrite' are both true: continue the run or replace it, not both")
    if cfg.resume:
        if not os.path.isfile(ckpt_path):
            runs = sorted(os.listdir(cfg.out_dir)) if os.path.isdir(cfg.out_dir) else []
            raise FileNotFoundError(f"{ckpt_path} not found: nothing to resume (is --name={cfg.name} right? runs in "
                                    f"{cfg.out_dir}: {', '.join(runs[:10]) or 'none'})")
        return
    found = run_files(run_dir)
    if found and not cfg.overwrite:
        raise ValueError(f"{run_dir} already holds a run ({', '.join(found)}): continue it with --resume=true, "
                         "replace it with --overwrite=true, or choose another --name")


def clean_run_dir(cfg, run_dir):
    """Remove what a killed write left (`*.tmp.<pid>` of a process that is gone: gigabytes each at
    full size) and, with `overwrite`, the previous run's files. Rank 0 only, before anything is written."""
    for tmp in glob.glob(os.path.join(glob.escape(run_dir), "*.tmp.*")):
        pid = tmp.rsplit(".", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            os.remove(tmp)
            print(f"removed {tmp} (left by a killed write)")
    if cfg.overwrite:
        for name in run_files(run_dir):
            os.remove(os.path.join(run_dir, name))
            print(f"--overwrite: removed {os.path.join(run_dir, name)}")


def pid_alive(pid):
    """True when process `pid` runs on this machine (a temp file it is still writing is left alone)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def trim_metrics(path, step):
    """Drop the lines of steps after `step` from metrics.jsonl (and a line cut by a kill): the resumed
    run logs those steps again. Rewritten atomically."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    files.write_text(path, "".join(keep))


def best_file(cfg, run_dir):
    """This stage's best-by-validation deliverable in `run_dir` (dit_best.safetensors, ...), or None."""
    stem = {"base": "dit", "lora": "lora", "adaln": "adaln"}[cfg.stage]
    found = sorted(p for p in glob.glob(os.path.join(glob.escape(run_dir), f"{stem}_best.*")) if ".tmp." not in p)
    return found[0] if found else None


def export_weights(cfg, parts, trainable, masters, run_dir, tag=""):
    """The stage's deliverable: a DiT safetensors (base), a LoRA file (lora) or the AdaLN (adaln).

    tag "_best" writes the best-by-validation copy beside the final one (dit_best.safetensors, ...).
    """
    state = trainable_state(trainable, masters)
    files.check_finite(state, f"{run_dir}: the {cfg.stage} weights to export")  # no diverged deliverable
    if cfg.stage == "base":
        dit, connector = parts["dit"], parts["connector"]
        missing, unexpected = dit.load_state_dict({k: v for k, v in state.items() if not k.startswith("connector.")},
                                         strict=False)
        held = {n for n, p in dit.named_parameters() if not p.requires_grad}  # hold_text_gates: not trained
        if set(missing) - held or unexpected:
            raise RuntimeError(f"base export: no trained weights for {sorted(set(missing) - held)[:4]}, "
                               f"unknown {unexpected[:4]}")
        connector.load_state_dict({k[len("connector."):]: v for k, v in state.items() if k.startswith("connector.")})
        path = os.path.join(run_dir, f"dit{tag}.safetensors")
        meta = json.loads(model_lib.metadata_from_dit_config(dit.cfg)["config"])
        meta["transformer"].update(text_lib.connector_metadata(connector))
        model_lib.save_dit(dit, path, metadata={"config": json.dumps(meta)},
                           extra=text_lib.connector_checkpoint_tensors(connector))
    elif cfg.stage == "lora":
        path = os.path.join(run_dir, f"lora{tag}.safetensors")
        lora.save_lora(parts["dit"], path, base_model_id=cfg.ckpt or cfg.model, state=state)
        if parts["adaln"] is not None:  # speaker-aware stage 1: the AdaLN that stage 2 starts from
            export_adaln(cfg, parts, state, os.path.join(run_dir, f"adaln{tag}.safetensors"))
    else:
        path = export_adaln(cfg, parts, state, os.path.join(run_dir, f"adaln{tag}.safetensors"))
    return path


def export_adaln(cfg, parts, state, path):
    """The SpeakerAdaLNZero's weights (the `adaln.` entries of `state`) at `path` (safetensors), with
    the run config and the config that prepared its training data, which sampling builds from."""
    data_config, fingerprint = data.prepared_config(cfg)
    return adaln_lib.save_adaln(parts["adaln"], path, config=config_dict(cfg), data_config=data_config,
                                speaker_fingerprint=fingerprint,
                                state={k[len("adaln."):]: v for k, v in state.items() if k.startswith("adaln.")})


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
    flow loss at σ spread over [0.1, 0.9]; `val_text_gain`, how much lower that loss is with each
    item's own prompt than with its batch neighbour's (same noise and σ): what the words are worth to
    the model, ~0 when it ignores them and speaks whatever the noise and the voice make; with stage-2
    auxiliary models also `val_spk_sim`, the speaker similarity of one-step x0̂ at σ = val_spk_sigma
    to each item's reference."""
    if val_set is None:
        return {}
    total, count, sims = 0.0, 0, []
    other_text, other_count = 0.0, 0
    gen = torch.Generator().manual_seed(cfg.seed + 12345)
    for batch in data.iterate_batches(val_set, cfg.micro_batch):
        batch = data.to_device(batch, device)
        x0 = batch["x0"]
        B = x0.shape[0]
        noise = torch.randn(x0.shape, generator=gen).to(device)

        def forward(sigma, text_batch=batch):
            sigma = sigma.to(device)
            timesteps = torch.where(batch["ref_mask"], torch.zeros_like(x0[..., 0]), sigma[:, None].expand_as(x0[..., 0]))
            x_t = (1 - timesteps[..., None]) * x0 + timesteps[..., None] * noise
            return x_t, predict(parts, text_batch, x_t, sigma, timesteps, autocast), sigma

        sigma = torch.linspace(0.1, 0.9, B) if B > 1 else torch.tensor([0.5])
        own = losses.flow_loss(forward(sigma)[1], x0, noise, batch["loss_mask"])
        total += own.sum().item()
        count += B
        if B > 1:  # every item with its neighbour's prompt (a batch of one has no other prompt)
            swapped = {**batch, **{k: batch[k].roll(1, 0) for k in ("text", "text_mask", "text_progress")}}
            other = losses.flow_loss(forward(sigma, swapped)[1], x0, noise, batch["loss_mask"])
            other_text += (other - own).sum().item()
            other_count += B
        if aux is not None:
            sims += aux.speaker_similarity(batch, *forward(torch.full((B,), cfg.val_spk_sigma)))
    out = {"val_loss": total / max(count, 1)}
    if other_count:
        out["val_text_gain"] = other_text / other_count
    if sims:
        out["val_spk_sim"] = sum(sims) / len(sims)
    return out


# -----------------------------------------------------------------------------------------------
# the run: its directory, its data, stopping, validation records


def start_run_dir(cfg, run_dir, world, grad_accum, device):
    """Rank 0, before training: the run directory made and cleaned, the header printed and config.json written."""
    os.makedirs(run_dir, exist_ok=True)
    clean_run_dir(cfg, run_dir)
    header = {"command": " ".join(sys.argv), "git": git_hash(), "torch": torch.__version__,
              "world": world, "grad_accum": grad_accum, "device": str(device)}
    print(json.dumps(header))
    print(format_config(cfg))
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({**header, "config": config_dict(cfg)}, f, indent=1)


def load_data(cfg, master):
    """(train set, val set or None, a one-item example batch that sizes the model): the prepared cache,
    or in av mode the ltx-trainer precomputed directory (no validation set)."""
    if not cfg.av:
        train_set = data.load_cached(cfg, cfg.manifest, split="train")
        val_set = data.load_cached(cfg, cfg.val_manifest, split="val") if cfg.val_manifest else None
        return train_set, val_set, data.collate(train_set, [0], cfg, epoch=0, step=0)
    train_set = data.PrecomputedDataset(cfg.precomputed, cfg, require_audio=False)
    report = train_set.report
    if master:
        print(f"{train_set.root}: {report['with_audio']} samples with audio, {report['without_audio']} without "
              f"({cfg.audio_free} mode)" + ("" if report["with_audio"] > 0
                                            else "; no audio at all: no audio or cross-modal adapters"))
    first = next((i for i, x in enumerate(train_set.samples) if x["audio"] is not None), None)
    width = (train_set.load(first)["audio"].shape[1] if first is not None
             else model_lib.PRESETS[cfg.model].in_channels)  # only sizes a preset model (no ckpt)
    return train_set, None, data.collate_av(train_set, [first or 0], cfg, width)


def collate_fn(cfg, train_set, parts):
    """collate(indices, epoch, step) -> the micro-batch of those items of `train_set` (av: audio padded
    to the built DiT's latent width)."""
    if cfg.av:
        return lambda idx, epoch, step: data.collate_av(train_set, idx, cfg, parts["dit"].cfg.in_channels)
    return lambda idx, epoch, step: data.collate(train_set, idx, cfg, epoch=epoch, step=step)


def stop_requested(stop, run_dir, world, device):
    """True on every rank when any rank got SIGTERM (`stop["flag"]`) or the run directory holds a STOP file."""
    stopping = stop["flag"] or os.path.exists(os.path.join(run_dir, "STOP"))
    if world > 1:
        flag = torch.tensor([float(stopping)], device=device)
        dist.all_reduce(flag)
        stopping = flag.item() > 0
    return stopping


def validate_and_log(cfg, step, best_val, parts, val_set, device, autocast, aux, masters, run_dir, init, metrics):
    """Rank 0: the held-out metrics of `step` (`validate`) as a metrics.jsonl line, with the freeze
    alarm's weight change and, on a new best score, the `_best` deliverable. Returns the best score."""
    val = validate(cfg, parts, val_set, device, autocast, aux)
    if not val:
        return best_val
    trainable = parts["trainable"]
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
    return best_val


def main(argv=None):
    cfg = load_config(argv)
    run_dir, ckpt_path = preflight(cfg)
    rank, world, device = setup_distributed(cfg)
    master = rank == 0
    grad_accum = grad_accum_steps(cfg, world)
    if master:
        start_run_dir(cfg, run_dir, world, grad_accum, device)
    train_set, val_set, example = load_data(cfg, master)
    sampler = data.BatchSampler(train_set, cfg.global_batch, seed=cfg.seed, source_weights=cfg.sources)
    parts = build(cfg, device, example, with_audio=not cfg.av or train_set.report["with_audio"] > 0)
    check_text_progress(cfg, parts["dit"].cfg, train_set)
    collate = collate_fn(cfg, train_set, parts)
    trainable = parts["trainable"]
    params = [p for _, p in trainable]
    if master and cfg.stage == "lora":
        print(lora.lora_table(parts["dit"]))
    if master:
        print(f"stage {cfg.stage}: {sum(p.numel() for p in params):,} trainable parameters")
    broadcast_params(params, world)
    scales = [cfg.adaln_lr_scale if cfg.stage == "lora" and n.startswith("adaln.") else 1.0 for n, _ in trainable]
    masters, optimizer = make_optimizer(cfg, params, scales)
    group_scales = [g["lr_scale"] for g in optimizer.param_groups]  # this run's, not a resumed checkpoint's
    aux = AuxLosses(cfg, device) if cfg.stage == "adaln" and cfg.aux_losses else None
    balancer = (losses.EMABalancer(cfg.balancer_target, cfg.balancer_decay, cfg.balancer_min, cfg.balancer_max)
                if cfg.av and cfg.audio_balancer else None)
    autocast = (torch.autocast(device.type, dtype=files.DTYPES[cfg.dtype]) if cfg.dtype != "fp32"
                else contextlib.nullcontext())
    stateful = {"optimizer": optimizer, "data": sampler, "aux": aux.coefs if aux is not None else None,
                "balancer": balancer}  # what a checkpoint holds besides weights, step and RNGs
    step, best_val = 0, float("inf")
    if cfg.resume:
        step, best_val = resume_checkpoint(ckpt_path, cfg, trainable, masters, stateful, rank)
    saved_step = step if cfg.resume else None  # the step of the checkpoint on disk
    init = weight_snapshot(trainable) if master else None
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    metrics = open(os.path.join(run_dir, "metrics.jsonl"), "a") if master else None

    while step < cfg.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(cfg, step)
        for group, scale in zip(optimizer.param_groups, group_scales):
            group["lr"] = lr * scale
        logs_all, n_tokens = [], 0
        indices = sampler.next_batch()  # the same global batch on every rank
        for m, micro in enumerate(data.micro_batches(indices, cfg.micro_batch, rank, world)):
            batch = data.to_device(collate(micro, sampler.epoch, step), device)
            gen = micro_generator(cfg, step, rank * grad_accum + m)  # seeded by the global micro-batch index
            logs_all.append(micro_step(cfg, parts, batch, gen, autocast, 1 / grad_accum, aux, balancer))
            n_tokens += batch_tokens(cfg, batch)
        allreduce_grads(params, world)
        update_loss_weights(aux, balancer, logs_all, world, device)
        flow = global_mean([l["flow"] for l in logs_all], world, device)
        grad_norm = optimizer_step(optimizer, params, masters, cfg.grad_clip, check=lambda norm: check_finite_step(
            step + 1, flow, norm, ckpt_path, saved_step))
        step += 1
        if master and (step % cfg.log_every == 0 or step == cfg.max_steps):
            log_step(cfg, step, lr, grad_norm, logs_all, n_tokens * world, t0, device, metrics)
        stopping = stop_requested(stop, run_dir, world, device)
        if master and (step % cfg.val_every == 0 or step == cfg.max_steps):
            best_val = validate_and_log(cfg, step, best_val, parts, val_set, device, autocast, aux, masters,
                                        run_dir, init, metrics)
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps or stopping:
            save_checkpoint(ckpt_path, cfg, step, best_val, trainable, masters, stateful, rank, world)
            saved_step = step
        if stopping:
            if master:
                with contextlib.suppress(FileNotFoundError):  # honoured: a resumed run must not stop again
                    os.remove(os.path.join(run_dir, "STOP"))
                print(f"stopped at step {step} (STOP file or SIGTERM); resume with --resume=true")
            break
    if master and step == cfg.max_steps:
        path = export_weights(cfg, parts, trainable, masters, run_dir)
        best = best_file(cfg, run_dir)
        print(f"done: {step} steps; weights in {path}" + (f" (best by {cfg.best_by}: {best})" if best else ""))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def check_av_config(cfg):
    """The av-mode settings that have no meaning elsewhere, checked before anything loads."""
    if not cfg.precomputed:
        raise ValueError("config key 'precomputed': av mode needs the ltx-trainer precomputed dataset directory")
    if cfg.av_sigma not in ("independent", "shared"):
        raise ValueError(f"config key 'av_sigma': {cfg.av_sigma!r} is not independent | shared")
    if cfg.audio_free not in ("mask", "preserve"):
        raise ValueError(f"config key 'audio_free': {cfg.audio_free!r} is not mask | preserve")
    if cfg.val_manifest or cfg.best_by != "val_loss":
        raise ValueError("config keys 'val_manifest' / 'best_by': av mode has no validation set "
                         "(sample with sample.py --av to judge a run)")


def log_step(cfg, step, lr, grad_norm, logs_all, tokens, t0, device, metrics):
    """One line per step to stdout and metrics.jsonl; flow loss also per σ bucket."""
    flow = torch.stack([l["flow"] for l in logs_all]).mean().item()
    per_sample = torch.cat([l["per_sample"] for l in logs_all])
    sigma = torch.cat([l["sigma"].cpu() for l in logs_all])
    dt = time.perf_counter() - t0
    rec = {"step": step, "loss": round(flow, 6), "lr": lr, "grad_norm": round(float(grad_norm), 4),
           "step_ms": round(1000 * dt, 1), "tok/s": round(tokens / dt, 1)}
    for k in dict.fromkeys(k for l in logs_all for k in l):  # every scalar log, in first-seen order
        if k not in ("flow", "per_sample", "sigma"):
            rec[k] = round(torch.stack([l[k] for l in logs_all if k in l]).float().mean().item(), 5)
    if device.type == "cuda":
        rec["mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    rec["sigma_buckets"] = losses.sigma_bucket_losses(per_sample.cpu(), sigma)
    print(" ".join(f"{k}:{v}" for k, v in rec.items() if k != "sigma_buckets"))
    metrics.write(json.dumps(rec) + "\n")
    metrics.flush()


if __name__ == "__main__":
    run_cli(main)
