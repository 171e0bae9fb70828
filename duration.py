"""How long to make a generation: DramaBox's duration estimate from the prompt, and the audio
latent count of a duration.

The estimate reads the words to be spoken out of a prompt (quoted spans, else the text after a
colon), budgets 14 characters a second (slower for short lines), pauses for sentence ends and
non-verbal cues, then pads it as DramaBox's server does. A component: imports nothing of the
repository.
"""

import re

TOKENS_PER_SECOND = 25  # audio latents per second (the VAE: hop 160 at 16 kHz, x4 in time)
CHARS_PER_SECOND = 14.0
# Seconds budgeted per non-verbal cue found anywhere in the prompt (a subset of DramaBox's table).
CUE_SECONDS = {
    r"\bsighs?\b": 0.8,
    r"\bgasps?\b": 0.5,
    r"\bpauses?\b": 0.5,
    r"\blaugh(?:s|ed|ing)?\b": 1.5,
}
_DOUBLE_QUOTED = re.compile(r'"([^"]+)"|\u201c([^\u201d]+)\u201d')
# A single-quoted span; an apostrophe followed by a letter (don't, it's) stays inside the span.
_SINGLE_QUOTED = re.compile(r"'((?:[^']|'(?![\s.,!?)\]]))+)'")


def spoken_text(prompt):
    """The words to be spoken: double-quoted spans, else single-quoted spans of more than 3 words
    (shorter ones are stage directions), else the text after the first colon, else the prompt."""
    spans = [a or b for a, b in _DOUBLE_QUOTED.findall(prompt)]
    if not spans:
        spans = [s for s in _SINGLE_QUOTED.findall(prompt) if len(s.split()) > 3]
    if spans:
        return " ".join(spans)
    if ":" in prompt:
        return prompt.split(":", 1)[1].strip()
    return prompt


def estimate_duration(prompt, multiplier=1.1):
    """Seconds of audio to generate for `prompt` (DramaBox's estimator).

    14 chars/s of spoken text (x0.6 under 40 chars, x0.8 under 80: short lines are spoken slower),
    +0.3 s per sentence end, + the cue budgets, +2 s, at least 3 s; then the server's
    `max(3, base * multiplier + 0.8)` safety pad, rounded to 0.1 s.
    """
    text = spoken_text(prompt)
    n = len(text)
    rate = CHARS_PER_SECOND * (0.6 if n < 40 else 0.8 if n < 80 else 1.0)
    seconds = n / rate + 0.3 * sum(text.count(c) for c in ".!?")
    seconds += sum(budget * len(re.findall(pat, prompt, re.IGNORECASE)) for pat, budget in CUE_SECONDS.items())
    base = max(3.0, round(seconds + 2.0, 1))
    return max(3.0, round(base * multiplier + 0.8, 1))


def n_latent_tokens(seconds):
    """Audio latents for `seconds` of audio: round(25 d)."""
    return max(1, round(TOKENS_PER_SECOND * seconds))
