"""The HTML dashboards: shading, quantile bands, decoder neighbours, token effects, the index, and
a headless browser's view of them where Chromium is installed."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch
from conftest import small_cfg

import dashboards
from capture import load_model
from logs import load_density, load_run
from training import train_sae

LATENTS = 2  # most frequent and random alive ones: pages for twice this


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    model = load_model(str(tiny_gpt2_dir), "cpu")
    key = (str(tiny_gpt2_dir), "cpu", "float32")
    dashboards._MODELS[key] = model  # dashboards boot models themselves: share this one
    yield model
    dashboards._MODELS.pop(key)


@pytest.fixture(scope="module")
def gpt2_dashboards(gpt2, tiny_gpt2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dash")
    cfg = small_cfg(model_name=str(tiny_gpt2_dir), layer=1, sae_type="matryoshka", dict_size=64,
                    top_k=4, top_k_aux=8, matryoshka_groups="16,16,32", output_dir=str(out),
                    num_tokens=256 * 5, eval_freq=5, checkpoint_freq=0)
    run = load_run(train_sae(cfg, model=gpt2).run_dir)
    return run, dashboards.write_dashboards(run, out / "dashboards", LATENTS, device="cpu")


def spans(page: str) -> list[tuple[int, int, list[str]]]:
    """Each context's row, first position and its tokens' hover values."""
    out = []
    for at, body in re.findall(r"<div class='ctx' data-at='(\d+ \d+)'>(.*?)</div>", page):
        row, start = map(int, at.split())
        out.append((row, start, re.findall(r"<span class='tok[^']*' title='([^']*)'", body)))
    return out


def test_every_shaded_token_carries_the_latents_activation(gpt2_dashboards):
    run, dash = gpt2_dashboards
    ev = dashboards.eval_set(run, "cpu")
    values = dashboards.latent_activations(run, dash.shown, device="cpu")
    for c, latent in enumerate(dash.shown):
        grid = torch.full(tuple(ev.tokens.shape), float("nan"))
        grid[ev.where[:, 0], ev.where[:, 1]] = values[:, c]
        contexts = spans((dash.index.parent / f"latent_{latent}.html").read_text())
        assert len(contexts) >= 10  # top contexts and quantile samples
        for row, start, titles in contexts:
            expected = grid[row, start:start + len(titles)].tolist()
            assert [float(t) if t != "not scored" else float("nan") for t in titles] \
                == pytest.approx(expected, rel=1e-5, nan_ok=True)


def test_shading_is_the_value_over_the_latents_maximum():
    page = dashboards.shaded_tokens(["a", " b", " c"], [0.0, 1.5, 3.0], 6.0, fire=2)
    assert re.findall(r"title='([^']*)' style='background:rgba\(255,110,0,([\d.]+)\)'", page) \
        == [("0", "0.000"), ("1.5", "0.250"), ("3", "0.500")]
    assert page.count("tok fire") == 1


def test_quantile_bands_draw_from_their_own_band():
    values = torch.zeros(1000)
    where = torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:100]
    values[where] = torch.arange(1, 101, dtype=torch.float32)  # 100 firing tokens, values 1..100
    bands = dashboards.quantile_bands(values, n_bands=5, per_band=4)
    assert [(b.low, b.high) for b in bands] == [(20 * b + 1, 20 * b + 20) for b in range(5)]
    for b, band in enumerate(bands):
        drawn = values[band.indices].tolist()
        assert len(set(drawn)) == 4 and drawn == sorted(drawn, reverse=True)
        assert all(20 * b + 1 <= v <= 20 * b + 20 for v in drawn)


def test_nearest_decoder_neighbours_find_a_planted_duplicate():
    W = torch.randn(50, 16, generator=torch.Generator().manual_seed(1))
    W[7], W[11] = 3 * W[2], -W[2]  # a scaled duplicate of latent 2, and its opposite
    near = dashboards.decoder_neighbours(W, [2, 30], n=4)
    assert near[0][0].latent == 7 and near[0][0].cosine == pytest.approx(1.0)
    assert all(nb.latent not in (2, 11) for nb in near[0])
    unit = W / W.norm(dim=1, keepdim=True)
    brute = (unit[30] @ unit.T).index_fill(0, torch.tensor([30]), -2).topk(4).indices.tolist()
    assert [nb.latent for nb in near[1]] == brute


def test_token_effects_follow_a_hand_built_unembedding(gpt2):
    W_U = dashboards.unembedding(gpt2)
    saved = W_U.detach().clone()
    hand = torch.zeros_like(saved)  # (d, vocab)
    hand[0, 5], hand[0, 9], hand[0, 7], hand[0, 3], hand[1, 7] = 3.0, 2.0, -4.0, -1.0, 10.0
    try:
        with torch.no_grad():
            W_U.copy_(hand)
        direction = torch.zeros(saved.shape[0])
        direction[0] = 0.5
        effects = dashboards.token_effects(direction, dashboards.unembedding(gpt2),
                                           gpt2.tokenizer, 2)
    finally:
        with torch.no_grad():
            W_U.copy_(saved)
    decode = gpt2.tokenizer.decode
    assert effects.promoted == [(decode([5]), 1.5), (decode([9]), 1.0)]
    assert effects.suppressed == [(decode([7]), -2.0), (decode([3]), -0.5)]


def test_pages_show_the_decoders_promoted_and_suppressed_tokens(gpt2_dashboards, gpt2):
    run, dash = gpt2_dashboards
    sae, latent = run.sae(), dash.shown[0]
    logits = (sae.W_dec[latent] / sae.scale) @ dashboards.unembedding(gpt2)
    page = (dash.index.parent / f"latent_{latent}.html").read_text()
    for ids in (logits.topk(3).indices, logits.topk(3, largest=False).indices):
        for i in ids.tolist():
            assert repr(gpt2.tokenizer.decode([i])).replace("'", "&#x27;") in page


def test_the_index_lists_every_latent_by_density(gpt2_dashboards):
    run, dash = gpt2_dashboards
    page = dash.index.read_text()
    rows = re.findall(r"<tr id='L(\d+)'><td data-v='\d+'>(.*?)</td><td data-v='([^']*)'>", page)
    assert len(rows) == 64 and len(dash.shown) == 2 * LATENTS
    density = [float(d) for _, _, d in rows]
    assert density == sorted(density, reverse=True)
    saved = load_density(run)
    assert density == pytest.approx([saved[int(i)].item() for i, _, _ in rows], abs=1e-6)
    linked = {int(i) for i, cell, _ in rows if "href" in cell}
    assert linked == set(dash.shown)
    groups = dict(re.findall(r"<tr id='L(\d+)'>.*?<td style='text-align:left'>(group [^<]*)</td>",
                             page))
    assert len(groups) == 64 and groups["20"] == "group 2 of 3 (latents 16-31)"
    for latent in dash.shown:
        assert dashboards.latent_group(run, latent) in \
            (dash.index.parent / f"latent_{latent}.html").read_text()


def test_a_clts_pages_number_its_latents_layer_by_layer(gpt2, tiny_gpt2_dir, tmp_path):
    from test_clt import gpt2_clt_cfg

    cfg = gpt2_clt_cfg(tiny_gpt2_dir, sae_type="topk", dict_size=32, top_k=4, layers="0:1",
                       num_tokens=64 * 12, eval_freq=12, output_dir=str(tmp_path),
                       checkpoint_freq=0)
    run = load_run(train_sae(cfg, model=gpt2).run_dir)
    dash = dashboards.write_dashboards(run, tmp_path / "dashboards", 2, device="cpu")
    index = dash.index.read_text()
    assert index.count("<tr id='L") == 64 and "layer 1 (its latent 0)" in index
    clt, ev = run.sae(), dashboards.eval_set(run, "cpu")
    assert ev.acts.shape[0] == 2  # one input hook per layer
    f = clt.encode(ev.acts)  # (layers, tokens, m), computed here layer by layer
    for latent in dash.shown:
        layer, i = divmod(latent, 32)
        grid = torch.full(tuple(ev.tokens.shape), float("nan"))
        grid[ev.where[:, 0], ev.where[:, 1]] = f[layer, :, i]
        page = (dash.index.parent / f"latent_{latent}.html").read_text()
        assert f"layer {layer} (its latent {i})" in page
        for row, start, titles in spans(page):
            assert [float(t) for t in titles] == pytest.approx(
                grid[row, start:start + len(titles)].tolist(), rel=1e-5)


def chromium(*args: str) -> str:
    return subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", *args],
                          capture_output=True, text=True, timeout=60, check=True).stdout


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (apt-get install chromium)")
def test_a_headless_browser_renders_the_index_and_a_page(gpt2_dashboards, tmp_path):
    from PIL import Image

    _, dash = gpt2_dashboards
    index = chromium("--dump-dom", dash.index.as_uri())
    assert index.count("<tr id=\"L") == 64 and "<input id=\"n\"" in index
    page = dash.index.parent / f"latent_{dash.shown[0]}.html"
    dom = chromium("--dump-dom", page.as_uri())
    assert "<svg" in dom and "tok fire" in dom and "nearest latents" in dom
    shot = tmp_path / "page.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,900", page.as_uri())
    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 20  # not blank: text, shading, histogram
