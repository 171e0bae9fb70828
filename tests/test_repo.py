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
    "team folder beside the repo": re.compile(
        r"\.\./[s]hared\b|\b[s]hared/(?:ltx23|seeds)|[s]hared/[A-Z]+\.md|[\"'][s]hared[\"']\s*,\s*[\"']ltx23"),
    "document not in the repo": re.compile(r"\b[S]PEC(?:\.md| *§)|\b[S]TYLE\.md"),
    "ticket number not in the repo": re.compile(r"\b[i]ssues? #?\d+|\([i]ssue\b", re.IGNORECASE),
}
SLASH_UP = re.compile(r"(?<![\w.])((?:\.\./)+)(?=[\w.-])")  # parent steps with a slash, then a name
JOIN_UP = re.compile(r"(?:[\"']\.\.[\"']\s*[,)]\s*)+")  # parent steps as os.path.join arguments
PARENTS = re.compile(r"\.parents\[(\d+)\]")  # the k-th parent folder of a pathlib path
TEXT_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".sh", ".txt", ".json", ".tsv", ".toml", ".cfg", ".ini", "")
SKIP_DIRS = {".git", ".venv", "runs", "__pycache__", ".pytest_cache"}


def climbs_out(rel, line):
    """Whether a relative path on this line of file `rel` climbs above the repository root: more
    `..` steps than the folders between the root and the file (a line that starts from
    `dirname(dirname(__file__))` starts one folder higher per extra dirname)."""
    depth = rel.count("/")
    if any(m.group(1).count("../") > depth for m in SLASH_UP.finditer(line)):
        return True
    base = depth - max(0, line.count("dirname(") - 1) if "__file__" in line else depth
    if any(m.group(0).count("..") > base for m in JOIN_UP.finditer(line)):
        return True
    return any(int(k) > depth for k in PARENTS.findall(line))


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
                if climbs_out(rel, line):
                    hits.append((f"{rel}:{n}", "path that climbs out of the repo", line.strip()))
    return hits


def test_no_file_refers_outside_the_repo():
    hits = outside_references(ROOT)
    assert not hits, "\n".join(f"{where}: {what}: {text}" for where, what, text in hits)


def test_each_kind_of_outside_reference_is_caught(tmp_path):
    """Each pattern fires on a planted line, and stays quiet on the plain-word version and on
    relative paths that stay inside the repository."""
    up = "." * 2  # the parent directory, spelt so that this file does not match itself
    planted = [f'path = "{up}/other/ltx23/config.json"', f"# runs with {up}/" + "shared beside it",
               f'os.path.join(ROOT, "{up}", "x")',
               "see the team folder " + "shared" + "/ltx23/README.md", "facts in " + "SPEC" + " §4",
               "style in " + "STYLE" + ".md", "fixed in " + "issue" + " 12", "a fix (" + "issue" + " 7)"]
    clean = ["16 kHz (the audio VAE's input rate)", "x_t = (1 - sigma) x0 + sigma eps", "shape (B, T, 128)",
             "av_sigma: shared reuses the video sigma", "raise ValueError(f'{path}: not a file')",
             f"# links and ./, {up}/ spellings name one file"]
    planted_sub = [f'os.path.join(os.path.dirname(os.path.abspath(__file__)), "{up}", "{up}", "shared")',
                   f'os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "{up}", "x")',
                   "Path(__file__).resolve().parents[" + "2]", f"[the code map]({up}/{up}/README.md)"]
    clean_sub = [f'sys.path.insert(0, os.path.join(os.path.dirname(__file__), "{up}"))',
                 "Path(__file__).resolve().parents[1]", f"[the code map]({up}/README.md)"]
    (tmp_path / "tests").mkdir()
    for name, lines in (("planted.py", planted), ("clean.md", clean), ("tests/planted.py", planted_sub),
                        ("tests/clean.py", clean_sub)):
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    hits = outside_references(str(tmp_path))
    want = [f"planted.py:{n}" for n in range(1, len(planted) + 1)]
    want += [f"tests/planted.py:{n}" for n in range(1, len(planted_sub) + 1)]
    assert sorted({where for where, _, _ in hits}) == sorted(want), hits
