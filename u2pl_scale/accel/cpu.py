"""The CPU stages: the method's passes as torch ops shaped for a CPU in eager mode.

A CPU has no host/device boundary to protect, so these may read counts back (exact queue pushes, a radix select
over the few wanted order statistics instead of a full sort), loop over cache-sized blocks so that a pass's
temporaries stay in cache, and reuse their large buffers (accel/buffers.py). Each returns what its reference stage
in u2pl_scale/method returns (tests/unit/test_accel_cpu.py compares them). At the VOC shapes they take less than
half the reference's time on CPU (benchmarks/method_overhead.py).

Only eager CPU code takes them: traced code (train.compile_method) and accelerators run the reference.
"""
from __future__ import annotations

import functools

import torch

from ..method.contrastive import pixel_rows
from ..method.queues import write_compacted
from ..method.reliability import interpolated
from ..method.stages import REFERENCE, Stages
from .buffers import BufferPool
from .threads import single_thread

# elements per chunk of the entropy and CE passes, so that a chunk's temporaries stay in cache
CHUNK_ELEMENTS = 1 << 19
# bytes of gathered negatives per chunk of the anchors' pass: a few MB keeps a chunk in cache (larger was slower)
NEGATIVE_CHUNK_BYTES = 4 << 20


def cpu_stages(single_thread_loops: bool = False) -> Stages:
    """The CPU stages, with their own buffer pool. `single_thread_loops`: the cache-sized loops on one thread
    (better on a machine shared with other jobs, see threads.py)."""
    pool = BufferPool()
    return REFERENCE.replace(
        "cpu",
        entropy_from_logits=functools.partial(entropy_from_logits, single=single_thread_loops),
        percentiles_and_count=percentiles_and_count,
        scaled_ce_sum=functools.partial(scaled_ce_sum, pool=pool, single=single_thread_loops),
        negative_mask=negative_mask,
        prototype_rows=functools.partial(prototype_rows, pool=pool),
        gather_pixels=functools.partial(gather_pixels, pool=pool),
        anchor_negatives=functools.partial(anchor_negatives, pool=pool, single=single_thread_loops),
        queue_write=functools.partial(queue_write, single=single_thread_loops),
    )


