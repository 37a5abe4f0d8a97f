"""The command-line flags ComfyUI users type, and ours: each one observed doing what it says (the dtype a model is
loaded in, the folder a file lands in, the device and memory mode of the model manager, the address bound, what
the server sends), contradicting combinations as one line, and `--help` without importing torch."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from diffusion.checkpoints.random_checkpoints import write_random_checkpoint
from diffusion.devices import model_dtype
from nodes.environment import manager_options
from nodes.loaders import load_checkpoint_handles
from server import cli, cli_serve
from server.app import create_app
from tests.server.harness import ServerProcess, make_data_dir

ROOT = Path(__file__).resolve().parents[2]


def parse(*argv: str):
    return cli.build_parser().parse_args(list(argv))


def environment(tmp_path, *flags: str, command: tuple[str, ...] = ("validate", "w.json")):
    return cli.make_environment(parse("--data-dir", str(tmp_path / "data"), *flags, *command))


# --help ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [[], ["run"], ["validate"], ["nodes"], ["serve"]])
def test_help_answers_without_importing_torch(command):
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "server.cli", *command, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr
    assert "usage: latentloom" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    assert "server.cli" in imported or "server.cli_options" in imported  # -X importtime did report
    heavy = sorted(name for name in imported if name.split(".")[0] in ("torch", "numpy", "aiohttp", "nodes", "graph"))
    assert heavy == [], f"--help imported {heavy[:5]}"
    print(f"latentloom {' '.join(command)} --help: {elapsed:.2f} s")


def test_help_lists_the_comfyui_flags():
    text = cli.build_parser().format_help()
    serve = cli.build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for flag in ("--cpu", "--cuda-device", "--force-fp32", "--force-fp16", "--bf16-unet", "--fp32-vae", "--lowvram",
                 "--novram", "--highvram", "--output-directory", "--input-directory", "--temp-directory",
                 "--extra-model-paths-config", "--device", "--precision"):
        assert flag in text and flag in serve
    for flag in ("--listen", "--port", "--user-directory", "--preview-method", "--max-upload-size", "--auto-launch",
                 "--disable-auto-launch"):
        assert flag in serve


# Contradictions ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "message"), [
    (["--cpu", "serve", "--cuda-device", "1"], "--cpu and --cuda-device 1 contradict each other"),
    (["--device", "cpu", "validate", "w.json", "--cpu"], "--device cpu and --cpu contradict each other"),
    (["--force-fp32", "--force-fp16", "nodes"], "--force-fp32 and --force-fp16 contradict each other"),
    (["run", "w.json", "--precision", "bf16", "--force-fp32"], "--precision bf16 and --force-fp32 contradict"),
    (["--lowvram", "serve", "--highvram"], "--lowvram and --highvram contradict each other"),
    (["serve", "--listen", "--host", "0.0.0.0"], "--listen 0.0.0.0 and --host 0.0.0.0 contradict each other"),
    (["serve", "--listen", "127.0.0.1,,::1"], "--listen 127.0.0.1,,::1: an empty address in the list"),
    (["run", "w.json", "--output", "a", "--output-directory", "b"], "--output a and --output-directory b"),
    (["--device", "tpu", "nodes"], "--device tpu: use cpu, cuda, cuda:N or mps"),
])
def test_contradicting_flags_are_one_line(tmp_path, capsys, argv, message):
    status = cli.main(["--data-dir", str(tmp_path / "data"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == cli.EXIT_USAGE
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_auto_launch_flags_exclude_each_other():
    with pytest.raises(SystemExit):
        parse("serve", "--auto-launch", "--disable-auto-launch")


# Device --------------------------------------------------------------------------------------------------------------

def test_device_flags_choose_the_model_managers_device(tmp_path):
    assert environment(tmp_path).device is None  # the best present
    for flags in (["--cpu"], ["--device", "cpu"]):
        env = environment(tmp_path, *flags)
        assert env.device == "cpu" and env.model_manager().device == torch.device("cpu")
        assert [d["type"] for d in env.device_stats()] == ["cpu"]  # the server's workers: the CPU's alone
    # after the command too, as --data-dir
    env = environment(tmp_path, command=("serve", "--cpu"))
    assert env.device == "cpu"


def test_a_gpu_that_is_not_there_is_one_line(tmp_path, capsys):
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = count + 1
    workflow = tmp_path / "w.json"
    workflow.write_text("{}")
    status = cli.main(["--data-dir", str(tmp_path / "data"), "--cuda-device", str(index), "validate", str(workflow)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == cli.EXIT_USAGE and len(err) == 1
    expected = "CUDA is not available" if count == 0 else f"this machine has {count} CUDA device(s)"
    assert err[0].startswith(f"error: --cuda-device {index}: device 'cuda:{index}' asked for") and expected in err[0]
    status = cli.main(["--data-dir", str(tmp_path / "data"), "validate", str(workflow), "--device", f"cuda:{index}"])
    assert status == cli.EXIT_USAGE and f"--device cuda:{index}: " in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_device_selects_that_gpu(tmp_path):
    env = environment(tmp_path, "--cuda-device", "0")
    assert env.model_manager().device == torch.device("cuda", 0)
    assert [(d["type"], d["index"]) for d in env.device_stats()] == [("cuda", 0)]


# Precision -----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    write_random_checkpoint(path, "sd1", seed=3)
    return path


def loaded_dtypes(env, checkpoint) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    folder = env.models_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / checkpoint.name).write_bytes(checkpoint.read_bytes())
    model, clip, vae = load_checkpoint_handles(env, checkpoint.name)
    text = {next(p.model.parameters()).dtype for p in clip.patchers.values()}
    assert len(text) == 1
    return next(model.patcher.model.parameters()).dtype, text.pop(), next(vae.patcher.model.parameters()).dtype


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.mark.parametrize(("flags", "unet", "text", "vae"), [
    (["--force-fp32"], F32, F32, F32),
    (["--precision", "fp32"], F32, F32, F32),
    (["--precision", "bf16"], BF16, BF16, BF16),
    (["--force-fp16"], F16, F16, F32),  # a VAE is never fp16: its activations overflow
    (["--precision", "bf16", "--fp32-vae"], BF16, BF16, F32),
    (["--force-fp32", "--bf16-unet"], BF16, F32, F32),
])
def test_precision_flags_set_the_dtype_of_a_loaded_checkpoint(tmp_path, checkpoint, flags, unet, text, vae):
    env = environment(tmp_path, "--cpu", *flags)
    assert loaded_dtypes(env, checkpoint) == (unet, text, vae)


def test_force_fp32_overrides_a_bf16_capable_cpu():
    """Without a flag a CPU with native bf16 matmuls gets bf16 (the question the issue asks: how to force fp32)."""
    amx, plain = {"amx_bf16"}, {"avx2"}
    assert model_dtype("cpu", "unet", cpu_flags=amx) == BF16
    assert model_dtype("cpu", "unet", precision="fp32", cpu_flags=amx) == F32
    assert model_dtype("cpu", "vae", precision="fp32", cpu_flags=amx) == F32
    assert model_dtype("cpu", "unet", cpu_flags=plain) == F32
    assert model_dtype("cpu", "unet", unet_precision="bf16", cpu_flags=plain) == BF16
    assert model_dtype("cpu", "text", unet_precision="bf16", cpu_flags=plain) == F32
    assert model_dtype("cuda", "vae", precision="fp16", cuda_bf16=False) == F32
    assert model_dtype("cuda", "image", cuda_bf16=False) == F32
    assert model_dtype("cuda", "model", cuda_bf16=False) == F16
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        model_dtype("cpu", precision="fp8")


def test_memory_estimates_use_the_forced_precision(tmp_path):
    """Admission control (--max-prompt-memory) counts activations in the dtype the models will really run in."""
    from graph.memory_estimate import EstimateContext
    from nodes.estimates import compute_itemsize

    for flags, unet, vae in ((["--force-fp32"], 4, 4), (["--precision", "bf16"], 2, 2), (["--force-fp16"], 2, 4),
                             (["--force-fp32", "--bf16-unet"], 2, 4), (["--force-fp16", "--fp32-vae"], 2, 4)):
        context = EstimateContext(environment(tmp_path, *flags), "cpu")
        assert (compute_itemsize(context), compute_itemsize(context, for_vae=True)) == (unet, vae), flags


# Memory modes ----------------------------------------------------------------------------------------------------

def test_vram_flags_shape_the_model_manager(tmp_path):
    layer = torch.nn.Linear(64, 64)
    from diffusion.patches.patcher import ModelPatcher

    def resident_bytes(*flags: str) -> int:
        env = environment(tmp_path, "--cpu", *flags)
        manager = env.model_manager()
        manager.load([ModelPatcher(layer, manager.device, manager.offload_device, name="layer")])
        return manager.loaded()[0][1]

    size = sum(t.numel() * t.element_size() for t in layer.parameters())
    assert resident_bytes() == size
    assert resident_bytes("--lowvram") == size  # fits: nothing to stream
    assert resident_bytes("--novram") == 0  # every layer streamed
    low = environment(tmp_path, "--lowvram").model_manager()
    assert low.low_memory and low.budget_bytes is None
    high = environment(tmp_path, "--cpu", "--highvram").model_manager()
    assert high.offload_device == high.device
    gpu = torch.device("cuda", 0)
    assert manager_options("high", gpu)["offload_device"] == gpu  # models rest on the GPU, never back to RAM
    assert manager_options("normal", gpu)["offload_device"] == "cpu"
    assert environment(tmp_path).vram == "normal"


# Folders -----------------------------------------------------------------------------------------------------------

def test_folder_flags_move_input_output_and_temp(tmp_path, capsys):
    data, inputs, outputs, temp = (tmp_path / name for name in ("data", "in", "out", "tmp"))
    inputs.mkdir()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(inputs / "grey.png")
    workflow = tmp_path / "w.json"
    workflow.write_text(json.dumps({
        "1": {"class_type": "LoadImage", "inputs": {"image": "grey.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "flags"}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}))
    status = cli.main(["--data-dir", str(data), "--input-directory", str(inputs), "--output-directory", str(outputs),
                       "run", str(workflow), "--temp-directory", str(temp), "--cpu"])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert [p.name for p in outputs.iterdir()] == ["flags_00001_.png"]
    assert len(list((temp / "temp").glob("*.png"))) == 1  # ComfyUI's layout: DIR/temp
    assert not (data / "output").exists() or not any((data / "output").iterdir())
    assert str(outputs / "flags_00001_.png") in printed.out


def test_extra_model_paths_config_is_our_extra_model_paths_and_repeats(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    (tmp_path / "one.yaml").write_text(f"one:\n  base_path: {first}\n  checkpoints: ckpts\n")
    (tmp_path / "two.yaml").write_text(f"two:\n  base_path: {second}\n  loras: lora\n  checkpoints: ck\n")
    env = environment(tmp_path, "--extra-model-paths-config", str(tmp_path / "one.yaml"),
                      command=("serve", "--extra-model-paths-config", str(tmp_path / "two.yaml")))
    assert env.extra_model_dirs["loras"] == [second / "lora"]  # the later position wins, as --data-dir
    env = environment(tmp_path, "--extra-model-paths-config", str(tmp_path / "one.yaml"),
                      "--extra-model-paths", str(tmp_path / "two.yaml"))
    assert env.extra_model_dirs["checkpoints"] == [first / "ckpts", second / "ck"]
    assert env.model_dirs("checkpoints")[1:3] == [first / "ckpts", second / "ck"]


def test_ray_workers_take_over_the_engine_flags(tmp_path):
    from server.ray_actor import PromptWorker, engine_options

    env = environment(tmp_path, "--force-fp16", "--bf16-unet", "--novram", "--input-directory", str(tmp_path / "in"))
    env.preview_method = "latent2rgb"  # a serve flag (server/state.py sets it)
    options = json.loads(json.dumps(engine_options(env)))  # plain values, as an actor is sent them
    worker = PromptWorker("wflags", str(make_data_dir(tmp_path / "data")), scratch_root=str(tmp_path / "scratch"),
                          engine=options)
    try:
        got = worker.env
        assert (got.precision, got.unet_precision, got.vram, got.input_dir) == ("fp16", "bf16", "no", tmp_path / "in")
        assert got.preview_method == "latent2rgb" and worker.executor.previews
        assert (got.model_dtype("unet"), got.model_dtype("text"), got.model_dtype("vae")) == (BF16, F16, F32)
    finally:
        worker.shutdown()


# Server flags ------------------------------------------------------------------------------------------------------

def serve_config(tmp_path, *flags: str):
    args = parse("--data-dir", str(tmp_path / "data"), "serve", *flags)
    return cli_serve.server_config(args, cli.make_environment(args))


def test_listen_binds_every_interface_with_the_host_rules(tmp_path, caplog):
    assert serve_config(tmp_path).host == "127.0.0.1"
    with caplog.at_level(logging.WARNING, logger="latentloom"):
        config = serve_config(tmp_path, "--listen")
    assert config.host == "0.0.0.0"
    assert "listening on 0.0.0.0 without --auth-token" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="latentloom"):
        assert serve_config(tmp_path, "--listen", "0.0.0.0", "--auth-token", "t").host == "0.0.0.0"
        assert serve_config(tmp_path, "--listen", "127.0.0.1").host == "127.0.0.1"
    assert "without --auth-token" not in caplog.text
    assert serve_config(tmp_path, "--port", "9999").port == 9999
    listed = serve_config(tmp_path, "--listen", "127.0.0.1, 0.0.0.0,127.0.0.1", "--auth-token", "t")
    assert listed.hosts == ["127.0.0.1", "0.0.0.0"] and listed.host == "0.0.0.0"  # the rules follow the public one


def test_listen_with_a_list_serves_every_address_on_one_port(tmp_path):
    server = ServerProcess(make_data_dir(tmp_path / "data"), "--listen", "127.0.0.1,127.0.0.2", "--workers", "1")
    server.start()
    try:
        port = server.url.rsplit(":", 1)[1]
        assert server.url.startswith("http://127.0.0.1:")
        for address in ("127.0.0.1", "127.0.0.2"):
            with urllib.request.urlopen(f"http://{address}:{port}/system_stats", timeout=30) as response:
                assert response.status == 200
    finally:
        server.stop()


def test_server_folders_precision_and_upload_size_reach_the_server(tmp_path):
    config = serve_config(tmp_path, "--output-directory", str(tmp_path / "o"), "--input-directory",
                          str(tmp_path / "i"), "--temp-directory", str(tmp_path / "t"), "--user-directory",
                          str(tmp_path / "u"), "--max-upload-size", "3", "--force-fp16", "--fp32-vae", "--novram",
                          "--cpu")
    assert config.max_upload_bytes == 3 << 20
    env = served_state(config).env
    assert (env.output_dir, env.input_dir, env.temp_dir) == (tmp_path / "o", tmp_path / "i", tmp_path / "t/temp")
    assert (env.device, env.vram, env.precision, env.vae_precision) == ("cpu", "no", "fp16", "fp32")
    assert env.model_dtype("unet") == F16 and env.model_dtype("vae") == F32


def served_state(config):
    """The state of an app made from `config`, started and stopped again (its workers, store and folders)."""
    from server.state import STATE

    async def run():
        client = TestClient(TestServer(create_app(config)))
        await client.start_server()
        try:
            return client.server.app[STATE]
        finally:
            await client.close()

    return asyncio.run(run())


def test_user_directory_holds_the_front_ends_files(tmp_path):
    config = serve_config(tmp_path, "--user-directory", str(tmp_path / "people"), "--workers", "1")

    async def probe() -> None:
        client = TestClient(TestServer(create_app(config)))
        await client.start_server()
        try:
            response = await client.post("/userdata/notes.json", data=b'{"a": 1}')
            assert response.status == 200, await response.text()
        finally:
            await client.close()

    asyncio.run(probe())
    assert json.loads((tmp_path / "people" / "default" / "notes.json").read_text()) == {"a": 1}
    assert not (tmp_path / "data" / "user").exists()


@pytest.mark.parametrize(("method", "previews"), [
    ("none", False), ("auto", True), ("latent2rgb", True), ("taesd", True)])
def test_preview_method_decides_whether_samplers_make_previews(tmp_path, method, previews):
    # which previewer a model gets (tiny decoder or linear map) is tests/server/test_preview_method.py's
    config = serve_config(tmp_path, "--preview-method", method, "--workers", "1")
    assert config.preview_method == method
    state = served_state(config)
    assert state.env.preview_method == method
    assert [w.executor.previews for w in state.pool.workers] == [previews]


def test_auto_launch_opens_the_browser_once_the_server_listens(tmp_path, monkeypatch):
    assert parse("serve").auto_launch is False and parse("serve", "--disable-auto-launch").auto_launch is False
    assert parse("serve", "--auto-launch").auto_launch is True
    opened: list[tuple[str, bool]] = []

    def fake_open(url: str) -> bool:
        host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5):  # accepting connections already
            opened.append((url, True))
        asyncio.get_running_loop().call_later(0.2, signal.raise_signal, signal.SIGTERM)
        return True

    monkeypatch.setattr(cli_serve.webbrowser, "open", fake_open)
    config = serve_config(tmp_path, "--listen", "--workers", "1", "--auth-token", "t")
    app = create_app(config)
    asyncio.run(cli_serve._serve(app, config.bind_hosts, 0, cli_serve.open_browser))
    assert len(opened) == 1 and opened[0][0].startswith("http://127.0.0.1:")  # 0.0.0.0 is reached via loopback


def test_listen_in_a_real_process_binds_all_interfaces_and_caps_uploads(tmp_path):
    server = ServerProcess(make_data_dir(tmp_path / "data"), "--listen", "--max-upload-size", "1", "--workers", "1")
    server.start()
    try:
        assert server.url.startswith("http://0.0.0.0:")
        status, _, _ = server.request("GET", "/system_stats")
        assert status == 200
        def post(size: int) -> int:  # a prompt padded to `size` bytes
            body = json.dumps({"prompt": {}, "extra_data": {"pad": "x" * size}}).encode()
            return server.request("POST", "/prompt", raw=body, headers={"Content-Type": "application/json"})[0]

        assert post(512 << 10) == 400  # read (and refused as an empty prompt): under the 1 MB limit
        assert post(3 << 19) == 413  # 1.5 MB: over it (the default limit is 100 MB)
        assert "listening on 0.0.0.0 without --auth-token" in server.log()
    finally:
        server.stop()


def test_weight_cache_flag_sets_the_cast_cache_or_turns_it_off(tmp_path, capsys):
    assert environment(tmp_path).cast_cache_options() == {
        "cast_cache": tmp_path / "data" / "cache" / "weights", "cast_cache_limit": 8 << 30}
    assert environment(tmp_path, "--weight-cache-gb", "0.5").cast_cache_options()["cast_cache_limit"] == 1 << 29
    assert environment(tmp_path, "--weight-cache-gb", "0").cast_cache_options() == {"cast_cache": None}
    assert served_state(serve_config(tmp_path, "--weight-cache-gb", "2")).env.weight_cache_bytes == 2 << 30
    for bad in ("-1", "nan", "inf", "lots"):
        with pytest.raises(SystemExit):
            parse("--weight-cache-gb", bad, "serve")
        assert "--weight-cache-gb" in capsys.readouterr().err
