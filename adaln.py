"""SpeakerAdaLNZero: reference-speaker features -> per-block modulation deltas for the audio DiT.

LAIONBox v0.4 stage 2 (its model card): a small MLP maps the speaker feature vector of the reference audio to
one delta per transformer block, added to that block's timestep modulation `temb` (all rows:
shift/scale/gate of attn1, ff and the text query). The DiT takes them as
`AudioDiT.forward(..., block_deltas=(B, num_layers, rows*D))`.

    features (B, in_dim) -> Linear(in_dim, 512) SiLU Linear(512, 512) SiLU -> h (B, 512)
    delta_i = heads[i](h)    # Linear(512, rows*D), zero-initialised weight and bias

Zero heads (the adaLN-Zero idea of DiT) make the conditioned model exactly the backbone at init.
At the 22B config (2176-d input, 48 blocks, 9 x 2048) that is 455,246,848 parameters.
"""

import json
import os

import torch
import torch.nn as nn

import files


class SpeakerAdaLNZero(nn.Module):
    """Speaker features (B, in_dim) -> block deltas (B, num_blocks, rows*dim).

    `dropout`: in training, the probability that a sample is trained as "no speaker" (its deltas
    zeroed, which is exactly what the DiT sees when no reference is given), so unconditioned
    generation keeps working.
    """

    def __init__(self, in_dim, num_blocks, dim, rows=9, hidden=512, dropout=0.0):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"speaker dropout must be in [0, 1), got {dropout}")
        self.in_dim, self.num_blocks, self.rows, self.dim = in_dim, num_blocks, rows, dim
        self.dropout = dropout
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.heads = nn.ModuleList(nn.Linear(hidden, rows * dim) for _ in range(num_blocks))
        for head in self.heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, features, keep=None):
        """Deltas (B, num_blocks, rows*dim), or None when `features` is None (no reference).

        keep: optional (B,) bool, False for samples without a reference in a mixed batch; their
        deltas are zero. Training dropout drops further samples the same way.
        """
        if features is None:
            return None
        if features.dim() != 2 or features.shape[1] != self.in_dim:
            raise ValueError(f"speaker features must be (B, {self.in_dim}), got {tuple(features.shape)}")
        h = self.mlp(features.to(self.heads[0].weight.dtype))  # (B, hidden)
        deltas = torch.stack([head(h) for head in self.heads], dim=1)  # (B, L, rows*D)
        if self.training and self.dropout > 0:
            dropped = torch.rand(features.shape[0], device=features.device) < self.dropout
            keep = ~dropped if keep is None else keep & ~dropped
        if keep is not None:
            deltas = deltas * keep.to(deltas.dtype)[:, None, None]
        return deltas


# -----------------------------------------------------------------------------------------------
# files: safetensors + JSON metadata (never a pickle: these files are shared on model hubs)

FORMAT = "speakerbox.speaker_adaln.v1"


def save_adaln(module, path, *, state=None, config=None, data_config=None, speaker_fingerprint=""):
    """Write `module` (or `state`, its state dict, e.g. fp32 masters) to `path` as safetensors with
    what is needed to rebuild and to sample from it in the metadata: the shape (`adaln`), the
    speaker extractors and their fingerprint, the run config and the config that prepared the
    training data (its codec, text encoder and extractors are the ones sampling must use)."""
    state = state if state is not None else module.state_dict()
    shape = {"in_dim": module.in_dim, "num_blocks": module.num_blocks, "dim": module.dim, "rows": module.rows,
             "hidden": module.mlp[0].out_features}
    meta = {"format": FORMAT, "adaln": shape, "speaker_fingerprint": speaker_fingerprint}
    if config is not None:
        meta["config"] = config
        meta["speaker_extractors"] = config.get("speaker_extractors", [])
    if data_config is not None:
        meta["data_config"] = data_config
    return files.save_safetensors(state, path, metadata=meta)


def _parsed(path, meta):
    """An adaln.safetensors' metadata with its JSON values parsed."""
    try:
        return {k: v if k in ("format", "speaker_fingerprint") else json.loads(v) for k, v in meta.items()}
    except json.JSONDecodeError as e:
        raise files.BadFile(f"{path}: a metadata value is not valid JSON ({e})") from None


def read_adaln_file(path):
    """(state dict, metadata with the JSON values parsed) of an adaln.safetensors, or of an older
    torch file (`adaln.pt`) that loads without unpickling code (files.torch_load refuses the rest)."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        obj = files.torch_load(path)
        if not isinstance(obj, dict):
            raise files.BadFile(f"{path}: not a SpeakerAdaLNZero file (a {type(obj).__name__}, not a dict)")
        state = next((obj[k] for k in ("state_dict", "state", "adaln", "model") if isinstance(obj.get(k), dict)), obj)
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise files.BadFile(f"{path}: not a SpeakerAdaLNZero file (no state dict of tensors inside)")
        files.check_finite(state, path)
        return state, {k: obj[k] for k in ("config", "speaker_extractors") if k in obj}
    return files.load_safetensors(path), _parsed(path, files.read_safetensors_metadata(path))


def read_adaln_metadata(path):
    """The parsed metadata alone (an adaln.safetensors' header; an old torch file is read whole)."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        return _parsed(path, files.read_safetensors_metadata(path))
    return read_adaln_file(path)[1]


def load_adaln(path, rows=None):
    """(SpeakerAdaLNZero in eval mode, metadata) of a file (`read_adaln_file`, `adaln_from_state`)."""
    state, meta = read_adaln_file(path)
    return adaln_from_state(state, meta, path, rows), meta


def adaln_from_state(state, meta, path, rows=None):
    """The SpeakerAdaLNZero (eval mode) holding `state`. The sizes come from the tensors; `rows`
    (modulation rows per block) from the metadata, else the argument (an old `adaln.pt` does not
    record it). Errors name the file `path`."""
    if "mlp.0.weight" not in state or "heads.0.weight" not in state:
        raise files.BadFile(f"{path}: no SpeakerAdaLNZero tensors (mlp.0.weight, heads.N.weight) inside")
    hidden, in_dim = state["mlp.0.weight"].shape
    num_blocks = len([k for k in state if k.startswith("heads.") and k.endswith(".weight")])
    width = state["heads.0.weight"].shape[0]
    rows = (meta.get("adaln") or {}).get("rows", rows)
    if not rows or width % rows:
        raise ValueError(f"{path}: heads of width {width} are not {rows} modulation rows of one width")
    module = SpeakerAdaLNZero(in_dim, num_blocks, width // rows, rows=rows, hidden=hidden)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: tensors do not match a SpeakerAdaLNZero: {str(e).splitlines()[0]}") from None
    return module.eval()
