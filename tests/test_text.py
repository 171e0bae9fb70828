"""text.py against ltx-core 1.0.0: Gemma loading, feature extractors, the audio connector.

Everything is tiny and random (fp32, fixed seeds); Gemma 3 checkpoints are built locally with
transformers' save_pretrained, nothing is downloaded.
"""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model  # noqa: E402
import text  # noqa: E402
from ltx_core.model.transformer.rope import LTXRopeType  # noqa: E402
from ltx_core.text_encoders.gemma.embeddings_connector import Embeddings1DConnector  # noqa: E402
from ltx_core.text_encoders.gemma.embeddings_processor import convert_to_additive_mask  # noqa: E402
from ltx_core.text_encoders.gemma.encoders.base_encoder import GemmaTextEncoder  # noqa: E402
from ltx_core.text_encoders.gemma.feature_extractor import FeatureExtractorV1, FeatureExtractorV2  # noqa: E402
from ltx_core.text_encoders.gemma.tokenizer import LTXVGemmaTokenizer  # noqa: E402

WORDS = ["<pad>", "<eos>", "<bos>", "<unk>"] + "a the woman man says hello world quietly loud voice slowly".split()
PROMPTS = ["the woman says hello", "  loud  ", "a man says hello world quietly slowly the voice says hello loud world"]
MAX_LEN = 12
TEXT_CFG = dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                pad_token_id=0, eos_token_id=1, bos_token_id=2)


def _save_tokenizer(path):
    """A word-level fast tokenizer with a BOS post-processor, like Gemma's (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(path)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    """A tiny multimodal Gemma 3 (as gemma-3-12b-it is shipped) saved with its tokenizer."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    path = str(tmp_path_factory.mktemp("gemma3"))
    config = Gemma3Config(text_config=TEXT_CFG, mm_tokens_per_image=4,
                          vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14))
    torch.manual_seed(0)
    hf = Gemma3ForConditionalGeneration(config).eval()
    hf.save_pretrained(path)
    _save_tokenizer(path)
    return path, hf


def _left_mask(lengths, L):
    return torch.arange(L)[None] >= (L - torch.tensor(lengths))[:, None]  # (B, L) bool, left-padded


def _ltx_connector(heads, head_dim, layers, registers, gated):
    """ltx-core's connector as the 2.3 config builds it (split RoPE, float64 grid), weights perturbed."""
    torch.manual_seed(1)
    ref = Embeddings1DConnector(attention_head_dim=head_dim, num_attention_heads=heads, num_layers=layers,
                                positional_embedding_max_pos=[4096], num_learnable_registers=registers,
                                rope_type=LTXRopeType.SPLIT, double_precision_rope=True,
                                apply_gated_attention=gated).float().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ref


def _ours_from(ref, heads, head_dim, layers, registers, gated, layout):
    ours = text.TextConnector(heads, head_dim, layers, registers=registers, gated=gated, register_layout=layout)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.eval()


def _ref_per_sample(ref, x, mask):
    """ltx-core 1.0.0's register placement only handles batch 1, so run it sample by sample."""
    return torch.cat([ref(x[i:i + 1], convert_to_additive_mask(mask[i:i + 1].long(), x.dtype))[0]
                      for i in range(x.shape[0])])


# -----------------------------------------------------------------------------------------------
# Gemma loading


