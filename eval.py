"""Score generated samples and render one self-contained HTML report.

    python eval.py --samples runs/base/samples runs/adaln/samples --baseline base --out report.html \
        --wavlm /models/wavlm-base-plus-sv --whisper /models/whisper-small \
        --metrics_jsonl runs/adaln/metrics.jsonl

A sample is a wav with a JSON sidecar of the same name (what sample.py writes: prompt, seed, ref,
every setting). Its variant is the sidecar's `variant`, else the name of its directory (the
parent's, for a directory called `samples`). Metrics, each from local weights only:

- spk_sim: WavLM-SV x-vector cosine to the reference at 16 kHz (speaker.py, `--wavlm`);
- dnsmos_sig / dnsmos_bak / dnsmos_ovr: DNSMOS (dnsmos.py; no weights to fetch, runs everywhere);
- wer: word error rate of a Whisper transcript (transformers, `--whisper`) against the spoken text;
- utmos: a TorchScript UTMOS predictor (`--utmos`), wav (B, N) at 16 kHz -> (B,);
- aes_ce / aes_cu / aes_pc / aes_pq: audiobox-aesthetics (its package, `--aesthetics` checkpoint);
- judge_acc / judge_margin: the speaker judge (judge.py, `--judge`), for samples whose sidecar
  names a `speaker` the judge knows;
- ge2e_sim: cosine of GE2E embeddings (voice_encoder.py: resemblyzer's pretrained encoder, an
  independent listener that nothing in training uses) of the sample and its reference;
  ge2e_acc / ge2e_margin: identification against per-speaker centroids of the real clips of
  `--ge2e_split MANIFEST` (a corpus manifest: audio + speaker), for samples whose sidecar names
  one of its speakers (margin: cosine to the own centroid minus the mean to the others);
- cer / cer_chance: character error rate of the transcript of the evaluation-only recogniser (asr.py,
  `--asr`: trained on real corpus clips by the pipeline's `asr` step) against the sample's spoken text,
  and the mean against the spoken text of every other prompt of the set: speech that ignores its words
  scores cer ~ cer_chance, real clips of the corpus score cer < 0.1;
- voiced / voiced_vs_ref / pitch_st: pitch (`pitch_track`, an autocorrelation pitch tracker, no
  weights): the share of a sample's speech frames that have a pitch, that share minus its
  reference's (below 0: the sample lost the voice's pitch, as a codec too coarse to resolve a low
  voice's harmonics does), and the distance in semitones between the median pitch of the sample and
  of its reference where both are voiced.
A metric without its weights is reported as skipped, with the reason, never as a number.
DNSMOS costs ~1 s of CPU per 9 s window: `--dnsmos_windows 1` scores the first window of each
clip only (a short clip is repeated to 9 s, so its windows are near copies), `--dnsmos_per_variant
N` scores N samples of each variant, spread evenly over the variant's sorted samples.

The report embeds every sample, and each reference once, as Ogg Opus at `--player_rate` (8, 12,
16, 24 or 48 kHz; 0 embeds the files as they are), with its spectrogram as an indexed-colour PNG.

The LAIONBox protocol (v0.4 card: 6 prompts x 5 speakers x 2 seeds, plus unconditioned samples):

    python eval.py --eval_set laionbox --eval_yaml laionbox.yaml --variant adaln --samples_dir runs/eval \
        --ckpt merged.safetensors --full_ckpt ltx-2.3.safetensors --adaln adaln.safetensors [sample.py flags]

with laionbox.yaml:

    prompts: ["Warm, conversational tone. 'Hello, welcome to the show.'", ...]
    speakers: {alice: refs/alice.wav, bob: refs/bob.wav}
    seeds: [42, 123]
    unconditioned: true

generates every sample with sampler.sample(), writes them with sidecars, then scores them.
Other code adds per-sample numbers with `add_metric_rows(table, metric, values)`.
"""

import argparse
import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

import files
from audio import SAMPLE_RATE, read_mono16k, write_wav  # every metric here works on 16 kHz mono
from intervals import format_ci, summarize
from report import OPUS_RATES, render_html

