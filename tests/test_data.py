"""data.py: manifest validation, the validated cache, the DramaBox format, sampling, resume, and the
official ltx-trainer precomputed layout. CPU, tiny, deterministic.

The codec / text encoder / speaker extractors are small deterministic doubles defined here, so the
tests pin data.py's own behaviour; `test_prepare_cli_with_real_models` runs the real ones.
"""

import dataclasses
import json
import math
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import codec  # noqa: E402
import data  # noqa: E402
import files  # noqa: E402
from config import Config  # noqa: E402
from model import audio_positions  # noqa: E402

SR = 16000


class FakeCodec:
    """Frames of 640 samples (25/s, the causal VAE's count) projected to 8 features."""

    sample_rate, channels, latent_dim, tokens_per_second = SR, 1, 8, 25

    def __init__(self, tag="v1"):
        self.tag = tag
        self.proj = torch.randn(640, 8, generator=torch.Generator().manual_seed(0))

    def encode(self, wav):  # (B, C, N) -> (B, T, F)
        B, C, N = wav.shape
        T = math.ceil((N // 160 + 1) / 4)
        x = torch.nn.functional.pad(wav.mean(1), (0, T * 640 - N)).view(B, T, 640)
        return x @ self.proj + 0.1


class FakeText:
    """Bytes as tokens, 4 features each, left-padded like the Gemma tokenizer."""

    def encode(self, prompts):
        ids = [list(p.encode())[:32] for p in prompts]
        L = max(1, max(len(i) for i in ids))
        feats, mask = torch.zeros(len(prompts), L, 4), torch.zeros(len(prompts), L, dtype=torch.long)
        for b, i in enumerate(ids):
            if i:
                t = torch.tensor(i, dtype=torch.float32)
                feats[b, L - len(i):] = torch.stack([t / 255, t.sin(), t.cos(), torch.ones_like(t)], -1)
                mask[b, L - len(i):] = 1
        return feats, mask


class FakeSpeaker:
    def __call__(self, wav):  # (B, N) 16 kHz mono -> (B, 3)
        return torch.stack([wav.std(1), wav.abs().mean(1), wav.max(1).values], -1)

    def fingerprint(self):
        return "fake-speaker-v1"


def fingerprints(codec, speaker=True):
    return {"codec": f"fake-codec-{codec.tag}", "text": "fake-text", "speaker": "fake-speaker-v1" if speaker else ""}


def tone(seconds, freq=220.0, sr=SR, amp=0.3):
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_manifest(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_cfg(tmp_path, manifest, **kw):
    base = dict(manifest=str(manifest), cache_dir=str(tmp_path / "cache"), min_seconds=0.5, max_seconds=3.0,
                micro_batch=2, seed=0, max_text_len=24)
    base.update(kw)
    return dataclasses.replace(Config(), **base)


def run_prepare(cfg, codec=None, speaker=True):
    codec = codec or FakeCodec()
    spk = FakeSpeaker() if speaker else None
    return data.prepare(cfg, codec, FakeText(), spk, fingerprints(codec, speaker))["train"]


def train_cache(cfg):
    return Path(cfg.cache_dir) / "train"


# ---------------------------------------------------------------------------------------------
# Manifest and bad inputs


def test_manifest_errors_name_file_and_line(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"audio": "a.wav", "text": "hi"}\n{"audio": "b.wav", "text": \n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2: invalid JSON"):
        data.read_manifest(m)
    write_manifest(m, [{"text": "no audio"}])
    with pytest.raises(ValueError, match=r"m\.jsonl:1: 'audio'"):
        data.read_manifest(m)
    write_manifest(m, [{"audio": "a.wav", "text": "x", "speeker": "s"}])
    with pytest.raises(ValueError, match=r"m\.jsonl:1: unknown key.*speeker"):
        data.read_manifest(m)
    write_manifest(m, [{"audio": "a.wav", "text": "x"}, {"audio": "a.wav", "text": "y"}])
    with pytest.raises(ValueError, match=r"m\.jsonl:2: duplicate item id 'a.wav' \(first at line 1\)"):
        data.read_manifest(m)
    write_manifest(m, [{"audio": "sub/a.wav", "text": "x", "ref_audio": "r.wav", "speaker": "s"}])
    (item,) = data.read_manifest(m)
    assert item.audio == str(tmp_path / "sub" / "a.wav") and item.ref_audio == str(tmp_path / "r.wav")
    assert item.source == "default" and item.speaker == "s"


BAD = {  # name -> (reason, message fragment)
    "missing": ("missing_file", "file not found"),
    "unreadable": ("unreadable", "cannot read audio"),
    "empty": ("empty", "empty"),
    "silent": ("silent", "silent"),
    "nan": ("nan", "NaN"),
    "short": ("too_short", "shorter than min_seconds"),
    "long": ("too_long", "longer than max_seconds"),
    "notext": ("missing_text", "has no text"),
}


def bad_dataset(tmp_path):
    d = tmp_path / "audio"
    d.mkdir()
    sf.write(d / "good.wav", tone(1.0), SR)
    sf.write(d / "rate.wav", tone(1.0, sr=22050), 22050)  # wrong rate: resampled, not rejected
    (d / "unreadable.wav").write_text("this is not audio")
    sf.write(d / "empty.wav", np.zeros(0, np.float32), SR)
    sf.write(d / "silent.wav", np.zeros(SR, np.float32), SR)
    nan = tone(1.0)
    nan[100] = np.nan
    sf.write(d / "nan.wav", nan, SR, subtype="FLOAT")
    sf.write(d / "short.wav", tone(0.2), SR)
    sf.write(d / "long.wav", tone(4.0), SR)
    sf.write(d / "notext.wav", tone(1.0), SR)
    rows = {name: {"audio": f"audio/{name}.wav", "text": "" if name == "notext" else f"say {name}"}
            for name in ["good", "rate", *BAD]}
    return rows


def test_each_bad_input_gives_clear_error(tmp_path):
    rows = bad_dataset(tmp_path)
    for name, (reason, fragment) in BAD.items():
        m = write_manifest(tmp_path / f"{name}.jsonl", [rows[name]])
        with pytest.raises(data.BadInput, match=fragment) as err:
            run_prepare(make_cfg(tmp_path, m))
        assert err.value.reason == reason
        assert f"{name}.wav" in str(err.value), str(err.value)  # the file is named


def test_skip_bad_counts_each_reason(tmp_path, capsys):
    rows = bad_dataset(tmp_path)
    m = write_manifest(tmp_path / "all.jsonl", list(rows.values()))
    counts = run_prepare(make_cfg(tmp_path, m, skip_bad=True))
    assert counts["encoded"] == 2 and counts["resampled"] == 1
    for reason, _ in BAD.values():
        assert counts[f"skipped:{reason}"] == 1, reason
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"prepare {m}: 2 encoded, 0 reused, 8 skipped") and "'too_long': 1" in line
    index = json.loads((tmp_path / "cache" / "train" / "index.json").read_text())
    assert sorted(e["id"] for e in index["items"]) == ["audio/good.wav", "audio/rate.wav"]
    # the resampled clip has the 16 kHz length: 1 s -> 26 latent frames either way
    assert [e["frames"] for e in index["items"]] == [26, 26]


# ---------------------------------------------------------------------------------------------
# Cache contents and staleness


def test_cache_entry_contents(tmp_path):
    sf.write(tmp_path / "a.wav", tone(1.2), SR)
    m = write_manifest(tmp_path / "m.jsonl", [{"audio": "a.wav", "text": "hello"}])
    cfg = make_cfg(tmp_path, m)
    run_prepare(cfg)
    entry = files.load_safetensors(str(data.entry_path(train_cache(cfg), "a.wav")))
    codec = FakeCodec()
    wav = torch.from_numpy(sf.read(tmp_path / "a.wav", dtype="float32")[0])
    torch.testing.assert_close(entry["latent"], codec.encode(wav[None, None])[0], rtol=0, atol=0)
    feats, mask = FakeText().encode(["hello"])
    torch.testing.assert_close(entry["text"], feats[0, -5:])  # valid tokens only, no padding rows
    # speaker features see the clip peak-normalised to -4 dBFS, as sample.py gives a --ref
    torch.testing.assert_close(entry["speaker"], FakeSpeaker()(wav[None] * (data.REF_PEAK / wav.abs().max()))[0])
    shared = files.load_safetensors(str(train_cache(cfg) / "shared.safetensors"))
    torch.testing.assert_close(shared["silence"], torch.full((8,), 0.1))  # codec(zeros) = bias
    assert shared["null_text"].shape == (0, 4)  # the empty prompt has no tokens in this text double


def test_a_clip_listed_twice_in_a_row_is_encoded_once(tmp_path):
    """The base's manifest lists each clip, then the same clip under its voice's description."""
    sf.write(tmp_path / "a.wav", tone(1.0), SR)
    sf.write(tmp_path / "b.wav", tone(1.0, 330), SR)
    rows = [{"audio": "a.wav", "text": "one", "id": "a1"}, {"audio": "a.wav", "text": "two", "id": "a2"},
            {"audio": "b.wav", "text": "three", "id": "b"}, {"audio": "a.wav", "text": "four", "id": "a3"}]
    cfg = make_cfg(tmp_path, write_manifest(tmp_path / "m.jsonl", rows))
    codec, calls = FakeCodec(), []
    real_encode = codec.encode
    codec.encode = lambda wav: calls.append(wav.shape) or real_encode(wav)
    assert run_prepare(cfg, codec=codec)["encoded"] == 4
    assert len(calls) == 3 + 1  # a, b, a again (not in a row): only the last clip is kept; + the silence latent
    entries = {i: files.load_safetensors(str(data.entry_path(train_cache(cfg), i))) for i in ("a1", "a2", "a3")}
    for k in ("latent", "speaker"):
        assert torch.equal(entries["a1"][k], entries["a2"][k]) and torch.equal(entries["a1"][k], entries["a3"][k])
    assert not torch.equal(entries["a1"]["text"], entries["a2"]["text"])  # each keeps its own text


def test_stale_cache_is_reencoded(tmp_path):
    sf.write(tmp_path / "a.wav", tone(1.0), SR)
    sf.write(tmp_path / "b.wav", tone(1.0, 330), SR)
    rows = [{"audio": "a.wav", "text": "one"}, {"audio": "b.wav", "text": "two"}]
    m = write_manifest(tmp_path / "m.jsonl", rows)
    cfg = make_cfg(tmp_path, m)
    assert run_prepare(cfg)["encoded"] == 2
    assert run_prepare(cfg)["reused"] == 2
    # a setting that changes the content (another codec checkpoint)
    assert run_prepare(dataclasses.replace(cfg, codec_ckpt="other.safetensors"))["encoded"] == 2
    assert run_prepare(cfg)["encoded"] == 2  # and back
    # a model fingerprint change (same settings, different weights)
    assert run_prepare(cfg, codec=FakeCodec("v2"))["encoded"] == 2
    assert run_prepare(cfg, codec=FakeCodec("v2"))["reused"] == 2
    # speaker extractors removed: fingerprint differs
    assert run_prepare(cfg, codec=FakeCodec("v2"), speaker=False)["encoded"] == 2
    # a source file changed on disk: only that item
    path = data.entry_path(train_cache(cfg), "a.wav")
    old = files.load_safetensors(str(path))["latent"]
    sf.write(tmp_path / "a.wav", tone(1.0, 500), SR)
    counts = run_prepare(cfg, codec=FakeCodec("v2"), speaker=False)
    assert counts["encoded"] == 1 and counts["reused"] == 1
    assert not torch.equal(old, files.load_safetensors(str(path))["latent"])
    # the text changed in the manifest
    write_manifest(m, [rows[0], {"audio": "b.wav", "text": "three"}])
    counts = run_prepare(cfg, codec=FakeCodec("v2"), speaker=False)
    assert counts["encoded"] == 1 and counts["reused"] == 1
    # a corrupt entry is re-encoded, not trusted
    path.write_bytes(b"garbage")
    assert run_prepare(cfg, codec=FakeCodec("v2"), speaker=False)["encoded"] == 1
    # the reference audio changed on disk
    sf.write(tmp_path / "r.wav", tone(1.0, 600), SR)
    write_manifest(m, [rows[0], {"audio": "b.wav", "text": "three", "ref_audio": "r.wav"}])
    assert run_prepare(cfg, codec=FakeCodec("v2"), speaker=False)["encoded"] == 1
    sf.write(tmp_path / "r.wav", tone(1.1, 650), SR)
    counts = run_prepare(cfg, codec=FakeCodec("v2"), speaker=False)
    assert counts["encoded"] == 1 and counts["reused"] == 1


# ---------------------------------------------------------------------------------------------
# DramaBox format


@pytest.fixture
def drama_cache(tmp_path):
    """Speaker A: two utterances; B: one with a ref_audio; C: one alone."""
    clips = {"a0": (1.0, 200), "a1": (1.4, 250), "b0": (1.2, 300), "b_ref": (2.0, 320), "c0": (0.8, 400)}
    for name, (sec, f) in clips.items():
        sf.write(tmp_path / f"{name}.wav", tone(sec, f), SR)
    rows = [{"audio": "a0.wav", "text": "alpha zero", "speaker": "A", "source": "s1"},
            {"audio": "a1.wav", "text": "alpha one", "speaker": "A", "source": "s1"},
            {"audio": "b0.wav", "text": "beta", "speaker": "B", "ref_audio": "b_ref.wav", "source": "s2"},
            {"audio": "c0.wav", "text": "gamma", "speaker": "C", "source": "s2"}]
    m = write_manifest(tmp_path / "m.jsonl", rows)
    cfg = make_cfg(tmp_path, m)
    run_prepare(cfg)
    return cfg


def entry(cfg, item_id):
    return files.load_safetensors(str(data.entry_path(train_cache(cfg), item_id)))


def one_batch(cfg, i, seed=0, **kw):
    ds = data.CachedDataset(train_cache(cfg), dataclasses.replace(cfg, **kw))
    ex = ds.example(i, np.random.default_rng(seed))
    return ex, data.pad_examples([ex], ds.cfg.ref_offset_s, ds.tokens_per_second, ds.cfg.max_text_len), ds


def test_forward_reverse_uncond(drama_cache):
    cfg = drama_cache
    a0, a1, b0, c0 = (entry(cfg, f"{n}.wav") for n in ["a0", "a1", "b0", "c0"])
    fwd, _, _ = one_batch(cfg, 0, clone_probs=[1, 0, 0], max_silence_frames=0, text_dropout=0.0)
    assert fwd["mode"] == "forward"
    assert torch.equal(fwd["target"], a0["latent"]) and torch.equal(fwd["ref"], a1["latent"])
    assert torch.equal(fwd["text"], a0["text"]) and torch.equal(fwd["speaker"], a1["speaker"])
    rev, _, _ = one_batch(cfg, 0, clone_probs=[0, 1, 0], max_silence_frames=0, text_dropout=0.0)
    assert rev["mode"] == "reverse"
    assert torch.equal(rev["target"], a1["latent"]) and torch.equal(rev["ref"], a0["latent"])
    assert torch.equal(rev["text"], a1["text"]) and torch.equal(rev["speaker"], a0["speaker"])
    unc, _, _ = one_batch(cfg, 0, clone_probs=[0, 0, 1], max_silence_frames=0, text_dropout=0.0)
    assert unc["mode"] == "uncond" and unc["ref"] is None and torch.equal(unc["target"], a0["latent"])
    # the item's own ref_audio is its reference; reverse needs text for the target, so stays forward
    for probs in ([1, 0, 0], [0, 1, 0]):
        ex, _, _ = one_batch(cfg, 2, clone_probs=probs, max_silence_frames=0, text_dropout=0.0)
        assert ex["mode"] == "forward" and torch.equal(ex["ref"], b0["ref_latent"])
        assert torch.equal(ex["speaker"], b0["ref_speaker"])
    # a speaker with no other utterance: unconditional, speaker features from the item itself
    ex, _, _ = one_batch(cfg, 3, clone_probs=[1, 0, 0], max_silence_frames=0, text_dropout=0.0)
    assert ex["mode"] == "uncond" and ex["ref"] is None and torch.equal(ex["speaker"], c0["speaker"])
    # mode frequencies follow clone_probs
    ds = data.CachedDataset(train_cache(cfg), cfg)
    modes = Counter(ds.example(0, np.random.default_rng(s))["mode"] for s in range(600))
    assert all(abs(modes[m] / 600 - p) < 0.07 for m, p in zip(data.MODES, cfg.clone_probs)), modes


def test_sequence_masks_positions_and_silence(drama_cache):
    cfg = drama_cache
    a0, a1 = entry(cfg, "a0.wav"), entry(cfg, "a1.wav")
    ex, batch, ds = one_batch(cfg, 0, seed=3, clone_probs=[1, 0, 0], max_silence_frames=25, text_dropout=0.0)
    k = ex["silence"]
    assert 1 <= k <= 25  # seed 3 draws a non-zero count
    t, r = a0["latent"].shape[0] + k, a1["latent"].shape[0]
    x0 = batch["x0"][0]
    assert torch.equal(x0[:k], ds.silence.expand(k, -1))  # the codec's latent of silence
    assert torch.equal(x0[k:t], a0["latent"]) and torch.equal(x0[t:t + r], a1["latent"])
    loss, ref = batch["loss_mask"][0], batch["ref_mask"][0]
    assert loss[:t].all() and not loss[t:].any()  # σ=0 reference tokens never enter the loss
    assert ref[t:t + r].all() and not ref[:t].any() and batch["timestep_mask"] is batch["ref_mask"]
    pos = batch["positions"][0]
    torch.testing.assert_close(pos[:t], audio_positions(t, 1, 0.0)[0])
    torch.testing.assert_close(pos[t:t + r], audio_positions(r, 1, 0.0)[0] + t / 25 + 0.5)
    assert pos[t] - pos[t - 1] > 0.5  # the gap: the reference starts after the target plus the offset
    m = batch["attn_mask"][0]
    assert m[:t, :t + r].all()  # target -> target and target -> reference
    assert not m[t:t + r, :t].any() and m[t:t + r, t:t + r].all()  # reference never sees the target
    # silence switched off, text dropped
    ex, batch, _ = one_batch(cfg, 0, seed=3, max_silence_frames=0, text_dropout=1.0)
    assert ex["silence"] == 0 and not batch["text_mask"].any()


def test_repeated_item_gets_its_own_draws(drama_cache):
    """Weighted mixing repeats items; a repeat in another micro-batch of the same step must not be
    a copy (same mode, silence, partner, dropout) of the first."""
    ds = data.CachedDataset(train_cache(drama_cache), drama_cache)
    first = [data.collate(ds, [0, 1], drama_cache, epoch=0, step=k) for k in range(8)]
    again = [data.collate(ds, [0, 3], drama_cache, epoch=0, step=k) for k in range(8)]
    def item0(batch):  # the first example without the batch's padding
        valid = batch["loss_mask"][0] | batch["ref_mask"][0]
        return batch["x0"][0][valid], batch["text_mask"][0]
    assert any(not all(map(torch.equal, item0(a), item0(b))) for a, b in zip(first, again))
    assert all(torch.equal(a["x0"], data.collate(ds, [0, 1], drama_cache, epoch=0, step=k)["x0"])
               for k, a in enumerate(first))  # and each one is reproducible


def test_collate_padding(drama_cache):
    cfg = dataclasses.replace(drama_cache, clone_probs=[1, 0, 0], text_dropout=0.0, max_silence_frames=0)
    ds = data.CachedDataset(train_cache(cfg), cfg)
    with pytest.raises(ValueError, match="cached with max_text_len=24, the config says 1024"):
        data.CachedDataset(train_cache(cfg), dataclasses.replace(cfg, max_text_len=1024))
    exs = [ds.example(i, np.random.default_rng(0)) for i in range(4)]
    b = data.pad_examples(exs, cfg.ref_offset_s, ds.tokens_per_second, cfg.max_text_len)
    lens = [e["target"].shape[0] + (0 if e["ref"] is None else e["ref"].shape[0]) for e in exs]
    assert b["x0"].shape == (4, max(lens), 8) and b["attn_mask"].shape == (4, max(lens), max(lens))
    for i, n in enumerate(lens):
        valid = b["loss_mask"][i] | b["ref_mask"][i]
        assert valid[:n].all() and not valid[n:].any() and (b["x0"][i, n:] == 0).all()
        assert not b["attn_mask"][i][:, n:][:n].any()  # no real token attends to padding
        assert b["attn_mask"][i].any(-1).all()  # no empty row (softmax NaN)
    assert b["target_len"].tolist() == [e["target"].shape[0] for e in exs]
    assert b["text"].shape == (4, 24, 4) and b["text_mask"].shape == (4, 24)
    for i, e in enumerate(exs):  # left-padded to max_text_len, as the tokenizer pads at inference
        n = e["text"].shape[0]
        assert torch.equal(b["text"][i, 24 - n:], e["text"]) and b["text_mask"][i, 24 - n:].all()
        assert not b["text_mask"][i, :24 - n].any() and (b["text"][i, :24 - n] == 0).all()
    assert b["speaker"].shape == (4, 3) and b["speaker_present"].all()
    assert b["ids"] == ["a0.wav", "a1.wav", "b0.wav", "c0.wav"] and b["modes"][3] == "uncond"


def test_small_cache_is_held_in_memory_with_the_same_batches(drama_cache, monkeypatch):
    """A cache under data.HOLD_CACHE_BYTES is read from disk once per item; its batches are the
    same, bit for bit, as those of a cache read from disk at every use (a budget of 0)."""
    cfg = drama_cache
    held = data.CachedDataset(train_cache(cfg), cfg)
    reads = []
    real_load = files.load_safetensors
    monkeypatch.setattr(files, "load_safetensors", lambda path, *a, **k: reads.append(path) or real_load(path, *a, **k))
    batches = [data.collate(held, [0, 1, 2, 3], cfg, step=s) for s in range(3)]
    assert held.held is not None and len(reads) == len(held) == 4  # every item once, partners included
    monkeypatch.setattr(data, "HOLD_CACHE_BYTES", 0)
    on_disk = data.CachedDataset(train_cache(cfg), cfg)
    reads.clear()
    again = [data.collate(on_disk, [0, 1, 2, 3], cfg, step=s) for s in range(3)]
    assert on_disk.held is None and len(reads) > 3 * 4  # each item (and partner) read at each use
    for a, b in zip(batches, again):
        for key, value in a.items():
            assert torch.equal(value, b[key]) if isinstance(value, torch.Tensor) else value == b[key], key


# ---------------------------------------------------------------------------------------------
# Sampling


def fake_set(lengths, sources):
    return SimpleNamespace(lengths=lengths, sources=sources)


def test_weighted_mixing_proportions():
    sources = ["a"] * 100 + ["b"] * 300 + ["c"] * 600
    s = data.BatchSampler(fake_set([10] * 1000, sources), 8, seed=1, source_weights={"a": 0.4, "b": 0.4, "c": 0.2})
    got = Counter(sources[i] for e in range(3) for b in s.plan(e) for i in b)
    total = sum(got.values())
    for name, w in [("a", 0.4), ("b", 0.4), ("c", 0.2)]:
        assert abs(got[name] / total - w) < 0.02, got
    # without weights: the natural proportions, every item once per epoch
    plain = [i for b in data.BatchSampler(fake_set([10] * 1000, sources), 8).plan(0) for i in b]
    assert sorted(plain) == list(range(1000))
    with pytest.raises(ValueError, match=r"sources \['c'\] have no weight"):
        data.BatchSampler(fake_set([1] * 1000, sources), 8, source_weights={"a": 1, "b": 1})
    with pytest.raises(ValueError, match=r"sources \['d'\] have a weight .* but no items"):
        data.BatchSampler(fake_set([1] * 1000, sources), 8, source_weights={"a": 1, "b": 1, "c": 1, "d": 1})


def test_length_bucketing_reduces_padding():
    lengths = np.random.default_rng(0).integers(25, 250, size=512).tolist()

    def waste(bucket_batches):
        s = data.BatchSampler(fake_set(lengths, ["x"] * 512), 16, seed=0, bucket_batches=bucket_batches)
        mbs = [mb for b in s.plan(0) for mb in data.micro_batches(b, 4, 0, 1)]
        return np.mean([max(lengths[i] for i in mb) - min(lengths[i] for i in mb) for mb in mbs])
    unsorted = np.mean([np.ptp(np.asarray(lengths)[np.random.default_rng(k).choice(512, 4)]) for k in range(200)])
    assert waste(1) < 0.5 * unsorted  # sorted within the global batch
    assert waste(16) < 0.2 * waste(1), (waste(16), waste(1))  # and across a chunk of global batches


def test_sharding_disjoint_and_covering():
    n, mb, world, gb = 203, 2, 4, 16
    s = data.BatchSampler(fake_set(list(range(n)), ["x"] * n), gb, seed=5)
    for batch in s.plan(2):
        shards = [data.micro_batches(batch, mb, r, world) for r in range(world)]
        assert all(len(sh) == gb // (mb * world) for sh in shards)  # lockstep: same grad_accum on every rank
        seen = [i for sh in shards for m in sh for i in m]
        assert seen == batch  # disjoint and covering, in order
        # 1 rank with 8 micro-batches sees exactly the same micro-batches as 4 ranks with 2 each
        assert data.micro_batches(batch, mb, 0, 1) == [m for sh in shards for m in sh]
    epoch = [i for b in s.plan(2) for i in b]
    assert len(epoch) == len(set(epoch)) == n // gb * gb  # each item at most once; the tail is dropped
    assert s.plan(3) != s.plan(2) and s.plan(2) == s.plan(2)  # epochs differ, each is reproducible
    with pytest.raises(ValueError, match="not a multiple of micro_batch 3 x world 4"):
        data.micro_batches(list(range(16)), 3, 0, 4)


def test_resume_mid_epoch_equals_uninterrupted(tmp_path):
    rows = []
    for i in range(10):
        sf.write(tmp_path / f"u{i}.wav", tone(0.6 + 0.1 * i, 150 + 30 * i), SR)
        rows.append({"audio": f"u{i}.wav", "text": f"utterance {i}", "speaker": f"s{i % 3}",
                     "source": "odd" if i % 2 else "even"})
    m = write_manifest(tmp_path / "m.jsonl", rows)
    cfg = make_cfg(tmp_path, m, sources={"odd": 0.7, "even": 0.3}, global_batch=4)
    run_prepare(cfg)
    ds = data.load_cached(cfg, m)

    def run(sampler, steps, start=0):
        out = []
        for step in range(start, start + steps):
            batch = sampler.next_batch()
            for rank in range(2):
                for mb in data.micro_batches(batch, 2, rank, 2):
                    out.append(data.collate(ds, mb, cfg, epoch=sampler.epoch, step=step))
        return out

    total = 2 * len(data.BatchSampler(ds, 4)) + 1  # crosses two epoch boundaries
    ref_sampler = data.BatchSampler(ds, 4, seed=cfg.seed, source_weights=cfg.sources, bucket_batches=2)
    uninterrupted = run(ref_sampler, total)
    first = data.BatchSampler(ds, 4, seed=cfg.seed, source_weights=cfg.sources, bucket_batches=2)
    head = run(first, 3)
    state = json.loads(json.dumps(first.state_dict()))  # as it would be stored in a checkpoint
    resumed = data.BatchSampler(ds, 4, seed=cfg.seed, source_weights=cfg.sources, bucket_batches=2)
    resumed.load_state_dict(state)
    tail = run(resumed, total - 3, start=3)
    for a, b in zip(uninterrupted, head + tail, strict=True):
        assert a["ids"] == b["ids"] and a["modes"] == b["modes"]
        for key in ("x0", "attn_mask", "positions", "text", "speaker"):
            assert torch.equal(a[key], b[key]), key
    assert resumed.state_dict() == ref_sampler.state_dict() == {"epoch": 2, "position": 1}
    assert len({tuple(b["modes"]) for b in uninterrupted}) > 1  # the examples really are random
    # validation batches: every item once, identical on every call
    val = list(data.iterate_batches(ds, 3))
    assert sum(len(b["ids"]) for b in val) == 10
    assert all(torch.equal(a["x0"], b["x0"]) for a, b in zip(val, data.iterate_batches(ds, 3)))


def test_load_cached_refuses_a_changed_manifest(tmp_path):
    sf.write(tmp_path / "a.wav", tone(1.0), SR)
    m = write_manifest(tmp_path / "m.jsonl", [{"audio": "a.wav", "text": "one"}])
    cfg = make_cfg(tmp_path, m)
    run_prepare(cfg)
    assert len(data.load_cached(cfg, m)) == 1
    write_manifest(m, [{"audio": "a.wav", "text": "one"}, {"audio": "a.wav", "text": "two", "id": "x"}])
    with pytest.raises(ValueError, match=r"was prepared from .*m\.jsonl.*run `python data.py prepare`"):
        data.load_cached(cfg, m)
    with pytest.raises(FileNotFoundError, match=r"val.index\.json not found"):
        data.load_cached(cfg, m, split="val")


# ---------------------------------------------------------------------------------------------
# Official ltx-trainer precomputed layout


def fake_precomputed(root, stretch=False):
    """latents/, conditions/, audio_latents/ as ltx-trainer's process_dataset.py --with-audio writes."""
    def save(sub, rel, obj):
        p = root / ".precomputed" / sub / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, p)

    g = torch.Generator().manual_seed(0)
    for rel, frames, audio in [("a.pt", 4, "ok"), ("b.pt", 3, None), ("sub/d.pt", 2, "ok"), ("c.pt", 4, "bad")]:
        fps = 24.0
        seconds = ((frames - 1) * 8 + 1) / fps
        save("latents", rel, {"latents": torch.randn(128, frames, 2, 2, generator=g), "num_frames": frames,
                              "height": 2, "width": 2, "fps": fps})
        n = 5 if rel != "sub/d.pt" else 7
        mask = torch.zeros(12, dtype=torch.bool)
        mask[-n:] = True
        save("conditions", rel, {"video_prompt_embeds": torch.randn(12, 6, generator=g),
                                 "audio_prompt_embeds": torch.randn(12, 4, generator=g),
                                 "prompt_attention_mask": mask})
        if audio:
            T = data.expected_audio_frames(seconds)
            if audio == "bad" and stretch:
                T = round(T * 1.5)  # e.g. audio stretched to some other length
            save("audio_latents", rel, {"latents": torch.randn(8, T, 16, generator=g), "num_time_steps": T,
                                        "frequency_bins": 16, "duration": seconds})


def test_expected_audio_frames_matches_ltx_core_encoder():
    """ltx-core's audio VAE encoder (official 2.3 layout: ch_mult (1, 2, 4), causal along time, at a
    CPU-sized width) gives expected_audio_frames(d) latents: round(25·d) + 1 for 1 s, not 25."""
    from ltx_core.model.audio_vae.audio_vae import AudioEncoder
    from ltx_core.model.audio_vae.causality_axis import CausalityAxis
    from ltx_core.model.audio_vae.ops import AudioProcessor, PerChannelStatistics
    from ltx_core.model.common.normalization import NormType
    from ltx_core.types import Audio

    torch.manual_seed(0)
    enc = AudioEncoder(ch=8, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=set(), in_channels=2,
                       resolution=256, z_channels=8, mid_block_add_attention=False, norm_type=NormType.PIXEL,
                       causality_axis=CausalityAxis.HEIGHT, mel_bins=64).eval()
    enc.per_channel_statistics = PerChannelStatistics(128)  # 8 channels x 16 bins, as the real one
    for buf in enc.per_channel_statistics.buffers():
        buf.uniform_(0.5, 1.5)
    proc = AudioProcessor(target_sample_rate=16000, mel_bins=64, mel_hop_length=160, n_fft=1024)
    for sr, n in [(16000, 16000), (16000, 8320), (44100, 60417), (22050, 44394), (48000, 9600)]:
        with torch.no_grad():
            lat = enc(proc.waveform_to_mel(Audio(waveform=torch.randn(1, 2, n), sampling_rate=sr)))
        assert lat.shape[2] == data.expected_audio_frames(n / sr), (sr, n, lat.shape)
    assert data.expected_audio_frames(1.0) == 26 and data.expected_audio_frames(10.0) == 251


def test_precomputed_layout(tmp_path, capsys):
    fake_precomputed(tmp_path, stretch=True)
    cfg = dataclasses.replace(Config(), micro_batch=1, max_silence_frames=0)
    with pytest.raises(data.BadInput, match=r"c\.pt: \d+ audio latent frames for duration"):
        data.PrecomputedDataset(tmp_path, cfg)
    cfg = dataclasses.replace(cfg, skip_bad=True)
    ds = data.PrecomputedDataset(tmp_path, cfg)
    assert ds.report == Counter({"with_audio": 2, "without_audio": 1, "skipped:audio_length": 1})
    assert [s["id"] for s in ds.samples] == ["a", "sub/d"]  # audio training keeps samples with audio
    assert len(data.PrecomputedDataset(tmp_path, cfg, require_audio=False)) == 3
    s = ds.load(0)
    raw = torch.load(tmp_path / ".precomputed" / "audio_latents" / "a.pt")["latents"]  # (8, T, 16)
    assert s["audio"].shape == (raw.shape[1], 128)
    c, t, f = 5, 3, 11
    assert s["audio"][t, c * 16 + f] == raw[c, t, f]  # the DiT's token layout: feature c*16+f
    cond = torch.load(tmp_path / ".precomputed" / "conditions" / "a.pt")
    assert torch.equal(s["text"], cond["audio_prompt_embeds"][-5:])  # valid tokens only
    assert s["video"]["latents"].shape == (128, 4, 2, 2)
    batches = list(data.iterate_batches(ds, 1))
    assert [b["ids"][0] for b in batches] == ["a", "sub/d"] and batches[0]["ref_mask"].sum() == 0
    assert torch.equal(batches[0]["x0"][0], s["audio"])  # no silence, no reference: the audio itself
    # the CLI summary
    data.main(["scan_precomputed", str(tmp_path), "--skip_bad=true"])
    assert "2 samples with audio, 1 without" in capsys.readouterr().out


def test_precomputed_video_audio_duration_mismatch(tmp_path):
    fake_precomputed(tmp_path)
    p = tmp_path / ".precomputed" / "audio_latents" / "a.pt"
    d = torch.load(p)
    d["duration"] = d["duration"] + 0.5  # audio consistent with its own duration, but not the video
    d["latents"] = torch.randn(8, data.expected_audio_frames(d["duration"]), 16)
    d["num_time_steps"] = d["latents"].shape[1]
    torch.save(d, p)
    cfg = Config()
    with pytest.raises(data.BadInput, match=r"a\.pt: audio lasts .* but its video .* lasts"):
        data.PrecomputedDataset(tmp_path, cfg)


# ---------------------------------------------------------------------------------------------
# The CLI with the project's real codec / text encoder


def test_prepare_cli_with_real_models(tmp_path, capsys):
    sf.write(tmp_path / "a.wav", tone(1.0), SR)
    sf.write(tmp_path / "b.wav", tone(1.5, sr=24000), 24000)
    write_manifest(tmp_path / "m.jsonl", [{"audio": "a.wav", "text": "one", "speaker": "s"},
                                          {"audio": "b.wav", "text": "two", "speaker": "s"}])
    args = ["prepare", f"--manifest={tmp_path / 'm.jsonl'}", f"--cache_dir={tmp_path / 'cache'}",
            "--device=cpu", "--min_seconds=0.5", "--max_text_len=64"]
    data.main(args)
    assert "2 encoded, 0 reused" in capsys.readouterr().out
    data.main(args)
    assert "0 encoded, 2 reused" in capsys.readouterr().out
    cfg = dataclasses.replace(Config(), cache_dir=str(tmp_path / "cache"), max_text_len=64)
    ds = data.load_cached(cfg, tmp_path / "m.jsonl")
    built = codec.build_codec(cfg.codec, cfg.codec_ckpt)
    batch = data.collate(ds, [0, 1], cfg)
    assert batch["x0"].shape[-1] == built.latent_dim


def test_fit_codec_writes_the_basis_of_the_manifests_audio(tmp_path, capsys):
    """`python data.py fit_codec` = codec.fit_mel_basis on the manifest's clips, written where
    --mel_basis says and loaded by every later codec_from_config; bad audio raises naming the file,
    or with skip_bad is skipped and counted."""
    import codec as codec_lib
    from config import load_config

    rows = bad_dataset(tmp_path)
    clips = {f"v{k}": tone(1.0 + 0.3 * k, freq=110.0 * (k + 1)) for k in range(3)}
    for name, wav in clips.items():
        sf.write(tmp_path / "audio" / f"{name}.wav", wav, SR)
    good = write_manifest(tmp_path / "good.jsonl", [{"audio": f"audio/{n}.wav", "text": "t"} for n in clips])
    flags = ["--mel_n_mels=16", "--mel_basis_dim=12", f"--mel_basis={tmp_path / 'basis.safetensors'}"]
    data.main(["fit_codec", f"--manifest={good}", *flags])
    assert "fit_codec: 12 components of 64 features per token from 3 clips" in capsys.readouterr().out
    cfg = load_config(flags)
    built = codec_lib.codec_from_config(cfg)
    written = [torch.from_numpy(sf.read(tmp_path / "audio" / f"{n}.wav", dtype="float32")[0])[None]
               for n in clips]  # the clips as written (PCM 16)
    want = codec_lib.fit_mel_basis(codec_lib.codec_from_config(cfg, fitting=True), written, 12)
    assert built.latent_dim == 12 and all(torch.equal(built.basis[k], want[k]) for k in want)
    data.main(["fit_codec", f"--manifest={good}", *flags, "--mel_basis_whiten=0.5"])  # the config key reaches the fit
    whitened = codec_lib.fit_mel_basis(codec_lib.codec_from_config(cfg, fitting=True), written, 12, whiten=0.5)
    assert torch.equal(codec_lib.codec_from_config(cfg).basis["scale"], whitened["scale"]) and len(whitened["scale"]) == 12
    bad = write_manifest(tmp_path / "bad.jsonl", [{"audio": "audio/v0.wav"}, rows["nan"]])
    with pytest.raises(data.BadInput, match="nan.wav: audio contains NaN"):
        data.main(["fit_codec", f"--manifest={bad}", *flags])
    data.main(["fit_codec", f"--manifest={bad}", "--skip_bad=true", *flags])
    out = capsys.readouterr().out
    assert "from 1 clips" in out and "(skipped {'nan': 1})" in out
    with pytest.raises(ValueError, match="fit_codec fits the mel codec's basis"):
        data.main(["fit_codec", f"--manifest={good}", "--mel_n_mels=16"])
