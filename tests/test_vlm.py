"""The whole VLM (vision tower, merger, 3-D positions, deepstack, decoder) through our loader equals
transformers' Qwen2_5_VLForConditionalGeneration and Qwen3VLForConditionalGeneration (fp32, CPU)."""
import dataclasses

import pytest
import torch
import transformers

import model as M
import weights

VOCAB = 256
IMAGE, START, END, VIDEO = 250, 251, 252, 253  # tiny-vocabulary ids: nothing depends on Qwen's real ids
IDS = dict(image_token_id=IMAGE, vision_start_token_id=START, vision_end_token_id=END, video_token_id=VIDEO,
           bos_token_id=0, eos_token_id=1, pad_token_id=0)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight O(1)-scaled and random (norms near one), so a wrong mask, order or mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1:
                p.copy_((1.0 if ("norm" in name or "ln_q" in name) and name.endswith("weight") else 0.0) + 0.1 * noise)
            elif "pos_embed" in name or "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)
    return model


def qwen25(out):
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, rms_norm_eps=1e-6,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3])),
        vision_config=dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                           patch_size=14, window_size=56, fullatt_block_indexes=[1, 3]), **IDS)
    return cfg


def qwen3vl(out):
    cfg = transformers.Qwen3VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=24, vocab_size=VOCAB, rms_norm_eps=1e-6,
                         rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[4, 4, 4],
                                              mrope_interleaved=True)),
        vision_config=dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                           patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0, 2]),
        tie_word_embeddings=True, **IDS)
    return cfg


FAMILIES = {"qwen2_5_vl": (qwen25, transformers.Qwen2_5_VLForConditionalGeneration),
            "qwen3_vl": (qwen3vl, transformers.Qwen3VLForConditionalGeneration)}


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    """(hf model, our model loaded from its save_pretrained directory, sharded)."""
    make_cfg, cls = FAMILIES[request.param]
    out = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    hf = randomize(cls(make_cfg(out)), seed=1).eval()
    hf.save_pretrained(out, max_shard_size="200KB")
    return hf, weights.from_pretrained(out)


GRIDS = [(1, 4, 6), (1, 8, 4), (1, 6, 10)]  # patch units: non-square, different sizes, crossing windows