METRIC_INFO = {  # name: (description, higher is better)
    "spk_sim": ("WavLM-SV cosine to the reference", True),
    "dnsmos_sig": ("DNSMOS speech quality", True),
    "dnsmos_bak": ("DNSMOS background quality", True),
    "dnsmos_ovr": ("DNSMOS overall quality", True),
    "wer": ("Whisper word error rate vs the spoken text", False),
    "utmos": ("UTMOS predicted MOS", True),
    "aes_ce": ("audiobox-aesthetics content enjoyment", True),
    "aes_cu": ("audiobox-aesthetics content usefulness", True),
    "aes_pc": ("audiobox-aesthetics production complexity", True),
    "aes_pq": ("audiobox-aesthetics production quality", True),
    "judge_acc": ("speaker judge accuracy (1 = recognised)", True),
    "judge_margin": ("speaker judge similarity margin", True),
    "ge2e_sim": ("GE2E (resemblyzer) cosine to the reference", True),
    "ge2e_acc": ("GE2E identification against the speaker centroids (1 = recognised)", True),
    "ge2e_margin": ("GE2E cosine to the own speaker's centroid minus the mean to the others", True),
    "cer": ("character error rate of the corpus recogniser (asr.py) vs the spoken text", False),
    "cer_chance": ("the same against the other prompts' spoken text (what words ignored score)", False),
    "voiced": ("share of speech frames with a pitch", True),
    "voiced_vs_ref": ("share of voiced speech frames minus the reference's", True),
    "pitch_st": ("semitones between the median pitch of the sample and of its reference", False),
}

# -----------------------------------------------------------------------------------------------
# samples


def variant_of(wav_path, meta):
    """The sidecar's `variant`, else the directory name (its parent's for a dir named `samples`)."""
    if meta.get("variant"):
        return str(meta["variant"])
    parent = Path(wav_path).resolve().parent
    return parent.parent.name if parent.name == "samples" else parent.name


def load_samples(dirs):
    """Every `*.wav` with a JSON sidecar under `dirs` -> list of {id, variant, path, meta}."""
    samples = []
    for d in dirs:
        if not os.path.isdir(d):
            raise FileNotFoundError(f"--samples {d}: not a directory")
        for wav in sorted(Path(d).rglob("*.wav")):
            side = wav.with_suffix(".json")
            if not side.is_file():
                print(f"eval: {wav} has no sidecar {side.name}; skipped", file=sys.stderr)
                continue
            try:
                meta = json.loads(side.read_text(encoding="utf-8"))
            except UnicodeDecodeError as e:
                raise ValueError(f"{side}: not UTF-8 (byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{side}: not valid JSON ({e})") from None
            if not isinstance(meta, dict):
                raise ValueError(f"{side}: a sidecar must be a JSON object, not a {type(meta).__name__}")
            variant = variant_of(wav, meta)
            sid = f"{variant}/{wav.relative_to(d).with_suffix('')}"
            if any(s["id"] == sid for s in samples):
                raise ValueError(f"{wav}: sample id {sid!r} occurs twice; give the directories distinct names "
                                 "or set 'variant' in the sidecars")
            samples.append({"id": sid, "variant": variant,
                            "path": str(wav), "meta": meta})
    if not samples:
        raise ValueError(f"no samples (wav + json sidecar) under {', '.join(dirs)}")
    return samples


# -----------------------------------------------------------------------------------------------
# the per-sample metric table: {metric: {sample id: value}}, and {metric: reason} for skipped ones


def add_metric_rows(table, metric, values, description=None, higher_is_better=True):
    """Add per-sample numbers {sample id: float} of `metric` to `table` (the hook other code, e.g.
    judge.py, uses); non-finite values are dropped rather than averaged."""
    if description is not None:
        METRIC_INFO.setdefault(metric, (description, higher_is_better))
    row = table.setdefault(metric, {})
    for sid, v in values.items():
        v = float(v)
        if math.isfinite(v):
            row[sid] = v
    return table


def _weights_reason(path, flag):
    if not path:
        return f"no weights given ({flag} PATH)"
    if not os.path.exists(path):
        return f"weights not found at {path}"
    return None


