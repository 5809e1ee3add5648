"""`models/kv_cache.py`: the reserved cache layer returns what DynamicLayer's concatenation returns."""
import torch
from transformers import DynamicCache

from kedit_pl.models.kv_cache import ReservedLayer, reserve


def test_reserved_layers_return_the_concatenated_keys_and_values_and_grow_past_their_room():
    g = torch.Generator().manual_seed(0)
    kv = lambda n: (torch.randn(2, 3, n, 4, generator=g), torch.randn(2, 3, n, 4, generator=g))  # noqa: E731
    plain, reserved = DynamicCache(), DynamicCache()
    first = kv(5)
    plain.update(*first, 0)
    reserved.update(*first, 0)
    reserve(reserved, room=2)
    assert isinstance(reserved.layers[0], ReservedLayer)
    for n in (1, 1, 3, 1):  # the third step runs out of room: the buffer grows
        new = kv(n)
        a, b = plain.update(*new, 0), reserved.update(*new, 0)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert reserved.get_seq_length() == plain.get_seq_length() == 11
    idx = torch.tensor([1, 1, 0])
    plain.reorder_cache(idx)
    reserved.reorder_cache(idx)
    last = kv(1)
    last = (last[0][[0, 1, 0]], last[1][[0, 1, 0]])
    a, b = plain.update(*last, 0), reserved.update(*last, 0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
