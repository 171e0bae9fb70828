"""An evaluation-only speech recogniser: does a sample say its words?

No pretrained recogniser can be downloaded here, and none is needed to ask whether the tiny
pipeline's samples speak their prompt: the corpus is synthetic eSpeak speech from a small grammar.
A character CTC model (log-mel -> strided convolution -> residual dilated convolutions -> characters)
is trained on the real clips of a manifest (the pipeline's `asr` step: the train split), then
`eval.py --metrics cer --asr FILE` transcribes every sample and scores the character error rate
against the words in its prompt (`cer`), and against the words of the other prompts of the set
(`cer_chance`: what speech that ignores its words scores). It is an evaluation tool only: no
training path imports it (tests/test_eval_isolation.py), so no loss can learn to please it.

    python asr.py --manifest data/tiny/train.jsonl --test data/tiny/judge.jsonl --out runs/tiny_asr/asr.safetensors

trains on the manifest's clips (each also 10 % slower and faster, with random time and frequency
masks) and reports the character and word error rates on the `--test` clips (other sentences).
"""

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import files
from audio import SAMPLE_RATE, resample

CHARS = " abcdefghijklmnopqrstuvwxyz'"  # class k + 1 is CHARS[k]; class 0 is the CTC blank
N_FFT, WIN, HOP, N_MELS = 512, 400, 160, 64  # 25 ms windows, 10 ms hop
SPEEDS = (0.9, 1.0, 1.1)  # every training clip also played 10 % slower and faster: tempo and pitch move, words stay
FREQ_MASK, TIME_MASK = 8, 10  # widest random mask in mel bins and frames (SpecAugment), one of each per clip
FORMAT = "speakerbox.asr"


def clean_text(text):
    """Lower case, only CHARS, single spaces: what is transcribed and scored."""
    text = re.sub(f"[^{re.escape(CHARS)}]", " ", text.lower())
    return " ".join(text.split())


def _mel_basis():
    import torchaudio.functional as AF

    return AF.melscale_fbanks(N_FFT // 2 + 1, 20.0, SAMPLE_RATE / 2, N_MELS, SAMPLE_RATE, norm="slaney",
                              mel_scale="slaney")


def features(wav, mel_basis=None):
    """(frames, N_MELS) log-mel of a mono 16 kHz clip (N,), each band's mean over the clip removed: loudness
    and a fixed channel colouring are no cue to the words."""
    wav = torch.as_tensor(wav, dtype=torch.float32).flatten()
    if wav.numel() < WIN or not torch.isfinite(wav).all():
        raise ValueError(f"a clip of {wav.numel()} samples, {'not finite' if wav.numel() >= WIN else 'too short'}")
    mel_basis = _mel_basis() if mel_basis is None else mel_basis
    spec = torch.stft(wav, N_FFT, HOP, WIN, torch.hann_window(WIN), return_complex=True).abs().square()
    logmel = (mel_basis.T @ spec).clamp_min(1e-10).log()  # (N_MELS, frames)
    return ((logmel - logmel.mean(1, keepdim=True)) / 3.0).T


class Recogniser(nn.Module):
    """log-mel (B, F, N_MELS) -> per-frame log-probabilities (B, ceil(F / 2), 1 + len(CHARS)): a strided
    convolution, then residual dilated convolutions (each output frame sees ±0.64 s), then characters."""

    DILATIONS = (1, 2, 4, 8, 1)

    def __init__(self, hidden=192):
        super().__init__()
        self.hidden = hidden
        self.inp = nn.Conv1d(N_MELS, hidden, 5, stride=2, padding=2)
        self.blocks = nn.ModuleList(nn.Conv1d(hidden, hidden, 5, dilation=d, padding=2 * d) for d in self.DILATIONS)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in self.DILATIONS)  # per frame: no batch or padding
        self.out = nn.Conv1d(hidden, 1 + len(CHARS), 1)

    def forward(self, x, lengths):
        h = self.inp(x.transpose(1, 2))
        keep = (torch.arange(h.shape[2])[None] < self.out_lengths(lengths)[:, None]).unsqueeze(1).to(h.dtype)
        # padding frames are zeroed before every convolution: a clip reads alike in any batch
        for conv, norm in zip(self.blocks, self.norms):
            h = h + conv(F.gelu(norm((h * keep).transpose(1, 2)).transpose(1, 2)) * keep)
        return self.out(F.gelu(h)).transpose(1, 2).log_softmax(-1)

    @staticmethod
    def out_lengths(lengths):
        return (lengths + 1) // 2


