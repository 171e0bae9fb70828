"""train.py's audio-video mode on the microscopic joint model (`micro_av`) and a fake ltx-trainer
precomputed dataset: per-modality σ, audio-free batches (mask / preservation), the EMA balancer
through a stopped and resumed run, and a run on data without any audio."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import data
import losses
import lora
import model
import text
import train
from config import load_config
from conftest import ROOT, run_py

TRAIN = os.path.join(ROOT, "train.py")
AUDIO_WIDTH, VIDEO_CH, AUDIO_TEXT, VIDEO_TEXT = 16, 24, 32, 64  # micro_av's widths
FRAMES, FPS = 3, 24.0  # (3 - 1)·8 + 1 = 17 pixel frames: 0.708 s, 18 audio latents


def fake_av_dataset(root, audio=(True, True, True, False)):
    """latents/, conditions/, audio_latents/ as ltx-trainer's process_dataset.py writes them."""
    def save(sub, rel, obj):
        p = root / sub / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, p)

    g = torch.Generator().manual_seed(0)
    seconds = ((FRAMES - 1) * 8 + 1) / FPS
    for k, has_audio in enumerate(audio):
        rel = f"clip{k}.pt"
        save("latents", rel, {"latents": torch.randn(VIDEO_CH, FRAMES, 2, 2, generator=g), "num_frames": FRAMES,
                              "height": 2, "width": 2, "fps": FPS})
        mask = torch.zeros(10, dtype=torch.bool)
        mask[-(4 + k):] = True
        save("conditions", rel, {"video_prompt_embeds": torch.randn(10, VIDEO_TEXT, generator=g),
                                 "audio_prompt_embeds": torch.randn(10, AUDIO_TEXT, generator=g),
                                 "prompt_attention_mask": mask})
        if has_audio:
            T = data.expected_audio_frames(seconds)
            save("audio_latents", rel, {"latents": torch.randn(2, T, 8, generator=g), "num_time_steps": T,
                                        "frequency_bins": 8, "duration": seconds})
    return root


def _cfg(root, *extra):
    return load_config(["--av=true", f"--precomputed={root}", "--model=micro_av", "--stage=lora",
                        "--lora_targets=[attn_all]", "--lora_rank=4", "--lora_alpha=4", "--max_text_len=16",
                        "--dtype=fp32", "--device=cpu", *extra])


def _parts(cfg, dataset):
    example = data.collate_av(dataset, [0], cfg, AUDIO_WIDTH)
    parts = train.build(cfg, torch.device("cpu"), example)
    _randomise_zeros(parts["dit"])
    return parts


