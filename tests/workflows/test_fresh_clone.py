"""Every shipped workflow runs on a fresh clone with an EMPTY data directory: the repository's own model, LoRA and
example inputs are all it has (house rule). By default through the CLI's main in this process, on the repository
itself, the files it loads checked to be in git; with LATENTLOOM_SLOW=1 also as a fresh clone would: the working
tree's files as git would give them (tracked and not-ignored files, copied into a scratch folder, so an
ignored or stray local file cannot help), a CLI process per workflow. Steps are fewer (`--set`). Workflows that
need files the project cannot ship are listed with the reason and must fail with the error that says where the
file was looked for and where to put it.

tests/workflows/test_shipped_workflows.py runs the same workflows on tiny random checkpoints (faster, every
family); this file runs the real shipped files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.workflows.test_shipped_workflows import EXPECTED, played_frames, run_in_process, without_the_mp4

ROOT = Path(__file__).resolve().parents[2]
# The workflows a fresh clone has: those in git (one still being written, untracked, is not shipped yet).
WORKFLOWS = sorted(ROOT / name for name in subprocess.run(
    ["git", "ls-files", "workflows/*.json"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split())
# Workflows whose files cannot be shipped: (reason, file the error must name, the folder it must say to use).
CANNOT_SHIP = {
    "txt2img-sdxl": ("Stability's SDXL base and refiner checkpoints (about 7 GB each, their licence)",
                     "sd_xl_base_1.0.safetensors", "data/models/checkpoints/"),
}
RUN_SLOW = os.environ.get("LATENTLOOM_SLOW") == "1"
Runner = Callable[..., tuple[int, str, str]]  # (data directory, CLI arguments...) -> (status, stdout, stderr)
# What the runnable workflows load from the repository, which must therefore be in git, not just on this disk.
def needed_files(workflow: dict) -> set[str]:
    """The repository files a workflow loads: its `models` entries (models/<directory>/<name>) and the images of its
    LoadImage nodes (examples/input/<name>)."""
    files = {f"models/{entry['directory']}/{entry['name']}" for entry in workflow["models"]}
    return files | {f"examples/input/{node['widgets_values'][0]}" for node in workflow["nodes"]
                    if node["type"] in ("LoadImage", "LoadImageMask")}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The working tree's tracked and not-ignored files, copied (a hard link would follow later in-place edits)."""
    root = tmp_path_factory.mktemp("fresh") / "latentloom"
    for name in git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0"):
        source = ROOT / name
        if not name or not source.is_file():  # deleted in the working tree, or a submodule
            continue
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    return root


def run_cli(clone: Path, data: Path, *args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(clone), "OMP_NUM_THREADS": "1"}
    environment.pop("LATENTLOOM_DATA_DIR", None)
    return subprocess.run([sys.executable, "-m", "server.cli", "--data-dir", str(data), *args], cwd=clone,
                          capture_output=True, text=True, timeout=600, env=environment)


def test_every_workflow_is_run_or_excused():
    assert WORKFLOWS and {p.stem for p in WORKFLOWS} <= set(EXPECTED)  # test_shipped_workflows covers them all
    assert set(CANNOT_SHIP) < set(EXPECTED)


def test_the_shipped_files_are_in_git():
    needed = set().union(*(needed_files(json.loads(p.read_text())) for p in WORKFLOWS if p.stem not in CANNOT_SHIP))
    assert {"examples/input/example.png", "models/loras/latentloom-shapes-new-colour.safetensors"} <= needed
    assert set(git("ls-files", *sorted(needed)).splitlines()) == needed
    assert (ROOT / "models" / "loras" / "latentloom-shapes-new-colour.safetensors").stat().st_size < 4 << 20


@pytest.mark.slow
@pytest.mark.skipif(not RUN_SLOW, reason="the clone is for the slow runs: set LATENTLOOM_SLOW=1")
def test_the_clone_runs_its_own_code(clone):
    proc = subprocess.run([sys.executable, "-c", "import nodes.model_paths as m; print(m.bundled_models_dir())"],
                          cwd=clone, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(clone)})
    assert proc.stdout.strip() == str((clone / "models").resolve())


