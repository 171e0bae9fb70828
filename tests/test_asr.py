"""asr.py, the evaluation-only recogniser: its error rates are right, it learns to transcribe what it is
trained on and generalises to new strings (a synthetic alphabet of tones, so the test needs no speech
and runs in seconds), its file round-trips and refuses others, and eval.py's `cer` metric scores a
sample's words against its own prompt and the others'."""

import json

import numpy as np
import pytest
import torch

import asr
import eval as eval_lib
import files
from audio import SAMPLE_RATE, write_wav

TONES = {"a": 500.0, "b": 1200.0, "c": 2600.0}  # one pure tone per letter; a space is a longer pause


def tone_clip(text, rng):
    """16 kHz audio of `text` (letters of TONES and spaces): 90 ms per letter, 40 ms gaps, 250 ms spaces,
    each tone's pitch and level jittered, faint noise throughout."""
    parts = [np.zeros(int(0.1 * SAMPLE_RATE))]
    for ch in text:
        if ch == " ":
            parts.append(np.zeros(int(0.25 * SAMPLE_RATE)))
            continue
        t = np.arange(int(0.09 * SAMPLE_RATE)) / SAMPLE_RATE
        f = TONES[ch] * rng.uniform(0.97, 1.03)
        parts += [rng.uniform(0.3, 0.8) * np.sin(2 * np.pi * f * t) * np.hanning(len(t)),
                  np.zeros(int(0.04 * SAMPLE_RATE))]
    wav = np.concatenate(parts + [np.zeros(int(0.1 * SAMPLE_RATE))])
    return torch.from_numpy(wav + 0.003 * rng.standard_normal(len(wav))).float()


def random_text(rng):
    """1-3 words of 1-3 letters, no letter twice in a row (two equal tones 40 ms apart are hard to count)."""
    words = []
    for _ in range(int(rng.integers(1, 4))):
        word = [str(rng.choice(list(TONES)))]
        for _ in range(int(rng.integers(0, 3))):
            word.append(str(rng.choice([c for c in TONES if c != word[-1]])))
        words.append("".join(word))
    return " ".join(words)


@pytest.fixture(scope="module")
def trained():
    """(model, test clips, test texts): trained on 48 random strings, tested on 24 others."""
    rng = np.random.default_rng(0)
    texts = [random_text(rng) for _ in range(72)]
    wavs = [tone_clip(t, rng) for t in texts]
    model = asr.train_recogniser(wavs[:48], texts[:48], steps=150, batch=16, hidden=64, seed=0, log=lambda m: None)
    return model, wavs[48:], texts[48:]


def test_error_rates_count_edits_over_reference_length():
    assert asr.clean_text("  The CAT, sat!  ") == "the cat sat"
    assert asr.char_error_rate("the cat", "the bat") == pytest.approx(1 / 7)
    assert asr.char_error_rate("abc", "") == 1.0 and asr.char_error_rate("abc", "abcabc") == 1.0
    assert asr.char_error_rate("", "") == 0.0 and asr.char_error_rate("", "x") == 1.0
    chars, words = asr.error_rates(["the cat", "a dog"], ["the bat", "a dog"])
    assert chars == pytest.approx(1 / 12) and words == pytest.approx(1 / 4)


def test_greedy_decode_merges_repeats_and_drops_blanks():
    ids = [0, 2, 2, 0, 2, 1, 1, 3, 0]  # blank a a blank a space space b blank -> "aa b" (class k is CHARS[k - 1])
    log_probs = torch.nn.functional.one_hot(torch.tensor([ids]), 1 + len(asr.CHARS)).float().log()
    assert asr.greedy_decode(log_probs, torch.tensor([len(ids)])) == ["aa b"]
    assert asr.greedy_decode(log_probs, torch.tensor([3])) == ["a"]  # frames past the length are ignored


def test_length_batches_cover_every_item_once_an_epoch_with_similar_lengths_together():
    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 400, 100)
    gen = asr.length_batches(lengths, 8, np.random.default_rng(1), pool=4)
    epoch = [next(gen) for _ in range(13)]  # 100 items in pools of 32: 4 batches of 8 per pool, one of 4 last
    assert sorted(np.concatenate(epoch).tolist()) == list(range(100))
    spread = np.mean([np.ptp(lengths[b]) for b in epoch])  # a random batch of 8 spans ~0.78 of the range
    assert spread < 0.4 * np.ptp(lengths), spread
    assert not np.array_equal(np.concatenate(epoch), np.concatenate([next(gen) for _ in range(13)]))  # reshuffled


