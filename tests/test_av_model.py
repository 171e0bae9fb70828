"""model.py's audio-video mode against the reference ltx-core 1.0.0 (tiny random configs, fp32, CPU)."""

import dataclasses
import json
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lora  # noqa: E402
import model as M  # noqa: E402
from ltx_core.components.patchifiers import AudioPatchifier, VideoLatentPatchifier, get_pixel_coords  # noqa: E402
from ltx_core.guidance.perturbations import (  # noqa: E402
    BatchedPerturbationConfig,
    Perturbation,
    PerturbationConfig,
    PerturbationType,
)
from ltx_core.model.transformer.attention import AttentionFunction  # noqa: E402
from ltx_core.model.transformer.modality import Modality  # noqa: E402
from ltx_core.model.transformer.model import LTXModel, LTXModelType  # noqa: E402
from ltx_core.model.transformer.rope import LTXRopeType  # noqa: E402
from ltx_core.model.transformer.text_projection import PixArtAlphaTextProjection  # noqa: E402
from ltx_core.types import SpatioTemporalScaleFactors, VideoLatentShape  # noqa: E402

TOL = 1e-5
FPS = 24.0
MICRO_AV = M.PRESETS["micro_av"]
# different head counts per stream: the cross-modal rope groups channels by each stream's own heads;
# the ltx-core default gate scale (1) instead of 2.3's 1000
MIXED_AV = M.DiTConfig(num_layers=2, heads=2, head_dim=16, in_channels=16, cross_attention_dim=32, stg_block=1,
                       video=True, video_heads=4, video_head_dim=16, video_in_channels=8,
                       video_cross_attention_dim=64, av_ca_timestep_scale=1.0)
# LTX-2.0 style: 6-row tables, no gates, no prompt AdaLN, caption projections inside the transformer
AV20 = M.DiTConfig(num_layers=2, heads=2, head_dim=16, in_channels=16, cross_attention_dim=32, stg_block=1,
                   gated_attention=False, cross_attention_adaln=False, caption_channels=24, video=True,
                   video_heads=2, video_head_dim=32, video_in_channels=24, video_cross_attention_dim=64)


