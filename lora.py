"""LoRA adapters on the DiT's nn.Linear layers: inject, switch off, merge, save, load.

    inject_lora(dit, ["laionbox"], rank=64, alpha=64)     # stage 1: 113,246,208 params on the 22B
    with lora_disabled(dit): v_base = dit(...)            # the base prediction (preservation, A/B)
    save_lora(dit, "lora.safetensors", base_model_id="ltx-2.3-22b-dev")
    merge_lora(dit)                                       # folds in; names are the official ones again

A wrapped layer computes `W x + b + (alpha/r) · B A dropout(x)` with A Kaiming-uniform and B zero,
so a fresh adapter leaves the model unchanged (the peft / LoRA-paper init). `LoRALinear` is an
nn.Linear that keeps the base `weight`/`bias` under their own names and adds `lora_A`/`lora_B`
submodules, so the model's state dict holds the official keys plus
`transformer_blocks.N.<module>.lora_A.weight` — the saved layout without its `diffusion_model.`
prefix.

File layout (what ComfyUI and ltx-core read): `diffusion_model.<module>.lora_A.weight`
[r, in] and `.lora_B.weight` [out, r]. ltx-core's fuser computes `B @ A` and ignores alpha, while
ComfyUI multiplies by alpha/r only when a `<module>.alpha` key exists; so alpha/r is folded into
B on save and no `.alpha` key is written, and both apply the adapter at the trained strength.
"""

import json
import math
import os
from contextlib import contextmanager

import torch
import torch.nn as nn

import files

# Target presets: each entry is a pattern of dotted name components (see `_matches`).
PRESETS = {
    "audio": ["audio_attn1", "audio_attn2", "audio_ff"],
    "audio_v2a": ["audio_attn1", "audio_attn2", "audio_ff", "video_to_audio_attn"],
    "attn_all": ["to_q", "to_k", "to_v", "to_out.0"],  # every attention, video and cross-modal included
    "laionbox": ["audio_attn1", "audio_ff"],  # LAIONBox v0.4 stage 1 (run 7)
}
# Never adapted, whatever the patterns say: per-head gate logits gave NaNs in ai-toolkit's LTX-2 LoRAs;
# patchify/proj_out, AdaLN and the text path carry the conditioning the adapters build on.
EXCLUDED_PARTS = ("to_gate_logits", "connector", "patchify_proj", "proj_out", "adaln_single",
                  "caption_projection", "aggregate_embed")
# File key prefixes accepted on load (ours and ComfyUI/ltx-core: `diffusion_model.`; diffusers: `transformer.`).
LOAD_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
SAVE_PREFIX = "diffusion_model."


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update: y = W x + b + scale · B(A(dropout(x))), scale = alpha / rank.

    Shares the wrapped layer's `weight` and `bias` Parameters (no copy). A and B are in `dtype`
    (default: the base weight's). `enabled = False` gives the base layer's output exactly.
    """

    def __init__(self, base, rank, alpha, dropout=0.0, dtype=None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kw = {"device": base.weight.device, "dtype": dtype or base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **kw)  # weight (r, in)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **kw)  # weight (out, r)
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's default, as peft
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        y = super().forward(x)
        if not self.enabled:
            return y
        h = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))  # (..., r)
        return y + (self.lora_B(h) * self.scale).to(y.dtype)

    def delta_weight(self):
        """scale · B A in fp32, shaped like `weight` (out, in)."""
        return self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def extra_repr(self):
        return f"{self.in_features} -> {self.out_features}, rank={self.rank}, alpha={self.alpha:g}"


# -----------------------------------------------------------------------------------------------
# choosing and wrapping layers


def resolve_targets(targets):
    """Preset names expanded to their patterns; other strings are kept as custom patterns."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    patterns = []
    for t in targets:
        for p in PRESETS.get(t, [t]):
            if p not in patterns:
                patterns.append(p)
    return patterns


def _matches(name, pattern):
    """True when the dotted components of `pattern` occur consecutively in `name`'s components:
    'audio_attn1' matches 'transformer_blocks.3.audio_attn1.to_q', 'to_out.0' matches '...to_out.0'."""
    parts, want = name.split("."), pattern.split(".")
    return any(parts[i : i + len(want)] == want for i in range(len(parts) - len(want) + 1))


def _excluded(name):
    return any(ex in part for part in name.split(".") for ex in EXCLUDED_PARTS)


def _has_audio(name):
    return any("audio" in part for part in name.split("."))


def target_modules(model, targets, with_audio=True):
    """Qualified names of the nn.Linear layers `targets` selects (excluded parts never included).

    with_audio=False leaves out every audio and cross-modal module (a run without audio must not
    create adapters it cannot train). Raises when a pattern selects nothing or names an excluded part.
    """
    patterns = resolve_targets(targets)
    if not patterns:
        raise ValueError("lora_targets is empty: name a preset (" + ", ".join(PRESETS) + ") or module patterns")
    for p in patterns:
        if _excluded(p):
            raise ValueError(f"LoRA target '{p}' names a module that is never adapted ({', '.join(EXCLUDED_PARTS)})")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)
               and not any(n.endswith(s) for s in (".lora_A", ".lora_B"))]
    example = next((n for n in linears if "transformer_blocks" in n), linears[0] if linears else "none")
    for p in patterns:
        if not any(_matches(n, p) for n in linears):
            raise ValueError(f"LoRA target pattern '{p}' matches no nn.Linear of {type(model).__name__} "
                             f"(layers are named like '{example}'; presets: {', '.join(PRESETS)})")
    return [n for n in linears if any(_matches(n, p) for p in patterns) and not _excluded(n)
            and (with_audio or not _has_audio(n))]


