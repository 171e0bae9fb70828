"""Training data: a JSONL manifest, a validated per-item cache, the DramaBox example format, and a
deterministic, resumable, sharded sampler.

    python data.py prepare [configs/x.yaml ...] --manifest=data/train.jsonl [--val_manifest=...] --cache_dir=cache
    python data.py scan_precomputed DIR        # check an official ltx-trainer `.precomputed` dir
    python data.py fit_codec [configs/x.yaml ...] --manifest=data/train.jsonl --mel_basis=basis.safetensors
                                               # the mel codec's basis (mel_basis_dim > 0) from the manifest's audio

Training reads it back with `load_cached`, draws global batches with `BatchSampler`, takes this
rank's share with `micro_batches` and builds each micro-batch with `collate`.

Manifest: one JSON object per line,
    {"audio": "clips/a.wav", "text": "A calm voice says ...", "speaker": "spk1",
     "ref_audio": "clips/a_ref.wav", "source": "emilia", "id": "optional-unique-id"}
Relative paths are relative to the manifest's directory. `speaker`, `ref_audio`, `source` and `id`
are optional.

Cache, one per split (`cache_dir/train`, `cache_dir/val`): `items/<sha1(id)>.safetensors` per item
(latent (T, F), valid text tokens (L, D), speaker features), `shared.safetensors` (the codec's
latent of silence, the text features of the empty prompt) and `index.json`. Every item file records
in its metadata the hash of the settings and model fingerprints that made it and the size/mtime of
its source files; `prepare` re-encodes whenever either differs instead of reusing a stale entry.

DramaBox format (its voice-clone IC-LoRA training mix): each training example is voice-clone *forward* (target = the item,
reference = another utterance of its speaker or its `ref_audio`), *reverse* (the two roles
swapped), or *unconditional* (no reference), with probabilities `clone_probs`. The reference is
appended after the target as clean tokens (σ = 0, excluded from the loss) whose positions start
`ref_offset_s` after the target's end; target tokens may attend to it, it may not attend to the
target. 0..`max_silence_frames` latent frames of silence are prepended to the target, and the text
is replaced by the empty prompt's features with probability `text_dropout`.
"""

import dataclasses
import hashlib
import json
import math
import os
import sys
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from safetensors import safe_open
from tqdm import tqdm

import files
from audio import REF_PEAK, SAMPLE_RATE, resample
from codec import to_channels
from encoders import load_models  # the codec, text encoder and speaker extractors the cache is made with
from model import audio_positions, audio_progress, video_positions
from text import left_pad_features, progress_table, spoken_progress

CACHE_VERSION = 3  # bump when the layout of a cache entry changes (3: text_progress)
SILENT_PEAK = 1e-4  # a clip whose peak is below -80 dBFS is treated as silent (no usable speech)
MANIFEST_KEYS = {"audio", "text", "speaker", "ref_audio", "source", "id"}
MODES = ("forward", "reverse", "uncond")


class BadInput(ValueError):
    """An input that cannot become a training item; `reason` is the summary's counter key."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------------------------
# Manifest


@dataclass
class Item:
    """One validated manifest line."""

    id: str
    audio: str  # absolute path
    text: str  # may be empty: prepare rejects it (or skips it with skip_bad)
    speaker: str
    ref_audio: str  # absolute path or ""
    source: str
    where: str  # "manifest.jsonl:12", for error messages


def read_manifest(path):
    """Parse and validate a JSONL manifest; structural errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    root = path.parent
    items, seen, seen_audio = [], {}, {}
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}: not UTF-8 (byte {e.start}, line {line}); save the manifest as UTF-8") from None
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        where = f"{path}:{lineno}"
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: each line must be a JSON object, got {type(row).__name__}")
        unknown = set(row) - MANIFEST_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(MANIFEST_KEYS)}")
        if not isinstance(row.get("audio"), str) or not row["audio"].strip():
            raise ValueError(f"{where}: 'audio' (a path) is required")
        for key in MANIFEST_KEYS - {"audio"}:
            if row.get(key) is not None and not isinstance(row[key], str):
                raise ValueError(f"{where}: '{key}' must be a string, got {row[key]!r}")
        audio = os.path.realpath(root / row["audio"])  # links and ./, ../ spellings name one file
        ref = os.path.realpath(root / row["ref_audio"]) if row.get("ref_audio") else ""
        item_id = row.get("id") or row["audio"]
        if item_id in seen:
            raise ValueError(f"{where}: duplicate item id '{item_id}' (first at line {seen[item_id]})")
        if not row.get("id") and audio in seen_audio:
            raise ValueError(f"{where}: duplicate item: {row['audio']!r} is the file of line {seen_audio[audio]} "
                             f"({audio}); give each an 'id' if both are meant")
        seen[item_id] = lineno
        seen_audio.setdefault(audio, lineno)
        items.append(Item(item_id, audio, (row.get("text") or "").strip(), row.get("speaker") or "",
                          ref, row.get("source") or "default", where))
    if not items:
        raise ValueError(f"manifest {path} has no items")
    return items


# ----------------------------------------------------------------------------------------------
# Audio reading and validation


