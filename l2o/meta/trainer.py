r"""Meta-training: learned-optimizer mode (Andrychowicz et al. 2016) and MAML mode (Finn et al. 2017).

The meta-params are the rule's weights :math:`\Phi` and, when ``init`` is given, the initial
params :math:`\theta_0` (MAML: an :class:`~l2o.maml.MAMLInit`; with a learnable rule too, a
learned initialisation and a learned optimizer are meta-trained together). A run is ``epochs``
*rounds*; round ``e`` draws ``T = tasks_per_step`` tasks (task ``s`` from its own generator seeded
by its global index ``e*T + s``, :func:`~l2o.meta.schedules.task_generator`), optimises them in
lockstep for the round's horizon (:func:`~l2o.meta.schedules.epoch_horizon`: constant, or
log-uniform) cut into truncations of ``truncation`` steps, and takes one *meta-step* per
truncation: the estimator (:mod:`l2o.meta.estimators`: truncated backprop, ES or PES) adds the
mean over the ``T`` tasks of its meta-gradient estimate of the truncation's meta-loss
:math:`\sum_t w_t \bar f(\theta_t)` to the meta-params' gradients, which are clipped by global norm
before one Adam step; the optimizee and the rule state carry on into the next truncation
(detached, :func:`~l2o.unroll.truncate`).

The loop is four stages, each a method of :class:`_Run`: set-up (arguments, meta-optimizer,
validation tasks, a resumed :class:`~l2o.meta.training_state.TrainingState`), one meta-step,
the end of a round (validation, the best weights, callback and progress) and the checkpoint.

Safety: a meta-step whose meta-loss or meta-gradient is non-finite never reaches the meta-params
(the step is skipped and counted, and the round ends: its tasks are resampled); too many
consecutive skips stop the run with :class:`~l2o.meta.MetaTrainingError`. Every
``validate_every`` rounds the rule is evaluated on fixed held-out validation tasks and the best
weights are kept (the paper's early stopping).

**MAML mode** is the same loop with ``init``: every task starts from :math:`\theta_0` (broadcast
over the task's batched instances, so the meta-gradient sums over the meta-batch), the horizon is
the ``K`` adaptation steps (one truncation), ``step_weights="final"`` reads only
:math:`\theta_K`, and ``meta_split="meta"`` reads it on the query set; ``second_order=True`` is
MAML, ``False`` first-order MAML. One round is one meta-iteration.

**Resumable runs.** With ``checkpoint_path`` and ``checkpoint_every``, a training state (format in
:mod:`l2o.meta.training_state`) is written atomically every ``checkpoint_every`` meta-steps and at
the end; ``resume=path`` continues from one, and the continued run is bitwise identical (on CPU)
to one that was never interrupted.

**Distributed** (``distributed=True``, with :mod:`torch.distributed` initialised, e.g. by
``torchrun`` and ``l2o meta-train --distributed``): with world size ``W`` (which must divide
``T``), rank ``r`` runs the tasks ``s = r*T/W .. (r+1)*T/W - 1`` of every meta-batch (for ES and
PES: their particles); the meta-gradients (and a not-finite flag and the segment's loss sum, in
the same flat float64 buffer) are summed with one ``all_reduce`` per meta-step, and every rank then
takes the same meta-step (or skips it), so the meta-params stay identical on all ranks. The result
equals a single process with the same ``T`` to float rounding (with two ranks even bitwise).
Validation tasks are split round-robin over the ranks and their sum is all-reduced. Rank 0 alone
shows the progress bar and writes training states (the other ranks send it their tasks in
progress and RNG states); ``callback`` runs on every rank with the same metrics. A collective that
fails, because another rank died or did not answer within the process group's timeout, raises
:class:`~l2o.meta.MetaTrainingError` naming the meta-step; the last training state is left intact.
"""

from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoints import load_training_state, save_training_state
from ..compiling import compile_options
from ..rules.base import Rule
from ..validation import check_positive_int
from ..tasks import META, TaskFamily
from ..unroll import init_inner
from .config import STEP_WEIGHTS, MetaTrainConfig
from .distributed import Distributed, all_reduce_meta_gradients, end_distributed_process, to_cpu
from .estimators import ESTIMATOR_CLASSES, Estimator, SegmentContext
from .result import MetaTrainingError, MetaTrainResult
from .schedules import (epoch_horizon, meta_lr_at, num_segments, segment_steps, step_weights, task_generator,
                        told_total_steps)
