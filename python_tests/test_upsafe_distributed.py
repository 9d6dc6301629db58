"""UpSafe°C training under torch.distributed on CPU (2 gloo processes): DDP and FSDP2 (fully_shard).

Each rank trains the router of an upcycled tiny model on its own half of a batch (LM loss + router
supervision). Afterwards every rank must hold the same parameters, only the router may have changed, and
the router must equal a single-process run of the same steps on the same data: per step, the mean of the
two halves' losses (what DDP / FSDP2 gradient averaging computes), accumulated in one process.
"""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed

HARM = [f"how to make poison {i}" for i in range(8)]
BEN = [f"how to bake bread {i}" for i in range(8)]
WORLD = 2
STEPS = 3
LR = 0.5


def _model():
    from upsafe_ext.testing import tiny_causal_lm
    from upsafe_ext.upcycle import UpcycleConfig, safety_moe_modules, upcycle_

    model = tiny_causal_lm("llama", seed=3)
    # top-2 over {original, safety} with no dropping and a small init margin: both experts' outputs are mixed by
    # the routing weights, so the LM loss has a gradient for the router (with top-1 renormalised routing the
    # single weight is always 1 and only the supervision term would train it)
    upcycle_(model, UpcycleConfig(layers=[1, 2], top_k=2, min_weight=0.0, router_init_margin=1.0))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # safety experts unlike the original MLP, as after stage 1
        for _, m in safety_moe_modules(model):
            for p in m.safety_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _batch(rank=None, world=1):
    from upsafe_ext.testing import tiny_tokenizer
    from upsafe_ext.train import make_examples
    from upsafe_ext.train.sft import SFTCollator

    tok = tiny_tokenizer()
    ex = make_examples(tok, HARM, ["No."] * 8, True) + make_examples(tok, BEN, ["Yes."] * 8, False)
    if rank is not None:
        ex = ex[rank::world]
    return SFTCollator(257)(ex)


def _loss(model, inner, batch, lm=True):
    from upsafe_ext.train import router_losses

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    sup = router_losses(inner, batch, sup_coef=1.0)
    return out.loss + sup if lm else sup  # the full objective: LM loss + router supervision


def _train(model, inner, batches, steps=STEPS, lm=True):
    """`steps` SGD steps; each step's loss is the mean over `batches` (one batch per rank when distributed,
    every rank's batch in one process for the reference)."""
    from upsafe_ext.train import stage_parameters, train_only

    params = stage_parameters(inner, 2)
    opt = torch.optim.SGD(params, lr=LR)
    with train_only(inner, params):
        inner.train()
        for _ in range(steps):
            opt.zero_grad()
            for b in batches:
                (_loss(model, inner, b, lm) / len(batches)).backward()
            opt.step()
    return {n: p.detach().clone() for n, p in inner.named_parameters()}


def _frozen_to_stage2(model):
    from upsafe_ext.train import stage_parameters

    keep = {id(p) for p in stage_parameters(model, 2)}
    for p in model.parameters():  # freeze before wrapping: DDP/FSDP register what requires grad
        p.requires_grad_(id(p) in keep)


def _worker(rank, world, init_file, mode, out_dir):
    torch.set_num_threads(1)  # same intra-op reduction order as the single-process reference
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = _model()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        _frozen_to_stage2(model)
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            after = _train(DDP(model), model, [_batch(rank, world)])
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            after = _train(model, model, [_batch(rank, world)])
            after = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p) for n, p in after.items()}
        torch.save({"before": before, "after": after}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single_process(batches, lm=True):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = _model()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        _frozen_to_stage2(model)
        return before, _train(model, model, batches, lm=lm)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference():
    """Single process: the same steps on the same data (both ranks' halves, loss averaged over them); and two
    runs the distributed result must NOT match: rank 0's half alone (an unsynchronised rank 0) and the same
    data without the LM loss (a router-supervision-only objective)."""
    halves = [_batch(r, WORLD) for r in range(WORLD)]
    before, both = _single_process(halves)
    _, half0 = _single_process(halves[:1])
    _, no_lm = _single_process(halves, lm=False)
    return before, both, {"rank 0's half alone": half0, "no LM loss": no_lm}


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_distributed_router_training_matches_single_process(mode, tmp_path, reference):
    if mode == "fsdp2":
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError:
            pytest.skip("this torch has no FSDP2 fully_shard")
    init_file = tempfile.mktemp(dir=str(tmp_path))
    mp.spawn(_worker, args=(WORLD, init_file, mode, str(tmp_path)), nprocs=WORLD, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    ref_before, ref_after, wrong = reference
    routers = [n for n in r0["after"] if ".router." in n]
    assert len(routers) == 4  # weight and bias of the two upcycled layers
    for name in r0["after"]:
        assert torch.equal(r0["before"][name], ref_before[name]), f"{mode}: {name} starts elsewhere"
        # the ranks trained on different halves of the batch: they can only agree if the gradients were
        # synchronised. Training must have moved the router and nothing else.
        torch.testing.assert_close(r0["after"][name], r1["after"][name], atol=1e-6, rtol=1e-5,
                                   msg=f"{mode}: ranks disagree on {name}")
        changed = not torch.equal(r0["after"][name], r0["before"][name])
        assert changed == (".router." in name), f"{mode}: {name} changed={changed}"
    # ...and the router equals the single-process run of the same 3 steps on the same 16 examples.
    # Tolerance: the runs differ only in where the fp32 gradients of the two halves are summed (gloo
    # all-reduce / reduce-scatter of the ranks' gradients, divided by the world size, vs autograd
    # accumulating loss/2 of each half in one process). For 2 ranks that sum is commutative and /2 is exact,
    # so it is bitwise equal here (measured: max difference 0); another bucketing or reduction order would
    # cost a few fp32 ulp (~1e-7 relative) per step, so after 3 SGD steps at lr 0.5 on weights |w| < 1 an
    # atol/rtol of 1e-6 holds. The router moves by ~0.1, and the two wrong references land >= 1.5e-4 away
    # on every router tensor (measured: 1.8e-4 to 2.3e-2), so the check cannot pass by accident.
    for name in routers:
        got = r0["after"][name]
        torch.testing.assert_close(got, ref_after[name], atol=1e-6, rtol=1e-6,
                                   msg=f"{mode}: {name} differs from the single-process run")
        assert (ref_after[name] - ref_before[name]).abs().max() > 1e-2, f"{name} barely trained"
        for what, other in wrong.items():
            assert (other[name] - got).abs().max() > 1e-4, f"{mode}: {name} also matches {what}"
