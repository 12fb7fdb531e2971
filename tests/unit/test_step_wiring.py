"""The training step's wiring (U2PL_SPEC.md sections 3, 4 and 6), end to end on a tiny DeepLabv3+.

`u2pl_step` runs once on a small batch (cutmix and hue jitter off, so nothing but the sampling is random); its total
loss, its three terms and the student's gradients are compared with a reference written here from the same
teacher and student outputs, with none of the library's loss code: pseudo-labels from the teacher in eval mode,
per-pixel masks and per-class loops in float64, numpy percentiles, and the queue contents rebuilt from the prefilled
rows plus this step's negatives in pixel order. The step's random choices (anchor pixels and queue rows) are
recorded by wrapping the two sampling functions; the reference checks that every recorded choice is allowed by the
spec, then uses the same ones. Where fp32 and float64 could disagree on a discrete choice (a near-tie pseudo-label,
an entropy at a percentile, a rank or anchor threshold) the reference asserts a margin: a failure there asks for
another seed, not a fix. Mutations of the step (a weight, the temperature, the thresholds, the teacher's mode,
padding not ignored, the contrastive term detached) each fail it.
"""
import contextlib
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from u2pl_scale.config import load_config
from u2pl_scale.data.transforms import normalize
from u2pl_scale.engine.step import StepConfig, u2pl_step
from u2pl_scale.method import contrastive
from u2pl_scale.method.queues import ClassQueues
from u2pl_scale.model import build_model

REPO = Path(__file__).resolve().parents[2]
CROP = 32
B_L = B_U = 2
PROGRESS = 0.25  # drop 15 %, alpha_t 15 %
PREFILL = 3  # random unit rows per class in the queues before the step
CAPACITY = 1000  # more than one step pushes: nothing falls out, so the queue is the prefill + this step, in order


def tiny_config(unsup_weight: float, contra_weight: float):
    return load_config(REPO / "configs" / "demo.yaml", [
        "model.backbone=resnet10t", "model.pretrained=false", "model.head_channels=16",
        "model.low_level_channels=8", "model.rep_dim=16", "model.dropout=0.0", "model.aspp_dilations=[1,2,3]",
        "method.cutmix_prob=0", "method.hue_jitter=0", f"method.unsup_weight={unsup_weight}",
        f"method.contrastive.weight={contra_weight}", "method.contrastive.num_anchors=8",
        "method.contrastive.num_negatives=5", f"method.contrastive.queue_size={CAPACITY}",
        "train.compile_method=false"])


def bn_layers(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def make_case(cfg, seed: int = 0, write=None):
    """Student, teacher (the student's parameters, perturbed), a labeled and an unlabeled batch, prefilled queues."""
    num_classes = cfg.data.num_classes
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    student = build_model(cfg.model, num_classes).to(memory_format=torch.channels_last)
    with torch.no_grad():  # peakier logits: a spread of entropies, and teacher probabilities above 0.3
        student.classifier[-1].weight.mul_(4.0)
    images = torch.randint(0, 256, (B_L + B_U, 3, CROP, CROP), dtype=torch.uint8, generator=gen)
    x_all = normalize(images, cfg.data.mean, cfg.data.std, channels_last=True)
    with torch.no_grad():  # BN running statistics of this batch, so that eval mode is close to train mode
        for bn in bn_layers(student):
            bn.momentum = None  # cumulative average: one forward sets them
        student.train()(x_all)
        for bn in bn_layers(student):
            bn.momentum = 0.1
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=gen))
            p.requires_grad_(False)
    x_l, x_u = x_all[:B_L].contiguous(memory_format=torch.channels_last), x_all[B_L:].contiguous(
        memory_format=torch.channels_last)
    # labels: mostly the teacher's own argmax (so labeled pixels have anchors), a random stripe, an ignored block
    with torch.no_grad():
        probe = copy.deepcopy(teacher).train()(x_all)["pred"][:B_L]
    y_l = F.interpolate(probe, size=(CROP, CROP), mode="bilinear", align_corners=True).argmax(1)
    y_l[:, :, 20:26] = torch.randint(0, num_classes, (B_L, CROP, 6), generator=gen)
    y_l[0, 2:9, 3:12] = 255
    y_l[1, 25:, :5] = 255
    valid_u = torch.ones(B_U, CROP, CROP, dtype=torch.bool)
    valid_u[1, :, 26:] = False  # padding of the unlabeled image (its pseudo-labels are ignored)
    valid_u[0, 29:, :] = False
    queues = ClassQueues(num_classes, cfg.model.rep_dim, CAPACITY, **({"write": write} if write else {}))
    prefill = F.normalize(torch.randn(num_classes * PREFILL, cfg.model.rep_dim, generator=gen), dim=1)
    owner = torch.arange(num_classes * PREFILL) % num_classes
    queues.push(prefill, owner[:, None] == torch.arange(num_classes)[None, :])
    prefill_rows = [prefill[owner == c].double() for c in range(num_classes)]
    return student, teacher, x_l, y_l, x_u, valid_u, queues, prefill_rows


