"""UpSafe°C training under torch.distributed on CPU (2 gloo processes): DDP and FSDP2 (fully_shard).

Each rank trains the router of an upcycled tiny model on its own half of a batch; afterwards every rank
must hold the same parameters (so the gradients were synchronised), and only the router may change.
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


def _model():
    from upsafe_ext.testing import tiny_causal_lm
    from upsafe_ext.upcycle import UpcycleConfig, upcycle_

    model = tiny_causal_lm("llama", seed=3)
    upcycle_(model, UpcycleConfig(layers=[1, 2]))
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


def _train(model, inner, batch, steps=3):
    from upsafe_ext.train import router_losses, stage_parameters, train_only

    params = stage_parameters(inner, 2)
    opt = torch.optim.SGD(params, lr=0.5)
    with train_only(inner, params):
        inner.train()
        for _ in range(steps):
            opt.zero_grad()
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            loss = out.loss * 0 + router_losses(inner, batch, sup_coef=1.0)  # router-only objective
            loss.backward()
            opt.step()
    return {n: p.detach().clone() for n, p in inner.named_parameters()}


def _worker(rank, world, init_file, mode, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from upsafe_ext.train import stage_parameters

        torch.manual_seed(0)
        model = _model()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        keep = {id(p) for p in stage_parameters(model, 2)}
        for p in model.parameters():  # freeze before wrapping: DDP/FSDP register what requires grad
            p.requires_grad_(id(p) in keep)
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(model)
            after = _train(wrapped, model, _batch(rank, world))
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            after = _train(model, model, _batch(rank, world))
            after = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p) for n, p in after.items()}
        torch.save({"before": before, "after": after}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_distributed_router_training_matches_single_process(mode, tmp_path):
    if mode == "fsdp2":
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError:
            pytest.skip("this torch has no FSDP2 fully_shard")
    init_file = tempfile.mktemp(dir=str(tmp_path))
    mp.spawn(_worker, args=(2, init_file, mode, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # The ranks trained on different halves of the batch: they can only agree if the gradients were
    # synchronised. Training must have moved the router and nothing else.
    for name in r0["after"]:
        torch.testing.assert_close(r0["after"][name], r1["after"][name], atol=1e-6, rtol=1e-5,
                                   msg=f"{mode}: ranks disagree on {name}")
        changed = not torch.equal(r0["after"][name], r0["before"][name])
        assert changed == (".router." in name), f"{mode}: {name} changed={changed}"
