"""The DiT's optional progress rope on its text cross-attention (DiTConfig.text_progress_theta): where
each spoken byte and each audio token sits in its utterance, what the rope does with it, and that a
model trained with it keeps it through its checkpoint, stage 1 and the sampler."""

import dataclasses
import os

import pytest
import torch

import model as model_lib
import text as text_lib
from conftest import ROOT, run_py
from layers import PROGRESS_OUTSIDE
from text import byte_tokenize, progress_table, spoken_progress

OUT = PROGRESS_OUTSIDE


def _same(tensor, values):
    torch.testing.assert_close(tensor, torch.tensor(values, dtype=torch.float32), rtol=0, atol=1e-7)


def test_spoken_progress_covers_the_quoted_words_only():
    prompt = 'A calm voice. "ab c"'
    p = spoken_progress(prompt, 64)
    ids, mask = byte_tokenize([prompt], 64)
    assert len(p) == int(mask.sum()) == 1 + len(prompt)
    spoken = [(k + 0.5) / 4 for k in range(4)]  # a, b, space, c
    _same(p, [OUT] * 16 + spoken + [OUT])  # BOS + 'A calm voice. "' , the words, '"'
    # the closing quote cut by truncation: the words run to the end
    _same(spoken_progress(prompt, 19), [OUT] * 16 + [0.5 / 3, 1.5 / 3, 2.5 / 3])
    # no quote: everything after BOS is spoken
    _same(spoken_progress("hi you", 64), [OUT] + [(k + 0.5) / 6 for k in range(6)])
    # left-padded like the tokenizer's ids
    table = progress_table([spoken_progress(prompt, 64), spoken_progress("hi", 64)], 64)
    ids, mask = byte_tokenize([prompt, "hi"], 64)
    assert table.shape == (2, 64) and (table[~mask] == OUT).all()
    _same(table[1, -3:], [OUT, 0.25, 0.75])


def test_text_encoder_progress_is_byte_only():
    enc = text_lib.build_text_encoder("byte", max_text_len=40, device="cpu", dtype=torch.float32, dim=32)
    prompts = ['A deep voice. "the fox"', "hello"]
    assert torch.equal(enc.progress(prompts), progress_table([spoken_progress(p, 40) for p in prompts], 40))
    gemma_like = text_lib.TextEncoder(None, None, None, 40, {"gemma": {"files": "x"}})
    with pytest.raises(ValueError, match="byte text encoder only"):
        gemma_like.progress(prompts)


def test_audio_progress():
    p = model_lib.audio_progress([4, 2], 5)
    _same(p, [[0.125, 0.375, 0.625, 0.875, OUT], [0.25, 0.75, OUT, OUT, OUT]])


def _micro(theta, seed=0):
    torch.manual_seed(seed)
    dit = model_lib.AudioDiT(dataclasses.replace(model_lib.PRESETS["micro"], text_progress_theta=theta))
    with torch.no_grad():  # the zero-initialised output layers would hide every difference
        for p in dit.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return dit


def _inputs(B=2, T=12, L=10):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, 16, generator=g)
    ctx = torch.randn(B, L, 32, generator=g)
    text = progress_table([spoken_progress('A "abcdef"', L), spoken_progress('B "xyz"', L)], L)
    return x, torch.tensor([0.7, 0.3]), ctx, text, model_lib.audio_progress([T, T - 3], T)


def test_progress_rope_scores_relative_progress_and_is_off_by_default():
    x, sigma, ctx, tp, ap = _inputs()
    off = _micro(0.0)
    assert torch.equal(off(x, sigma, ctx), off(x, sigma, ctx, text_progress=tp, audio_progress=ap))  # ignored
    dit = _micro(8.0)
    with pytest.raises(ValueError, match="needs text_progress and audio_progress"):
        dit(x, sigma, ctx)
    with torch.no_grad():
        v = dit(x, sigma, ctx, text_progress=tp, audio_progress=ap)
        # only distances between query and key progress count: shifting both leaves v as it was ...
        shifted = dit(x, sigma, ctx, text_progress=tp + 0.3, audio_progress=ap + 0.3)
        # ... shifting the text alone moves every head's alignment
        moved = dit(x, sigma, ctx, text_progress=tp + 0.3, audio_progress=ap)
        # and a model of the same weights without the rope predicts otherwise
        plain = _micro(0.0)
        plain.load_state_dict(dit.state_dict())
        v_plain = plain(x, sigma, ctx)
    torch.testing.assert_close(shifted, v, rtol=1e-4, atol=1e-5)
    assert (moved - v).abs().max() > 1e-2 and (v_plain - v).abs().max() > 1e-2


