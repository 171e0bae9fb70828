"""Train the `tiny_sv` speaker encoder (speaker.TinySVNet) on a manifest's voices.

    python train_sv.py configs/tiny.yaml --manifest=data/tiny/train.jsonl --val_manifest=data/tiny/val.jsonl \
        --name=tiny_sv          # -> runs/tiny_sv/sv.safetensors

The pipeline's `sv` step runs this on the corpus's train split before `prepare`, and points
`speaker_paths['tiny_sv']` at the result, so the SpeakerAdaLNZero is fed (and the ReFL speaker
loss scores through) features trained to tell voices apart, instead of log-mel statistics that
mostly follow the average spectrum of what was said. It plays the part WAVLM-SV plays at scale,
where no pretrained network may be downloaded.

Loss: additive-margin softmax over the training voices (CosFace; normalised class weights,
logits s·(cos θ − m) for the own voice, s·cos θ for the others), on random crops of
`sv_crop_seconds`, peak-normalised like every reference, with a random gain of ±10 dB so the
embedding does not follow loudness (generated audio is not normalised). Validation: each val clip
identified against the train clips' centroids (the val clips are other utterances of the same
voices); printed and written into the file's metadata.

Only the run's own training voices are used: held-out voices (`corpus_unseen`) and the judge
split never reach it, and the evaluation's GE2E encoder (voice_encoder.py) is unrelated to it.
"""

import json
import math
import os
import sys
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

import files
from audio import SAMPLE_RATE
from config import config_dict, load_config, run_cli
from data import REF_PEAK, read_audio, read_manifest
from speaker import TinySVNet

GAIN_DB = 10.0  # random gain of each training crop, ± dB


def load_clips(manifest):
    """({speaker: [wav (N,) at 16 kHz, peak -4 dBFS]}) of a manifest; an error names an item without speaker."""
    clips = defaultdict(list)
    for item in read_manifest(manifest):
        if not item.speaker:
            raise ValueError(f"{item.where}: no 'speaker': train_sv.py learns voices from speaker labels")
        wav = read_audio(item.audio, SAMPLE_RATE, 1)[0][0]
        clips[item.speaker].append(wav * (REF_PEAK / wav.abs().max()))
    return dict(sorted(clips.items()))


def crop(wav, n, rng):
    """A random n-sample window of `wav` (tiled first when shorter)."""
    if wav.shape[0] < n:
        wav = wav.repeat(math.ceil(n / wav.shape[0]))
    start = int(rng.integers(0, wav.shape[0] - n + 1))
    return wav[start:start + n]


def draw_batch(clips, speakers, batch, n, rng):
    """(crops (batch, n), labels (batch,)): voices drawn uniformly, then one of their clips, then a window."""
    labels = rng.integers(0, len(speakers), batch)
    wavs = []
    for label in labels:
        pool = clips[speakers[label]]
        wav = crop(pool[int(rng.integers(len(pool)))], n, rng)
        wavs.append(wav * 10 ** (rng.uniform(-GAIN_DB, GAIN_DB) / 20))
    return torch.stack(wavs), torch.as_tensor(labels)


def margin_softmax_loss(emb, weight, labels, margin, scale):
    """CosFace: cross-entropy of scale·(cos − margin·onehot) between L2-normalised embeddings and class weights."""
    cos = emb @ F.normalize(weight, dim=-1).T  # (B, classes)
    return F.cross_entropy(scale * (cos - margin * F.one_hot(labels, cos.shape[1])), labels)


@torch.no_grad()
def identification(net, train, val):
    """(accuracy, mean margin, clips) of identifying each val clip against the centroids of the train
    clips of every voice; margin = cos(own centroid) − mean cos(other centroids). `net` is left in
    the mode it came in."""
    mode, voices = net.training, list(train)
    net.eval()
    centroids = F.normalize(torch.stack([torch.cat([net(w[None]) for w in train[v]]).mean(0) for v in voices]),
                            dim=-1)
    hits, margins = [], []
    for v, clips in val.items():
        if v not in train:
            continue
        own = voices.index(v)
        for w in clips:
            cos = net(w[None])[0] @ centroids.T
            hits.append(int(cos.argmax()) == own)
            margins.append(float(cos[own] - (cos.sum() - cos[own]) / max(len(voices) - 1, 1)))
    net.train(mode)
    n = max(len(hits), 1)
    return sum(hits) / n, sum(margins) / n, len(hits)


def train_sv(cfg, train, val=None, log=print):
    """A TinySVNet trained on {speaker: [wav]} for cfg.sv_steps; returns (net, summary dict)."""
    speakers = list(train)
    if len(speakers) < 2:
        raise ValueError(f"train_sv.py needs at least 2 voices in the manifest, got {len(speakers)}")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net = TinySVNet(dim=cfg.sv_dim)
    weight = torch.nn.Parameter(torch.randn(len(speakers), cfg.sv_dim) * 0.01)
    opt = torch.optim.Adam([*net.parameters(), weight], lr=cfg.sv_lr)
    n = round(cfg.sv_crop_seconds * SAMPLE_RATE)
    net.train()
    t0, losses = time.time(), []
    for step in range(1, cfg.sv_steps + 1):
        lr = cfg.sv_lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / cfg.sv_steps))  # cosine to 0
        for group in opt.param_groups:
            group["lr"] = lr
        wavs, labels = draw_batch(train, speakers, cfg.sv_batch, n, rng)
        loss = margin_softmax_loss(net(wavs), weight, labels, cfg.sv_margin, cfg.sv_scale)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train_sv.py: loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == cfg.sv_steps:
            log(f"step:{step} loss:{np.mean(losses[-50:]):.4f} lr:{lr:.2e} ({time.time() - t0:.0f} s)")
    summary = {"voices": speakers, "steps": cfg.sv_steps, "final_loss": round(float(np.mean(losses[-50:])), 4)
               if losses else None, "seconds": round(time.time() - t0, 1)}
    summary["train_acc"] = identification(net, train, train)[0]
    if val:
        summary["val_acc"], summary["val_margin"], summary["val_clips"] = identification(net, train, val)
    return net.eval(), summary


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = load_config(argv)
    if not cfg.manifest:
        raise ValueError("train_sv.py: --manifest (a JSONL of clips with 'speaker') is required")
    out = os.path.join(cfg.out_dir, cfg.name, "sv.safetensors")
    if os.path.exists(out) and not cfg.overwrite:
        raise ValueError(f"{out} exists: replace it with --overwrite=true, or choose another --name")
    train = load_clips(cfg.manifest)
    val = load_clips(cfg.val_manifest) if cfg.val_manifest else None
    print(f"tiny_sv: {sum(map(len, train.values()))} clips of {len(train)} voices from {cfg.manifest}", flush=True)
    net, summary = train_sv(cfg, train, val, log=lambda m: print(m, flush=True))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    files.save_safetensors(net.state_dict(), out, {"tiny_sv": net.settings(), "summary": summary,
                                                   "config": config_dict(cfg)})
    print(f"tiny_sv: {json.dumps({k: v for k, v in summary.items() if k != 'voices'})} -> {out}", flush=True)
    return out, summary


if __name__ == "__main__":
    run_cli(main)