def _set_submodule(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def inject_lora(model, targets, *, rank, alpha, dropout=0.0, with_audio=True, dtype=None):
    """Wrap the nn.Linear layers selected by `targets` (presets and/or patterns) in LoRALinear.

    Only the new lora_A/lora_B weights require grad; the caller freezes the base beforehand.
    dtype: of the new A/B weights (default: each base layer's). Returns the wrapped layers' names.
    """
    if rank <= 0:
        raise ValueError(f"lora_rank must be positive, got {rank}")
    names = target_modules(model, targets, with_audio=with_audio)
    if not names:
        raise ValueError(f"LoRA targets {targets} select no layer of this model (with_audio={with_audio})")
    for name in names:
        _set_submodule(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout, dtype=dtype))
    return names


def lora_modules(model):
    """(name, LoRALinear) pairs of the model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def audio_adapter_params(model):
    """lora_A / lora_B weights of the adapters on audio and cross-modal modules (every module with
    "audio" in its name: audio_attn1/2, audio_ff, audio_to_video_attn, video_to_audio_attn)."""
    return [p for n, m in lora_modules(model) if _has_audio(n) for p in (m.lora_A.weight, m.lora_B.weight)]


def set_lora_enabled(model, enabled):
    """Switch every adapter of `model` on or off (off = the base model's prediction exactly)."""
    for _, m in lora_modules(model):
        m.enabled = enabled


@contextmanager
def lora_disabled(model):
    """Context in which the model runs without its adapters; restores each adapter's previous state."""
    mods = lora_modules(model)
    before = [m.enabled for _, m in mods]
    set_lora_enabled(model, False)
    try:
        yield model
    finally:
        for (_, m), e in zip(mods, before):
            m.enabled = e


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its base weight (in fp32, cast back to the weight's dtype) and put a
    plain nn.Linear back, so parameter names equal the official checkpoint's again.
    Returns the merged layers' names."""
    names = []
    for name, m in lora_modules(model):
        w = m.weight
        w.copy_((w.float() + m.delta_weight()).to(w.dtype))
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        _set_submodule(model, name, plain)
        names.append(name)
    return names


def lora_table(model):
    """A text table of the adapted layers (name, in, out, rank, trainable params) with the total."""
    rows = [(n, m.in_features, m.out_features, m.rank, m.lora_A.weight.numel() + m.lora_B.weight.numel())
            for n, m in lora_modules(model)]
    width = max([len(r[0]) for r in rows] + [6])
    lines = [f"{'module':<{width}} {'in':>6} {'out':>6} {'rank':>5} {'params':>12}"]
    lines += [f"{n:<{width}} {i:>6} {o:>6} {r:>5} {p:>12,}" for n, i, o, r, p in rows]
    lines.append(f"{len(rows)} adapted layers, {sum(r[4] for r in rows):,} LoRA params")
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------
# files


def lora_state_dict(model, state=None, dtype=None):
    """The adapters as file tensors: `diffusion_model.<module>.lora_A.weight` (r, in) and
    `.lora_B.weight` (out, r) with alpha/r folded into B.

    state: optional {parameter name: tensor} overriding the module's values (e.g. the fp32 master
    copies train.py keeps); dtype: cast the saved tensors (default: their own dtype).
    """
    state = state or {}
    out = {}
    for name, m in lora_modules(model):
        a = state.get(f"{name}.lora_A.weight", m.lora_A.weight).detach()
        b = state.get(f"{name}.lora_B.weight", m.lora_B.weight).detach()
        b = (b.float() * m.scale).to(dtype or b.dtype)
        out[f"{SAVE_PREFIX}{name}.lora_A.weight"] = a.to(dtype or a.dtype).contiguous().cpu()
        out[f"{SAVE_PREFIX}{name}.lora_B.weight"] = b.contiguous().cpu()
    if not out:
        raise ValueError("the model has no LoRA adapters to save (inject_lora first)")
    return out


def save_lora(model, path, *, base_model_id, extra_meta=None, state=None, dtype=None):
    """Write the adapters to `path` (safetensors, atomically) with rank, alpha, targets and the base
    model in the metadata. See `lora_state_dict` for `state` and `dtype`."""
    path = os.fspath(path)
    tensors = lora_state_dict(model, state=state, dtype=dtype)
    mods = lora_modules(model)
    ranks = sorted({m.rank for _, m in mods})
    alphas = sorted({m.alpha for _, m in mods})
    meta = {
        "format": "pt",
        "lora_rank": str(ranks[0]) if len(ranks) == 1 else json.dumps(ranks),
        "lora_alpha": f"{alphas[0]:g}" if len(alphas) == 1 else json.dumps(alphas),
        "lora_alpha_folded": "true",  # B already holds alpha/r: apply B @ A at strength 1
        "lora_targets": json.dumps([n for n, _ in mods]),
        **base_model_meta(base_model_id),
    }
    for k, v in (extra_meta or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return files.save_safetensors(tensors, path, metadata=meta)


def base_model_meta(base_model_id):
    """The metadata naming a LoRA's base model: a checkpoint by its file name and a content digest
    (files.file_digest), never by its path, which means nothing on another machine and tells where
    files live on this one; a preset name as it is."""
    name = os.path.basename(os.fspath(base_model_id))
    if os.path.isfile(base_model_id):
        return {"base_model": name, "base_model_digest": files.file_digest(base_model_id)}
    return {"base_model": name}


def read_lora_file(path, strength=1.0):
    """Parse a LoRA safetensors file (ours, ComfyUI or ltx-core layout) into per-layer updates.

    Returns (updates, unmatched): updates maps a module name without prefix (e.g.
    'transformer_blocks.0.audio_attn1.to_q') to (A (r, in), B (out, r)) in fp32 with every factor
    folded into B — alpha/r when the file has a `<module>.alpha` key, and `strength` — so the
    weight update is exactly B @ A. unmatched lists the file keys that are not part of a complete
    lora_A/lora_B pair.
    """
    path = os.fspath(path)
    groups, unmatched = {}, []
    for key, t in files.load_safetensors(path).items():  # NaN / Inf and damaged files are refused here
        stripped = next((key[len(p):] for p in LOAD_PREFIXES if key.startswith(p)), key)
        for suffix, slot in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".alpha", "alpha")):
            if stripped.endswith(suffix):
                groups.setdefault(stripped[: -len(suffix)], {})[slot] = (key, t)
                break
        else:
            unmatched.append(key)
    updates = {}
    for module, g in groups.items():
        if "A" not in g or "B" not in g:
            unmatched += [k for k, _ in g.values()]
            continue
        (ka, a), (kb, b) = g["A"], g["B"]
        a, b = a.float(), b.float()
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{path}: {ka} {tuple(a.shape)} and {kb} {tuple(b.shape)} are not a rank-r pair "
                             "(expected A (r, in), B (out, r))")
        scale = float(strength)
        if "alpha" in g:  # ComfyUI convention: the update is (alpha / r) B A
            scale *= float(g["alpha"][1].float().item()) / a.shape[0]
        updates[module] = (a, b * scale)
    return updates, unmatched