def of_reference(sample, cache, measure):
    """`measure(wav)` of the sample's reference clip (`meta['ref']`, read as 16 kHz mono), computed
    once per file in `cache`; None for a sample without a reference. A missing file raises, naming
    the sample and the reference."""
    ref = sample["meta"].get("ref")
    if not ref:
        return None
    if ref not in cache:
        if not os.path.isfile(ref):
            raise FileNotFoundError(f"{sample['path']}: its reference {ref} does not exist")
        cache[ref] = measure(read_mono16k(ref))
    return cache[ref]


def metric_spk_sim(samples, wavs, path, device):
    """Cosine of WavLM-SV embeddings of each sample and its reference (`meta['ref']`)."""
    from speaker import build_speaker_extractors

    extract = build_speaker_extractors(["wavlm_sv"], {"wavlm_sv": path}, device)
    out, cache = {}, {}
    for s in samples:
        ref = of_reference(s, cache, lambda wav: extract(wav[None].to(device)).float().cpu())
        if ref is None:
            continue
        emb = extract(wavs[s["id"]][None].to(device)).float().cpu()
        out[s["id"]] = torch.nn.functional.cosine_similarity(emb, ref).item()
    return {"spk_sim": out}


# An autocorrelation pitch tracker (Boersma 1993, the method of Praat's "To Pitch (ac)"): each
# Hann-windowed frame's autocorrelation is divided by the window's own, so that a periodic frame
# scores ~1 at its period however long the period is next to the frame.
PITCH_FLOOR, PITCH_CEILING = 60.0, 400.0  # Hz: lowest and highest pitch searched
VOICING_THRESHOLD = 0.45  # a frame is voiced when its normalised autocorrelation peak reaches this (Praat's)
SPEECH_DB = 25.0  # speech frames: RMS within this many dB of the clip's loudest frame; the rest are not scored
MIN_VOICED_FOR_PITCH = 0.2  # pitch_st only compares clips with at least this share of voiced frames


def pitch_track(wav, sample_rate=SAMPLE_RATE, hop_s=0.01):
    """(voiced (F,) bool, f0 (F,) Hz, 0 where unvoiced) over the speech frames of a mono clip (N,).

    Frames hold three periods of the floor pitch (50 ms). The period is the shortest lag (within the
    floor..ceiling range) whose autocorrelation peak comes within 10 % of the highest: a periodic
    signal peaks as high at two periods as at one, and the shorter is its pitch. The peak's lag is
    refined by a parabola through it and its neighbours.
    """
    wav = torch.as_tensor(wav, dtype=torch.float64).flatten()
    size, hop = round(3 * sample_rate / PITCH_FLOOR), round(hop_s * sample_rate)
    if wav.numel() < size:
        return torch.zeros(0, dtype=torch.bool), torch.zeros(0)
    frames = wav.unfold(0, size, hop)
    frames = frames - frames.mean(1, keepdim=True)
    rms = frames.pow(2).mean(1).sqrt()
    frames = frames[rms > rms.max() * 10 ** (-SPEECH_DB / 20)]
    window = torch.hann_window(size, periodic=False, dtype=torch.float64)

    def autocorr(x):  # (..., size) -> (..., size) normalised to 1 at lag 0
        ac = torch.fft.irfft(torch.fft.rfft(x, 2 * size).abs() ** 2, 2 * size)[..., :size]
        return ac / ac[..., :1].clamp_min(1e-20)

    r = autocorr(frames * window) / autocorr(window).clamp_min(1e-3)
    lo, hi = int(sample_rate / PITCH_CEILING), int(sample_rate / PITCH_FLOOR)
    mid = r[:, lo:hi + 1]
    peak = (mid[:, 1:-1] > mid[:, :-2]) & (mid[:, 1:-1] >= mid[:, 2:])  # local maxima at lags lo+1..hi-1
    height = torch.where(peak, mid[:, 1:-1], torch.zeros_like(mid[:, 1:-1]))
    best = height.max(1).values
    first = (height >= 0.9 * best[:, None]) & peak
    lag = first.float().argmax(1) + lo + 1  # the shortest lag among the near-best peaks
    rows = torch.arange(len(r))
    a, b, c = r[rows, lag - 1], r[rows, lag], r[rows, lag + 1]
    shift = 0.5 * (a - c) / (a - 2 * b + c).where((a - 2 * b + c).abs() > 1e-12, torch.full_like(a, -1e-12))
    voiced = best >= VOICING_THRESHOLD
    f0 = torch.where(voiced, sample_rate / (lag + shift.clamp(-0.5, 0.5)), torch.zeros_like(best))
    return voiced, f0.float()


