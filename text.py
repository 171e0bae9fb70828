"""Text conditioning for the audio DiT: Gemma 3 -> feature extractor -> audio connector.

Two halves, so training can cache the expensive one:

    encoder = build_text_encoder("/models/gemma-3-12b-it", max_text_len=1024, device="cuda",
                                 dtype=torch.bfloat16, ckpt="ltx-2.3-22b-dev.safetensors")
    features, mask = encoder.encode(["A woman says: 'hello'"])   # (B, L, 2048), (B, L); cached
    connector = load_text_connector("ltx-2.3-22b-dev.safetensors")
    context = connector(features, mask)                          # (B, L, 2048) -> audio_attn2

`TextEncoder` (frozen) runs Gemma 3 on left-padded prompts and applies `text_embedding_projection`
(the feature extractor). `TextConnector` is `audio_embeddings_connector`: a small 1-D transformer
in which learnable registers take the place of the padding, so its output needs no mask.
For CPU runs `build_text_encoder("byte", ...)` gives a tiny random Gemma 3 over UTF-8 bytes that
needs no download but runs the same code path. The reference is ltx-core 1.0.0
(`ltx_core/text_encoders/gemma/`); tests/test_text.py checks this file against it.
"""

import functools
import hashlib
import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from files import check_file, load_prefixed_state, read_checkpoint_config
from layers import PROGRESS_OUTSIDE, Attention, FeedForward, rms_norm, split_rope

# Connector sizes for a randomly initialised connector, keyed like model.PRESETS: its width
# heads*head_dim must be the DiT's text width (cross_attention_dim, or caption_channels for 2.0).
# ltx23_audio is the official LTX-2.3 audio connector (tests/data/ltx23/transformer_config.json); ltx20_audio takes the reference's
# fallbacks (30 x 128, 2 layers, no gates). Official files carry their own sizes (`load_text_connector`).
CONNECTOR_PRESETS = {
    "ltx23_audio": dict(heads=32, head_dim=64, layers=8, registers=128, gated=True),
    "ltx20_audio": dict(heads=30, head_dim=128, layers=2, registers=128, gated=False),
    "tiny": dict(heads=4, head_dim=64, layers=2, registers=16, gated=True),
    "tiny192": dict(heads=3, head_dim=64, layers=2, registers=16, gated=True),
    "micro": dict(heads=2, head_dim=16, layers=1, registers=8, gated=True),
}
# the audio-video presets share their audio stream, hence their audio connector
CONNECTOR_PRESETS.update(ltx23_av=CONNECTOR_PRESETS["ltx23_audio"], tiny_av=CONNECTOR_PRESETS["tiny"],
                         micro_av=CONNECTOR_PRESETS["micro"])

# The joint model's `video_embeddings_connector`, width = the preset's video_cross_attention_dim
# (LTX-2.3: the official config's connector_* entries, 32 x 128, 8 layers).
VIDEO_CONNECTOR_PRESETS = {
    "ltx23_av": dict(heads=32, head_dim=128, layers=8, registers=128, gated=True),
    "tiny_av": dict(heads=4, head_dim=128, layers=2, registers=16, gated=True),
    "micro_av": dict(heads=2, head_dim=32, layers=1, registers=8, gated=True),
}
STREAMS = ("audio", "video")


def _stream(stream):
    if stream not in STREAMS:
        raise ValueError(f"text stream must be one of {STREAMS}, got {stream!r}")
    return stream


REGISTER_LAYOUTS = ("official", "ltx_core_1_0")

# -----------------------------------------------------------------------------------------------
# feature extractor: Gemma hidden states -> one vector per token (`text_embedding_projection`)


def per_token_rms_features(hidden_states, mask, eps=1e-6):
    """LTX-2.3 normalisation: every layer's hidden state RMS-normalised per token over H.

    hidden_states: tuple of n (B, L, H) tensors (embeddings + every layer). mask: (B, L) bool.
    Returns (B, L, H*n) in the input dtype, laid out h-major (index h*n + layer, as `stack(-1)`
    then flatten), with padded positions zero. The norm is taken in fp32.
    """
    normed = [F.rms_norm(h.float(), (h.shape[-1],), eps=eps).to(h.dtype) for h in hidden_states]
    x = torch.stack(normed, dim=-1).flatten(2)  # (B, L, H*n)
    return torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))


