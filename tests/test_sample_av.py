"""sample.py --av: the joint audio-video Euler loop equals ltx-core's AV model + guider + Euler step,
and the command line writes the audio, the video latents (ltx-trainer's latents/ layout) and a
sidecar from a micro AV checkpoint."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import model as M  # noqa: E402
import av_sampler  # noqa: E402
import sample as sample_lib  # noqa: E402
import sampler  # noqa: E402
import text  # noqa: E402
from conftest import ROOT, run_py  # noqa: E402
from ltx_core.components.diffusion_steps import EulerDiffusionStep  # noqa: E402
from ltx_core.components.guiders import MultiModalGuider, MultiModalGuiderParams  # noqa: E402
from ltx_core.guidance.perturbations import BatchedPerturbationConfig  # noqa: E402
from ltx_core.model.transformer.modality import Modality  # noqa: E402
from ltx_core.model.transformer.model import X0Model  # noqa: E402
from test_av_model import MICRO_AV as AV23, ours_from, ref_audio_positions, ref_video_positions, reference_model  # noqa: E402

FPS = 24.0


@pytest.mark.parametrize("cfg", [(1.0, 1.0), (3.0, 7.0)])
def test_denoise_av_equals_ltx_core(cfg):
    ref = reference_model(AV23)
    ours = ours_from(ref, AV23)
    x0_model = X0Model(ref)
    B, F, H, W, Ta, L = 2, 2, 2, 3, 9, 5
    g = torch.Generator().manual_seed(5)
    noise_v = torch.randn(B, F * H * W, AV23.video_in_channels, generator=g)
    noise_a = torch.randn(B, Ta, AV23.in_channels, generator=g)
    ctx = (torch.randn(B, L, AV23.video_cross_attention_dim, generator=g),
           torch.randn(B, L, AV23.cross_attention_dim, generator=g))
    neg = (torch.randn(B, L, AV23.video_cross_attention_dim, generator=g),
           torch.randn(B, L, AV23.cross_attention_dim, generator=g))
    sigmas = sampler.ltx2_sigmas(3)

    got_v, got_a = av_sampler.denoise_av(ours, noise_v, noise_a, ctx, neg, sigmas=sigmas, cfg=cfg,
                                     video_positions=M.video_positions(F, H, W, B, fps=FPS))

    vpos, apos = ref_video_positions(B, F, H, W), ref_audio_positions(B, Ta)
    guiders = [MultiModalGuider(MultiModalGuiderParams(cfg_scale=c)) for c in cfg]
    xv, xa = noise_v.clone(), noise_a.clone()
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i].expand(B)

        def x0(context):
            video = Modality(latent=xv, sigma=sigma, timesteps=sigma[:, None, None].expand(B, xv.shape[1], 1),
                             positions=vpos, context=context[0])
            audio = Modality(latent=xa, sigma=sigma, timesteps=sigma[:, None, None].expand(B, Ta, 1), positions=apos,
                             context=context[1])
            with torch.no_grad():
                return x0_model(video, audio, BatchedPerturbationConfig.empty(B))

        cond, uncond = x0(ctx), x0(neg)
        # the guider's rescale is off here, so it applies per batch exactly as ours
        pred_v = guiders[0].calculate(cond[0], uncond[0], 0.0, 0.0)
        pred_a = guiders[1].calculate(cond[1], uncond[1], 0.0, 0.0)
        xv = EulerDiffusionStep().step(xv, pred_v, sigmas, i)
        xa = EulerDiffusionStep().step(xa, pred_a, sigmas, i)
    torch.testing.assert_close(got_v, xv, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_a, xa, rtol=1e-4, atol=1e-4)


def test_video_latent_shape():
    assert av_sampler.video_latent_shape(97, 192, 256) == (13, 6, 8)
    with pytest.raises(ValueError, match="1 \\+ 8k"):
        av_sampler.video_latent_shape(96, 192, 192)


def _av_checkpoint(path):
    """micro_av with random (non-zero) weights and both connectors, as an official AV file."""
    torch.manual_seed(0)
    dit = M.AudioDiT(M.PRESETS["micro_av"])
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.1)
    extra = {**text.connector_checkpoint_tensors(text.build_text_connector("micro_av", seed=0)),
             **text.connector_checkpoint_tensors(text.build_text_connector("micro_av", seed=1, stream="video"),
                                                 stream="video")}
    M.save_dit(dit, str(path), metadata=M.metadata_from_dit_config(dit.cfg), extra=extra)
    return path


def test_cli_writes_audio_video_latents_and_sidecar(tmp_path):
    ckpt = _av_checkpoint(tmp_path / "av.safetensors")
    config = tmp_path / "run.yaml"  # the codec and text settings the micro model was built for
    config.write_text("model: micro_av\nmel_n_mels: 4\ngriffin_lim_iters: 2\nmax_text_len: 16\n")
    out = tmp_path / "out" / "clip.wav"
    proc = run_py([os.path.join(ROOT, "sample.py"), "--av", "--ckpt", str(ckpt), "--config", str(config),
                   "--prompt", "A man, (man, whispering): 'hello there'", "--seeds", "3", "--steps", "2",
                   "--frames", "17", "--size", "64x32", "--out", str(out), "--device", "cpu"], cwd=tmp_path)
    assert "video latents written" in proc.stdout
    import soundfile as sf

    wav, rate = sf.read(str(out))
    frames = 17
    assert wav.shape[0] == pytest.approx(frames / FPS * rate, rel=0.1)  # the audio lasts as long as the video
    latents = torch.load(tmp_path / "out" / "clip.video_latents.pt")
    assert latents["latents"].shape == (24, 3, 1, 2) and torch.isfinite(latents["latents"]).all()
    assert (latents["num_frames"], latents["height"], latents["width"], latents["fps"]) == (3, 1, 2, 24.0)
    meta = json.loads((tmp_path / "out" / "clip.json").read_text())
    assert meta["seed"] == 3 and meta["video_latent_shape"] == [3, 1, 2] and meta["av"] is True

    audio_only = tmp_path / "audio.safetensors"
    M.save_dit(M.AudioDiT(M.PRESETS["micro"]), str(audio_only))
    bad = run_py([os.path.join(ROOT, "sample.py"), "--av", "--ckpt", str(audio_only), "--config", str(config),
                  "--prompt", "x", "--steps", "1", "--frames", "9", "--size", "32x32", "--out",
                  str(tmp_path / "x.wav"), "--device", "cpu"], cwd=tmp_path, check=False)
    assert bad.returncode != 0 and "audio-video" in bad.stderr and "audio.safetensors" in bad.stderr
    # flags of the audio-only sampler are refused before anything loads, not ignored (in this process): the joint
    # sampler starts from unit noise, is Euler only and keeps the reference schedule
    for flag, value in (("--temperature", "0.6"), ("--eta", "0.3"), ("--sigma_last", "0.02")):
        with pytest.raises(SystemExit, match=flag):
            sample_lib.main(["--av", "--ckpt", str(ckpt), "--config", str(config), "--prompt", "x", flag, value,
                             "--out", str(tmp_path / "w.wav"), "--device", "cpu"])
    assert not (tmp_path / "w.wav").exists()
