"""model.py against the reference ltx-core 1.0.0 (tiny random configs, fp32, CPU)."""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import files  # noqa: E402
import model as M  # noqa: E402
from ltx_core.components.patchifiers import AudioPatchifier  # noqa: E402
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

TOL = 1e-5
# the official LTX-2.3 checkpoint's transformer config and audio key manifest (tests/data/ltx23/README.md)
LTX23 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "ltx23")

# the reference views the context as (B, L, D), so cross_attention_dim = D as in the official config.
# 2.3-style (9 rows, gates, prompt AdaLN) and 2.0-style (6 rows, no gates, caption projection)
CFG23 = M.DiTConfig(num_layers=3, heads=2, head_dim=16, in_channels=16, cross_attention_dim=32, stg_block=1)
CFG20 = M.DiTConfig(num_layers=3, heads=2, head_dim=16, in_channels=16, cross_attention_dim=32,
                    gated_attention=False, cross_attention_adaln=False, caption_channels=24, stg_block=1)


def reference_model(cfg, seed=0):
    """An audio-only ltx-core LTXModel at `cfg`, all parameters random (the reference leaves tables empty)."""
    torch.manual_seed(seed)
    ref = LTXModel(
        model_type=LTXModelType.AudioOnly,
        num_layers=cfg.num_layers,
        audio_num_attention_heads=cfg.heads,
        audio_attention_head_dim=cfg.head_dim,
        audio_in_channels=cfg.in_channels,
        audio_out_channels=cfg.in_channels,
        audio_cross_attention_dim=cfg.cross_attention_dim,
        audio_positional_embedding_max_pos=[int(cfg.rope_max_pos)],
        attention_type=AttentionFunction.PYTORCH,
        rope_type=LTXRopeType.SPLIT,
        double_precision_rope=cfg.rope_double_precision,
        apply_gated_attention=cfg.gated_attention,
        cross_attention_adaln=cfg.cross_attention_adaln,
        audio_caption_projection=(PixArtAlphaTextProjection(cfg.caption_channels, cfg.dim)
                                  if cfg.caption_channels else None),
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    return ref


def ours_from(ref, cfg):
    ours = M.AudioDiT(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours


def reference_forward(ref, x, sigma, context, timesteps, positions, context_mask=None, attn01=None, stg=None):
    """ref's audio velocity; positions (B, 1, T, 2) [start, end] s; attn01 (B, T, T) in [0, 1];
    stg: list of per-sample lists of blocks whose audio self-attention is skipped."""
    B = x.shape[0]
    perturb = BatchedPerturbationConfig([
        PerturbationConfig([Perturbation(PerturbationType.SKIP_AUDIO_SELF_ATTN, blocks)] if blocks else [])
        for blocks in (stg or [[]] * B)
    ])
    audio = Modality(latent=x, sigma=sigma, timesteps=timesteps, positions=positions, context=context,
                     context_mask=None if context_mask is None else context_mask.long(), attention_mask=attn01)
    return ref(video=None, audio=audio, perturbations=perturb)[1]


def ref_positions(B, T, shift=0):
    return AudioPatchifier(patch_size=16, shift=shift)._compute_audio_timings(B, T)  # (B, 1, T, 2)


def inputs(cfg, B, T, L, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, cfg.in_channels, generator=g)
    sigma = torch.rand(B, generator=g)
    ctx = torch.randn(B, L, cfg.caption_channels or cfg.cross_attention_dim, generator=g)
    ctx_mask = torch.ones(B, L, dtype=torch.bool)
    ctx_mask[0, : L // 3] = False  # left padding as Gemma prompts
    timesteps = sigma[:, None].expand(B, T).clone()
    timesteps[:, -(T // 4):] = 0.0  # frozen "reference" tokens at the tail
    return x, sigma, ctx, ctx_mask, timesteps


@pytest.mark.parametrize("cfg", [CFG23, CFG20], ids=["ltx23", "ltx20"])
@pytest.mark.parametrize("B,T,L", [(2, 13, 9), (1, 40, 5), (3, 7, 16)])
def test_parity_with_ltx_core(cfg, B, T, L):
    """Per-token timesteps, STG on one block, a padded context mask, default audio positions."""
    ref = reference_model(cfg)
    ours = ours_from(ref, cfg)
    x, sigma, ctx, ctx_mask, ts = inputs(cfg, B, T, L)
    with torch.no_grad():
        want = reference_forward(ref, x, sigma, ctx, ts, ref_positions(B, T), ctx_mask, stg=[[1]] * B)
        got = ours(x, sigma, ctx, timesteps=ts, context_mask=ctx_mask, stg_blocks=[1])
        assert (got - want).abs().max().item() <= TOL
        # and without any of the options (per-sample sigma, no mask, no STG)
        want = reference_forward(ref, x, sigma, ctx, sigma[:, None].expand(B, T), ref_positions(B, T))
        got = ours(x, sigma, ctx)
        assert (got - want).abs().max().item() <= TOL


def test_parity_reference_voice_layout():
    """DramaBox-style appended reference: +0.5 s positions, sigma 0 tokens, asymmetric self-attention
    mask (bool and soft additive forms), STG on some samples of the batch only."""
    cfg = CFG23
    ref = reference_model(cfg, seed=3)
    ours = ours_from(ref, cfg)
    B, Tt, Tr, L = 3, 11, 6, 7
    T = Tt + Tr
    x, sigma, ctx, ctx_mask, _ = inputs(cfg, B, T, L, seed=4)
    ts = torch.cat([sigma[:, None].expand(B, Tt), torch.zeros(B, Tr)], dim=1)
    pos_ref = torch.cat([ref_positions(B, Tt), ref_positions(B, Tr) + 0.5], dim=2)
    pos = torch.cat([M.audio_positions(Tt, B), M.audio_positions(Tr, B, offset_s=0.5)], dim=1)
    allow = torch.ones(B, T, T, dtype=torch.bool)
    allow[:, Tt:, :Tt] = False  # reference tokens do not see the target
    soft = allow.float()
    soft[:, :Tt, Tt:] = 0.3  # attenuated target -> reference attention
    stg_samples = torch.tensor([False, True, False])
    with torch.no_grad():
        want = reference_forward(ref, x, sigma, ctx, ts, pos_ref, ctx_mask, attn01=allow.float(),
                                 stg=[[], [0, 2], []])
        got = ours(x, sigma, ctx, timesteps=ts, positions=pos, context_mask=ctx_mask, attn_mask=allow,
                   stg_blocks=(0, 2), stg_samples=stg_samples)
        assert (got - want).abs().max().item() <= TOL
        want = reference_forward(ref, x, sigma, ctx, ts, pos_ref, ctx_mask, attn01=soft)
        bias = torch.where(soft > 0, soft.log(), torch.tensor(torch.finfo(torch.float32).min))
        got = ours(x, sigma, ctx, timesteps=ts, positions=pos, context_mask=ctx_mask, attn_mask=bias)
        assert (got - want).abs().max().item() <= TOL


def test_gradients_match_ltx_core():
    cfg = CFG23
    ref = reference_model(cfg, seed=5)
    ours = ours_from(ref, cfg)
    B, T, L = 2, 10, 6
    x, sigma, ctx, ctx_mask, ts = inputs(cfg, B, T, L, seed=6)
    reference_forward(ref, x, sigma, ctx, ts, ref_positions(B, T), ctx_mask).square().mean().backward()
    ours(x, sigma, ctx, timesteps=ts, context_mask=ctx_mask).square().mean().backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        g_ref = ref_grads[name].grad
        assert (p.grad - g_ref).abs().max().item() <= TOL * max(1.0, g_ref.abs().max().item()), name


def test_rope_matches_reference_connector_grid():
    """split_rope on integer positions (text connector: no middle grid, max_pos 4096) vs ltx-core."""
    from ltx_core.model.transformer.rope import generate_freq_grid_np, precompute_freqs_cis

    L, H, D = 64, 4, 128
    grid = torch.arange(L, dtype=torch.float32)[None, None, :]
    cos_ref, sin_ref = precompute_freqs_cis(grid, D, torch.float32, max_pos=[4096], num_attention_heads=H,
                                            rope_type=LTXRopeType.SPLIT, freq_grid_generator=generate_freq_grid_np)
    cos, sin = M.split_rope(torch.arange(L)[None], 4096, D, H)
    assert torch.equal(cos.transpose(1, 2), cos_ref) and torch.equal(sin.transpose(1, 2), sin_ref)


def test_rope_multi_axis_matches_reference():
    """3-axis positions (the video stream's layout, with the unrotated padding channels)."""
    from ltx_core.model.transformer.rope import generate_freq_grid_np, precompute_freqs_cis

    B, T, H, D = 2, 12, 4, 80  # 80 // 6 = 13 freqs per axis -> 1 padded pair
    torch.manual_seed(0)
    pos = torch.rand(B, T, 3) * torch.tensor([20.0, 64.0, 64.0])
    grid = torch.stack([pos, pos], dim=-1).permute(0, 2, 1, 3)  # (B, 3, T, 2), start == end
    cos_ref, sin_ref = precompute_freqs_cis(grid, D, torch.float32, max_pos=[20, 2048, 2048],
                                            use_middle_indices_grid=True, num_attention_heads=H,
                                            rope_type=LTXRopeType.SPLIT, freq_grid_generator=generate_freq_grid_np)
    cos, sin = M.split_rope(pos, [20, 2048, 2048], D, H)
    assert (cos.transpose(1, 2) - cos_ref).abs().max() <= 1e-6
    assert (sin.transpose(1, 2) - sin_ref).abs().max() <= 1e-6


def test_zero_block_deltas_are_identity_and_deltas_act():
    ref = reference_model(CFG23, seed=7)
    ours = ours_from(ref, CFG23)
    B, T, L = 2, 9, 5
    x, sigma, ctx, ctx_mask, ts = inputs(CFG23, B, T, L, seed=8)
    D, rows = CFG23.dim, CFG23.ada_rows
    with torch.no_grad():
        base = ours(x, sigma, ctx, timesteps=ts, context_mask=ctx_mask)
        zero = ours(x, sigma, ctx, timesteps=ts, context_mask=ctx_mask,
                    block_deltas=torch.zeros(B, CFG23.num_layers, rows * D))
        assert torch.equal(base, zero)
        # a delta on block 1 equals the same shift added to that block's table
        delta = torch.zeros(B, CFG23.num_layers, rows * D)
        delta[:, 1] = 0.1 * torch.randn(rows * D)
        delta[1, 1] = delta[0, 1]
        got = ours(x, sigma, ctx, timesteps=ts, context_mask=ctx_mask, block_deltas=delta)
        ours.transformer_blocks[1].audio_scale_shift_table += delta[0, 1].view(rows, D)
        want = ours(x, sigma, ctx, timesteps=ts, context_mask=ctx_mask)
        assert (got - base).abs().max() > 1e-3
        assert (got - want).abs().max() <= TOL


def test_grad_checkpointing_same_grads():
    """Checkpointed blocks give ltx-core's gradients (STG on block 2 leaves its q/k without grads)."""
    ref = reference_model(CFG23, seed=9).train()
    B, T, L = 2, 12, 5
    x, sigma, ctx, ctx_mask, ts = inputs(CFG23, B, T, L, seed=10)
    ours = ours_from(ref, CFG23).train()
    ours.grad_checkpointing = True
    reference_forward(ref, x, sigma, ctx, ts, ref_positions(B, T), ctx_mask, stg=[[2]] * B).square().mean().backward()
    ours(x, sigma, ctx, timesteps=ts, context_mask=ctx_mask, stg_blocks=[2]).square().mean().backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        g_ref = ref_params[name].grad
        if g_ref is None:
            assert p.grad is None, name
        else:
            assert (p.grad - g_ref).abs().max().item() <= TOL * max(1.0, g_ref.abs().max().item()), name


def test_meta_ltx23_param_count_and_official_keys():
    with torch.device("meta"):
        dit = M.AudioDiT(M.PRESETS["ltx23_audio"])
    assert M.count_params(dit) == 3_286_408_320
    official = {}
    with open(os.path.join(LTX23, "audio_keys.tsv")) as f:
        for line in f:
            key, shape = line.rstrip("\n").split("\t") if not line.startswith("#") else (None, None)
            if key and key.startswith(M.PREFIX) and M.is_audio_key(key[len(M.PREFIX):]):
                official[key[len(M.PREFIX):]] = tuple(json.loads(shape))
    ours = {k: tuple(v.shape) for k, v in dit.state_dict().items() if not k.startswith("transformer_blocks.")
            or k.startswith("transformer_blocks.0.")}
    assert ours == official


# --- checkpoint IO ---------------------------------------------------------------------------

def _official_config(cfg):
    """The official transformer config with the audio stream shrunk to `cfg` (video fields kept)."""
    with open(os.path.join(LTX23, "transformer_config.json")) as f:
        config = json.load(f)
    tc = config["transformer"]
    tc.update(num_layers=cfg.num_layers, audio_num_attention_heads=cfg.heads,
              audio_attention_head_dim=cfg.head_dim, audio_cross_attention_dim=cfg.cross_attention_dim,
              audio_in_channels=cfg.in_channels)
    return config


def write_official_file(path, ref, cfg, extra_video=True, drop=()):
    """ref's weights in the official AV layout: prefixed audio keys plus video / cross-modal /
    connector keys that must be ignored, and the JSON config in the metadata."""
    tensors = {M.PREFIX + k: v.contiguous() for k, v in ref.state_dict().items() if k not in drop}
    if extra_video:
        tensors[M.PREFIX + "patchify_proj.weight"] = torch.randn(8, 4)
        tensors[M.PREFIX + "transformer_blocks.0.attn1.to_q.weight"] = torch.randn(8, 8)
        tensors[M.PREFIX + "transformer_blocks.0.video_to_audio_attn.to_q.weight"] = torch.randn(8, 8)
        tensors[M.PREFIX + "transformer_blocks.0.scale_shift_table_a2v_ca_audio"] = torch.randn(5, 8)
        tensors[M.PREFIX + "av_ca_audio_scale_shift_adaln_single.linear.weight"] = torch.randn(8, 8)
        tensors[M.PREFIX + "audio_embeddings_connector.learnable_registers"] = torch.randn(4, 8)
        tensors["text_embedding_projection.audio_aggregate_embed.weight"] = torch.randn(8, 8)
        tensors["vocoder.conv_pre.weight"] = torch.randn(2, 2)
    save_file(tensors, str(path), metadata={"config": json.dumps(_official_config(cfg)), "other": "kept"})


def test_load_dit_official_layout(tmp_path):
    ref = reference_model(CFG23, seed=11)
    path = tmp_path / "ltx-2.3-tiny.safetensors"
    write_official_file(path, ref, CFG23)
    dit = M.load_dit(path)
    assert dit.cfg.num_layers == CFG23.num_layers and dit.cfg.dim == CFG23.dim
    assert dit.cfg.gated_attention and dit.cfg.cross_attention_adaln and not dit.cfg.caption_channels
    B, T, L = 2, 10, 6
    x, sigma, ctx, ctx_mask, ts = inputs(CFG23, B, T, L, seed=12)
    with torch.no_grad():
        want = reference_forward(ref, x, sigma, ctx, ts, ref_positions(B, T), ctx_mask)
        got = dit.eval()(x, sigma, ctx, timesteps=ts, context_mask=ctx_mask)
    assert (got - want).abs().max().item() <= TOL
    assert M.load_dit(path, dtype=torch.bfloat16).audio_proj_out.weight.dtype == torch.bfloat16

    # save keeps the metadata and the official layout; load gives the same weights back
    out = tmp_path / "merged.safetensors"
    M.save_dit(dit, out, files.read_safetensors_metadata(path))
    assert files.read_safetensors_metadata(out) == files.read_safetensors_metadata(path)
    back = M.load_dit(out)
    for (k, a), (k2, b) in zip(dit.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert not os.path.exists(str(out) + ".tmp")


def test_load_dit_ltx20_config(tmp_path):
    ref = reference_model(CFG20, seed=13)
    config = _official_config(CFG20)
    config["transformer"].update(apply_gated_attention=False, cross_attention_adaln=False,
                                 caption_proj_before_connector=False, caption_channels=CFG20.caption_channels)
    path = tmp_path / "ltx-2.0-tiny.safetensors"
    save_file({M.PREFIX + k: v.contiguous() for k, v in ref.state_dict().items()}, str(path),
              metadata={"config": json.dumps(config)})
    dit = M.load_dit(path)
    assert dit.cfg.ada_rows == 6 and dit.cfg.caption_channels == CFG20.caption_channels
    x, sigma, ctx, _, ts = inputs(CFG20, 2, 8, 4, seed=14)
    with torch.no_grad():
        want = reference_forward(ref, x, sigma, ctx, ts, ref_positions(2, 8))
        assert (dit.eval()(x, sigma, ctx, timesteps=ts) - want).abs().max().item() <= TOL


def test_save_without_metadata_roundtrip(tmp_path):
    dit = M.AudioDiT(M.PRESETS["micro"])
    path = tmp_path / "micro.safetensors"
    connector = {"model.diffusion_model.audio_embeddings_connector.learnable_registers": torch.randn(4, 32)}
    M.save_dit(dit, path, extra=connector)
    assert torch.equal(files.load_prefixed_state(path, "model.diffusion_model.audio_embeddings_connector.")
                       ["learnable_registers"], next(iter(connector.values())))
    with pytest.raises(ValueError, match="collide"):
        M.save_dit(dit, path, extra={M.PREFIX + "audio_proj_out.bias": torch.zeros(16)})
    back = M.load_dit(path)  # the extra connector tensor is not an audio DiT key
    assert back.cfg == dit.cfg
    assert all(torch.equal(a, b) for a, b in zip(dit.state_dict().values(), back.state_dict().values()))


def test_load_dit_refuses_wrong_files(tmp_path):
    ref = reference_model(CFG23, seed=15)
    # no metadata config
    p = tmp_path / "noconfig.safetensors"
    save_file({M.PREFIX + "audio_proj_out.weight": torch.zeros(2, 2)}, str(p))
    with pytest.raises(ValueError, match=r"noconfig\.safetensors.*config"):
        M.load_dit(p)
    # a video-only checkpoint: config without an audio stream
    p = tmp_path / "video_only.safetensors"
    tc = {k: v for k, v in _official_config(CFG23)["transformer"].items() if not k.startswith("audio_")}
    save_file({M.PREFIX + "patchify_proj.weight": torch.zeros(2, 2)}, str(p),
              metadata={"config": json.dumps({"transformer": tc})})
    with pytest.raises(ValueError, match=r"video_only\.safetensors.*audio"):
        M.load_dit(p)
    # config claims audio, but the file holds no audio keys (e.g. a VAE-only file)
    p = tmp_path / "vae.safetensors"
    save_file({"audio_vae.encoder.conv_in.weight": torch.zeros(2, 2)}, str(p),
              metadata={"config": json.dumps(_official_config(CFG23))})
    with pytest.raises(ValueError, match=r"vae\.safetensors.*no audio transformer keys"):
        M.load_dit(p)
    # missing and wrong-shaped keys are named
    p = tmp_path / "partial.safetensors"
    write_official_file(p, ref, CFG23, drop={"transformer_blocks.1.audio_ff.net.2.weight"})
    with pytest.raises(ValueError, match=r"partial\.safetensors[\s\S]*1 missing: transformer_blocks\.1\.audio_ff"):
        M.load_dit(p)
    loose = M.load_dit(p, strict=False)  # non-strict: loads the rest, keeps an init for the hole
    assert torch.equal(loose.transformer_blocks[0].audio_ff.net[2].weight,
                       ref.transformer_blocks[0].audio_ff.net[2].weight)
    p = tmp_path / "wrongcfg.safetensors"
    write_official_file(p, ref, M.DiTConfig(**{**CFG23.__dict__, "head_dim": 8}))
    with pytest.raises(ValueError, match=r"wrongcfg\.safetensors[\s\S]*wrong shape"):
        M.load_dit(p)
    p = tmp_path / "garbage.safetensors"
    p.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"garbage\.safetensors"):
        M.load_dit(p)


def test_load_prefixed_state_selects_and_strips(tmp_path):
    p = tmp_path / "mixed.safetensors"
    save_file({"vocoder.a": torch.ones(2), "vocoder.b.c": torch.zeros(3), "audio_vae.x": torch.ones(1)}, str(p),
              metadata={"config": "{}"})
    state = files.load_prefixed_state(p, "vocoder.", keep=lambda k: k != "a", dtype=torch.float64)
    assert list(state) == ["b.c"] and state["b.c"].dtype == torch.float64
    assert files.read_safetensors_metadata(p) == {"config": "{}"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_bf16_cuda_close_to_fp32():
    ours = ours_from(reference_model(CFG23, seed=16), CFG23)
    x, sigma, ctx, ctx_mask, ts = inputs(CFG23, 2, 16, 6, seed=17)
    with torch.no_grad():
        want = ours(x, sigma, ctx, timesteps=ts, context_mask=ctx_mask)
        dit = ours.cuda().to(torch.bfloat16)
        got = dit(x.cuda().bfloat16(), sigma.cuda(), ctx.cuda().bfloat16(), timesteps=ts.cuda(),
                  context_mask=ctx_mask.cuda())
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert ((got.float().cpu() - want).norm() / want.norm()).item() < 0.05


def test_block_has_no_graph_breaks():
    """torch.compile traces one block (with STG, masks, per-token modulation) as a single graph."""
    cfg = M.PRESETS["micro"]
    dit = M.AudioDiT(cfg)
    B, T, L, D = 2, 6, 4, cfg.dim
    rope = M.split_rope(M.audio_positions(T, B), cfg.rope_max_pos, D, cfg.heads)
    args = (torch.randn(B, T, D), torch.randn(B, L, D), torch.randn(B, T, 9 * D), torch.randn(B, 1, 2 * D), rope,
            torch.zeros(B, 1, T, T), torch.zeros(B, 1, 1, L), torch.tensor([True, False]))
    explained = torch._dynamo.explain(dit.transformer_blocks[0])(*args)
    assert explained.graph_break_count == 0, explained.break_reasons