def per_layer_range_features(hidden_states, mask, eps=1e-6):
    """LTX-2.0 normalisation: per sample and layer, `8 (x - mean) / (max - min)` over valid tokens.

    The statistics run over all valid tokens and all H channels of one layer (not per token).
    Same shapes and layout as `per_token_rms_features`.
    """
    x = torch.stack(hidden_states, dim=-1).float()  # (B, L, H, n)
    B, _, H, _ = x.shape
    valid = mask[:, :, None, None]
    n_valid = mask.sum(1).view(B, 1, 1, 1).float()
    mean = x.masked_fill(~valid, 0.0).sum(dim=(1, 2), keepdim=True) / (n_valid * H + eps)
    x_min = x.masked_fill(~valid, float("inf")).amin(dim=(1, 2), keepdim=True)
    x_max = x.masked_fill(~valid, float("-inf")).amax(dim=(1, 2), keepdim=True)
    x = (8 * (x - mean) / (x_max - x_min + eps)).flatten(2)
    x = torch.where(mask[..., None], x, torch.zeros((), device=x.device))
    return x.to(hidden_states[0].dtype)


class TextProjection(nn.Module):
    """`text_embedding_projection`: all Gemma hidden states -> (B, L, dim) features.

    version "2.3": per-token RMS norm, `audio_aggregate_embed` (Linear with bias) applied to
    `x * sqrt(dim / H)`; dim is the audio connector width (2048). stream "video": the joint
    model's `video_aggregate_embed`, the same features into the video width (4096).
    version "2.0": per-layer mean/range norm, `aggregate_embed` (no bias), dim = H (3840); the
    19B model projects these inside the transformer (`audio_caption_projection`).
    """

    def __init__(self, hidden_size, n_states, dim, version="2.3", stream="audio"):
        super().__init__()
        self.hidden_size, self.version = hidden_size, version
        if version == "2.3":
            self.embed_name = f"{_stream(stream)}_aggregate_embed"
            setattr(self, self.embed_name, nn.Linear(hidden_size * n_states, dim))
        elif version == "2.0":
            self.aggregate_embed = nn.Linear(hidden_size * n_states, dim, bias=False)
        else:
            raise ValueError(f"TextProjection: version must be '2.3' or '2.0', got {version!r}")

    def forward(self, hidden_states, mask):
        """hidden_states: tuple of n (B, L, H); mask (B, L) bool -> (B, L, dim)."""
        if self.version == "2.3":
            x = per_token_rms_features(hidden_states, mask)  # (B, L, H*n)
            embed = getattr(self, self.embed_name)
            return embed(x * math.sqrt(embed.out_features / self.hidden_size))
        return self.aggregate_embed(per_layer_range_features(hidden_states, mask))


# -----------------------------------------------------------------------------------------------
# the audio connector (`audio_embeddings_connector`)


