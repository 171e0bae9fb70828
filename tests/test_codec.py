"""codec.py against ltx-core 1.0.0 (tiny random configs, both vocoders), the safetensors loader
against ltx-core's own loader, and the mel codec against torchaudio and a calibrated bound."""

import json
import math
import os
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import codec  # noqa: E402
from ltx_core.loader.single_gpu_model_builder import SingleGPUModelBuilder  # noqa: E402
from ltx_core.model.audio_vae import (  # noqa: E402
    AUDIO_VAE_DECODER_COMFY_KEYS_FILTER,
    AUDIO_VAE_ENCODER_COMFY_KEYS_FILTER,
    VOCODER_COMFY_KEYS_FILTER,
    AudioDecoderConfigurator,
    AudioEncoderConfigurator,
    VocoderConfigurator,
    encode_audio,
)
from ltx_core.types import Audio  # noqa: E402

# the official LTX-2.3 checkpoint's metadata sections (tests/data/ltx23/README.md)
LTX23 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "ltx23")

# Tiny audio VAE: the official layout (64 mel bins, ch_mult [1,2,4], pixel norm, causal) with
# 1 res block, ch 32 and z 2. ltx-core sizes per_channel_statistics by `ch`, so ch must equal the
# latent width z * 16 for its reference to run at all: 2 * 16 = 32.
TINY_VAE = {
    "model": {"params": {"sampling_rate": 16000, "ddconfig": {
        "double_z": True, "mel_bins": 64, "z_channels": 2, "resolution": 256, "in_channels": 2,
        "out_ch": 2, "ch": 32, "ch_mult": [1, 2, 4], "num_res_blocks": 1, "dropout": 0.0,
        "mid_block_add_attention": False, "norm_type": "pixel", "causality_axis": "height",
        "attn_resolutions": []}}},
    "preprocessing": {"stft": {"filter_length": 1024, "hop_length": 160, "causal": True},
                      "mel": {"n_mel_channels": 64}},
}
_KERNELS = {"resblock_kernel_sizes": [3, 5], "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5]]}
_AMP = {"resblock": "AMP1", "stereo": True, "activation": "snakebeta", **_KERNELS}
# LTX-2.0 layout (flat HiFi-GAN section, 24 kHz) and LTX-2.3 layout (nested vocoder + bwe, 48 kHz).
TINY_VOCODERS = {
    "2.0": {"resblock": "1", "stereo": True, **_KERNELS, "upsample_initial_channel": 64,
            "upsample_rates": [6, 5, 2, 2, 2], "upsample_kernel_sizes": [16, 15, 8, 4, 4],
            "output_sampling_rate": 24000},
    "2.3": {"vocoder": {**_AMP, "upsample_initial_channel": 64, "upsample_rates": [5, 2, 2, 2, 2, 2],
                        "upsample_kernel_sizes": [11, 4, 4, 4, 4, 4], "use_tanh_at_final": False,
                        "use_bias_at_final": False},
            "bwe": {**_AMP, "upsample_initial_channel": 32, "upsample_rates": [6, 5, 2, 2, 2],
                    "upsample_kernel_sizes": [12, 11, 4, 4, 4], "use_tanh_at_final": False,
                    "use_bias_at_final": False, "input_sampling_rate": 16000, "output_sampling_rate": 48000,
                    "n_fft": 512, "hop_length": 80, "num_mels": 64}},
}
OUTPUT_RATE = {"2.0": 24000, "2.3": 48000}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tiny convolutions are too small to split: on a busy 2-core machine, two OpenMP
    threads waiting on each other cost ~10x the wall time (measured 102 s vs 8 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference(version, seed=0):
    """ltx-core encoder, decoder and vocoder with random weights, and their official-layout state
    dict (`audio_vae.encoder.*`, `audio_vae.decoder.*`, `audio_vae.per_channel_statistics.*`,
    `vocoder.*`)."""
    torch.manual_seed(seed)
    config = {"audio_vae": TINY_VAE, "vocoder": TINY_VOCODERS[version]}
    enc = AudioEncoderConfigurator.from_config(config)
    dec = AudioDecoderConfigurator.from_config(config)
    voc = VocoderConfigurator.from_config(config)
    with torch.no_grad():
        stats = enc.per_channel_statistics
        stats.get_buffer("std-of-means").uniform_(0.5, 1.5)  # torch.empty at init
        stats.get_buffer("mean-of-means").normal_(0, 0.5)
        dec.per_channel_statistics.load_state_dict(stats.state_dict())
        for name, p in [*enc.named_parameters(), *dec.named_parameters(), *voc.named_parameters()]:
            if name.endswith((".alpha", ".beta")):  # log-scale SnakeBeta params start at 0
                p.uniform_(-0.5, 0.5)
            if name.endswith("bias"):  # signed activations, so every nonlinearity's slope shows
                p.normal_(0, 0.1)
        if version == "2.3":  # ltx-core leaves the BWE's STFT/mel bases zero until loaded
            voc.mel_stft.load_state_dict(codec.MelSTFT(512, 80, 64, 16000).state_dict())
    state = {}
    for k, v in enc.state_dict().items():
        state[("audio_vae." if k.startswith("per_channel") else "audio_vae.encoder.") + k] = v
    state.update({"audio_vae.decoder." + k: v for k, v in dec.state_dict().items() if not k.startswith("per_channel")})
    state.update({"vocoder." + k: v for k, v in voc.state_dict().items()})
    return config, enc.eval(), dec.eval(), voc.eval(), state


@pytest.fixture(scope="module", params=["2.0", "2.3"])
def pair(request):
    config, enc, dec, voc, state = reference(request.param)
    mine = codec.LTXAudioCodec(config).eval()
    mine.load_state_dict(state, strict=True)  # same names, same shapes, nothing left over
    return request.param, (enc, dec, voc), mine


def test_parity_with_ltx_core(pair):
    version, (enc, dec, voc), mine = pair
    torch.manual_seed(1)
    wav = 0.1 * torch.randn(2, 2, 4800)  # (B, C, N): 0.3 s stereo at 16 kHz
    with torch.no_grad():
        ref_latent = encode_audio(Audio(wav, 16000), enc)  # (B, 8=z, T, 16) normalised
        latent = mine.encode(wav)  # (B, T, z*16)
        ref_wav = voc(dec(ref_latent))
        out = mine.decode(latent)
    ref_tokens = ref_latent.permute(0, 2, 1, 3).flatten(2)  # c*16 + f
    assert latent.dtype == torch.float32 and latent.shape == (2, 8, mine.latent_dim) == ref_tokens.shape
    assert (latent - ref_tokens).abs().max() <= 1e-5
    assert out.shape == ref_wav.shape == (2, 2, (4 * 8 - 3) * 160 * OUTPUT_RATE[version] // 16000)
    assert (out - ref_wav).abs().max() <= 1e-4
    assert (ref_wav.abs() < 0.99).float().mean() > 0.5 and ref_wav.std() > 1e-3  # not saturated/silent
    assert mine.output_rate == OUTPUT_RATE[version] and mine.sample_rate == 16000
    assert mine.channels == 2 and mine.tokens_per_second == 25


def test_decode_16k_is_what_the_scorers_hear(pair):
    """2.3: the 16 kHz vocoder's own output (ltx-core's `VocoderWithBWE.vocoder`), before the
    bandwidth extension; 2.0: the 24 kHz decode resampled. Differentiable either way."""
    version, (_, dec, voc), mine = pair
    torch.manual_seed(2)
    latent = torch.randn(2, 8, mine.latent_dim, requires_grad=True)
    out = mine.decode_16k(latent)
    with torch.no_grad():
        z, bins = mine.audio_vae.z_channels, mine.audio_vae.latent_bins
        ref_latent = latent.detach().unflatten(2, (z, bins)).permute(0, 2, 1, 3)  # (B, z, T, bins): c*bins + f
        mel = dec(ref_latent)
        want = voc.vocoder(mel) if version == "2.3" else torchaudio.functional.resample(voc(mel), 24000, 16000)
    assert out.shape == want.shape == (2, 2, (4 * 8 - 3) * 160)
    assert (out - want).abs().max() <= 1e-4
    out.square().mean().backward()
    assert torch.isfinite(latent.grad).all() and latent.grad.abs().max() > 0


def test_mono_is_duplicated_to_stereo(pair):
    _, (enc, _, _), mine = pair
    mono = 0.1 * torch.randn(1, 1, 4000)
    with torch.no_grad():
        ref = encode_audio(Audio(mono.expand(1, 2, 4000), 16000), enc).permute(0, 2, 1, 3).flatten(2)
        assert (mine.encode(mono) - ref).abs().max() <= 1e-5


def test_latent_lengths_match_reference(pair):
    version, (enc, dec, voc), mine = pair
    mel_codec = codec.MelCodec()
    # The encoder is the same for both vocoders: measure its lengths once.
    for n in [600, 1000, 6399, 6400, 6401, 9599, 9600] if version == "2.0" else []:
        with torch.no_grad():
            ref_t = encode_audio(Audio(0.1 * torch.randn(1, 2, n), 16000), enc).shape[2]
            got = mine.encode(0.1 * torch.randn(1, 2, n))
        assert got.shape[1] == ref_t == mine.num_tokens(n) == mel_codec.num_tokens(n), n
    with torch.no_grad():  # decoded length for a few latent lengths
        for t in [1, 4]:
            z = torch.randn(1, t, mine.latent_dim)
            ref_len = voc(dec(z.unflatten(2, (2, 16)).permute(0, 2, 1, 3))).shape[-1]
            assert mine.decode(z).shape[-1] == ref_len


def test_gradients_flow_to_latent_and_match_reference(pair):
    """A waveform loss reaches the latent, equal to ltx-core's gradient up to fp32 summation
    order (measured 1.5e-4 of the largest entry through the 2.3 vocoder: tolerance 1e-3). The
    2.3 case runs under gradient checkpointing, the path the ReFL losses take."""
    version, (enc, dec, voc), mine = pair
    torch.manual_seed(2)
    z0 = torch.randn(1, 3, mine.latent_dim)
    target = 0.1 * torch.randn(1, 2, (4 * 3 - 3) * 160 * OUTPUT_RATE[version] // 16000)

    def grad(fn):
        z = z0.clone().requires_grad_(True)
        (fn(z) - target).pow(2).mean().backward()
        return z.grad

    g_ref = grad(lambda z: voc(dec(z.unflatten(2, (2, 16)).permute(0, 2, 1, 3))))
    mine.grad_checkpointing = version == "2.3"
    try:
        g = grad(mine.decode)
    finally:
        mine.grad_checkpointing = False
    assert torch.isfinite(g).all() and g.abs().max() > 0
    assert (g - g_ref).abs().max() <= 1e-3 * g_ref.abs().max()


def _official_config(version):
    with open(os.path.join(LTX23, "audio_vae_config.json")) as f:
        vae = json.load(f)["audio_vae"]
    if version == "2.0":  # ltx-core's defaults are the LTX-2.0 vocoder
        return {"audio_vae": vae, "vocoder": {"resblock": "1", "stereo": True}}
    # the LTX-2.3 vocoder sizes (tests/data/ltx23/README.md): BigVGAN 1536 channels, x[5,2,2,2,2,2];
    # BWE 512 channels, x[6,5,2,2,2].
    return {"audio_vae": vae, "vocoder": {
        "vocoder": {**_AMP, "upsample_initial_channel": 1536, "upsample_rates": [5, 2, 2, 2, 2, 2],
                    "upsample_kernel_sizes": [11, 4, 4, 4, 4, 4]},
        "bwe": {**_AMP, "upsample_initial_channel": 512, "upsample_rates": [6, 5, 2, 2, 2],
                "upsample_kernel_sizes": [12, 11, 4, 4, 4], "input_sampling_rate": 16000,
                "output_sampling_rate": 48000, "n_fft": 512, "hop_length": 80, "num_mels": 64}}}


@pytest.mark.parametrize("version", ["2.0", "2.3"])
def test_full_size_names_and_shapes_match_reference(version):
    """At the official audio_vae config, every key and shape equals ltx-core's (meta device)."""
    config = _official_config(version)
    with torch.device("meta"):
        enc = AudioEncoderConfigurator.from_config(config)
        dec = AudioDecoderConfigurator.from_config(config)
        voc = VocoderConfigurator.from_config(config)
        mine = codec.LTXAudioCodec(config)
    ref = {("audio_vae." if k.startswith("per_channel") else "audio_vae.encoder.") + k: v.shape
           for k, v in enc.state_dict().items()}
    ref.update({"audio_vae.decoder." + k: v.shape for k, v in dec.state_dict().items() if not k.startswith("per_")})
    ref.update({"vocoder." + k: v.shape for k, v in voc.state_dict().items()})
    assert {k: v.shape for k, v in mine.state_dict().items()} == ref
    assert mine.latent_dim == 128 and mine.output_rate == OUTPUT_RATE[version]


def _write_checkpoint(path, config, state, extra_meta=True):
    tensors = {k: v.contiguous() for k, v in state.items()}
    tensors["model.diffusion_model.audio_proj_out.weight"] = torch.zeros(128, 4)  # not a codec key
    meta = {"config": json.dumps({**config, "transformer": {"num_layers": 1}})} if extra_meta else None
    save_file(tensors, str(path), metadata=meta)


def test_load_from_official_layout_safetensors(tmp_path):
    config, _, _, _, state = reference("2.3", seed=3)
    path = tmp_path / "ltx.safetensors"
    _write_checkpoint(path, config, state)
    mine = codec.build_codec("ltx", str(path))
    # ltx-core's own loader on the same file is the reference for "the right model".
    cpu = torch.device("cpu")
    enc = SingleGPUModelBuilder(AudioEncoderConfigurator, str(path), AUDIO_VAE_ENCODER_COMFY_KEYS_FILTER).build(cpu)
    dec = SingleGPUModelBuilder(AudioDecoderConfigurator, str(path), AUDIO_VAE_DECODER_COMFY_KEYS_FILTER).build(cpu)
    voc = SingleGPUModelBuilder(VocoderConfigurator, str(path), VOCODER_COMFY_KEYS_FILTER).build(cpu)
    wav = 0.1 * torch.randn(1, 2, 4000)
    with torch.no_grad():
        ref_latent = encode_audio(Audio(wav, 16000), enc)
        latent = mine.encode(wav)
        assert (latent - ref_latent.permute(0, 2, 1, 3).flatten(2)).abs().max() <= 1e-5
        assert (mine.decode(latent) - voc(dec(ref_latent))).abs().max() <= 1e-4
    assert all(p.dtype == torch.float32 and not p.is_meta for p in mine.parameters())

    # The fingerprint is stable across loads and follows what encode depends on.
    fp = codec.codec_fingerprint(mine)
    assert codec.codec_fingerprint(codec.build_codec("ltx", str(path))) == fp
    with torch.no_grad():
        mine.vocoder.vocoder.conv_pre.weight.add_(1.0)  # decode-only weight: cached latents unchanged
        assert codec.codec_fingerprint(mine) == fp
        mine.audio_vae.per_channel_statistics.get_buffer("std-of-means").mul_(2)
        assert codec.codec_fingerprint(mine) != fp


def test_bad_checkpoints_raise(tmp_path):
    config, _, _, _, state = reference("2.0", seed=4)
    no_vocoder = tmp_path / "no_vocoder.safetensors"
    _write_checkpoint(no_vocoder, config, {k: v for k, v in state.items() if not k.startswith("vocoder.")})
    with pytest.raises(ValueError, match=r"no_vocoder.safetensors.*missing.*vocoder\.conv_pre"):
        codec.build_codec("ltx", str(no_vocoder))
    no_meta = tmp_path / "no_meta.safetensors"
    _write_checkpoint(no_meta, config, state, extra_meta=False)
    with pytest.raises(ValueError, match=r"no_meta.safetensors.*config"):
        codec.build_codec("ltx", str(no_meta))
    wrong = tmp_path / "wrong_version.safetensors"  # 2.0 weights under a 2.3 vocoder config
    _write_checkpoint(wrong, {**config, "vocoder": TINY_VOCODERS["2.3"]}, state)
    with pytest.raises(ValueError, match="wrong_version.safetensors"):
        codec.build_codec("ltx", str(wrong))
    with pytest.raises(ValueError, match="unknown codec"):
        codec.build_codec("wavenet")


def speechlike(seconds, seed=0, sr=16000):
    """A voiced, speech-like test signal: a 100-180 Hz harmonic source under two moving formants,
    4 syllables per second with gaps, fricative noise bursts and a -60 dB noise floor."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * sr)) / sr
    f0 = 140 + 40 * torch.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / sr
    f1 = 500 + 300 * torch.sin(2 * math.pi * 1.3 * t)
    f2 = 1500 + 600 * torch.sin(2 * math.pi * 0.9 * t + 1)
    x = torch.zeros_like(t)
    for k in range(1, 40):
        amp = torch.exp(-((k * f0 - f1) / 200) ** 2) + 0.6 * torch.exp(-((k * f0 - f2) / 300) ** 2) + 0.02
        x += amp * torch.sin(k * phase) * (k * f0 < sr / 2)
    x = x * torch.clamp(1.5 * torch.sin(2 * math.pi * 2.0 * t), 0, 1)
    x += 0.05 * torch.randn(t.shape, generator=g) * (torch.sin(2 * math.pi * 2.0 * t + 2) > 0.8)
    x = 0.3 * x / x.abs().max()
    return (x + 1e-3 * torch.randn(t.shape, generator=g))[None, None]  # (1, 1, N)


def mel_db(wav):
    """An analysis independent of the mel codec's: the LTX front end (n_fft 1024, 64 mels) in dB,
    floored 80 dB below the peak."""
    db = 20 / math.log(10) * codec.log_mel(wav, 16000, 1024, 160, codec.slaney_mel_fb(1024, 64, 16000))
    return torch.maximum(db, db.amax() - 80)


def test_mel_codec_round_trip_keeps_the_spectrogram():
    """Measured (32 mels, n_fft 512, 32 Griffin-Lim iterations, this 3 s signal): re-encoded
    features differ by 0.016 (normalised units, mean abs) and the 64-mel spectrogram by 2.57 dB
    (the detail finer than the codec's 32 mels cannot come back). Bounds ~2x and ~1.5x that; for
    scale, a -6 dB gain change costs 6.0 dB, a 50 ms shift 6.6 dB, white noise 22.3 dB."""
    mel = codec.build_codec("mel", n_mels=32, n_fft=512, griffin_lim_iters=32)
    x = speechlike(3.0)
    with torch.no_grad():
        z = mel.encode(x)
        y = mel.decode(z)
    assert z.shape == (1, mel.num_tokens(x.shape[-1]), 128) and mel.latent_dim == 128
    assert y.shape == (1, 1, (4 * z.shape[1] - 1) * 160)  # the padded last token decodes too
    n = min(y.shape[-1], x.shape[-1])
    y = y[..., :n]
    assert (mel.encode(y) - mel.encode(x[..., :n])).abs().mean() < 0.03
    d = (mel_db(y) - mel_db(x[..., :n])).abs().mean()
    assert d < 4.0
    assert (mel_db(0.5 * x) - mel_db(x)).abs().mean() > 4.0  # the bound does separate a wrong output


def test_mel_codec_inverse_matches_torchaudio_and_is_differentiable():
    mel = codec.MelCodec(n_mels=32, n_fft=512, griffin_lim_iters=4)
    spec = torch.rand(2, 32, 20) + 0.01
    ref = torchaudio.transforms.InverseMelScale(257, 32, 16000, norm="slaney", mel_scale="slaney")(spec)
    assert (torch.relu(mel.mel_fb_pinv @ spec) - ref).abs().max() <= 1e-4 * ref.abs().max()
    z = mel.encode(0.1 * torch.randn(1, 1, 8000)).requires_grad_(True)
    mel.decode(z).pow(2).mean().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().max() > 0


def test_mel_fingerprint_follows_encode_settings():
    from config import load_config

    built = codec.codec_from_config(load_config(["--codec=mel", "--mel_n_mels=16", "--mel_std=3"]))
    assert built.latent_dim == 64 and built.std == 3.0
    base = codec.codec_fingerprint(codec.MelCodec())
    assert codec.codec_fingerprint(codec.MelCodec()) == base
    assert codec.codec_fingerprint(codec.MelCodec(griffin_lim_iters=8)) == base  # decode-only
    assert codec.codec_fingerprint(codec.MelCodec(mean=-3.0)) != base
    assert codec.codec_fingerprint(codec.MelCodec(n_mels=16)) != base


def test_load_audio_resamples_and_converts_channels(tmp_path):
    t = np.arange(48000) / 48000
    tone = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    sf.write(tmp_path / "mono48k.wav", tone, 48000)
    wav = codec.load_audio(tmp_path / "mono48k.wav", 16000, channels=2)
    assert wav.shape == (2, 16000) and wav.dtype == torch.float32
    assert torch.equal(wav[0], wav[1])
    spectrum = torch.fft.rfft(wav[0]).abs()
    assert spectrum.argmax().item() == 1000  # 1 s at 16 kHz: bin k is k Hz
    assert codec.load_audio(tmp_path / "mono48k.wav", 16000).shape == (1, 16000)

    surround = np.zeros((1000, 6), np.float32)
    surround[:, 0], surround[:, 2], surround[:, 3], surround[:, 5] = 0.4, 0.2, 0.9, -0.4  # FL, FC, LFE, BR
    sf.write(tmp_path / "5.1.wav", surround, 16000, subtype="FLOAT")
    st = codec.load_audio(tmp_path / "5.1.wav", 16000, channels=2)
    a = 1 / math.sqrt(2)
    left = (0.4 + a * 0.2) / (1 + 2 * a)  # ITU BS.775, LFE dropped, rows normalised to sum 1
    right = (a * 0.2 - a * 0.4) / (1 + 2 * a)
    assert st.shape == (2, 1000) and torch.allclose(st[:, 0], torch.tensor([left, right]), atol=1e-6)
    assert codec.to_channels(torch.randn(8, 10), 2).shape == (2, 10)
    assert codec.to_channels(torch.ones(2, 10), 1).shape == (1, 10)


def test_bad_audio_raises_naming_the_file(tmp_path):
    sf.write(tmp_path / "empty.wav", np.zeros((0, 1), np.float32), 16000)
    nan = np.zeros(1000, np.float32)
    nan[10] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT")
    (tmp_path / "junk.wav").write_bytes(b"not audio at all" * 10)
    for name, what in [("empty.wav", "empty"), ("nan.wav", "NaN"), ("junk.wav", "cannot read"),
                       ("missing.wav", "cannot read")]:
        with pytest.raises(ValueError, match=rf"{name}.*{what}"):
            codec.load_audio(tmp_path / name, 16000)
    with pytest.raises(ValueError, match="too short"):
        codec.MelCodec().encode(torch.zeros(1, 1, 100))


def test_cli_round_trips_a_file(tmp_path, capsys):
    sf.write(tmp_path / "in.wav", speechlike(1.0)[0, 0].numpy(), 16000)
    codec.main([str(tmp_path / "in.wav"), str(tmp_path / "out.wav"), "--griffin_lim_iters=4"])
    out, rate = sf.read(tmp_path / "out.wav")
    assert rate == 16000 and abs(len(out) - 16000) <= 640
    assert "26 tokens" in capsys.readouterr().out


# -----------------------------------------------------------------------------------------------
# the mel codec's basis (principal components of a training set's tokens)


def _speech_clips():
    """Four clips of real (eSpeak) speech: tests/data/speech_16k.wav cut in four."""
    wav, rate = sf.read(os.path.join(os.path.dirname(__file__), "data", "speech_16k.wav"), dtype="float32")
    assert rate == 16000
    return [torch.from_numpy(c.copy())[None] for c in np.array_split(wav, 4)]


def test_mel_basis_is_the_principal_components_of_the_tokens():
    """fit_mel_basis against numpy's eigendecomposition of the tokens' covariance: the same leading
    directions (sign: the largest loading positive), orthonormal, overall unit spread once projected;
    the codec with the basis encodes to those projections and decodes the projection back; with as
    many components as features nothing is lost."""
    plain = codec.MelCodec(n_mels=16, griffin_lim_iters=4)
    clips = _speech_clips()
    basis = codec.fit_mel_basis(plain, clips, 12)
    with torch.no_grad():
        tokens = torch.cat([plain.encode(c[None])[0, :-1] for c in clips]).double()
    centred = (tokens - tokens.mean(0)).numpy()
    values, vectors = np.linalg.eigh(centred.T @ centred)
    top = vectors[:, ::-1][:, :12].T  # (12, 64), largest eigenvalue first
    comps = basis["components"].double().numpy()
    assert np.allclose(np.abs((comps * top).sum(1)), 1.0, atol=1e-4)  # the same directions
    assert (comps[np.arange(12), np.abs(comps).argmax(1)] > 0).all()
    assert np.allclose(comps @ comps.T, np.eye(12), atol=1e-5)
    assert float(((tokens - tokens.mean(0)) @ torch.from_numpy(comps).T).std()) == pytest.approx(
        basis["scale"].item(), rel=1e-5)
    projected = codec.MelCodec(n_mels=16, griffin_lim_iters=4, basis=basis)
    assert projected.latent_dim == 12
    x = clips[0][None]
    with torch.no_grad():
        z, features = projected.encode(x), plain.encode(x)
        assert z.shape == features.shape[:2] + (12,)
        want = (features - basis["mean"]) @ basis["components"].T / basis["scale"]
        assert torch.allclose(z, want, atol=1e-5)
        # decoded without Griffin-Lim iterations (the magnitudes at zero phase): a continuous map, so
        # float rounding stays rounding. 64 components lose nothing, 12 do lose something.
        zero_phase = dict(n_mels=16, griffin_lim_iters=0)
        want = codec.MelCodec(**zero_phase).decode(features)
        full = codec.MelCodec(**zero_phase, basis=codec.fit_mel_basis(plain, clips, 64))
        assert (full.decode(full.encode(x)) - want).abs().max() < 1e-4 * want.abs().max()
        kept = codec.MelCodec(**zero_phase, basis=basis).decode(z)
        assert (kept - want).abs().max() > 1e-2 * want.abs().max()
    assert codec.codec_fingerprint(projected) != codec.codec_fingerprint(plain)
    assert codec.codec_fingerprint(projected) != codec.codec_fingerprint(full)
    # the basis is the codec's buffers (they follow .to(), as the filterbank does), not saved with it
    assert {f"basis_{k}" for k in basis} <= dict(projected.named_buffers()).keys()
    assert not any(k.startswith("basis") for k in projected.state_dict())
    assert projected.double().basis["components"].dtype == torch.float64


def test_whitened_mel_basis_sets_each_components_spread(tmp_path):
    """whiten w: the same components, one scale per component, and component k's spread becomes
    std_k ** (1 - w) (1: all equal), times one number that keeps the overall spread 1; the codec
    decodes its latents to the same features as the unwhitened basis (the scale is undone exactly);
    a whitened basis survives a file round trip; whiten outside [0, 1] is refused."""
    plain = codec.MelCodec(n_mels=16, griffin_lim_iters=0)
    clips = _speech_clips()
    flat = codec.fit_mel_basis(plain, clips, 12)
    with torch.no_grad():
        tokens = torch.cat([plain.encode(c[None])[0, :-1] for c in clips])
    spread = ((tokens - flat["mean"]) @ flat["components"].T).std(0)  # each component's own std
    assert spread[0] > 5 * spread[-1]  # the leading components dominate (what whitening changes)
    for w in (0.5, 1.0):
        basis = codec.fit_mel_basis(plain, clips, 12, whiten=w)
        assert torch.equal(basis["components"], flat["components"]) and basis["scale"].shape == (12,)
        whitened = codec.MelCodec(n_mels=16, griffin_lim_iters=0, basis=basis)
        with torch.no_grad():
            z = torch.cat([whitened.encode(c[None])[0, :-1] for c in clips])
            ratio = z.std(0) / spread ** (1 - w)  # one common factor for every component
            assert torch.allclose(ratio, ratio[0].expand(12), rtol=1e-4)
            assert float(z.std()) == pytest.approx(1.0, rel=1e-4)
            x = clips[1][None]
            same = codec.MelCodec(n_mels=16, griffin_lim_iters=0, basis=flat)
            assert torch.allclose(whitened.decode(whitened.encode(x)), same.decode(same.encode(x)), atol=1e-5)
    codec.save_mel_basis(tmp_path / "basis.safetensors", basis, plain)
    loaded = codec.MelCodec(n_mels=16, griffin_lim_iters=0, basis=str(tmp_path / "basis.safetensors"))
    assert torch.equal(loaded.basis["scale"], basis["scale"])
    with pytest.raises(ValueError, match=r"whiten must be in \[0, 1\], got 1.5"):
        codec.fit_mel_basis(plain, clips, 12, whiten=1.5)
    with pytest.raises(ValueError, match="bad: basis scale must be > 0"):
        codec.check_mel_basis({**flat, "scale": -torch.ones(12)}, 64, "bad")
    with pytest.raises(ValueError, match="bad: basis shapes"):
        codec.check_mel_basis({**flat, "scale": torch.ones(5)}, 64, "bad")


def test_mel_basis_file_round_trip_and_refusals(tmp_path):
    """A saved basis loads back bit for bit (same fingerprint); a basis fitted under other codec
    settings, a file that is not a basis and a basis of the wrong size are refused naming the file;
    the config's mel_basis_dim must agree with the file."""
    from config import load_config

    plain = codec.MelCodec(n_mels=16)
    basis = codec.fit_mel_basis(plain, _speech_clips(), 12)
    path = tmp_path / "basis.safetensors"
    codec.save_mel_basis(path, basis, plain)
    loaded = codec.MelCodec(n_mels=16, basis=str(path))
    assert codec.codec_fingerprint(loaded) == codec.codec_fingerprint(codec.MelCodec(n_mels=16, basis=basis))
    with pytest.raises(ValueError, match=r"basis.safetensors: fitted for other codec settings \(n_mels 16"):
        codec.MelCodec(n_mels=32, basis=str(path))
    save_file({"w": torch.zeros(3)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="other.safetensors: not a mel basis file"):
        codec.MelCodec(n_mels=16, basis=str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="bad: basis shapes"):
        codec.check_mel_basis({**basis, "mean": torch.zeros(5)}, 64, "bad")
    with pytest.raises(ValueError, match="basis dim must be in 1..64"):
        codec.fit_mel_basis(plain, _speech_clips(), 65)
    cfg = ["--codec=mel", "--mel_n_mels=16", f"--mel_basis={path}"]
    assert codec.codec_from_config(load_config([*cfg, "--mel_basis_dim=12"])).latent_dim == 12
    with pytest.raises(ValueError, match="a basis of 12 components, the config's mel_basis_dim is 8"):
        codec.codec_from_config(load_config([*cfg, "--mel_basis_dim=8"]))
    with pytest.raises(ValueError, match="mel_basis_dim is 0"):
        codec.codec_from_config(load_config(cfg))
    with pytest.raises(ValueError, match="mel_basis_dim 12 needs mel_basis"):
        codec.codec_from_config(load_config(["--codec=mel", "--mel_n_mels=16", "--mel_basis_dim=12"]))
    with pytest.raises(ValueError, match="mel_basis_dim.*more than a token's 4 x 16"):
        load_config(["--mel_n_mels=16", "--mel_basis_dim=65"])
