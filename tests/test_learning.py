"""The speaker path learns, as an independent listener hears it.

configs/learn.yaml is the tiny recipe shortened to fit CI (4 voices, short stages, no ReFL): base
from scratch -> speaker-aware stage 1 -> merge -> stage 2 -> samples -> both judges. The samples
are scored by the GE2E encoder (voice_encoder.py), which no training path imports, against
centroids of the corpus's judge clips. The test fails when the unguided speaker path (`adaln`, no
speaker guidance) stops beating the baseline by a clear margin.

Thresholds, from seeds 0 / 1 / 2 of this config (tiny192, 160 + 100 + 40 steps, the preset's sampling;
records/2026-11-30_learning_test.md; the longer `tiny` version before it: records/2026-11-29_tiny_sv.md):

    unguided GE2E margin     0.087 / 0.089 / 0.083   -> at least 0.04 (the baseline's is exactly 0)
    unguided accuracy        0.562 / 0.750 / 0.750   -> not below the baseline's (chance, 0.25)
    guided accuracy          0.750 / 0.750 / 0.750   -> at least 0.5 (chance 0.25)

The margin is the mean over 32 samples of cos(own centroid) - mean cos(other centroids); its
standard error was 0.012-0.015 in earlier calibrations, so 0.04 is clear of a path that carries
nothing of the voice (0 on average) and about three standard errors under the lowest seed.
"""

import pytest

from conftest import learning_run

MARGIN = 0.04  # unguided (adaln) mean GE2E margin, under half the lowest of 3 seeds
GUIDED_ACCURACY = 0.5  # adaln_guided identification (chance 0.25), well under the 0.75 of 3 seeds


@pytest.fixture(scope="module")
def learned():
    """The GE2E scores of seen voices from `python pipeline.py configs/learn.yaml --seed=0 --cpu_threads=1`, which
    conftest.py starts in the background once pytest has collected this file (see learning_run)."""
    return learning_run()["ge2e"]["seen"]


def test_real_clips_are_recognised(learned):
    """The yardstick itself: held-out real clips of the 4 voices are told apart."""
    assert learned["real_val"]["accuracy"] == 1.0 and learned["real_val"]["margin"] > 0.1


def test_baseline_is_at_chance(learned):
    """Without a speaker path a prompt's sample is the same whatever the reference."""
    assert learned["baseline"]["accuracy"] == pytest.approx(0.25)
    assert learned["baseline"]["margin"] == pytest.approx(0.0, abs=1e-5)


def test_unguided_speaker_path_beats_the_baseline(learned):
    adaln, baseline = learned["adaln"], learned["baseline"]
    assert adaln["margin"] - baseline["margin"] >= MARGIN, adaln
    assert adaln["accuracy"] >= baseline["accuracy"] - 1e-9, adaln


def test_guided_speaker_path_identifies_the_voice(learned):
    assert learned["adaln_guided"]["accuracy"] >= GUIDED_ACCURACY, learned["adaln_guided"]
