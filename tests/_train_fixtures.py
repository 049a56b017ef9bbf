"""Training-test fixtures: a tiny synthetic data cache in the `drywallqa data prepare` layout, random prompt
embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from drywallqa.train.data.cache import CacheWriter
from drywallqa.vocab import load_vocabulary


def write_synthetic_cache(root: Path, size: int = 64, n_per_class: int = 6, seed: int = 0, n_val: int = 4) -> Path:
    """cache/<size>/{images,masks}.npy + meta.json: dark 'cracks' (lines) and bright 'tape' (bands); the last
    `n_val` images are the val split, the others train."""
    rng = np.random.default_rng(seed)
    n = 2 * n_per_class
    images = np.full((n, size, size, 3), 150, np.uint8) + rng.integers(0, 20, (n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    meta = []
    for i in range(n):
        cls = i % 2
        pos = int(rng.integers(size // 4, 3 * size // 4))
        if cls == 0:
            masks[i, :, pos:pos + 3] = 1
            images[i][masks[i] > 0] = 40
        else:
            masks[i, pos:pos + 10, :] = 1
            images[i][masks[i] > 0] = 245
        meta.append({"id": f"img{i:03d}", "dataset": ["cracks", "drywall"][cls], "class": cls,
                     "class_name": ["crack", "taping"][cls], "split": "val" if i >= n - n_val else "train",
                     "file": f"img{i:03d}.jpg"})
    writer = CacheWriter(root, size, n)  # the very writer `drywallqa data prepare` uses
    for i in range(n):
        writer.put(images[i], masks[i])
    writer.finish(meta, {"classes": ["crack", "taping"], "fingerprint": "synthetic"})
    return root


def tiny_train_config(path: Path, out: Path, runs: Path, architecture: str = "effnet_lite0_fpn",
                      epochs: int = 2, teacher: str | None = None, size: int = 64) -> Path:
    lines = [
        "name: tiny", f"architecture: {architecture}", "profile: lite", f"output: {out}",
        f"runs_dir: {runs}", f"cache_size: {size}", f"crop: {size // 2}", "batch_size: 2", f"epochs: {epochs}",
        "lr: 0.001", "warmup_steps: 2", "max_steps_per_epoch: 2", "val_limit_per_class: 2", "log_every: 0",
    ]
    if teacher:
        lines.append(f"teacher: {teacher}")
    path.write_text("\n".join(lines) + "\n")
    return path


def random_embeddings(seed: int = 0):
    """The vocabulary, random unit prompt embeddings (MiniLM's width) and each prompt's class index."""
    vocab = load_vocabulary()
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(len(vocab.all_prompts), 384, generator=g), dim=1)
    cls = torch.tensor([vocab.class_index(vocab.prompt_to_class[p]) for p in vocab.all_prompts])
    return vocab, emb, cls


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def tiny_clip(folder: Path, whole: bool = True, seed: int = 0) -> Path:
    """A random CLIP saved with save_pretrained: CLIPModel (text + vision towers, as openai/clip-vit-base-patch32 is
    downloaded, with its legacy eos_token_id 2) or CLIPTextModel alone; a byte-level tokenizer beside it."""
    import json

    import transformers

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, projection_dim=24)
    torch.manual_seed(seed)
    if whole:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=32, patch_size=16, projection_dim=24)
        cfg = transformers.CLIPConfig(text_config={**text, "eos_token_id": 2, "bos_token_id": 0, "pad_token_id": 1},
                                      vision_config=vision, projection_dim=24)
        transformers.CLIPModel(cfg).save_pretrained(folder)
    else:
        cfg = transformers.CLIPTextConfig(**text, eos_token_id=vocab["<|endoftext|>"],
                                          bos_token_id=vocab["<|startoftext|>"])
        transformers.CLIPTextModel(cfg).save_pretrained(folder)
    return folder
