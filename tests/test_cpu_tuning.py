"""CPU training settings: the heap keeps freed memory, and channels-last training computes the same thing."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

from drywallqa.train.cpu_tuning import use_channels_last  # noqa: E402
from drywallqa.train.models.segmenter import build_segmenter  # noqa: E402
from tests._train_fixtures import random_embeddings  # noqa: E402

FAULTS_OF_REPEATED_BUFFERS = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from drywallqa.train.cpu_tuning import keep_freed_memory_in_heap
    if sys.argv[1] == "tuned":
        assert keep_freed_memory_in_heap()
    buf = np.ones(16 << 20, np.float32)  # 64 MiB, written in full, like one activation of a training step
    del buf
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):  # the same buffer again: does it come back from the heap or from fresh pages?
        buf = np.ones(16 << 20, np.float32)
        del buf
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's; other platforms keep defaults")
def test_freed_training_buffers_are_reused_instead_of_faulted_in_again():
    def faults(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", FAULTS_OF_REPEATED_BUFFERS, mode],
                             capture_output=True, text=True, timeout=120)
        if run.returncode != 0 and mode == "tuned" and "AssertionError" in run.stderr:
            pytest.skip("this C library has no mallopt (not glibc)")
        assert run.returncode == 0, run.stderr[-2000:]
        return int(run.stdout.split()[-1])

    default, tuned = faults("default"), faults("tuned")
    assert default >= 8 * 32  # each 64 MiB buffer is a fresh mmap, faulted in again (>= 32 faults even as 2 MiB pages)
    assert tuned * 10 <= default  # the buffer's memory stayed in the heap and is reused


@pytest.mark.parametrize("threads, bound", [(2, 1e-3), (1, 1e-2)])
def test_channels_last_training_on_cpu_gives_the_same_gradients(threads: int, bound: float) -> None:
    """The same sums in another order: float32 rounding. On one thread oneDNN's channels-last backward rounds
    differently (measured: 4.3e-3 of the gradient's norm, against 6e-5 on two threads and 2e-5 between thread
    counts in the default layout), still far below the noise of a training step."""
    assert use_channels_last("effnet_lite0_fpn", torch.device("cpu"))
    assert not use_channels_last("hrnet_w18", torch.device("cpu"))  # slower that way on CPU (measured)
    assert use_channels_last("hrnet_w18", torch.device("cuda"))
    vocab, emb, cls = random_embeddings()
    torch.manual_seed(0)
    plain = build_segmenter("effnet_lite0_fpn", emb, cls, len(vocab.classes)).train()
    nhwc = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 96, 96)
    ids = torch.tensor([[0, len(vocab.all_prompts) - 1]] * 2)
    results = []
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for model, inp in ((plain, x), (nhwc, x.contiguous(memory_format=torch.channels_last))):
            logits = model(inp, ids)
            logits.square().mean().backward()
            results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    finally:
        torch.set_num_threads(before)
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.allclose(out_a, out_b, atol=1e-4)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 50
    flat_a = torch.cat([g.flatten() for g in grads_a.values()])
    flat_b = torch.cat([grads_b[name].flatten() for name in grads_a])
    assert (flat_a - flat_b).norm() <= bound * flat_a.norm()
