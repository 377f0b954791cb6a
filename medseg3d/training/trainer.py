"""The training loop of one fold: `train_fold(work_dir, config_name, fold, train_config) -> fold folder`.

Recipe (docs/training.md, "Recipe"): SGD Nesterov (lr 0.01, momentum 0.99, wd 3e-5), poly lr (exponent 0.9),
Dice + CE with deep supervision, gradient clipping at 12, AMP (bf16 on CPU and on CUDA where
supported, else fp16 + GradScaler), a third of each batch on foreground, batched augmentation in
persistent worker processes (device, precision, memory format, compilation and worker count are
chosen in `medseg3d.training.runtime`). Every epoch: validation pseudo-Dice on patches, its EMA picks
`checkpoint_best.pt`, `checkpoint_latest.pt` + metrics.csv + progress.png are rewritten atomically.
A run without a validation signal (`--val-iterations 0`) has no best epoch: its `checkpoint_best.pt`
is the final weights.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from medseg3d.data.augment import augment_params_for
from medseg3d.data.loader import StreamSpec, make_loader, next_batch
from medseg3d.data.splits import fold_cases, load_or_create_splits
from medseg3d.device import resolve_device
from medseg3d.errors import ConfigError, MedsegError, OutputExistsError
from medseg3d.logging_utils import add_file_log, console
from medseg3d.paths import fold_dir_of
from medseg3d.preprocess.cache import labelled_cases
from medseg3d.training import state as st
from medseg3d.training.aux import FeatureLoss, resolve_aux_loss
from medseg3d.training.config import TrainConfig, network_request
from medseg3d.training.distributed import (
    DistInfo,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast_flag,
    cleanup,
    init_distributed,
)
from medseg3d.training.logger import write_epoch_artifacts
from medseg3d.training.runtime import Runtime, resolve_runtime
from medseg3d.training.schedule import _fit_budget, budget_deadline, make_optimizer, poly_lr
from medseg3d.training.validation import confusion_counts, dice_from_counts, validate_fold

log = logging.getLogger(__name__)


@dataclass
class _Loop:
    """What the epoch loop needs besides the config and the run state (built once per run by `_train`)."""

    model: torch.nn.Module          # what trains: `net`, compiled and/or DDP-wrapped
    net: torch.nn.Module            # the plain network (validation, checkpoints)
    opt: torch.optim.Optimizer
    runtime: Runtime                # device, precision + scaler, channels-last, compile, workers
    loss_fn: torch.nn.Module        # deep-supervised Dice + CE on the training outputs
    val_loss_fn: torch.nn.Module    # Dice + CE on the full-resolution validation logits
    num_classes: int                # K, background included
    info: DistInfo
    meta: dict[str, Any]            # the checkpoint's description of the run (plan, network, runtime)
    aux: FeatureLoss | None = None  # auxiliary feature loss (--aux-loss hfd; HDNet's default)
    compile_proven: bool = False    # the compiled model has run a step: later errors are real errors
    clock_start: float | None = None  # perf_counter at the run's start (a whole-run budget: time_reserve_s)
    deadline: float | None = None     # perf_counter at which training stops, even inside an epoch (--time-budget)


def train_fold(work_dir: str | Path, config_name: str, fold: int | str,
               train_config: TrainConfig | None = None) -> Path:
    """Train one fold (0..4 or "all") of `config_name` and return its folder (see `fold_dir_of`).

    Under torchrun (WORLD_SIZE > 1) every rank calls this; rank 0 writes files.
    """
    tc = dataclasses.replace(train_config) if train_config is not None else TrainConfig()  # budget edits a copy
    work_dir = Path(work_dir)
    from medseg3d.plans import Plans

    plans = Plans.load(work_dir / "plans.json")
    cfg = plans.configuration(config_name)
    arch = (tc.architecture or cfg.architecture).lower()
    cfg = cfg.for_architecture(arch)  # patch, batch and topology planned for this architecture, if it was
    dev_kind = "cuda" if (tc.device.startswith("cuda") or (tc.device == "auto" and torch.cuda.is_available())) else "cpu"
    info = init_distributed(dev_kind)
    try:
        return _train(work_dir, plans, cfg, config_name, arch, fold, tc, info)
    finally:
        cleanup(info)


def _train(work_dir: Path, plans: Any, cfg: Any, config_name: str, arch: str, fold: int | str, tc: TrainConfig,
           info: DistInfo) -> Path:
    from medseg3d.losses import DeepSupervisionLoss, DiceCELoss
    from medseg3d.networks import build_network

    invoked = time.perf_counter()  # a whole-run budget (tc.time_reserve_s) counts from here
    device = resolve_device(tc.device, info.local_rank if info.enabled else None)
    # the network and patch this run asks for, checked before anything is written or built
    kwargs, patch = network_request(cfg, arch, tc, config_name)
    all_cases = labelled_cases(work_dir, cfg.data_identifier)
    splits: list[dict[str, list[str]]] = []  # --fold all trains on every case: no split, any number of cases
    if str(fold) != "all":
        if info.is_main:
            splits = load_or_create_splits(work_dir, all_cases, tc.n_folds)
        barrier(info)
        if not info.is_main:
            splits = load_or_create_splits(work_dir, all_cases, tc.n_folds, write=False)
    train_cases, val_cases = fold_cases(splits, fold, all_cases)
    cascade = cfg.previous_stage is not None
    if cascade:  # before anything is written: which previous-stage fold this needs
        from medseg3d.cascade import require_previous_fold

        require_previous_fold(work_dir, plans, config_name, arch, fold)
    fold_dir = fold_dir_of(work_dir, config_name, arch, fold)
    latest = fold_dir / "checkpoint_latest.pt"
    if info.is_main:
        if latest.exists() and not tc.resume:
            raise OutputExistsError(f"{fold_dir} already holds a training run; continue it with --resume, "
                                    "or delete the folder to start over")
        fold_dir.mkdir(parents=True, exist_ok=True)
    handler = add_file_log(fold_dir / "training_log.txt") if info.is_main else None
    try:
        st.seed_everything(tc.seed + 1000 * info.rank)
        batch = int(tc.batch_size or cfg.batch_size)
        rank_batch = max(1, batch // info.world_size) if info.enabled else batch
        num_classes = plans.num_classes
        from medseg3d.cascade import extra_channels

        in_channels = plans.num_channels + extra_channels(plans, config_name)  # + K - 1 for a cascade stage
        net = build_network(arch, in_channels=in_channels, num_classes=num_classes, deep_supervision=True,
                            **kwargs).to(device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        aux_spec = resolve_aux_loss(tc.aux_loss, tc.aux_weight, net)
        if aux_spec is not None:  # its hook on the classifier's input stays outside torch.compile
            if tc.compile:
                raise ConfigError(f"--compile and the auxiliary loss {aux_spec[0]} do not go together (the loss "
                                  "reads the classifier's input through a hook); drop --compile or add --aux-loss none")
            tc.compile = False
        runtime = resolve_runtime(tc, device, cfg.dims, info.world_size)
        if runtime.channels_last:
            net = net.to(memory_format=torch.channels_last_3d if cfg.dims == 3 else torch.channels_last)
        opt = make_optimizer(net, tc)
        meta = {"plan_hash": plans.network_hash(config_name, arch),
                "plan_identity": plans.network_identity(config_name, arch),
                "configuration": config_name, "architecture": arch,
                "network_kwargs": kwargs, "in_channels": in_channels, "num_classes": num_classes,
                "fold": str(fold), "patch_size": list(patch), "train_config": tc.to_dict(),
                "runtime": runtime.to_dict()}
        state = st.RunState()
        if tc.resume:
            if latest.exists():
                state = st.resume(latest, net, opt, runtime.scaler, plans.network_identity(config_name, arch),
                                  device, meta, legacy_hash=plans.file_hash)
            else:
                log.warning("--resume: no %s yet, starting this fold from epoch 0", latest)
        aux = FeatureLoss(net, *aux_spec, num_classes, device) if aux_spec is not None else None
        if aux is not None:
            aux.load_state_dict(state.aux)  # the class centres of a resumed run
        model: torch.nn.Module = net
        if runtime.compile:
            # static shapes: every batch has the patch's size, and a second run in one process (another
            # patch) would otherwise be compiled with dynamic sizes, which inductor failed to lower here
            model = torch.compile(net, dynamic=False)
        if info.enabled:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        loss_fn = DeepSupervisionLoss(DiceCELoss(), weights=net.output_weights)  # as the architecture declares
        val_loss_fn = DiceCELoss()
        log.info("fold %s of %s/%s: %d training, %d validation cases; patch %s, batch %d%s, %s, %s",
                 fold, config_name, arch, len(train_cases), len(val_cases), patch, batch,
                 f" ({rank_batch}/rank x {info.world_size})" if info.enabled else "",
                 f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters", tc.optimizer)
        log.info("runtime: %s", runtime.describe())
        log.info("training outputs weighted %s (as %s declares)%s%s", net.output_weights, arch,
                 f"; options {kwargs['options']}" if kwargs["options"] else "",
                 f"; auxiliary loss {aux.name} at weight {aux.weight:g}" if aux is not None else "")
        # a resumed run gets fresh (but reproducible) data streams: seeded by epoch and rank too
        stream_seed = [tc.seed, info.rank, state.epoch]
        previous = None
        if cascade:  # the previous stage's segmentations of the fold's cases, cached on this grid (rank 0 writes)
            from medseg3d.cascade import prepare_previous_stage

            previous = prepare_previous_stage(work_dir, plans, config_name, arch, fold, train_cases + val_cases,
                                              device, write=info.is_main)
            barrier(info)
        train_spec = StreamSpec(work_dir, cfg.data_identifier, train_cases, patch, rank_batch, cfg.slice_axis,
                                tc.oversample_fg, augment_params_for(patch, cfg.mirror_axes) if tc.augment else None,
                                seed=int(np.random.SeedSequence(stream_seed).generate_state(1)[0]),
                                previous_dir=previous, num_classes=num_classes)
        val_spec = StreamSpec(work_dir, cfg.data_identifier, val_cases or train_cases, patch, rank_batch,
                              cfg.slice_axis, tc.oversample_fg, None,
                              seed=int(np.random.SeedSequence(stream_seed + [7]).generate_state(1)[0]),
                              previous_dir=previous, num_classes=num_classes)
        if state.epoch < tc.epochs and not state.stopped_early:
            train_iter = iter(make_loader(train_spec, runtime.workers, pin_memory=device.type == "cuda"))
            val_iter = iter(make_loader(val_spec, 0))
            loop = _Loop(model=model, net=net, opt=opt, runtime=runtime, loss_fn=loss_fn, val_loss_fn=val_loss_fn,
                         num_classes=num_classes, info=info, meta=meta, aux=aux, clock_start=invoked)
            _epochs(state, tc, fold_dir, train_iter, val_iter, plans, loop)
        if aux is not None:
            aux.close()
        if info.is_main:
            st.save(fold_dir / "checkpoint_final.pt", net, None, None, state, meta)
            if not (fold_dir / "checkpoint_best.pt").exists():
                # no epoch had a pseudo-Dice (--val-iterations 0): the best defined is the final weights
                st.save(fold_dir / "checkpoint_best.pt", net, None, None, state, meta)
                log.info("no validation pseudo-Dice was measured (--val-iterations %d): checkpoint_best.pt holds "
                         "the final weights", tc.val_iterations)
            if tc.final_validation and val_cases:
                # on the saved checkpoint_final.pt, rebuilt as `predict` loads it: the same predictions
                validate_fold(work_dir, plans, config_name, arch, fold, val_cases, device, step=tc.val_step,
                              mirroring=tc.val_mirroring, save_probabilities=tc.save_probabilities)
        barrier(info)
        return fold_dir
    finally:
        if handler is not None:
            logging.getLogger("medseg3d").removeHandler(handler)
            handler.close()


def _epochs(state: st.RunState, tc: TrainConfig, fold_dir: Path, train_iter: Any, val_iter: Any, plans: Any,
            loop: _Loop) -> None:
    info = loop.info
    device = loop.runtime.device
    labels = [plans.labels.get(c, str(c)) for c in range(1, loop.num_classes)]
    columns = [TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn()]
    run_start, max_epochs = time.perf_counter(), max(tc.epochs, tc.max_epochs or 0)
    if tc.time_reserve_s is not None and loop.clock_start is not None:
        run_start = loop.clock_start  # the budget covers set-up too; the final validation is held back
    epoch_times: list[float] = []
    loop.deadline = budget_deadline(tc, run_start)
    with Progress(*columns, console=console, disable=not info.is_main, transient=True) as bar:
        while state.epoch < tc.epochs:
            epoch = state.epoch
            lr = poly_lr(tc.lr, epoch, tc.epochs, tc.poly_exponent)
            for g in loop.opt.param_groups:
                g["lr"] = lr
            task = bar.add_task("train", total=tc.iterations_per_epoch, epoch=epoch, loss=float("nan"))
            t0 = time.perf_counter()
            train_loss, wait, done = _train_epoch(tc, train_iter, loop, bar, task)
            train_time = time.perf_counter() - t0
            if done < tc.iterations_per_epoch:  # the budget ran out inside this epoch: it is the last
                log.info("time budget %.0f s reached after %d of %d iterations of epoch %d: training stops here",
                         tc.time_budget_s, done, tc.iterations_per_epoch, epoch + 1)
                tc.epochs = epoch + 1
            if loop.aux is not None:
                state.aux = loop.aux.state_dict()
            bar.remove_task(task)
            val_loss, counts = _validate(tc, val_iter, loop)
            epoch_time = time.perf_counter() - t0
            dice = dice_from_counts(counts) if counts is not None else []
            finite = [d for d in dice if not math.isnan(d)]
            mean_dice = float(np.mean(finite)) if finite else None
            if mean_dice is not None:
                state.ema_dice = mean_dice if state.ema_dice is None else \
                    tc.ema_alpha * state.ema_dice + (1 - tc.ema_alpha) * mean_dice
            row: dict[str, Any] = {
                "epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "mean_pseudo_dice": mean_dice,
                "ema_pseudo_dice": state.ema_dice, "lr": lr, "epoch_time_s": epoch_time,
                "data_wait_fraction": wait / train_time if train_time > 0 else 0.0,
                "iterations_per_s": done / train_time if train_time > 0 else 0.0, "iterations": done,
            }
            row.update({f"pseudo_dice_{name}": d for name, d in zip(labels, dice)})
            state.history.append(row)
            state.epoch = epoch + 1
            improved = state.ema_dice is not None and state.ema_dice > state.best_ema
            if improved:
                state.best_ema, state.epochs_since_best = float(state.ema_dice), 0
            else:
                state.epochs_since_best += 1
            stop = tc.early_stopping is not None and state.epochs_since_best >= tc.early_stopping
            stop = broadcast_flag(stop, info, device)
            state.stopped_early = stop and state.epoch < tc.epochs
            if info.is_main:
                if improved:
                    st.save(fold_dir / "checkpoint_best.pt", loop.net, None, None, state, loop.meta)
                if state.epoch % tc.save_every == 0 or state.epoch == tc.epochs or stop:
                    st.save(fold_dir / "checkpoint_latest.pt", loop.net, loop.opt, loop.runtime.scaler, state,
                            loop.meta)
                write_epoch_artifacts(state.history, fold_dir)
                log.info("epoch %d/%d: train loss %.4f, val loss %s, pseudo-Dice %s (EMA %s), lr %.2e, %.1f s, "
                         "data wait %.1f%%", epoch + 1, tc.epochs, train_loss,
                         "-" if val_loss is None else f"{val_loss:.4f}",
                         ", ".join(f"{n} {d:.3f}" for n, d in zip(labels, dice)) or "-",
                         "-" if state.ema_dice is None else f"{state.ema_dice:.4f}", lr, epoch_time,
                         100 * row["data_wait_fraction"])
            now = time.perf_counter()
            epoch_times.append(now - t0)  # with the checkpoint and artefact writes: what the next epoch costs
            if tc.time_budget_s is not None:
                _fit_budget(tc, state, now - run_start, epoch_times, max_epochs, info, device)
            if stop:
                log.info("early stopping: no new best EMA pseudo-Dice for %d epochs", tc.early_stopping)
                break


def _autocast(runtime: Runtime) -> Any:
    dt = runtime.amp_dtype
    return torch.autocast(runtime.device.type, dtype=dt) if dt is not None else nullcontext()


def _train_epoch(tc: TrainConfig, it: Any, loop: _Loop, bar: Progress, task: Any) -> tuple[float, float, int]:
    """Run one epoch of iterations, or fewer when `loop.deadline` passes (rank 0's clock decides for all).

    Returns (mean train loss over ranks and iterations done, seconds spent waiting for data, iterations done).
    """
    runtime = loop.runtime
    device = runtime.device
    loop.model.train()
    total = torch.zeros((), device=device)
    wait = 0.0
    done = 0
    for _ in range(tc.iterations_per_epoch):
        t = time.perf_counter()
        image, label = next_batch(it)
        image = image.to(device, non_blocking=True)
        label = label.to(device, non_blocking=True)
        if runtime.channels_last:
            fmt = torch.channels_last_3d if image.dim() == 5 else torch.channels_last
            image = image.contiguous(memory_format=fmt)
        wait += time.perf_counter() - t
        try:
            loss = _train_step(tc, loop, image, label)
        except MedsegError:
            raise
        except Exception as e:  # the compiled model's first step failed (no C++ toolchain, inductor bug): go eager
            if not runtime.compile or loop.compile_proven or loop.info.enabled:
                raise
            log.warning("torch.compile failed (%s: %s); training continues without it (--no-compile skips it)",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            loop.model, runtime.compile = loop.net, False
            loop.meta["runtime"] = runtime.to_dict()  # checkpoints record what really ran
            loss = _train_step(tc, loop, image, label)
        loop.compile_proven = runtime.compile  # later failures are real errors, not the compiler's
        total += loss.detach()
        done += 1
        bar.update(task, advance=1, loss=float(loss.detach()))
        if loop.deadline is not None and done < tc.iterations_per_epoch and \
                broadcast_flag(time.perf_counter() > loop.deadline, loop.info, device):
            break
    mean = all_reduce_mean(total / done, loop.info)
    return float(mean), wait, done


def _train_step(tc: TrainConfig, loop: _Loop, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """One optimiser step on a batch `(B, C, *patch)` / `(B, 1, *patch)`; returns the (deep-supervised) loss."""
    model, opt, scaler = loop.model, loop.opt, loop.runtime.scaler
    opt.zero_grad(set_to_none=True)
    with _autocast(loop.runtime):
        outputs = model(image)
    loss = loop.loss_fn(outputs, label)
    if loop.aux is not None:
        loss = loss + loop.aux(label)
    if loop.info.enabled and isinstance(outputs, (list, tuple)):
        # outputs with deep-supervision weight 0 get no gradient; DDP needs every parameter in the graph
        loss = loss + 0.0 * sum(o.float().sum() for o in outputs[1:])
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
    return loss


@torch.no_grad()
def _validate(tc: TrainConfig, it: Any, loop: _Loop) -> tuple[float | None, torch.Tensor | None]:
    """Loss and `(3, K-1)` tp/fp/fn over `val_iterations` validation patches (summed over ranks)."""
    if tc.val_iterations == 0:
        return None, None
    net, device, k = loop.net, loop.runtime.device, loop.num_classes
    net.eval()
    counts = torch.zeros(3, k - 1, dtype=torch.float64, device=device)
    loss = torch.zeros((), device=device)
    for _ in range(tc.val_iterations):
        image, label = next_batch(it)
        image, label = image.to(device), label.to(device)
        with _autocast(loop.runtime):
            logits = net(image)
        if isinstance(logits, (list, tuple)):
            logits = logits[0]
        logits = logits.float()
        loss += loop.val_loss_fn(logits, label)
        counts += confusion_counts(logits, label, k)
    net.train()
    info = loop.info
    return float(all_reduce_mean(loss / tc.val_iterations, info)), all_reduce_sum(counts, info)
