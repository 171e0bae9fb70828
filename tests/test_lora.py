"""lora.py and merge.py against references: peft's LoRA, ltx-core's LoRA fuser, the LAIONBox count,
ltx-core's own module names (tiny random configs, fp32 unless bf16 is the point, CPU)."""

import copy
import json
import os
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lora  # noqa: E402
import merge  # noqa: E402
import files  # noqa: E402
import model as M  # noqa: E402
from ltx_core.loader.fuse_loras import apply_loras  # noqa: E402
from ltx_core.loader.primitives import LoraStateDictWithStrength, StateDict  # noqa: E402
from ltx_core.loader.sd_ops import LTXV_LORA_COMFY_RENAMING_MAP  # noqa: E402
from ltx_core.model.transformer.model import LTXModel, LTXModelType  # noqa: E402

CFG = M.DiTConfig(num_layers=2, heads=2, head_dim=16, in_channels=16, cross_attention_dim=32, stg_block=1)
ATTN = ("to_q", "to_k", "to_v", "to_out.0")
FF = ("net.0.proj", "net.2")


def tiny_dit(seed=0):
    """A tiny AudioDiT with every parameter random (the zero-initialised heads would hide errors)."""
    torch.manual_seed(seed)
    dit = M.AudioDiT(CFG).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.2)
    return dit.requires_grad_(False)


def randomise_lora(dit, seed=1):
    """Non-zero B (a fresh adapter is an identity, which would make every comparison trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora.lora_modules(dit):
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.3)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)


def run(dit, seed=2, B=2, T=9, L=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, CFG.in_channels, generator=g)
    ctx = torch.randn(B, L, CFG.cross_attention_dim, generator=g)
    sigma = torch.tensor([0.3, 0.8])[:B]
    with torch.no_grad():
        return dit(x, sigma, ctx)


def expected_names(num_layers, modules):
    return {f"transformer_blocks.{i}.{mod}.{leaf}" for i in range(num_layers) for mod in modules
            for leaf in (FF if mod.endswith("_ff") or mod == "ff" else ATTN)}


def av_reference_model():
    """ltx-core's audio-video LTXModel at a tiny size on the meta device: the official module names."""
    with torch.device("meta"):
        return LTXModel(model_type=LTXModelType.AudioVideo, num_layers=2, num_attention_heads=2,
                        attention_head_dim=8, cross_attention_dim=16, in_channels=8, out_channels=8,
                        audio_num_attention_heads=2, audio_attention_head_dim=4, audio_in_channels=8,
                        audio_out_channels=8, audio_cross_attention_dim=8, apply_gated_attention=True,
                        cross_attention_adaln=True)


# -----------------------------------------------------------------------------------------------
# targets


def test_stage1_count_on_the_22b_config():
    """LAIONBox run 7: rank 64 on audio_attn1 + audio_ff of 48 blocks = 113,246,208 params (its model card),
    on our AudioDiT and on ltx-core's audio-only LTXModel at the official size (meta device)."""
    with torch.device("meta"):
        ours = M.AudioDiT(M.PRESETS["ltx23_audio"])
        ref = LTXModel(model_type=LTXModelType.AudioOnly, apply_gated_attention=True, cross_attention_adaln=True)
    counts = []
    for dit in (ours, ref):
        dit.requires_grad_(False)
        names = lora.inject_lora(dit, ["laionbox"], rank=64, alpha=64)
        assert set(names) == expected_names(48, ["audio_attn1", "audio_ff"])
        counts.append(sum(p.numel() for p in dit.parameters() if p.requires_grad))
    assert counts == [113_246_208, 113_246_208]
    assert lora.lora_table(ours).splitlines()[-1] == "288 adapted layers, 113,246,208 LoRA params"


@pytest.mark.parametrize("preset,modules", [
    ("audio", ["audio_attn1", "audio_attn2", "audio_ff"]),
    ("audio_v2a", ["audio_attn1", "audio_attn2", "audio_ff", "video_to_audio_attn"]),
    ("laionbox", ["audio_attn1", "audio_ff"]),
    ("attn_all", ["attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn"]),
])
def test_presets_wrap_exactly_their_modules(preset, modules):
    ref = av_reference_model().requires_grad_(False)
    names = lora.inject_lora(ref, [preset], rank=2, alpha=2)
    assert set(names) == expected_names(2, modules)
    assert not any("to_gate_logits" in n for n in names)
    table = lora.lora_table(ref)
    assert all(n in table for n in names)
    total = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    assert table.splitlines()[-1] == f"{len(names)} adapted layers, {total:,} LoRA params"


