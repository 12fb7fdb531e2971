"""Reused CPU buffers (u2pl_scale/accel/buffers.py): reuse only when nothing else holds the storage, and
scatter_rows equal to a fresh zeros().index_add_() on every call, whatever rows earlier calls wrote."""
import torch

from u2pl_scale.accel.buffers import BufferPool


def test_reusable_empty_reuses_only_a_released_buffer():
    buffers = BufferPool()
    first = buffers.empty("t_reuse", (4, 8), torch.float32)
    first_ptr = first.data_ptr()
    view = first[1:]  # still held through a view
    second = buffers.empty("t_reuse", (4, 8), torch.float32)
    assert second.data_ptr() != first_ptr
    second.fill_(7.0)
    assert view.data_ptr() == first_ptr + 8 * 4  # the first buffer's memory was left alone
    del first, view, second
    third = buffers.empty("t_reuse", (4, 8), torch.float32)
    fourth_shape = buffers.empty("t_reuse_other", (2, 3), torch.float32)
    assert third.shape == (4, 8) and third.is_contiguous() and fourth_shape.shape == (2, 3)
    ptr = third.data_ptr()
    del third
    again = buffers.empty("t_reuse", (2, 8), torch.float32)  # smaller: same memory
    assert BufferPool().empty("t_reuse", (2, 8), torch.float32).data_ptr() != ptr  # pools share nothing
    assert again.data_ptr() == ptr and again.shape == (2, 8)


def test_scatter_rows_matches_fresh_zeros_index_add_over_many_calls():
    buffers = BufferPool()
    gen = torch.Generator().manual_seed(0)
    kept = []
    for step in range(6):
        num_rows, dim = (50, 4) if step != 3 else (30, 4)  # one call with another shape in between
        index = torch.randint(0, num_rows, (17,), generator=gen)  # with repeats: index_add sums them
        rows = torch.randn(17, dim, generator=gen)
        expected = torch.zeros(num_rows, dim).index_add_(0, index, rows)
        got = buffers.scatter_rows("t_scatter", num_rows, index, rows)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        if step == 4:
            kept.append(got)  # a held result must not be overwritten by the next call
            kept_copy = got.clone()
    torch.testing.assert_close(kept[0], kept_copy, rtol=0, atol=0)


def test_gather_gradient_is_the_dense_scatter_on_every_step():
    """The anchor gather's CPU stage (accel/cpu.py gather_pixels) against index_select on a plain
    tensor, over steps whose anchors differ (the reused gradient buffer must not keep earlier rows)."""
    from u2pl_scale.accel.cpu import cpu_stages

    _gather_pixels = cpu_stages().gather_pixels

    gen = torch.Generator().manual_seed(1)
    base = torch.randn(2, 5, 3, 4, generator=gen).contiguous(memory_format=torch.channels_last)
    grads = []
    for _ in range(3):
        features = base.clone().requires_grad_()
        index = torch.randint(0, 2 * 3 * 4, (9,), generator=gen)
        weights = torch.randn(9, 5, generator=gen)
        (_gather_pixels(features.view_as(features), index) * weights).sum().backward()
        reference = torch.zeros(2 * 3 * 4, 5).index_add_(0, index, weights)
        expected = reference.view(2, 3, 4, 5).permute(0, 3, 1, 2)
        torch.testing.assert_close(features.grad, expected, rtol=0, atol=0)
        grads.append(features.grad)
    # gradients of earlier steps that are still held were not changed by later steps
    assert not torch.equal(grads[0], grads[1])


def test_uniform_below_never_reaches_n_even_for_the_largest_draw():
    """floor(u * n) for the largest float64 torch.rand value, 1 - 2**-53, stays below n for every n < 2**53 tried
    (all n up to 2**20, powers of two and their neighbours, random large n); in fp32 the same product rounds up."""
    from u2pl_scale.method.queues import uniform_below

    largest = torch.tensor([1 - 2.0 ** -53], dtype=torch.float64)
    powers = torch.tensor([2 ** k for k in range(1, 53)], dtype=torch.long)
    n = torch.cat([torch.arange(0, 1 << 20), powers - 1, powers, powers + 1,
                   torch.randint(1, 2 ** 52, (1 << 18,), generator=torch.Generator().manual_seed(0))])
    drawn = uniform_below(largest, n)
    assert torch.equal(drawn, (n - 1).clamp(min=0))  # the top of the range, never n
    assert torch.equal(uniform_below(torch.zeros(1, dtype=torch.float64), n), torch.zeros_like(n))
    assert ((largest.float() * n[1:1000].float()).long() == n[1:1000]).any()  # why fp32 would not do
    # an ordinary draw: the floor of the product
    u = torch.rand(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(uniform_below(u, torch.tensor(37)), torch.floor(u * 37).long())