def read_audio(path, sample_rate, channels, min_seconds=0.0, max_seconds=math.inf):
    """Read `path` as float32 (channels, N) at `sample_rate`, or raise BadInput naming the file.

    Rejects missing, unreadable, empty, non-finite and silent audio and clips outside [min, max] s.
    A different sample rate is not an error: the audio is resampled. Returns (wav, resampled).
    (codec.load_audio reads files too, but prepare needs to know *why* a file is bad, to count it.)
    """
    if not os.path.isfile(path):
        raise BadInput("missing_file", f"{path}: file not found")
    missing = wav_shortfall(path)
    if missing:
        raise BadInput("truncated", f"{path}: truncated WAV: its header announces {missing} more bytes of audio "
                                    "than the file holds")
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)  # (N, C)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / OSError
        raise BadInput("unreadable", f"{path}: cannot read audio ({e})") from None
    if data.shape[0] == 0:
        raise BadInput("empty", f"{path}: audio is empty (0 samples)")
    if not np.isfinite(data).all():
        raise BadInput("nan", f"{path}: audio contains NaN or Inf samples")
    if np.abs(data).max() < SILENT_PEAK:
        raise BadInput("silent", f"{path}: audio is silent (peak {np.abs(data).max():.2e} < {SILENT_PEAK})")
    seconds = data.shape[0] / sr
    if seconds < min_seconds:
        raise BadInput("too_short", f"{path}: {seconds:.2f} s is shorter than min_seconds={min_seconds}")
    if seconds > max_seconds:
        raise BadInput("too_long", f"{path}: {seconds:.2f} s is longer than max_seconds={max_seconds}")
    wav = to_channels(torch.from_numpy(data.T.copy()), channels)  # (C, N)
    wav = resample(wav, sr, sample_rate)
    return wav, sr != sample_rate


def wav_shortfall(path):
    """Bytes of audio a RIFF/WAVE file's `data` chunk announces beyond the end of the file (0 when
    complete, or not a WAV): libsndfile reads a cut-off WAV up to where it ends without a word."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return 0
        while len(chunk := f.read(8)) == 8:
            n = int.from_bytes(chunk[4:], "little")
            if chunk[:4] == b"data":
                # 0 and 0xFFFFFFFF: a streamed WAV whose writer never filled in the size
                return 0 if n in (0, 0xFFFFFFFF) else max(0, f.tell() + n - size)
            f.seek(n + (n & 1), 1)  # chunks are padded to an even size
    return 0


def file_stamp(path):
    """Size and modification time of a source file: a change means its cache entry is stale."""
    if not path:
        return ""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


# ----------------------------------------------------------------------------------------------
# prepare: manifest -> cache


def settings_hash(cfg, codec, fingerprints):
    """Hash of everything that determines the content of a cache entry (not which items pass)."""
    settings = {"version": CACHE_VERSION, "codec": cfg.codec, "codec_ckpt": cfg.codec_ckpt,
                "sample_rate": codec.sample_rate, "channels": codec.channels, "text_encoder": cfg.text_encoder,
                "fingerprints": fingerprints}  # the text and speaker fingerprints cover their own settings
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def cache_settings(cfg):
    """The config values a cache's tensors depend on, by key: `prepare` records them in index.json and
    training compares its own config with them (`check_cache_settings`). Speaker features are
    what stage 2 reads."""
    keys = ["codec", "text_encoder", "max_text_len", "speaker_extractors", "speaker_paths"]
    keys += ["mel_n_mels", "mel_n_fft", "mel_mean", "mel_std", "mel_basis_dim", "mel_basis"] if cfg.codec == "mel" \
        else ["codec_ckpt"]
    if cfg.text_encoder == "byte" or not (cfg.text_ckpt or cfg.ckpt):
        keys.append("seed")  # it draws the byte encoder's Gemma, and a projection no checkpoint gives
    return {k: getattr(cfg, k) for k in keys}


def check_cache_settings(cfg, cache_dir):
    """Raise a ValueError naming every setting in which `cfg` differs from the one that prepared the
    cache in `cache_dir` (a model trained on latents of other mel settings, or text features of
    another encoder, would learn and then sample with the wrong ones)."""
    index_path = Path(cache_dir) / "index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path} not found: run `python data.py prepare` first")
    try:
        recorded = json.loads(index_path.read_text()).get("settings")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{index_path}: damaged cache index ({e}); re-run `python data.py prepare`") from None
    if recorded is None:
        raise ValueError(f"{index_path}: the cache does not record the settings it was made with; re-run "
                         "`python data.py prepare` with this config (it reuses every entry still valid)")
    reads_speaker = cfg.stage == "adaln" or (cfg.stage == "lora" and cfg.lora_speaker)
    ignored = () if reads_speaker else ("speaker_extractors", "speaker_paths")  # only the speaker path reads them
    differ = [f"{k}={recorded[k]!r} (this run: {getattr(cfg, k)!r})" for k in sorted(recorded)
              if k not in ignored and hasattr(cfg, k) and recorded[k] != getattr(cfg, k)]
    if differ:
        raise ValueError(f"{index_path}: the cache was prepared with {', '.join(differ)}; re-run "
                         "`python data.py prepare` with this run's settings, or train with the cache's")


def entry_path(cache_dir, item_id):
    return Path(cache_dir) / "items" / f"{hashlib.sha1(item_id.encode()).hexdigest()[:20]}.safetensors"


def save_atomic(tensors, path, metadata):
    """A cache file, written atomically (files.save_safetensors): a crash never leaves half a file.
    Not fsynced: a cache holds one file per clip, and `entry_is_fresh` re-encodes any it cannot read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    files.save_safetensors(tensors, path, metadata, durable=False)