def reference_model(cfg, seed=0):
    """An ltx-core AudioVideo LTXModel at `cfg` with all parameters random (N(0, 0.2))."""
    def caption(dim):  # LTX-2.0: the Gemma-feature projection lives in the transformer
        return PixArtAlphaTextProjection(cfg.caption_channels, dim) if cfg.caption_channels else None

    torch.manual_seed(seed)
    ref = LTXModel(
        model_type=LTXModelType.AudioVideo,
        num_attention_heads=cfg.video_heads,
        attention_head_dim=cfg.video_head_dim,
        in_channels=cfg.video_in_channels,
        out_channels=cfg.video_in_channels,
        num_layers=cfg.num_layers,
        cross_attention_dim=cfg.video_cross_attention_dim,
        positional_embedding_max_pos=[int(p) for p in cfg.video_rope_max_pos],
        audio_num_attention_heads=cfg.heads,
        audio_attention_head_dim=cfg.head_dim,
        audio_in_channels=cfg.in_channels,
        audio_out_channels=cfg.in_channels,
        audio_cross_attention_dim=cfg.cross_attention_dim,
        audio_positional_embedding_max_pos=[int(cfg.rope_max_pos)],
        av_ca_timestep_scale_multiplier=int(cfg.av_ca_timestep_scale),
        attention_type=AttentionFunction.PYTORCH,
        rope_type=LTXRopeType.SPLIT,
        double_precision_rope=cfg.rope_double_precision,
        apply_gated_attention=cfg.gated_attention,
        cross_attention_adaln=cfg.cross_attention_adaln,
        caption_projection=caption(cfg.video_dim),
        audio_caption_projection=caption(cfg.dim),
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    return ref


def ours_from(ref, cfg):
    ours = M.AudioDiT(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours


def ref_video_positions(B, F, H, W):
    """ltx-core's video positions (B, 3, T, 2): [start, end) in (seconds, pixels, pixels), causal fix."""
    bounds = VideoLatentPatchifier(patch_size=1).get_patch_grid_bounds(VideoLatentShape(B, 1, F, H, W))
    pos = get_pixel_coords(bounds, SpatioTemporalScaleFactors.default(), causal_fix=True).float()
    pos[:, 0] = pos[:, 0] / FPS
    return pos


def ref_audio_positions(B, T):
    return AudioPatchifier(patch_size=16)._compute_audio_timings(B, T)  # (B, 1, T, 2)


def av_inputs(cfg, B, F, H, W, Ta, Lv, La, seed=1):
    """Random AV inputs with independent sigmas, per-token timesteps (first video frame and the
    audio tail clean, sigma 0) and left-padded context masks."""
    g = torch.Generator().manual_seed(seed)
    Tv = F * H * W
    d = dict(
        video_x=torch.randn(B, Tv, cfg.video_in_channels, generator=g),
        audio_x=torch.randn(B, Ta, cfg.in_channels, generator=g),
        video_sigma=torch.rand(B, generator=g),
        audio_sigma=torch.rand(B, generator=g),
        video_context=torch.randn(B, Lv, cfg.caption_channels or cfg.video_cross_attention_dim, generator=g),
        audio_context=torch.randn(B, La, cfg.caption_channels or cfg.cross_attention_dim, generator=g),
    )
    d["video_timesteps"] = d["video_sigma"][:, None].expand(B, Tv).clone()
    d["video_timesteps"][:, : H * W] = 0.0  # first-frame conditioning tokens
    d["audio_timesteps"] = d["audio_sigma"][:, None].expand(B, Ta).clone()
    d["audio_timesteps"][:, -(Ta // 4):] = 0.0
    d["video_context_mask"] = torch.ones(B, Lv, dtype=torch.bool)
    d["video_context_mask"][0, : Lv // 3] = False
    d["audio_context_mask"] = torch.ones(B, La, dtype=torch.bool)
    d["audio_context_mask"][-1, : La // 2] = False
    return d


def reference_forward(ref, d, vpos, apos, video_stg=(), audio_stg=()):
    """ltx-core's (v_video, v_audio) for the inputs `d` of `av_inputs`."""
    B = d["video_x"].shape[0]
    perts = [Perturbation(PerturbationType.SKIP_VIDEO_SELF_ATTN, list(video_stg))] if video_stg else []
    perts += [Perturbation(PerturbationType.SKIP_AUDIO_SELF_ATTN, list(audio_stg))] if audio_stg else []
    video = Modality(latent=d["video_x"], sigma=d["video_sigma"], timesteps=d["video_timesteps"], positions=vpos,
                     context=d["video_context"], context_mask=d["video_context_mask"].long())
    audio = Modality(latent=d["audio_x"], sigma=d["audio_sigma"], timesteps=d["audio_timesteps"], positions=apos,
                     context=d["audio_context"], context_mask=d["audio_context_mask"].long())
    return ref(video=video, audio=audio, perturbations=BatchedPerturbationConfig([PerturbationConfig(perts)] * B))


def ours_forward(ours, d, B, F, H, W, **kw):
    return ours.forward_av(**d, video_positions=M.video_positions(F, H, W, B, fps=FPS), **kw)


def max_err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("cfg", [MICRO_AV, MIXED_AV, AV20], ids=["micro_av", "mixed_heads", "ltx20_style"])
def test_av_parity_with_ltx_core(cfg):
    """Independent sigma per modality, per-token timesteps, padded text, STG on each stream."""
    ref = reference_model(cfg)
    ours = ours_from(ref, cfg)
    B, F, H, W, Ta = 2, 3, 2, 3, 13
    d = av_inputs(cfg, B, F, H, W, Ta, Lv=7, La=5)
    vpos, apos = ref_video_positions(B, F, H, W), ref_audio_positions(B, Ta)
    with torch.no_grad():
        want_v, want_a = reference_forward(ref, d, vpos, apos)
        got_v, got_a = ours_forward(ours, d, B, F, H, W)
        assert max_err(got_v, want_v) <= TOL and max_err(got_a, want_a) <= TOL
        want_v, want_a = reference_forward(ref, d, vpos, apos, video_stg=[0], audio_stg=[1])
        got_v, got_a = ours_forward(ours, d, B, F, H, W, video_stg_blocks=[0], audio_stg_blocks=[1])
        assert max_err(got_v, want_v) <= TOL and max_err(got_a, want_a) <= TOL
        # the sigmas really act independently: moving the audio sigma alone moves both outputs
        # (the video stream's a2v modulation is driven by the audio sigma), as in the reference
        d2 = dict(d, audio_sigma=1 - d["audio_sigma"])
        want_v2, want_a2 = reference_forward(ref, d2, vpos, apos)
        got_v2, got_a2 = ours_forward(ours, d2, B, F, H, W)
        assert max_err(got_v2, want_v2) <= TOL and max_err(got_a2, want_a2) <= TOL
        assert max_err(got_v2, got_v) > 1e-3


def test_video_positions_match_reference():
    B, F, H, W = 2, 4, 3, 5
    want = ref_video_positions(B, F, H, W).mean(-1).permute(0, 2, 1)  # midpoints (B, T, 3)
    assert torch.equal(M.video_positions(F, H, W, B, fps=FPS), want)


def test_av_gradients_match_ltx_core():
    cfg = MICRO_AV
    ref = reference_model(cfg, seed=5)
    ours = ours_from(ref, cfg)
    B, F, H, W, Ta = 2, 2, 2, 2, 9
    d = av_inputs(cfg, B, F, H, W, Ta, Lv=4, La=6, seed=6)
    v, a = reference_forward(ref, d, ref_video_positions(B, F, H, W), ref_audio_positions(B, Ta))
    (v.square().mean() + a.square().mean()).backward()
    v, a = ours_forward(ours, d, B, F, H, W)
    (v.square().mean() + a.square().mean()).backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        g_ref = ref_grads[name].grad
        assert (p.grad - g_ref).abs().max().item() <= TOL * max(1.0, g_ref.abs().max().item()), name


def test_audio_only_pass_of_av_model_matches_reference_without_video():
    """`forward` on an AV model is ltx-core's pass with video=None (the audio stream alone)."""
    cfg = MICRO_AV
    ref = reference_model(cfg, seed=2)
    ours = ours_from(ref, cfg)
    B, Ta = 2, 11
    d = av_inputs(cfg, B, 1, 1, 1, Ta, Lv=3, La=5, seed=3)
    audio = Modality(latent=d["audio_x"], sigma=d["audio_sigma"], timesteps=d["audio_timesteps"],
                     positions=ref_audio_positions(B, Ta), context=d["audio_context"])
    with torch.no_grad():
        want = ref(video=None, audio=audio, perturbations=BatchedPerturbationConfig.empty(B))[1]
        got = ours(d["audio_x"], d["audio_sigma"], d["audio_context"], timesteps=d["audio_timesteps"])
    assert max_err(got, want) <= TOL


def test_audio_only_model_has_no_video_modules_and_forward_av_refuses():
    dit = M.AudioDiT(M.PRESETS["micro"])
    assert not any(k for k in dit.state_dict() if not M.is_audio_key(k))
    with pytest.raises(ValueError, match="video=True"):
        dit.forward_av(None, torch.zeros(1, 2, 16), None, None, None, None, video_positions=None)


def test_av_block_has_no_graph_breaks():
    """torch.compile traces one AV block (both streams, cross-modal rope and modulation) as one graph."""
    cfg = MICRO_AV
    dit = M.AudioDiT(cfg)
    B, F, H, W, Ta = 2, 2, 2, 2, 6
    d = av_inputs(cfg, B, F, H, W, Ta, Lv=4, La=5)
    vpos, apos = M.video_positions(F, H, W, B), M.audio_positions(Ta, B)
    with torch.no_grad():
        vh, v, _ = dit._prepare(d["video_x"], d["video_sigma"], d["video_context"], d["video_timesteps"], vpos,
                                d["video_context_mask"], None, True)
        ah, a, _ = dit._prepare(d["audio_x"], d["audio_sigma"], d["audio_context"], d["audio_timesteps"], apos,
                                d["audio_context_mask"], None, False)
    v.cross_rope = M.split_rope(vpos[..., :1], [cfg.cross_rope_max_pos], cfg.dim, cfg.video_heads)
    a.cross_rope = M.split_rope(apos, cfg.cross_rope_max_pos, cfg.dim, cfg.heads)
    v.cross_temb, a.cross_temb = torch.randn(B, 1, 4 * cfg.video_dim), torch.randn(B, 1, 4 * cfg.dim)
    v.cross_gate, a.cross_gate = torch.randn(B, 1, cfg.video_dim), torch.randn(B, 1, cfg.dim)
    a.skip = torch.tensor([True, False])
    explained = torch._dynamo.explain(dit.transformer_blocks[0].forward_av)(vh, ah, v, a)
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_av_bf16_cuda_close_to_fp32():
    cfg = MICRO_AV
    ref = reference_model(cfg, seed=14)
    ours = ours_from(ref, cfg)
    B, F, H, W, Ta = 2, 2, 3, 3, 16
    d = av_inputs(cfg, B, F, H, W, Ta, Lv=5, La=6, seed=15)
    with torch.no_grad():
        want_v, want_a = ours_forward(ours, d, B, F, H, W)
        ours = ours.cuda().to(torch.bfloat16)
        dc = {k: (v.cuda().bfloat16() if k.endswith(("_x", "_context")) else v.cuda()) for k, v in d.items()}
        got_v, got_a = ours.forward_av(**dc, video_positions=M.video_positions(F, H, W, B, fps=FPS, device="cuda"))
    for got, want in ((got_v, want_v), (got_a, want_a)):
        assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
        assert ((got.float().cpu() - want).norm() / want.norm()).item() < 0.05


def test_param_count_of_22b_av_config_on_meta():
    """tests/data/ltx23/README.md: 18,988,838,144 parameters in the full AV transformer, 3,286,408,320 audio."""
    with torch.device("meta"):
        dit = M.AudioDiT(M.PRESETS["ltx23_av"])
    assert M.count_params(dit) == 18_988_838_144
    assert sum(p.numel() for n, p in dit.named_parameters() if M.is_audio_key(n)) == 3_286_408_320
    blk = dit.transformer_blocks[0]
    assert tuple(blk.scale_shift_table_a2v_ca_video.shape) == (5, 4096)
    assert tuple(blk.scale_shift_table_a2v_ca_audio.shape) == (5, 2048)
    assert tuple(blk.audio_to_video_attn.to_q.weight.shape) == (2048, 4096)  # Q video -> audio width
    assert tuple(blk.video_to_audio_attn.to_k.weight.shape) == (2048, 4096)  # KV video -> audio width


# the LTX-2.3 transformer config's non-size entries (tests/data/ltx23/transformer_config.json)
OFFICIAL_TC = {
    "use_audio_video_cross_attention": True, "av_cross_ada_norm": True, "use_middle_indices_grid": True,
    "caption_channels": 3840, "audio_positional_embedding_max_pos": [20], "apply_gated_attention": True,
    "cross_attention_adaln": True, "rope_type": "split", "frequencies_precision": "float64",
    "positional_embedding_theta": 10000.0, "positional_embedding_max_pos": [20, 2048, 2048],
    "timestep_scale_multiplier": 1000, "av_ca_timestep_scale_multiplier": 1000, "caption_proj_before_connector": True,
}


def write_official_file(path, ref, cfg):
    """An official-layout AV checkpoint: prefixed transformer keys, text-connector keys that both
    loaders must skip, a non-transformer key, and the transformer config in the metadata."""
    tc = dict(OFFICIAL_TC)
    tc.update(num_layers=cfg.num_layers, num_attention_heads=cfg.video_heads, attention_head_dim=cfg.video_head_dim,
              in_channels=cfg.video_in_channels, out_channels=cfg.video_in_channels,
              cross_attention_dim=cfg.video_cross_attention_dim, audio_num_attention_heads=cfg.heads,
              audio_attention_head_dim=cfg.head_dim, audio_in_channels=cfg.in_channels,
              audio_out_channels=cfg.in_channels, audio_cross_attention_dim=cfg.cross_attention_dim)
    tensors = {M.PREFIX + k: v.contiguous() for k, v in ref.state_dict().items()}
    tensors[M.PREFIX + "audio_embeddings_connector.learnable_registers"] = torch.zeros(4, cfg.dim)
    tensors[M.PREFIX + "video_embeddings_connector.learnable_registers"] = torch.zeros(4, cfg.video_dim)
    tensors["text_embedding_projection.audio_aggregate_embed.weight"] = torch.zeros(cfg.dim, 8)
    save_file(tensors, path, metadata={"config": json.dumps({"transformer": tc})})


def test_load_official_layout_av_file(tmp_path):
    cfg = M.PRESETS["micro_av"]  # av_ca_timestep_scale 1000, as the official config
    ref = reference_model(cfg, seed=9)
    path = str(tmp_path / "ltx23_av_micro.safetensors")
    write_official_file(path, ref, cfg)

    av = M.load_dit(path, av=True)
    assert dataclasses.replace(av.cfg, stg_block=cfg.stg_block) == cfg  # stg_block is not in official configs
    assert av.state_dict().keys() == ref.state_dict().keys()
    B, F, H, W, Ta = 1, 2, 2, 2, 8
    d = av_inputs(cfg, B, F, H, W, Ta, Lv=3, La=4, seed=10)
    with torch.no_grad():
        want_v, want_a = reference_forward(ref, d, ref_video_positions(B, F, H, W), ref_audio_positions(B, Ta))
        got_v, got_a = ours_forward(av, d, B, F, H, W)
    assert max_err(got_v, want_v) <= TOL and max_err(got_a, want_a) <= TOL

    audio = M.load_dit(path)  # default: the audio-only model from the same file
    assert not audio.cfg.video and all(M.is_audio_key(k) for k in audio.state_dict())

    # save_dit of an AV model round-trips through load_dit(av=True)
    again = str(tmp_path / "again.safetensors")
    M.save_dit(av, again)
    back = M.load_dit(again, av=True)
    assert back.cfg == av.cfg
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in av.state_dict().items())


def test_load_av_from_audio_only_file_is_a_clear_error(tmp_path):
    path = str(tmp_path / "audio_only.safetensors")
    M.save_dit(M.AudioDiT(M.PRESETS["micro"]), path)
    with pytest.raises(ValueError, match="no video stream"):
        M.load_dit(path, av=True)


# -----------------------------------------------------------------------------------------------
# an audio-only LoRA and the video output (records/2026-11-23_av_lora_video_drift.md)


def _lora_pair(m, d, B, F, H, W):
    """(v_video, v_audio) with the adapters on, then off."""
    with torch.no_grad():
        on = ours_forward(m, d, B, F, H, W)
        with lora.lora_disabled(m):
            off = ours_forward(m, d, B, F, H, W)
    return on, off


def _random_av_with_lora(targets, seed=11):
    torch.manual_seed(seed)
    m = M.AudioDiT(MICRO_AV).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    lora.inject_lora(m, targets, rank=4, alpha=4)
    with torch.no_grad():
        for _, mod in lora.lora_modules(m):
            mod.lora_B.weight.normal_(0, 0.05)  # a trained, nonzero adapter
    return m


@pytest.mark.parametrize("targets", [["audio"], ["audio_attn1", "audio_attn2", "video_to_audio_attn"]],
                         ids=["preset_audio", "whisper_card"])
def test_audio_lora_moves_video_through_audio_to_video_attn_only(targets):
    """An audio LoRA (the `audio` preset; the seed whisper card's audio_attn1/2 + video_to_audio_attn)
    adapts no video module, yet the video output moves: the audio hidden states it changes are the
    keys/values of every block's audio_to_video_attn. The video stream is untouched up to block 0's
    cross-modal step, and exactly unchanged once the a2v gates are 0."""
    B, F, H, W, Ta = 2, 2, 2, 2, 10
    d = av_inputs(MICRO_AV, B, F, H, W, Ta, Lv=4, La=5, seed=12)
    m = _random_av_with_lora(targets)
    video_modules = ("attn1", "attn2", "ff", "audio_to_video_attn")
    assert not any(n.split(".")[2] in video_modules for n, _ in lora.lora_modules(m))

    seen = {}
    blk0 = m.transformer_blocks[0]
    hooks = [mod.register_forward_hook(lambda mod, i, o, k=k: seen.setdefault(k, []).append(o))
             for k, mod in (("attn2", blk0.attn2), ("a2v", blk0.audio_to_video_attn))]
    (on_v, on_a), (off_v, off_a) = _lora_pair(m, d, B, F, H, W)
    for h in hooks:
        h.remove()
    assert (on_a - off_a).norm() / off_a.norm() > 1e-3
    assert (on_v - off_v).norm() / off_v.norm() > 1e-3  # NOT "provably unchanged"
    assert torch.equal(*seen["attn2"])  # block 0's video self + text attention: identical
    assert not torch.equal(*seen["a2v"])  # block 0's audio_to_video_attn: first place video moves

    with torch.no_grad():  # a2v gate = table row 4 + av_ca_a2v_gate_adaln_single(sigma_audio) -> 0
        m.av_ca_a2v_gate_adaln_single.linear.weight.zero_()
        m.av_ca_a2v_gate_adaln_single.linear.bias.zero_()
        for blk in m.transformer_blocks:
            blk.scale_shift_table_a2v_ca_video[4].zero_()
    (on_v, on_a), (off_v, off_a) = _lora_pair(m, d, B, F, H, W)
    assert torch.equal(on_v, off_v) and not torch.equal(on_a, off_a)


def test_audio_ff_lora_on_last_block_leaves_video_unchanged():
    """The cross-modal step precedes the feed-forward and no block follows the last one, so an
    adapter there cannot reach the video: the one audio adapter that is provably video-neutral."""
    last = MICRO_AV.num_layers - 1
    m = _random_av_with_lora([f"transformer_blocks.{last}.audio_ff"])
    B, F, H, W, Ta = 1, 2, 2, 2, 8
    d = av_inputs(MICRO_AV, B, F, H, W, Ta, Lv=4, La=5, seed=13)
    (on_v, on_a), (off_v, off_a) = _lora_pair(m, d, B, F, H, W)
    assert torch.equal(on_v, off_v) and not torch.equal(on_a, off_a)
