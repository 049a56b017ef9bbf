"""Decoded training data held in memory (or memory-mapped), served as tensor batches on any device.

Two sources: the `drywallqa data prepare` cache (cache/<size>/images.npy, masks.npy, meta.json) and the
compact JPEG/PNG pack written by train/data/pack.py for a lent GPU machine.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch


class InMemoryData:
    def __init__(self, images, masks, classes: np.ndarray, ids: list[str], on_device: torch.device | None = None):
        """images: N x S x S x 3 uint8, masks: N x S x S uint8 {0,1} (numpy, memmap or tensors)."""
        self.ids = ids
        self.fingerprint = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]
        if on_device is not None:
            self.images = torch.as_tensor(np.ascontiguousarray(images)).to(on_device)
            self.masks = torch.as_tensor(np.ascontiguousarray(masks)).to(on_device)
        else:
            self.images, self.masks = images, masks
        self.classes = torch.as_tensor(np.asarray(classes, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(self.images, torch.Tensor):
            i = idx.to(self.images.device)
            return self.images[i].to(device), self.masks[i].to(device), self.classes[idx].to(device)
        order = np.sort(idx.numpy())  # sorted reads are kinder to a memmap
        img = torch.from_numpy(np.ascontiguousarray(self.images[order]))
        msk = torch.from_numpy(np.ascontiguousarray(self.masks[order]))
        return img.to(device), msk.to(device), self.classes[torch.from_numpy(order)].to(device)

    @classmethod
    def from_cache(cls, cache_root: str | Path, size: int, split: str, device: torch.device | None = None,
                   limit_per_class: int | None = None) -> InMemoryData:
        """One side of the split from `drywallqa data prepare`'s cache at `size` (memory-mapped on CPU)."""
        from drywallqa.train.data.cache import open_cache

        images, masks, items, info = open_cache(cache_root, size)
        rows_list = [i for i, m in enumerate(items) if m["split"] == split]
        if limit_per_class is not None:  # an evenly spaced, deterministic subset per class
            by_class: dict[int, list[int]] = {}
            for i in rows_list:
                by_class.setdefault(items[i]["class"], []).append(i)
            rows_list = sorted(i for v in by_class.values()
                               for i in v[::max(1, len(v) // limit_per_class)][:limit_per_class])
        rows = np.array(rows_list, dtype=np.int64)
        ids = [items[i]["id"] for i in rows]
        classes = np.array([items[i]["class"] for i in rows])
        on_device = device if device is not None and device.type == "cuda" else None
        data = cls(images[rows], masks[rows], classes, ids, on_device=on_device)
        data.fingerprint = info.get("fingerprint", data.fingerprint)  # prepare's hash also covers the labels
        return data

    @classmethod
    def from_pack(cls, part_dirs: list[str | Path], device: torch.device | None = None) -> InMemoryData:
        images, masks, classes, ids = [], [], [], []
        for d in map(Path, part_dirs):
            meta = json.loads((d / "meta.json").read_text())
            jpg, jlen = np.load(d / "jpg.npy"), np.load(d / "jpg_len.npy")
            png, plen = np.load(d / "png.npy"), np.load(d / "png_len.npy")
            jo, po = np.concatenate([[0], np.cumsum(jlen)]), np.concatenate([[0], np.cumsum(plen)])

            def decode(i: int, jpg=jpg, png=png, jo=jo, po=po):
                im = cv2.imdecode(jpg[jo[i]:jo[i + 1]], cv2.IMREAD_COLOR)[:, :, ::-1]
                mk = cv2.imdecode(png[po[i]:po[i + 1]], cv2.IMREAD_GRAYSCALE)
                return np.ascontiguousarray(im), (mk > 127).astype(np.uint8)

            with ThreadPoolExecutor(8) as pool:
                for im, mk in pool.map(decode, range(len(meta))):
                    images.append(im)
                    masks.append(mk)
            classes += [m["class"] for m in meta]
            ids += [m["id"] for m in meta]
        return cls(np.stack(images), np.stack(masks), np.array(classes), ids, on_device=device)
