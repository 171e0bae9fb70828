"""adaln.py: size at the 22B config, identity at init, and how the deltas act on model.AudioDiT."""

import copy

import pytest
import torch

import model
from adaln import SpeakerAdaLNZero


def test_param_count_22b_on_meta():
    """2176-d features, 48 blocks of 9 x 2048 rows: 455,246,848 parameters (LAIONBox v0.4's card)."""
    cfg = model.PRESETS["ltx23_audio"]
    with torch.device("meta"):
        net = SpeakerAdaLNZero(2176, cfg.num_layers, cfg.dim, rows=cfg.ada_rows, hidden=512)
    assert sum(p.numel() for p in net.parameters()) == 455_246_848
    assert net.heads[0].weight.shape == (9 * 2048, 512)


def _dit_and_inputs(B=2):
    torch.manual_seed(0)
    cfg = model.PRESETS["micro"]
    dit = model.AudioDiT(cfg)
    with torch.no_grad():  # a trained-looking backbone: the zero init would hide everything
        for p in dit.parameters():
            p.normal_(0, 0.2)
    T, L = 6, 5
    inputs = dict(x=torch.randn(B, T, cfg.in_channels), sigma=torch.rand(B),
                  context=torch.randn(B, L, cfg.cross_attention_dim))
    return dit, inputs


def _adaln_for(dit, in_dim=12, **kw):
    cfg = dit.cfg
    return SpeakerAdaLNZero(in_dim, cfg.num_layers, cfg.dim, rows=cfg.ada_rows, **kw)


def test_identity_at_init():
    """Fresh heads give zero deltas, and the DiT with them equals the DiT without any."""
    dit, inputs = _dit_and_inputs()
    net = _adaln_for(dit)
    deltas = net(torch.randn(2, 12))
    assert deltas.shape == (2, dit.cfg.num_layers, dit.cfg.ada_rows * dit.cfg.dim)
    assert torch.count_nonzero(deltas) == 0
    with torch.no_grad():
        assert torch.equal(dit(**inputs, block_deltas=deltas), dit(**inputs))
    assert net(None) is None


def test_delta_shifts_every_modulation_row():
    """A delta for block i acts as an addition to that block's 9-row scale-shift table: a DiT copy
    with the (single-sample) deltas folded into its tables gives the same output."""
    dit, inputs = _dit_and_inputs(B=1)
    net = _adaln_for(dit)
    with torch.no_grad():
        for head in net.heads:
            head.weight.normal_(0, 0.05)
            head.bias.normal_(0, 0.05)
        deltas = net(torch.randn(1, 12))
        folded = copy.deepcopy(dit)
        for i, block in enumerate(folded.transformer_blocks):
            block.audio_scale_shift_table += deltas[0, i].view(dit.cfg.ada_rows, dit.cfg.dim)
        want = folded(**inputs)
        got = dit(**inputs, block_deltas=deltas)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, dit(**inputs).detach(), atol=1e-3)


def test_gradients_reach_only_the_adaln():
    """Frozen DiT: no DiT parameter gets a gradient; the zero heads do at once, and the MLP does
    as soon as the heads are non-zero."""
    dit, inputs = _dit_and_inputs()
    dit.requires_grad_(False)
    net = _adaln_for(dit)
    features = torch.randn(2, 12)
    dit(**inputs, block_deltas=net(features)).square().mean().backward()
    assert all(p.grad is None for p in dit.parameters())
    assert all(head.weight.grad.abs().sum() > 0 for head in net.heads)
    assert all(p.grad.abs().sum() == 0 for p in net.mlp.parameters())  # zero heads block it at init

    torch.optim.SGD(net.parameters(), lr=1.0).step()
    net.zero_grad()
    dit(**inputs, block_deltas=net(features)).square().mean().backward()
    assert all(p.grad.abs().sum() > 0 for p in net.mlp.parameters())


def test_speaker_dropout_and_keep():
    torch.manual_seed(0)
    net = SpeakerAdaLNZero(4, num_blocks=2, dim=3, rows=9, dropout=0.5)
    with torch.no_grad():
        for head in net.heads:
            head.bias.fill_(1.0)
    features = torch.randn(64, 4)
    zero = lambda d: (d.flatten(1) == 0).all(1)  # noqa: E731 - per-sample "no speaker"
    dropped = zero(net.train()(features))
    assert 16 < dropped.sum() < 48  # about half of the samples, whole vectors at a time
    assert not zero(net.eval()(features)).any()  # never at eval
    keep = torch.arange(64) % 2 == 0
    assert torch.equal(zero(net(features, keep=keep)), ~keep)
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        net(torch.randn(2, 5))