def test_progress_theta_survives_the_checkpoint(tmp_path):
    dit = _micro(8.0)
    path = tmp_path / "dit.safetensors"
    model_lib.save_dit(dit, path, metadata=model_lib.metadata_from_dit_config(dit.cfg))
    assert model_lib.load_dit(path).cfg.text_progress_theta == 8.0
    meta = model_lib.metadata_from_dit_config(model_lib.PRESETS["tiny"])
    assert "text_progress_theta" not in meta["config"]  # the official vocabulary when off


def test_base_with_progress_and_held_gates_through_stage1_and_sampling(micro_corpus):
    """Stage base with the rope and held gates: the gates stay at their init while the rest trains, the
    rope travels in the checkpoint to stage 1 (which refuses another value) and to sample.py."""
    work, data_args = micro_corpus
    train = os.path.join(ROOT, "train.py")
    common = [*data_args, "--global_batch=4", "--micro_batch=2", "--dtype=fp32", "--log_every=1", "--lr=3e-3",
              "--val_every=100", "--ckpt_every=100", "--max_steps=3"]
    run_py([train, *common, "--stage=base", "--name=prog", "--text_progress_theta=16", "--hold_text_gates=true"],
           cwd=work)
    run_py([train, *common, "--stage=base", "--name=prog_init", "--text_progress_theta=16", "--max_steps=0"], cwd=work)
    base = work / "runs/prog/dit.safetensors"
    trained, init = (model_lib.load_dit(p) for p in (base, work / "runs/prog_init/dit.safetensors"))
    assert trained.cfg.text_progress_theta == 16.0
    t, i = trained.state_dict(), init.state_dict()
    gates = [k for k in t if "audio_attn2.to_gate_logits" in k]
    assert gates and all(torch.equal(t[k], i[k]) for k in gates)
    assert max((t[k] - i[k]).abs().max().item() for k in t if k not in gates) > 1e-3

    lora = [*common, "--stage=lora", "--lora_targets=[audio]", "--lora_rank=4", f"--ckpt={base}"]
    run_py([train, *lora, "--name=prog_lora"], cwd=work)
    bad = run_py([train, *lora, "--name=prog_bad", "--text_progress_theta=8"], cwd=work, check=False)
    assert bad.returncode != 0 and "trained with 16" in bad.stderr.strip().splitlines()[-1], bad.stderr[-500:]

    out = work / "prog.wav"
    run_py([os.path.join(ROOT, "sample.py"), "--ckpt", str(base), "--config", str(work / "runs/prog/config.json"),
            "--prompt", 'A clear voice. "the red fox"', "--duration", "1", "--steps", "2", "--device", "cpu",
            "--out", str(out)], cwd=work)
    assert out.stat().st_size > 1000


def test_progress_rope_refuses_a_cache_without_progress(micro_corpus, tmp_path):
    """A cache made by an encoder without progress (or before it existed) is refused in one line."""
    import json
    import shutil

    work, data_args = micro_corpus
    cache = tmp_path / "cache"
    shutil.copytree(work / "cache", cache)
    for split in ("train", "val"):
        index = cache / split / "index.json"
        meta = json.loads(index.read_text())
        meta["text_progress"] = False
        index.write_text(json.dumps(meta))
    args = [a for a in data_args if not a.startswith("--cache_dir=")] + [f"--cache_dir={cache}"]
    proc = run_py([os.path.join(ROOT, "train.py"), *args, "--stage=base", "--name=noprog", "--max_steps=1",
                   "--global_batch=2", "--micro_batch=2", "--text_progress_theta=16"], cwd=work, check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "holds no text progress" in last and str(cache / "train") in last, proc.stderr[-400:]