def entry_is_fresh(path, fingerprint, item):
    """True when `path` exists and was made by the same settings/models from the same files/text."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # a corrupt entry is re-encoded, not trusted
        return False
    return (meta.get("fingerprint") == fingerprint and meta.get("audio_stamp") == file_stamp(item.audio)
            and meta.get("ref_stamp") == file_stamp(item.ref_audio) and meta.get("text") == item.text)


@torch.inference_mode()
def encode_text(text_encoder, prompt):
    """Text features of the valid tokens only: (L, D); padding rows are dropped from the cache."""
    features, mask = text_encoder.encode([prompt])  # (1, Lmax, D), (1, Lmax)
    return features[0][mask[0].bool()].float()


def text_progress(text_encoder, prompt):
    """The valid tokens' progress through the spoken words, (L,) as `encode_text`'s rows, or None for
    a text encoder that has none (`TextEncoder.has_progress`: the byte encoder's)."""
    if not getattr(text_encoder, "has_progress", False):
        return None
    return spoken_progress(prompt, text_encoder.max_text_len)


@torch.inference_mode()
def encode_clip(path, cfg, codec, speaker, device):
    """Latent (T, F) and speaker features (dim,) or None of one audio file; BadInput on bad audio."""
    wav, resampled = read_audio(path, codec.sample_rate, codec.channels, cfg.min_seconds, cfg.max_seconds)
    latent = codec.encode(wav[None].to(device))[0].float()  # (T, F)
    spk = None
    if speaker is not None:
        wav16, _ = read_audio(path, SAMPLE_RATE, 1)  # speaker extractors take 16 kHz mono
        wav16 = wav16 * (REF_PEAK / wav16.abs().max())  # as sample.py normalises a --ref
        spk = speaker(wav16.to(device))[0].float()  # (dim,)
    return latent, spk, resampled


@torch.inference_mode()
def silence_latent(codec, device):
    """The codec's latent of digital silence, one frame (F,). The last frame of 1 s of zeros is past
    the causal encoder's start-up, so it is the steady state that prepended silence should have."""
    zeros = torch.zeros(1, codec.channels, codec.sample_rate, device=device)
    return codec.encode(zeros)[0, -1].float()


def prepare(cfg, codec, text_encoder, speaker, fingerprints, device=torch.device("cpu")):
    """Encode `cfg.manifest` into `cache_dir/train` and `cfg.val_manifest` (if set) into
    `cache_dir/val`; returns {split: summary counters}."""
    splits = {"train": cfg.manifest, "val": cfg.val_manifest}
    return {split: prepare_split(cfg, manifest, Path(cfg.cache_dir) / split, codec, text_encoder, speaker,
                                 fingerprints, device)
            for split, manifest in splits.items() if manifest}


def prepare_split(cfg, manifest, cache_dir, codec, text_encoder, speaker, fingerprints, device=torch.device("cpu")):
    """Encode every item of `manifest` into `cache_dir`; returns the summary counters.

    Items whose entry is fresh (same settings hash, same source size/mtime, same text) are reused.
    Bad inputs raise BadInput naming the file, or with `cfg.skip_bad` are skipped and counted.
    """
    items = read_manifest(manifest)
    cache_dir = Path(cache_dir)
    fingerprint = settings_hash(cfg, codec, fingerprints)
    counts = Counter()
    index, skipped_items = [], []
    # (file and stamp, encode_clip's result) of the last clip: a manifest that lists one clip under several
    # texts in a row (the base's corpus: each clip, then under its voice's description) encodes it once;
    # only the last is kept, so memory does not grow with the manifest
    last_clip = (None, None)
    for item in tqdm(items, desc="prepare", unit="item", file=sys.stderr):
        path = entry_path(cache_dir, item.id)
        try:
            if not item.text:
                raise BadInput("missing_text", f"{item.where}: item '{item.id}' ({item.audio}) has no text")
            if entry_is_fresh(path, fingerprint, item):
                counts["reused"] += 1
                with safe_open(str(path), "pt") as f:
                    frames = int(f.metadata()["frames"])
            else:
                key = (str(item.audio), file_stamp(item.audio))
                if last_clip[0] != key:
                    last_clip = (key, encode_clip(item.audio, cfg, codec, speaker, device))
                latent, spk, resampled = last_clip[1]
                tensors = {"latent": latent, "text": encode_text(text_encoder, item.text)}
                progress = text_progress(text_encoder, item.text)
                if progress is not None:
                    tensors["text_progress"] = progress
                if spk is not None:
                    tensors["speaker"] = spk
                if item.ref_audio:
                    ref_latent, ref_spk, ref_resampled = encode_clip(item.ref_audio, cfg, codec, speaker, device)
                    tensors["ref_latent"] = ref_latent
                    if ref_spk is not None:
                        tensors["ref_speaker"] = ref_spk
                    resampled = resampled or ref_resampled
                frames = latent.shape[0]
                save_atomic(tensors, path, {"fingerprint": fingerprint, "audio_stamp": file_stamp(item.audio),
                                            "ref_stamp": file_stamp(item.ref_audio), "text": item.text,
                                            "id": item.id, "frames": str(frames)})
                counts["encoded"] += 1
                counts["resampled"] += int(resampled)
        except BadInput as e:
            if not cfg.skip_bad:
                raise
            counts[f"skipped:{e.reason}"] += 1
            skipped_items.append({"where": item.where, "audio": item.audio, "reason": e.reason, "message": str(e)})
            continue
        index.append({"id": item.id, "file": path.name, "speaker": item.speaker, "source": item.source,
                      "frames": frames, "has_ref": bool(item.ref_audio)})
    if not index:
        raise ValueError(f"{manifest}: no usable items (summary: {dict(counts)})")
    shared = {"silence": silence_latent(codec, device), "null_text": encode_text(text_encoder, "")}
    save_atomic(shared, cache_dir / "shared.safetensors", {"fingerprint": fingerprint})
    skipped_path = write_skipped(cache_dir, skipped_items)
    files.write_text(cache_dir / "index.json", json.dumps({"version": CACHE_VERSION, "fingerprint": fingerprint,
                               "fingerprints": fingerprints, "tokens_per_second": codec.tokens_per_second,
                               "max_text_len": cfg.max_text_len, "settings": cache_settings(cfg),
                               "text_progress": bool(getattr(text_encoder, "has_progress", False)),
                               "manifest": str(Path(manifest).resolve()), "manifest_stamp": file_stamp(manifest),
                               "items": index, "config": dataclasses.asdict(cfg)}, indent=1))
    skipped = {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("skipped:")}
    print(f"prepare {manifest}: {counts['encoded']} encoded, {counts['reused']} reused, "
          f"{sum(skipped.values())} skipped {skipped}, {counts['resampled']} resampled -> {cache_dir}"
          + (f" (the skipped files and why: {skipped_path})" if skipped_path else ""))
    return counts


def write_skipped(cache_dir, skipped_items):
    """`cache_dir/skipped.jsonl`: one line per input `skip_bad` left out (manifest line, file, reason,
    message), so that none is lost without a name; removed when nothing was skipped. Returns its
    path, or None."""
    path = Path(cache_dir) / "skipped.jsonl"
    if not skipped_items:
        path.unlink(missing_ok=True)  # a previous run's list would name files that are fine now
        return None
    files.write_text(path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped_items))
    return path


