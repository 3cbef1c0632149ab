"""The stage-2 model: sizes, the chunked loss against the plain one (values and gradients), KV-cached against
uncached logits, rotary layout, condition dropout, and the generator directory round trip; the model-level
checks run over every registered decoder."""
import math

import pytest
import torch
import torch.nn.functional as F

from stage2_generator.config import SIZES, GeneratorConfig
from stage2_generator.decoders.llama import swiglu_hidden
from stage2_generator.loss import chunk_rows, chunked_cross_entropy
from stage2_generator.conditionings import TextTokens
from stage2_generator.decoders import DECODERS
from simvq_common.errors import ConfigError
from stage2_generator.model import Generator, parameter_groups, rotary_frequencies, training_flops_per_token

LLAMAGEN_PARAMS = {"B": 111e6, "L": 343e6, "XL": 775e6}  # LlamaGen's GPT sizes (K = 16,384, 1,000 classes)


def config(conditioning="class", rope="2d", size="nano", k=97, grid=(3, 4), **kw) -> GeneratorConfig:
    """conditioning "tokens" is text with token features (3 per caption)."""
    if conditioning == "tokens":
        conditioning, kw = "text", {"text_features": "tokens", "text_max_tokens": 3, **kw}
    return GeneratorConfig(size=size, conditioning=conditioning, rope=rope, codebook_size=k, grid=list(grid),
                           num_classes=5, text_dim=6, text_tokens=2, **kw)


