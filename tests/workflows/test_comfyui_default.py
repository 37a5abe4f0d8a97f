"""ComfyUI's default text-to-image workflow, in API format, runs unchanged once a checkpoint with the name it
references is in models/checkpoints."""

from __future__ import annotations

import json

from PIL import Image

from diffusion.checkpoints.random_checkpoints import write_random_checkpoint
from tests.workflows.test_shipped_workflows import run_in_process

COMFYUI_DEFAULT = {
    "3": {"class_type": "KSampler", "inputs": {"cfg": 8, "denoise": 1, "latent_image": ["5", 0], "model": ["4", 0],
                                               "negative": ["7", 0], "positive": ["6", 0], "sampler_name": "euler",
                                               "scheduler": "normal", "seed": 8566257, "steps": 20}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"batch_size": 1, "height": 512, "width": 512}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {
        "clip": ["4", 1], "text": "beautiful scenery nature glass bottle landscape, , purple galaxy bottle,"}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "text, watermark"}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}


def test_comfyui_default_workflow_runs_unchanged(tmp_path):
    data = tmp_path / "data"
    (data / "models" / "checkpoints").mkdir(parents=True)
    write_random_checkpoint(data / "models" / "checkpoints" / "v1-5-pruned-emaonly.safetensors", "sd1")
    workflow = tmp_path / "default_api.json"
    workflow.write_text(json.dumps(COMFYUI_DEFAULT))
    status, stdout, stderr = run_in_process(data, "run", str(workflow))
    assert status == 0, stderr[-2000:]
    saved = data / "output" / "ComfyUI_00001_.png"
    assert f"node 9 (SaveImage): {saved}" in stdout
    image = Image.open(saved)
    assert image.size == (512, 512)
    assert json.loads(image.text["prompt"]) == COMFYUI_DEFAULT
