"""What makes the stage-2 step fast stays exact: the loss keeps its logits only when they fit (and then does
three GEMMs, not four), activation checkpointing and torch.compile change no number, the preallocated KV
cache refuses to overflow, and the x-transformers layout of older generators is refused by name."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from simvq_common.errors import ArtifactError
from simvq_common.pretrained import save_pretrained
from stage2_generator.config import GeneratorConfig, SamplingConfig
from stage2_generator.loss import chunked_cross_entropy
from stage2_generator.model import Generator, training_flops_per_token
from stage2_generator.sampling import generate

N, K, D = 24, 40, 8


class GemmFlops(TorchDispatchMode):
    """2 m k n for every matrix product dispatched, in-place accumulations (addmm_) included."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_"):
            a, b = args[-2:] if name != "mm" else args
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


def inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(K, D, generator=g).requires_grad_()
    return hidden, weight, torch.randint(0, K, (N,), generator=g)


@pytest.mark.parametrize("rows,gemms", [(N, 3), (N + 1, 3), (7, 4), (1, 4)])
def test_the_loss_recomputes_the_logits_only_when_they_do_not_fit(rows, gemms):
    hidden, weight, targets = inputs()
    with GemmFlops() as counter:
        loss = chunked_cross_entropy(hidden, weight, targets, rows)
        loss.backward()
    assert counter.flops == gemms * 2 * N * K * D  # forward, (recompute,) two gradient GEMMs
    reference = F.cross_entropy(hidden.detach() @ weight.detach().T, targets)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


def test_the_kept_gradient_survives_a_second_backward():
    hidden, weight, targets = inputs()
    loss = chunked_cross_entropy(hidden, weight, targets, rows=N)
    first = torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
    second = torch.autograd.grad(loss * 2.0, (hidden, weight))
    for a, b in zip(first, second):
        torch.testing.assert_close(b, 2 * a, rtol=0, atol=0)


@pytest.mark.parametrize("rows", [N, 5])
def test_bf16_hidden_states_give_the_fp32_loss_and_gradients_to_bf16_precision(rows):
    hidden, weight, targets = inputs(torch.bfloat16)
    loss = chunked_cross_entropy(hidden, weight, targets, rows)
    grads = torch.autograd.grad(loss, (hidden, weight))
    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().clone().requires_grad_()
    reference = F.cross_entropy(h32 @ w32.to(torch.bfloat16).float().T, targets)
    expected = torch.autograd.grad(reference, (h32, w32))
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(reference.item(), rel=1e-2)
    assert grads[0].dtype == torch.bfloat16 and grads[1].dtype == torch.float32
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-3)


def config(**kw) -> GeneratorConfig:
    return GeneratorConfig(size="nano", conditioning="class", codebook_size=64, grid=[3, 4], num_classes=5, **kw)


def random_model(cfg: GeneratorConfig) -> Generator:
    torch.manual_seed(0)
    model = Generator(cfg)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


def loss_and_grads(model, codes, labels):
    model.zero_grad()
    loss = model(codes, labels, torch.tensor([False, True, False]))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_changes_no_loss_or_gradient():
    plain, checkpointed = random_model(config()), random_model(config(checkpoint_activations=True))
    codes, labels = torch.randint(0, 64, (3, 12)), torch.tensor([0, 4, 2])
    (l0, g0), (l1, g1) = loss_and_grads(plain, codes, labels), loss_and_grads(checkpointed, codes, labels)
    assert torch.equal(l0, l1)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=0, msg=name)


def test_a_full_cache_is_refused():
    model = random_model(config()).eval()
    _, cache = model.prefill(torch.tensor([1]), codes=torch.randint(0, 64, (1, 11)))  # 1 + 11 = 12 positions
    assert cache.filled == cache.capacity == 12 and int(cache.length) == 12
    with pytest.raises(ValueError, match="cache is full"):
        model.decode_step(torch.tensor([3]), cache)


def test_a_generator_in_the_x_transformers_layout_is_refused_by_name(tmp_path):
    cfg = config()
    state = {"decoder.layers.0.0.0.g": torch.ones(64), "token_embed.weight": torch.zeros(64, 64)}
    save_pretrained(tmp_path / "old", "generator", cfg, state)
    with pytest.raises(ArtifactError, match="x-transformers decoder.*retrain"):
        Generator.from_pretrained(tmp_path / "old")


def test_training_flops_count_every_product():
    cfg = config()
    d, hidden, positions = 64, 256, 12  # nano: width 64, SwiGLU 256; 1 class token + 11 codes
    per_layer = 3 * d * d + d * d + 2 * d * hidden + hidden * d
    assert training_flops_per_token(cfg) == 6 * (2 * per_layer + d * 64) + 12 * 2 * d * positions
    model = random_model(cfg)
    codes, labels = torch.randint(0, 64, (2, 12)), torch.tensor([0, 1])
    with FlopCounterMode(display=False) as counter:
        model(codes, labels).backward()
    # torch's counter sees the same matrix products (the loss keeps its logits here: no recomputation); it
    # has no count for the CPU attention kernel, so the attention term is left out of the comparison
    attention = 12 * 2 * d * positions
    assert counter.get_total_flops() == (training_flops_per_token(cfg) - attention) * 2 * 12


@pytest.mark.slow
def test_the_compiled_model_trains_and_samples_like_the_eager_one():
    cfg = config()
    eager, compiled = random_model(cfg), random_model(cfg)
    compiled.compile()
    codes, labels = torch.randint(0, 64, (3, 12)), torch.tensor([0, 4, 2])
    (l0, g0), (l1, g1) = loss_and_grads(eager, codes, labels), loss_and_grads(compiled, codes, labels)
    assert l1.item() == pytest.approx(l0.item(), rel=1e-5) and l0.item() != pytest.approx(math.log(64), rel=1e-3)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-5, msg=name)
    # the compiled decode step: one graph for every position, the same codes as the eager step
    eager.eval(), compiled.eval()
    sampling = SamplingConfig(guidance_scale=2.0, seed=3)
    want = generate(eager, torch.tensor([1, 2]), range(2), sampling)
    got = generate(compiled, torch.tensor([1, 2]), range(2), SamplingConfig(guidance_scale=2.0, seed=3, compile=True))
    assert compiled._step_compiled and not eager._step_compiled
    assert torch.equal(got, want)