def _perturb_lora(dit, seed=1):
    """Non-zero lora_B everywhere: at init B = 0 blocks every gradient into lora_A, which would make
    a zero-gradient check pass for the wrong reason."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora.lora_modules(dit):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


def _grads(named):
    return {n: (p.grad.abs().max().item() if p.grad is not None else 0.0) for n, p in named}


def test_independent_sigmas_use_each_streams_token_count(tmp_path):
    ds = data.PrecomputedDataset(fake_av_dataset(tmp_path), _cfg(tmp_path), require_audio=False)
    batch = data.collate_av(ds, [0, 1, 2, 3], _cfg(tmp_path), AUDIO_WIDTH)
    n_video, n_audio = batch["video_x0"].shape[1], 18
    assert batch["audio_x0"].shape[1] == n_audio and batch["has_audio"].tolist() == [True, True, True, False]
    for mode in ("independent", "shared"):
        cfg = _cfg(tmp_path, f"--av_sigma={mode}")
        _, _, sv, sa, _, _ = train.av_inputs(cfg, batch, torch.Generator().manual_seed(3))
        # the same draws as the sampler called per stream in order (video first)
        g = torch.Generator().manual_seed(3)
        want_v = losses.sample_sigma(4, n_video, generator=g)
        want_a = losses.sample_sigma(4, n_audio, generator=g) if mode == "independent" else want_v.clone()
        torch.testing.assert_close(sv, want_v, rtol=0, atol=0)
        torch.testing.assert_close(sa[:3], want_a[:3], rtol=0, atol=0)
        assert sa[3] == 1.0  # the item without audio: pure noise, nothing fabricated
        assert (not torch.equal(sv[:3], sa[:3])) == (mode == "independent")
    # the shift follows each stream's own count: 4096 video tokens vs 100 audio tokens
    g = torch.Generator().manual_seed(0)
    sv, sa = losses.sample_av_sigmas(20000, 4096, 100, generator=g)
    assert losses.shift_for_tokens(4096) > losses.shift_for_tokens(100)
    assert sv.median() > sa.median() + 0.1, (sv.median(), sa.median())


@pytest.mark.parametrize("mode", ["mask", "preserve"])
def test_audio_free_batch(tmp_path, mode):
    """mask: an audio-free micro-batch puts exactly zero gradient into every audio / cross-modal
    adapter, while the same items with audio would train them; preserve: the preservation loss is
    0 at LoRA init, finite and > 0 once the adapters moved, and it does train the audio adapters."""
    root = fake_av_dataset(tmp_path)
    cfg = _cfg(root, f"--audio_free={mode}")
    ds = data.PrecomputedDataset(root, cfg, require_audio=False)
    parts = _parts(cfg, ds)
    dit = parts["dit"]
    named = [(n, p) for n, p in dit.named_parameters() if p.requires_grad]
    audio_ids = {id(p) for p in parts["audio_adapters"]}
    audio_names = {n for n, p in named if id(p) in audio_ids}
    assert audio_names and all("audio" in n for n in audio_names)
    assert any("video_to_audio_attn" in n for n in audio_names) and any("audio_to_video_attn" in n for n in audio_names)
    video_names = {n for n, _ in named} - audio_names
    batch = data.collate_av(ds, [3], cfg, AUDIO_WIDTH)  # clip3 has no audio
    assert not batch["has_audio"].any()

    if mode == "preserve":
        logs = train.av_micro_step(cfg, parts, batch, torch.Generator().manual_seed(0), torch.autocast("cpu", enabled=False), 1.0, 1.0)
        assert logs["preserve"].item() == 0.0  # LoRA B = 0: the adapted model is the base model
        dit.zero_grad(set_to_none=True)
    _perturb_lora(dit)
    logs = train.av_micro_step(cfg, parts, batch, torch.Generator().manual_seed(0),
                               torch.autocast("cpu", enabled=False), 1.0, 1.0)
    grads = _grads(named)
    assert max(grads[n] for n in video_names) > 0
    assert "loss_audio" not in logs and logs["audio_free"].item() == 1.0
    if mode == "mask":
        assert all(grads[n] == 0.0 for n in audio_names), {n: grads[n] for n in audio_names if grads[n]}
        assert all(p.requires_grad for p in parts["audio_adapters"])  # unfrozen again after the step
        # the contrast: the same kind of item with audio trains the audio adapters
        dit.zero_grad(set_to_none=True)
        with_audio = data.collate_av(ds, [0], cfg, AUDIO_WIDTH)
        train.av_micro_step(cfg, parts, with_audio, torch.Generator().manual_seed(0),
                            torch.autocast("cpu", enabled=False), 1.0, 1.0)
        assert min(_grads(named)[n] for n in audio_names if "lora_A" in n) > 0
    else:
        assert torch.isfinite(logs["preserve"]) and logs["preserve"].item() > 0
        assert max(grads[n] for n in audio_names) > 0


def _randomise_zeros(module, seed=0):
    """A fresh DiT is adaLN-zero (v ≡ 0, no gradient reaches anything): give the frozen base random
    non-zero modulation and output weights, as a trained checkpoint has."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" not in name and p.abs().max() == 0:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def base_checkpoint(path):
    """A micro_av DiT with both text connectors, saved like an official AV file (keys + metadata)."""
    torch.manual_seed(0)
    dit = model.AudioDiT(model.PRESETS["micro_av"])
    _randomise_zeros(dit)
    audio, video = text.build_text_connector("micro_av", seed=0), text.build_text_connector("micro_av", seed=1,
                                                                                            stream="video")
    model.save_dit(dit, str(path), metadata=model.metadata_from_dit_config(dit.cfg),
                   extra={**text.connector_checkpoint_tensors(audio),
                          **text.connector_checkpoint_tensors(video, stream="video")})
    return path


def _args(root, name, extra=()):
    """train.py arguments of a small av run on the dataset at `root` (its base checkpoint beside it)."""
    base = root.parent / "base.safetensors"
    if not base.exists():
        base_checkpoint(base)
    return [TRAIN, "--av=true", f"--precomputed={root}", f"--ckpt={base}", "--stage=lora", "--lora_rank=4",
            "--lora_alpha=4", "--max_text_len=16", "--dtype=fp32", "--device=cpu", "--global_batch=2",
            "--micro_batch=1", "--max_steps=4", "--ckpt_every=100", "--lr=1e-2", "--log_every=1",
            f"--name={name}", "--sigma_sampler=uniform", *extra]


