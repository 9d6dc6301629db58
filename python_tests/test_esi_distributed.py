"""ESI under torch.distributed: 2 gloo processes on CPU, DDP and FSDP2, against the single process.

One spawn runs every check (process start-up dominates the cost). Each rank also computes the
single-process answer itself (a plain model copy, no collectives), so every comparison is local.
"""
import copy
import math
import os
import socket

import pytest
import torch

pytestmark = pytest.mark.distributed

PROMPTS = [f"Explain step by step how to do forbidden thing number {i}." for i in range(8)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _synthetic_selection_checks(rank, ws):
    """Distributed exact top-k on hand-made scores (many ties) vs the sort-based reference."""
    from upsafe_ext.esi import ESIScores
    from upsafe_ext.esi.dist import assign_owners
    from upsafe_ext.ops.esi import select_topk_reference

    g = torch.Generator().manual_seed(7)
    shapes = {"a": (7, 5), "b": (3, 11), "c": (1, 4), "d": (9, 2)}
    full = {n: (torch.rand(s, generator=g) * 6).floor() / 4 for n, s in shapes.items()}  # many exact ties
    ref_list = list(full.values())
    total = sum(t.numel() for t in ref_list)
    owners = assign_owners([math.prod(s) for s in shapes.values()], ws)
    # FSDP-like (row shards, one rank may hold 0 rows of "c") and DDP-like (whole tensors by owner)
    fsdp_local, fsdp_start = {}, {}
    for n, t in full.items():
        chunk = -(-t.shape[0] // ws)
        r0, r1 = min(rank * chunk, t.shape[0]), min((rank + 1) * chunk, t.shape[0])
        fsdp_local[n] = t[r0:r1].contiguous()
        fsdp_start[n] = r0 * t.shape[1]
    ddp_local = {n: t.clone() for (n, t), o in zip(full.items(), owners) if o == rank}
    layouts = [ESIScores(fsdp_local, shapes=shapes, flat_start=fsdp_start, distributed=True),
               ESIScores(ddp_local, shapes=shapes, distributed=True)]
    for scores in layouts:
        for k in (1, 5, 17, total // 2, total - 1, total):
            for largest in (True, False):
                got = scores.select(k=k, largest=largest)
                want = select_topk_reference(ref_list, k, largest=largest)
                assert got.count() == k
                for n, w in zip(shapes, want):
                    assert torch.equal(got.dense(n), w), (n, k, largest)
        rnd = scores.random_mask(k=9, seed=4)
        single = ESIScores(full).random_mask(k=9, seed=4)
        assert rnd == single and rnd.count() == 9


def _set_steps(model, mask, steps=2, mode="set"):
    from upsafe_ext.esi import SparseAdamW
    from upsafe_ext.esi.objectives import RefusalObjective
    from upsafe_ext.esi.config import ESIConfig
    from upsafe_ext.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    opt = SparseAdamW(model, mask, mode=mode, lr=1e-2, weight_decay=0.1)
    obj = RefusalObjective("I can't help with that.")
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = -obj(model, tok, PROMPTS[:4], ESIConfig()).mean()
        loss.backward()
        opt.step()
    return opt


def _full_params(model):
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def _worker(rank, ws, port, tmpdir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    from upsafe_ext.esi import ESIScores, JudgeObjective, SafetyMask, compute_esi
    from upsafe_ext.testing import tiny_causal_lm, tiny_tokenizer

    dist.init_process_group("gloo", rank=rank, world_size=ws)
    try:
        _synthetic_selection_checks(rank, ws)
        tok = tiny_tokenizer()
        base = tiny_causal_lm("llama", seed=0)
        guard = tiny_causal_lm("llama", seed=1)
        judge = JudgeObjective(guard, tok, safe_token="s", max_new_tokens=6)
        single = compute_esi(copy.deepcopy(base), tok, PROMPTS, batch_size=4, progress=False)
        single_j = compute_esi(copy.deepcopy(base), tok, PROMPTS, judge, batch_size=4, progress=False)
        assert single.meta["layout"] == "single"
        want_mask = single.select(0.05)

        # DDP: prompts split by rank, accumulators reduced to owner ranks, histogram all-reduced
        ddp = DDP(copy.deepcopy(base))
        s_ddp = compute_esi(ddp, tok, PROMPTS, batch_size=4, progress=False)
        assert s_ddp.meta["layout"] == "ddp" and s_ddp.distributed
        assert 0 < len(s_ddp) < len(single)  # this rank owns only some tensors
        full = s_ddp.full()
        for n in single:
            torch.testing.assert_close(full[n], single[n], rtol=1e-6, atol=0)
        assert s_ddp.select(0.05) == want_mask
        assert s_ddp.select(0.05, largest=False) == single.select(0.05, largest=False)
        assert s_ddp.random_mask(0.05, seed=3) == single.random_mask(0.05, seed=3)
        assert abs(s_ddp.meta["mean_objective"] - single.meta["mean_objective"]) < 1e-3

        # FSDP2: each rank holds row shards; sigma from all-reduced moments; grads reduce-scattered
        fs = copy.deepcopy(base)
        for layer in fs.model.layers:
            fully_shard(layer)
        fully_shard(fs)
        s_fs = compute_esi(fs, tok, PROMPTS, batch_size=4, progress=False)
        assert s_fs.meta["layout"] == "fsdp"
        q = "model.layers.0.self_attn.q_proj.weight"
        assert s_fs[q].shape[0] == single[q].shape[0] // ws
        full = s_fs.full()
        for n in single:
            torch.testing.assert_close(full[n], single[n], rtol=1e-5, atol=1e-12)
        assert s_fs.select(0.05) == want_mask
        path = os.path.join(tmpdir, "fsdp_scores.safetensors")
        s_fs.save(path)
        dist.barrier()
        loaded = ESIScores.load(path)
        for n in single:
            assert torch.equal(loaded[n], full[n])
        # the judge objective under FSDP (every rank runs the same number of forwards)
        s_fj = compute_esi(fs, tok, PROMPTS, judge, batch_size=4, progress=False).full()
        for n in single_j:
            torch.testing.assert_close(s_fj[n], single_j[n], rtol=1e-4, atol=1e-10)

        # SET / SPA with FSDP2 shards == the single process
        mask = want_mask
        ref_set = copy.deepcopy(base)
        _set_steps(ref_set, mask)
        fs_set = copy.deepcopy(base)
        for layer in fs_set.model.layers:
            fully_shard(layer)
        fully_shard(fs_set)
        _set_steps(fs_set, mask)
        got, want, before = _full_params(fs_set), dict(ref_set.named_parameters()), dict(base.named_parameters())
        for n, w in want.items():
            torch.testing.assert_close(got[n], w.detach(), rtol=1e-5, atol=1e-6)
            if n in mask:
                keep = ~mask.dense(n)
                assert torch.equal(got[n][keep], before[n].detach()[keep])
        fs_spa = copy.deepcopy(base)
        for layer in fs_spa.model.layers:
            fully_shard(layer)
        fully_shard(fs_spa)
        _set_steps(fs_spa, mask, mode="spa")
        got = _full_params(fs_spa)
        changed = 0
        for n in mask:
            sel = mask.dense(n)
            assert torch.equal(got[n][sel], before[n].detach()[sel]), n
            changed += int((got[n][~sel] != before[n].detach()[~sel]).sum())
        assert changed > 0
        assert isinstance(mask, SafetyMask)
    finally:
        dist.destroy_process_group()


def test_esi_ddp_fsdp_match_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
