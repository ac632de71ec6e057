"""Test-only strategies, loaded with --plugin: ViTIL that SIGKILLs its own process at a chosen
moment, and replay whose loss turns NaN in one experience. Neither changes training otherwise."""

from __future__ import annotations

import os
import signal
from typing import Any

from incremental.registry import STRATEGIES
from incremental.strategies.replay import ExemplarReplay, ReplayConfig
from incremental.strategies.vitil import ViTIL, ViTILConfig

# "EXPERIENCE:PHASE:ITERATION", PHASE train or eval; unset in the uninterrupted and resumed runs.
KILL_AT = "INCREMENTAL_TEST_KILL_AT"


@STRATEGIES.register("vitil_killable", config=ViTILConfig)
class KillableViTIL(ViTIL):
    """ViTIL, killed with SIGKILL (no clean-up of any kind) where KILL_AT says."""

    def _maybe_kill(self, strategy: Any, phase: str, iteration: int) -> None:
        spec = os.environ.get(KILL_AT)
        if not spec:
            return
        experience, kill_phase, kill_iteration = spec.split(":")
        # in eval, experience is the evaluated one; the trained one is the clock's count - 1
        trained = strategy.clock.train_exp_counter - (1 if phase == "eval" else 0)
        if (trained, phase, iteration) == (int(experience), kill_phase, int(kill_iteration)):
            os.kill(os.getpid(), signal.SIGKILL)

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self._maybe_kill(strategy, "train", strategy.clock.train_exp_iterations)

    def after_eval_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self._maybe_kill(strategy, "eval", strategy.experience.current_experience)


@STRATEGIES.register("replay_nan_in_second_experience", config=ReplayConfig)
class NaNInSecondExperience(ExemplarReplay):
    """Replay whose loss becomes NaN at the third iteration of experience 1."""

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if strategy.experience.current_experience == 1 and strategy.clock.train_exp_iterations == 2:
            strategy.loss = strategy.loss * float("nan")