def _run(root, name, extra=(), check=True):
    return run_py(_args(root, name, extra), cwd=root.parent, check=check)


def test_av_run_balancer_resumes_and_no_audio_run(tmp_path):
    """A few AV steps through the real loop (balancer on, mixed audio / audio-free items); a run
    stopped after step 1 and resumed ends bit-identical, balancer state included; a dataset
    without audio trains video adapters only."""
    root = fake_av_dataset(tmp_path / "ds")
    extra = ["--lora_targets=[audio_v2a,attn1]", "--audio_balancer=true", "--balancer_decay=0.5"]
    full = _run(root, "full", extra)
    assert "3 samples with audio, 1 without (mask mode)" in full.stdout
    records = [json.loads(line) for line in open(root.parent / "runs/full/metrics.jsonl")]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 4
    for key in ("loss_video", "loss_audio", "sigma_video", "sigma_audio", "w_audio"):
        assert all(key in r and r[key] == r[key] for r in steps), key
    assert steps[0]["w_audio"] == 1.0 and steps[1]["w_audio"] != 1.0  # the balancer took over after step 1
    ckpt = torch.load(root.parent / "runs/full/checkpoint.pt", weights_only=False)
    assert ckpt["balancer"]["ema_audio"] is not None
    assert set(ckpt["balancer"]) == {"ema_video", "ema_audio", "weight"}
    assert ckpt["config"]["audio_weight"] == 1.0  # the balancer's weight is never written into the config

    run_dir = root.parent / "runs/stopped"
    run_dir.mkdir(parents=True)
    (run_dir / "STOP").touch()  # honoured after the first step
    _run(root, "stopped", extra)
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"] == 1
    _run(root, "stopped", [*extra, "--resume=true"])
    a, b = load_file(str(root.parent / "runs/full/lora.safetensors")), load_file(str(run_dir / "lora.safetensors"))
    assert a.keys() == b.keys() and any("video_to_audio_attn" in k for k in a)
    assert all(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # every adapter trained (B starts at 0)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["balancer"] == ckpt["balancer"]

    silent = fake_av_dataset(tmp_path / "silent", audio=(False, False, False, False))
    out = _run(silent, "silent", ["--lora_targets=[attn_all]", "--max_steps=1"])
    assert "no audio at all: no audio or cross-modal adapters" in out.stdout
    keys = load_file(str(silent.parent / "runs/silent/lora.safetensors")).keys()
    assert keys and not any("audio" in k for k in keys)


def test_av_config_errors(tmp_path):
    """Settings refused before anything loads (in this process: the config checks), and a model of no
    audio-video preset refused by the real command in one line."""
    root = fake_av_dataset(tmp_path / "ds")
    for extra, message in [(["--av_sigma=uniform"], "av_sigma"), (["--audio_free=zero"], "audio_free")]:
        with pytest.raises(ValueError, match=message):
            train.preflight(load_config([*_args(root, "bad", extra)[1:], f"--out_dir={tmp_path / 'runs'}"]))
    proc = _run(root, "bad", ["--ckpt=", "--model=micro"], check=False)
    assert proc.returncode != 0 and "audio-video preset" in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1


def test_av_two_processes_equal_one(tmp_path):
    """Hand-written DDP in av mode: 2 gloo ranks = 1 process with 2 micro-steps, the balancer's
    EMAs included (they see the step's losses averaged over every micro-batch of every rank)."""
    root = fake_av_dataset(tmp_path / "ds")
    extra = ["--lora_targets=[audio_v2a,attn1]", "--audio_balancer=true", "--balancer_decay=0.5", "--max_steps=3",
             "--audio_free=preserve"]
    _run(root, "one", extra)
    args = _args(root, "two", extra)
    run_py(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args], cwd=root.parent)
    one = torch.load(root.parent / "runs/one/checkpoint.pt", weights_only=False)
    two = torch.load(root.parent / "runs/two/checkpoint.pt", weights_only=False)
    for k in ("ema_video", "ema_audio", "weight"):
        assert two["balancer"][k] == pytest.approx(one["balancer"][k], rel=1e-5), k
    for k, v in one["trainable"].items():
        torch.testing.assert_close(two["trainable"][k], v, rtol=1e-4, atol=1e-6, msg=k)
    assert any(v.abs().max() > 0 for k, v in one["trainable"].items() if "lora_B" in k)
