"""--preview-method on a real server: `taesd` sends previews made by the tiny decoder found for the checkpoint,
`latent2rgb` keeps the linear map although a decoder is there, `none` sends no preview at all."""

from __future__ import annotations

import asyncio
import io
import struct
import uuid

import aiohttp
import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.checkpoints.files import read_state_dict
from diffusion.checkpoints.random_checkpoints import write_random_checkpoint
from diffusion.models.taesd import TinyDecoder, load_tiny_decoder, write_tiny_decoder
from server.prompt_run import encode_preview
from tests.nodes.test_sd_nodes import txt2img
from tests.server.harness import make_data_dir
from tests.server.test_api_flow import collect, wait_history


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tiny SD1 checkpoint `sd1` and a tiny decoder named after it (random, scaled to show mid-range colours)."""
    data = make_data_dir(tmp_path_factory.mktemp("previews") / "data")
    (data / "models" / "checkpoints").mkdir(parents=True)
    (data / "models" / "vae_approx").mkdir(parents=True)
    write_random_checkpoint(data / "models" / "checkpoints" / "sd1.safetensors", "sd1")
    torch.manual_seed(7)
    decoder = TinyDecoder(4, 8)
    with torch.no_grad():
        spread = decoder(torch.randn(4, 4, 8, 8)).std()
        decoder[19].weight.mul_(0.25 / spread)
        decoder[19].bias.fill_(0.5)
    write_tiny_decoder(data / "models" / "vae_approx" / "sd1_taesd_decoder.safetensors", decoder,
                       dtype=torch.float32)
    return data


def run_prompt(server, prompt):
    async def flow():
        client_id, prompt_id = uuid.uuid4().hex, uuid.uuid4().hex
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws:
            await ws.receive()
            async with session.post(f"{server.url}/prompt", json={
                    "prompt": prompt, "client_id": client_id, "prompt_id": prompt_id}) as response:
                assert response.status == 200, await response.text()
            return prompt_id, *(await collect(ws, prompt_id, timeout=120))

    prompt_id, _, frames = asyncio.run(flow())
    assert wait_history(server, prompt_id)["status"]["status_str"] == "success"
    return [np.asarray(Image.open(io.BytesIO(f[8:])).convert("RGB"), dtype=np.float32) for f in frames
            if struct.unpack(">I", f[:4])[0] == 1]


def prompt_with_saved_latent():
    prompt = txt2img(steps=3, sampler="euler")  # euler's last step lands on the last denoised estimate
    prompt["10"] = {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "previewed"}}
    return prompt


def test_taesd_previews_come_from_the_tiny_decoder(start_server, data_dir, monkeypatch):
    monkeypatch.setenv("LATENTLOOM_PREVIEW_SHARE", "1")  # every frame, however loaded the machine (budget: unit test)
    server = start_server("--preview-method", "taesd", data_dir=data_dir)
    frames = run_prompt(server, prompt_with_saved_latent())
    assert len(frames) == 3 and frames[-1].shape == (64, 64, 3)  # the latent's size x8, not the linear map's 8x8
    # a LATENT holds the VAE's own latents; samplers (and their previews) work on them times SD1's 0.18215
    latent = read_state_dict(next((data_dir / "output").glob("previewed_*.latent")))["latent_tensor"] * 0.18215
    decoder = load_tiny_decoder(data_dir / "models" / "vae_approx" / "sd1_taesd_decoder.safetensors")
    with torch.no_grad():
        expected = (decoder(latent.float()).clamp(0, 1)[0].permute(1, 2, 0) * 255).numpy()
    assert expected.std() > 5  # the decoder's picture has structure, so agreeing with it means something
    sent = Image.open(io.BytesIO(encode_preview(Image.fromarray(expected.round().astype(np.uint8)))))
    # the server decodes in the UNet's dtype (bf16 on CPUs that have it): a little more than JPEG's loss
    assert np.abs(frames[-1] - np.asarray(sent.convert("RGB"), dtype=np.float32)).mean() < 4
    assert np.abs(frames[-1] - expected).mean() < 20  # JPEG's loss (4:2:0 chroma) on a random decoder's detail


def test_latent2rgb_keeps_the_linear_map_and_none_sends_no_preview(start_server, data_dir):
    server = start_server("--preview-method", "latent2rgb", data_dir=data_dir)
    frames = run_prompt(server, txt2img(steps=3))
    assert len(frames) == 3 and all(f.shape == (8, 8, 3) for f in frames)
    server = start_server("--preview-method", "none", data_dir=data_dir)
    assert run_prompt(server, txt2img(steps=2)) == []
