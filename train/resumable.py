"""The loop the single-network recipes share (the demo ControlNet, the tiny preview decoder): one network and its
optimiser trained for `--steps`, saved to one state file every `--save-every` steps and when the budget
(`--minutes`, `--stop-after`) runs out, resumed from it with `--resume`; the result is the same with or without
interruptions because each recipe's batches are functions of (seed, step)."""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch


def add_loop_arguments(p: argparse.ArgumentParser, state: str, base_help: str = "the frozen model") -> None:
    """The flags every resumable recipe takes: its base model, state file, seed and budget."""
    p.add_argument("--base", default="models/checkpoints/latentloom-shapes.safetensors", help=base_help)
    p.add_argument("--state", default=state, help="training-state file (read by --resume)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=0.0, help="stop (state saved) after this long; 0: no limit")
    p.add_argument("--stop-after", type=int, default=0, help="stop (state saved) after this many steps; 0: no limit")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=25)


def run(trainer_class: type[ResumableTrainer], args: argparse.Namespace) -> int:
    """Build the recipe's trainer (resumed with --resume) and train: exit status 0 when its file is written, 3 when
    the budget ran out first (the state is saved; rerun with --resume)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.base).is_file():
        raise SystemExit(f"--base {args.base} is missing: train it with python -m train.train_model")
    trainer = trainer_class(args)
    if args.resume:
        if not Path(args.state).exists():
            raise SystemExit(f"--resume: no training state at {args.state}")
        trainer.load_state()
    return 0 if trainer.train() else 3


def load_sd1_base(path: str) -> Any:
    """The frozen demo-family model a recipe trains against, in fp32; another family is refused by name."""
    from diffusion.checkpoints.loader import load_checkpoint

    base = load_checkpoint(path, dtype=torch.float32)
    if base.family.name != "sd1":
        raise SystemExit(f"{path} is an {base.family.title} checkpoint; this recipe trains for SD1 models")
    return base


class ResumableTrainer:
    """Subclasses set `net` and `opt` in their constructor (after calling this one) and define `train_step()`
    (one optimiser step, returning its loss) and `write(path)` (the finished file)."""

    log = logging.getLogger("train")
    net: torch.nn.Module
    opt: torch.optim.Optimizer

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.step = 0
        self.started = time.monotonic()
        self.steps_this_run = 0

    def train_step(self) -> float:
        raise NotImplementedError

    def write(self, path: str | os.PathLike) -> None:
        raise NotImplementedError

    # ---- state -----------------------------------------------------------------------------------
    def identity(self) -> dict:
        """What a state file must have been trained with to be resumed (written into it)."""
        return {"seed": self.args.seed}

    def check_identity(self, stored: dict) -> None:
        if stored["seed"] != self.args.seed:
            raise SystemExit(f"{self.args.state} was trained with --seed {stored['seed']}, not {self.args.seed}")

    def save_state(self) -> None:
        path = Path(self.args.state)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save({"step": self.step, **self.identity(), "net": self.net.state_dict(),
                    "opt": self.opt.state_dict()}, tmp)
        os.replace(tmp, path)  # never leave a half-written state behind
        self.log.info("saved training state (step %d) to %s", self.step, path)

    def load_state(self) -> None:
        state = torch.load(self.args.state, weights_only=True)
        self.check_identity(state)
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.step = state["step"]
        self.log.info("resumed from %s at step %d", self.args.state, self.step)

    def out_of_time(self) -> bool:
        a = self.args
        if a.stop_after and self.steps_this_run >= a.stop_after:
            return True
        return a.minutes > 0 and time.monotonic() - self.started > 60 * a.minutes

    # ---- the loop --------------------------------------------------------------------------------
    def train(self) -> bool:
        """Steps until `--steps` (True, file written) or until the budget runs out (False, state saved)."""
        a, losses, tick = self.args, [], time.monotonic()
        self.net.train()
        while self.step < a.steps:
            losses.append(self.train_step())
            self.step += 1
            self.steps_this_run += 1
            if self.step % a.log_every == 0 or self.step == a.steps:
                self.log.info("step %d/%d loss %.4f (%.2f s/step)", self.step, a.steps, sum(losses) / len(losses),
                              (time.monotonic() - tick) / len(losses))
                losses, tick = [], time.monotonic()
            if self.step % a.save_every == 0:
                self.save_state()
            if self.out_of_time() and self.step < a.steps:
                self.save_state()
                self.log.warning("budget (%s minutes, %s steps) spent at step %d; rerun with --resume", a.minutes,
                                 a.stop_after or "any", self.step)
                return False
        self.net.eval()
        self.write(a.out)
        return True