from .slots import TaskSlot
from .training_state import TRAINER, TrainingState, run_setup
from .validation import distributed_validation, start_params, validation_loss

__all__ = ["MetaTrainConfig", "MetaTrainResult", "MetaTrainingError", "meta_train", "validation_loss", "TRAINER",
           "STEP_WEIGHTS", "start_params", "task_generator", "end_distributed_process"]


def meta_train(rule: Rule, family: TaskFamily, config: MetaTrainConfig | None = None, *,
               progress: bool = True, callback: Callable[[dict[str, float]], None] | None = None,
               checkpoint_path: str | os.PathLike | None = None, checkpoint_every: int | None = None,
               resume: str | os.PathLike | None = None, init: torch.nn.Module | None = None,
               val_family: TaskFamily | None = None, distributed: bool | None = False) -> MetaTrainResult:
    r"""Meta-train ``rule`` (and ``init``) in place on tasks from ``family``; return the best validated ones.

    Args:
        rule: a rule with trainable parameters (e.g. :class:`~l2o.rules.LSTMRule`).
        family: the task family to sample training and validation tasks from.
        config: hyperparameters (default :class:`MetaTrainConfig`).
        progress: show a tqdm progress bar with the meta-loss (and skipped meta-steps, if any).
        callback: called after each round with a dict of that round's metrics.
        checkpoint_path: where to write the training state (atomically, replacing the previous
            one) every ``checkpoint_every`` meta-steps and at the end; give both or neither.
        checkpoint_every: meta-steps between training states.
        resume: a training-state file to continue from; ``rule``, ``family`` and ``config`` must
            be those of the run that wrote it (a mismatch is refused naming the differing fields).
            The result is bitwise identical on CPU to a run that was never interrupted. ``rule``'s
            weights are replaced by the stored ones, and the global torch RNG is set to its state
            at the save (as in the uninterrupted run).
        init: MAML mode: a module with ``params()`` (e.g. :class:`~l2o.maml.MAMLInit`) holding
            the initial params :math:`\theta_0` every task starts from, meta-trained with the
            rule's weights (the rule may have none, e.g. :class:`~l2o.rules.SGD`).
        val_family: draws the validation tasks (default ``family``), e.g. Omniglot's validation
            characters.
        distributed: share each meta-batch (``config.tasks_per_step`` tasks) over the ranks of the
            initialised default :mod:`torch.distributed` process group, all-reducing the
            meta-gradients (see the module docstring); every rank must call ``meta_train`` with
            the same arguments. ``None``: whenever a process group is initialised. Rank 0 alone
            writes ``checkpoint_path`` and shows progress; ``resume`` is read by every rank (give a
            path every host can read).

    Raises:
        TypeError / ValueError: bad arguments or config (naming the argument or field).
        CheckpointError: ``resume`` is missing, unsafe, malformed, or from a different run.
        MetaTrainingError: ``config.max_consecutive_skips`` meta-steps in a row were non-finite,
            or (distributed) a collective failed because another rank died or timed out; the last
            training state written (if any) is left intact.
    """
    run = _Run(rule, family, config, callback=callback, checkpoint_path=checkpoint_path,
               checkpoint_every=checkpoint_every, init=init, val_family=val_family, distributed=distributed)
    state = run.start(resume)
    bar = run.progress_bar(state) if progress else None
    try:
        while state.epoch < run.config.epochs:
            if state.tasks is None:
                state.tasks = run.draw(state.epoch)
            due_after_round = False
            while state.segment < run.segments(state.epoch):
                ok, due = run.meta_step(state)
                if not ok:  # a task diverged: the round ends and its tasks are resampled
                    due_after_round = due_after_round or due
                    break
                if due and state.segment < run.segments(state.epoch):
                    run.save(state)  # mid-horizon
                else:
                    due_after_round = due_after_round or due  # once the round's bookkeeping is done
            metrics = run.end_round(state)
            if due_after_round and state.epoch < run.config.epochs:  # (the end of the run is saved below)
                run.save(state)
            if run.callback is not None:
                run.callback(metrics)
            if bar is not None:
                _show(bar, state, metrics)
        if run.saving:
            run.save(state)
    finally:
        if bar is not None:
            bar.close()
    return run.result(state)


