"""Fine-tune a trained model's decoder and FiLM head on its frozen encoder's features, cached once on disk.

Why: for the HRNet-W18 student the encoder is the cost. A full fine-tuning step of 8 crops takes ~10 s on 2 CPU
cores; with the encoder frozen and its stride-4 features cached (fp16), a step takes ~1 s, so ten epochs fit in half
an hour. The cache holds one view per training image (the 512 cache, no augmentation), so each step takes random
crops of the feature maps, and each batch is half crack and half taping photos (there are 3x more crack photos).
Targets: the ground truth (the config's loss, e.g. Lovász on crack) plus the teacher's soft masks, also cached.

`drywallqa train --config configs/finetune_hrnet_head.yaml` (a config with `frozen_encoder: true`) runs it;
it resumes from runs/<name>/last.pt and reuses a finished feature cache.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from drywallqa.edge.backends import file_sha256
from drywallqa.train.checkpoint import load_weights
from drywallqa.train.cpu_tuning import keep_freed_memory_in_heap
from drywallqa.train.losses import distillation_loss, segmentation_loss
from drywallqa.train.models.segmenter import HRNetEncoderDecoder
from drywallqa.train.run_state import cannot_resume, load_checkpoint, save_atomic, writable_folder
from drywallqa.train.teacher import load_teacher, teacher_paths
from drywallqa.train.trainer import (
    TrainConfig,
    TrainError,
    lr_at,
    seed_everything,
    set_training_mode,
    step_progress,
    validate,
    write_weights,
)
from drywallqa.train.training_data import InMemoryData

STRIDE = 4


def _file_digest(path: str | Path) -> str:
    return file_sha256(Path(path))[:16]


def _read_done(done_file: Path) -> dict:
    """The feature cache's progress record; one that cannot be read counts as none (the cache is rebuilt)."""
    try:
        state = json.loads(done_file.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {"key": None}
    return state if isinstance(state, dict) else {"key": None}


@torch.no_grad()
def build_feature_cache(model, teacher, data: InMemoryData, out: Path, key: str, chunk: int = 4,
                        log=print) -> None:
    """features.npy (N x C x h x w fp16), teacher.npy (N x K x H x W uint8 probabilities) for every image of
    `data`; resumable: `done.json` counts the images written, for the inputs named by `key` (weights and data),
    so a cache made from other weights or data is rebuilt rather than reused."""
    out.mkdir(parents=True, exist_ok=True)
    n, size = len(data), data.images.shape[1]
    c, h = model.body.encoder.out_channels, size // STRIDE
    k = len(model.class_embeddings)
    done_file = out / "done.json"
    state = _read_done(done_file)
    done = state.get("done", 0) if state.get("key") == key else 0
    if state and not done:
        log(f"feature cache {out} was made from other weights or data; rebuilding it")
    mode = "r+" if done else "w+"
    feats = np.lib.format.open_memmap(out / "features.npy", mode, np.float16, (n, c, h, h))
    soft = np.lib.format.open_memmap(out / "teacher.npy", mode, np.uint8, (n, k, size, size))
    model.eval()  # the teacher (train/teacher.py) never leaves eval mode
    t0 = time.time()
    for start in range(done, n, chunk):
        stop = min(n, start + chunk)
        x = model.input_from_uint8(torch.from_numpy(np.ascontiguousarray(data.images[start:stop])))
        feats[start:stop] = model.body.encoder(x).half().numpy()
        if teacher is not None:
            soft[start:stop] = (teacher(x) * 255 + 0.5).clamp(0, 255).byte().numpy()
        feats.flush()
        soft.flush()
        tmp = done_file.with_name(done_file.name + ".tmp")  # a kill mid-write must not leave half a JSON
        tmp.write_text(json.dumps({"done": stop, "key": key}))
        os.replace(tmp, done_file)
        if stop == n or (stop // chunk) % 50 == 0:
            rate = (time.time() - t0) / max(1, stop - done)
            log(f"feature cache {stop}/{n}, ETA {rate * (n - stop) / 60:.1f} min")


def finetune_head(cfg: TrainConfig, train_data: InMemoryData, val_data: InMemoryData | None,
                  log=print) -> Path:
    """Train `init_weights`' decoder and head on cached encoder features; write the fp16 weights to cfg.output."""
    if not cfg.init_weights:
        raise ValueError(f"{cfg.name}: frozen_encoder needs init_weights (a trained model to fine-tune)")
    if not len(train_data):
        raise TrainError(f"run {cfg.name!r} has no training images (the data's train split is empty), so there is "
                         f"nothing to train on; {cfg.output} was not written")
    seed_everything(cfg.seed)
    keep_freed_memory_in_heap()
    model, info = load_weights(cfg.init_weights)
    if not isinstance(model.body, HRNetEncoderDecoder):
        raise ValueError(f"{cfg.name}: frozen_encoder needs a single-map encoder (hrnet_w18), not {info.architecture}")
    teacher = load_teacher(cfg.teacher, info.prompts)
    run_dir = writable_folder(Path(cfg.runs_dir) / cfg.name, "run folder")
    writable_folder(Path(cfg.output).parent, "folder of the output weights")
    teachers = [_file_digest(p) for p in teacher_paths(cfg.teacher)] or ["-"]  # "-": no teacher, no file
    key = ":".join([_file_digest(cfg.init_weights), *teachers, train_data.fingerprint, str(len(train_data))])
    build_feature_cache(model, teacher, train_data, run_dir / "features", key, log=log)
    feats = np.load(run_dir / "features" / "features.npy", mmap_mode="r")
    soft = np.load(run_dir / "features" / "teacher.npy", mmap_mode="r") if teacher is not None else None

    for p in model.body.encoder.parameters():
        p.requires_grad_(False)
    params = [p for m in (model.body.decoder, model.head) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    classes = train_data.classes.numpy()
    weights = 1.0 / np.bincount(classes)[classes]
    weights /= weights.sum()  # every class half of each batch (two classes)
    prompt_class = model.prompt_class.numpy()
    synonyms = [np.flatnonzero(prompt_class == c) for c in range(len(model.class_embeddings))]
    crop = cfg.crop // STRIDE
    budget = cfg.time_budget_s or float("inf")
    total_steps = cfg.epochs * max(1, len(classes) // cfg.batch_size)
    if cfg.max_steps_per_epoch:
        total_steps = min(total_steps, cfg.max_steps_per_epoch)

    ckpt = run_dir / "last.pt"
    step, elapsed, rng = 0, 0.0, np.random.default_rng(cfg.seed)
    if ckpt.is_file():
        state = load_checkpoint(ckpt, torch.device("cpu"), cfg.name)
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            step, elapsed = state["step"], state["elapsed"]
            rng.bit_generator.state = state["rng"]
        except Exception as exc:  # a full-training checkpoint, or another model's: never overwritten silently
            raise cannot_resume(ckpt, cfg.name, f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        log(f"[{cfg.name}] resumed at step {step} ({elapsed:.0f} s)")

    def save_checkpoint() -> None:
        save_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed,
                     "rng": rng.bit_generator.state}, ckpt)

    set_training_mode(model, freeze_bn=True)
    size = feats.shape[-1]
    start, losses = time.time() - elapsed, []
    while step < total_steps and elapsed < budget:
        progress = elapsed / budget if cfg.time_budget_s else step_progress(step, total_steps, cfg.warmup_steps)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.lr, cfg.warmup_steps, progress)
        picked = rng.choice(len(classes), cfg.batch_size, replace=len(classes) < cfg.batch_size, p=weights)
        f_crops, y_crops, t_crops = [], [], []
        for i in picked:
            oy, ox = rng.integers(0, size - crop + 1, 2)
            f_crops.append(np.asarray(feats[i, :, oy:oy + crop, ox:ox + crop], dtype=np.float32))
            win = (slice(STRIDE * oy, STRIDE * (oy + crop)), slice(STRIDE * ox, STRIDE * (ox + crop)))
            target = np.zeros((len(synonyms), STRIDE * crop, STRIDE * crop), np.float32)
            target[classes[i]] = train_data.masks[i][win]
            y_crops.append(target)
            if soft is not None:
                t_crops.append(soft[i][(slice(None), *win)].astype(np.float32) / 255.0)
        prompt_ids = torch.from_numpy(np.stack([[rng.choice(s) for s in synonyms] for _ in picked]))
        feat = model.body.decoder(torch.from_numpy(np.stack(f_crops)))
        logits = F.interpolate(model.head(feat, model.prompt_embeddings[prompt_ids]), scale_factor=STRIDE,
                               mode="bilinear", align_corners=False)
        loss = segmentation_loss(logits, torch.from_numpy(np.stack(y_crops)), cfg.loss, extra_channels=[0])
        if soft is not None:
            loss = loss + cfg.distill_weight * distillation_loss(logits, torch.from_numpy(np.stack(t_crops)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        elapsed = time.time() - start
        if cfg.log_every and step % cfg.log_every == 0:
            left = (budget - elapsed) if cfg.time_budget_s else elapsed / step * (total_steps - step)
            log(f"[{cfg.name}] step {step} epoch {step * cfg.batch_size / len(classes):.2f} "
                f"loss {np.mean(losses[-cfg.log_every:]):.4f} lr {opt.param_groups[0]['lr']:.2e} ETA {left / 60:.1f} min")
            save_checkpoint()
    save_checkpoint()
    if val_data is not None and len(val_data):
        ious = validate(model, val_data, torch.device("cpu"), cfg.val_batch, len(synonyms))
        log(f"[{cfg.name}] validation subset IoU (threshold 0.5, pixels): {ious}")
    info.recipe = {"kind": "head_finetune", "init": str(cfg.init_weights), "teacher": cfg.teacher, "loss": cfg.loss,
                   "crop": cfg.crop, "batch_size": cfg.batch_size, "lr": cfg.lr, "steps": step,
                   "epochs": round(step * cfg.batch_size / len(classes), 2), "seconds": round(elapsed),
                   "images": len(classes), "init_recipe": info.recipe}
    out = Path(cfg.output)
    write_weights(model, info, out, ckpt)
    log(f"[{cfg.name}] wrote {out} after {step} steps")
    return out