def pitch_summary(wav):
    """(share of voiced speech frames, median pitch in Hz of the voiced frames or 0)."""
    voiced, f0 = pitch_track(wav)
    if not len(voiced):
        return 0.0, 0.0
    return float(voiced.double().mean()), float(f0[voiced].median()) if voiced.any() else 0.0


def metric_pitch(samples, wavs):
    """voiced per sample; voiced_vs_ref and pitch_st for samples with a reference (`meta['ref']`)."""
    out = {"voiced": {}, "voiced_vs_ref": {}, "pitch_st": {}}
    refs = {}
    for s in samples:
        share, f0 = pitch_summary(wavs[s["id"]])
        out["voiced"][s["id"]] = share
        ref = of_reference(s, refs, pitch_summary)
        if ref is None:
            continue
        ref_share, ref_f0 = ref
        out["voiced_vs_ref"][s["id"]] = share - ref_share
        if min(share, ref_share) >= MIN_VOICED_FOR_PITCH:
            out["pitch_st"][s["id"]] = abs(12 * math.log2(f0 / ref_f0))
    return out


def spread_subset(samples, per_variant):
    """At most `per_variant` samples of each variant, evenly spaced over its samples sorted by id
    (so every prompt and speaker range is visited); 0 keeps all."""
    if not per_variant:
        return list(samples)
    out = []
    for v in sorted({s["variant"] for s in samples}):
        mine = sorted((s for s in samples if s["variant"] == v), key=lambda s: s["id"])
        picks = np.unique(np.linspace(0, len(mine) - 1, min(per_variant, len(mine))).round().astype(int))
        out += [mine[i] for i in picks]
    return out


def metric_dnsmos(samples, wavs, device, batch_size=8, max_windows=None):
    """DNSMOS SIG/BAK/OVR of each sample (dnsmos.py, the speechmos P.835 model in PyTorch);
    `max_windows` scores only a clip's first 9.01 s windows (None: all, as speechmos)."""
    from dnsmos import DNSMOS

    model = DNSMOS().to(device).eval()
    out = {"dnsmos_sig": {}, "dnsmos_bak": {}, "dnsmos_ovr": {}}
    # Identical audio is scored once (a baseline that never hears the reference is the same clip for
    # every voice); clips of one batch must share a length.
    copies, by_length = {}, {}
    for s in samples:
        wav = wavs[s["id"]]
        key = (wav.numel(), hashlib.sha1(wav.numpy().tobytes()).hexdigest())
        if key not in copies:
            by_length.setdefault(wav.numel(), []).append(key)
        copies.setdefault(key, []).append(s["id"])
    with torch.no_grad():
        for keys in by_length.values():
            for j in range(0, len(keys), batch_size):
                chunk = keys[j:j + batch_size]
                batch = torch.stack([wavs[copies[key][0]] for key in chunk]).to(device)
                scores = model(batch, max_windows=max_windows)
                for k in ("sig", "bak", "ovr"):
                    for key, v in zip(chunk, scores[k].tolist()):
                        for i in copies[key]:
                            out[f"dnsmos_{k}"][i] = v
    return out


def normalize_text(text):
    """Lower case, no punctuation, single spaces (what WER is computed on)."""
    text = re.sub(r"[^\w\s']", " ", text.lower()).replace("'", "")
    return " ".join(text.split())


def word_error_rate(reference, hypothesis):
    """Levenshtein distance over words / number of reference words (of normalised text)."""
    from asr import edit_distance

    ref, hyp = normalize_text(reference).split(), normalize_text(hypothesis).split()
    if not ref:
        return float(len(hyp) > 0)
    return edit_distance(ref, hyp) / len(ref)


