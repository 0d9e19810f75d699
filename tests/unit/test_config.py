import pytest

from comfy_xdit.config import ParallelConfig, ParallelConfigError


def test_product_must_equal_world_size():
    with pytest.raises(ParallelConfigError, match=r"multiply to 2 .* there are 4 ranks.*\[1, 2, 4\]"):
        ParallelConfig(ulysses_degree=2).validate(world_size=4)
    assert ParallelConfig(ulysses_degree=2, ring_degree=2).validate(world_size=4).sp_degree == 4


def test_ulysses_must_divide_heads():
    with pytest.raises(ParallelConfigError, match=r"ulysses_degree 5 does not divide the model's 24 attention heads; "
                                                  r"use one of \[1, 2, 3, 4, 6, 8, 12, 24\]"):
        ParallelConfig(ulysses_degree=5).validate(num_heads=24)


def test_degrees_are_positive_integers_and_cfg_at_most_two():
    with pytest.raises(ParallelConfigError, match="ring_degree must be a positive integer"):
        ParallelConfig(ring_degree=0).validate()
    with pytest.raises(ParallelConfigError, match="cfg_degree 4"):
        ParallelConfig(cfg_degree=4).validate(world_size=4)


def test_sequence_parallel_default_prefers_ulysses():
    assert ParallelConfig.for_sequence_parallel(8, 24) == ParallelConfig(ulysses_degree=8)
    assert ParallelConfig.for_sequence_parallel(16, 24) == ParallelConfig(ring_degree=2, ulysses_degree=8)
    assert ParallelConfig.for_sequence_parallel(5, 24) == ParallelConfig(ring_degree=5)
