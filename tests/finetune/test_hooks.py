"""The hooks a fine-tune calls on rank 0 (`fakegpt.finetune.hooks`): when each one runs, what it sees, and that
an exception from one stops training. Tiny from-scratch models on real data (../shared/data), CPU only."""

from __future__ import annotations

import pytest
from tiny_runs import tiny_config as tiny

from fakegpt.finetune.hooks import Hooks, Moment
from fakegpt.finetune.train import EvalResult, finetune


def test_on_step_at_every_iteration_on_eval_at_each_evaluation_on_end_once(data_dir, tmp_path):
    steps: list[Moment] = []
    evals: list[EvalResult] = []
    ends: list[Moment] = []
    logged: list[int] = []

    def on_step(moment: Moment) -> bool:
        steps.append(moment)
        if moment.iter == 3:
            moment.log({"test/hook": 1.0})
            logged.append(moment.iter)
        return False

    hooks = Hooks(on_step=on_step, on_eval=evals.append, on_end=ends.append)
    result = finetune(tiny(data_dir, tmp_path / "run", max_iters=4, eval_interval=2), hooks=[hooks])
    assert [m.iter for m in steps] == [0, 1, 2, 3, 4]  # before each step, and once at the last iteration
    assert [m.iter for m in steps if m.evaluated] == [0, 2, 4]
    assert [m.last for m in steps] == [False, False, False, False, True]
    assert [m.tokens_seen for m in steps] == [i * 2 * 2 * 32 for i in range(5)]  # batch 2 x accum 2 x block 32
    assert not hasattr(steps[0].model, "no_sync") and hasattr(steps[0].model, "config")  # the HF model itself
    assert [e.iter for e in evals] == [0, 2, 4] and evals[-1].val_loss == result.val_curve[-1][1]
    assert [m.iter for m in ends] == [4] and logged == [3]


def test_a_hook_that_raises_stops_training_and_later_hooks_are_not_called(data_dir, tmp_path):
    class Stop(Exception):
        pass

    def stop(ev: EvalResult) -> None:
        if ev.iter == 2:
            raise Stop("enough")

    later: list[int] = []
    hooks = [Hooks(on_eval=stop), Hooks(on_eval=lambda ev: later.append(ev.iter))]
    with pytest.raises(Stop, match="enough"):
        finetune(tiny(data_dir, tmp_path / "run", max_iters=6, eval_interval=2), hooks=hooks)
    assert later == [0]  # the second hook ran at iteration 0, not at the evaluation the first one stopped