def run_step(sc, student, teacher, queues, x_l, y_l, x_u, valid_u):
    """u2pl_step with the sampled anchor pixels and queue rows recorded (by pass-through wrappers)."""
    record = {}

    def anchors(*args, _original=contrastive.sample_anchor_index_from_labels, **kwargs):
        index, count = _original(*args, **kwargs)
        record.setdefault("anchor_index", []).append(index.clone())
        return index, count

    def negatives(self, *args, _original=ClassQueues.sample_indices, **kwargs):
        index, valid = _original(self, *args, **kwargs)
        record.setdefault("negative_index", []).append(index.clone())
        return index, valid

    with pytest.MonkeyPatch.context() as patch:  # its own: conftest.method_path's monkeypatch stays in place
        patch.setattr(contrastive, "sample_anchor_index_from_labels", anchors)
        patch.setattr(ClassQueues, "sample_indices", negatives)
        student.train()
        terms = u2pl_step(sc, student, teacher, queues, x_l, y_l, x_u, valid_u, PROGRESS, contextlib.nullcontext,
                          generator=torch.Generator().manual_seed(123))
    assert [len(record.get(key, [])) for key in ("anchor_index", "negative_index")] == [1, 1], \
        "the step did not sample anchors and negatives exactly once"
    record = {key: value[0] for key, value in record.items()}
    # nothing writes the queues after the sampling: what they hold now is what was sampled from
    record["buffer"], record["fill"] = queues.buffer.clone(), queues.fill.clone()
    return terms, record


def up(logits):
    return F.interpolate(logits.double(), size=(CROP, CROP), mode="bilinear", align_corners=True)


def mean_ce(logits, labels, keep):
    """Mean over the kept pixels of -log softmax(logits)[label], float64."""
    log_prob = torch.log_softmax(logits.double(), dim=1)
    picked = log_prob.gather(1, torch.where(keep, labels, 0)[:, None])[:, 0]
    return -(picked * keep).sum() / keep.sum()


def gap_at(sorted_values, q):
    """Distance of numpy's q-th percentile to the nearest value it does not equal (how robust a threshold is)."""
    thr = np.percentile(sorted_values, q)
    others = np.abs(sorted_values - thr)
    return others[others > 0].min() if (others > 0).any() else np.inf