def pad(feats):
    """(B, F_max, N_MELS) zero-padded batch and its (B,) lengths."""
    return nn.utils.rnn.pad_sequence(feats, batch_first=True), torch.tensor([len(f) for f in feats])


def greedy_decode(log_probs, lengths):
    """Best path per item, repeats merged and blanks dropped -> strings."""
    out = []
    for row, n in zip(log_probs.argmax(-1), lengths.tolist()):
        keep = torch.unique_consecutive(row[:n])
        out.append(clean_text("".join(CHARS[k - 1] for k in keep.tolist() if k)))
    return out


def edit_distance(a, b):
    """Levenshtein distance between two sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def char_error_rate(reference, hypothesis):
    """Character edit distance / reference characters, on clean_text of both."""
    ref, hyp = clean_text(reference), clean_text(hypothesis)
    return edit_distance(ref, hyp) / len(ref) if ref else float(len(hyp) > 0)


def encode_text(text):
    ids = [CHARS.index(c) + 1 for c in clean_text(text)]
    if not ids:
        raise ValueError(f"nothing to transcribe in {text!r}")
    return torch.tensor(ids)


def training_set(wavs, texts):
    """[(features, target ids)] of every clip at every SPEEDS (computed once: training only indexes it)."""
    basis, items = _mel_basis(), []
    for wav, text in zip(wavs, texts):
        target = encode_text(text)
        for speed in SPEEDS:  # played `speed` times faster: resampled to 1/speed of the rate (a 100 Hz grid)
            sped = wav if speed == 1.0 else resample(wav, SAMPLE_RATE, int(round(SAMPLE_RATE / speed, -2)))
            items.append((features(sped, basis), target))
    return items


def masked(feat, rng):
    """A copy with one random band of mel bins and one random span of frames set to 0 (the clip mean)."""
    feat = feat.clone()
    f, t = int(rng.integers(0, FREQ_MASK + 1)), int(rng.integers(0, min(TIME_MASK, len(feat) // 4) + 1))
    f0, t0 = int(rng.integers(0, N_MELS - f + 1)), int(rng.integers(0, len(feat) - t + 1))
    feat[:, f0:f0 + f] = 0.0
    feat[t0:t0 + t] = 0.0
    return feat


def length_batches(lengths, batch, rng, pool=8):
    """Endless batches of item indices: each epoch shuffled, cut into pools of `pool` batches, each pool
    sorted by length and cut into batches, their order shuffled (similar lengths together: little padding)."""
    lengths = np.asarray(lengths)
    while True:
        order, out = rng.permutation(len(lengths)), []
        for s in range(0, len(order), batch * pool):
            part = order[s:s + batch * pool]
            part = part[np.argsort(lengths[part], kind="stable")]
            out += [part[i:i + batch] for i in range(0, len(part), batch)]
        for k in rng.permutation(len(out)):
            yield out[k]


def train_recogniser(wavs, texts, steps=400, batch=16, lr=2e-3, hidden=192, seed=0, log=print):
    """A Recogniser trained with CTC on clips (N,) at 16 kHz and their texts; returns it in eval mode."""
    if len(wavs) != len(texts) or len(wavs) < 2:
        raise ValueError(f"asr: need at least 2 clips with one text each, got {len(wavs)} clips, {len(texts)} texts")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    items = training_set(wavs, texts)
    model = Recogniser(hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    picks = length_batches([len(f) for f, _ in items], min(batch, len(items)), rng)
    t0, recent = time.time(), []
    for step in range(1, steps + 1):
        for group in opt.param_groups:  # 5 % warm-up, then cosine to 0
            group["lr"] = lr * min(1.0, step / max(1, steps // 20)) * 0.5 * (1 + math.cos(math.pi * step / steps))
        pick = next(picks)
        x, lengths = pad([masked(items[i][0], rng) for i in pick])
        targets = [items[i][1] for i in pick]
        log_probs = model(x, lengths)
        loss = F.ctc_loss(log_probs.transpose(0, 1), torch.cat(targets), model.out_lengths(lengths),
                          torch.tensor([len(t) for t in targets]), zero_infinity=True)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"asr: loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-50:]
        if step % 100 == 0 or step == steps:
            log(f"asr step:{step} ctc:{np.mean(recent):.4f} ({time.time() - t0:.0f} s)")
    return model.eval()


@torch.no_grad()
def transcribe(model, wavs, batch=32):
    """Greedy transcripts (clean_text) of mono 16 kHz clips."""
    model.eval()
    basis, out = _mel_basis(), []
    for i in range(0, len(wavs), batch):
        x, lengths = pad([features(w, basis) for w in wavs[i:i + batch]])
        out += greedy_decode(model(x, lengths), Recogniser.out_lengths(lengths))
    return out


def error_rates(references, hypotheses):
    """(character error rate, word error rate): edit distances summed over clips / reference length."""
    refs, hyps = [clean_text(r) for r in references], [clean_text(h) for h in hypotheses]
    chars = sum(edit_distance(r, h) for r, h in zip(refs, hyps)) / max(1, sum(map(len, refs)))
    words = sum(edit_distance(r.split(), h.split()) for r, h in zip(refs, hyps)) / max(1, sum(len(r.split())
                                                                                            for r in refs))
    return chars, words


def save_recogniser(model, path, summary=None):
    """safetensors weights with the format, alphabet, features and summary as JSON metadata (atomic)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    files.save_safetensors(model.state_dict(), path, {"format": FORMAT, "settings": _settings(model),
                                                      "summary": summary or {}})


