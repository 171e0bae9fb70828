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

import torch
import torch.nn as nn


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
