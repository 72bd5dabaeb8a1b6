"""torch.compile over a model written in Python whose attention is attnzoo's
ops: a two-block pre-LN transformer per attention kind (dense causal,
block-sparse with a layout from attnzoo.layouts, Reformer LSH), compiled
whole (fullgraph=True: a graph break is an error) with Inductor (its C++
code generation uses the g++ the build needs anyway), and its outputs and
gradients compared with eager. Then the zoo's own models (C++
modules behind nn.Module facades) under torch.compile: they run, through
graph breaks at the C++ forward (docs/models.md)."""
import pytest
import torch
from torch import nn

import attnzoo
from attnzoo import layouts

WIDTH, HEADS, SEQ, BLOCK = 32, 4, 32, 8
HEAD_DIM = WIDTH // HEADS


class Block(nn.Module):
    """Pre-LN transformer block whose attention is one attnzoo op."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH))
        n = layouts.num_blocks(SEQ, BLOCK)
        self.register_buffer("layout", layouts.local(n, n, window=1, causal=True))
        self.register_buffer("rotations", torch.randn(HEAD_DIM, 2, 2))  # 2 hashing rounds, 4 buckets

    def attend(self, q, k, v):
        if self.kind == "dense":
            return attnzoo.attention(q, k, v, causal=True)
        if self.kind == "block_sparse":
            return attnzoo.block_sparse_attention(q, k, v, self.layout, BLOCK, causal=True)
        return attnzoo.lsh_attention(q, v, self.rotations, bucket_size=BLOCK, causal=True)  # shared query-key

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        x = x + self.proj(self.attend(q, k, v).transpose(1, 2).reshape(b, n, WIDTH))
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.embed = nn.Embedding(64, WIDTH)
        self.blocks = nn.ModuleList([Block(kind), Block(kind)])
        self.head = nn.Linear(WIDTH, 64)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def loss_and_grads(model, ids, run=None):
    """Logits and the gradients of a next-token loss, by `run` (the model
    itself, or the model compiled)."""
    model.zero_grad()
    logits = (model if run is None else run)(ids)
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["dense", "block_sparse", "lsh"])
def test_python_transformer_compiles_whole_with_inductor(kind):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyTransformer(kind)
    ids = torch.randint(0, 64, (2, SEQ))
    explained = torch._dynamo.explain(model)(ids)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    want_logits, want_grads = loss_and_grads(model, ids)
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    got_logits, got_grads = loss_and_grads(model, ids, compiled)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-4)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")
def test_zoo_model_runs_under_compile_through_graph_breaks():
    """The zoo's models are C++ modules: the facade's forward is one pybind
    call (self._cpp.forward), which Dynamo cannot trace, and the blocks it
    calls back (_C.run_block) neither. So torch.compile(model) captures no
    graph and runs the model eagerly, exactly (a training step with dropout
    gives the same logits and gradients); fullgraph=True refuses it."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    gpt = attnzoo.models.GPT({"vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                              "max_position_embeddings": 64, "attention": {"kind": "rotary"}})  # dropout 0.1
    ids = torch.randint(0, 64, (2, SEQ))
    torch.manual_seed(1)
    want_logits, want_grads = loss_and_grads(gpt, ids)
    torch.manual_seed(1)
    got_logits, got_grads = loss_and_grads(gpt, ids, torch.compile(gpt, backend="inductor"))
    torch.testing.assert_close(got_logits, want_logits, atol=0, rtol=0)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")
    assert torch._dynamo.explain(gpt)(ids).graph_count == 0
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"self\._cpp\.forward"):
        torch.compile(gpt, backend="inductor", fullgraph=True)(ids)
