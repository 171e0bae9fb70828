"""The shape of the code, measured: lines per file, longest functions, imports that climb up a
layer, and repeated blocks. Reads the files only (no imports, nothing runs).

    python benchmarks/house.py                 # this checkout
    python benchmarks/house.py --root=DIR      # another checkout (e.g. a git worktree of an older commit)

Layers, lowest first; a module may import its own layer or lower ones. An import of a higher layer
(also inside a function) is "climbing up"; an entry point imported by anything but the one allowed
pair (eval.py uses sample.py's flags and loaders) is counted too. Modules absent from LAYERS are listed
as unlayered, so the table below is kept honest as files are added.
One home per concept: places that define or hand-roll a concept (CONCEPTS), one line each.
Repeated blocks: windows of MIN_BLOCK consecutive code lines (comments, blank lines, imports and
lone brackets dropped, white space folded) that occur at more than one place in the top-level
modules, merged into maximal runs.
"""

import argparse
import ast
import os
import re
from collections import defaultdict

LAYERS = [
    ("foundation", ["config", "files"]),  # run config, artefact IO: import nothing of the repo
    ("components", ["layers", "codec", "text", "speaker", "dnsmos", "losses", "voice_encoder", "audio",
                    "duration", "reference", "intervals", "report"]),
    ("model", ["model"]),  # the DiT
    ("model wrappers", ["lora", "adaln", "encoders"]),  # wrap or feed the DiT
    ("sampling", ["sampler", "av_sampler"]),  # the denoising loops and sample()
    ("data", ["data", "corpus", "judge"]),  # datasets and the corpus / judge they are checked with
    ("entry points", ["train", "train_sv", "sample", "merge", "eval", "pipeline"]),
]
ENTRY_POINTS = {"train", "train_sv", "sample", "merge", "eval", "pipeline"}
ALLOWED_ENTRY_IMPORTS = {("eval", "sample")}
# concepts that should have one home each: how many places define or hand-roll them
CONCEPTS = {
    "16 kHz as a literal": r"\b16_?000\b",
    "dtype tables (DTYPES = ...)": r"^\s*DTYPES\s*=",
    "atomic writes (os.replace)": r"os\.replace\(",
    "resamplers (def ...resample...)": r"^\s*def \w*resample\w*\(",
    "file checks (def _check_file)": r"^\s*def _?check_file\(",
    "sigma shifts (def shift_for_tokens)": r"^\s*def \w*shift_for_tokens\(",
    "preset tables (...PRESETS = {)": r"^\w*PRESETS\s*=\s*\{",
}
LONG_FUNCTION = 40  # lines
MIN_BLOCK = 6  # lines


def modules(root):
    """{name: path} of the top-level .py modules of the repository."""
    return {f[:-3]: os.path.join(root, f) for f in sorted(os.listdir(root)) if f.endswith(".py")}


def line_counts(root):
    """{relative path: lines} of every .py file at the top level, in tests/ and in benchmarks/."""
    out = {}
    for sub in ("", "tests", "benchmarks"):
        d = os.path.join(root, sub)
        for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            if f.endswith(".py"):
                with open(os.path.join(d, f), encoding="utf-8") as fh:
                    out[os.path.join(sub, f)] = sum(1 for _ in fh)
    return out


def functions(path):
    """[(lines, qualified name)] of every function and method in the file."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    out = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((child.end_lineno - child.lineno + 1, prefix + child.name))
                visit(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
    visit(tree, "")
    return out


def imports(path, names):
    """Repository modules among `names` that the file imports anywhere (top level or in a function)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(names)


def climbing(mods):
    """(edges that climb up, entry points imported by others, unlayered modules)."""
    layer = {m: i for i, (_, ms) in enumerate(LAYERS) for m in ms}
    up, entry, unlayered = [], [], sorted(m for m in mods if m not in layer)
    for m, path in mods.items():
        for dep in sorted(imports(path, mods) - {m}):
            if dep in ENTRY_POINTS and (m, dep) not in ALLOWED_ENTRY_IMPORTS:
                entry.append(f"{m} -> {dep}")
            elif m in layer and dep in layer and layer[dep] > layer[m]:
                up.append(f"{m} ({LAYERS[layer[m]][0]}) -> {dep} ({LAYERS[layer[dep]][0]})")
    return up, entry, unlayered


