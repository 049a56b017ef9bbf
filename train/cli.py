"""`drywallqa train`: teacher or student training from a YAML config (resumable, CUDA when present)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from drywallqa.argtypes import positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train the teacher or the distilled student from a config",
        description="Train from the `drywallqa data prepare` cache. Resumes from runs/<name>/last.pt after any "
                    "interruption; uses CUDA with bf16 autocast when present; scales out with "
                    "`torchrun --nproc_per_node N -m drywallqa.train.cli --config ...` (DDP).",
        epilog="examples:\n  drywallqa train --config configs/train_teacher.yaml\n"
               "  drywallqa train --config configs/train_student.yaml --epochs 5",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    p.set_defaults(func=run_from_args)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=Path, help="training config (configs/train_*.yaml)")
    p.add_argument("--epochs", type=positive_int, default=None, help="override the config's epochs")
    p.add_argument("--batch-size", type=positive_int, default=None, help="override the config's batch size")
    p.add_argument("--output", default=None,
                   help="where the fp16 weights are written (default: the config's `output:`; for "
                        "configs/train_*.yaml the shipped file in models/, which training replaces)")
    p.add_argument("--runs-dir", default=None, help="override where checkpoints and logs go (default runs/)")
    p.add_argument("--cache", type=Path, default=None,
                   help="data cache root (default: the config's `cache:`, else cache/)")
    p.add_argument("--max-steps-per-epoch", type=positive_int, default=None,
                   help="cap steps per epoch (smoke tests)")


def run_from_args(args: argparse.Namespace) -> int:
    from drywallqa.train.interrupts import sigterm_as_interrupt
    from drywallqa.train.worker_lifetime import end_with_parent

    # systemd, docker stop and kill send SIGTERM: stop like Ctrl-C ("interrupted", exit 130). The last finished
    # epoch's checkpoint is what the next start resumes from. A torchrun worker gets SIGTERM when its launcher
    # dies too, even by SIGKILL; both come first, before the slow imports.
    with sigterm_as_interrupt():
        end_with_parent()
        return _train(args)


def _train(args: argparse.Namespace) -> int:
    import torch

    from drywallqa.paths import CACHE_DIR
    from drywallqa.train.run_state import writable_folder
    from drywallqa.train.text_encoders import TextEncoderError, vocabulary_embeddings
    from drywallqa.train.trainer import TrainConfig, TrainError, train
    from drywallqa.train.training_data import InMemoryData
    from drywallqa.vocab import load_vocabulary

    cfg = TrainConfig.from_yaml(args.config, epochs=args.epochs, batch_size=args.batch_size, output=args.output,
                                runs_dir=args.runs_dir, max_steps_per_epoch=args.max_steps_per_epoch,
                                cache=str(args.cache) if args.cache else None)
    if cfg.frozen_encoder and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each process would write the same files
        raise TrainError(f"{args.config}: a frozen_encoder fine-tune runs in one process; start it with "
                         f"`drywallqa train --config {args.config}`, not under torchrun")
    # Before the data and the text encoder load (its cache goes there too): an unwritable runs folder fails now.
    writable_folder(cfg.runs_dir, "runs folder")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cache_root = Path(cfg.cache) if cfg.cache else CACHE_DIR
    data_device = None if cfg.frozen_encoder else device  # the head fine-tune reads its crops on the CPU side
    train_data = InMemoryData.from_cache(cache_root, cfg.cache_size, "train", data_device)
    val_data = InMemoryData.from_cache(cache_root, cfg.cache_size, "val", data_device,
                                       limit_per_class=cfg.val_limit_per_class)
    if cfg.frozen_encoder:  # the baked embeddings come from init_weights, so no text encoder is needed
        from drywallqa.train.head_finetune import finetune_head

        print(f"[{cfg.name}] {len(train_data)} train / {len(val_data)} val images at {cfg.cache_size}px; decoder and "
              f"head only, on cached features of {cfg.init_weights}")
        finetune_head(cfg, train_data, val_data)
        return 0
    vocab = load_vocabulary()
    try:
        emb = vocabulary_embeddings(vocab.all_prompts, cfg.text_encoder, cfg.clip_path,
                                    cache=Path(cfg.runs_dir) / f"text_{cfg.text_encoder}.safetensors")
    except TextEncoderError as exc:  # e.g. a hub name with no internet: one line, before any training
        raise TrainError(f"{args.config}: {exc}") from exc
    print(f"[{cfg.name}] {len(train_data)} train / {len(val_data)} val images at {cfg.cache_size}px on {device}; "
          f"text encoder {emb.encoder}")
    train(cfg, train_data, val_data, emb.vectors, emb.prompts, emb.encoder, vocab=vocab)
    return 0


def main() -> int:
    """Entry for torchrun: `torchrun --nproc_per_node 2 -m drywallqa.train.cli --config ...`."""
    import sys

    from drywallqa.cli import expected_errors

    p = argparse.ArgumentParser(prog="drywallqa-train")
    add_train_arguments(p)
    try:
        return run_from_args(p.parse_args())
    except expected_errors() as exc:  # as `drywallqa train` reports them (a bad config, prompts.yaml, cache)
        print(f"drywallqa-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("drywallqa-train: error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
