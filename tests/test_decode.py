"""The compiled decode path (sample.generate(compile=True)), traced here on CPU by inductor: the same tokens as
eager for padded batches and a VLM with 3-D positions, one compile for a generation and for prompts of other
lengths in the same cache bucket, and a static cache written in place (no cache-sized allocation per step)."""
import torch
from torch._dynamo.utils import counters

import model as M
import sample as S
import weights
from test_sample import vl, vl_batch  # noqa: F401 (a fixture)


def compiles() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_equals_eager_and_compiles_once_per_bucket(text_model_dir):
    _, path = text_model_dir("qwen3")
    ours = weights.from_pretrained(path)
    rows = [[3, 1, 4, 1, 5, 9, 2, 6, 5], [2, 7, 1, 8]]
    ids, mask = S.pad_left(rows, pad_id=0)
    want = S.generate(ours, ids, mask, max_new_tokens=12)
    torch._dynamo.reset()
    counters.clear()
    assert S.generate(ours, ids, mask, max_new_tokens=12, compile=True) == want
    assert compiles() == 1, dict(counters["stats"])
    # another batch of two prompts, of other lengths, in the same 1024-slot bucket: no new graph
    rows = [[5, 5, 5], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 1, 2]]
    ids, mask = S.pad_left(rows, pad_id=0)
    assert S.generate(ours, ids, mask, max_new_tokens=7, compile=True) == S.generate(ours, ids, mask, max_new_tokens=7)
    assert compiles() == 1, dict(counters["stats"])


def test_compiled_vl_decode_keeps_3d_positions_and_the_rope_delta(vl):
    """A left-padded VL batch (test_sample's fixture): the compiled step continues the 3-D positions."""
    hf, ours = vl
    ids, mask, pv, grids = vl_batch(hf)
    want = S.generate(ours, ids, mask, pv, grids, max_new_tokens=8)
    assert S.generate(ours, ids, mask, pv, grids, max_new_tokens=8, compile=True) == want
    torch._dynamo.reset()


def test_static_cache_is_written_in_place_without_cache_sized_allocations(text_model_dir):
    _, path = text_model_dir("qwen3")
    ours = weights.from_pretrained(path)
    cfg = ours.cfg.text
    cache = M.KVCache(cfg, 1, 4096, static=True)
    ptrs = [t.data_ptr() for t in cache.k + cache.v]
    ids = torch.tensor([[1, 2, 3, 4]])
    mask = torch.ones(1, 4096, dtype=torch.long)
    with torch.no_grad():
        ours(ids, attention_mask=mask[:, :4], cache=cache)
        step = S.compiled_decode_step(False)
        args = (torch.tensor([[5]]), cache, mask, torch.tensor([[4]]), torch.tensor([4]))
        step(ours, *args)  # compile outside the profile
        layer_bytes = cache.k[0].numel() * cache.k[0].element_size()
        with torch.profiler.profile(profile_memory=True) as prof:
            logits = step(ours, *args)
    biggest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    assert biggest < layer_bytes / 4, (biggest, layer_bytes)  # a functional copy of one layer's cache would show
    assert [t.data_ptr() for t in cache.k + cache.v] == ptrs
    assert cache.k[0][0, :, 4].abs().sum() > 0 and cache.k[0][0, :, 5].abs().sum() == 0  # slot 4 written, 5 not
    with torch.no_grad():  # and the step's logits are the eager ones
        eager = M.KVCache(cfg, 1, 8)
        ours(ids, cache=eager)
        assert (ours(torch.tensor([[5]]), cache=eager)[:, -1] - logits).abs().max() <= 1e-5