def run_from_clone(clone: Path) -> Runner:
    def run(data: Path, *args: str) -> tuple[int, str, str]:
        proc = run_cli(clone, data, *args)
        return proc.returncode, proc.stdout, proc.stderr
    return run


def check_workflow(path: Path, run: Runner, workflows: Path, tmp_path: Path) -> None:
    """Run a shipped workflow with an empty data directory: its output is written (size, frames, a picture, the
    workflow in the PNG), the user's folders stay empty; the LoRA turns the picture orange; a workflow that needs
    files we cannot ship fails, saying where the file was looked for and where to put it."""
    data = tmp_path / "data"
    data.mkdir()
    workflow = workflows / path.name
    if path.stem in CANNOT_SHIP:
        _, missing, folder = CANNOT_SHIP[path.stem]
        status, out, err = run(data, "run", str(workflow))
        assert status == 1, err[-2000:]
        assert f"'{missing}' not found in {folder}" in err and f"put it in {folder}" in err
        assert str(tmp_path) not in out + err
        return
    size, frames, overrides = EXPECTED[path.stem]
    args = ["run", str(workflow), *[arg for item in overrides for arg in ("--set", item)]]
    status, out, err = run(data, *args)
    assert status == 0, err[-3000:]
    files = [Path(line.split(": ", 1)[1]) for line in out.splitlines() if ": " in line]
    if path.stem == "video":  # an MP4 beside the animated WebP
        files = without_the_mp4(files, size, frames)
    assert len(files) == 1 and files[0].is_file() and files[0].parent == data / "output"
    with Image.open(files[0]) as image:
        assert image.size == size and played_frames(image, json.loads(workflow.read_text())) == frames
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        if image.format == "PNG":  # the saved file carries the workflow that made it
            assert json.loads(image.text["workflow"]) == json.loads(workflow.read_text())
    assert pixels.std() > 5  # a picture, not a flat or black frame
    for folder in (data / "input", data / "models"):  # nothing was copied into the user's folders
        assert not folder.exists() or not [p for p in folder.rglob("*") if p.is_file()]
    if path.stem == "inpaint":  # the green shape is painted into the example's transparent square, not elsewhere
        from train.make_examples import HOLE

        # green by hue: the model paints the triangle darker there than the palette's (35, 185, 55) (median
        # (11, 88, 13) in the hole at 20 steps)
        r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
        green = (g > r + 30) & (g > b + 30)
        assert green[HOLE].sum() >= 40 and green[HOLE].sum() >= 0.8 * green.sum()  # measured: 166 of 168 pixels
    if path.stem == "lora":  # the shipped LoRA teaches the colour the base model never saw
        assert orange_share(pixels) > 0.1
        status, out, err = run(data, *args, "--set", "10.strength_model=0", "--set", "10.strength_clip=0")
        assert status == 0, err[-3000:]
        without = Path(out.splitlines()[-1].split(": ", 1)[1])
        assert orange_share(np.asarray(Image.open(without).convert("RGB"), dtype=np.float32)) < 0.02


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_with_an_empty_data_directory(path, tmp_path):
    check_workflow(path, run_in_process, ROOT / "workflows", tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not RUN_SLOW, reason="a process per workflow (~100 s in all): set LATENTLOOM_SLOW=1")
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_from_a_clone_with_an_empty_data_directory(path, clone, tmp_path):
    check_workflow(path, run_from_clone(clone), clone / "workflows", tmp_path)


def orange_share(pixels: np.ndarray) -> float:
    """The share of pixels within 60 (RGB distance) of the LoRA's orange, train.shapes.NEW_COLOUR_RGB. Measured at
    6 steps, seed 42: 0.333 with the LoRA, 0.0 without; at the workflow's 20 steps over seeds 42-47 0.370 and
    0.036 (the checker called 6 of 6 images orange with it, 1 of 6 without)."""
    from train.shapes import NEW_COLOUR_RGB

    return float((np.linalg.norm(pixels - np.array(NEW_COLOUR_RGB, dtype=np.float32), axis=-1) < 60).mean())