def prepared_config(cfg, split="train"):
    """(the config that prepared the cache of `split`, as a dict, and its speaker extractors'
    fingerprint) from its index.json: what sampling must build the codec, text encoder and speaker
    extractors from. (None, "") for a cache made before the config was recorded."""
    index_path = Path(cfg.cache_dir) / split / "index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, ""
    return index.get("config"), (index.get("fingerprints") or {}).get("speaker", "")


# ----------------------------------------------------------------------------------------------
# DramaBox examples


def make_example(rng, cfg, target, ref, text, speaker, *, silence, null_text, tokens_per_second, mode,
                 item_id, source, progress=None):
    """One training example: silence + target latent, an optional reference, text, speaker.

    target (T, F), ref (Tr, F) or None, text (L, D), speaker (dim,) or None; silence (F,) or None;
    progress (L,) the text tokens' place in the spoken words (`text.spoken_progress`) or None.
    """
    if progress is None:
        progress = torch.zeros(0)
    elif len(progress) != text.shape[0]:
        raise ValueError(f"item '{item_id}': {len(progress)} text progress values for {text.shape[0]} cached text "
                         "tokens: a damaged cache entry; run prepare again")
    if ref is not None:
        max_ref = round(cfg.ref_max_seconds * tokens_per_second)
        if ref.shape[0] > max_ref:  # DramaBox uses ~10 s references: take a random window
            start = int(rng.integers(0, ref.shape[0] - max_ref + 1))
            ref = ref[start:start + max_ref]
    n_silence = int(rng.integers(0, cfg.max_silence_frames + 1)) if silence is not None else 0
    if n_silence:
        target = torch.cat([silence.expand(n_silence, -1), target])
    if rng.random() < cfg.text_dropout:
        text, progress = null_text, torch.zeros(0)
    return {"target": target, "ref": ref, "text": text, "speaker": speaker, "mode": mode,
            "silence": n_silence, "id": item_id, "source": source, "progress": progress}


def load_cached(cfg, manifest, split="train"):
    """The cache of `manifest` made by `prepare` (`cache_dir/<split>`); an error if it was made from
    another manifest or the manifest changed since (run prepare again: it re-encodes only what changed)."""
    dataset = CachedDataset(Path(cfg.cache_dir) / split, cfg)
    if dataset.manifest != str(Path(manifest).resolve()) or dataset.manifest_stamp != file_stamp(manifest):
        raise ValueError(f"{dataset.cache_dir} was prepared from {dataset.manifest} (stamp {dataset.manifest_stamp}),"
                         f" not the current {manifest} (stamp {file_stamp(manifest)}): run `python data.py prepare`")
    return dataset


# A cache whose item files add up to no more than this is held in memory after each item's first read:
# the tiny preset reads 32 entries per step (an item and its partner), and reading and checking them
# from disk each time was ~30 ms of a ~400 ms base step on a 2-core CPU. A full-size cache (MBs of text
# features per item) is read from disk every time, as before.
HOLD_CACHE_BYTES = 512 << 20


class CachedDataset:
    """Items of a cache made by `prepare`, turned into DramaBox examples."""

    def __init__(self, cache_dir, cfg):
        self.cache_dir = Path(cache_dir)
        index_path = self.cache_dir / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} not found: run `python data.py prepare` first")
        index = json.loads(index_path.read_text())
        if index.get("version") != CACHE_VERSION:
            raise ValueError(f"{index_path}: cache version {index.get('version')} != {CACHE_VERSION}; re-run prepare")
        shared = files.load_safetensors(self.cache_dir / "shared.safetensors")
        self.silence, self.null_text = shared["silence"], shared["null_text"]
        if index["max_text_len"] != cfg.max_text_len:
            raise ValueError(f"{index_path}: text features were cached with max_text_len={index['max_text_len']}, "
                             f"the config says {cfg.max_text_len}; use the same value or re-run prepare")
        self.cfg = cfg
        self.tokens_per_second = index["tokens_per_second"]
        self.has_progress = bool(index.get("text_progress"))  # entries carry text_progress (the byte encoder's)
        self.manifest, self.manifest_stamp = index["manifest"], index["manifest_stamp"]
        self.items = index["items"]
        self.lengths = [e["frames"] for e in self.items]
        self.sources = [e["source"] for e in self.items]
        self.by_speaker = defaultdict(list)
        for i, e in enumerate(self.items):
            if e["speaker"]:
                self.by_speaker[e["speaker"]].append(i)
        total = 0
        for e in self.items:  # stops at the first file past the budget: a large cache costs few stats
            total += (self.cache_dir / "items" / e["file"]).stat().st_size
            if total > HOLD_CACHE_BYTES:
                break
        self.held = {} if total <= HOLD_CACHE_BYTES else None  # item -> tensors, for a small cache

    def __len__(self):
        return len(self.items)

    def load(self, i):
        """Item `i`'s cached tensors (treated as read-only: a small cache hands out the same ones again)."""
        if self.held is None:
            return files.load_safetensors(self.cache_dir / "items" / self.items[i]["file"])
        if i not in self.held:
            self.held[i] = files.load_safetensors(self.cache_dir / "items" / self.items[i]["file"])
        return self.held[i]

    def example(self, i, rng):
        """Example for item `i`: mode drawn from `clone_probs`; the partner is the item's ref_audio
        or another utterance of its speaker. Reverse needs a partner with text (a manifest item), so
        with a ref_audio partner it becomes forward; without any partner the example is unconditional.
        The speaker features come from the reference side (the partner, or the item in reverse), and
        from the target itself only when the speaker has no other utterance."""
        cfg, entry, own = self.cfg, self.items[i], self.load(i)
        mode = MODES[int(rng.choice(3, p=np.asarray(cfg.clone_probs) / sum(cfg.clone_probs)))]
        others = [j for j in self.by_speaker.get(entry["speaker"], []) if j != i]
        partner = None
        if "ref_latent" in own:
            partner = {"latent": own["ref_latent"], "speaker": own.get("ref_speaker"), "text": None}
        elif others:
            p = self.load(others[int(rng.integers(len(others)))])
            partner = {"latent": p["latent"], "speaker": p.get("speaker"), "text": p["text"],
                       "progress": p.get("text_progress")}
        if mode == "reverse" and (partner is None or partner["text"] is None):
            mode = "forward"
        if partner is None:
            mode = "uncond"
        if mode == "reverse":
            target, ref, text, spk = partner["latent"], own["latent"], partner["text"], own.get("speaker")
            progress = partner["progress"]
        else:
            target, text, progress = own["latent"], own["text"], own.get("text_progress")
            ref = partner["latent"] if mode == "forward" else None
            spk = partner["speaker"] if partner is not None else own.get("speaker")
        return make_example(rng, cfg, target, ref, text, spk, silence=self.silence, null_text=self.null_text,
                            tokens_per_second=self.tokens_per_second, mode=mode, item_id=entry["id"],
                            source=entry["source"], progress=progress)