def test_run_without_audio_creates_no_audio_or_cross_modal_adapters():
    names = lora.inject_lora(av_reference_model(), ["attn_all"], rank=2, alpha=2, with_audio=False)
    assert set(names) == expected_names(2, ["attn1", "attn2"])


def test_bad_targets_are_errors():
    with pytest.raises(ValueError, match="to_gate_logits"):
        lora.inject_lora(tiny_dit(), ["to_gate_logits"], rank=2, alpha=2)
    with pytest.raises(ValueError, match="audio_patchify_proj"):
        lora.inject_lora(tiny_dit(), ["audio_patchify_proj"], rank=2, alpha=2)
    with pytest.raises(ValueError, match="video_to_audio_attn"):  # an AV preset on the audio-only model
        lora.inject_lora(tiny_dit(), ["audio_v2a"], rank=2, alpha=2)
    with pytest.raises(ValueError, match="audio_atn1"):
        lora.inject_lora(tiny_dit(), ["audio_atn1"], rank=2, alpha=2)


def test_custom_patterns_select_single_layers():
    names = lora.inject_lora(tiny_dit(), ["transformer_blocks.1.audio_attn2.to_out.0", "audio_ff.net.2"],
                             rank=2, alpha=2)
    assert names == ["transformer_blocks.0.audio_ff.net.2", "transformer_blocks.1.audio_attn2.to_out.0",
                     "transformer_blocks.1.audio_ff.net.2"]


# -----------------------------------------------------------------------------------------------
# maths


def test_fresh_adapter_is_identity_and_disable_gives_base():
    dit = tiny_dit()
    base = run(dit)
    lora.inject_lora(dit, ["audio"], rank=4, alpha=8)
    assert torch.equal(run(dit), base)  # B = 0 at init
    assert all(torch.count_nonzero(m.lora_B.weight) == 0 for _, m in lora.lora_modules(dit))
    randomise_lora(dit)
    adapted = run(dit)
    assert (adapted - base).abs().max() > 1e-3
    with lora.lora_disabled(dit):
        assert torch.equal(run(dit), base)
    assert torch.equal(run(dit), adapted)
    lora.set_lora_enabled(dit, False)
    assert torch.equal(run(dit), base)


def test_merged_equals_unmerged_and_names_are_official():
    dit = tiny_dit()
    official = list(dit.state_dict())
    lora.inject_lora(dit, ["audio"], rank=4, alpha=8, dropout=0.1)
    randomise_lora(dit)
    dit.eval()
    unmerged = run(dit)
    merged_names = lora.merge_lora(dit)
    assert len(merged_names) == 2 * 10  # 2 blocks x (4 + 4 attention + 2 ff)
    assert list(dit.state_dict()) == official
    assert not lora.lora_modules(dit)
    torch.testing.assert_close(run(dit), unmerged, rtol=0, atol=1e-5)


def test_matches_peft():
    """Same A and B in peft's LoRA (LoraConfig on the same layers): same outputs, same merged weights."""
    from peft import LoraConfig, inject_adapter_in_model

    dit = tiny_dit()
    theirs = copy.deepcopy(dit)
    names = lora.inject_lora(dit, ["laionbox"], rank=4, alpha=12)
    randomise_lora(dit)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, target_modules=names), theirs)
    peft_state = theirs.state_dict()
    lora_keys = [k for k in peft_state if ".lora_" in k]
    assert len(lora_keys) == 2 * len(names)
    with torch.no_grad():
        for name, m in lora.lora_modules(dit):
            peft_state[f"{name}.lora_A.default.weight"].copy_(m.lora_A.weight)
            peft_state[f"{name}.lora_B.default.weight"].copy_(m.lora_B.weight)
    theirs.eval()
    torch.testing.assert_close(run(dit), run(theirs), rtol=0, atol=1e-5)
    # merged weights: peft's own merge vs ours
    with torch.no_grad():
        for name, _ in lora.lora_modules(dit):
            theirs.get_submodule(name).merge()
    lora.merge_lora(dit)
    for name in names:
        torch.testing.assert_close(dit.get_submodule(name).weight,
                                   theirs.get_submodule(name).base_layer.weight, rtol=0, atol=1e-6)


