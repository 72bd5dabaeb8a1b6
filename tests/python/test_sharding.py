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


@pytest.mark.parametrize("key", ["gpt-t5", "speech"])
def test_activation_checkpointing_gives_the_same_gradients(key):
    cls, config, make_inputs = MODELS[key]
    config = {**config, "dropout": 0.1, "attention_dropout": 0.1}  # the replay must redraw the same dropout
    torch.manual_seed(0)
    plain, checkpointed = cls(config), cls(config)
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.gradient_checkpointing_enable()
    assert checkpointed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    calls = []
    # a pre-hook: the replay stops as soon as it has what the backward needs,
    # before a forward hook would run
    checkpointed.layers[0].register_forward_pre_hook(lambda *args: calls.append(1))
    inputs = make_inputs()
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        _loss(model, inputs).backward()
    assert len(calls) == 2  # the block ran again in the backward pass
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6), name
    with torch.no_grad():  # no replay without a backward pass
        checkpointed(*inputs)
    assert len(calls) == 3


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
    # the checkpoints written sharded load unsharded, from Python and from C++
    for key in FSDP_MODELS:
        reference = torch.load(tmp_path / f"{key}.pt")
        for loaded in (attnzoo.from_pretrained(tmp_path / key), attnzoo.models.from_pretrained_cpp(tmp_path / key)):
            out = loaded(*reference["inputs"])
            out = out[0] if isinstance(out, tuple) else out
            assert (out - reference["output"]).abs().max() <= 1e-4, key


FSDP_MODELS = ["gpt-t5", "bert", "vit", "speech"]


def _gpt_batch(step):
    # counting sequences from random starts: learnable, so the run can show it trains
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randint(0, 40, (4, 13), generator=g)[:, :1] + torch.arange(13)) % 40


def _inputs(key, step):
    """A global batch of 4 for model `key` at `step`, and its loss of the
    model's output on the rows `rows` of that batch (a mean per example, so
    that the mean over two halves is the loss of the whole)."""
    g = torch.Generator().manual_seed(200 + step)
    if key.startswith("gpt"):
        ids = _gpt_batch(step)
        return (ids[:, :-1],), lambda out, rows: F.cross_entropy(out.flatten(0, 1), ids[rows, 1:].flatten())
    if key == "bert":
        ids = torch.randint(0, 40, (4, 12), generator=g)
        return (ids,), lambda out, rows: F.cross_entropy(out.flatten(0, 1), ids[rows].flatten())
    if key == "vit":
        labels = torch.arange(4) % 2
        x = torch.randn(4, 3, 8, 8, generator=g) + labels.view(4, 1, 1, 1)
        return (x,), lambda out, rows: F.cross_entropy(out, labels[rows])
    wave = torch.randn(4, 4000, generator=g)
    return (wave,), lambda out, rows: (out[0] * torch.linspace(-1, 1, out[0].shape[-1])).mean()


def _fsdp_worker(rank, world, port, out):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for key in FSDP_MODELS:
            _fsdp_run(key, rank, world, out, fully_shard, DTensor, dist)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _fsdp_run(key, rank, world, out, fully_shard, DTensor, dist):
    cls, config, _ = MODELS[key]
    config = {**config, "dropout": 0.0, "attention_dropout": 0.0}
    torch.manual_seed(0)
    model = cls(config)
    reference = cls(config)
    reference.load_state_dict(model.state_dict())
    full_numel = sum(p.numel() for p in model.parameters())
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    local_numel = sum(p.to_local().numel() for p in model.parameters())
    # each process holds about half of the parameters (and so of AdamW's moments)
    assert local_numel <= 0.55 * full_numel, (key, local_numel, full_numel)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    per = 4 // world
    steps = STEPS if key.startswith("gpt") else 5
    losses = []
    for step in range(steps):
        inputs, loss_of = _inputs(key, step)
        mine = tuple(t[rank * per:(rank + 1) * per] for t in inputs)
        loss = loss_of(model(*mine), slice(rank * per, (rank + 1) * per))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f"{key} step {step}: no gradient for {missing}"
        opt.step()
        # The mean over processes, as a SUM of a detached copy: an in-place
        # AVG all_reduce of the loss itself segfaulted inside gloo in about 4
        # of 100 runs here (torch 2.15), at this call; cause not found.
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        loss /= world
        ref_loss = loss_of(reference(*inputs), slice(None))
        ref_opt.zero_grad(set_to_none=True)
        ref_loss.backward()
        ref_opt.step()
        assert abs(loss.item() - ref_loss.item()) <= 1e-4, (key, step, loss.item(), ref_loss.item())
        losses.append(loss.item())
    if key.startswith("gpt"):
        assert losses[-1] < 0.5 * losses[0], f"the run did not train: {losses}"
    # methods other than forward gather the model's own parameters, for inference
    model.eval()
    reference.eval()
    if key.startswith("gpt"):
        prompt = torch.randint(0, 40, (1, 4), generator=torch.Generator().manual_seed(5))
        assert torch.equal(model.generate(prompt, 6), reference.generate(prompt, 6))
    if key == "bert":
        ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(6))
        with pytest.raises(RuntimeError, match=r"Bert.encode: under FSDP2 only model\(...\) trains"):
            model.encode(ids)
        with torch.no_grad():
            assert (model.encode(ids) - reference.encode(ids)).abs().max() <= 1e-4
    model.save_pretrained(f"{out}/{key}")  # every rank gathers; rank 0 writes
    if rank == 0:
        inputs, _ = _inputs(key, steps)
        output = reference.eval()(*inputs)
        output = output[0] if isinstance(output, tuple) else output
        torch.save({"inputs": inputs, "output": output.detach()}, f"{out}/{key}.pt")