def pad_examples(examples, ref_offset_s, tokens_per_second, max_text_len):
    """Pad examples to the longest and build the masks of the DramaBox sequence [target | ref].

    Returns x0 (B, T, F); loss_mask (B, T) target tokens; ref_mask (B, T) reference tokens, which get
    σ = 0 (also under `timestep_mask`); positions (B, T) seconds, the reference starting
    `ref_offset_s` after the target's end; attn_mask (B, T, T) bool [query, key], True = may attend;
    text (B, max_text_len, D) left-padded exactly as the tokenizer pads at inference, text_mask
    (B, max_text_len): the connector's RoPE runs over positions 0..max_text_len-1, so a shorter pad
    would train the tokens at other positions than sampling uses; text_progress (B, max_text_len) and
    audio_progress (B, T) for a DiT with a progress rope (`model.AudioDiT.forward`); speaker (B, dim) or None,
    speaker_present (B,); target_len (B,); ids, modes, sources.
    """
    B = len(examples)
    n_target = [e["target"].shape[0] for e in examples]
    n_ref = [0 if e["ref"] is None else e["ref"].shape[0] for e in examples]
    T = max(t + r for t, r in zip(n_target, n_ref))
    F = examples[0]["target"].shape[1]
    x0 = torch.zeros(B, T, F)
    loss_mask = torch.zeros(B, T, dtype=torch.bool)
    ref_mask = torch.zeros(B, T, dtype=torch.bool)
    positions = torch.zeros(B, T)
    for b, e in enumerate(examples):
        t, r = n_target[b], n_ref[b]
        x0[b, :t] = e["target"]
        loss_mask[b, :t] = True
        positions[b, :t] = audio_positions(t, 1, 0.0)[0]
        if r:
            x0[b, t:t + r] = e["ref"]
            ref_mask[b, t:t + r] = True
            positions[b, t:t + r] = audio_positions(r, 1, t / tokens_per_second + ref_offset_s)[0]
    text, text_mask = left_pad_features([e["text"].float() for e in examples], max_text_len)
    text_progress = progress_table([e.get("progress", torch.zeros(0)) for e in examples], max_text_len)
    valid = loss_mask | ref_mask
    # target queries see every real token; reference queries see only the reference; padding keys
    # are hidden from all. The diagonal keeps padding query rows non-empty (no NaN in softmax).
    attn_mask = (loss_mask[:, :, None] & valid[:, None, :]) | (ref_mask[:, :, None] & ref_mask[:, None, :])
    attn_mask |= torch.eye(T, dtype=torch.bool)[None]
    present = [e["speaker"] is not None for e in examples]
    speaker = None
    if any(present):
        dim = next(e["speaker"] for e in examples if e["speaker"] is not None).shape[0]
        speaker = torch.stack([e["speaker"].float() if e["speaker"] is not None else torch.zeros(dim)
                               for e in examples])
    return {"x0": x0, "loss_mask": loss_mask, "ref_mask": ref_mask, "timestep_mask": ref_mask,
            "positions": positions, "attn_mask": attn_mask, "text": text, "text_mask": text_mask,
            "text_progress": text_progress, "audio_progress": audio_progress(n_target, T),
            "speaker": speaker, "speaker_present": torch.tensor(present), "target_len": torch.tensor(n_target),
            "ids": [e["id"] for e in examples], "modes": [e["mode"] for e in examples],
            "sources": [e["source"] for e in examples]}


# ----------------------------------------------------------------------------------------------
# Sampling: weighted source mixing, length buckets, rank shards, resumable order