# -----------------------------------------------------------------------------------------------
# files


def test_save_layout_metadata_and_roundtrip(tmp_path):
    dit = tiny_dit()
    lora.inject_lora(dit, ["laionbox"], rank=4, alpha=12)
    randomise_lora(dit)
    adapted = run(dit)
    path = tmp_path / "l.safetensors"
    lora.save_lora(dit, path, base_model_id="ltx-2.3-22b-dev", extra_meta={"step": 340})
    assert os.listdir(tmp_path) == ["l.safetensors"]  # atomic: no temp file left behind
    tensors = load_file(path)
    m = dit.get_submodule("transformer_blocks.1.audio_ff.net.0.proj")
    a = tensors["diffusion_model.transformer_blocks.1.audio_ff.net.0.proj.lora_A.weight"]
    b = tensors["diffusion_model.transformer_blocks.1.audio_ff.net.0.proj.lora_B.weight"]
    assert a.shape == (4, CFG.dim) and b.shape == (4 * CFG.dim, 4)
    torch.testing.assert_close(b, m.lora_B.weight * 3.0)  # alpha/r = 12/4 folded into B
    assert not any(k.endswith(".alpha") for k in tensors)
    meta = files.read_safetensors_metadata(path)
    assert (meta["lora_rank"], meta["lora_alpha"], meta["base_model"], meta["step"]) == ("4", "12", "ltx-2.3-22b-dev", "340")
    assert json.loads(meta["lora_targets"])[0] == "transformer_blocks.0.audio_attn1.to_q"

    fresh = tiny_dit()
    report = lora.load_lora(fresh, path)
    assert len(report["loaded"]) == 12 and report["unmatched"] == []
    torch.testing.assert_close(run(fresh), adapted, rtol=0, atol=1e-5)
    with lora.lora_disabled(fresh):
        torch.testing.assert_close(run(fresh), run(tiny_dit()), rtol=0, atol=0)

    # state= (train.py's fp32 masters) replaces the module values in the file
    state = {"transformer_blocks.0.audio_attn1.to_q.lora_B.weight": torch.ones(CFG.dim, 4)}
    lora.save_lora(dit, path, base_model_id="x", state=state)
    assert torch.equal(load_file(path)["diffusion_model.transformer_blocks.0.audio_attn1.to_q.lora_B.weight"],
                       torch.full((CFG.dim, 4), 3.0))


def test_comfy_layout_with_alpha_and_transformer_prefix(tmp_path):
    """ComfyUI applies alpha/r only when an `.alpha` key exists; `transformer.` prefixed files too."""
    g = torch.Generator().manual_seed(3)
    D = CFG.dim
    a, b = torch.randn(4, D, generator=g), torch.randn(D, 4, generator=g)
    a2, b2 = torch.randn(2, D, generator=g), torch.randn(D, 2, generator=g)
    path = tmp_path / "comfy.safetensors"
    save_file({
        "diffusion_model.transformer_blocks.0.audio_attn1.to_q.lora_A.weight": a,
        "diffusion_model.transformer_blocks.0.audio_attn1.to_q.lora_B.weight": b,
        "diffusion_model.transformer_blocks.0.audio_attn1.to_q.alpha": torch.tensor(8.0),
        "diffusion_model.transformer_blocks.1.audio_attn2.to_v.lora_A.weight": a2,  # no alpha: scale 1
        "diffusion_model.transformer_blocks.1.audio_attn2.to_v.lora_B.weight": b2,
    }, path)
    dit = tiny_dit()
    lora.load_lora(dit, path)
    expected = tiny_dit()
    with torch.no_grad():
        expected.transformer_blocks[0].audio_attn1.to_q.weight += (8.0 / 4) * b @ a
        expected.transformer_blocks[1].audio_attn2.to_v.weight += b2 @ a2
    torch.testing.assert_close(run(dit), run(expected), rtol=0, atol=1e-5)

    path2 = tmp_path / "diffusers.safetensors"
    save_file({"transformer.transformer_blocks.1.audio_attn2.to_v.lora_A.weight": a2,
               "transformer.transformer_blocks.1.audio_attn2.to_v.lora_B.weight": b2}, path2)
    dit2 = tiny_dit()
    lora.load_lora(dit2, path2, strength=0.5)
    torch.testing.assert_close(dit2.transformer_blocks[1].audio_attn2.to_v.delta_weight(), 0.5 * b2 @ a2)


