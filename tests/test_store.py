"""The activation stream: shapes, excluded positions, determinism, held-out data, sources."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import small_cfg

from activation_store import ActivationsStore
from capture import model_dims, run_to_hook
from config import ConfigError, prepare_cfg
from text import iter_token_rows, special_token_ids


def make_store(model, **overrides) -> ActivationsStore:
    cfg = prepare_cfg(small_cfg(**overrides), model_dims(model))
    return ActivationsStore(model, cfg)


def test_batches_have_shape_and_no_cls_positions(minilm):
    store = make_store(minilm)
    batch = store.next_batch()[0]
    assert store.next_batch().shape == (1, 256, 384) and batch.dtype == torch.float32
    # CLS activations at this layer for the evaluation rows: none may be served
    cls_acts = run_to_hook(minilm, store.eval_tokens, store.hook_point)[:, 0].float()
    served = torch.cat([batch] + [store.next_batch()[0] for _ in range(5)])
    assert torch.cdist(served, cls_acts).min() > 1e-3
    assert store.eval_acts.shape[1] == store.kept_positions(store.eval_tokens).sum()


def test_rows_start_with_cls_and_pack_documents(minilm):
    start, sep = special_token_ids(minilm.tokenizer)
    rows = list(iter_token_rows(iter(["one two three", "four five"]), minilm.tokenizer, seq_len=4))
    assert all(r[0] == start and len(r) == 4 for r in rows)
    flat = [t for r in rows for t in r[1:]]
    assert flat.count(sep) == 1  # the second document's separator is pending (no partial rows)


def test_same_seed_same_batches(minilm):
    a, b = make_store(minilm), make_store(minilm)
    assert a.scale == b.scale
    for _ in range(3):  # crosses a buffer refill (serve_count is one batch here)
        assert torch.equal(a.next_batch(), b.next_batch())
    c = make_store(minilm, seed=7)
    assert not torch.equal(c.next_batch(), make_store(minilm).next_batch())


def test_scale_makes_mean_square_norm_d(minilm):
    store = make_store(minilm)
    assert (store.buffer * store.scale).pow(2).sum(-1).mean().item() == pytest.approx(384, rel=1e-4)


def _write_corpus(folder, n_docs: int = 12) -> None:
    folder.mkdir()
    lines = [json.dumps({"body": f"Document {i}: " + " ".join(f"word{i}x{j}" for j in range(40))})
             for i in range(n_docs)]
    (folder / "part.jsonl").write_text("\n".join(lines))


def test_rows_are_read_ahead_in_order_and_epochs_counted_as_served(minilm, tmp_path):
    """The store's rows come from a prefetching thread: they are the stream's training rows in order
    (held-out rows first and never again, every epoch), and `epoch` is the epoch of the last row
    served, not of the thread's."""
    from text import eval_rows_count, token_rows

    _write_corpus(tmp_path / "corpus")
    store = make_store(minilm, dataset_path=str(tmp_path / "corpus"), text_column="body",
                       eval_tokens=256, num_batches_in_buffer=2, batch_size=64)
    one_pass = [torch.tensor(r) for r in token_rows(minilm.tokenizer, store.cfg)]
    held_out = eval_rows_count(store.cfg)
    per_epoch = len(one_pass) - held_out
    assert torch.equal(store.eval_tokens, torch.stack(one_pass[:held_out]))
    store.seek_rows(0)
    served = store.next_token_rows(3 * per_epoch + 2)
    expected = torch.stack(one_pass[held_out:] * 4)[: len(served)]
    assert torch.equal(served, expected) and store.epoch == 3
    store.seek_rows(per_epoch)  # the last row of epoch 0 is then the last one served
    assert store.epoch == 0 and torch.equal(store.next_token_rows(1)[0], one_pass[held_out])
    assert store.epoch == 1


