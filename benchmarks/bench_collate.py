"""A training batch from a prepared cache: items held in memory (data.HOLD_CACHE_BYTES) vs read from disk.

    ./run.sh configs/tiny.yaml                              # once: makes the tiny preset's caches
    python benchmarks/bench_collate.py                      # its base cache, batches of 16, 40 rounds
    python benchmarks/bench_collate.py --cache cache/tiny --split train --rounds 100

Times: `data.collate` of 10 global batches (16 items and their partners each), the held dataset (every item
read once before timing) against the same cache read from disk at every use, alternating per round
(timing.py); the ratio held / disk is the median of per-round ratios, with its spread and the load.
Memory: the peak RSS growth of reading every item once, each variant in a fresh process
(peak_rss.py): what holding the cache costs. Also checks that both give the same batch.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import peak_rss  # noqa: E402
import timing  # noqa: E402
from config import load_config  # noqa: E402


def dataset(args, held):
    cfg = load_config([args.config])
    ds = data.CachedDataset(os.path.join(args.cache, args.split), cfg)
    if not held:
        ds.held = None
    elif ds.held is None:
        raise SystemExit(f"{args.cache}/{args.split}: larger than data.HOLD_CACHE_BYTES, never held")
    return ds


def read_all(ds):
    for i in range(len(ds)):
        ds.load(i)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--cache", default="cache/tiny/base")
    p.add_argument("--split", default="train")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--per_round", type=int, default=10, help="batches timed together per round (one is ~4-20 ms)")
    p.add_argument("--rss-of", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.cache, args.split, "index.json")):
        raise SystemExit(f"{args.cache}/{args.split}: no prepared cache; run ./run.sh configs/tiny.yaml first")
    if args.rss_of:
        ds = dataset(args, held=args.rss_of == "held")
        ds.load(0)  # imports and first-read costs out of the measurement
        peak_rss.print_step_growth(lambda: read_all(ds))
        return
    torch.set_num_threads(1)
    held, disk = dataset(args, held=True), dataset(args, held=False)
    read_all(held)
    sampler = data.BatchSampler(held, args.batch, seed=0)
    batches = [sampler.next_batch() for _ in range((args.rounds + 1) * args.per_round)]
    a, b = data.collate(held, batches[0], held.cfg), data.collate(disk, batches[0], disk.cfg)
    assert all(torch.equal(v, b[k]) for k, v in a.items() if isinstance(v, torch.Tensor)), "batches differ"
    state = {"held": iter(batches), "disk": iter(batches)}

    def step(name, ds):
        return lambda: [data.collate(ds, next(state[name]), ds.cfg) for _ in range(args.per_round)]

    steps = {"held": step("held", held), "disk": step("disk", disk)}
    before = timing.load()
    times = timing.paired_times(steps, args.rounds)
    after = timing.load()
    print(f"{args.cache}/{args.split}: {len(held)} items, batches of {args.batch}")
    print(timing.describe("ratio held/disk, batches", timing.ratios(times["held"], times["disk"])))
    for v in steps:
        print(timing.describe(f"{v:4s} ms/batch", times[v], scale=1e3 / args.per_round, fmt=".1f"))
    print(timing.load_line(before, after, 1))
    flags = ["--config", args.config, "--cache", args.cache, "--split", args.split]
    for v in steps:
        rss = peak_rss.rss_child(__file__, v, flags)
        print(f"{v:4s} peak RSS growth reading every item once: {rss / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
