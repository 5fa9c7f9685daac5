"""Attention over segments (attention.py, model.plan_attention): packed == unpacked == one sample at a time, padded
rows == each alone, no (T, T) mask on a training or prefill forward, the kernel each path takes, and the vision
towers' windows/frames through the same function."""
import pytest
import torch
import torch.nn.functional as F

import attention as A
import model as M
import weights


@pytest.fixture(scope="module")
def qwen3(text_model_dir):
    return weights.from_pretrained(text_model_dir("qwen3")[1])


def docs(seed: int, lengths=(7, 4, 7, 9)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 211, (1, n), generator=g) for n in lengths]


def packed_batch(parts: list[torch.Tensor]):
    """One packed row as data.collate makes it (docs from 1), plus two pads at the end."""
    ids = torch.cat(parts + [torch.zeros(1, 2, dtype=torch.long)], dim=1)
    doc_ids = torch.cat([torch.full((1, p.shape[1]), d) for d, p in enumerate(parts, 1)] + [torch.zeros(1, 2)], 1)
    pos = torch.cat([torch.arange(p.shape[1]) for p in parts] + [torch.zeros(2, dtype=torch.long)])[None]
    return ids, doc_ids.long(), pos, (doc_ids > 0).long()


def test_packed_equals_one_at_a_time_fp32(qwen3):
    parts = docs(0)  # two documents of the same length: one SDPA batch of 2, beside batches of 1
    ids, doc_ids, pos, mask = packed_batch(parts)
    with torch.no_grad():
        got = qwen3(ids, position_ids=pos, doc_ids=doc_ids, attention_mask=mask)
        alone = torch.cat([qwen3(p) for p in parts], dim=1)
        leaky = qwen3(ids, position_ids=pos, attention_mask=mask)  # negative control: no doc_ids
    n = alone.shape[1]
    assert (got[:, :n] - alone).abs().max() <= 1e-5
    assert (leaky[:, :n] - alone)[:, 7:].abs().max() > 1e-3


def test_labels_loss_packed_equals_unpacked(qwen3):
    parts = docs(1)
    ids, doc_ids, pos, mask = packed_batch(parts)
    labels = ids.masked_fill(mask == 0, -100)
    for d in range(1, len(parts) + 1):  # each document's first token is not predicted from the one before
        labels[0, (doc_ids[0] == d).nonzero()[0]] = -100
    with torch.no_grad():
        packed = qwen3(ids, position_ids=pos, doc_ids=doc_ids, attention_mask=mask, labels=labels)
        alone = sum(qwen3(p, labels=p) for p in parts)
    assert abs(packed.item() - alone.item()) <= 1e-5 * alone.item()


def test_padded_rows_equal_each_alone(qwen3):
    a, b = docs(2, (9, 5))
    right = torch.zeros(2, 9, dtype=torch.long)
    right[0], right[1, :5] = a[0], b[0]
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    with torch.no_grad():
        got = qwen3(right, attention_mask=mask)
        want_a, want_b = qwen3(a), qwen3(b)
        unmasked = qwen3(right)  # negative control: the pads are attended to (they come after b: no change)
    assert (got[0] - want_a[0]).abs().max() <= 1e-5 and (got[1, :5] - want_b[0]).abs().max() <= 1e-5
    left = torch.zeros(2, 9, dtype=torch.long)
    left[0], left[1, 4:] = a[0], b[0]
    with torch.no_grad():
        got = qwen3(left, attention_mask=mask.flip(1), position_ids=(mask.flip(1).cumsum(1) - 1).clamp(min=0))
        leaky = qwen3(left, position_ids=(mask.flip(1).cumsum(1) - 1).clamp(min=0))
    assert (got[1, 4:] - want_b[0]).abs().max() <= 1e-5
    assert (leaky[1, 4:] - want_b[0]).abs().max() > 1e-3 and torch.equal(unmasked[0], got[0])


def test_training_and_prefill_build_no_square_mask(qwen3, monkeypatch):
    """Every SDPA call of a packed training forward (and of a padded prefill) takes no mask, and no call attends
    over more keys than the longest document: the cost is per segment, never (T, T)."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((attn_mask, k.shape[-2]))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    parts = docs(3)
    ids, doc_ids, pos, mask = packed_batch(parts)
    qwen3(ids, position_ids=pos, doc_ids=doc_ids, attention_mask=mask, labels=ids).backward()
    assert calls and all(m is None and keys <= 9 for m, keys in calls), calls[:3]
    calls.clear()
    cache = M.KVCache(qwen3.cfg.text, 2, 12)
    with torch.no_grad():
        qwen3(torch.zeros(2, 9, dtype=torch.long), attention_mask=torch.tensor([[0] * 4 + [1] * 5, [1] * 9]),
              cache=cache)
        assert all(m is None for m, _ in calls) and sorted({k for _, k in calls}) == [5, 9]
        calls.clear()  # the decode step after it is the cache's: a (B, 1, 1, slots) padding mask
        qwen3(torch.zeros(2, 1, dtype=torch.long), attention_mask=torch.ones(2, 10), cache=cache)
    assert all(m is not None and m.shape[-2:] == (1, 10) for m, _ in calls)


def test_plan_on_cpu_and_the_kernel_choice():
    x = torch.zeros(1, 6, 8)
    plan = M.plan_attention(1, 6, x, None, torch.tensor([[1, 1, 2, 2, 2, 0]]), None, None)
    assert plan.mask is None and plan.segments.kernel == "sdpa" and plan.segments.cu_seqlens.tolist() == [0, 2, 5, 6]
    assert A.kernel_for(torch.zeros(2, dtype=torch.bfloat16)) == "sdpa"  # CPU: SDPA per segment length
    seg = A.make_segments(torch.tensor([0, 0, 0, 1, 1, 1, 2]), "sdpa")
    assert [g.tolist() for g in seg.groups] == [[[6]], [[0, 1, 2], [3, 4, 5]]] and seg.max_seqlen == 3


def test_segment_attention_equals_a_block_diagonal_mask():
    """The SDPA-per-length path against the dense reference it replaces, causal with GQA and bidirectional."""
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([0] * 5 + [1] * 3 + [2] * 5 + [3])
    q, k, v = torch.randn(14, 4, 8, generator=g), torch.randn(14, 2, 8, generator=g), torch.randn(14, 2, 8, generator=g)
    seg = A.make_segments(ids, "sdpa")
    for causal in (True, False):
        block = ids[:, None] == ids[None, :]
        dense = block & torch.ones(14, 14, dtype=torch.bool).tril() if causal else block
        want = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                              attn_mask=dense, enable_gqa=True).transpose(0, 1)
        got = A.segment_attention(q, k, v, seg, causal=causal)
        assert (got - want).abs().max() <= 1e-6
    # negative control: one segment over everything lets tokens see other segments
    assert (A.segment_attention(q, k, v, A.make_segments(torch.zeros(14, dtype=torch.long), "sdpa"), True)
            - A.segment_attention(q, k, v, seg, True)).abs().max() > 1e-2