def place_registers(features, mask, registers, layout="official"):
    """Fill the padding of `features` with learnable registers; the result needs no mask.

    features (B, L, D), mask (B, L) bool, registers (R, D). Position p that gets a register gets
    `registers[p % R]` (the reference tiles the R registers along L and so needs R | L; here any
    L works).
    layout "official" (current Lightricks code): tokens stay at their positions, each padded
    position takes its register. layout "ltx_core_1_0" (ltx-core 1.0.0 on PyPI): the valid tokens
    are moved, in order, to the front and the tail positions take registers (the reference does
    this for batch 1 only; here any batch).
    The two give the tokens different RoPE positions, hence different outputs.
    """
    B, L, D = features.shape
    tiled = registers.to(features.dtype).repeat(-(-L // registers.shape[0]), 1)[:L]  # (L, D)
    if layout == "ltx_core_1_0":
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # valid tokens first
        features = features.gather(1, order[..., None].expand(B, L, D))
        mask = torch.arange(L, device=mask.device)[None] < mask.sum(1, keepdim=True)
    elif layout != "official":
        raise ValueError(f"register_layout must be one of {REGISTER_LAYOUTS}, got {layout!r}")
    return torch.where(mask[..., None], features, tiled)


class ConnectorBlock(nn.Module):
    """`transformer_1d_blocks.N`: pre-norm self-attention with RoPE, then a feed-forward."""

    def __init__(self, dim, heads, head_dim, gated):
        super().__init__()
        self.attn1 = Attention(dim, None, heads, head_dim, gated=gated)
        self.ff = FeedForward(dim, 4)

    def forward(self, x, rope):
        x = x + self.attn1(rms_norm(x), rope=rope)
        return x + self.ff(rms_norm(x))


class TextConnector(nn.Module):
    """`audio_embeddings_connector`: features (B, L, D) + mask -> context (B, L, D) for audio_attn2.

    Registers replace the padding (see `place_registers`), every position attends to every other
    (no mask), split RoPE runs over the token index 0..L-1 normalised by `max_pos`, and a final
    parameter-free RMSNorm closes it. D = heads * head_dim.
    """

    def __init__(self, heads, head_dim, layers, registers=128, max_pos=4096, gated=True, theta=1e4,
                 double_precision_rope=True, register_layout="official"):
        super().__init__()
        if register_layout not in REGISTER_LAYOUTS:
            raise ValueError(f"register_layout must be one of {REGISTER_LAYOUTS}, got {register_layout!r}")
        dim = heads * head_dim
        self.heads, self.max_pos, self.theta = heads, max_pos, theta
        self.double_precision_rope, self.register_layout = double_precision_rope, register_layout
        self.transformer_1d_blocks = nn.ModuleList(ConnectorBlock(dim, heads, head_dim, gated) for _ in range(layers))
        # uniform in [-1, 1), as the reference initialises them
        self.learnable_registers = nn.Parameter(torch.rand(registers, dim) * 2 - 1)

    def forward(self, features, mask):
        """features (B, L, D), mask (B, L) bool (True = real token) -> (B, L, D)."""
        B, L, D = features.shape
        x = place_registers(features, mask, self.learnable_registers, self.register_layout)
        positions = torch.arange(L, device=x.device)[None]  # (1, L); broadcasts over the batch
        rope = split_rope(positions, self.max_pos, D, self.heads, self.theta, dtype=x.dtype,
                          double_precision=self.double_precision_rope)
        for block in self.transformer_1d_blocks:
            x = block(x, rope)
        return rms_norm(x)


def left_pad_features(features, max_text_len):
    """Stack cached valid-token features [(n_i, D), ...] left-padded (as the tokenizer pads).

    Returns features (B, max_text_len, D) with zeros in the padding, and mask (B, max_text_len)
    bool. Left padding matters: the official register layout keeps tokens where they are.
    """
    D = features[0].shape[-1]
    out = features[0].new_zeros(len(features), max_text_len, D)
    mask = torch.zeros(len(features), max_text_len, dtype=torch.bool, device=out.device)
    for i, f in enumerate(features):
        n = f.shape[0]
        if n > max_text_len:
            raise ValueError(f"left_pad_features: item {i} has {n} tokens > max_text_len={max_text_len}")
        if n:
            out[i, -n:], mask[i, -n:] = f, True
    return out, mask


# -----------------------------------------------------------------------------------------------
# checkpoint IO (official key names)

CONNECTOR_PREFIX = "model.diffusion_model.audio_embeddings_connector."
VIDEO_CONNECTOR_PREFIX = "model.diffusion_model.video_embeddings_connector."
PROJECTION_PREFIX = "text_embedding_projection."


def _load_strict(module, state, path, prefix):
    """load_state_dict(strict=True) with an error that names the file and the keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or bad_shape:
        raise KeyError(f"{path}: keys under '{prefix}' do not match; missing {missing[:8]}, "
                       f"unexpected {unexpected[:8]}, wrong shapes {bad_shape[:8]}")
    module.load_state_dict(state, strict=True)


def connector_config(transformer_config, state, stream="audio"):
    """TextConnector kwargs from a checkpoint's `transformer` config and its connector tensors.

    Width, registers, layers and gating are read from the tensors, and the heads from the gate's
    rows; the config gives what shapes cannot: heads of an ungated connector (the reference's
    keys: audio_connector_* over connector_*, default 30 x 128), RoPE max_pos, theta and grid
    precision, with the reference's fallbacks. A config that contradicts the tensors is an error.
    """
    c = transformer_config
    if c.get("rope_type", "interleaved") != "split":  # the reference's default is interleaved
        raise NotImplementedError(f"text connector: rope_type {c.get('rope_type', 'interleaved')!r} is not "
                                  "supported (only 'split', as LTX-2 / LTX-2.3 use)")
    # official configs all give [4096]; when absent (model.metadata_from_dit_config files) use
    # that rather than the reference's fallback [1]
    max_pos = c.get("connector_positional_embedding_max_pos", [4096])
    if len(max_pos) != 1:
        raise ValueError(f"text connector: connector_positional_embedding_max_pos must have one entry, got {max_pos}")
    registers, dim = state["learnable_registers"].shape
    layers = len({k.split(".")[1] for k in state if k.startswith("transformer_1d_blocks.")})
    gated = "transformer_1d_blocks.0.attn1.to_gate_logits.weight" in state
    # the audio connector's audio_connector_* entries win over connector_*, which describe the video one
    prefixes = ("audio_connector_", "connector_") if _stream(stream) == "audio" else ("connector_",)

    def entry(name, default=None):
        return next((c[p + name] for p in prefixes if p + name in c), default)

    heads, head_dim = entry("num_attention_heads"), entry("attention_head_dim")
    if gated:
        gate_heads = state["transformer_1d_blocks.0.attn1.to_gate_logits.weight"].shape[0]
        if heads is not None and heads != gate_heads:
            raise ValueError(f"text connector: config says {heads} heads, to_gate_logits has {gate_heads} rows")
        heads = gate_heads
    heads = heads or 30
    head_dim = head_dim or dim // heads
    if heads * head_dim != dim:
        raise ValueError(f"text connector: {heads} heads x {head_dim} != width {dim} of learnable_registers")
    n_cfg = entry("num_layers", layers)
    if n_cfg != layers:
        raise ValueError(f"text connector: config says {n_cfg} layers, the file has {layers} blocks")
    return dict(heads=heads, head_dim=head_dim, layers=layers, registers=registers, max_pos=max_pos[0],
                gated=gated, theta=float(c.get("positional_embedding_theta", 1e4)),
                double_precision_rope=c.get("frequencies_precision") == "float64")


def connector_metadata(connector, stream="audio"):
    """The transformer-config entries that describe `connector` (merge them into a file's config);
    the video connector's sizes go under the official connector_* keys, the audio one's under
    audio_connector_*. Registers, RoPE and gating are one set of keys shared by both."""
    attn = connector.transformer_1d_blocks[0].attn1
    p = "audio_connector_" if _stream(stream) == "audio" else "connector_"
    return {p + "num_attention_heads": attn.heads, p + "attention_head_dim": attn.head_dim,
            p + "num_layers": len(connector.transformer_1d_blocks),
            "connector_num_learnable_registers": connector.learnable_registers.shape[0],
            "connector_positional_embedding_max_pos": [connector.max_pos],
            "connector_apply_gated_attention": attn.to_gate_logits is not None,
            "frequencies_precision": "float64" if connector.double_precision_rope else "float32"}


def connector_checkpoint_tensors(connector, stream="audio"):
    """The connector's tensors under their official keys, for saving next to the DiT."""
    prefix = CONNECTOR_PREFIX if _stream(stream) == "audio" else VIDEO_CONNECTOR_PREFIX
    return {prefix + k: v.detach().contiguous().cpu() for k, v in connector.state_dict().items()}


def load_text_connector(path, *, register_layout="official", device="cpu", dtype=torch.float32, stream="audio"):
    """The `audio_embeddings_connector` (stream "video": `video_embeddings_connector`) of an official
    LTX-2 / LTX-2.3 safetensors file (or one of ours).

    Sizes come from the tensors and the file's `__metadata__["config"]["transformer"]` (see
    `connector_config`). Missing/unexpected keys raise naming the file.
    """
    check_file(path)
    prefix = CONNECTOR_PREFIX if _stream(stream) == "audio" else VIDEO_CONNECTOR_PREFIX
    config = read_checkpoint_config(path).get("transformer", {})
    state = load_prefixed_state(path, prefix)
    if "learnable_registers" not in state:
        raise KeyError(f"{path}: missing key {prefix}learnable_registers")
    try:
        kwargs = connector_config(config, state, stream)
    except (KeyError, ValueError, NotImplementedError) as e:
        raise type(e)(f"{path}: {e}") from e
    connector = TextConnector(**kwargs, register_layout=register_layout)
    _load_strict(connector, state, path, prefix)
    return connector.to(device=device, dtype=dtype)


def build_text_connector(model, *, ckpt="", dim=None, register_layout="official", device="cpu",
                         dtype=torch.float32, seed=0, stream="audio"):
    """The audio (or video) connector from `ckpt` (official keys) when given, else a seeded random
    one sized by CONNECTOR_PRESETS[model] (VIDEO_CONNECTOR_PRESETS for the video stream; `model` is
    the config's DiT preset name). `dim`, if given, is the width the caller needs (the text
    features' width); a mismatch is an error."""
    presets = CONNECTOR_PRESETS if _stream(stream) == "audio" else VIDEO_CONNECTOR_PRESETS
    if ckpt:
        connector = load_text_connector(ckpt, register_layout=register_layout, device=device, dtype=dtype,
                                        stream=stream)
    elif model not in presets:
        raise KeyError(f"no {stream} text connector preset for model {model!r}; known: {sorted(presets)}")
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            connector = TextConnector(**presets[model], register_layout=register_layout)
        connector = connector.to(device=device, dtype=dtype)
    width = connector.learnable_registers.shape[1]
    if dim is not None and dim != width:
        raise ValueError(f"text connector for {ckpt or model!r} is {width} wide, the text features are {dim}")
    return connector


def load_text_projection(path, hidden_size, *, device="cpu", dtype=torch.float32, stream="audio"):
    """`text_embedding_projection` of an official file for a Gemma of width `hidden_size`.

    LTX-2.3 files hold `audio_aggregate_embed` and `video_aggregate_embed` (stream "video"), LTX-2.0
    files `aggregate_embed`; the version follows from which is present.
    """
    check_file(path)
    other = "audio_" if _stream(stream) == "video" else "video_"
    state = load_prefixed_state(path, PROJECTION_PREFIX, keep=lambda k: not k.startswith(other))
    for name, version in ((f"{stream}_aggregate_embed", "2.3"), ("aggregate_embed", "2.0")):
        if f"{name}.weight" in state:
            break
    else:
        raise KeyError(f"{path}: neither {PROJECTION_PREFIX}{stream}_aggregate_embed.weight (LTX-2.3) nor "
                       f"{PROJECTION_PREFIX}aggregate_embed.weight (LTX-2.0) found")
    out_dim, in_dim = state[f"{name}.weight"].shape
    if in_dim % hidden_size:
        raise ValueError(f"{path}: {PROJECTION_PREFIX}{name}.weight takes {in_dim} features, not a multiple "
                         f"of the text encoder's hidden size {hidden_size}")
    projection = TextProjection(hidden_size, in_dim // hidden_size, out_dim, version, stream=stream)
    _load_strict(projection, state, path, PROJECTION_PREFIX + name)
    return projection.to(device=device, dtype=dtype)


# -----------------------------------------------------------------------------------------------
# Gemma 3 and the byte-level stand-in

# byte encoder vocabulary: 0 pad, 1 eos, 2 bos, 3 + byte value
BYTE_PAD, BYTE_EOS, BYTE_BOS, BYTE_OFFSET = 0, 1, 2, 3
# a tiny Gemma 3 text model (transformers Gemma3TextConfig fields): 2 layers of width 64, one
# sliding-window and one full-attention layer, as the real model alternates them
BYTE_GEMMA = dict(vocab_size=256 + BYTE_OFFSET, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=64,
                  layer_types=["sliding_attention", "full_attention"], pad_token_id=BYTE_PAD,
                  eos_token_id=BYTE_EOS, bos_token_id=BYTE_BOS)


def byte_tokenize(prompts, max_text_len):
    """UTF-8 bytes with a leading BOS, truncated and left-padded to max_text_len -> (ids, mask)."""
    ids = torch.full((len(prompts), max_text_len), BYTE_PAD, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        tokens = [BYTE_BOS] + [b + BYTE_OFFSET for b in prompt.strip().encode("utf-8")]
        tokens = tokens[:max_text_len]
        ids[i, max_text_len - len(tokens):] = torch.tensor(tokens)
    return ids, ids != BYTE_PAD


def spoken_progress(prompt, max_text_len):
    """(n,) fp32 progress of each byte token of `prompt` through the words it speaks, for a DiT with a
    progress rope (model.DiTConfig.text_progress_theta); n is the prompt's token count as
    `byte_tokenize` makes it (BOS + bytes, truncated to max_text_len), in the same order.

    The spoken words are the bytes between the first and the last double quote ('A calm voice.
    "hello there"'), or after the only quote when truncation cut the closing one; a prompt without a
    quote speaks all of it. Spoken token k of m sits at (k + 0.5) / m; BOS, the description and the
    quotes at PROGRESS_OUTSIDE.
    """
    data = prompt.strip().encode("utf-8")
    n = min(1 + len(data), max_text_len)
    out = torch.full((n,), PROGRESS_OUTSIDE)
    quotes = [i + 1 for i, byte in enumerate(data) if byte == ord('"') and i + 1 < n]  # token indices
    first, last = 1, n - 1
    if quotes:
        first, last = quotes[0] + 1, (quotes[-1] - 1 if len(quotes) >= 2 else n - 1)
    if last >= first:
        out[first:last + 1] = (torch.arange(last - first + 1, dtype=torch.float32) + 0.5) / (last - first + 1)
    return out


def progress_table(progress, max_text_len):
    """Per-prompt progress vectors (each at most max_text_len long) left-padded with PROGRESS_OUTSIDE
    to (B, max_text_len): the layout of the tokenizer's ids and of `left_pad_features`."""
    out = torch.full((len(progress), max_text_len), PROGRESS_OUTSIDE)
    for i, p in enumerate(progress):
        if len(p):
            out[i, max_text_len - len(p):] = p
    return out


def _load_gemma(path, device, dtype):
    """(Gemma 3 text model, tokenizer) from a local directory, nothing downloaded.

    Accepts a full Gemma 3 checkpoint (`gemma3`, e.g. gemma-3-12b-it: only its language model is
    kept) or a text-only one (`gemma3_text`).
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"text encoder {path!r}: no such directory; give a local Gemma 3 directory "
                                "(config.json, tokenizer files, *.safetensors) or 'byte' for the tiny CPU encoder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"text encoder {path!r}: no config.json; is this a Hugging Face Gemma 3 directory?")
    model_type = AutoConfig.from_pretrained(path, local_files_only=True).model_type
    if model_type not in ("gemma3", "gemma3_text"):
        raise ValueError(f"text encoder {path!r}: config.json has model_type {model_type!r}, expected Gemma 3 "
                         "('gemma3' or 'gemma3_text')")
    model, info = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype, device_map=str(device),
                                            output_loading_info=True)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise KeyError(f"text encoder {path!r}: weights missing from the checkpoint: {missing[:8]}")
    if model_type == "gemma3":  # Gemma3Model: drop the vision tower, text prompts never use it
        model = model.language_model
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"  # as the reference; the official register layout relies on it
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


class TextEncoder(nn.Module):
    """Frozen Gemma 3 + `text_embedding_projection`: prompts -> (features, mask).

    Built by `build_text_encoder`. `identity` describes what produced the features (for the
    data cache, see `text_fingerprint`).
    """

    def __init__(self, gemma, tokenize, projection, max_text_len, identity, video_projection=None):
        super().__init__()
        self.gemma, self.projection, self.video_projection = gemma, projection, video_projection
        self.tokenize, self.max_text_len, self.identity = tokenize, max_text_len, identity
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def hidden_states(self, prompts):
        """All Gemma hidden states: tuple of n_layers+1 tensors (B, L, H), and the mask (B, L)."""
        input_ids, mask = self.tokenize(prompts)
        device = next(self.gemma.parameters()).device
        input_ids, mask = input_ids.to(device), mask.to(device)
        out = self.gemma(input_ids=input_ids, attention_mask=mask.long(), output_hidden_states=True,
                         use_cache=False)
        return out.hidden_states, mask

    @torch.no_grad()
    def encode(self, prompts):
        """prompts: list of str -> features (B, L, D) fp32, mask (B, L) bool; L = max_text_len.

        Prompts are stripped, tokenised with a BOS, truncated and left-padded. Features at padded
        positions are the projection of zeros (the bias); cache `features[i][mask[i]]`.
        """
        hidden_states, mask = self.hidden_states(prompts)
        return self.projection(hidden_states, mask).float(), mask

    @property
    def has_progress(self):
        """Whether `progress` is defined: for the byte encoder, whose tokens are the prompt's bytes."""
        return "byte_gemma" in self.identity.get("gemma", {})

    def progress(self, prompts):
        """(B, max_text_len) progress of every token through the spoken words (`spoken_progress`), in
        `encode`'s layout: what a DiT with a progress rope takes beside the features."""
        if not self.has_progress:
            raise ValueError("text progress (text_progress_theta) is defined for the byte text encoder only: a "
                             "subword tokenizer would need its offsets mapped to the quoted words")
        return progress_table([spoken_progress(p, self.max_text_len) for p in prompts], self.max_text_len)

    @torch.no_grad()
    def encode_av(self, prompts):
        """The joint model's features from one Gemma pass: (audio (B, L, Da), video (B, L, Dv), mask)."""
        if self.video_projection is None:
            raise ValueError("this text encoder has no video projection: build it with video=True")
        hidden_states, mask = self.hidden_states(prompts)
        return (self.projection(hidden_states, mask).float(), self.video_projection(hidden_states, mask).float(),
                mask)


def build_text_encoder(name_or_path, *, max_text_len, device, dtype, seed=0, ckpt="", dim=None, video_dim=None):
    """The text encoder: "byte" (tiny random Gemma 3 over bytes) or a local Gemma 3 directory.

    The projection (`text_embedding_projection`) is read from `ckpt` (an official LTX-2.3 or 2.0
    safetensors file) when given, else randomly initialised (seeded) with output width `dim`.
    video_dim (the joint model): also a video projection, read from `ckpt` or random of that width.
    Everything random is drawn from `seed` without touching the global RNG, so the same
    arguments give the same encoder.
    """
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name_or_path == "byte":
            from transformers import Gemma3TextConfig, Gemma3TextModel

            config = Gemma3TextConfig(max_position_embeddings=max(max_text_len, 128), **BYTE_GEMMA)
            gemma = Gemma3TextModel(config).to(device=device, dtype=dtype)
            tokenize = functools.partial(byte_tokenize, max_text_len=max_text_len)
            gemma_id = {"byte_gemma": BYTE_GEMMA, "seed": seed}
        else:
            gemma, tokenizer = _load_gemma(name_or_path, device, dtype)
            config = gemma.config

            def tokenize(prompts):
                enc = tokenizer([p.strip() for p in prompts], padding="max_length", max_length=max_text_len,
                                truncation=True, return_tensors="pt")
                return enc.input_ids, enc.attention_mask.bool()

            gemma_id = {"files": _dir_signature(name_or_path)}
        hidden, n_states = config.hidden_size, config.num_hidden_layers + 1
        if ckpt:
            projection = load_text_projection(ckpt, hidden, device=device, dtype=dtype)
            n_file = next(projection.parameters()).shape[1] // hidden
            if n_file != n_states:
                raise ValueError(f"{ckpt}: text projection expects {n_file} hidden states of width {hidden}, "
                                 f"the Gemma model at {name_or_path!r} gives {n_states}")
        else:
            if dim is None:
                raise ValueError("build_text_encoder: give `ckpt` (official projection weights) or `dim` (random)")
            projection = TextProjection(hidden, n_states, dim).to(device=device, dtype=dtype)
        video_projection = None
        if video_dim is not None:
            video_projection = (load_text_projection(ckpt, hidden, device=device, dtype=dtype, stream="video")
                                if ckpt else TextProjection(hidden, n_states, video_dim, stream="video"))
            video_projection = video_projection.to(device=device, dtype=dtype)
    identity = {"gemma": gemma_id, "max_text_len": max_text_len, "dtype": str(dtype), "projection": projection.version}
    return TextEncoder(gemma, tokenize, projection, max_text_len, identity, video_projection)


def _dir_signature(path):
    """Names and sizes of a model directory's files, and the contents of its small JSON files."""
    sig = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            if name.endswith(".json") and os.path.getsize(full) < 1 << 20:
                with open(full) as f:
                    sig[name] = f.read()
            else:
                sig[name] = os.path.getsize(full)
    return sig


def text_fingerprint(encoder):
    """A short hash of everything that determines `encoder.encode`'s output (for the data cache).

    max_text_len and dtype count (left padding shifts Gemma's positions). The byte encoder's
    Gemma is identified by its seed and config; a real Gemma by its directory's JSON files and
    weight-file sizes (hashing 24 GB of weights would take minutes); the projection by its weights.
    """
    h = hashlib.sha256(json.dumps(encoder.identity, sort_keys=True, default=str).encode())
    for name, t in sorted(encoder.projection.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