class _Run:
    """The fixed parts of one :func:`meta_train` call and its stages."""

    def __init__(self, rule: Rule, family: TaskFamily, config: MetaTrainConfig | None, *,
                 callback: Callable[[dict[str, float]], None] | None, checkpoint_path: str | os.PathLike | None,
                 checkpoint_every: int | None, init: torch.nn.Module | None, val_family: TaskFamily | None,
                 distributed: bool | None) -> None:
        config = MetaTrainConfig() if config is None else config
        if not isinstance(config, MetaTrainConfig):
            raise TypeError(f"config must be a MetaTrainConfig, got {type(config).__name__}")
        config.validate()
        if not (isinstance(rule, torch.nn.Module) and callable(getattr(rule, "init", None))
                and callable(getattr(rule, "update", None))):
            raise TypeError(f"rule must be an l2o rule (an nn.Module with init and update, e.g. LSTMRule), "
                            f"got {type(rule).__name__}")
        if not callable(getattr(family, "sample", None)):
            raise TypeError(f"family must be a task family (with a sample(generator) method), got "
                            f"{type(family).__name__}")
        if val_family is not None and not callable(getattr(val_family, "sample", None)):
            raise TypeError(f"val_family must be a task family (with a sample(generator) method), got "
                            f"{type(val_family).__name__}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
        if checkpoint_path is not None and not isinstance(checkpoint_path, (str, os.PathLike)):
            raise TypeError(f"checkpoint_path must be a str or os.PathLike, got {type(checkpoint_path).__name__}")
        if (checkpoint_path is None) != (checkpoint_every is None):
            raise ValueError("checkpoint_path and checkpoint_every go together: give both (to write training states) "
                             f"or neither; got checkpoint_path={checkpoint_path!r}, checkpoint_every={checkpoint_every!r}")
        if checkpoint_every is not None:
            check_positive_int("checkpoint_every", checkpoint_every)
            if Path(checkpoint_path).is_dir():
                raise ValueError(f"checkpoint_path {str(checkpoint_path)!r} is a directory; give a file path")
        # The meta-trained modules, by name: the keys of "meta_params" in a training state.
        self.modules: dict[str, torch.nn.Module] = {"rule": rule}
        if init is not None:
            if not (isinstance(init, torch.nn.Module) and callable(getattr(init, "params", None))):
                raise TypeError(f"init must be an nn.Module with a params() method (e.g. l2o.MAMLInit), got "
                                f"{type(init).__name__}")
            self.modules["init"] = init
        self.meta_params = [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]
        if not self.meta_params:
            raise ValueError(f"{type(rule).__name__} has no trainable parameters to meta-train (and no init was given)")
        if config.tell_total_steps > 0 and not hasattr(rule, "total_steps"):
            raise ValueError(f"config.tell_total_steps={config.tell_total_steps} tells the rule each run's length "
                             f"through its total_steps attribute, which {type(rule).__name__} has not (l2o.MLPRule "
                             "has); set tell_total_steps=0")
        self.config, self.rule, self.family, self.init, self.callback = config, rule, family, init, callback
        self.dist = Distributed(distributed)
        self.own = self.dist.share(config.tasks_per_step)  # this rank's tasks within each meta-batch
        self.estimator: Estimator = ESTIMATOR_CLASSES[config.estimator]()
        self.context = SegmentContext(rule, self.meta_params, config.tasks_per_step, config.meta_split,
                                      config.second_order, config.objective, config.es_std,
                                      compile_options(config.compile))
        self.optimizer = torch.optim.Adam(self.meta_params, lr=config.meta_lr)
        self.setup = run_setup(config, rule, family, init)
        self.checkpoint_path, self.checkpoint_every = checkpoint_path, checkpoint_every
        self.saving = checkpoint_path is not None
        if self.saving:
            self.dist.state_path = str(checkpoint_path)
        # every rank draws all validation tasks (the same stream) and keeps its round-robin share
        val_gen = torch.Generator().manual_seed(config.seed + 1_000_003)
        source = family if val_family is None else val_family
        self.val_tasks = [(k, t) for k, t in ((k, source.sample(val_gen)) for k in range(config.num_val_tasks))
                          if k % self.dist.world == self.dist.rank] if config.validate_every else []
        self.resumed_at: int | None = None
        self.started = time.perf_counter()
        self.seconds_before = 0.0

    # ------------------------------------------------------------------------------ set-up

    def start(self, resume: str | os.PathLike | None) -> TrainingState:
        """A fresh :class:`TrainingState`, or the one ``resume`` holds (weights and optimizer restored)."""
        if resume is None:
            return TrainingState()
        if not isinstance(resume, (str, os.PathLike)):
            raise TypeError(f"resume must be the path of a training state (str or os.PathLike), got "
                            f"{type(resume).__name__}")
        state = TrainingState.restore(
            load_training_state(resume, trainer=TRAINER), repr(str(resume)), setup=self.setup, modules=self.modules,
            optimizer=self.optimizer, rule=self.rule, family=self.family, config=self.config, segments=self.segments,
            start_extra=lambda slot: self.estimator.start(slot, self.meta_params), own=self.own, rank=self.dist.rank,
            distributed=self.dist.active)
        self.resumed_at, self.seconds_before = state.meta_step, state.seconds
        return state

    def segments(self, epoch: int) -> int:
        """Truncations in round ``epoch``."""
        return num_segments(self.config, epoch_horizon(self.config, epoch))

    def draw(self, epoch: int) -> list[TaskSlot]:
        """This rank's tasks of round ``epoch``, each from the generator of its global index."""
        slots = []
        for s in self.own:
            index = epoch * self.config.tasks_per_step + s
            g = task_generator(self.config.seed, index)
            task = self.family.sample(g)
            slot = TaskSlot(index, task, g, init_inner(self.rule, task, g, params=start_params(self.init, task, g)))
            slot.extra = self.estimator.start(slot, self.meta_params)
            slots.append(slot)
        return slots

    def progress_bar(self, state: TrainingState) -> Any:
        if self.dist.rank != 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.config.epochs, initial=state.epoch,
                    desc=f"meta-train {getattr(self.family, 'name', 'task')}", unit="epoch")

    # ------------------------------------------------------------------------------ one meta-step

    def meta_step(self, state: TrainingState) -> tuple[bool, bool]:
        """The next truncation of every task and one meta-step (or a skip); returns whether it was
        taken and whether a training state is due."""
        config, horizon = self.config, epoch_horizon(self.config, state.epoch)
        done, steps = segment_steps(config, horizon, state.segment)
        for group in self.optimizer.param_groups:
            group["lr"] = meta_lr_at(config, self._progress(state))
        self.dist.step = state.meta_step + 1
        self.optimizer.zero_grad(set_to_none=True)
        weights = step_weights(config, horizon, done, steps)
        if config.tell_total_steps > 0:
            told = horizon if told_total_steps(config, state.epoch) else None
            kept, self.rule.total_steps = self.rule.total_steps, told
            try:
                segment = self.estimator.segment(self.context, state.tasks, steps, weights)
            finally:
                self.rule.total_steps = kept
        else:
            segment = self.estimator.segment(self.context, state.tasks, steps, weights)
        bad, loss_sum = not segment.finite, segment.loss_sum
        if self.dist.active:
            bad, loss_sum = all_reduce_meta_gradients(self.dist, self.meta_params, bad, loss_sum)
        ok = not bad
        if ok:
            norm = torch.nn.utils.clip_grad_norm_(self.meta_params, config.max_grad_norm or math.inf)
            ok = bool(torch.isfinite(norm))
        state.meta_step += 1
        due = self.saving and state.meta_step % self.checkpoint_every == 0
        if not ok:
            state.skipped += 1
            state.consecutive_skips += 1
            self.optimizer.zero_grad(set_to_none=True)
            if state.consecutive_skips >= config.max_consecutive_skips:
                raise MetaTrainingError(
                    f"{state.consecutive_skips} consecutive meta-steps had a non-finite meta-loss or meta-gradient "
                    f"(epoch {state.epoch}); lower meta_lr or the rule's output_scale, or check the task")
            return False, due
        state.consecutive_skips = 0
        self.optimizer.step()
        state.epoch_losses.append(torch.tensor(loss_sum / config.tasks_per_step, dtype=torch.float64))
        for slot, (inner, extra) in zip(state.tasks, segment.states):
            slot.inner, slot.extra = inner, extra
        state.segment += 1
        return True, due

    def _progress(self, state: TrainingState) -> float:
        """How far the run is, in [0, 1], for the meta learning rate: the meta-steps done over the
        run's ``epochs * segments`` with a constant horizon; with log-uniform horizons (whose
        number of meta-steps is not known ahead) the rounds done."""
        if self.config.horizon_schedule == "constant":
            return state.meta_step / max(1, self.config.epochs * self.segments(0) - 1)
        return (state.epoch + state.segment / self.segments(state.epoch)) / self.config.epochs

    # ------------------------------------------------------------------------------ end of a round

    def end_round(self, state: TrainingState) -> dict[str, float]:
        """Close the round (horizon reached, or a task diverged): its loss, validation, the best weights."""
        config, epoch = self.config, state.epoch
        epoch_losses = state.epoch_losses
        state.tasks, state.epoch_losses, state.segment = None, [], 0
        state.epoch = epoch + 1
        metrics = {"epoch": float(epoch), "skipped": float(state.skipped)}
        if epoch_losses:
            metrics["loss"] = float(torch.stack(epoch_losses).mean())
            state.history["epoch_loss"].append(metrics["loss"])
        if config.validate_every and ((epoch + 1) % config.validate_every == 0 or epoch + 1 == config.epochs):
            val = self.validate()
            state.history["val_epoch"].append(float(epoch + 1))
            state.history["val_loss"].append(val)
            metrics["val_loss"] = val
            if state.best_val is None or val < state.best_val:
                state.best_val, state.best_epoch = val, epoch + 1
                state.best_meta_params = {name: copy.deepcopy(m.state_dict()) for name, m in self.modules.items()}
        return metrics

    def validate(self) -> float:
        """The validation loss of the current meta-params (over the ranks' shares when distributed)."""
        config = self.config
        horizon = config.horizon if config.val_horizon is None else config.val_horizon
        final_split = config.meta_split if config.step_weights == "final" or config.meta_split == META else None
        weights = None if final_split is not None else step_weights(config, horizon, 0, horizon)
        if self.dist.active:
            return distributed_validation(self.dist, self.rule, self.val_tasks, horizon, config.seed + 7,
                                          num_tasks=config.num_val_tasks, init=self.init, final_split=final_split,
                                          weights=weights)
        return validation_loss(self.rule, [t for _, t in self.val_tasks], horizon, config.seed + 7,
                               init=self.init, final_split=final_split, weights=weights)

    # ------------------------------------------------------------------------------ checkpoint

    def save(self, state: TrainingState) -> None:
        """Write the training state (rank 0, with every rank's tasks in progress and RNG state)."""
        data = state.to_data(setup=self.setup, modules=self.modules, optimizer=self.optimizer,
                             checkpoint_every=self.checkpoint_every, seconds=self._seconds(),
                             world=self.dist.world)
        if self.dist.active:
            current = data["current"]
            mine = {"tasks": None if current is None else current["tasks"],
                    "torch_global": data["generators"]["torch_global"]}
            everyone = self.dist.gather(to_cpu(mine), "gathering the training state")
            if self.dist.rank != 0:
                return
            data["generators"]["torch_global_by_rank"] = [r["torch_global"] for r in everyone]
            if current is not None:
                current["tasks"] = [t for r in everyone for t in r["tasks"]]
        save_training_state(self.checkpoint_path, data)

    def _seconds(self) -> float:
        return self.seconds_before + (time.perf_counter() - self.started)

    def result(self, state: TrainingState) -> MetaTrainResult:
        if state.best_meta_params is not None:
            for name, weights in state.best_meta_params.items():
                self.modules[name].load_state_dict(weights)
        return MetaTrainResult(self.rule, state.best_val, state.best_epoch, state.skipped, state.meta_step,
                               self._seconds(), state.history, self.resumed_at, self.init)


def _show(bar: Any, state: TrainingState, metrics: dict[str, float]) -> None:
    post = {"loss": f"{metrics.get('loss', float('nan')):.3g}"}
    if state.best_val is not None:
        post["best_val"] = f"{state.best_val:.3g}"
    if state.skipped:
        post["skipped"] = state.skipped
    bar.set_postfix(post)
    bar.update(1)
