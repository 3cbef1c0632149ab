"""Stage 1's speed options: run.compile and run.channels_last change how a step computes, never what (losses,
state dict keys, checkpoints, resume), and their auto rules."""
import pytest
import torch
import torch._functorch.config
from test_train_tokenizer import assert_bitwise_equal, states, tiny_config

from simvq_common.checkpoint import list_checkpoints
from simvq_common.run_dir import read_metrics
from stage1_tokenizer.tokenizer import Tokenizer
from stage1_tokenizer.train import (
    CHANNELS_LAST_AUTO,
    TokenizerTrainer,
    train_tokenizer,
    use_channels_last,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def losses(run_dir) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir / "metrics.jsonl")]


def assert_close_losses(a: list[float], b: list[float], rtol: float) -> None:
    assert len(a) == len(b) > 0
    for step, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= rtol * abs(x), f"step {step}: {x} vs {y}"


def checkpoint_keys(run_dir) -> dict[str, list[str]]:
    saved = torch.load(list_checkpoints(run_dir / "checkpoints")[-1], weights_only=False)
    return {part: list(saved[part]) for part in ("tokenizer", "ema", "discriminator")}


def test_auto_rules():
    assert use_channels_last(None, CPU) == ("cpu" in CHANNELS_LAST_AUTO)
    assert use_channels_last(None, CUDA) == ("cuda" in CHANNELS_LAST_AUTO)
    for device in (CPU, CUDA):
        assert use_channels_last(True, device) and not use_channels_last(False, device)


def test_channels_last_gives_the_same_losses_keys_and_exact_resume(tmp_path, one_thread):
    nchw, nhwc = tmp_path / "nchw", tmp_path / "nhwc"
    train_tokenizer(tiny_config(nchw, "run.steps=4", "run.channels_last=false"))
    train_tokenizer(tiny_config(nhwc, "run.steps=2", "run.channels_last=true"))  # then resumed to 4
    trainer = TokenizerTrainer(tiny_config(nhwc, "run.steps=4", "run.channels_last=true"))
    assert trainer.step == 2 and trainer.channels_last and not trainer.compiled
    # the option took effect: NHWC conv weights in the trained models, and the batch follows
    for net in (trainer.tokenizer, trainer.discriminator):
        convs = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                             for w in convs if w.shape[2:] != (1, 1))
    trainer.train()
    assert_close_losses(losses(nchw), losses(nhwc), rtol=1e-6)
    assert checkpoint_keys(nchw) == checkpoint_keys(nhwc)
    # N + resume + N steps in NHWC equals 2N straight NHWC steps, bitwise
    straight = tmp_path / "nhwc_straight"
    train_tokenizer(tiny_config(straight, "run.steps=4", "run.channels_last=true"))
    assert losses(straight) == losses(nhwc)
    assert_bitwise_equal(states(straight)[0], states(nhwc)[0])
    # the export rebuilds the tokenizer, with the same keys as NCHW training's
    exported = Tokenizer.from_pretrained(nhwc / "tokenizer")
    assert exported.state_dict().keys() == Tokenizer.from_pretrained(nchw / "tokenizer").state_dict().keys()
    assert exported.fingerprint() == Tokenizer.from_pretrained(straight / "tokenizer").fingerprint()


@pytest.mark.slow
def test_compiled_training_equals_eager_and_resumes(tmp_path, one_thread):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    train_tokenizer(tiny_config(eager, "run.steps=4", "run.compile=false"))
    train_tokenizer(tiny_config(compiled, "run.steps=2", "run.compile=true"))  # then resumed to 4, compiled
    trainer = TokenizerTrainer(tiny_config(compiled, "run.steps=4", "run.compile=true"))
    assert trainer.step == 2 and trainer.compiled
    compiled_nets = [trainer.tokenizer.encoder, trainer.tokenizer.decoder, trainer.discriminator]
    assert all(net._compiled_call_impl is not None for net in compiled_nets)  # compiled in place ...
    trainer.train()
    # ... so the state dicts and checkpoints keep their own keys
    assert not any("_orig_mod" in key for key in trainer.tokenizer.state_dict())
    assert checkpoint_keys(eager) == checkpoint_keys(compiled)
    assert Tokenizer.from_pretrained(compiled / "tokenizer").state_dict().keys() == trainer.ema.state_dict().keys()
    assert_close_losses(losses(eager), losses(compiled), rtol=1e-5)
    assert losses(eager)[0] != losses(eager)[-1]  # the steps trained something (the GAN is on from step 1)


@pytest.mark.slow
def test_compiled_training_with_the_adaptive_gan_weight_equals_eager(tmp_path, one_thread):
    # the adaptive weight backpropagates through the decoder and D twice before the real backward: a compiled D
    # got a wrong gradient from its second backward (0.6% off the eager loss at step 2), so D stays eager then
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    extra = ("run.steps=3", "loss.gan_adaptive=true")
    train_tokenizer(tiny_config(eager, *extra, "run.compile=false"))
    previous = torch._functorch.config.donated_buffer  # the trainer turns it off for the process; restored here
    try:
        train_tokenizer(tiny_config(compiled, *extra, "run.compile=true"))
    finally:
        torch._functorch.config.donated_buffer = previous
    assert_close_losses(losses(eager), losses(compiled), rtol=1e-5)
    gan_weights = [m["gan_weight"] for m in read_metrics(compiled / "metrics.jsonl")]
    assert gan_weights[0] == 0 and all(w > 0 for w in gan_weights[1:])  # the adaptive weight ran