def reference(sc, student, teacher, x_l, y_l, x_u, valid_u, record, prefill_rows):
    """Total loss (with a graph to the student's parameters) and its parts, from the spec, given the recorded
    samples. `teacher` holds the teacher's parameters and BN statistics from before the step."""
    num_classes, ignore = sc.num_classes, sc.ignore_index
    x_all = torch.cat([x_l, x_u])
    # step 2: pseudo-labels from the teacher in eval mode (cutmix and hue jitter are off)
    teacher.eval()
    with torch.no_grad():
        prob_eval = torch.softmax(up(teacher(x_u)["pred"]), dim=1)
    top2 = prob_eval.topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1])[valid_u].min() > 1e-6, "a pseudo-label is a near tie: choose another seed"
    pseudo = torch.where(valid_u, prob_eval.argmax(1), ignore)
    # step 6: the teacher in train mode on the student's batch
    teacher.train()
    with torch.no_grad():
        out_t = teacher(x_all)
    q = torch.softmax(out_t["pred"].double(), dim=1)  # stride 4
    rep_t = out_t["rep"].double()
    prob_u = torch.softmax(up(out_t["pred"][B_L:]), dim=1)
    entropy = -(prob_u * torch.log(prob_u + 1e-10)).sum(1)
    # step 4: the student, train mode (batch statistics: the same output as the step's forward)
    out = student(x_all)
    pred, rep = out["pred"], out["rep"]
    # step 5: supervised CE at crop size
    labeled = y_l != ignore
    sup = mean_ce(up(pred[:B_L]), y_l, labeled)
    # section 4: drop the highest-entropy pixels, (valid / kept) x mean CE over the kept
    h_valid = np.sort(entropy[valid_u].numpy())
    drop = sc.drop_percent_start * (1 - PROGRESS)
    alpha = sc.low_entropy_start * (1 - PROGRESS)
    for percent in (100 - drop, alpha, 100 - alpha):
        assert gap_at(h_valid, percent) > 1e-6, "an entropy lies at a threshold: choose another seed"
    kept = valid_u & (entropy < float(np.percentile(h_valid, 100 - drop)))
    unsup = valid_u.sum() / kept.sum() * mean_ce(up(pred[B_L:]), pseudo, kept)
    reliable = (kept.sum() / valid_u.sum()).item()
    # section 6: labels and masks at stride 4 by nearest neighbour (a stride-4 grid of the crop)
    height, width = rep.shape[-2:]
    stride = CROP // height
    assert CROP == stride * height == stride * width
    low_u = valid_u & (entropy <= float(np.percentile(h_valid, alpha)))
    high_u = valid_u & (entropy >= float(np.percentile(h_valid, 100 - alpha)))
    label = torch.cat([y_l, pseudo])[:, ::stride, ::stride].reshape(-1).tolist()
    low = torch.cat([labeled, low_u])[:, ::stride, ::stride].reshape(-1).tolist()
    high = torch.cat([labeled, high_u])[:, ::stride, ::stride].reshape(-1).tolist()
    pixels = len(label)
    per_image = height * width
    q_rows = q.permute(0, 2, 3, 1).reshape(pixels, num_classes).tolist()
    ranked = q.permute(0, 2, 3, 1).reshape(pixels, num_classes).sort(dim=1, descending=True).values
    for boundary in {sc.low_rank, min(sc.high_rank, num_classes)} - {num_classes}:
        assert (ranked[:, boundary - 1] - ranked[:, boundary]).min() > 1e-6, "a rank is a near tie: another seed"
    teacher_rows = rep_t.permute(0, 2, 3, 1).reshape(pixels, -1)
    student_rows = rep.double().permute(0, 2, 3, 1).reshape(pixels, -1)
    anchor_index, negative_index = record["anchor_index"], record["negative_index"]
    num_anchors, num_negatives = sc.num_anchors, sc.num_negatives
    queues_offsets = [c * CAPACITY for c in range(num_classes)]
    info = {"present": [], "used": [], "labeled_anchors": 0, "labeled_negatives": 0, "unlabeled_negatives": 0}
    terms = []
    for c in range(num_classes):
        prototype_pixels, candidates, negatives = [], set(), []
        for p in range(pixels):
            order = sorted(range(num_classes), key=lambda k: -q_rows[p][k])
            if label[p] == c and low[p]:
                prototype_pixels.append(p)
                if q_rows[p][c] > sc.anchor_threshold:
                    assert abs(q_rows[p][c] - sc.anchor_threshold) > 1e-6
                    candidates.add(p)
            if high[p] and q_rows[p][c] < sc.negative_threshold:
                if p < B_L * per_image:
                    if c in order[:sc.low_rank] and c != label[p]:
                        negatives.append(p)
                elif c in order[sc.low_rank:sc.high_rank]:
                    negatives.append(p)
        info["labeled_negatives"] += sum(p < B_L * per_image for p in negatives)
        info["unlabeled_negatives"] += sum(p >= B_L * per_image for p in negatives)
        # the queue after the push (which precedes the sampling): prefill, then this step's unit teacher rows
        queue = torch.cat([prefill_rows[c], F.normalize(teacher_rows[negatives], dim=1)])
        offset = queues_offsets[c]
        assert int(record["fill"][c]) == len(queue), f"class {c}: the queue does not hold this step's negatives"
        torch.testing.assert_close(record["buffer"][offset:offset + len(queue)].double(), queue, rtol=0, atol=1e-6)
        if not prototype_pixels:
            continue
        info["present"].append(c)
        if not candidates:  # the queue is never empty here
            continue
        info["used"].append(c)
        chosen = anchor_index[c].tolist()
        assert len(chosen) == num_anchors and set(chosen) <= candidates, f"class {c}: an anchor is no candidate"
        info["labeled_anchors"] += sum(p < B_L * per_image for p in chosen)
        slots = negative_index[c] - offset
        assert slots.numel() == num_anchors * num_negatives
        assert ((slots >= 0) & (slots < len(queue))).all(), f"class {c}: a negative outside the queue's rows"
        anchors = F.normalize(student_rows[chosen], dim=1)  # [A, D]
        prototype = F.normalize(teacher_rows[prototype_pixels].mean(0), dim=0)
        keys = torch.cat([prototype.expand(num_anchors, 1, -1),
                          queue[slots].reshape(num_anchors, num_negatives, -1)], dim=1)  # [A, 1 + K, D]
        logits = (keys @ anchors[:, :, None])[:, :, 0] / sc.temperature
        terms.append(-torch.log_softmax(logits, dim=1)[:, 0].mean())
    num_present = len(info["present"])
    contra = sum(terms) / num_present if num_present >= 2 else 0.0 * rep.sum()
    total = sup + sc.unsup_weight * unsup + sc.contra_weight * contra
    parts = {"sup": sup.item(), "unsup": unsup.item(), "contra": float(contra.detach()), "reliable": reliable}
    return total, parts, info


