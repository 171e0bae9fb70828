"""losses.py: the σ sampler against the analytic law of ltx-trainer's sampler, the flow loss against
torch's mse_loss, and the two balancers against hand-computed scripted sequences (CPU, fp32)."""

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import losses  # noqa: E402


def normal_cdf(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def logit(p):
    return math.log(p / (1 - p))


def reference_cdf(s, n_tokens, eps=1e-3, uniform_prob=0.1, mu_offset=0.0):
    """P(σ ≤ s) of ltx-trainer's ShiftedLogitNormalTimestepSampler (Lightricks/LTX-2,
    packages/ltx-trainer/src/ltx_trainer/timestep_samplers.py), derived on paper for eps ≤ s < 1:
    Y = (sigmoid(Z) - lo) / (hi - lo), Z ~ N(μ, 1), lo/hi = sigmoid(μ - 2.5758), sigmoid(μ + 3.0902);
    reflection Y → 2·eps - Y below eps gives P(Y ≤ s) - P(Y < 2·eps - s); mixed with U[eps, 1).
    mu_offset: speakerbox's shift of μ (ltx-trainer's law at 0)."""
    mu = min(0.95 + 1.1 * (n_tokens - 1024) / 3072, 2.05) + mu_offset
    lo, hi = 1 / (1 + math.exp(-(mu - 2.5758))), 1 / (1 + math.exp(-(mu + 3.0902)))

    def p_y_below(y):
        u = lo + y * (hi - lo)
        return 0.0 if u <= 0 else 1.0 if u >= 1 else normal_cdf(logit(u) - mu)

    stretched = p_y_below(s) - p_y_below(2 * eps - s)
    uniform = min(max((s - eps) / (1 - eps), 0.0), 1.0)
    return (1 - uniform_prob) * stretched + uniform_prob * uniform


def test_shift_for_tokens():
    assert losses.shift_for_tokens(1024) == pytest.approx(0.95)
    assert losses.shift_for_tokens(4096) == pytest.approx(2.05)
    assert losses.shift_for_tokens(2560) == pytest.approx(1.5)
    assert losses.shift_for_tokens(8192) == pytest.approx(0.95 + 7168 * 1.1 / 3072)  # no cap, as ltx-trainer
    assert losses.shift_for_tokens(250) == pytest.approx(0.95 - 774 * 1.1 / 3072)  # 10 s of audio


@pytest.mark.parametrize("n_tokens", [250, 1024, 4096])
def test_sigma_sampler_follows_the_reference_law(n_tokens):
    g = torch.Generator().manual_seed(0)
    sigma = losses.sample_sigma(200_000, n_tokens, generator=g)
    assert sigma.shape == (200_000,) and sigma.dtype == torch.float32
    assert sigma.min() >= 1e-3 and sigma.max() <= 1  # reflection keeps every σ ≥ eps
    grid = [0.0011, 0.002, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.97, 0.999]
    empirical = [(sigma <= s).float().mean().item() for s in grid]
    expected = [reference_cdf(s, n_tokens) for s in grid]
    # Kolmogorov–Smirnov: 1.95/sqrt(n) ≈ 0.0044 is the 0.1% critical value
    assert max(abs(e - x) for e, x in zip(empirical, expected)) < 0.0044
    # reflection doubles the density just above eps: no hole between eps and 2·eps
    assert ((sigma > 1e-3) & (sigma < 2e-3)).float().mean() > 0


@pytest.mark.parametrize("mu_offset", [1.0, -0.5])
def test_sigma_mu_offset_moves_the_law(mu_offset):
    """mu_offset shifts μ of the same law (stretch bounds included), and 0 leaves ltx-trainer's draws untouched."""
    sigma = losses.sample_sigma(200_000, 250, generator=torch.Generator().manual_seed(0), mu_offset=mu_offset)
    grid = [0.002, 0.05, 0.2, 0.5, 0.7, 0.9, 0.97, 0.999]
    empirical = [(sigma <= s).float().mean().item() for s in grid]
    assert max(abs(reference_cdf(s, 250, mu_offset=mu_offset) - e) for s, e in zip(grid, empirical)) < 0.0044
    plain = losses.sample_sigma(200_000, 250, generator=torch.Generator().manual_seed(0))
    assert (sigma.median() > plain.median()) == (mu_offset > 0)
    zero = losses.sample_sigma(200_000, 250, generator=torch.Generator().manual_seed(0), mu_offset=0.0)
    assert torch.equal(plain, zero)


def test_sigma_mean_rises_with_token_count():
    means = [losses.sample_sigma(50_000, n, generator=torch.Generator().manual_seed(1)).mean().item()
             for n in (250, 1024, 2560, 4096, 8192)]
    assert means[0] < means[1] < means[2] < means[3] < means[4]  # no cap at 4096 tokens, as ltx-trainer
    with pytest.raises(ValueError, match="100000 tokens"):
        losses.sample_sigma(4, 100_000)


def test_sigma_modes_and_determinism():
    a = losses.sample_sigma(64, 300, generator=torch.Generator().manual_seed(5))
    b = losses.sample_sigma(64, 300, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    u = losses.sample_sigma(100_000, 300, mode="uniform", generator=torch.Generator().manual_seed(5))
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.005
    assert torch.equal(losses.sample_sigma(3, 300, mode="fixed", fixed_value=0.25), torch.full((3,), 0.25))
    with pytest.raises(ValueError, match="unknown mode 'logit'"):
        losses.sample_sigma(3, 300, mode="logit")


def test_av_sigmas_independent_or_shared():
    g = torch.Generator().manual_seed(2)
    sv, sa = losses.sample_av_sigmas(100_000, 4096, 250, independent=True, generator=g)
    assert not torch.equal(sv, sa)
    assert abs(torch.corrcoef(torch.stack([sv, sa]))[0, 1].item()) < 0.02  # independent draws
    for sigma, n in ((sv, 4096), (sa, 250)):  # each shifted by its own token count
        for s in (0.1, 0.5, 0.9):
            assert abs((sigma <= s).float().mean().item() - reference_cdf(s, n)) < 0.006
    sv, sa = losses.sample_av_sigmas(16, 4096, 250, independent=False, generator=g)
    assert torch.equal(sv, sa)


def test_flow_loss_matches_mse_over_kept_tokens():
    g = torch.Generator().manual_seed(0)
    B, T, C = 3, 7, 5
    v, x0, eps = (torch.randn(B, T, C, generator=g) for _ in range(3))
    mask = torch.rand(B, T, generator=g) > 0.4
    mask[0, :] = True
    mask[2, :] = False  # a sample whose tokens are all reference/padding
    loss = losses.flow_loss(v, x0, eps, mask)
    assert loss.shape == (B,)
    for i in range(2):
        ref = F.mse_loss(v[i][mask[i]], (eps - x0)[i][mask[i]])
        torch.testing.assert_close(loss[i], ref)
    assert loss[2] == 0
    torch.testing.assert_close(losses.flow_loss(v, x0, eps), F.mse_loss(v, eps - x0, reduction="none").mean((1, 2)))
    # gradient flows to v_pred only through the kept tokens
    v.requires_grad_(True)
    losses.flow_loss(v, x0, eps, mask).sum().backward()
    assert torch.all(v.grad[~mask] == 0) and torch.all(v.grad[mask] != 0)


def test_sigma_bucket_losses():
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    sigma = torch.tensor([0.05, 0.15, 0.5, 1.0, 0.8])
    assert losses.sigma_bucket_losses(loss, sigma) == {"0.0-0.2": 1.5, "0.4-0.6": 3.0, "0.8-1.0": 4.5}


# -----------------------------------------------------------------------------------------------
# balancers: scripted sequences with expected values worked out by hand in the comments


def test_adaptive_coefficients_scripted_sequence():
    c = losses.AdaptiveCoefficients({"speaker": 1 / 12, "dnsmos": 1 / 12}, cap=20.0, decay=0.95)
    # step 1: EMAs start at the first values: flow 1, speaker 0.5, dnsmos |-1e-4|
    # c_speaker = (1/12)·1/0.5 = 0.1666667; c_dnsmos = (1/12)·1/1e-4 = 833 → cap 20
    coefs = c.update(1.0, {"speaker": 0.5, "dnsmos": -1e-4})
    assert coefs["speaker"] == pytest.approx(1 / 6) and coefs["dnsmos"] == 20.0
    # step 2: flow 2 → ema 0.95 + 0.1 = 1.05; speaker NaN dropped and counted;
    # dnsmos 0.2 → ema 0.95e-4 + 0.01 = 0.010095, c = (1/12)·1.05/0.010095 = 8.6676573
    coefs = c.update(2.0, {"speaker": float("nan"), "dnsmos": 0.2})
    assert set(coefs) == {"dnsmos"} and coefs["dnsmos"] == pytest.approx(8.6676573)
    assert c.dropped == {"speaker": 1, "dnsmos": 0}
    # apply: this step's losses weighted with the coefficients of the EMAs so far (flow 1.05,
    # speaker 0.5 since its NaN was dropped): c_speaker = (1/12)·1.05/0.5 = 0.175; dnsmos Inf is
    # dropped and counted, total = flow + c·speaker only
    state = c.state_dict()
    flow = torch.tensor(1.0, requires_grad=True)
    spk = torch.tensor(0.3, requires_grad=True)
    total, coefs = c.apply(flow, {"speaker": spk, "dnsmos": torch.tensor(float("inf"))})
    assert coefs == {"speaker": pytest.approx(0.175)}
    assert total.item() == pytest.approx(1.0 + 0.175 * 0.3)
    total.backward()  # the coefficient is a number: d total / d speaker = c, d total / d flow = 1
    assert flow.grad.item() == 1.0 and spk.grad.item() == pytest.approx(0.175)
    assert c.dropped == {"speaker": 1, "dnsmos": 1}
    # step 3's update: flow 1 → ema 0.9975 + 0.05 = 1.0475; speaker 0.3 → ema 0.475 + 0.015 = 0.49,
    # c = (1/12)·1.0475/0.49 = 0.1781463
    assert c.update(1.0, {"speaker": 0.3}) == {"speaker": pytest.approx(0.1781463)}
    # a term without an EMA yet is logged but not in the loss
    fresh = losses.AdaptiveCoefficients({"speaker": 1 / 12})
    assert fresh.apply(flow, {"speaker": spk}) == (flow, {})
    # resume: a fresh object loaded from the state continues exactly as the original did
    resumed = losses.AdaptiveCoefficients({"speaker": 1 / 12, "dnsmos": 1 / 12})
    resumed.load_state_dict(state)
    assert resumed.update(1.0, {"speaker": 0.3}) == {"speaker": pytest.approx(0.1781463)}
    with pytest.raises(KeyError, match="clap"):
        c.update(1.0, {"clap": 0.1})


def test_ema_balancer_formula_dampens_boosts_and_resumes():
    b = losses.EMABalancer()  # target 0.33, decay 0.99, clamp [0.05, 20]
    # step 1: EMAs start at v 1, a 1 → w = 0.33
    assert b.update(1.0, 1.0) == pytest.approx(0.33)
    # step 2: a 3 → ema_a = 0.99 + 0.03 = 1.02 → w = 0.33/1.02 = 0.3235294
    assert b.update(1.0, 3.0) == pytest.approx(0.3235294)
    state = b.state_dict()
    # audio loss 2x video (LTX-2's usual): the weight falls below 1 — the balancer dampens
    seq = [(1.0, 2.0)] * 50 + [(1.0, 0.01)] * 800 + [(0.01, 50.0)] * 800
    weights = [b.update(v, a) for v, a in seq]
    assert weights[49] < 0.33
    assert max(weights[50:850]) == 20.0  # audio tiny: boosted up to the upper clamp
    assert min(weights[850:]) == 0.05  # audio huge: dampened down to the lower clamp
    # non-finite losses leave the state alone
    before = b.state_dict()
    b.update(float("nan"), 1.0)
    assert b.state_dict() == before
    # resume from step 2's state gives exactly the uninterrupted weights
    resumed = losses.EMABalancer()
    resumed.load_state_dict(state)
    assert [resumed.update(v, a) for v, a in seq] == weights