def condition_for(cfg: GeneratorConfig, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if cfg.conditioning == "class":
        return torch.randint(0, cfg.num_classes, (n,), generator=g)
    if cfg.conditioning == "text" and cfg.text_features == "tokens":
        return random_text_tokens(n, cfg.text_max_tokens, cfg.text_dim, g)
    if cfg.conditioning == "text":
        return torch.randn(n, cfg.text_dim, generator=g)
    return None


def random_text_tokens(n: int, width: int, dim: int, g: torch.Generator) -> TextTokens:
    """Left-padded token features of random lengths 1..width (row 0 has 1 token: padding is exercised)."""
    lengths = torch.randint(1, width + 1, (n,), generator=g)
    lengths[0] = 1
    mask = torch.arange(width)[None, :] >= width - lengths[:, None]
    return TextTokens(torch.randn(n, width, dim, generator=g) * mask[..., None], mask)


def random_model(cfg: GeneratorConfig, seed: int = 0) -> Generator:
    """A generator with every weight random (the zero-initialised head included), in eval mode."""
    torch.manual_seed(seed)
    model = Generator(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def cached_logits(model: Generator, codes: torch.Tensor, condition) -> torch.Tensor:
    """(B, L, K) logits of every code through prefill and one KV-cached decode step per code."""
    logits, cache = model.prefill(condition, batch_size=len(codes))
    steps = [logits]
    for j in range(codes.shape[1] - 1):
        logits, cache = model.decode_step(codes[:, j], cache)
        steps.append(logits)
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("size", sorted(SIZES))
def test_parameter_count_matches_the_architecture(size):
    cfg = GeneratorConfig(size=size, codebook_size=16384, grid=[16, 16], num_classes=1000)
    with torch.device("meta"):
        model = Generator(cfg)
    d, depth, hidden, k = cfg.dim, cfg.depth, swiglu_hidden(cfg.dim), cfg.codebook_size
    # per layer: q, k, v, o (4 d^2), SwiGLU (3 d hidden), two RMSNorm gains; + final norm, embeddings, head
    expected = depth * (4 * d * d + 3 * d * hidden + 2 * d) + d + 2 * k * d + (1000 + 1) * d
    assert model.num_parameters() == expected
    if size in LLAMAGEN_PARAMS:
        assert model.num_parameters() == pytest.approx(LLAMAGEN_PARAMS[size], rel=0.005)


def test_weight_decay_goes_to_matrices_only():
    model = Generator(config())
    decay, no_decay = parameter_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert any(p is model.head.weight for p in decay["params"])


@pytest.mark.parametrize("rows", [1, 5, 7, 64])
def test_chunked_loss_equals_plain_cross_entropy_in_value_and_gradients(rows):
    g = torch.Generator().manual_seed(rows)
    hidden = torch.randn(23, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(31, 8, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 31, (23,), generator=g)
    loss = chunked_cross_entropy(hidden, weight, targets, rows)
    grads = torch.autograd.grad(loss * 3.0, (hidden, weight))  # an upstream gradient other than 1
    reference = F.cross_entropy(hidden @ weight.T, targets)
    expected = torch.autograd.grad(reference * 3.0, (hidden, weight))
    assert loss.item() == pytest.approx(reference.item(), abs=1e-12)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_chunk_rows_respects_the_memory_budget():
    assert chunk_rows(262144, 256.0) == 256  # 256 rows x 262,144 x 4 bytes = 256 MiB
    assert chunk_rows(262144, 0.001) == 1
    assert chunk_rows(1000, 1.0) * 1000 * 4 <= 2**20 < (chunk_rows(1000, 1.0) + 1) * 1000 * 4


@pytest.mark.parametrize("conditioning", ["class", "text", "tokens", "none"])
def test_training_starts_at_the_uniform_loss_because_the_head_is_zero(conditioning):
    cfg = config(conditioning)
    model = Generator(cfg)
    codes = torch.randint(0, cfg.codebook_size, (3, cfg.sequence_length))
    loss = model(codes, condition_for(cfg, 3))
    assert loss.item() == pytest.approx(math.log(cfg.codebook_size), abs=1e-6)


@pytest.mark.parametrize("decoder", sorted(DECODERS))
@pytest.mark.parametrize("conditioning", ["class", "text", "tokens", "none"])
def test_loss_is_the_mean_cross_entropy_of_the_uncached_logits(conditioning, decoder):
    cfg = config(conditioning, decoder=decoder)
    model = random_model(cfg)
    codes = torch.randint(0, cfg.codebook_size, (2, cfg.sequence_length))
    condition = condition_for(cfg, 2)
    logits = model.logits(codes, condition)
    assert logits.shape == (2, cfg.sequence_length, cfg.codebook_size)
    expected = F.cross_entropy(logits.reshape(-1, cfg.codebook_size), codes.reshape(-1))
    assert model(codes, condition).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("conditioning,rope", [("class", "2d"), ("class", "1d"), ("text", "2d"),
                                                   ("tokens", "2d"), ("tokens", "1d"), ("none", "2d")])
@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_kv_cached_logits_equal_the_uncached_ones(conditioning, rope, decoder):
    cfg = config(conditioning, rope, decoder=decoder)
    model = random_model(cfg)
    codes = torch.randint(0, cfg.codebook_size, (3, cfg.sequence_length))
    condition = condition_for(cfg, 3)
    uncached = model.logits(codes, condition)
    torch.testing.assert_close(cached_logits(model, codes, condition), uncached, rtol=1e-4, atol=1e-4)
    # a prefill that already holds the first codes continues identically
    logits, _ = model.prefill(condition, batch_size=3, codes=codes[:, :5])
    torch.testing.assert_close(logits, uncached[:, 5], rtol=1e-4, atol=1e-4)


def test_2d_rotary_angles_follow_the_code_grid():
    cfg = config("text", "2d", size="tiny", grid=(3, 4))  # head width 32, 2 prefix tokens
    freqs = rotary_frequencies(cfg)
    head = cfg.dim // cfg.heads
    assert freqs.shape == (cfg.prefix_length + cfg.sequence_length - 1, head)
    assert torch.all(freqs[:cfg.prefix_length] == 0)  # prefix tokens are not rotated
    inv = 1.0 / 10000 ** (torch.arange(0, head // 2, 2, dtype=torch.float64) / (head // 2))
    for j in range(cfg.sequence_length - 1):  # input code j sits at row j // 4, column j % 4
        row, col = divmod(j, 4)
        got = freqs[cfg.prefix_length + j].double()
        torch.testing.assert_close(got[:head // 2], (row * inv).repeat_interleave(2), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[head // 2:], (col * inv).repeat_interleave(2), rtol=1e-6, atol=1e-6)


def test_2d_rope_makes_attention_depend_on_grid_position_not_sequence_index():
    # the same codes placed in a grid of another width land in other rows/columns: different logits
    a, b = random_model(config("class", "2d", grid=(2, 6))), random_model(config("class", "2d", grid=(3, 4)))
    b.load_state_dict(a.state_dict())
    codes, labels = torch.randint(0, 97, (2, 12)), torch.tensor([0, 1])
    la, lb = a.logits(codes, labels), b.logits(codes, labels)
    torch.testing.assert_close(la[:, :5], lb[:, :5])  # codes 0..3 share rows/columns in both grids
    assert (la[:, 6:] - lb[:, 6:]).abs().max() > 1e-3


@pytest.mark.parametrize("conditioning", ["class", "text", "tokens"])
def test_dropped_conditions_become_the_null_condition(conditioning):
    cfg = config(conditioning)
    model = random_model(cfg)
    codes = torch.randint(0, cfg.codebook_size, (4, cfg.sequence_length))
    condition = condition_for(cfg, 4)
    drop = torch.tensor([True, False, True, False])
    mixed = model(codes, condition, drop)
    null = model.condition.null(4, torch.device("cpu"))
    if conditioning == "tokens":
        by_hand = TextTokens(torch.where(drop[:, None, None], null.features, condition.features),
                             torch.where(drop[:, None], null.mask, condition.mask))
    elif conditioning == "text":
        by_hand = torch.where(drop[:, None], null, condition)
    else:
        by_hand = torch.where(drop, null, condition)
    assert mixed.item() == pytest.approx(model(codes, by_hand).item(), rel=1e-6)
    assert abs(mixed.item() - model(codes, condition).item()) > 1e-4


def test_input_noise_replaces_inputs_not_targets_and_only_in_training():
    cfg = config("class", input_noise=0.3)
    model = random_model(cfg).train()
    codes, labels = torch.randint(0, cfg.codebook_size, (8, cfg.sequence_length)), condition_for(cfg, 8)
    torch.manual_seed(5)
    noisy_loss = model(codes, labels)
    torch.manual_seed(5)  # the same draws, by hand: inputs replaced, the targets (the clean codes) kept
    inputs = codes[:, :-1]
    replaced = torch.rand(inputs.shape) < 0.3
    inputs = torch.where(replaced, torch.randint_like(inputs, cfg.codebook_size), inputs)
    model.eval()
    hidden = model.decoder(torch.cat([model.condition(labels, None, batch_size=8), model.token_embed(inputs)], 1),
                           prefix_mask=model.condition.prefix_mask(labels, None))
    by_hand = F.cross_entropy(model.head(hidden[:, cfg.prefix_length - 1:]).flatten(0, 1), codes.flatten())
    assert 0.2 < replaced.float().mean() < 0.4
    assert noisy_loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    clean = model(codes, labels).item()  # eval mode: no noise, the loss of the codes as they are
    assert abs(noisy_loss.item() - clean) > 1e-3
    torch.manual_seed(6)
    assert model(codes, labels).item() == clean
    # without noise a training forward draws nothing: runs from before the option keep their random stream
    plain = random_model(config("class")).train()
    state = torch.get_rng_state()
    plain(codes, labels)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_generator_directory_rebuilds_the_same_model(tmp_path, decoder):
    cfg = config("text", tokenizer_fingerprint="0123456789abcdef", decoder=decoder,
                 decoder_options={"ff_mult": 2} if decoder == "x-transformers" else {})
    model = random_model(cfg)
    model.save_pretrained(tmp_path / "gen")
    again = Generator.from_pretrained(tmp_path / "gen")
    assert again.config == cfg and again.fingerprint() == model.fingerprint()
    assert (tmp_path / "gen" / "fingerprint.txt").read_text().strip() == model.fingerprint()
    codes, text = torch.randint(0, 97, (2, 12)), condition_for(cfg, 2)
    torch.testing.assert_close(again.logits(codes, text), model.logits(codes, text), rtol=0, atol=0)


def test_a_262144_code_vocabulary_trains():
    cfg = config("class", k=262144, grid=(2, 2))
    model = Generator(cfg, loss_chunk_mb=4.0)  # 4 rows of logits per chunk
    assert model.head.loss_rows == 4
    codes = torch.tensor([[0, 262143, 5, 131072], [7, 7, 262000, 1]])
    loss = model(codes, torch.tensor([1, 2]))
    loss.backward()
    assert loss.item() == pytest.approx(math.log(262144), abs=1e-5)
    # at the uniform start d loss / d head row c = mean_i (1/K - [t_i = c]) h_i: equal for every code that is no
    # target, different for targets; and no gradient reaches the body through a zero head
    grad = model.head.weight.grad
    assert torch.equal(grad[100], grad[200]) and grad[100].abs().sum() > 0
    assert (grad[262143] - grad[100]).abs().sum() > 1e-3
    assert model.token_embed.weight.grad.abs().sum() == 0


def test_bad_configs_are_refused_naming_the_key():
    with pytest.raises(ValueError, match="model.size"):
        Generator(config(size="huge"))
    with pytest.raises(ValueError, match="codebook_size"):
        Generator(config(k=0))
    with pytest.raises(ValueError, match="num_classes"):
        Generator(GeneratorConfig(codebook_size=10, grid=[2, 2], num_classes=0))
    with pytest.raises(ValueError, match=r"model.input_noise=1.0 must lie in \[0, 1\)"):
        Generator(config(input_noise=1.0))
    with pytest.raises(ValueError, match="allows"):
        model = random_model(config())
        model.logits(torch.zeros(1, 13, dtype=torch.long), torch.tensor([0]))


@pytest.mark.parametrize("decoder", sorted(DECODERS))
@pytest.mark.parametrize("conditioning", ["class", "text", "tokens", "none"])
def test_every_gradient_is_finite_and_reaches_the_condition(conditioning, decoder):
    # a zero null embedding or start token once gave non-finite gradients through the first RMSNorm
    cfg = config(conditioning, decoder=decoder)
    model = Generator(cfg)
    with torch.no_grad():
        model.head.weight.normal_(0, 0.1)  # so that gradients reach the body
    codes = torch.randint(0, cfg.codebook_size, (4, cfg.sequence_length))
    drop = torch.tensor([True, True, False, False]) if conditioning != "none" else None
    model(codes, condition_for(cfg, 4), drop).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    learned = {"class": "classes.weight", "text": "null_text", "tokens": "null_text", "none": "start"}[conditioning]
    assert model.condition.get_parameter(learned).grad.abs().sum() > 0


@pytest.mark.parametrize("decoder", sorted(DECODERS))
@pytest.mark.parametrize("rope", ["2d", "1d"])
def test_a_text_prefix_padding_is_invisible(rope, decoder):
    """Whatever the features at masked (padding) positions hold, every code's logits are the same; a feature at
    an attended position changes them (so the mask is not hiding everything)."""
    cfg = config("tokens", rope, decoder=decoder)
    model = random_model(cfg)
    codes = torch.randint(0, cfg.codebook_size, (4, cfg.sequence_length))
    text = condition_for(cfg, 4)
    noisy = TextTokens(text.features + 5 * torch.randn_like(text.features) * ~text.mask[..., None], text.mask)
    torch.testing.assert_close(model.logits(codes, noisy), model.logits(codes, text), rtol=0, atol=1e-6)
    first_token = text.features.clone()
    first_token[0, -1] += 1.0  # row 0's one token
    assert (model.logits(codes, TextTokens(first_token, text.mask))[0] - model.logits(codes, text)[0]).abs().max() > 1e-3
    # and the mask alone changes the result: unmasking row 0's padding makes it visible
    unmasked = TextTokens(noisy.features, torch.ones_like(text.mask))
    assert (model.logits(codes, unmasked)[0] - model.logits(codes, noisy)[0]).abs().max() > 1e-3


def test_x_transformers_options_reach_its_decoder():
    """decoder_options are x_transformers.Decoder keywords: dropout makes training-mode losses differ and leaves
    eval mode deterministic; a wider feed-forward has more weights."""
    cfg = config("class", decoder="x-transformers", decoder_options={"attn_dropout": 0.5, "ff_dropout": 0.5})
    model = random_model(cfg)
    codes, labels = torch.randint(0, cfg.codebook_size, (4, cfg.sequence_length)), condition_for(cfg, 4)
    assert model(codes, labels).item() == model(codes, labels).item()
    model.train()
    assert model(codes, labels).item() != model(codes, labels).item()
    narrow = Generator(config("class", decoder="x-transformers", decoder_options={"ff_mult": 2}))
    wide = Generator(config("class", decoder="x-transformers", decoder_options={"ff_mult": 4}))
    assert wide.num_parameters() - narrow.num_parameters() > 0


@pytest.mark.parametrize("decoder,options,message", [
    ("transformer", {}, "model.decoder='transformer': choose one of"),
    ("llama", {"ff_dropout": 0.1}, "the llama decoder takes none"),
    ("x-transformers", {"depth": 3}, "the generator sets these"),
    ("x-transformers", {"no_such_option": 1}, "x_transformers.Decoder refused them"),
    ("x-transformers", {"rotary_emb_dim": 8}, "the generator sets these"),
    ("x-transformers", {"shift_tokens": 1}, "KV-cached sampling or exact resume does not hold"),
])
def test_bad_decoder_choices_are_refused_naming_the_key(decoder, options, message):
    with pytest.raises(ConfigError, match=message):
        Generator(config("class", decoder=decoder, decoder_options=options))


def test_the_x_transformers_decoder_by_default_has_the_llama_decoders_products():
    """Its defaults are size-matched: the four attention projections and a SwiGLU as wide as the llama decoder's,
    so training FLOPs (counted from the built module) are the same."""
    llama, xt = config("class", size="tiny"), config("class", size="tiny", decoder="x-transformers")
    assert training_flops_per_token(xt) == training_flops_per_token(llama)
    ff = Generator(xt).decoder.net.layers[1][1].ff
    assert [m.weight.shape for m in ff.modules() if isinstance(m, torch.nn.Linear)] == \
        [(2 * swiglu_hidden(xt.dim), xt.dim), (xt.dim, swiglu_hidden(xt.dim))]


@pytest.mark.parametrize("options", [{"attn_qk_norm": True}, {"ff_relu_squared": True, "ff_glu": False},
                                     {"attn_gate_values": True}, {"attn_num_mem_kv": 2}, {"ff_mult": 2}])
def test_x_transformers_variants_sample_through_the_cache_as_they_score(options):
    """The cache holds what these variants need: cached logits equal the uncached ones."""
    cfg = config("tokens", decoder="x-transformers", decoder_options=options)
    model = random_model(cfg)
    codes, condition = torch.randint(0, cfg.codebook_size, (2, cfg.sequence_length)), condition_for(cfg, 2)
    torch.testing.assert_close(cached_logits(model, codes, condition), model.logits(codes, condition), rtol=1e-4,
                               atol=1e-4)
