"""The bf16 freeze (Adam steps below half a bf16 spacing round to nothing): reproduced with plain
bf16 AdamW, fixed by fp32 master weights; and the bucketed gradient all-reduce over 2 gloo ranks."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from config import Config
from train import MasterWeights, allreduce_grads, make_optimizer, weight_change


def _lora_like(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = 0.01 + 0.002 * torch.randn(64, 64, generator=g)  # LoRA-sized values near 0.01
    return torch.nn.Parameter(w.to(torch.bfloat16))


def _grads(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, 64, generator=g).to(torch.bfloat16) for _ in range(steps)]


def test_bf16_adamw_freezes_and_masters_fix_it():
    steps, lr = 20, 1e-5
    # plain bf16 AdamW: an Adam step is ~lr = 1e-5, below half the bf16 spacing near 0.01 (6.1e-5)
    p = _lora_like()
    start = p.detach().clone()
    opt = torch.optim.AdamW([p], lr=lr, weight_decay=0.0)
    for g in _grads(steps):
        p.grad = g.clone()
        opt.step()
    frozen_frac = (p.detach() == start).float().mean().item()
    assert frozen_frac > 0.5, f"expected most bf16 updates to vanish, {frozen_frac:.2f} unchanged"

    # fp32 masters: the same updates accumulate and reach the bf16 weights
    q = _lora_like()
    masters = MasterWeights([q], offload=True)
    opt = torch.optim.AdamW(masters.masters, lr=lr, weight_decay=0.0)
    for g in _grads(steps):
        q.grad = g.clone()
        masters.grads_to_masters()
        opt.step()
        masters.masters_to_params()
    # the masters moved by ~steps*lr everywhere; the bf16 copy follows wherever that crosses a ULP
    master_moved = (masters.masters[0].detach() != start.float()).float().mean().item()
    assert master_moved > 0.99
    changed = (q.detach() != start).float().mean().item()
    assert changed > 1 - frozen_frac + 0.2, (changed, frozen_frac)
    # and equals an fp32 AdamW run on the same data, rounded
    r = torch.nn.Parameter(start.float().clone())
    opt = torch.optim.AdamW([r], lr=lr, weight_decay=0.0)
    for g in _grads(steps):
        r.grad = g.float()
        opt.step()
    assert torch.equal(q.detach(), r.detach().to(torch.bfloat16))


def test_make_optimizer_is_fused_and_steps_like_the_loop_adamw():
    """train.make_optimizer's AdamW is fused (one kernel over every tensor, ~4x faster on CPU than
    torch's default loop) and makes the loop's updates; with bf16 params it steps the fp32 masters."""
    cfg = Config(lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(32, 16, generator=g), torch.randn(16, generator=g)]
    grads = [[torch.randn(t.shape, generator=g) for t in start] for _ in range(10)]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    loop = [torch.nn.Parameter(t.clone()) for t in start]
    masters, opt = make_optimizer(cfg, ours)
    assert masters is None and opt.defaults["fused"]
    ref = torch.optim.AdamW(loop, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, foreach=False)
    for step in grads:
        for params, o in ((ours, opt), (loop, ref)):
            for p, grad in zip(params, step):
                p.grad = grad.clone()
            o.step()
    for a, b, t in zip(ours, loop, start):
        assert (a - b).abs().max() < 1e-6 and (a - t).abs().mean() > 1e-3  # the same updates, and they moved
    low = [torch.nn.Parameter(t.to(torch.bfloat16)) for t in start]
    masters, opt = make_optimizer(cfg, low)
    assert masters is not None and opt.defaults["fused"] and opt.param_groups[0]["params"][0].dtype == torch.float32


def test_weight_change_report_flags_frozen_tensors():
    a = torch.nn.Parameter(torch.ones(10))
    b = torch.nn.Parameter(torch.ones(10))
    named = [("blocks.0.lora_A.weight", a), ("blocks.0.lora_B.weight", b)]
    init = {n: p.detach().clone() for n, p in named}
    with torch.no_grad():
        a[:3] += 1
    report = weight_change(named, init)
    assert report["lora_A"]["changed_pct"] == 30.0
    assert report["lora_B"]["changed_pct"] == 0.0
    assert report["lora_A"]["hash"] != report["lora_B"]["hash"]


def test_allreduce_single_process_is_identity():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    allreduce_grads([p], world=1)
    assert torch.equal(p.grad, torch.full((3,), 2.0))


# (shape, dtype) of the params averaged below; with bucket_numel=8 the first two share a bucket,
# the third (bf16) and the fourth share a second one, the fifth fills a third on its own
SHAPES = [((5,), torch.float32), ((3, 4), torch.float32), ((7,), torch.bfloat16), ((2,), torch.float32),
          ((9,), torch.float32)]


def _rank_grads(rank):
    """Rank `rank`'s gradients; the fourth param has none on rank 0 (it counts as zeros there)."""
    g = torch.Generator().manual_seed(100 + rank)
    grads = [torch.randn(shape, generator=g).to(dtype) for shape, dtype in SHAPES]
    if rank == 0:
        grads[3] = None
    return grads


def _allreduce_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        params = [torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape, dtype in SHAPES]
        for p, grad in zip(params, _rank_grads(rank)):
            p.grad = grad
        allreduce_grads(params, world, bucket_numel=8)
        torch.save([p.grad for p in params], f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_allreduce_averages_in_buckets_over_two_gloo_ranks(tmp_path):
    """Each rank ends with the fp32 mean of both ranks' gradients, in its param's dtype, across
    several buckets; a missing gradient counts as zeros."""
    mp.spawn(_allreduce_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    per_rank = [_rank_grads(r) for r in range(2)]
    want = []
    for (shape, dtype), g0, g1 in zip(SHAPES, *per_rank):
        g0 = torch.zeros(shape) if g0 is None else g0.float()
        want.append(((g0 + g1.float()) / 2).to(dtype))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for w, g in zip(want, got):
            assert g.dtype == w.dtype and torch.equal(g, w)