def prompt(grids, text_lens, seed):
    """text, <vision_start> image-pads <vision_end>, text, ... for each grid; random text ids below the specials."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randint(2, IMAGE, (text_lens[0],), generator=g)]
    for (t, h, w), n in zip(grids, text_lens[1:]):
        parts += [torch.tensor([START] + [IMAGE] * (t * h * w // 4) + [END]), torch.randint(2, IMAGE, (n,), generator=g)]
    return torch.cat(parts)


def batch(hf_cfg, row_grids, text_lens, pad_left=(), seed=0):
    """A padded batch: each row its own images; rows in `pad_left` padded on the left, others on the right."""
    rows = [prompt(gr, tl, seed + i) for i, (gr, tl) in enumerate(zip(row_grids, text_lens))]
    T = max(len(r) for r in rows)
    ids, mask = torch.zeros(len(rows), T, dtype=torch.long), torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        s = slice(T - len(r), T) if i in pad_left else slice(0, len(r))
        ids[i, s], mask[i, s] = r, 1
    grids = torch.tensor([g for gr in row_grids for g in gr])
    v = hf_cfg.vision_config
    pv = torch.randn(int(grids.prod(-1).sum()), 3 * v.temporal_patch_size * v.patch_size**2,
                     generator=torch.Generator().manual_seed(seed + 100))
    return ids, mask, pv, grids


def hf_forward(hf, ids, mask, pv, grids):
    mm = (ids == IMAGE).int()  # transformers 5 needs the modality of each token for its 3-D positions
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grids,
                  mm_token_type_ids=mm).logits


def test_vision_features_and_deepstack(pair):
    hf, ours = pair
    _, _, pv, grids = batch(hf.config, [GRIDS], [[3, 2, 4, 1]])
    with torch.no_grad():
        got, got_ds = ours.visual(pv, grids)
        out = hf.model.visual(pv, grid_thw=grids)
    want = out.pooler_output
    want_ds = getattr(out, "deepstack_features", None) or []
    assert len(got_ds) == len(want_ds) == len(ours.cfg.vision.deepstack_indexes)
    err = max([(got - want).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(got_ds, want_ds)])
    print(f"{type(hf).__name__}: vision + deepstack max diff {err:.2e}")
    assert err <= 1e-4


def test_logits_three_images_between_text(pair):
    hf, ours = pair
    ids, mask, pv, grids = batch(hf.config, [GRIDS], [[3, 2, 4, 5]])
    with torch.no_grad():
        got = ours(ids, pixel_values=pv, image_grid_thw=grids)
    err = (got - hf_forward(hf, ids, mask, pv, grids)).abs().max().item()
    print(f"{type(hf).__name__}: 3 images, logits max diff {err:.2e}")
    assert err <= 1e-4


def test_logits_padded_batch_of_two(pair):
    hf, ours = pair
    ids, mask, pv, grids = batch(hf.config, [GRIDS[:2], GRIDS[2:]], [[3, 2, 4], [6, 1]], pad_left={1})
    assert (mask == 0).any()
    with torch.no_grad():
        got = ours(ids, pixel_values=pv, image_grid_thw=grids, attention_mask=mask)
    want = hf_forward(hf, ids, mask, pv, grids)
    real = mask.bool()
    err = (got[real] - want[real]).abs().max().item()
    print(f"{type(hf).__name__}: padded batch, logits max diff {err:.2e}")
    assert err <= 1e-4


def test_rope_index_matches_transformers(pair):
    hf, ours = pair
    ids, mask, pv, grids = batch(hf.config, [GRIDS[:2], GRIDS[2:]], [[3, 2, 4], [6, 1]], pad_left={1})
    pos, delta = M.rope_index(ids, grids, IMAGE, 2, mask)
    want_pos, want_delta = hf.model.get_rope_index(ids, (ids == IMAGE).int(), image_grid_thw=grids, attention_mask=mask)
    assert torch.equal(pos[:, mask.bool()], want_pos[:, mask.bool()])
    assert torch.equal(delta, want_delta)


def test_negative_controls(pair):
    """Each of these must break the comparison: 1-D positions, the other M-RoPE layout, no deepstack."""
    hf, ours = pair
    ids, mask, pv, grids = batch(hf.config, [GRIDS], [[3, 2, 4, 5]])
    want = hf_forward(hf, ids, mask, pv, grids)
    with torch.no_grad():
        flat = ours(ids, pixel_values=pv, image_grid_thw=grids, position_ids=torch.arange(ids.shape[1])[None])
        assert (flat - want).abs().max() > 1e-2
        text = ours.cfg.text
        swapped = dataclasses.replace(ours.cfg, text=dataclasses.replace(text, mrope_interleaved=not text.mrope_interleaved))
        object.__setattr__(ours.model, "cfg", swapped.text)
        try:
            assert (ours(ids, pixel_values=pv, image_grid_thw=grids) - want).abs().max() > 1e-2
        finally:
            object.__setattr__(ours.model, "cfg", text)
        if ours.cfg.vision.deepstack_indexes:
            x, vmask, _ = ours.embed(ids, pv, grids)
            no_ds = ours.lm_head(ours.model(x, ours.positions(ids, grids), visual_mask=vmask))
            assert (no_ds - want).abs().max() > 1e-2


def test_image_token_count_mismatch_is_an_error(pair):
    hf, ours = pair
    ids, _, pv, grids = batch(hf.config, [GRIDS[:1]], [[3, 2]])
    ids = ids[:, [i for i in range(ids.shape[1]) if i != 5]]  # drop one image-pad token
    with pytest.raises(ValueError, match=r"5 image-pad tokens in input_ids but the images give 6 features"):
        ours(ids, pixel_values=pv, image_grid_thw=grids)


def greedy(ours, ids, pv, grids, steps):
    """Prefill once, then decode with the preallocated cache (the 3-D positions continue via rope_delta)."""
    cache = M.KVCache(ours.cfg.text, ids.shape[0], ids.shape[1] + steps)
    logits = ours(ids, pixel_values=pv, image_grid_thw=grids, cache=cache)[:, -1]
    out = []
    for _ in range(steps):
        nxt = logits.argmax(-1, keepdim=True)
        out.append(nxt)
        logits = ours(nxt, cache=cache)[:, -1]
    return torch.cat(out, dim=1)


def test_greedy_generation_equals_transformers(pair):
    hf, ours = pair
    ids, mask, pv, grids = batch(hf.config, [GRIDS[:2]], [[3, 2, 4]])
    with torch.no_grad():
        got = greedy(ours, ids, pv, grids, 20)
        want = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grids,
                           mm_token_type_ids=(ids == IMAGE).int(), max_new_tokens=20, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    assert want.shape[1] == 20
    assert torch.equal(got, want), (got, want)


def test_cached_decode_equals_recompute(pair):
    _, ours = pair
    ids, _, pv, grids = batch(ours_cfg_hf := pair[0].config, [GRIDS[:2]], [[3, 2, 4]])
    with torch.no_grad():
        toks = greedy(ours, ids, pv, grids, 6)
        full = torch.cat([ids, toks], dim=1)
        recomputed = ours(full, pixel_values=pv, image_grid_thw=grids)[:, ids.shape[1] - 1 : -1].argmax(-1)
    assert torch.equal(recomputed, toks)