def _settings(model):
    return {"chars": CHARS, "n_fft": N_FFT, "win": WIN, "hop": HOP, "n_mels": N_MELS, "hidden": model.hidden}


def load_recogniser(path):
    """A Recogniser written by `save_recogniser`; refuses any other file, or one of other features."""
    files.check_file(path, "--asr")
    if files.read_safetensors_metadata(path).get("format") != FORMAT:
        raise files.BadFile(f"{path}: not a recogniser written by asr.py (no format {FORMAT!r} in its metadata)")
    settings = files.read_json_metadata(path, "settings") or {}
    model = Recogniser(settings.get("hidden", 1))
    if settings != _settings(model):
        raise ValueError(f"{path}: recogniser settings {settings} differ from this asr.py's {_settings(model)}")
    model.load_state_dict(files.load_safetensors(path))
    return model.eval()


def read_clips(manifest):
    """(wavs at 16 kHz, spoken texts) of a manifest's items; a bad clip or an item without text is an error
    naming its file or line."""
    from data import read_audio, read_manifest
    from duration import spoken_text

    wavs, texts = [], []
    for item in read_manifest(manifest):
        if not item.text:
            raise ValueError(f"{item.where}: no 'text' to learn the words from")
        wavs.append(read_audio(item.audio, SAMPLE_RATE, 1)[0][0])
        texts.append(spoken_text(item.text))
    return wavs, texts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True, help="corpus manifest to learn from (its real clips)")
    p.add_argument("--test", default="", help="a manifest of other sentences to report the error rates on")
    p.add_argument("--out", required=True, help="where to write the recogniser (.safetensors)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    wavs, texts = read_clips(args.manifest)
    model = train_recogniser(wavs, texts, steps=args.steps, seed=args.seed, log=lambda m: print(m, flush=True))
    summary = {"manifest": str(args.manifest), "clips": len(wavs), "steps": args.steps, "seed": args.seed,
               "seconds": round(time.time() - t0, 1)}
    if args.test:
        test_wavs, test_texts = read_clips(args.test)
        summary["test"], (summary["test_cer"], summary["test_wer"]) = str(args.test), error_rates(
            test_texts, transcribe(model, test_wavs))
    save_recogniser(model, args.out, summary)
    print(f"asr: {json.dumps(summary)} -> {args.out}")


if __name__ == "__main__":
    from config import run_cli

    sys.exit(run_cli(main))
