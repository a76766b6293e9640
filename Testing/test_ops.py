"""semiseg.ops.argmax against torch.argmax: the same indices in every layout and dtype, ties and NaN included."""
import pytest
import torch

from semiseg.ops import argmax


@pytest.mark.parametrize("shape,dim,layout", [((3, 4, 9, 7), 1, torch.contiguous_format),
                                              ((3, 4, 9, 7), 1, torch.channels_last),
                                              ((2, 2, 6, 5, 4), 1, torch.channels_last_3d),
                                              ((2, 6, 5, 4), 0, torch.contiguous_format),
                                              ((5, 7), 1, torch.contiguous_format)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_equals_torch_argmax(shape, dim, layout, dtype):
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 3, shape, generator=g).to(dtype)  # few distinct values: many ties
    t[torch.rand(shape, generator=g) < 0.1] = float("nan")  # NaN counts as the largest value in both
    t = t.contiguous(memory_format=layout)
    assert torch.equal(argmax(t, dim), t.argmax(dim))
    ties = torch.zeros(shape, dtype=dtype)
    assert argmax(ties, dim).eq(0).all()  # the first of equal maxima
