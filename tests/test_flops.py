"""FLOP accounting: 2·N per token forward, 3× for training, attention grows with context."""

import pytest

from opd.flops import ModelShape, generation_flops, sequence_flops


def test_counts_follow_the_2n_rule(tiny):
    shape = ModelShape.of(tiny.model)
    assert shape.params == tiny.num_params and shape.layers == 2 and shape.width == 32
    one = shape.forward_flops(1, 0)
    assert one == 2 * shape.params
    assert shape.forward_flops(10, 0) == 10 * one
    assert shape.forward_flops(1, 100) > one  # attention over the context costs extra
    fwd = sequence_flops(shape, [4, 6], [3, 2])
    assert sequence_flops(shape, [4, 6], [3, 2], train=True) == pytest.approx(3 * fwd)
    # generating with a cache costs about one forward over the same tokens
    assert generation_flops(shape, [4, 6], [3, 2]) == pytest.approx(fwd, rel=0.05)