def metric_wer(samples, wavs, path, device):
    """Whisper (transformers, local weights) transcript vs the spoken text of the prompt."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from duration import spoken_text

    processor = WhisperProcessor.from_pretrained(path)
    model = WhisperForConditionalGeneration.from_pretrained(path).to(device).eval()
    # multilingual checkpoints are told the language; English-only ones have no language tokens
    lang = dict(language="en", task="transcribe") if getattr(model.generation_config, "lang_to_id", None) else {}
    out = {}
    for s in samples:
        target = s["meta"].get("spoken_text") or spoken_text(s["meta"].get("prompt", ""))
        feats = processor(wavs[s["id"]].numpy(), sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        with torch.no_grad():
            ids = model.generate(feats.to(device), **lang)
        out[s["id"]] = word_error_rate(target, processor.batch_decode(ids, skip_special_tokens=True)[0])
    return {"wer": out}


def metric_cer(samples, wavs, path):
    """asr.py's transcript of every sample with a prompt: its character error rate against the prompt's
    spoken text (cer) and the mean against the spoken text of each other prompt of the set (cer_chance)."""
    import asr
    from duration import spoken_text

    model = asr.load_recogniser(path)
    spoken = {s["id"]: spoken_text(s["meta"]["prompt"]) for s in samples if s["meta"].get("prompt")}
    ids = sorted(spoken)
    texts = sorted(set(spoken.values()))
    out = {"cer": {}, "cer_chance": {}}
    for i, hyp in zip(ids, asr.transcribe(model, [wavs[i] for i in ids])):
        out["cer"][i] = asr.char_error_rate(spoken[i], hyp)
        others = [t for t in texts if t != spoken[i]]
        if others:
            out["cer_chance"][i] = sum(asr.char_error_rate(t, hyp) for t in others) / len(others)
    return out


def metric_utmos(samples, wavs, path, device):
    """UTMOS from a TorchScript file: wav (1, N) at 16 kHz -> score."""
    model = torch.jit.load(path, map_location=device).eval()
    with torch.no_grad():
        return {"utmos": {s["id"]: float(model(wavs[s["id"]][None].to(device)).reshape(-1)[0]) for s in samples}}


def metric_aesthetics(samples, path):
    """audiobox-aesthetics CE/CU/PC/PQ with the package's predictor and a local checkpoint."""
    from audiobox_aesthetics.infer import initialize_predictor

    predictor = initialize_predictor(ckpt=path)
    preds = predictor.forward([{"path": s["path"]} for s in samples])
    out = {f"aes_{k.lower()}": {} for k in ("CE", "CU", "PC", "PQ")}
    for s, p in zip(samples, preds):
        for k in ("CE", "CU", "PC", "PQ"):
            out[f"aes_{k.lower()}"][s["id"]] = float(p[k])
    return out


def metric_judge(samples, wavs, path):
    """Speaker judge accuracy (0/1) and margin per sample whose sidecar names a known `speaker`."""
    import judge as judge_lib

    judge = judge_lib.load_judge(path)
    out = {"judge_acc": {}, "judge_margin": {}}
    for s in samples:
        spk = s["meta"].get("speaker")
        if spk is None or spk not in judge.speakers:
            continue
        rep = judge_lib.judge_report(judge, [wavs[s["id"]]], [spk], sample_rate=SAMPLE_RATE)
        out["judge_acc"][s["id"]], out["judge_margin"][s["id"]] = rep["accuracy"], rep["margin"]
    return out


def metric_ge2e(samples, wavs, split=""):
    """GE2E (voice_encoder.py): cosine to the reference of each sample with `meta['ref']`, and with
    a corpus manifest `split`, recognition and margin against its speakers' centroids."""
    import judge as judge_lib
    import voice_encoder as ve

    encoder = ve.load_encoder()
    ids = [s["id"] for s in samples]
    emb = dict(zip(ids, ve.embed(encoder, [wavs[i] for i in ids], names=[s["path"] for s in samples])))
    refs = sorted({s["meta"]["ref"] for s in samples if s["meta"].get("ref")})
    for ref in refs:
        if not os.path.isfile(ref):
            raise FileNotFoundError(f"{ref}: a sample's reference does not exist")
    ref_emb = dict(zip(refs, ve.embed(encoder, [read_mono16k(r) for r in refs], names=refs))) if refs else {}
    out = {"ge2e_sim": {s["id"]: float(emb[s["id"]] @ ref_emb[s["meta"]["ref"]])
                        for s in samples if s["meta"].get("ref")}}
    if split:
        clips, speakers = judge_lib.load_split(split)
        centroids = ve.centroids_from_clips(ve.embed(encoder, clips, names=[f"{split} clip {i}" for i in
                                                                           range(len(clips))]), speakers)
        known = [s for s in samples if s["meta"].get("speaker") in centroids]
        if known:
            correct, margin = ve.clip_scores(torch.stack([emb[s["id"]] for s in known]),
                                             [s["meta"]["speaker"] for s in known], centroids)
            out["ge2e_acc"] = {s["id"]: float(c) for s, c in zip(known, correct)}
            out["ge2e_margin"] = {s["id"]: float(m) for s, m in zip(known, margin)}
    return out


