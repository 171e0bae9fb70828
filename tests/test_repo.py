"""The repository stands alone: no tracked file reads or cites anything outside it.

A fork has only this tree, so a path that climbs out of it (to the parent directory), a team folder
beside it, or a document or ticket number it does not contain is a dead end there.
The patterns are spelt with character classes so that this file can scan itself.
"""

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OUTSIDE = {
    "path that climbs out of the repo": re.compile(r"(?<![\w.])\.\.[/\\]|[\"']\.\.[\"']"),
    "team folder beside the repo": re.compile(r"\b[s]hared/(?:ltx23|seeds)|[s]hared/[A-Z]+\.md"),
    "document not in the repo": re.compile(r"\b[S]PEC(?:\.md| *§)|\b[S]TYLE\.md"),
    "ticket number not in the repo": re.compile(r"\b[i]ssues? #?\d+|\([i]ssue\b", re.IGNORECASE),
}
TEXT_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".sh", ".txt", ".json", ".tsv", ".toml", ".cfg", ".ini", "")
SKIP_DIRS = {".git", ".venv", "runs", "__pycache__", ".pytest_cache"}


def tracked_files(root):
    """Files git tracks under `root`; in an unpacked archive without .git, every file but the skipped dirs."""
    if os.path.isdir(os.path.join(root, ".git")):
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
        return [p for p in out.decode().split("\0") if p]
    found = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in SKIP_DIRS]
        found += [os.path.relpath(os.path.join(d, f), root) for f in files]
    return found


def outside_references(root):
    """(path:line, what, text) for every line of a text file that refers outside the repo."""
    hits = []
    for rel in tracked_files(root):
        if not rel.endswith(TEXT_SUFFIXES) or not os.path.isfile(os.path.join(root, rel)):
            continue
        with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                hits += [(f"{rel}:{n}", what, line.strip()) for what, rx in OUTSIDE.items() if rx.search(line)]
    return hits


def test_no_file_refers_outside_the_repo():
    hits = outside_references(ROOT)
    assert not hits, "\n".join(f"{where}: {what}: {text}" for where, what, text in hits)


def test_each_kind_of_outside_reference_is_caught(tmp_path):
    """Each pattern fires on a planted line, and stays quiet on the plain-word version."""
    up = "." * 2  # the parent directory, spelt so that this file does not match itself
    planted = [f'path = "{up}/other/ltx23/config.json"', f'os.path.join(here, "{up}", "x")',
               "see the team folder " + "shared" + "/ltx23/README.md", "facts in " + "SPEC" + " §4",
               "style in " + "STYLE" + ".md", "fixed in " + "issue" + " 12", "a fix (" + "issue" + " 7)"]
    clean = ["16 kHz (the audio VAE's input rate)", "x_t = (1 - sigma) x0 + sigma eps", "shape (B, T, 128)",
             "av_sigma: shared reuses the video sigma", "raise ValueError(f'{path}: not a file')"]
    (tmp_path / "planted.py").write_text("\n".join(planted) + "\n")
    (tmp_path / "clean.md").write_text("\n".join(clean) + "\n")
    hits = outside_references(str(tmp_path))
    assert sorted(where for where, _, _ in hits) == sorted(f"planted.py:{n}" for n in range(1, len(planted) + 1))