class BatchSampler:
    """Global batches of item indices, a pure function of (seed, epoch), resumable mid-epoch.

    An epoch is len(items) draws. With `source_weights` (source -> weight) each draw picks a source
    by weight, then that source's next item (its own shuffled order, reshuffled when used up), so
    small sources repeat and large ones are subsampled; without weights it is one shuffled pass.
    Length buckets: the draws of `bucket_batches` global batches are sorted by length together and
    cut into global batches, whose order is then shuffled; a global batch stays sorted, so the
    micro-batches that `micro_batches` cuts from it hold similar lengths (little padding). The
    partial last global batch is dropped. Every rank computes the same global batches and takes its
    own share, so the run does not depend on the number of ranks.
    """

    def __init__(self, dataset, global_batch, seed=0, source_weights=None, bucket_batches=32):
        self.lengths, self.sources = np.asarray(dataset.lengths), list(dataset.sources)
        self.global_batch, self.seed, self.bucket_batches = global_batch, seed, bucket_batches
        self.weights = dict(source_weights or {})
        present = set(self.sources)
        if self.weights:
            missing = sorted(present - set(self.weights))
            if missing:
                raise ValueError(f"sources {missing} have no weight in `sources` {self.weights} (give 0 to leave out)")
            empty = sorted(s for s, w in self.weights.items() if w > 0 and s not in present)
            if empty:
                raise ValueError(f"sources {empty} have a weight in `sources` but no items")
        if len(self.lengths) < global_batch:
            raise ValueError(f"{len(self.lengths)} items are fewer than one global batch ({global_batch})")
        self.epoch, self.position = 0, 0  # position: global batches of `epoch` already handed out
        self._plan = None

    def draws(self, rng):
        """Item indices of one epoch, in draw order."""
        n = len(self.lengths)
        if not self.weights:
            return rng.permutation(n)
        names = sorted(s for s, w in self.weights.items() if w > 0)
        p = np.array([self.weights[s] for s in names], dtype=np.float64)
        pools = {s: np.flatnonzero(np.asarray(self.sources) == s) for s in names}
        orders, cursor, out = {s: rng.permutation(pools[s]) for s in names}, Counter(), []
        for k in rng.choice(len(names), size=n, p=p / p.sum()):
            s = names[k]
            if cursor[s] == len(orders[s]):
                orders[s], cursor[s] = rng.permutation(pools[s]), 0
            out.append(orders[s][cursor[s]])
            cursor[s] += 1
        return np.asarray(out)

    def plan(self, epoch):
        """The global batches of `epoch`: a list of lists of item indices, each sorted by length."""
        rng = np.random.default_rng([self.seed, epoch])
        gb = self.global_batch
        draws = self.draws(rng)
        draws = draws[:len(draws) // gb * gb]
        batches = []
        for s in range(0, len(draws), gb * self.bucket_batches):
            part = draws[s:s + gb * self.bucket_batches]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches += [part[k:k + gb].tolist() for k in range(0, len(part), gb)]
        return [batches[k] for k in rng.permutation(len(batches))]

    def __len__(self):
        """Global batches per epoch."""
        return len(self.lengths) // self.global_batch

    def next_batch(self):
        """The next global batch (list of item indices); `epoch` is the epoch it belongs to."""
        if self.position == len(self):
            self.epoch, self.position = self.epoch + 1, 0
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, self.plan(self.epoch))
        batch = self._plan[1][self.position]
        self.position += 1
        return batch

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def micro_batches(indices, micro_batch, rank, world):
    """This rank's micro-batches of a global batch: rank r takes the r-th contiguous 1/world of it,
    cut into micro-batches (grad_accum of them)."""
    if len(indices) % (micro_batch * world):
        raise ValueError(f"global batch {len(indices)} is not a multiple of micro_batch {micro_batch} x world {world}")
    per_rank = len(indices) // world
    mine = indices[rank * per_rank:(rank + 1) * per_rank]
    return [mine[k:k + micro_batch] for k in range(0, per_rank, micro_batch)]


def collate(dataset, indices, cfg, epoch=0, step=0):
    """Build and pad the DramaBox examples of items `indices` (see `pad_examples` for the keys).

    Each example's random choices come from (seed, epoch, step, the micro-batch's items, its slot),
    so a resumed or differently sharded run builds exactly the same batch."""
    key = zlib.crc32(json.dumps([int(i) for i in indices]).encode())
    examples = [dataset.example(int(i), np.random.default_rng([cfg.seed, epoch, step, key, slot]))
                for slot, i in enumerate(indices)]
    return pad_examples(examples, cfg.ref_offset_s, dataset.tokens_per_second, cfg.max_text_len)


def iterate_batches(dataset, micro_batch, cfg=None):
    """Every item once, in order, in micro-batches (validation); the same examples every call."""
    cfg = cfg or dataset.cfg
    for k in range(0, len(dataset), micro_batch):
        yield collate(dataset, list(range(k, min(k + micro_batch, len(dataset)))), cfg, epoch=0, step=k)