def named_grads(loss, model):
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    return dict(zip(names, torch.autograd.grad(loss, params)))


def relative_error(got, expected):
    return ((got.double() - expected.double()).norm() / expected.double().norm().clamp(min=1e-30)).item()


# the published weights with each implementation of the method's stages (conftest.method_path: the CPU stages the
# trainer takes on CPU, and the reference stages a GPU takes), and another unsupervised weight without the
# contrastive term
@pytest.mark.parametrize("weights,method_path", [((1.0, 0.25), "cpu"), ((1.0, 0.25), "reference"),
                                                 ((0.5, 0.0), "cpu")],
                         indirect=["method_path"], ids=["published-cpu", "published-reference", "no-contrastive"])
def test_step_loss_and_gradients_equal_the_reference(weights, method_path):
    cfg = tiny_config(*weights)
    sc = StepConfig.from_config(cfg, method_path)
    assert not (sc.ohem or sc.aux_weight or sc.cutmix_prob or sc.hue_jitter or sc.compile_method)
    student, teacher, x_l, y_l, x_u, valid_u, queues, prefill_rows = make_case(cfg, write=method_path.queue_write)
    teacher_before = copy.deepcopy(teacher)  # the step's train-mode teacher forward moves its BN statistics

    terms, record = run_step(sc, student, teacher, queues, x_l, y_l, x_u, valid_u)
    step_grads = named_grads(terms["loss"], student)
    total, parts, info = reference(sc, student, teacher_before, x_l, y_l, x_u, valid_u, record, prefill_rows)
    ref_grads = named_grads(total, student)

    # a nontrivial case: several classes, anchors from labeled pixels, negatives from both halves
    assert len(info["present"]) >= 3 and len(info["used"]) >= 2, info
    assert info["labeled_anchors"] > 0 and info["labeled_negatives"] > 0 and info["unlabeled_negatives"] > 0, info
    assert 0.5 < parts["reliable"] < 1.0 and parts["contra"] > 0

    for key in ("sup", "unsup", "contra", "reliable"):
        assert terms[key].item() == pytest.approx(parts[key], rel=1e-5), key
    assert terms["loss"].item() == pytest.approx(total.item(), rel=1e-5)
    for name, grad in step_grads.items():  # every parameter, backbone included
        assert relative_error(grad, ref_grads[name]) < 1e-4, name
    rep_head = [n for n in step_grads if n.startswith("representation.")]
    classifier = [n for n in step_grads if n.startswith("classifier.")]
    assert rep_head and classifier
    assert all(step_grads[n].abs().sum() > 0 for n in classifier)
    rep_grad = torch.cat([step_grads[n].reshape(-1) for n in rep_head])
    if sc.contra_weight > 0:  # the contrastive term reaches the representation head, and only it does
        assert rep_grad.abs().sum() > 0
    else:
        assert rep_grad.abs().sum() == 0