def test_unmatched_keys_are_reported(tmp_path):
    D = CFG.dim
    path = tmp_path / "av.safetensors"
    save_file({
        "diffusion_model.transformer_blocks.0.audio_ff.net.2.lora_A.weight": torch.ones(2, 4 * D),
        "diffusion_model.transformer_blocks.0.audio_ff.net.2.lora_B.weight": torch.ones(D, 2),
        "diffusion_model.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, 8),  # video: not here
        "diffusion_model.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.ones(8, 2),
        "text_encoder.some.weight": torch.ones(3),
    }, path)
    with pytest.raises(ValueError, match="3 LoRA keys match no layer.*attn1.to_q"):
        lora.load_lora(tiny_dit(), path)
    dit = tiny_dit()
    report = lora.load_lora(dit, path, allow_unmatched=True)
    assert report["loaded"] == ["transformer_blocks.0.audio_ff.net.2"]
    assert sorted(report["unmatched"]) == ["text_encoder.some.weight",
                                          "transformer_blocks.0.attn1.to_q.lora_A.weight",
                                          "transformer_blocks.0.attn1.to_q.lora_B.weight"]
    bad = tmp_path / "bad.safetensors"
    save_file({"diffusion_model.transformer_blocks.0.audio_ff.net.2.lora_A.weight": torch.ones(2, 7),
               "diffusion_model.transformer_blocks.0.audio_ff.net.2.lora_B.weight": torch.ones(D, 2)}, bad)
    with pytest.raises(ValueError, match="audio_ff.net.2.*another model size"):
        lora.load_lora(tiny_dit(), bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        lora.load_lora(tiny_dit(), junk)


# -----------------------------------------------------------------------------------------------
# merge.py


def base_checkpoint(dit, path, dtype):
    """An official-layout file: the DiT, plus a video weight, a VAE tensor and an int buffer that a
    drop-in replacement must carry through untouched."""
    extra = {"model.diffusion_model.transformer_blocks.0.attn1.to_q.weight": torch.randn(8, 8).to(dtype),
             "audio_vae.decoder.conv_in.weight": torch.randn(4, 3, 3),
             "vocoder.counter": torch.arange(5)}
    M.save_dit(dit.to(dtype), path, extra=extra)
    return path


def test_ltx_core_fuser_gives_our_merged_weights(tmp_path):
    """Our saved LoRA fused by ltx-core's `apply_loras` gives our merged weights. With fp32 output
    the reference computes W + B@A exactly as we do: equal bit for bit. With bf16 output it rounds
    B@A to bf16 before adding, we round once: within one bf16 step of the result (+ half of the delta's)."""
    dit = tiny_dit()
    lora.inject_lora(dit, ["audio"], rank=4, alpha=16)
    randomise_lora(dit)
    lpath = tmp_path / "l.safetensors"
    lora.save_lora(dit, lpath, base_model_id="tiny")
    ckpt = base_checkpoint(tiny_dit(), tmp_path / "base.safetensors", torch.bfloat16)

    lsd = {LTXV_LORA_COMFY_RENAMING_MAP.apply_to_key(k): v for k, v in load_file(lpath).items()}
    base_sd = {k[len(M.PREFIX):]: v for k, v in load_file(ckpt).items() if k.startswith(M.PREFIX)}

    def fuse(dtype):
        return apply_loras(StateDict(dict(base_sd), torch.device("cpu"), 0, {torch.bfloat16}),
                           [LoraStateDictWithStrength(StateDict(lsd, torch.device("cpu"), 0, {torch.float32}), 1.0)],
                           dtype=dtype).sd

    fused32, fused16 = fuse(torch.float32), fuse(None)
    out32, out16 = tmp_path / "m32.safetensors", tmp_path / "m16.safetensors"
    summary = merge.merge_checkpoint(ckpt, lpath, out32, dtype="fp32")
    assert summary["merged"] == 20 and summary["cast"] == len(base_sd) - 20
    merge.merge_checkpoint(ckpt, lpath, out16, dtype="bf16")
    ours32, ours16 = load_file(out32), load_file(out16)
    live = tiny_dit().to(torch.bfloat16)
    lora.load_lora(live, lpath)
    lora.merge_lora(live)  # in-memory merge: fp32 sum, cast back to the bf16 weight
    adapted = dict(lora.lora_modules(dit))
    for key in base_sd:
        if key.removesuffix(".weight") not in adapted:
            assert torch.equal(ours16[M.PREFIX + key], fused16[key])  # untouched by both
            continue
        assert torch.equal(ours32[M.PREFIX + key], fused32[key])
        assert torch.equal(ours16[M.PREFIX + key], fused32[key].to(torch.bfloat16))
        assert torch.equal(live.get_parameter(key), ours16[M.PREFIX + key])
        got, ref = ours16[M.PREFIX + key].float(), fused16[key].float()
        delta = fused32[key] - base_sd[key].float()
        assert ((got - ref).abs() <= 2**-7 * ref.abs() + 2**-8 * delta.abs() + 1e-30).all()


def test_merge_py_is_a_drop_in_replacement(tmp_path):
    """merge.py: merged file vs the live adapters ≤ 1e-5 (fp32); every other tensor byte-identical;
    the original metadata kept; load_dit reads it back with strict names."""
    dit = tiny_dit()
    lora.inject_lora(dit, ["audio"], rank=4, alpha=8)
    randomise_lora(dit)
    unmerged = run(dit)
    lpath = tmp_path / "l.safetensors"
    lora.save_lora(dit, lpath, base_model_id="tiny")
    ckpt = base_checkpoint(tiny_dit(), tmp_path / "base.safetensors", torch.float32)
    out = tmp_path / "merged.safetensors"
    merge.main(["--ckpt", str(ckpt), "--lora", str(lpath), "--out", str(out), "--dtype", "fp32"])
    assert sorted(os.listdir(tmp_path)) == ["base.safetensors", "l.safetensors", "merged.safetensors"]

    merged = M.load_dit(out, dtype=torch.float32).eval()
    torch.testing.assert_close(run(merged), unmerged, rtol=0, atol=1e-5)
    base_meta, out_meta = files.read_safetensors_metadata(ckpt), files.read_safetensors_metadata(out)
    assert {k: out_meta[k] for k in base_meta} == base_meta
    assert json.loads(out_meta["merged_lora"])["layers"] == 20
    adapted = {f"{M.PREFIX}{n}.weight" for n, _ in lora.lora_modules(dit)}
    with safe_open(ckpt, "pt") as f, safe_open(out, "pt") as g:
        assert list(f.keys()) == list(g.keys())
        for k in f.keys():
            same = torch.equal(f.get_tensor(k), g.get_tensor(k))
            assert same != (k in adapted), k
            assert f.get_tensor(k).dtype == g.get_tensor(k).dtype

    # default bf16: the transformer is cast, the VAE and integer tensors are not
    out16 = tmp_path / "merged16.safetensors"
    merge.merge_checkpoint(ckpt, lpath, out16)
    with safe_open(out16, "pt") as g:
        assert g.get_tensor(M.PREFIX + "audio_proj_out.weight").dtype == torch.bfloat16
        assert g.get_tensor("audio_vae.decoder.conv_in.weight").dtype == torch.float32
        assert torch.equal(g.get_tensor("vocoder.counter"), torch.arange(5))


def test_merge_py_rejects_a_lora_for_another_model(tmp_path):
    ckpt = base_checkpoint(tiny_dit(), tmp_path / "base.safetensors", torch.float32)
    lpath = tmp_path / "other.safetensors"
    save_file({"diffusion_model.transformer_blocks.7.audio_attn1.to_q.lora_A.weight": torch.ones(2, CFG.dim),
               "diffusion_model.transformer_blocks.7.audio_attn1.to_q.lora_B.weight": torch.ones(CFG.dim, 2)}, lpath)
    with pytest.raises(ValueError, match="missing from the base.*transformer_blocks.7.audio_attn1.to_q"):
        merge.merge_checkpoint(ckpt, lpath, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