def to_device(batch, device):
    """Move a batch's tensors to `device` (through pinned memory on CUDA, asynchronously)."""
    device = torch.device(device)
    def move(t):
        if not isinstance(t, torch.Tensor):
            return t
        if device.type == "cuda":
            return t.pin_memory().to(device, non_blocking=True)
        return t.to(device)
    return {k: move(v) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# The official ltx-trainer precomputed layout (scripts/process_dataset.py --with-audio)


def expected_audio_frames(duration):
    """Latent frames the LTX audio VAE gives for `duration` seconds: 100 mel frames/s (hop 160 at
    16 kHz, centred STFT: N//160 + 1 frames), then two causal stride-2 convs (ceil twice = ceil /4).
    This is round(25·d) + 1 for whole multiples of 40 ms, e.g. 26 frames for 1 s."""
    mel_frames = int(duration * SAMPLE_RATE) // 160 + 1
    return math.ceil(mel_frames / 4)


class PrecomputedDataset:
    """Samples of an official ltx-trainer `.precomputed` directory, read in place.

    Layout: latents/<rel>.pt ({latents [C, F, H, W], num_frames, height, width, fps}),
    conditions/<rel>.pt ({video_prompt_embeds, audio_prompt_embeds [L, D], prompt_attention_mask [L]},
    possibly trimmed to the valid tokens), audio_latents/<rel>.pt ({latents [8, T, 16],
    num_time_steps, frequency_bins, duration}). Each audio latent must have
    expected_audio_frames(duration) ± 1 frames and match the video's duration within one latent
    frame; audio is never stretched to fit. Samples lacking audio are counted in `report`; with
    `require_audio` they are left out (for audio training), otherwise they stay with audio None.
    Bad samples raise BadInput naming the file, or are skipped and counted with `skip_bad`.
    """

    def __init__(self, root, cfg, require_audio=True, tokens_per_second=25):
        root = Path(root)
        if (root / ".precomputed").is_dir():
            root = root / ".precomputed"
        for sub in ("latents", "conditions"):
            if not (root / sub).is_dir():
                raise FileNotFoundError(f"{root / sub} not found: not an ltx-trainer precomputed dataset")
        self.root, self.cfg, self.tokens_per_second = root, cfg, tokens_per_second
        self.report = Counter()
        self.samples, self.lengths = [], []
        for latent_file in sorted((root / "latents").rglob("*.pt")):
            rel = latent_file.relative_to(root / "latents")
            cond = root / "conditions" / rel
            if not cond.is_file() and latent_file.name.startswith("latent_"):  # legacy naming
                cond = cond.with_name("condition_" + latent_file.name[len("latent_"):])
            audio = root / "audio_latents" / rel
            try:
                if not cond.is_file():
                    raise BadInput("no_conditions", f"{latent_file}: no text conditions at {cond}")
                has_audio = audio.is_file()
                frames = self.check_audio(audio, latent_file) if has_audio else 0
            except BadInput as e:
                if not cfg.skip_bad:
                    raise
                self.report[f"skipped:{e.reason}"] += 1
                continue
            self.report["with_audio" if has_audio else "without_audio"] += 1
            if has_audio or not require_audio:
                self.samples.append({"id": str(rel.with_suffix("")), "video": latent_file, "conditions": cond,
                                     "audio": audio if has_audio else None})
                self.lengths.append(frames)
        if not self.samples:
            raise ValueError(f"{root}: no usable samples ({dict(self.report)})")
        self.sources = ["precomputed"] * len(self.samples)

    def check_audio(self, path, video_file):
        """Validate one audio latent file and return its frame count; BadInput names the file."""
        try:
            data = files.torch_load(path, mmap=True)
        except files.BadFile as e:  # damaged, or a pickle we do not run: one more bad input
            raise BadInput("unreadable", str(e)) from None
        missing = {"latents", "num_time_steps", "frequency_bins", "duration"} - set(data)
        if missing:
            raise BadInput("bad_audio", f"{path}: missing keys {sorted(missing)}")
        lat = data["latents"]
        if lat.ndim != 3 or lat.shape[1] != data["num_time_steps"] or lat.shape[2] != data["frequency_bins"]:
            raise BadInput("bad_audio", f"{path}: latents {tuple(lat.shape)} do not match num_time_steps="
                                        f"{data['num_time_steps']}, frequency_bins={data['frequency_bins']}")
        if not torch.isfinite(lat).all():
            raise BadInput("nan", f"{path}: audio latents contain NaN or Inf")
        want = expected_audio_frames(float(data["duration"]))
        if abs(lat.shape[1] - want) > 1:
            raise BadInput("audio_length", f"{path}: {lat.shape[1]} audio latent frames for duration "
                                           f"{float(data['duration']):.3f} s, expected {want}; audio must "
                                           f"not be stretched or cut away from its duration")
        video = files.torch_load(video_file, mmap=True)  # reads metadata only
        if "fps" in video and "num_frames" in video:
            seconds = video_seconds(video)
            if abs(seconds - float(data["duration"])) > 1 / self.tokens_per_second:
                raise BadInput("audio_length", f"{path}: audio lasts {float(data['duration']):.3f} s but its "
                                               f"video {video_file} lasts {seconds:.3f} s")
        return lat.shape[1]

    def __len__(self):
        return len(self.samples)

    def load(self, i):
        """One sample: audio (T, 128) with feature c*16+f, or None; text (L, D) audio prompt features of
        the valid tokens; video_text likewise; video latents and their metadata as stored."""
        s = self.samples[i]
        cond = files.torch_load(s["conditions"])
        if "audio_prompt_embeds" not in cond:
            raise ValueError(f"{s['conditions']}: no audio_prompt_embeds (keys {sorted(cond)}); re-run "
                             f"process_dataset.py with an LTX-2 checkpoint that has the audio text projection")
        mask = cond["prompt_attention_mask"].bool()
        if int(mask.sum()) > self.cfg.max_text_len:
            raise ValueError(f"{s['conditions']}: {int(mask.sum())} prompt tokens > "
                             f"max_text_len={self.cfg.max_text_len}")
        out = {"id": s["id"], "text": cond["audio_prompt_embeds"][mask].float(),
               "video_text": cond["video_prompt_embeds"][mask].float(),
               "video": files.torch_load(s["video"]), "audio": None}
        if s["audio"] is not None:
            lat = files.torch_load(s["audio"])["latents"]  # (C, T, 16)
            out["audio"] = lat.permute(1, 0, 2).reshape(lat.shape[1], -1).float()  # (T, C*16)
        return out

    def example(self, i, rng):
        """Unconditional DramaBox example: this layout has no speaker ids (no clone pairs), no silence
        latent (no silence frames) and no empty-prompt features (dropped text = registers only)."""
        s = self.load(i)
        if s["audio"] is None:
            raise ValueError(f"{self.samples[i]['video']}: sample has no audio latents (require_audio=False)")
        return make_example(rng, self.cfg, s["audio"], None, s["text"], None, silence=None,
                            null_text=s["text"][:0], tokens_per_second=self.tokens_per_second, mode="uncond",
                            item_id=s["id"], source="precomputed")


def video_seconds(video):
    """Duration of a latents/ entry: the causal video VAE encodes 1 + 8k pixel frames as k + 1 latents."""
    return ((int(video["num_frames"]) - 1) * 8 + 1) / float(video["fps"])


def collate_av(dataset, indices, cfg, audio_width):
    """An audio-video micro-batch of PrecomputedDataset samples, for train.py's `av` mode.

    Video latents [C, F, H, W] become tokens (F·H·W, C) in (f, h, w) order with their RoPE positions;
    every item of a micro-batch must share (F, H, W) and fps (ltx-trainer's resolution buckets; or
    use micro_batch 1). Audio is padded to the longest item (`audio_mask` marks real tokens). An item
    without audio gets zero latents of its video's length and has_audio False: it is never a
    training target (train.py masks it out or uses the preservation loss), only a shape.
    `audio_width` is the model's audio in_channels (checked against every item's features).
    Returns video_x0 (B, Tv, Cv), video_positions (B, Tv, 3), audio_x0 (B, Ta, C), audio_mask
    (B, Ta), has_audio (B,), text / video_text (B, max_text_len, D·) left-padded, text_mask, ids.
    """
    samples = [dataset.load(int(i)) for i in indices]
    shapes = {(s["video"]["latents"].shape[1:], float(s["video"].get("fps", 24.0))) for s in samples}
    if len(shapes) > 1:
        files = [str(dataset.samples[int(i)]["video"]) for i in indices]
        raise ValueError(f"an audio-video micro-batch mixes video latent shapes / fps {sorted(map(str, shapes))} "
                         f"({', '.join(files)}): use micro_batch: 1 or one resolution and fps per dataset")
    (F, H, W), fps = next(iter(shapes))
    B = len(samples)
    video = torch.stack([s["video"]["latents"].float().flatten(1).T for s in samples])  # (B, F·H·W, C)
    n_audio = [s["audio"].shape[0] if s["audio"] is not None else expected_audio_frames(video_seconds(s["video"]))
               for s in samples]
    for s, i in zip(samples, indices):
        if s["audio"] is not None and s["audio"].shape[1] != audio_width:
            raise ValueError(f"{dataset.samples[int(i)]['audio']}: {s['audio'].shape[1]} audio features per "
                             f"token (channels x bins), the model takes {audio_width}")
    audio = torch.zeros(B, max(n_audio), audio_width)
    audio_mask = torch.zeros(B, max(n_audio), dtype=torch.bool)
    for b, s in enumerate(samples):
        if s["audio"] is not None:
            audio[b, :n_audio[b]] = s["audio"]
        audio_mask[b, :n_audio[b]] = True
    text, text_mask = left_pad_features([s["text"] for s in samples], cfg.max_text_len)
    video_text, _ = left_pad_features([s["video_text"] for s in samples], cfg.max_text_len)
    return {"video_x0": video, "video_positions": video_positions(F, H, W, B, fps=fps), "audio_x0": audio,
            "audio_mask": audio_mask, "has_audio": torch.tensor([s["audio"] is not None for s in samples]),
            "text": text, "video_text": video_text, "text_mask": text_mask, "ids": [s["id"] for s in samples]}


def fit_codec(cfg):
    """Fit the mel codec's basis (`mel_basis_dim` components) on the audio of `cfg.manifest` and write
    it to `cfg.mel_basis`. Bad audio raises, naming the file, or with `skip_bad` is skipped and counted."""
    from codec import codec_from_config, fit_mel_basis, save_mel_basis

    if cfg.codec != "mel" or not cfg.mel_basis_dim or not cfg.mel_basis:
        raise ValueError("fit_codec fits the mel codec's basis: it needs codec mel, mel_basis_dim > 0 and "
                         f"--mel_basis=OUT (got codec {cfg.codec}, mel_basis_dim {cfg.mel_basis_dim}, "
                         f"mel_basis {cfg.mel_basis!r})")
    codec = codec_from_config(cfg, fitting=True)
    wavs, skipped = [], Counter()
    for item in read_manifest(cfg.manifest):
        try:
            wavs.append(read_audio(item.audio, codec.sample_rate, codec.channels, cfg.min_seconds, cfg.max_seconds)[0])
        except BadInput as e:
            if not cfg.skip_bad:
                raise
            skipped[e.reason] += 1
    basis = fit_mel_basis(codec, wavs, cfg.mel_basis_dim, whiten=cfg.mel_basis_whiten)
    Path(cfg.mel_basis).parent.mkdir(parents=True, exist_ok=True)
    save_mel_basis(cfg.mel_basis, basis, codec, source=files.file_digest(cfg.manifest))
    print(f"fit_codec: {cfg.mel_basis_dim} components of {codec.frame_dim} features per token from {len(wavs)} clips "
          f"of {cfg.manifest}" + (f" (skipped {dict(skipped)})" if skipped else "") + f" -> {cfg.mel_basis}")
    return basis


def main(argv):
    from config import format_config, load_config

    if not argv or argv[0] not in ("prepare", "scan_precomputed", "fit_codec"):
        raise SystemExit("usage: python data.py prepare [config.yaml ...] [--key=value ...]\n"
                         "       python data.py scan_precomputed DIR [--skip_bad=true]\n"
                         "       python data.py fit_codec [config.yaml ...] --manifest=M --mel_basis=OUT")
    if argv[0] == "fit_codec":
        fit_codec(load_config(argv[1:]))
        return
    if argv[0] == "scan_precomputed":
        cfg = load_config(argv[2:])
        ds = PrecomputedDataset(argv[1], cfg, require_audio=False)
        print(f"{ds.root}: {ds.report['with_audio']} samples with audio, {ds.report['without_audio']} without, "
              f"skipped {({k: v for k, v in ds.report.items() if k.startswith('skipped:')})}")
        return
    cfg = load_config(argv[1:])
    if not cfg.manifest:
        raise SystemExit("prepare needs --manifest=path/to/manifest.jsonl")
    for manifest in (cfg.manifest, cfg.val_manifest):  # structural errors before minutes of model loading
        if manifest:
            read_manifest(manifest)
    print(format_config(cfg))
    device = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    codec, text_encoder, speaker, fingerprints = load_models(cfg, device)
    prepare(cfg, codec, text_encoder, speaker, fingerprints, device)


if __name__ == "__main__":
    from config import run_cli

    run_cli(main)