@torch.no_grad()
def load_lora(model, path, *, strength=1.0, allow_unmatched=False):
    """Apply a LoRA file to `model` as live adapters (enable/disable and merge work as after training).

    Layers without an adapter get a LoRALinear of the file's rank with fp32 A/B; layers that already
    have one get the file's values (same rank required). Keys that match no layer of the model raise a ValueError
    listing them, unless allow_unmatched, which only prints them. Returns {"loaded": [module names],
    "unmatched": [file keys]}.
    """
    path = os.fspath(path)
    updates, unmatched = read_lora_file(path, strength)
    modules = dict(model.named_modules())
    loaded = []
    for name, (a, b) in updates.items():
        m = modules.get(name)
        if not isinstance(m, nn.Linear) or name.endswith((".lora_A", ".lora_B")):
            unmatched += [f"{name}.lora_A.weight", f"{name}.lora_B.weight"]
            continue
        if a.shape[1] != m.in_features or b.shape[0] != m.out_features:
            raise ValueError(f"{path}: LoRA for {name} is ({b.shape[0]} x {a.shape[1]}) but the layer is "
                             f"({m.out_features} x {m.in_features}); a LoRA for another model size?")
        if not isinstance(m, LoRALinear):
            # scale 1 (B already holds every factor); fp32 keeps the file's values exact on a bf16 model
            m = LoRALinear(m, a.shape[0], alpha=a.shape[0], dtype=torch.float32)
            _set_submodule(model, name, m)
        elif m.rank != a.shape[0]:
            raise ValueError(f"{path}: LoRA for {name} has rank {a.shape[0]}, the model's adapter rank {m.rank}")
        m.lora_A.weight.copy_(a)
        m.lora_B.weight.copy_(b / m.scale)
        loaded.append(name)
    if unmatched:
        msg = (f"{path}: {len(unmatched)} LoRA keys match no layer of the model: " + ", ".join(unmatched[:10])
               + (f" ... (+{len(unmatched) - 10} more)" if len(unmatched) > 10 else ""))
        if not allow_unmatched:
            raise ValueError(msg + " (pass allow_unmatched=True to apply the rest)")
        print("warning: " + msg)
    if not loaded:
        raise ValueError(f"{path}: no LoRA layer of this file applies to the model")
    return {"loaded": loaded, "unmatched": unmatched}