def test_prefetched_reads_ahead_a_bounded_amount_and_hands_errors_over_in_place():
    import gc
    import time

    from text import Prefetched

    produced = []

    def numbers(fail_at: int | None = None):
        for i in range(10**9):
            if i == fail_at:
                raise ValueError("the source failed")
            produced.append(i)
            yield i

    ahead = Prefetched(numbers(), chunk=4, depth=2)
    deadline = time.monotonic() + 5
    while ahead._queue.qsize() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert len(produced) <= 4 * 3  # two chunks waiting and one in hand
    assert [next(ahead) for _ in range(50)] == list(range(50))
    thread = ahead._thread
    del ahead
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()  # a dropped stream stops its thread

    failing = Prefetched(numbers(fail_at=6), chunk=4, depth=2)
    assert [next(failing) for _ in range(6)] == list(range(6))  # items before the error are served
    for _ in range(2):
        with pytest.raises(ValueError, match="the source failed"):
            next(failing)
    failing.close()
    closed = Prefetched(numbers(), chunk=4, depth=2)
    closed.close()
    with pytest.raises(RuntimeError, match="closed"):  # read-ahead items, then an error, not a hang
        for _ in range(4 * 3 + 1):
            next(closed)


def test_held_out_rows_never_served_across_epochs(minilm, tmp_path):
    _write_corpus(tmp_path / "corpus")
    store = make_store(minilm, dataset_path=str(tmp_path / "corpus"), text_column="body",
                       eval_tokens=256, num_batches_in_buffer=2, batch_size=64)
    served = torch.cat([store.next_batch()[0] for _ in range(60)])
    assert store.epoch >= 2, "the test must cross epoch boundaries"
    assert torch.cdist(store.eval_acts[0], served).min() > 1e-4
    # the training rows themselves do repeat across epochs (so the check above could fail)
    assert torch.cdist(served[:64], served[64 * 30:]).min() < 1e-4


def test_missing_text_column_is_one_clear_error(minilm, tmp_path):
    _write_corpus(tmp_path / "corpus")
    with pytest.raises(ConfigError,
                       match="text_column='text' is not in the dataset; its columns are body"):
        make_store(minilm, dataset_path=str(tmp_path / "corpus"))


