"""speaker.py against references: transformers' own WavLM-SV pipeline (feature extractor + model)
on a tiny random WavLMForXVector saved locally, and torchaudio's MelSpectrogram for mel_stats."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio
from transformers import AutoFeatureExtractor, Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector

import speaker


def _tiny_wavlm(path, seed=0):
    """A random WavLMForXVector of ~60k params plus a normalising feature extractor, saved to `path`.
    Layer-normed conv features (as WavLM-Large): the group-normed ones of base-plus would hide the
    input normalisation from the test (per-channel norms over time cancel mean and scale)."""
    torch.manual_seed(seed)
    cfg = WavLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                      num_conv_pos_embedding_groups=2, num_buckets=16, max_bucket_distance=50,
                      tdnn_dim=(32, 32), tdnn_kernel=(3, 1), tdnn_dilation=(1, 1), xvector_output_dim=24,
                      classifier_proj_size=16, feat_extract_norm="layer", conv_bias=True)
    WavLMForXVector(cfg).save_pretrained(path)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def wavlm_dir(tmp_path_factory):
    return _tiny_wavlm(tmp_path_factory.mktemp("wavlm"))


@pytest.fixture(scope="module")
def clips():
    g = torch.Generator().manual_seed(0)
    return 0.1 * torch.randn(2, 8000, generator=g), 0.1 * torch.randn(5000, generator=g)


def test_documented_dims_sum_to_laionbox_input():
    """wavlm-base-plus-sv's x-vector (transformers' default config) + the plug points = 2176."""
    assert WavLMConfig().xvector_output_dim + sum(speaker.PLUG_DIMS.values()) == 2176


def test_mel_stats_matches_torchaudio_and_dims_follow_settings(clips):
    wav = clips[0]
    for n_mels in (64, 40):
        ext = speaker.MelStats(n_mels=n_mels)
        assert ext.dim == 2 * n_mels
        mel = torchaudio.transforms.MelSpectrogram(16000, n_fft=1024, hop_length=160, n_mels=n_mels, power=1.0,
                                                   norm="slaney", mel_scale="slaney")(wav)
        logmel = torch.log(mel.clamp(min=1e-5)).numpy()  # (B, n_mels, frames)
        want = np.concatenate([logmel.mean(-1), logmel.std(-1)], axis=-1)
        got = ext(wav)
        assert got.shape == (2, 2 * n_mels)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)
    assert speaker.MelStats(64).fingerprint() != speaker.MelStats(40).fingerprint()
    with pytest.raises(ValueError, match="shorter than n_fft"):
        speaker.MelStats()(torch.zeros(1, 100))


def test_wavlm_sv_equals_transformers_pipeline(wavlm_dir, clips):
    """Our torch path (normalisation redone in torch) equals feature extractor + WavLMForXVector,
    for a batch and for a list of clips of different lengths; mel_stats follows in the vector."""
    feats = speaker.build_speaker_extractors(["wavlm_sv", "mel_stats"], {"wavlm_sv": wavlm_dir}, "cpu")
    assert feats.dim == 24 + 128 and feats.slices == {"wavlm_sv": slice(0, 24), "mel_stats": slice(24, 152)}

    fe = AutoFeatureExtractor.from_pretrained(wavlm_dir)
    ref = WavLMForXVector.from_pretrained(wavlm_dir).eval()

    def reference(wav):
        inputs = fe(list(wav.numpy()), sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            return F.normalize(ref(**inputs).embeddings, dim=-1)

    batch, single = clips
    got = feats(batch)
    assert got.shape == (2, 152) and got.grad_fn is None
    torch.testing.assert_close(got[:, :24], reference(batch), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:, 24:], speaker.MelStats()(batch))

    listed = feats([single.numpy(), batch[1]])
    want = torch.cat([reference(single[None]), reference(batch[1:])])
    torch.testing.assert_close(listed[:, :24], want, rtol=1e-5, atol=1e-5)
    split = feats.embed([single, batch[1]], split=True)
    torch.testing.assert_close(torch.cat([split["wavlm_sv"], split["mel_stats"]], -1), listed)


def test_differentiable_embedding(wavlm_dir, clips):
    """A cosine loss on the embedding back-propagates into the waveform, not into the extractors."""
    feats = speaker.build_speaker_extractors(["wavlm_sv", "mel_stats"], {"wavlm_sv": wavlm_dir}, "cpu")
    feats.train()  # stays in eval: dropout in a frozen scorer would make the loss noisy
    assert not feats.extractors["wavlm_sv"].model.training
    batch, _ = clips
    target = feats(batch.flip(-1))
    wav = batch.clone().requires_grad_(True)
    emb = feats.embed(wav, differentiable=True)
    loss = 1 - F.cosine_similarity(emb[:, feats.slices["wavlm_sv"]], target[:, feats.slices["wavlm_sv"]]).mean()
    loss.backward()
    assert torch.isfinite(wav.grad).all() and wav.grad.abs().sum() > 0
    assert all(p.grad is None for p in feats.parameters())


def test_fingerprint_tracks_weights_and_settings(tmp_path, wavlm_dir):
    build = speaker.build_speaker_extractors
    a = build(["wavlm_sv", "mel_stats"], {"wavlm_sv": wavlm_dir}).fingerprint()
    assert a == build(["wavlm_sv", "mel_stats"], {"wavlm_sv": wavlm_dir}).fingerprint()
    other = _tiny_wavlm(tmp_path / "other", seed=1)
    assert a != build(["wavlm_sv", "mel_stats"], {"wavlm_sv": other}).fingerprint()
    assert a != build(["mel_stats", "wavlm_sv"], {"wavlm_sv": wavlm_dir}).fingerprint()
    assert a != build(["wavlm_sv"], {"wavlm_sv": wavlm_dir}).fingerprint()


class _Embedder(nn.Module):
    """Stand-in for an exported Orange-tbr / CLAP model: framewise projection, mean over time."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(160, dim)

    def forward(self, wav):
        frames = wav[:, : wav.shape[1] // 160 * 160].reshape(wav.shape[0], -1, 160)
        return self.proj(frames).mean(1)


def _export(module, path):
    batch, frames = torch.export.Dim("batch", min=1), torch.export.Dim("frames", min=2)
    program = torch.export.export(module, (torch.randn(2, 16000),), dynamic_shapes=({0: batch, 1: 160 * frames},))
    torch.export.save(program, path)
    return str(path)


def test_plug_points_load_exported_programs_and_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"orange_tbr.*speaker_paths\['orange_tbr'\].*\.pt2"):
        speaker.build_speaker_extractors(["mel_stats", "orange_tbr"], {})
    with pytest.raises(FileNotFoundError, match="clap_how.*does not exist"):
        speaker.build_speaker_extractors(["clap_how"], {"clap_how": str(tmp_path / "missing.pt2")})

    torch.manual_seed(0)
    module = _Embedder(128)
    path = _export(module, tmp_path / "tbr.pt2")
    feats = speaker.build_speaker_extractors(["orange_tbr", "mel_stats"], {"orange_tbr": path})
    assert feats.dim == 128 + 128
    wav = torch.randn(3, 3200, requires_grad=True)
    emb = feats.embed(wav, differentiable=True)
    torch.testing.assert_close(emb[:, :128], F.normalize(module(wav), dim=-1))
    emb[:, :128].sum().backward()
    assert wav.grad.abs().sum() > 0

    with pytest.raises(ValueError, match=r"clap_what: .* expected \(2, 768\)"):
        speaker.build_speaker_extractors(["clap_what"], {"clap_what": path})
    (tmp_path / "junk.pt2").write_bytes(b"not a program")
    with pytest.raises(ValueError, match="clap_how: .*not a loadable torch.export program"):
        speaker.build_speaker_extractors(["clap_how"], {"clap_how": str(tmp_path / "junk.pt2")})


def test_bad_configuration_and_input(wavlm_dir):
    with pytest.raises(KeyError, match="unknown speaker extractor 'ecapa'"):
        speaker.build_speaker_extractors(["ecapa"], {})
    with pytest.raises(KeyError, match="wavlm"):
        speaker.build_speaker_extractors(["mel_stats"], {"wavlm": wavlm_dir})
    with pytest.raises(ValueError, match="empty"):
        speaker.build_speaker_extractors([], {})
    with pytest.raises(FileNotFoundError, match="wavlm_sv"):
        speaker.build_speaker_extractors(["wavlm_sv"], {})
    with pytest.raises(ValueError, match="mono"):
        speaker.build_speaker_extractors(["mel_stats"], {})(torch.zeros(1, 2, 16000))