def test_gemma_hidden_states_and_features_match_ltx_core(gemma_dir, tmp_path):
    path, hf = gemma_dir
    enc = text.build_text_encoder(path, max_text_len=MAX_LEN, device="cpu", dtype=torch.float32, dim=24)
    hidden, mask = enc.hidden_states(PROMPTS)
    assert len(hidden) == TEXT_CFG["num_hidden_layers"] + 1

    ref = GemmaTextEncoder(model=hf, tokenizer=LTXVGemmaTokenizer(path, MAX_LEN))
    fe = FeatureExtractorV2(video_aggregate_embed=torch.nn.Linear(32 * 4, 8), embedding_dim=32,
                            audio_aggregate_embed=torch.nn.Linear(32 * 4, 24))
    fe.audio_aggregate_embed.load_state_dict(enc.projection.audio_aggregate_embed.state_dict())
    features, _ = enc.encode(PROMPTS)
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            ref_hidden, ref_mask = ref.encode(prompt)
            assert torch.equal(ref_mask[0].bool(), mask[i])
            for a, b in zip(ref_hidden, hidden):
                torch.testing.assert_close(b[i], a[0], atol=1e-6, rtol=0)
            _, ref_audio = fe(ref_hidden, ref_mask)
            assert (features[i] - ref_audio[0]).abs().max() <= 1e-5
    assert mask.sum(1).tolist() == [5, 2, MAX_LEN]  # BOS + words; the long prompt is truncated

    # the same language model saved text-only (gemma3_text) loads too and gives the same states
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    text_only = Gemma3ForCausalLM(Gemma3TextConfig(**TEXT_CFG))
    text_only.model.load_state_dict(hf.model.language_model.state_dict())
    text_only.save_pretrained(tmp_path)
    _save_tokenizer(tmp_path)
    enc2 = text.build_text_encoder(str(tmp_path), max_text_len=MAX_LEN, device="cpu", dtype=torch.float32, dim=24)
    hidden2, _ = enc2.hidden_states(PROMPTS)
    for a, b in zip(hidden, hidden2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_bad_text_encoder_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no/such/gemma"):
        text.build_text_encoder("/no/such/gemma", max_text_len=8, device="cpu", dtype=torch.float32, dim=8)
    with pytest.raises(FileNotFoundError, match="config.json"):
        text.build_text_encoder(str(tmp_path), max_text_len=8, device="cpu", dtype=torch.float32, dim=8)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="expected Gemma 3"):
        text.build_text_encoder(str(tmp_path), max_text_len=8, device="cpu", dtype=torch.float32, dim=8)
    with pytest.raises(ValueError, match="ckpt.*dim"):
        text.build_text_encoder("byte", max_text_len=8, device="cpu", dtype=torch.float32)


# -----------------------------------------------------------------------------------------------
# feature extractors


@pytest.mark.parametrize("B,L,H,n,lengths", [(3, 16, 32, 4, [16, 1, 7]), (2, 24, 48, 3, [5, 24]),
                                             (1, 8, 16, 2, [3])])
def test_feature_extractors_match_ltx_core(B, L, H, n, lengths):
    torch.manual_seed(0)
    hidden = tuple(torch.randn(B, L, H) * (1 + 3 * i) + i for i in range(n))  # layers at different scales
    mask = _left_mask(lengths, L)

    # LTX-2.3: per-token RMS, audio_aggregate_embed on x * sqrt(D/H)
    ours = text.TextProjection(H, n, 40, "2.3")
    ref = FeatureExtractorV2(video_aggregate_embed=torch.nn.Linear(H * n, 8), embedding_dim=H,
                             audio_aggregate_embed=torch.nn.Linear(H * n, 40))
    ours.audio_aggregate_embed.load_state_dict(ref.audio_aggregate_embed.state_dict())
    _, ref_audio = ref(hidden, mask.long())
    assert (ours(hidden, mask) - ref_audio).abs().max() <= 1e-5

    # LTX-2.0: per-layer mean/range over valid tokens, aggregate_embed without bias, width H
    ours = text.TextProjection(H, n, H, "2.0")
    ref = FeatureExtractorV1(aggregate_embed=torch.nn.Linear(H * n, H, bias=False), is_av=True)
    ours.aggregate_embed.load_state_dict(ref.aggregate_embed.state_dict())
    _, ref_audio = ref(hidden, mask.long(), "left")
    assert (ours(hidden, mask) - ref_audio).abs().max() <= 1e-5


# -----------------------------------------------------------------------------------------------
# connector


CONNECTOR_CASES = [  # heads, head_dim, layers, registers, L, gated
    (2, 16, 2, 8, 16, True),
    (3, 8, 1, 4, 24, True),
    (2, 16, 2, 8, 32, False),  # LTX-2.0 style: no gates
]


