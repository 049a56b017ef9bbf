"""Training loop for teacher and student: resumable, seeded, AMP on CUDA, optional DDP (torchrun).

One loop serves both roles: a config with `teacher:` set trains by distillation (the frozen teacher's
soft masks on the very same augmented batch) plus ground truth; without it, ground truth only.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from drywallqa.train.augment import augment_batch
from drywallqa.train.checkpoint import CheckpointInfo, load_weights, save_weights
from drywallqa.train.cpu_tuning import keep_freed_memory_in_heap, use_channels_last
from drywallqa.train.losses import distillation_loss, segmentation_loss
from drywallqa.train.models.segmenter import Segmenter, build_segmenter
from drywallqa.train.run_state import (
    TrainError,
    cannot_resume,
    changed_settings,
    load_checkpoint,
    restore_rng,
    rng_states,
    save_atomic,
    writable_folder,
)
from drywallqa.train.teacher import load_teacher
from drywallqa.train.training_data import InMemoryData
from drywallqa.vocab import Vocabulary, load_vocabulary

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a folder under runs/, never a path out of it
# (field, smallest allowed, whether the value may equal it); None is allowed where the field's default is None
_LOWER_BOUNDS = {
    "batch_size": (1, True), "epochs": (1, True), "lr": (0, False), "weight_decay": (0, True),
    "warmup_steps": (0, True), "time_budget_s": (0, False), "cache_size": (16, True), "crop": (16, True),
    "val_every": (1, True), "val_batch": (1, True), "max_steps_per_epoch": (1, True), "log_every": (0, True),
    "val_limit_per_class": (1, True), "distill_weight": (0, True),
}

BUDGET_CHECK_EVERY = 10  # steps between the ranks' time-budget agreements under DDP (one collective each)


@dataclass
class TrainConfig:
    name: str
    architecture: str
    profile: str
    output: str  # shipped weights path (fp16 safetensors)
    pretrained_encoder: bool = False
    teacher: str | list[str] | None = None  # a trained teacher's weights, or several (averaged) -> distillation
    init_weights: str | None = None  # start from these weights (fine-tuning) instead of from scratch/ImageNet
    distill_weight: float = 1.0
    freeze_bn: bool = False  # fine-tuning with small batches: keep BatchNorm's running statistics as they are
    frozen_encoder: bool = False  # train only decoder + head on cached encoder features (train/head_finetune.py)
    cache: str | None = None  # the `drywallqa data prepare` cache folder to train on (None: cache/; --cache wins)
    loss: str = "bce_dice"
    cache_size: int = 512
    crop: int = 384
    scale: tuple[float, float] = (0.7, 1.4)
    batch_size: int = 16
    epochs: int = 40
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    time_budget_s: float | None = None  # wall-clock budget: the LR schedule follows the clock, `epochs` is a cap
    text_encoder: str = "minilm"
    clip_path: str | None = None
    seed: int = 0
    val_every: int = 1
    val_batch: int = 8
    max_steps_per_epoch: int | None = None  # for smoke tests
    log_every: int = 50  # steps between progress lines inside an epoch
    val_limit_per_class: int | None = 64  # per-epoch validation subset (the full split is for `drywallqa eval`)
    runs_dir: str = "runs"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise TrainError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise TrainError(f"{path} must hold a mapping of settings, got {type(data).__name__}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainError(f"{path}: unknown training config keys {unknown}; known: {sorted(known)}")
        missing = sorted(f for f in ("name", "architecture", "profile", "output") if f not in data)
        if missing:
            raise TrainError(f"{path}: missing {missing} (every training config names its run, network, profile "
                             f"and output file)")
        if isinstance(data.get("scale"), list):
            data["scale"] = tuple(data["scale"])
        cfg = cls(**data)
        cfg.validate(str(path))
        return cfg

    def validate(self, origin: str = "config") -> None:
        """Refuse values that would crash later, spin forever, exhaust memory or write an untrained model."""
        from drywallqa.train.losses import LOSSES
        from drywallqa.train.models.segmenter import ARCHITECTURES

        problems = []
        for name, (low, inclusive) in _LOWER_BOUNDS.items():
            value = getattr(self, name)
            default = self.__dataclass_fields__[name].default
            if value is None and default is None:
                continue
            wants_int = isinstance(default, int) or name in ("max_steps_per_epoch", "val_limit_per_class")
            if isinstance(value, str) and not wants_int:  # YAML 1.1 reads '1e-4' (no dot) as a string
                try:
                    value = float(value)
                    setattr(self, name, value)
                except ValueError:
                    pass
            if isinstance(value, bool) or not isinstance(value, int if wants_int else (int, float)):
                problems.append(f"{name}: expected {'a whole number' if wants_int else 'a number'}, got {value!r}")
            elif value < low or (value == low and not inclusive):
                problems.append(f"{name}: must be {'>=' if inclusive else '>'} {low}, got {value!r}")
        if not isinstance(self.name, str) or not RUN_NAME.match(self.name) or self.name in (".", ".."):
            problems.append(f"name: a plain folder name (letters, digits, '_', '.', '-'), got {self.name!r}")
        if self.architecture not in ARCHITECTURES:
            problems.append(f"architecture: one of {sorted(ARCHITECTURES)}, got {self.architecture!r}")
        if self.loss not in LOSSES:
            problems.append(f"loss: one of {list(LOSSES)}, got {self.loss!r}")
        if self.text_encoder not in ("minilm", "clip"):
            problems.append(f"text_encoder: minilm or clip, got {self.text_encoder!r}")
        elif self.text_encoder == "clip" and not self.frozen_encoder:  # a head fine-tune embeds nothing
            from drywallqa.train.text_encoders import clip_source_problem

            clip_problem = clip_source_problem(self.clip_path)
            if clip_problem:
                problems.append(clip_problem)
        if self.cache is not None and not (isinstance(self.cache, str) and self.cache.strip()):
            problems.append(f"cache: a folder path (the `drywallqa data prepare --out` folder), got {self.cache!r}")
        scale = self.scale
        if not (isinstance(scale, tuple) and len(scale) == 2 and all(isinstance(v, int | float) for v in scale)
                and 0 < scale[0] <= scale[1]):
            problems.append(f"scale: [smallest, largest] zoom with 0 < smallest <= largest, got {scale!r}")
        if isinstance(self.crop, int) and isinstance(self.cache_size, int) and self.crop > self.cache_size:
            problems.append(f"crop {self.crop} is larger than the cached images ({self.cache_size} px)")
        if problems:
            raise TrainError(f"invalid training config ({origin}):\n  " + "\n  ".join(problems))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, base: float, warmup: int, progress: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine to 1 % of `base` at `progress` (0 to 1, clamped).

    The progress is the steps' (step_progress, epoch_progress) or, for a time-budgeted run, the fraction of the
    budget used, so a run that is slowed or sped up still ends its schedule on time.
    """
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, max(0.0, progress))
    return base * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def step_progress(step: int, total: int, warmup: int) -> float:
    """The cosine's progress at `step` of `total` steps, the first `warmup` of them warm-up."""
    return (step - warmup) / max(1, total - warmup)


