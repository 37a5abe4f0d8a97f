"""`--compile`: the flag reaches the loaders (run and serve, before or after the command), the UNet's and the VAE
decoder's forward go through torch.compile for plain tensor calls only, a compiler that fails costs one warning
and the eager result, and (slow: Inductor compiles C++ for minutes on a small CPU) the compiled tiny UNet gives the
eager result within dtype tolerance, its kernels cached in the data directory."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch

from diffusion.checkpoints.random_checkpoints import write_random_checkpoint
from diffusion.patches.compile import CompiledForward, compile_forward, uncompile
from nodes.loaders import load_checkpoint_handles
from server import cli, cli_serve
from tests.diffusion.tiny_models import TINY_SD1, tiny_unet, unet_inputs


class RecordingCompiler:
    """Stands in for torch.compile: records what it compiled, returns a function that marks its calls."""

    def __init__(self, fail: bool = False):
        self.fail, self.compiled, self.runs = fail, [], 0

    def __call__(self, fn, dynamic=None):
        self.compiled.append(fn)

        def run(*args):
            if self.fail:
                raise RuntimeError("InductorError: no C++ compiler found\nlong details")
            self.runs += 1
            return fn(*args)

        return run


def test_plain_calls_go_through_the_compiler_and_patched_calls_do_not():
    unet = tiny_unet(TINY_SD1)
    x, t, context = unet_inputs(TINY_SD1)
    expected = unet(x, t, context)
    compiler = RecordingCompiler()
    wrapper = compile_forward(unet, "tiny", compiler)
    assert compile_forward(unet, "tiny", compiler) is wrapper  # wrapped once
    assert torch.equal(unet(x, t, context), expected)
    assert torch.equal(unet(x, t, context, None), expected)  # y=None is a plain call too
    assert compiler.runs == 2 and len(compiler.compiled) == 1 and wrapper.calls == 2
    unet(x, t, context, patches=None)  # keyword arguments: model patches, run eagerly
    assert compiler.runs == 2
    uncompile(unet)
    assert not isinstance(unet.__dict__.get("forward"), CompiledForward)
    assert torch.equal(unet(x, t, context), expected)


def test_a_failing_compiler_costs_one_warning_and_gives_the_eager_result(caplog):
    unet = tiny_unet(TINY_SD1)
    x, t, context = unet_inputs(TINY_SD1)
    expected = unet(x, t, context)
    compiler = RecordingCompiler(fail=True)
    compile_forward(unet, "tiny UNet", compiler)
    with caplog.at_level(logging.WARNING, logger="diffusion.patches.compile"):
        first, second = unet(x, t, context), unet(x, t, context)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["--compile: tiny UNet runs uncompiled (RuntimeError: InductorError: no C++ compiler found)"]
    assert len(compiler.compiled) == 1  # not tried again


def test_calls_under_a_clip_group_norm_run_eagerly():
    from diffusion.models.unet_blocks import clip_group_norm, clip_group_norm_active

    unet = tiny_unet(TINY_SD1)
    x, t, context = unet_inputs(TINY_SD1)
    compiler = RecordingCompiler()
    compile_forward(unet, "tiny", compiler, eager_when=clip_group_norm_active)
    with clip_group_norm(1):
        unet(x, t, context)
    assert compiler.runs == 0
    unet(x, t, context)
    assert compiler.runs == 1


def test_the_unet_and_the_vae_decoder_trace_as_one_graph():
    """No graph breaks (a ContextVar read in the forward used to split the UNet into a graph per ResBlock, and its
    recompiles ran into torch's limit of 8: most of the UNet then ran eagerly)."""
    import torch._dynamo as dynamo

    from diffusion.models.vae import AutoencoderKL, VAEConfig
    from tests.diffusion.tiny_models import TINY_SDXL

    for config in (TINY_SD1, TINY_SDXL):
        with torch.no_grad():
            explained = dynamo.explain(tiny_unet(config).forward)(*unet_inputs(config))
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons[:2]
    vae = AutoencoderKL(VAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4)).eval()
    with torch.no_grad():
        explained = dynamo.explain(vae.decoder.forward)(torch.randn(1, 4, 8, 8))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons[:2]


def parse(*argv: str):
    return cli.build_parser().parse_args(list(argv))


@pytest.mark.parametrize("flags", [("--compile", "run", "w.json"), ("run", "w.json", "--compile"),
                                   ("serve", "--compile"), ("--compile", "serve")])
def test_the_flag_reaches_the_environment_and_the_server(tmp_path, flags):
    args = parse("--data-dir", str(tmp_path / "data"), *flags)
    env = cli.make_environment(args)
    assert env.compile_models
    if "serve" in flags:
        assert cli_serve.server_config(args, env).compile_models
    assert not cli.make_environment(parse("--data-dir", str(tmp_path / "data"), "run", "w.json")).compile_models


def test_loaders_wrap_the_unet_and_the_vae_decoder(tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    write_random_checkpoint(models / "sd1.safetensors", "sd1", seed=3)
    env = cli.make_environment(parse("--data-dir", str(tmp_path / "data"), "--compile", "run", "w.json"))
    env.extra_model_dirs = {"checkpoints": [models]}
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    model, _, vae = load_checkpoint_handles(env, "sd1.safetensors")
    assert isinstance(model.patcher.model.__dict__.get("forward"), CompiledForward)
    assert isinstance(vae.vae.decoder.__dict__.get("forward"), CompiledForward)
    assert model.preview_cache is not None
    from types import SimpleNamespace

    from nodes.model_io import CheckpointLoader

    env.model_cache.clear()
    model, _, vae = CheckpointLoader().execute("v1-inference.yaml", "sd1.safetensors", context=SimpleNamespace(env=env))
    assert isinstance(model.patcher.model.__dict__.get("forward"), CompiledForward)
    assert isinstance(vae.vae.decoder.__dict__.get("forward"), CompiledForward)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "data" / "cache" / "torchinductor")


SLOW = pytest.mark.skipif(os.environ.get("LATENTLOOM_SLOW") != "1",
                          reason="Inductor compiles a tiny UNet in minutes on a small CPU; set LATENTLOOM_SLOW=1")


@SLOW
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_tiny_unet_matches_eager_and_caches_its_kernels(tmp_path, monkeypatch, dtype):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    unet = tiny_unet(TINY_SD1).to(dtype)
    x, t, context = (v.to(dtype) if v.is_floating_point() and v.ndim > 1 else v for v in unet_inputs(TINY_SD1))
    with torch.no_grad():
        expected = unet(x, t, context).float()
        wrapper = compile_forward(unet, "tiny UNet")
        got = unet(x, t, context).float()
    assert wrapper.calls == 1 and not wrapper.failed
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    assert any((tmp_path / "inductor").rglob("*")), "nothing cached"