@pytest.mark.parametrize("heads,head_dim,layers,registers,L,gated", CONNECTOR_CASES)
def test_connector_ltx_core_1_0_layout_matches_ltx_core(heads, head_dim, layers, registers, L, gated):
    ref = _ltx_connector(heads, head_dim, layers, registers, gated)
    ours = _ours_from(ref, heads, head_dim, layers, registers, gated, "ltx_core_1_0")
    torch.manual_seed(2)
    x = torch.randn(4, L, heads * head_dim)
    mask = _left_mask([L, 1, 5, L - 3], L)
    with torch.no_grad():
        out, want = ours(x, mask), _ref_per_sample(ref, x, mask)
    assert (out - want).abs().max() <= 1e-5


def test_connector_official_layout_properties():
    heads, head_dim, layers, R, L = 2, 16, 2, 8, 20  # L not a multiple of R: register = position mod R
    ref = _ltx_connector(heads, head_dim, layers, R, True)
    official = _ours_from(ref, heads, head_dim, layers, R, True, "official")
    compact = _ours_from(ref, heads, head_dim, layers, R, True, "ltx_core_1_0")
    torch.manual_seed(3)
    x = torch.randn(3, L, heads * head_dim)
    mask = _left_mask([L, 6, 13], L)

    seen = {}
    official.transformer_1d_blocks[0].register_forward_pre_hook(lambda m, args: seen.update(x=args[0].clone()))
    with torch.no_grad():
        out = official(x, mask)
        x0 = seen["x"]
        # valid tokens keep their values and positions; padded position p holds register p mod R
        assert torch.equal(x0[mask], x[mask])
        registers = ref.learnable_registers[torch.arange(L) % R]  # (L, D)
        for i in range(3):
            assert torch.equal(x0[i][~mask[i]], registers[~mask[i]])
        # what sits in the padding of the input does not matter
        assert torch.equal(official(torch.where(mask[..., None], x, 100.0), mask), out)
        # each sample is computed independently of the batch
        for i in range(3):
            torch.testing.assert_close(official(x[i:i + 1], mask[i:i + 1])[0], out[i], atol=1e-6, rtol=0)
        # equals ltx-core on the filled sequence seen as fully valid (its layouts agree there)
        full = torch.ones_like(mask)
        filled = x0[:, : (L // R) * R]  # ltx-core needs L divisible by R
        want = _ref_per_sample(ref, filled, full[:, : filled.shape[1]])
        got = official(filled, full[:, : filled.shape[1]])
        assert (got - want).abs().max() <= 1e-5
        # a fully valid prompt gives the same result in both layouts; a padded one does not
        assert torch.equal(official(x[:1], full[:1]), compact(x[:1], full[:1]))
        assert (official(x[1:], mask[1:]) - compact(x[1:], mask[1:])).abs().max() > 1e-3


def test_cached_features_round_trip(gemma_dir):
    """Caching valid tokens only, then left-padding at train time, gives the same context."""
    path, _ = gemma_dir
    enc = text.build_text_encoder(path, max_text_len=MAX_LEN, device="cpu", dtype=torch.float32, dim=32)
    features, mask = enc.encode(PROMPTS)
    cached = [features[i][mask[i]] for i in range(len(PROMPTS))]
    padded, mask2 = text.left_pad_features(cached, MAX_LEN)
    assert torch.equal(mask2, mask) and torch.equal(padded[mask], features[mask])
    connector = text.TextConnector(2, 16, 1, registers=4)
    with torch.no_grad():
        assert torch.equal(connector(padded, mask2), connector(features, mask))


def test_official_file_loading(gemma_dir, tmp_path):
    """Connector and projection read from a safetensors file in the official layout."""
    path, hf = gemma_dir
    heads, head_dim, layers, R = 2, 16, 2, 4
    ref = _ltx_connector(heads, head_dim, layers, R, True)
    torch.manual_seed(4)
    tensors = {text.CONNECTOR_PREFIX + k: v.contiguous() for k, v in ref.state_dict().items()}
    tensors["text_embedding_projection.audio_aggregate_embed.weight"] = torch.randn(32, 32 * 4)
    tensors["text_embedding_projection.audio_aggregate_embed.bias"] = torch.randn(32)
    tensors["text_embedding_projection.video_aggregate_embed.weight"] = torch.randn(16, 32 * 4)
    tensors["text_embedding_projection.video_aggregate_embed.bias"] = torch.randn(16)
    tensors["model.diffusion_model.audio_proj_out.bias"] = torch.zeros(128)  # a DiT key: ignored here
    transformer = dict(rope_type="split", frequencies_precision="float64", connector_num_layers=layers,
                       connector_num_attention_heads=32, connector_attention_head_dim=128,
                       audio_connector_num_attention_heads=heads, audio_connector_attention_head_dim=head_dim,
                       connector_positional_embedding_max_pos=[4096], connector_apply_gated_attention=True)
    ckpt = str(tmp_path / "ltx.safetensors")
    save_file(tensors, ckpt, metadata={"config": json.dumps({"transformer": transformer})})

    connector = text.load_text_connector(ckpt, register_layout="ltx_core_1_0")
    enc = text.build_text_encoder(path, max_text_len=16, device="cpu", dtype=torch.float32, ckpt=ckpt)
    features, mask = enc.encode(PROMPTS[:2])
    fe = FeatureExtractorV2(video_aggregate_embed=torch.nn.Linear(32 * 4, 16), embedding_dim=32,
                            audio_aggregate_embed=torch.nn.Linear(32 * 4, 32))
    fe.audio_aggregate_embed.weight.data.copy_(tensors["text_embedding_projection.audio_aggregate_embed.weight"])
    fe.audio_aggregate_embed.bias.data.copy_(tensors["text_embedding_projection.audio_aggregate_embed.bias"])
    fe.video_aggregate_embed.weight.data.copy_(tensors["text_embedding_projection.video_aggregate_embed.weight"])
    fe.video_aggregate_embed.bias.data.copy_(tensors["text_embedding_projection.video_aggregate_embed.bias"])
    av_enc = text.build_text_encoder(path, max_text_len=16, device="cpu", dtype=torch.float32, ckpt=ckpt, video_dim=16)
    with torch.no_grad():
        hidden, _ = enc.hidden_states(PROMPTS[:2])
        ref_video, ref_features = fe(hidden, mask.long())
        assert (features - ref_features).abs().max() <= 1e-5
        audio_av, video_av, mask_av = av_enc.encode_av(PROMPTS[:2])  # the joint model: both from one pass
        assert torch.equal(audio_av, features) and torch.equal(mask_av, mask)
        assert (video_av - ref_video).abs().max() <= 1e-5
        assert (connector(features, mask) - _ref_per_sample(ref, ref_features, mask)).abs().max() <= 1e-5

    # a config that contradicts the tensors is refused, naming the file
    wrong = dict(transformer, audio_connector_num_attention_heads=4)
    save_file(tensors, str(tmp_path / "wrong.safetensors"), metadata={"config": json.dumps({"transformer": wrong})})
    with pytest.raises(ValueError, match=r"wrong\.safetensors.*4 heads"):
        text.load_text_connector(str(tmp_path / "wrong.safetensors"))

    del tensors[text.CONNECTOR_PREFIX + "transformer_1d_blocks.1.ff.net.2.bias"]
    bad = str(tmp_path / "bad.safetensors")
    save_file(tensors, bad, metadata={"config": json.dumps({"transformer": transformer})})
    with pytest.raises(KeyError, match=r"bad\.safetensors.*transformer_1d_blocks\.1\.ff\.net\.2\.bias"):
        text.load_text_connector(bad)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        text.load_text_connector(str(tmp_path / "nope.safetensors"))


def test_video_connector_from_an_av_file(tmp_path):
    """An AV file holds both connectors: stream="video" reads `video_embeddings_connector` sized by
    the connector_* entries (the audio one by audio_connector_*), and equals ltx-core's."""
    audio_ref, video_ref = _ltx_connector(2, 16, 1, 4, True), _ltx_connector(4, 16, 2, 4, True)
    tensors = {**{text.CONNECTOR_PREFIX + k: v.contiguous() for k, v in audio_ref.state_dict().items()},
               **{text.VIDEO_CONNECTOR_PREFIX + k: v.contiguous() for k, v in video_ref.state_dict().items()}}
    transformer = dict(rope_type="split", frequencies_precision="float64", connector_num_layers=2,
                       connector_num_attention_heads=4, connector_attention_head_dim=16, audio_connector_num_layers=1,
                       audio_connector_num_attention_heads=2, audio_connector_attention_head_dim=16,
                       connector_positional_embedding_max_pos=[4096], connector_apply_gated_attention=True)
    ckpt = str(tmp_path / "av.safetensors")
    save_file(tensors, ckpt, metadata={"config": json.dumps({"transformer": transformer})})
    video = text.build_text_connector("micro_av", ckpt=ckpt, dim=64, register_layout="ltx_core_1_0", stream="video")
    audio = text.build_text_connector("micro_av", ckpt=ckpt, dim=32, register_layout="ltx_core_1_0")
    assert len(video.transformer_1d_blocks) == 2 and len(audio.transformer_1d_blocks) == 1
    x = torch.randn(2, 8, 64)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, :3] = False
    with torch.no_grad():
        assert (video(x, mask) - _ref_per_sample(video_ref, x, mask)).abs().max() <= 1e-5
    saved = text.connector_checkpoint_tensors(video, stream="video")
    assert all(torch.equal(saved[k], tensors[k]) for k in saved) and saved.keys() <= tensors.keys()
    # our own AV file: both connectors and their metadata side by side reload as they were
    meta = {**text.connector_metadata(audio), **text.connector_metadata(video, stream="video")}
    assert meta["connector_num_layers"] == 2 and meta["audio_connector_num_layers"] == 1
    ours = str(tmp_path / "ours.safetensors")
    save_file({**text.connector_checkpoint_tensors(audio), **saved}, ours,
              metadata={"config": json.dumps({"transformer": {"rope_type": "split", **meta}})})
    for stream, connector in (("video", video), ("audio", audio)):
        back = text.load_text_connector(ours, register_layout="ltx_core_1_0", stream=stream)
        assert back.state_dict().keys() == connector.state_dict().keys()
        assert all(torch.equal(v, connector.state_dict()[k]) for k, v in back.state_dict().items())
        with torch.no_grad():
            assert torch.equal(back(x[..., :back.learnable_registers.shape[1]], mask),
                               connector(x[..., :back.learnable_registers.shape[1]], mask))
    # random presets: the video connector is as wide as the AV preset's video text context
    from model import PRESETS

    for name, kw in text.VIDEO_CONNECTOR_PRESETS.items():
        assert kw["heads"] * kw["head_dim"] == PRESETS[name].video_cross_attention_dim, name
    assert text.build_text_connector("micro_av", stream="video").learnable_registers.shape[1] == 64
    with pytest.raises(ValueError, match="stream"):
        text.build_text_connector("micro_av", stream="image")
    with pytest.raises(KeyError, match="no video text connector preset for model 'micro'"):
        text.build_text_connector("micro", stream="video")


@pytest.mark.parametrize("gated", [True, False])
def test_connector_save_load_round_trip(tmp_path, gated):
    """Our own files (model.py metadata, with or without connector_metadata) reload exactly."""
    connector = text.TextConnector(3, 8, 2, registers=4, gated=gated, register_layout="ltx_core_1_0")
    torch.manual_seed(5)
    x, mask = torch.randn(2, 12, 24), _left_mask([12, 5], 12)
    with torch.no_grad():
        want = connector(x, mask)
    dit_meta = json.loads(model.metadata_from_dit_config(model.PRESETS["micro"])["config"])["transformer"]
    for meta in (dit_meta, {**dit_meta, **text.connector_metadata(connector)}):
        path = str(tmp_path / "ours.safetensors")
        save_file(text.connector_checkpoint_tensors(connector), path,
                  metadata={"config": json.dumps({"transformer": meta})})
        if not gated and "audio_connector_num_attention_heads" not in meta:
            # without gates only the metadata knows the heads: the reference's default 30 x 128 is refused
            with pytest.raises(ValueError, match="30 heads"):
                text.load_text_connector(path)
            continue
        loaded = text.load_text_connector(path, register_layout="ltx_core_1_0")
        with torch.no_grad():
            assert torch.equal(loaded(x, mask), want)
    with pytest.raises(ValueError, match="32 wide.*text features are 48"):
        text.build_text_connector("micro", dim=48)


def test_connector_presets_fit_dit_presets():
    for name, cfg in model.PRESETS.items():
        c = text.CONNECTOR_PRESETS[name]
        assert c["heads"] * c["head_dim"] == (cfg.caption_channels or cfg.cross_attention_dim), name
    connector = text.build_text_connector("micro", seed=0)
    assert torch.equal(connector.learnable_registers, text.build_text_connector("micro", seed=0).learnable_registers)


# -----------------------------------------------------------------------------------------------
# byte encoder


def test_byte_encoder_deterministic_and_real_path():
    kw = dict(max_text_len=24, device="cpu", dtype=torch.float32, dim=16)
    prompts = ["hello", "héllo wörld", "x" * 40]
    rng = torch.get_rng_state()
    a, b = text.build_text_encoder("byte", seed=0, **kw), text.build_text_encoder("byte", seed=0, **kw)
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG is untouched
    fa, ma = a.encode(prompts)
    fb, mb = b.encode(prompts)
    assert torch.equal(fa, fb) and torch.equal(ma, mb)
    assert ma.sum(1).tolist() == [6, 14, 24]  # BOS + UTF-8 bytes, truncated to max_text_len
    assert text.text_fingerprint(a) == text.text_fingerprint(b)

    c = text.build_text_encoder("byte", seed=1, **kw)
    assert not torch.allclose(c.encode(prompts)[0], fa)
    assert text.text_fingerprint(c) != text.text_fingerprint(a)
    assert text.text_fingerprint(text.build_text_encoder("byte", seed=0, **{**kw, "max_text_len": 32})) \
        != text.text_fingerprint(a)

    # the byte path is the real one: all hidden states through ltx-core's 2.3 feature extractor
    hidden, mask = a.hidden_states(prompts)
    assert len(hidden) == text.BYTE_GEMMA["num_hidden_layers"] + 1
    H, n = hidden[0].shape[-1], len(hidden)
    fe = FeatureExtractorV2(video_aggregate_embed=torch.nn.Linear(H * n, 8), embedding_dim=H,
                            audio_aggregate_embed=torch.nn.Linear(H * n, 16))
    fe.audio_aggregate_embed.load_state_dict(a.projection.audio_aggregate_embed.state_dict())
    with torch.no_grad():
        assert (fe(hidden, mask.long())[1] - fa).abs().max() <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16 CUDA path needs a GPU")
def test_bf16_cuda_path_close_to_fp32():
    kw = dict(max_text_len=32, seed=0, dim=32)
    prompts = ["hello there", "a longer prompt with a few more words"]
    f32, m32 = text.build_text_encoder("byte", device="cpu", dtype=torch.float32, **kw).encode(prompts)
    f16, m16 = text.build_text_encoder("byte", device="cuda", dtype=torch.bfloat16, **kw).encode(prompts)
    assert torch.equal(m32, m16.cpu())
    err = (f16.cpu() - f32)[m32].norm() / f32[m32].norm()
    assert err < 5e-2, err
    c32 = text.build_text_connector("micro", seed=0)
    c16 = text.build_text_connector("micro", seed=0, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        o32, o16 = c32(f32, m32), c16(f16.bfloat16(), m16).float().cpu()
    assert torch.isfinite(o16).all() and (o16 - o32).norm() / o32.norm() < 5e-2