def _ge2e_reason():
    import importlib.util

    if importlib.util.find_spec("resemblyzer") is None:
        return "its weights come from the resemblyzer wheel: pip install --no-deps resemblyzer==0.1.4"
    return None


METRIC_GROUPS = ("spk_sim", "dnsmos", "wer", "utmos", "aesthetics", "judge", "ge2e", "pitch", "cer")


def score_samples(samples, args, device="cpu", groups=METRIC_GROUPS):
    """Run the metric `groups` whose weights are present -> (table, skipped {metric: reason})."""
    unknown = set(groups) - set(METRIC_GROUPS)
    if unknown:
        raise ValueError(f"--metrics: unknown {sorted(unknown)}; choose from {', '.join(METRIC_GROUPS)}")
    wavs = {s["id"]: read_mono16k(s["path"]) for s in samples}
    table, skipped = {}, {}
    jobs = [  # (group, metric names, reason it cannot run or None, function)
        ("spk_sim", ["spk_sim"], _weights_reason(args.wavlm, "--wavlm"),
         lambda: metric_spk_sim(samples, wavs, args.wavlm, device)),
        ("dnsmos", ["dnsmos_sig", "dnsmos_bak", "dnsmos_ovr"], None,
         lambda: metric_dnsmos(spread_subset(samples, args.dnsmos_per_variant), wavs, device,
                               max_windows=args.dnsmos_windows or None)),
        ("wer", ["wer"], _weights_reason(args.whisper, "--whisper"),
         lambda: metric_wer(samples, wavs, args.whisper, device)),
        ("utmos", ["utmos"], _weights_reason(args.utmos, "--utmos"),
         lambda: metric_utmos(samples, wavs, args.utmos, device)),
        ("aesthetics", ["aes_ce", "aes_cu", "aes_pc", "aes_pq"], _weights_reason(args.aesthetics, "--aesthetics"),
         lambda: metric_aesthetics(samples, args.aesthetics)),
        ("judge", ["judge_acc", "judge_margin"], _weights_reason(args.judge, "--judge"),
         lambda: metric_judge(samples, wavs, args.judge)),
        ("ge2e", ["ge2e_sim", "ge2e_acc", "ge2e_margin"], _ge2e_reason(),
         lambda: metric_ge2e(samples, wavs, args.ge2e_split)),
        ("pitch", ["voiced", "voiced_vs_ref", "pitch_st"], None, lambda: metric_pitch(samples, wavs)),
        ("cer", ["cer", "cer_chance"], _weights_reason(args.asr, "--asr"), lambda: metric_cer(samples, wavs, args.asr)),
    ]
    why_empty = {"ge2e_acc": "no speaker split given (--ge2e_split MANIFEST)"} if not args.ge2e_split else {}
    why_empty["ge2e_margin"] = why_empty.get("ge2e_acc")
    for group, names, reason, run in jobs:
        if group not in groups:
            reason = "not requested (--metrics)"
        elif reason is None:
            try:
                for name, values in run().items():
                    add_metric_rows(table, name, values)
            except ImportError as e:  # a module or package this metric needs is not installed
                reason = f"cannot import {e.name or e}: {e}"
        if reason is not None:
            for name in names:
                skipped[name] = reason
        else:
            for name in names:
                if not table.get(name):
                    skipped[name] = (why_empty.get(name)
                                     or "no sample applies (e.g. none has a reference / known speaker)")
                    table.pop(name, None)
    return table, skipped


# -----------------------------------------------------------------------------------------------
# training logs


