"""Checkpoints and resume for the commands that run their own loop: `smalto reward` and `smalto ppo`.

    RunCheckpoints(section, run_dir, device, trainable_only)
      .check_relaunch(recipe, fixed, schedule)  before anything is written: refuse a recipe change the checkpoint
                                                cannot take (smalto.train.relaunch, as `smalto train` does)
      .resume(model, optimizer) → state         the trainer state of `latest`, loaded in place (None: a fresh run)
      with .signals: ... .end_of_step(...)      save when due (every interval, the last step, a stop); say whether
                                                this launch stops (SIGINT / SIGTERM after the step, or stop_after)
The checkpoints are `smalto train`'s (smalto.train.checkpoint: DCP, written under a temporary name and renamed,
`latest`, keep_last): the trainable tensors (with LoRA the adapters and the value head; the frozen base comes from
base_model again), their optimizer state, every RNG state, and trainer.json with the step and what the loop
needs beyond it (PPO: the adaptive KL coefficient and the minibatch generator). The data position is not stored:
the pair or prompt order comes from one seeded generator, so the loop replays its draws up to the step.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import torch

from smalto.rlhf import CheckpointSection
from smalto.train.checkpoint import RESUME_FIX, TRAINER, Checkpointer
from smalto.train.loop import StopSignals
from smalto.train.parallel import World

RECIPE = "recipe.yaml"  # the resolved recipe of the run's last launch


class RunCheckpoints:
    def __init__(
        self, section: CheckpointSection, run_dir: str, device: torch.device, *, trainable_only: bool = False
    ):
        self.section, self.run_dir = section, run_dir
        self.world = World(rank=0, world_size=1, local_rank=0, device=device)
        self.folder = Path(section.folder.replace("{run_dir}", run_dir))
        self.ckpt = Checkpointer(
            self.folder, self.world, keep_last=section.keep_last, trainable_only=trainable_only
        )
        self.latest = self.ckpt.latest() if section.autoresume else None
        self.step = 0 if self.latest is None else int(json.loads((self.latest / TRAINER).read_text())["step"])
        """The step this launch continues from (0: a fresh run)."""
        self.path: Path | None = self.latest
        self.signals = StopSignals()

    def check_relaunch(
        self, recipe: dict[str, Any], *, fixed: tuple[str, ...], schedule: tuple[str, ...]
    ) -> None:
        """Refuse a change of a `fixed` key (or section, "name.") since the run's recipe.yaml when resuming; warn
        about a changed `schedule` key."""
        from smalto.train.relaunch import check_recipe_relaunch

        saved = Path(self.run_dir) / RECIPE
        if self.latest is not None and saved.is_file():
            check_recipe_relaunch(
                self.run_dir, saved, recipe, self.latest, fixed=fixed, schedule=schedule, fix=RESUME_FIX
            )

    def resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        if self.latest is None:
            return None
        return self.ckpt.load(self.latest, model, optimizer, fix=RESUME_FIX)

    def end_of_step(
        self,
        step: int,
        total: int,
        end: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        state: dict[str, Any],
    ) -> str | None:
        """After step `step` (of `total`; this launch ends at `end`) is logged: save when due, and return why this
        launch stops here ("SIGINT", "SIGTERM", "stop_after"), or None."""
        stopped = self.signals.requested(self.world) or ("stop_after" if step == end < total else None)
        if step == total or stopped or step % self.section.every == 0:
            self.path = self.ckpt.save(step, model, optimizer, {"step": step, **state})
        return stopped


def generator_state(g: torch.Generator) -> str:
    """A torch.Generator's state as text (trainer.json holds it)."""
    return base64.b64encode(g.get_state().numpy().tobytes()).decode()


def set_generator_state(g: torch.Generator, text: str) -> None:
    g.set_state(torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8))