def epoch_progress(epoch: int, i: int, steps_per_epoch: int, planned_epochs: int, warmup: int) -> float:
    """The cosine's progress at step `i` of epoch `epoch` (0-based), counted in this session's steps per epoch.

    Counting the finished epochs rather than the steps taken keeps the schedule where it belongs when a run is
    resumed with another number of steps per epoch (another batch size, torchrun after a single process): the
    steps of earlier sessions would put it ahead or behind. Without such a change it is the step count's own
    step_progress."""
    return step_progress(epoch * steps_per_epoch + i, planned_epochs * steps_per_epoch, warmup)


def rank_batches(n: int, steps: int, batch: int, rank: int, world: int, generator: torch.Generator) -> torch.Tensor:
    """This rank's image indices for one epoch, `steps` x batch: a permutation shared by the ranks, dealt in turn.

    Every rank gets the same number of non-empty batches of one size, or DDP's gradient all-reduce waits forever
    for a rank that crashed or finished early. Where there are fewer than batch x world images (then `steps` is
    1), each rank takes ceil(n / world), the permutation wrapped round to fill the last places, as
    DistributedSampler does without drop_last. Otherwise these are the first steps x batch of perm[rank::world].
    """
    per_rank = min(steps * batch, -(-n // world))
    perm = torch.randperm(n, generator=generator)
    perm = perm.repeat(-(-per_rank * world // n))[:per_rank * world]
    return perm[rank::world].reshape(steps, -1)


def same_embeddings(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two prompt-embedding tables are the same up to fp16 storage (shipped weights are fp16)."""
    return a.shape == b.shape and torch.allclose(a.detach().float().cpu(), b.detach().float().cpu(), atol=2e-3)


def prompt_sampler(vocab: Vocabulary, prompts: list[str]) -> list[torch.Tensor]:
    """Per class, the indices (into the baked embedding rows) of its synonyms."""
    return [torch.tensor([i for i, p in enumerate(prompts) if vocab.prompt_to_class[p] == c]) for c in vocab.classes]


def sample_prompt_ids(per_class: list[torch.Tensor], batch: int, device: torch.device) -> torch.Tensor:
    cols = [ids[torch.randint(0, len(ids), (batch,))] for ids in per_class]
    return torch.stack(cols, 1).to(device)


def one_hot_targets(masks: torch.Tensor, cls: torch.Tensor, num_classes: int) -> torch.Tensor:
    """masks B x H x W of each image's own class -> B x C x H x W (other classes empty: cross-dataset negatives)."""
    onehot = F.one_hot(cls, num_classes).float()[:, :, None, None]
    return masks[:, None] * onehot


class DistEnv:
    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def set_training_mode(model: torch.nn.Module, freeze_bn: bool) -> None:
    """model.train(), except that frozen BatchNorm layers keep normalising with their running statistics."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


@torch.no_grad()
def validate(model: Segmenter, data: InMemoryData, device: torch.device, batch: int, num_classes: int,
             threshold: float = 0.5) -> dict[str, float]:
    """Mean IoU per class on each class's own images, at the cached resolution (quick per-epoch signal).
    Leaves the model in eval mode; the training loop puts it back in its training mode."""
    model.eval()
    ious: list[list[float]] = [[] for _ in range(num_classes)]
    for start in range(0, len(data), batch):
        img, msk, cls = data.batch(torch.arange(start, min(start + batch, len(data))), device)
        x = model.input_from_uint8(img)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            probs = torch.sigmoid(model(x).float())
        for i in range(len(cls)):
            c = int(cls[i])
            pred, truth = probs[i, c] >= threshold, msk[i] > 0
            union = (pred | truth).sum().item()
            ious[c].append(1.0 if union == 0 else (pred & truth).sum().item() / union)
    return {f"iou_{c}": float(np.mean(v)) if v else float("nan") for c, v in enumerate(ious)}


def write_weights(model: Segmenter, info: CheckpointInfo, out: Path, last: Path) -> None:
    """The shipped file, written whole (safetensors renames a finished temporary file) or not at all."""
    try:
        save_weights(model, info, out)
    except Exception as exc:  # OSError, or safetensors' own error on a short write
        raise TrainError(f"cannot write the weights {out}: {type(exc).__name__}: {str(exc)[:200]} (disk full?); "
                         f"the trained model is in {last}: run the same command again to write them") from exc


def resume(last: Path, cfg: TrainConfig, model: Segmenter, opt: torch.optim.Optimizer, env: DistEnv,
           device: torch.device, prompt_embeddings: torch.Tensor, text_encoder_name: str, log) -> dict:
    """Load `last` into the model, the optimizer and every rank's random generators; returns the run's state.
    A checkpoint that cannot be continued by this config is named and left alone (TrainError)."""
    ckpt = load_checkpoint(last, device, cfg.name)
    was = ckpt.get("config") or {}
    if was.get("architecture", cfg.architecture) != cfg.architecture:
        raise cannot_resume(last, cfg.name, f"it holds a {was['architecture']} model and this config trains "
                                            f"{cfg.architecture}")
    try:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        state = ckpt["state"]
    except Exception as exc:  # foreign, or of another shape: never overwritten silently
        raise cannot_resume(last, cfg.name, f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    if not same_embeddings(model.prompt_embeddings, prompt_embeddings):  # resuming would keep the old ones
        raise cannot_resume(last, cfg.name, f"it was trained with other prompt embeddings (text_encoder "
                                            f"{was.get('text_encoder')!r}, clip_path {was.get('clip_path')!r}) than "
                                            f"this run's {text_encoder_name!r}")
    if env.main:
        # The checkpoint's history is the record: an epoch logged just before a kill (checkpoint not yet
        # written) is trained again, so its line is dropped rather than written twice.
        (last.parent / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in state["history"]),
                                               encoding="utf-8")
    # A longer run asked for after the fact continues the schedule (in a time-budgeted run `epochs` is the cap).
    state["planned_epochs"] = max(state["planned_epochs"], cfg.epochs)
    restore_rng(ckpt, env.rank, device, cfg.seed, state["step"])
    if env.main:
        changes = changed_settings(was, asdict(cfg))
        log(f"[{cfg.name}] resumed from {last} at epoch {state['epoch']}/{state['planned_epochs']}"
            + (f", with changed settings: {'; '.join(changes)}" if changes else ""))
    return state


def train(cfg: TrainConfig, train_data: InMemoryData, val_data: InMemoryData | None,
          prompt_embeddings: torch.Tensor, prompts: list[str], text_encoder_name: str,
          vocab: Vocabulary | None = None, log=print) -> Path:
    """Train (or resume) and write the fp16 weights to cfg.output. Returns that path."""
    if not len(train_data):  # before torchrun's ranks meet: each raises this on its own, none waits for another
        raise TrainError(f"run {cfg.name!r} has no training images (the data's train split is empty), so there is "
                         f"nothing to train on; {cfg.output} was not written")
    vocab = vocab or load_vocabulary()
    env = DistEnv()
    device = env.device()
    seed_everything(cfg.seed + env.rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run_dir = writable_folder(Path(cfg.runs_dir) / cfg.name, "run folder")
    if env.main:
        writable_folder(Path(cfg.output).parent, "folder of the output weights")
    num_classes = len(vocab.classes)
    prompt_class = torch.tensor([vocab.class_index(vocab.prompt_to_class[p]) for p in prompts])
    model = build_segmenter(cfg.architecture, prompt_embeddings, prompt_class, num_classes,
                            pretrained_encoder=cfg.pretrained_encoder).to(device)
    init_info: CheckpointInfo | None = None
    if cfg.init_weights:
        init, init_info = load_weights(cfg.init_weights)
        if list(init_info.prompts) != list(prompts) or not same_embeddings(init.prompt_embeddings, prompt_embeddings):
            raise TrainError(f"init_weights {cfg.init_weights} has other prompt embeddings (text encoder "
                             f"{init_info.text_encoder!r}, {len(init_info.prompts)} prompts) than this run "
                             f"({text_encoder_name!r}, {len(prompts)} prompts); a fine-tune keeps its parent's "
                             f"text conditioning, so name the parent's text_encoder/clip_path and prompts, or drop "
                             f"init_weights")
        model.load_state_dict(init.state_dict())
        log(f"[{cfg.name}] initialised from {cfg.init_weights}")
    teacher = load_teacher(cfg.teacher, prompts, device)
    channels_last = use_channels_last(cfg.architecture, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher = teacher.to(memory_format=torch.channels_last)
    if device.type == "cpu" and keep_freed_memory_in_heap():
        log(f"[{cfg.name}] CPU: freed memory stays in the heap{', channels-last tensors' if channels_last else ''}")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda")
    per_class = prompt_sampler(vocab, prompts)
    crack_channel = [vocab.class_index("crack")]  # the thin class: the loss's extra term (clDice / Lovász) goes here
    steps_per_epoch = max(1, len(train_data) // (cfg.batch_size * env.world))
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    state = {"epoch": 0, "step": 0, "planned_epochs": cfg.epochs, "history": []}
    last = run_dir / "last.pt"
    if last.exists():
        state = resume(last, cfg, model, opt, env, device, prompt_embeddings, text_encoder_name, log)
    steps_before, epoch_before = state["step"], state["epoch"]
    net = model
    if env.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[env.local_rank] if device.type == "cuda" else None)
    amp = device.type == "cuda"
    t_start = time.time()
    spent_before = state.get("elapsed_s", 0.0)  # wall time of earlier sessions of this run

    def elapsed() -> float:
        return spent_before + time.time() - t_start

    def out_of_time(every: int = 1) -> bool:
        """Whether the time budget is spent. Under DDP every rank must stop at the same step, or the
        gradient all-reduce hangs, so the ranks agree through a collective; `every` > 1 holds that
        collective (and its host sync) to every `every`-th step, the same steps on every rank."""
        if not cfg.time_budget_s:
            return False
        if env.world == 1:
            return elapsed() >= cfg.time_budget_s
        if state["step"] % every:
            return False
        flag = torch.tensor([float(elapsed() >= cfg.time_budget_s)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    set_training_mode(model, cfg.freeze_bn)
    while state["epoch"] < state["planned_epochs"] and not out_of_time():
        t_epoch = time.time()
        g = torch.Generator().manual_seed(cfg.seed * 1000 + state["epoch"])
        batches = rank_batches(len(train_data), steps_per_epoch, cfg.batch_size, env.rank, env.world, g)
        losses = []
        for i in range(steps_per_epoch):
            if out_of_time(every=BUDGET_CHECK_EVERY):
                break
            idx = batches[i]
            img, msk, cls = train_data.batch(idx, device)
            x, m = augment_batch(img, msk, cfg.crop, cfg.scale)
            x = model.normalize(x)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            target = one_hot_targets(m, cls, num_classes)
            prompt_ids = sample_prompt_ids(per_class, len(idx), device)
            if cfg.time_budget_s:
                progress = elapsed() / cfg.time_budget_s
            else:
                progress = epoch_progress(state["epoch"], i, steps_per_epoch, state["planned_epochs"],
                                          cfg.warmup_steps)
            for group in opt.param_groups:
                group["lr"] = lr_at(state["step"], cfg.lr, cfg.warmup_steps, progress)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = net(x, prompt_ids).float()
                loss = segmentation_loss(logits, target, cfg.loss, extra_channels=crack_channel)
                if teacher is not None:
                    soft = teacher(x, prompt_ids)
                    loss = loss + cfg.distill_weight * distillation_loss(logits, soft)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            state["step"] += 1
            losses.append(loss.detach())  # no per-step host sync: read back at log points only
            if env.main and cfg.log_every and (i + 1) % cfg.log_every == 0:
                pace = (time.time() - t_epoch) / (i + 1)
                log(f"[{cfg.name}] epoch {state['epoch'] + 1} step {i + 1}/{steps_per_epoch} "
                    f"loss={torch.stack(losses[-cfg.log_every:]).mean().item():.4f} {pace:.2f}s/step, "
                    f"epoch ends in {pace * (steps_per_epoch - i - 1) / 60:.1f} min")
        if not losses:
            break
        state["epoch"] += 1
        epoch_s = time.time() - t_epoch
        record = {"epoch": state["epoch"], "loss": torch.stack(losses).mean().item(), "epoch_s": round(epoch_s, 1),
                  "lr": opt.param_groups[0]["lr"], "steps": len(losses)}
        last_epoch = state["epoch"] >= state["planned_epochs"] or out_of_time()
        if (val_data is not None and len(val_data) and env.main
                and (state["epoch"] % cfg.val_every == 0 or last_epoch)):
            record.update(validate(model, val_data, device, cfg.val_batch, num_classes))
            set_training_mode(model, cfg.freeze_bn)  # validate() leaves the model in eval mode
        state["history"].append(record)
        state["elapsed_s"] = elapsed()
        state["data_fingerprint"] = train_data.fingerprint  # the data of the latest steps, for the weights' record
        # this session's pace (a resumed run's history holds the epochs of earlier sessions too)
        eta = (state["planned_epochs"] - state["epoch"]) * (time.time() - t_start) / (state["epoch"] - epoch_before)
        if cfg.time_budget_s:  # the schedule runs on the clock: the time left, unless the epoch cap comes first
            eta = min(eta, max(0.0, cfg.time_budget_s - elapsed()))
        rng = rng_states(env.world, device)  # a collective under DDP: every rank, before rank 0 saves
        if env.main:
            vals = " ".join(f"{k}={v:.3f}" for k, v in record.items() if k.startswith("iou"))
            log(f"[{cfg.name}] epoch {state['epoch']}/{state['planned_epochs']} loss={record['loss']:.4f} "
                f"{vals} {epoch_s:.1f}s/epoch ETA {eta / 60:.1f} min")
            save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "state": state,
                         "rng_cpu": rng[0]["cpu"], "rng_ranks": rng, "config": asdict(cfg)}, last)
            with open(run_dir / "log.jsonl", "a", encoding="utf-8") as fh:  # after the checkpoint it describes
                fh.write(json.dumps(record) + "\n")
    if state["step"] == 0:  # e.g. a time budget already spent: an untrained model must not replace a file
        raise TrainError(f"run {cfg.name!r} took no training step, so {cfg.output} was not written")
    out = Path(cfg.output)
    if env.main and 0 < steps_before == state["step"]:  # a run that had ended, started again (e.g. new photos)
        by_time = bool(cfg.time_budget_s) and elapsed() >= cfg.time_budget_s
        log(f"[{cfg.name}] nothing was trained: the run had already ended at epoch {state['epoch']}/"
            f"{state['planned_epochs']} ({'its time budget is spent' if by_time else 'its last epoch'}), so {out} "
            f"is written again from {last}. To train on new or changed data, delete {run_dir} or give the run "
            f"another name; to go on training it, raise {'time_budget_s' if by_time else 'epochs'}")
    if env.main:
        # text_encoder: the embeddings' own name, not the config's default (gpu_job is given the embeddings)
        recipe = {k: v for k, v in asdict(cfg).items() if k not in ("extra",)} | {
            "history_tail": state["history"][-3:], "text_encoder": text_encoder_name}
        # A fine-tune starts from its parent's decision rule (re-tune it with `drywallqa eval --tune-thresholds`)
        # and keeps the parent's recipe, so the shipped file tells its whole lineage.
        same_classes = init_info is not None and init_info.classes == list(vocab.classes)
        if init_info is not None:
            recipe["init_recipe"] = init_info.recipe
        info = CheckpointInfo(
            architecture=cfg.architecture, profile=cfg.profile, classes=list(vocab.classes), prompts=list(prompts),
            prompt_class=prompt_class.tolist(), text_encoder=text_encoder_name,
            thresholds=dict(init_info.thresholds) if same_classes else {c: 0.5 for c in vocab.classes},
            mask_shapes=dict(init_info.mask_shapes) if same_classes else {},
            input_size=(cfg.cache_size, cfg.cache_size),
            data_fingerprint=state.get("data_fingerprint", train_data.fingerprint), recipe=recipe,
        )
        write_weights(model, info, out, last)
        log(f"[{cfg.name}] wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    if env.world > 1:
        dist.barrier()
    return out