def row_chunks(shape: torch.Size) -> list[tuple[int, int, int]]:
    """(image, first row, end row) blocks of a [B, C, H, W] map with about CHUNK_ELEMENTS elements each."""
    batch, channels, height, width = shape
    rows = max(1, min(height, CHUNK_ELEMENTS // max(1, channels * width)))
    return [(b, r, min(height, r + rows)) for b in range(batch) for r in range(0, height, rows)]


# ---------------------------------------------------------------------------------------------- reliability
def entropy_from_logits(logits: torch.Tensor, *, single: bool = False) -> torch.Tensor:
    """In cache-sized row blocks of each image, as log(S) - sum_c e_c d_c / S with d = z - max_c z, e = exp(d),
    S = sum_c e: one exp per element and one log per pixel, where softmax then entr takes an exp and a log per
    element. Equal to the reference up to fp32 rounding; d <= 0 keeps small entropies accurate."""
    if logits.dim() != 4:
        return REFERENCE.entropy_from_logits(logits)
    with torch.autocast("cpu", enabled=False):
        logits = logits.float()
        batch, classes, height, width = logits.shape
        out = torch.empty(batch, height, width, dtype=torch.float32)
        chunks = row_chunks(logits.shape)
        size = classes * (chunks[0][2] - chunks[0][1]) * width
        shifted_buf, exp_buf = torch.empty(size, dtype=torch.float32), torch.empty(size, dtype=torch.float32)
        with single_thread(single):
            for b, top, bottom in chunks:
                block = logits[b, :, top:bottom]
                shifted = torch.sub(block, block.amax(0), out=shifted_buf[: block.numel()].view(block.shape))
                exps = torch.exp(shifted, out=exp_buf[: block.numel()].view(block.shape))
                total = exps.sum(0)
                weighted = shifted.mul_(exps).sum(0)
                torch.sub(total.log(), weighted.div_(total), out=out[b, top:bottom])
        return out


def order_keys(values: torch.Tensor) -> torch.Tensor:
    """int32 keys whose integer order is the float order of `values` (fp32), so a radix sort can be used."""
    bits = values.float().contiguous().view(torch.int32)
    # negative floats: flip every bit but the sign, so larger magnitudes sort lower
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def from_order_keys(keys: torch.Tensor) -> torch.Tensor:
    """Inverse of `order_keys` (the bit flip is its own inverse)."""
    return (keys ^ ((keys >> 31) & 0x7FFFFFFF)).view(torch.float32)


def select_keys(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`torch.sort(keys).values[positions]` for int32 keys by a one-level radix select: a histogram of the top 16
    bits finds the bucket of each wanted position, and only those buckets are sorted (host-side sizes)."""
    bucket = (keys >> 16) + 32768  # 0 .. 65535, in key order
    counts = torch.bincount(bucket, minlength=1 << 16)
    ends = torch.cumsum(counts, 0)
    wanted = torch.searchsorted(ends, positions, right=True)  # bucket holding each position
    starts = (ends - counts)[wanted]
    out = torch.empty(positions.shape, dtype=keys.dtype)
    for b in torch.unique(wanted).tolist():
        in_bucket = torch.sort(keys[bucket == b]).values
        take = wanted == b
        out[take] = in_bucket[positions[take] - starts[take]]
    return out


def percentiles_and_count(values, valid_mask, qs, masked=None):
    """The few order statistics by a radix select over integer keys (a bijection of the fp32 bit patterns that keeps
    their order) instead of a sort of every value; the same values as the reference's sort."""
    flat = values.reshape(-1).float()
    valid = valid_mask.reshape(-1).to(torch.bool)
    count = valid.sum()
    keys = torch.where(valid, order_keys(flat), torch.iinfo(torch.int32).max)  # invalid entries sort last
    return interpolated(lambda bounds: from_order_keys(select_keys(keys, bounds)), count, qs), count


# -------------------------------------------------------------------------------------------- unsupervised CE
class _ScaledCESum(torch.autograd.Function):
    """`scale` x the sum of per-pixel CE over non-ignored pixels of fp32 logits [B, C, H, W], fused: the
    log_softmax of each whole image is written straight into the gradient buffer, then, in cache-sized row blocks,
    the loss is read from it and it is turned in place into the gradient scale * (softmax - onehot) (0 on ignored
    pixels), which is saved, so backward only hands it on (no log_softmax / nll backward passes, and no extra
    logits-sized pass when the incoming gradient is 1). Channels-last logits are made contiguous first: a class
    reduction over channels-last blocks costs a copy per block (the trainer upsamples contiguous logits)."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, scale, pool, single):
        logits = logits.contiguous()
        grad = pool.empty("unsup_ce_grad", tuple(logits.shape), torch.float32)
        for b in range(logits.shape[0]):
            torch.log_softmax(logits[b], dim=0, out=grad[b])
        partial = []
        with single_thread(single):
            for b, top, bottom in row_chunks(logits.shape):
                block = grad[b, :, top:bottom]  # [C, rows, W] log-probabilities
                labels = target[b, top:bottom]
                valid = labels != ignore_index
                safe = torch.where(valid, labels, 0)[None].long()
                picked = block.gather(0, safe)[0]
                partial.append(torch.where(valid, picked, 0.0).sum())
                block.exp_()
                block.scatter_add_(0, safe, valid[None].float().neg_())
                block.mul_(valid[None] * scale)
        ctx.save_for_backward(grad)
        return torch.stack(partial).sum().neg_() * scale

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # CPU only, so reading the incoming gradient costs no device sync. Handing the saved tensor on is safe:
        # autograd only accumulates in place into a gradient nothing else references.
        if grad_output.item() == 1.0:
            return grad, None, None, None, None, None
        return grad * grad_output, None, None, None, None, None


def scaled_ce_sum(logits, target, ignore_index, scale, *, pool: BufferPool, single: bool = False):
    if logits.dim() != 4:
        return REFERENCE.scaled_ce_sum(logits, target, ignore_index, scale)
    with torch.autocast("cpu", enabled=False):
        return _ScaledCESum.apply(logits.float(), target, ignore_index, scale, pool, single)


# -------------------------------------------------------------------------------------------- negative mask
def rank_keys(prob: torch.Tensor) -> torch.Tensor:
    """[N, C, hw] -> int64 keys in the order of the values, unique within a pixel (ties: lower class first)."""
    num_classes = prob.shape[1]
    shift = max(1, (num_classes - 1).bit_length())
    tie_break = torch.arange(num_classes - 1, -1, -1)[None, :, None]  # lower class: larger key
    return order_keys(prob).long().mul_(1 << shift).add_(tie_break)


def top_mask(keys: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """[N, C, hw] keys -> bool [N, C, hw], True for the k largest (smallest) classes of each pixel.

    k rounds of max over the class dim, each below the previous one; no topk/argmax over a 21-long dim, which is
    several times slower on CPU. The complement is used when k > C / 2. Exact when the keys are unique within a
    pixel (rank_keys); float values work too, but a pixel whose k-th value is tied then gets more than k.
    """
    num_classes = keys.shape[1]
    if k > num_classes - k:
        return ~top_mask(keys, num_classes - k, not largest)
    if k <= 0:
        return torch.zeros(keys.shape, dtype=torch.bool)
    if not largest:
        # the k smallest are the k largest of an order-reversing map: -x for floats, ~x (= -x - 1, no overflow)
        # for integer keys, whose amin over the class dim is much slower than amax on CPU
        flipped = keys.neg() if keys.is_floating_point() else torch.bitwise_not(keys)
        return top_mask(flipped, k, largest=True)
    lowest = float("-inf") if keys.is_floating_point() else torch.iinfo(keys.dtype).min
    kth = keys.amax(1, keepdim=True)
    for _ in range(k - 1):
        kth = torch.where(keys < kth, keys, lowest).amax(1, keepdim=True)
    return keys >= kth


def value_top_mask(values: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """`top_mask(rank_keys(values), k, largest)` with the same result: the rounds run over the fp32 values
    themselves (half the bytes of the int64 keys, and no key pass; measured 2x faster at VOC shapes). A pixel
    whose k-th value is tied selects more (or, through the complement, fewer) than k classes; those few pixels
    (~1 in 60000 for a softmax) are redone from their keys (reading the tie count back costs nothing on CPU)."""
    mask = top_mask(values, k, largest)
    tied = mask.sum(1) != min(max(k, 0), values.shape[1])
    if bool(tied.any()):
        image, pixel = tied.nonzero(as_tuple=True)
        rows = values[image, :, pixel]  # [T, C]
        mask[image, :, pixel] = top_mask(rank_keys(rows.t()[None]), k, largest)[0].t()
    return mask


def negative_mask(prob, labels, high, num_labeled, low_rank, high_rank, negative_threshold):
    """The ranks from k rounds of a max over the fp32 values (value_top_mask), where a 21-long sort per pixel is
    several times slower; written class-major through an [N, C, hw] view (no transpose copy)."""
    batch, num_classes, pixels = prob.shape
    candidate = high[:, None, :] & (prob < negative_threshold)  # [N, C, hw]
    top_low = value_top_mask(prob, min(low_rank, num_classes), largest=True)
    negative = torch.empty(num_classes, batch, pixels, dtype=torch.bool)
    negative_nc = negative.transpose(0, 1)
    if num_labeled > 0:  # labeled: among the top low_rank, but not the true label
        not_label = labels[:num_labeled, None, :] != torch.arange(num_classes)[None, :, None]
        torch.logical_and(candidate[:num_labeled] & top_low[:num_labeled], not_label, out=negative_nc[:num_labeled])
    if num_labeled < batch:  # unlabeled: ranked in [low_rank, high_rank)
        window = ~top_low[num_labeled:]
        if high_rank < num_classes:
            window &= ~value_top_mask(prob[num_labeled:], num_classes - high_rank, largest=False)
        torch.logical_and(candidate[num_labeled:], window, out=negative_nc[num_labeled:])
    return negative


# --------------------------------------------------------------------------------- prototypes and anchors
def prototype_rows(rows, prototype_label, num_classes, queue_dtype, *, pool: BufferPool):
    """Class sums by index_add (no [C, P] one-hot), unit rows by one multiply with the inverse norm (a divide per
    element costs more here) into a reused buffer."""
    counts = torch.zeros(num_classes + 1, dtype=torch.long).index_add_(0, prototype_label,
                                                                       torch.ones_like(prototype_label))
    sums = torch.zeros(num_classes + 1, rows.shape[1], dtype=torch.float32).index_add_(0, prototype_label, rows)
    norm = torch.linalg.vector_norm(rows, dim=-1, keepdim=True).clamp_min_(1e-12)
    unit = torch.mul(rows, norm.reciprocal_(), out=pool.empty("push_rows", tuple(rows.shape), rows.dtype))
    return unit.to(queue_dtype), sums[:num_classes], counts[:num_classes].float()


class _GatherRows(torch.autograd.Function):
    """Rows of a channels-last feature map at flat pixel indices; backward scatters into a reused buffer
    (BufferPool.scatter_rows) instead of filling a fresh feature-map-sized zero tensor every step."""

    @staticmethod
    def forward(ctx, features, pixel_index, pool):
        ctx.save_for_backward(pixel_index)
        ctx.shape, ctx.pool = features.shape, pool
        return pixel_rows(features).index_select(0, pixel_index)

    @staticmethod
    def backward(ctx, grad_rows):
        (pixel_index,) = ctx.saved_tensors
        batch, dim, height, width = ctx.shape
        grad = ctx.pool.scatter_rows("gather_pixels_grad", batch * height * width, pixel_index,
                                     grad_rows.contiguous())
        return grad.view(batch, height, width, dim).permute(0, 3, 1, 2), None, None


def gather_pixels(features, pixel_index, *, pool: BufferPool):
    if features.is_contiguous(memory_format=torch.channels_last) and features.requires_grad and features.dim() == 4:
        return _GatherRows.apply(features, pixel_index, pool)
    return REFERENCE.gather_pixels(features, pixel_index)


def anchor_negatives(scaled, prototypes, buffer, index, *, pool: BufferPool, single: bool = False):
    """In chunks of a few MB gathered into one reused buffer, each chunk's logits, softmax and weighted sum computed
    while it is in cache. A bf16/fp16 queue's chunk is widened to fp32 in cache (batched bf16 matrix-vector
    products are slow on CPU); a CPU bmm into a strided view loops over the batch, so products are copied in."""
    num_classes, dim = prototypes.shape
    rows, num_negatives = index.shape
    num_anchors = rows // num_classes
    logits = torch.empty(rows, 1, num_negatives + 1, dtype=torch.float32)
    logits.view(num_classes, num_anchors, num_negatives + 1)[:, :, :1].copy_(
        torch.bmm(scaled.view(num_classes, num_anchors, dim), prototypes[:, :, None]))
    widen = buffer.dtype != torch.float32
    grad = torch.empty(rows, 1, dim, dtype=torch.float32)  # sum_k p_k negative_k
    positive = torch.empty(rows, 1, 1, dtype=torch.float32)  # p_0 - 1
    chunk = max(1, min(rows, NEGATIVE_CHUNK_BYTES // (num_negatives * dim * buffer.element_size())))
    scratch = pool.empty("negatives", (chunk * num_negatives, dim), buffer.dtype)
    wide = pool.empty("negatives_fp32", (chunk * num_negatives, dim), torch.float32) if widen else None
    with single_thread(single):
        for begin in range(0, rows, chunk):
            end = min(rows, begin + chunk)
            size = end - begin
            negatives = torch.index_select(buffer, 0, index[begin:end].reshape(-1),
                                           out=scratch[: size * num_negatives])
            if widen:
                negatives = wide[: size * num_negatives].copy_(negatives)
            negatives = negatives.view(size, num_negatives, dim)
            block = logits[begin:end]  # [size, 1, 1 + K]
            block[:, :, 1:].copy_(torch.bmm(scaled[begin:end], negatives.transpose(1, 2)))
            log_prob = torch.log_softmax(block, dim=2, out=block)  # in place: the logits are not needed again
            prob = torch.exp(log_prob)
            torch.sub(prob[:, :, :1], 1.0, out=positive[begin:end])
            torch.bmm(prob[:, :, 1:], negatives, out=grad[begin:end])
    return logits[:, 0, 0], positive.view(rows), grad.view(rows, dim)


# ----------------------------------------------------------------------------------------------- queue push
def queue_write(queues, features, mask_cn, max_pairs=None, *, single: bool = False):
    """Host-side push: the per-class counts are read back, and each class's newest rows are copied with one or two
    `index_select(..., out=<ring slice>)` straight into the buffer (a wrapped ring is two contiguous slices), so no
    [pairs, dim] intermediate and no padded write of up to sum(capacities) rows. With `max_pairs` (which only a
    compacted write honours) the reference write."""
    if max_pairs is not None:
        return write_compacted(queues, features, mask_cn, max_pairs)
    if features.dtype != queues.dtype:
        features = features.to(queues.dtype)
    pairs = torch.nonzero(mask_cn)  # [K, 2] (class, row), class-major then row order
    rows = pairs[:, 1]
    pushed = torch.bincount(pairs[:, 0], minlength=queues.num_classes)
    write_ptr, fill = queues.write_ptr.tolist(), queues.fill.tolist()
    start = 0
    with single_thread(single):  # ~2 x C row copies
        for c, count in enumerate(pushed.tolist()):
            if count == 0:
                continue
            capacity, offset = queues.capacity_list[c], int(queues.offsets_list[c])
            class_rows = rows[start + max(count - capacity, 0) : start + count]  # only the newest can survive
            start += count
            kept = class_rows.numel()
            ptr = write_ptr[c]
            first = min(kept, capacity - ptr)
            torch.index_select(features, 0, class_rows[:first], out=queues.buffer[offset + ptr : offset + ptr + first])
            if kept > first:
                torch.index_select(features, 0, class_rows[first:], out=queues.buffer[offset : offset + kept - first])
            write_ptr[c] = (ptr + kept) % capacity
            fill[c] = min(fill[c] + count, capacity)
    queues.write_ptr.copy_(torch.tensor(write_ptr, dtype=torch.long))
    queues.fill.copy_(torch.tensor(fill, dtype=torch.long))
