"""Memory admission control: the budget flag, refusals at submission (a real server process with
`--max-prompt-memory 64MB`, and the CLI), and a node that runs out of memory failing its prompt alone."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import uuid

import pytest

from diffusion.checkpoints.random_checkpoints import write_random_checkpoint
from graph.validation import validate_prompt
from nodes import build_registry
from nodes.environment import Environment
from server.admission import Budget, MemoryLimit, check, memory_limit_option, parse_memory_limit
from server.cli import main
from tests.nodes.test_sd_nodes import txt2img
from tests.server.harness import ROOT, make_data_dir
from tests.server.test_api_flow import wait_history

GiB, MiB = 1 << 30, 1 << 20
PLUGIN = "from tests.server.memory_nodes import NODE_CLASSES  # noqa: F401\n"


def test_memory_limit_parsing():
    assert parse_memory_limit("4GB") == MemoryLimit(bytes=4 * GiB)
    assert parse_memory_limit("512MB") == parse_memory_limit("512 MiB") == parse_memory_limit("512m")
    assert parse_memory_limit("1.5GiB").bytes == 3 * GiB // 2
    assert parse_memory_limit("1073741824") == MemoryLimit(bytes=GiB)
    assert parse_memory_limit("0.5") == MemoryLimit(fraction=0.5)
    assert parse_memory_limit(None) == MemoryLimit(fraction=0.75)
    assert parse_memory_limit("off").of(GiB) is None and parse_memory_limit("0.5").of(GiB) == GiB // 2
    for bad in ("lots", "-1GB", "0", "2", "4XB", "1.5.2GB"):
        with pytest.raises(ValueError):
            parse_memory_limit(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="fraction"):
        memory_limit_option("0")
    assert memory_limit_option("4GB") == "4GB"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = make_data_dir(tmp_path_factory.mktemp("admission") / "data")
    (folder / "custom_nodes" / "memorypack.py").write_text(PLUGIN)
    (folder / "models" / "checkpoints").mkdir(parents=True)
    write_random_checkpoint(folder / "models" / "checkpoints" / "sd1.safetensors", "sd1")
    return folder


def test_tiled_decode_is_admitted_where_a_whole_decode_is_not(data):
    env = Environment(data)
    registry = build_registry(env, plugins=False)
    prompt = {"5": {"class_type": "EmptyLatentImage", "inputs": {"width": 4096, "height": 4096, "batch_size": 1}},
              "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
              "8": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["4", 2]}},
              "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "t"}}}
    whole = validate_prompt(prompt, registry, env).prompt
    [overrun] = check(whole, env, Budget("cpu", 4 * GiB))
    assert overrun.node_id == "8" and overrun.limit == 4 * GiB and overrun.needed > 4 * GiB
    prompt["8"] = {"class_type": "VAEDecodeTiled", "inputs": {
        "samples": ["5", 0], "vae": ["4", 2], "tile_size": 512, "overlap": 64, "temporal_size": 64,
        "temporal_overlap": 8}}
    assert check(validate_prompt(prompt, registry, env).prompt, env, Budget("cpu", 4 * GiB)) == []
    # on a GPU the outputs the executor keeps on the host are held to the host's limit
    prompt["5"]["inputs"]["batch_size"] = 64
    [host] = check(validate_prompt(prompt, registry, env).prompt, env, Budget("cuda:0", 80 * GiB, 8 * GiB))
    assert host.node_id == "8" and "of the host's RAM" in host.message and "for a 64×3×4096×4096 image" in host.message


@pytest.fixture(scope="module")
def server(start_server, data):
    return start_server("--max-prompt-memory", "64MB", data_dir=data)


DECODE = re.compile(r"^VAEDecode \(node 8\) would need about [\d.]+ (MiB|GiB|TiB) for a 1×3×2048×2048 image; the "
                    r"limit is 64\.0 MiB( on cuda:\d+)?\. To make it fit: use VAE Decode \(Tiled\) instead, a smaller "
                    r"batch or a smaller image\.$")


def test_a_prompt_over_the_budget_is_refused_with_comfyui_error_json(server):
    prompt_id = uuid.uuid4().hex
    status, body = server.json("POST", "/prompt", {"prompt": txt2img(size=2048, steps=1), "prompt_id": prompt_id})
    assert status == 400
    assert set(body) == {"error", "node_errors"}
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["error"]["message"] == "Prompt outputs failed validation"
    assert set(body["node_errors"]) == {"3", "8"}  # the sampler (first to fail) and the decode
    entry = body["node_errors"]["8"]
    assert entry["class_type"] == "VAEDecode" and entry["dependent_outputs"] == ["9"]
    [err] = entry["errors"]
    assert err["type"] == "memory_limit_exceeded"
    assert err["message"] == "Prompt would need more memory than this server allows"
    assert DECODE.match(err["details"]), err["details"]
    assert err["extra_info"]["limit_bytes"] == 64 * MiB and err["extra_info"]["estimated_bytes"] > 64 * MiB
    sampler = body["node_errors"]["3"]["errors"][0]["details"]
    assert sampler.startswith("KSampler (node 3) would need about ") and "a smaller batch" in sampler
    assert body["error"]["details"].splitlines() == [sampler, err["details"]]
    assert server.json("GET", f"/history/{prompt_id}") == (200, {})
    queue = server.json("GET", "/queue")[1]
    assert queue == {"queue_running": [], "queue_pending": []}


def test_an_out_of_memory_node_fails_its_prompt_and_the_next_prompt_runs(server):
    failing = txt2img(size=64, steps=1)
    failing["20"] = {"class_type": "RaiseOutOfMemory", "inputs": {"samples": ["3", 0]}}
    status, body = server.json("POST", "/prompt", {"prompt": failing, "partial_execution_targets": ["20"]})
    assert status == 200, body
    entry = wait_history(server, body["prompt_id"], timeout=120)
    assert entry["status"]["status_str"] == "error"
    [error] = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
    assert error["node_id"] == "20" and error["node_type"] == "RaiseOutOfMemory"
    assert error["exception_message"] == (
        "RaiseOutOfMemory (node 20) ran out of memory (CUDA out of memory. Tried to allocate 64.00 GiB (GPU 0; "
        "8.00 GiB total capacity)). To make it fit: use a smaller batch or a smaller size.")
    status, body = server.json("POST", "/prompt", {"prompt": txt2img(size=64, steps=1)})
    assert status == 200, body
    entry = wait_history(server, body["prompt_id"], timeout=120)
    assert entry["status"]["status_str"] == "success" and entry["outputs"]["9"]["images"]
    assert server.proc.poll() is None


def test_cli_validate_and_run_refuse_over_the_budget(data, tmp_path, capsys):
    workflow = tmp_path / "big.json"
    workflow.write_text(json.dumps(txt2img(size=2048, steps=1)))
    assert main(["--data-dir", str(data), "validate", "--max-prompt-memory", "64MB", str(workflow)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("node 3 (KSampler): KSampler (node 3) would need about ")
    assert DECODE.match(lines[1].removeprefix("node 8 (VAEDecode): ")), lines
    assert main(["--data-dir", str(data), "validate", "--max-prompt-memory", "off", str(workflow)]) == 0
    assert capsys.readouterr().out.startswith("valid: ")
    with pytest.raises(SystemExit) as exited:
        main(["--data-dir", str(data), "validate", "--max-prompt-memory", "lots", str(workflow)])
    assert exited.value.code == 2 and "--max-prompt-memory" in capsys.readouterr().err
    run = subprocess.run([sys.executable, "-m", "server.cli", "--data-dir", str(data), "run", "--max-prompt-memory",
                          "64MB", "--output", str(tmp_path / "out"), str(workflow)], cwd=ROOT, capture_output=True,
                         text=True, timeout=180)
    assert run.returncode == 1 and run.stderr.startswith("invalid: node 3 (KSampler): "), run.stderr
    assert "running node" not in run.stderr and not (tmp_path / "out").exists()  # refused before anything ran