def test_missing_dataset_path_is_one_clear_error(minilm, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        make_store(minilm, dataset_path=str(tmp_path / "nope.txt"))


def test_text_and_parquet_files(minilm, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = "\n\n".join(f"Paragraph {i}. " + "the quick brown fox " * 20 for i in range(30))
    (tmp_path / "a.txt").write_text(text)
    pq.write_table(pa.table({"text": text.split("\n\n")}), tmp_path / "b.parquet")
    for path in ("a.txt", "b.parquet"):
        store = make_store(minilm, dataset_path=str(tmp_path / path), eval_tokens=128,
                           num_batches_in_buffer=2, batch_size=64)
        assert store.next_batch().shape == (1, 64, 384)


def test_unknown_site_lists_valid_ones(minilm):
    cfg = prepare_cfg(small_cfg(), model_dims(minilm)) | {"hook_point": "blocks.3.hook_nothing"}
    with pytest.raises(ConfigError, match="valid sites are resid_pre"):
        ActivationsStore(minilm, cfg)


# --- several hook points from one forward --------------------------------------------------

HOOKS = ["blocks.1.hook_resid_pre", "blocks.4.hook_resid_pre", "blocks.2.hook_mlp_out"]


def test_run_to_hooks_stops_after_the_deepest_hook(minilm):
    from capture import run_to_hooks

    tokens = torch.randint(1000, 2000, (2, 16))
    fired = []
    later = [("blocks.5.hook_resid_pre", lambda act, hook: fired.append(5))]
    acts = run_to_hooks(minilm, tokens, HOOKS, fwd_hooks=later)
    assert not fired  # layer 5 never ran
    for hook, act in zip(HOOKS, acts, strict=True):
        assert torch.equal(act, run_to_hook(minilm, tokens, hook))
    points = minilm.hook_dict

    def added_hooks() -> list:  # the bridge has its own permanent hooks; a point may have two names
        return list({id(h): h for p in points.values() for h in p.fwd_hooks
                     if not h.is_permanent}.values())

    assert not added_hooks()  # its hooks are removed,

    def fails(act, hook):
        raise ValueError("a hook that fails")

    with pytest.raises(ValueError, match="a hook that fails"):
        run_to_hooks(minilm, tokens, HOOKS, fwd_hooks=[("blocks.0.hook_resid_pre", fails)])
    assert not added_hooks()  # also when a hook raises,
    kept = points["blocks.1.hook_resid_pre"].add_hook(lambda act, hook: None)
    run_to_hooks(minilm, tokens, HOOKS)
    assert added_hooks() == [kept]  # and only its own
    points["blocks.1.hook_resid_pre"].remove_hooks("fwd")


def test_multi_hook_store_serves_each_hook_like_a_single_hook_store(minilm):
    cfg = prepare_cfg(small_cfg(), model_dims(minilm))
    multi = ActivationsStore(minilm, cfg, HOOKS)
    singles = [ActivationsStore(minilm, cfg | {"hook_point": h}, [h]) for h in HOOKS]
    assert [multi.hook_index(h) for h in HOOKS] == [0, 1, 2]
    for _ in range(3):  # crosses a refill
        batch = multi.next_batch()
        assert batch.shape == (3, 256, 384)
        for h, single in enumerate(singles):
            torch.testing.assert_close(batch[h], single.next_batch()[0], rtol=0, atol=1e-5)
    for h, single in enumerate(singles):
        assert multi.scales[h] == pytest.approx(single.scale, rel=1e-6)
        torch.testing.assert_close(multi.eval_acts[h], single.eval_acts[0], rtol=0, atol=1e-5)


# --- disk cache -----------------------------------------------------------------------------


def _count_forwards(monkeypatch) -> dict[str, int]:
    import activation_store

    calls = {"n": 0}
    original = activation_store.run_to_hooks

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(activation_store, "run_to_hooks", counting)
    return calls


def test_cache_is_written_once_and_read_back_identically(minilm, tmp_path, monkeypatch):
    overrides = {"cache_dir": str(tmp_path / "cache"), "num_batches_in_buffer": 2, "batch_size": 64}
    writer = make_store(minilm, **overrides)
    written = [writer.next_batch() for _ in range(12)]  # several refills
    writer.finish()
    calls = _count_forwards(monkeypatch)
    reader = make_store(minilm, **overrides)
    assert calls["n"] == 0  # eval set and buffer came from disk
    assert reader.scale == writer.scale and torch.equal(reader.eval_acts, writer.eval_acts)
    for batch in written:
        assert torch.equal(reader.next_batch(), batch)
    # past the cached end the reader generates, from the right place in the token stream
    uncached = make_store(minilm, num_batches_in_buffer=2, batch_size=64)
    for _ in range(12):
        uncached.next_batch()
    for _ in range(8):
        torch.testing.assert_close(reader.next_batch(), uncached.next_batch(), rtol=0, atol=1e-5)
    assert calls["n"] > 0 and reader.rows_read == uncached.rows_read


def test_half_precision_cache_serves_the_rounded_values_to_every_run(minilm, tmp_path):
    overrides = {"cache_dir": str(tmp_path / "cache"), "cache_dtype": "float16",
                 "num_batches_in_buffer": 2, "batch_size": 64}
    writer = make_store(minilm, **overrides)
    first = writer.next_batch()
    assert torch.equal(first, first.half().float())
    writer.finish()
    assert torch.equal(make_store(minilm, **overrides).next_batch(), first)
    shards = list((tmp_path / "cache").rglob("shard_*.safetensors"))
    assert shards and all(p.stat().st_size < 64 * 384 * 4 * 400 for p in shards)


def test_data_parallel_shards_take_alternate_training_rows(minilm):
    cfg = prepare_cfg(small_cfg(), model_dims(minilm))
    single, *ranks = [ActivationsStore(minilm, cfg, shard=shard)
                      for shard in ((0, 1), (0, 2), (1, 2))]
    for store in (single, *ranks):
        store.seek_rows(0)
        assert torch.equal(store.eval_tokens, single.eval_tokens)  # same held-out set on every rank
    rows = single.next_token_rows(40)
    assert torch.equal(ranks[0].next_token_rows(20), rows[0::2])
    assert torch.equal(ranks[1].next_token_rows(20), rows[1::2])


def test_streamlined_bridge_matches_plain_hugging_face(minilm):
    """SDPA attention and the bare HF LayerNorm give the activations of the HF model itself;
    a hook on a norm's statistics still fires (the bridge then computes them)."""
    from transformers import AutoModel

    from capture import resolve_model_path

    tokens = torch.randint(1000, 2000, (2, 16))
    plain = AutoModel.from_pretrained(resolve_model_path(minilm.cfg.model_name)).eval()
    with torch.inference_mode():
        hidden = plain(input_ids=tokens, output_hidden_states=True).hidden_states
    for layer in (0, 3, 5):
        torch.testing.assert_close(run_to_hook(minilm, tokens, f"blocks.{layer}.hook_resid_pre"),
                                   hidden[layer], rtol=1e-4, atol=1e-4)
    scales = []
    hooked = [("blocks.0.ln1.hook_scale", lambda act, hook: scales.append(act))]
    unhooked = run_to_hook(minilm, tokens, "blocks.1.hook_resid_pre")
    assert torch.equal(run_to_hook(minilm, tokens, "blocks.1.hook_resid_pre", fwd_hooks=hooked),
                       unhooked)
    assert len(scales) == 1 and scales[0].shape == (2, 16, 1)


# --- TensorStore: activations already at hand ---------------------------------------------

def sparse_mixture(n: int, d: int = 32, seed: int = 0) -> torch.Tensor:
    """Activations that are sparse combinations of 128 directions, as an SAE expects."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(128, d, generator=gen)
    codes = torch.randn(n, 128, generator=gen).relu_() * (torch.rand(n, 128, generator=gen) < 0.05)
    return codes @ directions + 3.0


def test_tensor_store_holds_out_the_first_rows_and_serves_each_row_once_per_epoch(tmp_path):
    import numpy as np

    from activation_store import TensorStore

    acts = torch.arange(1000 * 4, dtype=torch.float32).view(1000, 4)  # row i holds 4i..4i+3
    cfg = small_cfg(eval_tokens=100, batch_size=64)
    store = TensorStore(acts, cfg)
    assert torch.equal(store.eval_acts[0], acts[:100]) and store.dims["d_model"] == 4
    rows = [store.next_batch()[0][:, 0] / 4 for _ in range(14)]  # 900 train rows: 14 full batches
    epoch = torch.cat(rows).long()
    assert not torch.equal(epoch[:64], torch.arange(100, 164))  # shuffled
    assert epoch.unique().numel() == 14 * 64 and epoch.min() >= 100  # no row twice, no held-out row
    assert store.epoch == 0 and store.next_batch().shape == (1, 64, 4) and store.epoch == 1
    # a numpy memmap gives the same stream; a saved state continues it exactly
    np.save(tmp_path / "acts.npy", acts.numpy())
    mapped = TensorStore(np.load(tmp_path / "acts.npy", mmap_mode="r"), cfg)
    assert mapped.scales == TensorStore(acts, cfg).scales
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v
             for k, v in mapped.state_dict().items()}
    ahead = [mapped.next_batch() for _ in range(20)]
    resumed = TensorStore(acts, cfg)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed.next_batch()) for a in ahead)


def test_tensor_store_rejects_too_few_rows_and_bad_shapes():
    from activation_store import TensorStore

    with pytest.raises(ConfigError, match="fewer than batch_size=256"):
        TensorStore(torch.zeros(300, 8), small_cfg(eval_tokens=100))
    with pytest.raises(ConfigError,
                       match=r"takes \(tokens, d\) activations, got shape \(3, 4, 5\)"):
        TensorStore(torch.zeros(3, 4, 5), small_cfg())


def test_train_sae_on_a_tensor_store(tmp_path):
    from activation_store import TensorStore
    from training import train_sae

    acts = sparse_mixture(20_000)
    cfg = small_cfg(sae_type="topk", dict_size=256, top_k=8, num_tokens=256 * 40, eval_tokens=2048,
                    output_dir=str(tmp_path), run_name="from_tensor")
    trainee = train_sae(cfg, store=TensorStore(acts, cfg))
    metrics = trainee.final_metrics
    assert metrics["explained_variance"] > 0.5 and metrics["l0"] == 8
    assert "downstream_recovered" not in metrics
    assert (tmp_path / "from_tensor" / "final" / "sae.safetensors").exists()


@pytest.mark.parametrize("variant", [{"sae_type": "batchtopk"},
                                     {"sae_type": "jumprelu", "target_l0": 8.0}])
def test_a_tensor_store_run_resumes_bitwise(tmp_path, variant):
    """Also JumpReLU steered to an L0: its coefficient's running factor and last error are saved."""
    import shutil

    from safetensors.torch import load_file

    from activation_store import TensorStore
    from training import train_sae

    acts = sparse_mixture(12_000)
    cfg = small_cfg(dict_size=256, top_k=8, num_tokens=256 * 30, eval_tokens=1024,
                    checkpoint_freq=20, output_dir=str(tmp_path), run_name="run",
                    sparsity_warmup_frac=0.1) | variant
    train_sae(cfg, store=TensorStore(acts, cfg))
    run = tmp_path / "run"
    whole = load_file(run / "final" / "sae.safetensors")
    shutil.rmtree(run / "final")  # as if killed after the step-20 checkpoint
    train_sae(cfg | {"resume": str(run)}, store=TensorStore(acts, cfg))
    resumed = load_file(run / "final" / "sae.safetensors")
    assert set(whole) == set(resumed) and all(torch.equal(whole[k], resumed[k]) for k in whole)
    if "target_l0" in variant:
        assert {"coeff_scale", "l0_error"} <= set(whole) and whole["l0_error"].item() != 0


def test_a_failed_write_is_called_disk_full_only_when_it_is(tmp_path, monkeypatch):
    import errno
    import shutil

    from safetensors import SafetensorError

    from files import write_failure

    assert write_failure(OSError(errno.ENOSPC, "No space left on device"), tmp_path) == \
        "disk full (No space left on device)"
    full = SafetensorError("Error while serializing: I/O error: "
                           "No space left on device (os error 28)")
    assert write_failure(full, tmp_path).startswith("disk full (Error while serializing")
    opaque = RuntimeError("[enforce fail at inline_container.cc:672] . "
                          "unexpected pos 576 vs 534")  # torch.save's
    assert write_failure(opaque, tmp_path).startswith("could not write (")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(10, 10, 0))
    assert write_failure(opaque, tmp_path).startswith("disk full (")


def test_train_on_standardised_tokens_whose_scales_and_offsets_differ(tmp_path):
    """standardize_tokens through the whole loop: a sparse mixture with each token scaled by
    0.1-10 and shifted is learnt as well as the mixture itself, and the saved SAE gives the
    same raw-space reconstructions."""
    from activation_store import TensorStore
    from sae import load_sae
    from training import train_sae

    acts = sparse_mixture(20_000)
    gen = torch.Generator().manual_seed(1)
    moved = acts * 10 ** (2 * torch.rand(len(acts), 1, generator=gen) - 1) \
        + torch.randn(len(acts), 1, generator=gen)
    cfg = small_cfg(sae_type="topk", dict_size=256, top_k=8, num_tokens=256 * 40, eval_tokens=2048,
                    output_dir=str(tmp_path), run_name="standardised", standardize_tokens=True)
    store = TensorStore(moved, cfg)
    trainee = train_sae(cfg, store=store)
    assert trainee.final_metrics["explained_variance"] > 0.5
    # s fits the standardised tokens (about 1; constant tokens standardise to 0), not the raw ones
    assert 1.0 < trainee.sae.scale.item() < 1.1 and not 0.5 < store.scales[0] < 2
    loaded = load_sae(tmp_path / "standardised" / "final")
    x = moved[:512]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).x_hat, trainee.sae.eval()(x).x_hat)
