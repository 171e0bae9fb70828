"""The frozen models around the DiT, built from a run config: the codec (audio <-> latents), the
text encoder (prompt -> features) and the speaker extractors (reference -> speaker features).

Data preparation (data.py) encodes the training cache with them; sampling (sample.py) encodes
prompts and references and decodes latents with the same ones, so both build them here.
"""

import torch

from codec import codec_fingerprint, codec_from_config
from model import PRESETS
from text import build_text_encoder, text_fingerprint


def load_models(cfg, device):
    """Build the codec, text encoder and speaker extractors named by `cfg`, plus their fingerprints."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    codec = codec_from_config(cfg).to(device).eval()
    # the official projection comes from the checkpoint; without one it is random (seeded) with the
    # width the preset's audio_attn2 expects
    text_ckpt = cfg.text_ckpt or cfg.ckpt
    text_encoder = build_text_encoder(cfg.text_encoder, max_text_len=cfg.max_text_len, device=device, dtype=dtype,
                                      seed=cfg.seed, ckpt=text_ckpt,
                                      dim=None if text_ckpt else PRESETS[cfg.model].cross_attention_dim)
    speaker = None
    if cfg.speaker_extractors:
        from speaker import build_speaker_extractors
        speaker = build_speaker_extractors(cfg.speaker_extractors, cfg.speaker_paths, device)
    fingerprints = {"codec": codec_fingerprint(codec), "text": text_fingerprint(text_encoder),
                    "speaker": speaker.fingerprint() if speaker is not None else ""}
    return codec, text_encoder, speaker, fingerprints