def test_recogniser_learns_and_generalises_to_new_strings(trained):
    model, wavs, texts = trained
    cer, _ = asr.error_rates(texts, asr.transcribe(model, wavs))
    untrained = asr.Recogniser(64).eval()
    cer_untrained, _ = asr.error_rates(texts, asr.transcribe(untrained, wavs))
    assert cer < 0.15, cer
    assert cer_untrained > 0.6, cer_untrained


def test_a_clip_reads_the_same_alone_and_beside_a_longer_one(trained):
    """Padding never reaches a clip's frames: its log-probabilities are the same in any batch."""
    model, wavs, _ = trained
    short, long = sorted(wavs[:2], key=len)
    long = torch.cat([long, long])
    feats = [asr.features(w) for w in (short, long)]
    with torch.no_grad():
        alone = model(*asr.pad(feats[:1]))
        batched = model(*asr.pad(feats))
    n = int(model.out_lengths(torch.tensor([len(feats[0])]))[0])
    torch.testing.assert_close(batched[0, :n], alone[0, :n], atol=1e-5, rtol=1e-5)


def test_file_round_trip_and_refusals(trained, tmp_path):
    model, wavs, _ = trained
    path = tmp_path / "asr.safetensors"
    asr.save_recogniser(model, path, {"test_cer": 0.1})
    loaded = asr.load_recogniser(path)
    assert asr.transcribe(loaded, wavs[:6]) == asr.transcribe(model, wavs[:6])
    assert files.read_json_metadata(path, "summary") == {"test_cer": 0.1}
    other = tmp_path / "other.safetensors"
    files.save_safetensors({"w": torch.zeros(2)}, other, {"format": "speakerbox.judge"})
    with pytest.raises(files.BadFile, match="other.safetensors: not a recogniser"):
        asr.load_recogniser(other)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        asr.load_recogniser(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="too short"):
        asr.transcribe(model, [torch.zeros(100)])


def test_cer_metric_scores_each_sample_against_its_own_and_the_other_prompts(trained, tmp_path):
    """Samples saying their prompt score a low cer and a high cer_chance; the same audio filed under
    another prompt (words ignored) scores about its cer_chance."""
    model, wavs, texts = trained
    path = tmp_path / "asr.safetensors"
    asr.save_recogniser(model, path)
    samples, audio = [], {}
    for i, (wav, text) in enumerate(zip(wavs[:12], texts[:12])):
        said = text if i < 6 else texts[(i + 1) % 12]  # the last six say another sample's words
        sid = f"v/{i:02d}"
        clip = wav if said == text else tone_clip(said, np.random.default_rng(i))
        write_wav(tmp_path / f"{i:02d}.wav", clip[None], SAMPLE_RATE, {"prompt": f'A voice. "{text}"'})
        meta = json.loads((tmp_path / f"{i:02d}.json").read_text())
        samples.append({"id": sid, "meta": meta, "path": str(tmp_path / f"{i:02d}.wav")})
        audio[sid] = eval_lib.read_mono16k(samples[-1]["path"])
    out = eval_lib.metric_cer(samples, audio, str(path))
    own = [out["cer"][s["id"]] for s in samples[:6]]
    swapped = [out["cer"][s["id"]] for s in samples[6:]]
    chance = [out["cer_chance"][s["id"]] for s in samples[:6]]
    assert np.mean(own) < 0.2 < np.mean(chance), (own, chance)
    assert np.mean(swapped) > 2 * np.mean(own) + 0.2, (own, swapped)


def test_a_manifest_row_without_text_or_with_bad_audio_is_refused_naming_it(tmp_path):
    rng = np.random.default_rng(0)
    write_wav(tmp_path / "a.wav", tone_clip("ab", rng)[None], SAMPLE_RATE, {})
    manifest = tmp_path / "m.jsonl"
    rows = [{"audio": "a.wav", "text": 'A voice. "ab"', "id": "1"}, {"audio": "a.wav", "id": "2"}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"m.jsonl:2: no 'text'"):
        asr.read_clips(manifest)
    manifest.write_text(json.dumps(rows[0]) + "\n")
    wavs, texts = asr.read_clips(manifest)
    assert texts == ["ab"] and wavs[0].shape[0] > SAMPLE_RATE // 10
    (tmp_path / "b.wav").write_bytes(b"")
    manifest.write_text(json.dumps({"audio": "b.wav", "text": 'A voice. "ab"'}) + "\n")
    with pytest.raises(ValueError, match="b.wav"):
        asr.read_clips(manifest)