SKIP_LINE = re.compile(r"^\s*(#|import |from \S+ import |[)\]}]+,?$|$)")


def code_lines(path):
    """[(line number, folded text)] of the lines that count for repetition."""
    out = []
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        if not SKIP_LINE.match(line) and not line.strip().startswith(('"""', "'''")):
            out.append((n, " ".join(line.split())))
    return out


def repeated_blocks(mods):
    """[(lines, [(module, first line), ...])]: maximal runs of >= MIN_BLOCK code lines found again elsewhere."""
    lines = {m: code_lines(p) for m, p in mods.items()}
    where = defaultdict(list)
    for m, ls in lines.items():
        for i in range(len(ls) - MIN_BLOCK + 1):
            where["\n".join(t for _, t in ls[i:i + MIN_BLOCK])].append((m, i))
    repeated = {(m, i) for places in where.values() if len(places) > 1 for m, i in places}
    runs = []
    for m, ls in lines.items():
        i = 0
        while i < len(ls):
            if (m, i) not in repeated:
                i += 1
                continue
            j = i
            while (m, j + 1) in repeated:
                j += 1
            runs.append((j - i + MIN_BLOCK, m, ls[i][0]))
            i = j + 1
    return sorted(runs, reverse=True)


def concept_counts(mods):
    """{concept: [module:line, ...]} of the places matching each CONCEPTS pattern."""
    out = {}
    for concept, pattern in CONCEPTS.items():
        rx = re.compile(pattern)
        out[concept] = [f"{m}:{n}" for m, p in mods.items()
                        for n, line in enumerate(open(p, encoding="utf-8"), 1) if rx.search(line)]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    mods = modules(args.root)
    counts = line_counts(args.root)
    top_level = {k: v for k, v in counts.items() if os.sep not in k}
    print(f"lines: {sum(top_level.values()):,} in {len(top_level)} top-level modules, "
          f"{sum(v for k, v in counts.items() if k.startswith('tests')):,} in tests, "
          f"{sum(v for k, v in counts.items() if k.startswith('benchmarks')):,} in benchmarks")
    print("  " + ", ".join(f"{k} {v}" for k, v in sorted(top_level.items(), key=lambda kv: -kv[1])))
    funcs = sorted(((n, f"{m}.{name}") for m, p in mods.items() for n, name in functions(p)), reverse=True)
    long = [f for f in funcs if f[0] > LONG_FUNCTION]
    print(f"functions: {len(funcs)}, of which {len(long)} longer than {LONG_FUNCTION} lines; longest:")
    print("  " + ", ".join(f"{name} {n}" for n, name in funcs[:args.top]))
    up, entry, unlayered = climbing(mods)
    print(f"imports that climb up a layer: {len(up)}" + "".join(f"\n  {e}" for e in up))
    print(f"entry points imported by another module: {len(entry)}" + "".join(f"\n  {e}" for e in entry))
    if unlayered:
        print(f"unlayered modules (add them to LAYERS): {', '.join(unlayered)}")
    print("one home per concept (places in the top-level modules):")
    for concept, places in concept_counts(mods).items():
        print(f"  {concept}: {len(places)}" + (f" ({', '.join(places)})" if 1 < len(places) <= 8 else ""))
    runs = repeated_blocks(mods)
    print(f"repeated blocks of >= {MIN_BLOCK} code lines: {len(runs)} runs, {sum(r[0] for r in runs)} lines; longest:")
    print("  " + ", ".join(f"{m}.py:{line} ({n} lines)" for n, m, line in runs[:args.top]))


if __name__ == "__main__":
    main()