def read_metrics_jsonl(path):
    files.check_file(path, "--metrics_jsonl")
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not a JSON line ({e})") from e
    return records


# -----------------------------------------------------------------------------------------------
# the LAIONBox protocol


def read_eval_set(path):
    """The eval-set YAML: prompts, speakers {name: wav}, seeds, unconditioned (bool)."""
    from config import read_yaml

    spec = read_yaml(path)  # one clear error for a list, invalid YAML or a file that is not UTF-8
    unknown = set(spec) - {"prompts", "speakers", "seeds", "unconditioned"}
    if unknown:
        raise KeyError(f"{path}: unknown keys {sorted(unknown)} (prompts, speakers, seeds, unconditioned)")
    for key in ("prompts", "seeds"):
        if not spec.get(key):
            raise ValueError(f"{path}: '{key}' must be a non-empty list")
    speakers = spec.get("speakers") or {}
    if not isinstance(speakers, dict):
        raise ValueError(f"{path}: 'speakers' must map a speaker name to a reference wav")
    base = Path(path).parent
    speakers = {str(k): os.path.abspath(v if os.path.isabs(v) else base / v) for k, v in speakers.items()}
    for name, ref in speakers.items():
        if not os.path.isfile(ref):
            raise FileNotFoundError(f"{path}: reference of speaker {name!r} not found: {ref}")
    return {"prompts": [str(p) for p in spec["prompts"]], "speakers": speakers,
            "seeds": [int(s) for s in spec["seeds"]], "unconditioned": bool(spec.get("unconditioned", True))}


def laionbox_items(spec):
    """prompts x speakers x seeds (conditioned), then prompts x seeds with no reference."""
    items = [{"prompt_index": i, "prompt": p, "speaker": name, "ref": ref, "seed": seed}
             for i, p in enumerate(spec["prompts"]) for name, ref in spec["speakers"].items() for seed in spec["seeds"]]
    if spec["unconditioned"]:
        items += [{"prompt_index": i, "prompt": p, "speaker": None, "ref": None, "seed": seed}
                  for i, p in enumerate(spec["prompts"]) for seed in spec["seeds"]]
    return items


def generate_eval_set(items, pipeline, out_dir, *, variant, settings, sample_kwargs):
    """Sample every item with sampler.sample() into `out_dir` (wav + sidecar); returns the wav paths.

    pipeline: (model, codec, text_encoder, connector, adaln, speaker). Unconditioned items run
    with ref_mode none."""
    from duration import spoken_text
    from sampler import sample

    model, codec, text_encoder, connector, adaln, speaker = pipeline
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for conditioned in (True, False):
        group = [it for it in items if (it["ref"] is not None) == conditioned]
        if not group:
            continue
        mode = sample_kwargs.get("ref_mode", "adaln") if conditioned else "none"
        kwargs = dict(sample_kwargs, ref_mode=mode)
        wavs = sample(model, codec, text_encoder, connector, [it["prompt"] for it in group],
                      seeds=[it["seed"] for it in group], ref_wavs=[it["ref"] for it in group],
                      adaln=adaln, speaker=speaker, **kwargs)
        for it, wav in zip(group, wavs):
            name = f"p{it['prompt_index']:02d}_{it['speaker'] or 'uncond'}_seed{it['seed']}"
            path = os.path.join(out_dir, name + ".wav")
            meta = dict(settings, variant=variant, prompt=it["prompt"], seed=it["seed"], ref=it["ref"],
                        speaker=it["speaker"], ref_mode=mode, spoken_text=spoken_text(it["prompt"]))
            write_wav(path, wav, codec.output_rate, meta)
            paths.append(path)
    return paths


