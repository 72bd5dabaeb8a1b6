"""Parameters replaced on the Python side reach the C++ forward, or are refused;
FSDP2 (fully_shard) trains the zoo's models like one process does.

The facade's parameter slots write through to the C++ module, and the C++
model runs each block through its facade so that FSDP2's hooks gather the
block's parameters (docs/design.md section 6)."""
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnzoo
from attnzoo.models import GPT, Bert, Speech, ViT

SMALL = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64}
GPT_CONFIG = {**SMALL, "vocab_size": 40, "max_position_embeddings": 32, "dropout": 0.0, "attention_dropout": 0.0}

MODELS = {
    "gpt-t5": (GPT, {**GPT_CONFIG, "attention": {"kind": "t5"}}, lambda: (torch.randint(0, 40, (2, 12)),)),
    "gpt-shaw": (GPT, {**GPT_CONFIG, "attention": {"kind": "shaw"}}, lambda: (torch.randint(0, 40, (2, 12)),)),
    "gpt-linformer": (GPT, {**GPT_CONFIG, "attention": {"kind": "linformer", "projected_length": 8}},
                      lambda: (torch.randint(0, 40, (2, 12)),)),
    "bert": (Bert, {**SMALL, "vocab_size": 40, "tie_word_embeddings": False}, lambda: (torch.randint(0, 40, (2, 12)),)),
    "vit": (ViT, {**SMALL, "image_size": 8, "patch_size": 4, "num_channels": 3}, lambda: (torch.randn(2, 3, 8, 8),)),
    "speech": (Speech, {**SMALL, "vocab_size": 9, "n_mels": 40, "subsampling_channels": 4, "conformer_conv": True},
               lambda: (torch.randn(2, 4000),)),
}


def _loss(model, inputs):
    out = model(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    return (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum()


def _owner(model, dotted):
    *path, name = dotted.split(".")
    module = model
    for part in path:
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module, name


@pytest.mark.parametrize("key", list(MODELS))
def test_a_replaced_parameter_is_what_the_cpp_forward_reads(key):
    cls, config, make_inputs = MODELS[key]
    torch.manual_seed(0)
    model, twin = cls(config).eval(), cls(config).eval()
    inputs = make_inputs()
    _loss(model, inputs).backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None}
    assert reached
    model.zero_grad(set_to_none=True)

    # Every parameter replaced by a new nn.Parameter with other values; the
    # twin gets the same values copied in place.
    replacements = {}
    for name, p in list(model.named_parameters()):
        new = nn.Parameter(p.detach() + 0.05 * torch.randn_like(p))
        module, attr = _owner(model, name)
        setattr(module, attr, new)
        replacements[name] = new
    twin.load_state_dict({n: p.detach() for n, p in replacements.items()})
    assert all(p is replacements[n] for n, p in model.named_parameters())

    out, ref = model(*inputs), twin(*inputs)
    out, ref = (out[0], ref[0]) if isinstance(out, tuple) else (out, ref)
    assert torch.equal(out, ref)
    _loss(model, inputs).backward()
    assert {n for n, p in replacements.items() if p.grad is not None} == reached


def test_what_cannot_reach_the_cpp_forward_is_refused():
    model = GPT(GPT_CONFIG)
    fc = model.layers[0].mlp.fc_in
    with pytest.raises(RuntimeError, match=r"removing parameter 'weight' is not supported.*parametrize"):
        torch.nn.utils.parametrize.register_parametrization(fc, "weight", nn.Identity())
    with pytest.raises(RuntimeError, match=r"removing parameter 'weight'"):
        torch.nn.utils.parametrizations.weight_norm(fc)
    with pytest.raises(RuntimeError, match=r"removing parameter 'bias'"):
        del fc.bias
    with pytest.raises(ValueError, match=r"parameter 'weight' of .*Linear.* has shape \[64, 32\]; the replacement "
                                         r"has shape \[32, 32\]"):
        fc.weight = nn.Parameter(torch.randn(32, 32))
    with pytest.raises(KeyError, match=r"cannot add parameter 'scale'"):
        fc.register_parameter("scale", nn.Parameter(torch.ones(1)))
    with pytest.raises(TypeError, match=r"cannot assign 'torch.FloatTensor' as parameter 'weight'"):
        fc.weight = torch.randn(64, 32)  # nn.Module's own rule: a plain tensor is not a parameter
    # nothing changed: the model still trains on its own parameters
    x = torch.randint(0, 40, (2, 12))
    _loss(model, (x,)).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_hooks_on_a_block_run():
    model = GPT(GPT_CONFIG)
    seen = []
    model.layers[1].register_forward_hook(lambda mod, args, out: seen.append(tuple(out.shape)))
    model(torch.randint(0, 40, (2, 12)))
    model.generate(torch.randint(0, 40, (1, 4)), max_new_tokens=2)
    assert seen == [(2, 12, 32), (1, 4, 32), (1, 1, 32)]


# ---------------------------------------------------------------------------
# FSDP2 with gloo: two processes, each with half of the global batch, equal one
# process with all of it.

STEPS = 20


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_two_processes_equal_one_process(tmp_path):
    torch.multiprocessing.spawn(_fsdp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    # the checkpoint written sharded loads unsharded, from Python and from C++
    reference = torch.load(tmp_path / "reference.pt")
    x = reference["input"]
    for loaded in (attnzoo.from_pretrained(tmp_path / "ckpt"), attnzoo.models.from_pretrained_cpp(tmp_path / "ckpt")):
        assert (loaded(x) - reference["logits"]).abs().max() <= 1e-4


def _batch(step):
    # counting sequences from random starts: learnable, so the run can show it trains
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randint(0, 40, (4, 1), generator=g) + torch.arange(13)) % 40


def _step(model, opt, ids):
    loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    return loss


def _fsdp_worker(rank, world, port, out):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = GPT(GPT_CONFIG)
        reference = GPT(GPT_CONFIG)
        reference.load_state_dict(model.state_dict())
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
        per_rank = 4 // world
        losses = []
        for step in range(STEPS):
            ids = _batch(step)
            loss = _step(model, opt, ids[rank * per_rank:(rank + 1) * per_rank])
            missing = [n for n, p in model.named_parameters() if p.grad is None]
            assert not missing, f"step {step}: no gradient for {missing}"
            opt.step()
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
            ref_loss = _step(reference, ref_opt, ids)
            ref_opt.step()
            assert abs(loss.item() - ref_loss.item()) <= 1e-4, (step, loss.item(), ref_loss.item())
            losses.append(loss.item())
        assert losses[-1] < 0.5 * losses[0], f"the run did not train: {losses}"
        model.save_pretrained(f"{out}/ckpt")  # every rank gathers; rank 0 writes
        if rank == 0:
            x = _batch(STEPS)[:, :-1]
            torch.save({"input": x, "logits": reference.eval()(x).detach()}, f"{out}/reference.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