# -----------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    import sample as sample_lib

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", nargs="*", default=[], help="directories of wav + json sidecars")
    p.add_argument("--baseline", default="", help="variant the others are compared with")
    p.add_argument("--out", default="report.html")
    p.add_argument("--title", default="speakerbox evaluation")
    p.add_argument("--metrics_jsonl", nargs="*", default=[], help="training logs to plot (name=path or path)")
    p.add_argument("--wavlm", default="", help="local microsoft/wavlm-base-plus-sv directory (spk_sim)")
    p.add_argument("--whisper", default="", help="local Whisper directory (wer)")
    p.add_argument("--utmos", default="", help="UTMOS TorchScript file")
    p.add_argument("--aesthetics", default="", help="audiobox-aesthetics checkpoint")
    p.add_argument("--judge", default="", help="speaker judge (judge.py) checkpoint")
    p.add_argument("--asr", default="", help="recogniser (asr.py) file for cer / cer_chance")
    p.add_argument("--metrics", default=",".join(METRIC_GROUPS), help="comma list of metric groups to run")
    p.add_argument("--ge2e_split", default="", help="corpus manifest whose speakers' centroids the GE2E "
                   "identification uses (ge2e_acc, ge2e_margin)")
    p.add_argument("--dnsmos_windows", type=int, default=0, help="score only the first N 9 s windows (0: all)")
    p.add_argument("--dnsmos_per_variant", type=int, default=0, help="score N samples of each variant (0: all)")
    p.add_argument("--player_rate", type=int, default=16000,
                   help=f"rate of the embedded Opus players, one of {OPUS_RATES} (0: the files as they are)")
    p.add_argument("--scores", default="", help="also write the per-sample table as JSON here")
    g = p.add_argument_group("generating an eval set first (sample.py's flags apply)")
    g.add_argument("--eval_set", default="", choices=["", "laionbox"])
    g.add_argument("--eval_yaml", default="", help="prompts, speakers, seeds, unconditioned")
    g.add_argument("--variant", default="model", help="variant name of the generated samples")
    g.add_argument("--samples_dir", default="eval_samples", help="generated samples go to <samples_dir>/<variant>")
    sample_lib.add_model_args(g, required=False)
    sample_lib.add_guidance_args(g)
    return p.parse_args(argv)


def main(argv=None):
    import sample as sample_lib

    args = parse_args(argv)
    if args.player_rate and args.player_rate not in OPUS_RATES:
        raise SystemExit(f"--player_rate {args.player_rate}: Opus encodes only "
                         f"{', '.join(map(str, OPUS_RATES))} Hz (or 0: the files as they are)")
    device = sample_lib.resolve_device(args.device)
    dirs = list(args.samples)
    for d in dirs:  # before minutes of generating or scoring
        if not os.path.isdir(d):
            raise FileNotFoundError(f"--samples {d}: not a directory")
    curves = {}
    for spec in args.metrics_jsonl:
        name, path = spec.split("=", 1) if "=" in spec else (Path(spec).parent.name, spec)
        curves[name] = read_metrics_jsonl(path)
    if args.eval_set:
        if not args.eval_yaml or not args.ckpt:
            raise SystemExit("--eval_set laionbox needs --eval_yaml and --ckpt (plus sample.py's model flags)")
        spec = read_eval_set(args.eval_yaml)
        pipeline = sample_lib.load_pipeline(args, device, sample_lib.compute_dtype(device, args.dtype))
        out_dir = os.path.join(args.samples_dir, args.variant)
        kwargs = sample_lib.sample_kwargs(args, device)
        generate_eval_set(laionbox_items(spec), pipeline, out_dir, variant=args.variant,
                          settings={k: v for k, v in vars(args).items() if k != "samples"}, sample_kwargs=kwargs)
        dirs.append(out_dir)
    if not dirs:
        raise SystemExit("give --samples DIR ... or --eval_set laionbox")
    samples = load_samples(dirs)
    table, skipped = score_samples(samples, args, device, [g.strip() for g in args.metrics.split(",") if g.strip()])
    page = render_html(samples, table, skipped, metric_info=METRIC_INFO, baseline=args.baseline or None,
                       curves=curves, title=args.title, player_rate=args.player_rate,
                       settings={"argv": sys.argv[1:] if argv is None else argv})
    Path(args.out).write_text(page)
    if args.scores:
        Path(args.scores).write_text(json.dumps({"scores": table, "skipped": skipped}, indent=2))
    for m, reason in skipped.items():
        print(f"{m}: skipped ({reason})")
    for m, per_variant in summarize(samples, table).items():
        print(m + "  " + "  ".join(f"{v}={format_ci(mean, ci)}" for v, (n, mean, ci) in per_variant.items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from config import run_cli

    run_cli(main)
