"""Neuron matching on tiny real checkpoints: derived children at the p floor whatever output-preserving edit they
received, independently initialised pairs no more often significant than alpha, and the tamper flag."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from scipy.optimize import linear_sum_assignment
from threadpoolctl import threadpool_limits

from forensics.corpus import load_corpus
from forensics.errors import ForensicsError
from forensics.fingerprint import fingerprint_model
from forensics.lab import transforms as T
from forensics.signals.neurons import Screen, _bfloat16, _row_max, _row_min, read_sketch, selection
from forensics.stats import residual
from forensics.sources.vocabulary import canonical, shared_tokens, vocabulary
from forensics.stats.compare import Settings, compare_case
from forensics.stats.lineage import EVIDENCE, tamper_flag
from forensics.pipeline import neuron_test
from forensics.stats.neurons import SCREEN_MARGIN, NeuronSettings, _Matcher, match_test, unit_neurons
from tests.test_case_run import family
from tests.test_corpus import byte_bpe

FAST = NeuronSettings(permutations=19, seed=3)
FLOOR = 1 / 20


def train(model, steps: int, seed: int, lr: float = 1e-3):
    """A few AdamW steps on random token windows: a plain fine-tune, nothing output-preserving about it."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        x = torch.randint(0, model.config.vocab_size, (4, 17), generator=g)
        model(input_ids=x[:, :-1], labels=x[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    return byte_bpe(load_corpus(show_progress=False).texts[:30])


@pytest.fixture(scope="module")
def lineage(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("lineage")
    parent = family(root / "parent", tok, seed=1)
    children = {
        "permuted": T.permute_neurons(parent, seed=5)[0],
        "updown": T.rescale_updown(parent, seed=5, layer_spread=3.0)[0],  # enough to redraw the std curves
        "norm": T.rescale_norm(parent, seed=5)[0],
        "qk": T.rescale_qk(parent, seed=5)[0],
        "finetuned": train(T._clone(parent), steps=20, seed=5),
        "pruned": T.prune_layers(parent, drop=[3, 10, 17])[0],
        "upcycled": T.upcycle(parent, seed=5, experts=2, top_k=1)[0],
    }
    texts = load_corpus(show_progress=False).texts
    new_tok = T.new_tokenizer(texts[30:60], vocab_size=400)
    windows = np.asarray(new_tok(" ".join(texts[:20]))["input_ids"])[:8 * 32].reshape(8, 32)
    for name, child in children.items():
        child.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    made = {
        "rotated": (T.rotate_residual(parent, seed=5)[0], tok),
        "width-pruned": (T.prune_width(parent, seed=5, hidden_keep=0.75, ffn_keep=0.75)[0], tok),
        "vocab-replaced": (T.replace_vocabulary(parent, new_tok, windows, seed=5)[0], new_tok),
    }
    for i, seed in enumerate((21, 22, 23, 24, 25, 26)):
        model = train(family(root / f"independent{i}", tok, seed=seed), steps=10, seed=seed)
        model.save_pretrained(root / f"independent{i}")
        if i == 0:
            made["independent0-rotated"] = (T.rotate_residual(model, seed=9)[0], tok)
    for name, (child, t) in made.items():
        child.save_pretrained(root / name)
        t.save_pretrained(root / name)
    return root


def test_vocabulary_spellings_meet():
    assert canonical("Ġthe", "byte_level") == canonical("▁the", "sentencepiece") == canonical("the", "wordpiece")
    assert canonical("##ing", "wordpiece") == canonical("ing", "sentencepiece") == "ing"
    assert canonical("<0x41>", "sentencepiece") is None
    assert shared_tokens(["Ġa", "b", "Ġa"], ["▁a", "b"], "byte_level", "sentencepiece") == [(1, 1)]


def test_alignment_recovers_a_signed_permutation():
    rng = np.random.default_rng(0)
    es = rng.standard_normal((500, 40))
    perm, signs = rng.permutation(40), rng.choice([-1.0, 1.0], 40)
    for scale, quality in ((np.ones(40), 0.999), (rng.uniform(0.5, 2.0, 40), 0.8)):
        ec = np.empty_like(es)
        ec[:, perm] = es * signs * scale  # a per-coordinate scale too: the map still holds, less exactly
        fits = residual.by_tokens(es, ec, np.random.default_rng(1))
        fit = residual.choose_token_fit(fits)
        assert fit.how == residual.TOKENS_PERMUTATION and fit.accepted
        idx, found = selection(fit.matrix)
        assert (idx == perm).all() and (found == signs).all()
        assert fit.quality > quality
    unrelated = residual.by_tokens(es, rng.standard_normal((500, 40)), np.random.default_rng(1))
    assert residual.choose_token_fit(unrelated) is None


def test_the_rotation_is_fitted_only_when_it_could_be_chosen():
    """An accepted signed permutation of quality above 1 - ROTATION_MARGIN leaves a rotation no room: it is not fitted
    (its SVDs are most of a 7B pair's alignment time). A rotated stream, or a looser permutation, gets both."""
    rng = np.random.default_rng(0)
    es = rng.standard_normal((500, 40))
    exact = residual.by_tokens(es, -es[:, rng.permutation(40)], np.random.default_rng(1))
    assert [f.how for f in exact] == [residual.TOKENS_PERMUTATION] and exact[0].quality > 1 - residual.ROTATION_MARGIN
    assert residual.choose_token_fit(exact) is exact[0]
    rotation = np.linalg.qr(rng.standard_normal((40, 40)))[0]
    rotated = residual.by_tokens(es, es @ rotation.T, np.random.default_rng(1))
    assert [f.how for f in rotated] == [residual.TOKENS_PERMUTATION, residual.TOKENS_ORTHOGONAL]
    assert residual.choose_token_fit(rotated).how == residual.TOKENS_ORTHOGONAL


@pytest.mark.parametrize("child", ["permuted", "updown", "norm", "qk", "finetuned"])
def test_derived_children_reach_the_floor(lineage, child):
    r = neuron_test(lineage / child, lineage / "parent", FAST)
    assert r["status"] == "compared"
    assert r["pvalue"] == pytest.approx(FLOOR)
    assert all(layer["pvalue"] == pytest.approx(FLOOR) for layer in r["layers"])
    # Every suspect layer finds the parent's layer of the same index, with near-identical neurons.
    for layer in r["layers"]:
        (unit,) = layer["units"]
        assert unit["matches"]["layer"] == layer["layer"]
        assert unit["statistic"] > (0.99 if child != "finetuned" else 0.9)
        if child == "permuted":  # a random permutation leaves about one neuron in n where it was
            assert unit["same_index_fraction"] < 0.25
        else:
            assert unit["same_index_fraction"] == 1.0
    assert r["null"]["max"] < 0.5 * r["statistic"]


def test_pruned_layers_are_localised(lineage):
    r = neuron_test(lineage / "pruned", lineage / "parent", FAST)
    kept = [i for i in range(24) if i not in (3, 10, 17)]
    assert [layer["units"][0]["matches"]["layer"] for layer in r["layers"]] == kept
    assert r["pvalue"] == pytest.approx(FLOOR)


def test_upcycled_experts_match_the_dense_layer(lineage):
    r = neuron_test(lineage / "upcycled", lineage / "parent", FAST)
    assert r["pvalue"] == pytest.approx(FLOOR)
    for layer in r["layers"]:
        assert [u["unit"]["kind"] for u in layer["units"]] == ["expert", "expert"]
        assert {u["matches"]["layer"] for u in layer["units"]} == {layer["layer"]}
        assert [u["neurons"] for u in layer["units"]] == [8, 8]  # the layer's 16, split over its two experts


def test_a_layers_neurons_are_split_over_its_units():
    assert [unit_neurons(16, e) for e in (1, 2, 3, 4, 5, 64)] == [16, 8, 6, 4, 4, 4]
    # Below the minimum: the sample asked for, from each unit.
    assert [unit_neurons(3, e) for e in (1, 2, 64)] == [3, 3, 3]
    assert unit_neurons(1024, 64) == 16


@pytest.mark.parametrize("suspect, native, neurons", [("upcycled", True, 16), ("independent0", True, 16),
                                                     ("upcycled", False, 16), ("upcycled", True, 8)])
def test_the_screened_search_finds_every_units_best_matching(lineage, suspect, native, neurons):
    """Against the solver on every whole similarity matrix in float64, for the observed basis and signed
    permutations, both signs of the stream and a candidate of mixed unit widths; the bfloat16 screen (native, or
    float32 products of the rounded inputs) stays within a quarter of its margin of the exact bound, with 8 neurons
    an expert and with 4 (the fewest a unit draws, whose mean row maximum averages the rounding least)."""
    dims = np.eye(32)
    sus, cand = read_sketch(lineage / suspect, dims), read_sketch(lineage / "parent", dims)
    for k, unit in enumerate(sorted(cand.units)):
        if k % 3 == 1:
            cand.units[unit] = {p: rows[:len(rows) * 2 // 3] for p, rows in cand.units[unit].items()}
    mt = _Matcher(sus, cand, replace(FAST, neurons=neurons))
    assert {len(rows) for rows in mt.rows} == {neurons // 2 if suspect == "upcycled" else neurons}
    assert len({len(c) for c in mt.cand}) == 2
    mt.screen = Screen(np.concatenate(mt.cand), [len(c) for c in mt.cand], len(mt.sus), native=native)
    rng = np.random.default_rng(0)

    def matching(sim: np.ndarray) -> float:
        r, c = linear_sum_assignment(sim, maximize=True)
        return sim[r, c].mean()

    for draw in [()] + [mt.draw(rng) for _ in range(5)]:
        got = mt.unit_stats(*draw, flips=(False, True))
        x = mt.sus[:, np.argsort(draw[0])] * draw[1][np.argsort(draw[0])] if draw else mt.sus
        for flip in (False, True):
            side = (-x if flip else x).astype(np.float64)
            sims = [[side[rows] @ c.T.astype(np.float64) for c in mt.cand] for rows in mt.rows]
            exact = np.array([[matching(s) for s in unit] for unit in sims])
            bound = np.array([[s.max(axis=1).mean() for s in unit] for unit in sims])
            assert np.abs(mt.screen(x, mt.offsets, (flip,))[flip] - bound).max() < SCREEN_MARGIN / 4
            stats_, where, _ = got[flip]
            np.testing.assert_allclose(stats_, exact.max(axis=1), atol=1e-5)
            assert (exact[np.arange(len(where)), where] >= exact.max(axis=1) - 1e-5).all()


def test_the_screens_integer_extremes_equal_torchs_bfloat16_ones():
    """Rows mixed in sign (the integer path), all negative and all positive (a fallback each), signed zeros,
    magnitudes from 1e-3 to 1e3, and strided slices of a wider product (as the screen takes them); bit for bit but
    for the sign of a zero."""
    g = torch.Generator().manual_seed(0)
    for case in range(60):
        x = (torch.randn(7, 90, generator=g) * 10.0 ** (case % 7 - 3)).bfloat16()
        x = {1: -x.abs(), 2: x.abs()}.get(case % 4, x)
        if case % 5 == 0:
            x[0, 10:13], x[1, 40:70] = 0.0, -0.0
        view = x[:, 10:70].unflatten(1, (2, 30))
        high, low = view.amax(dim=-1), view.amin(dim=-1)
        if case % 4 not in (1, 2) and case % 5:
            assert (high > 0).all() and (low < 0).all()  # neither falls back
        for got, want in ((_row_max(torch, view), high), (_row_min(torch, view), low)):
            assert torch.equal(got, want)
            nonzero = want != 0
            assert torch.equal(got.view(torch.int16)[nonzero], want.view(torch.int16)[nonzero])


def test_the_emulated_screens_rounding_is_torchs_bfloat16_bit_for_bit():
    """Random bits of every finite float32 (subnormals, both signs, the largest, which round to infinity), and the
    halfway cases, whose ties go to the even bfloat16 either way."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    halfway = (bits & 0xFFFF0000) | 0x8000
    x = np.concatenate([bits, halfway, np.array([0x7F7FFFFF, 0xFF7FFFFF, 0, 0x80000000], np.uint32)]).view(np.float32)
    x = x[np.isfinite(x)]
    want = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(_bfloat16(x).view(np.uint32), want.view(np.uint32))
    assert np.isinf(_bfloat16(np.array([3.4028235e38], np.float32))).all()


@pytest.mark.parametrize("native", [True, False])
def test_a_screen_that_cuts_wide_units_into_pieces_equals_the_whole_units(lineage, native):
    dims = np.eye(32)
    mt = _Matcher(read_sketch(lineage / "upcycled", dims), read_sketch(lineage / "parent", dims), FAST)
    whole, widths = np.concatenate(mt.cand), [len(c) for c in mt.cand]
    rows = len(mt.sus)
    # Blocks of 2/5 of a unit's products: every unit is cut into three pieces, a block each.
    cut = Screen(whole, widths, rows, native=native, block_bytes=2 * rows * widths[0] * 2 // 5)
    assert len(cut.blocks) > len(widths)
    kept = Screen(whole, widths, rows, native=native)
    for draw in [()] + [mt.draw(np.random.default_rng(k)) for k in range(3)]:
        x = mt.sus[:, np.argsort(draw[0])] * draw[1][np.argsort(draw[0])] if draw else mt.sus
        a, b = cut(x, mt.offsets, (False, True)), kept(x, mt.offsets, (False, True))
        for flip in (False, True):
            np.testing.assert_array_equal(a[flip], b[flip])


def test_candidate_units_visited_at_once_give_the_bits_of_one_after_another(lineage):
    dims = np.eye(32)
    mt = _Matcher(read_sketch(lineage / "upcycled", dims), read_sketch(lineage / "parent", dims), FAST)
    rng = np.random.default_rng(1)
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max_workers=2) as pool:
        for draw in [()] + [mt.draw(rng) for _ in range(3)]:
            mt.pool = None
            one = mt.unit_stats(*draw, detail=True, flips=(False, True))
            mt.pool = pool
            both = mt.unit_stats(*draw, detail=True, flips=(False, True))
            for flip in (False, True):
                np.testing.assert_array_equal(one[flip][0], both[flip][0])
                np.testing.assert_array_equal(one[flip][1], both[flip][1])
                assert one[flip][2] == both[flip][2]


def test_sketch_is_invariant_to_output_preserving_edits(lineage):
    dims = np.eye(32)[:, ::2]
    parent = read_sketch(lineage / "parent", dims)
    for child in ("updown", "norm"):
        other = read_sketch(lineage / child, dims)
        for unit, parts in parent.units.items():
            for part, rows in parts.items():
                np.testing.assert_allclose(other.units[unit][part], rows, atol=1e-5)


def test_independent_pairs_are_significant_no_more_often_than_alpha(lineage):
    """The null of the matching itself, on 15 independently initialised (and briefly trained) 24-layer pairs: their
    coordinates correspond in no way, so the identity map is as good as any, and the matching runs through it."""
    paths = [lineage / f"independent{i}" for i in range(6)]
    dims = np.eye(32)
    joint, layers, fisher = [], [], []
    for i, a in enumerate(paths):
        for b in paths[i + 1:]:
            r = match_test(read_sketch(a, dims), read_sketch(b, dims), FAST)
            joint.append(r["pvalue"])
            fisher.append(r["fisher"]["pvalue"])
            layers += [layer["pvalue"] for layer in r["layers"]]
    joint, layers = np.array(joint), np.array(layers)
    # Under the null P(p <= 0.05) = 0.05 exactly (T = 19): 15 pairs expect 0.75 hits, 360 layers expect 18.
    assert (joint <= 0.05).sum() <= 3
    assert (layers <= 0.05).mean() <= 0.09
    assert 0.35 < layers.mean() < 0.65  # roughly uniform, not piled at either end
    assert (np.array(fisher) <= 0.05).sum() <= 3


def test_draws_stop_once_p_cannot_fall_below_alpha_and_change_no_decision(lineage):
    """Besag-Clifford: with alpha, the draws are the full run's first L, L the h-th to reach the observed total
    (h = ceil(alpha T)), p = h/L; where the run does not stop it is the full run's result, to the byte."""
    dims = np.eye(32)
    s = NeuronSettings(permutations=39, seed=3)
    sequential = replace(s, alpha=0.05)
    assert sequential.stop_after() == 2
    pairs = [(lineage / "independent0", lineage / f"independent{i}") for i in range(1, 6)]
    pairs.append((lineage / "permuted", lineage / "parent"))
    stops = 0
    for a, b in pairs:
        sus, cand = read_sketch(a, dims), read_sketch(b, dims)
        full, seq = match_test(sus, cand, s), match_test(sus, cand, sequential)
        assert full["draws"] == 39 and not full["stopped"]
        reach = np.flatnonzero(np.array(_null_totals(sus, cand, s)) >= full["statistic"])
        if len(reach) >= 2:
            stops += 1
            assert seq["stopped"] and seq["draws"] == reach[1] + 1 and seq["hits"] == 2
            assert seq["pvalue"] == pytest.approx(2 / seq["draws"]) and seq["pvalue"] >= 0.05
            assert full["pvalue"] >= 0.05
        else:
            assert {k: v for k, v in seq.items() if k != "settings"} == \
                {k: v for k, v in full.items() if k != "settings"}
    assert stops >= 3  # unrelated pairs mostly stop early; the derived child never does
    assert not match_test(read_sketch(pairs[-1][0], dims), read_sketch(pairs[-1][1], dims), sequential)["stopped"]


def test_a_stopped_test_that_could_not_reach_alpha_stays_inconclusive(lineage):
    """Under Holm with two candidates, T = 199 cannot bring an adjusted p below 0.01 (2/200): a test that stopped
    early is INCONCLUSIVE then, as it would have been run to the end; with one candidate it is NO EVIDENCE, saying
    how many of the draws made reached the observation."""
    from forensics.stats.lineage import INCONCLUSIVE, NO_EVIDENCE, neuron_conclusions

    dims = np.eye(32)
    s = NeuronSettings(permutations=199, seed=3, alpha=0.01)
    t = match_test(read_sketch(lineage / "independent0", dims), read_sketch(lineage / "independent1", dims), s)
    assert t["stopped"] and t["draws"] < 199 and t["hits"] == 2
    assert neuron_conclusions({"a": t, "b": t}, 0.01, "holm")["a"]["conclusion"] == INCONCLUSIVE
    alone = neuron_conclusions({"a": t}, 0.01, "holm")["a"]
    assert alone["conclusion"] == NO_EVIDENCE and f"2 of the first {t['draws']} random bases" in alone["reason"]


def test_non_finite_sketches_are_refused_with_the_file(lineage):
    dims = np.eye(32)
    sus, cand = read_sketch(lineage / "permuted", dims), read_sketch(lineage / "parent", dims)
    unit = sorted(cand.units)[2]
    cand.units[unit]["up"] = cand.units[unit]["up"].copy()
    cand.units[unit]["up"][0, 0] = np.nan
    with pytest.raises(ForensicsError, match="non-finite") as e:
        match_test(sus, cand, FAST)
    assert str(lineage / "parent") in str(e.value)


def _null_totals(sus, cand, s) -> list[float]:
    """Every draw's total, in the order the test draws them (its null, run with nothing to reach)."""
    from forensics.stats.neurons import _null

    mt = _Matcher(sus, cand, s)
    layers = sorted({u.layer for u in mt.sus_units})
    masks = [np.array([u.layer == layer for u in mt.sus_units]) for layer in layers]
    per_layer = lambda units: np.array([units[m].mean() for m in masks])
    never = np.full(len(mt.sus_units), np.inf)
    return _null(mt, s, never, per_layer(never), per_layer, None, False)[3]


def test_independent_pairs_find_no_alignment_and_are_not_compared(lineage):
    """Unrelated streams have no near-exact map, by tokens or by weights, also after one of them was rotated: the
    route is not applicable (a failed alignment is not absence of evidence), and says why."""
    pairs = [("independent1", "independent2"), ("independent3", "independent4"), ("independent0-rotated", "parent"),
             ("independent0-rotated", "independent1"), ("vocab-replaced", "independent2")]
    for a, b in pairs:
        r = neuron_test(lineage / a, lineage / b, FAST)
        assert r["status"] == "unavailable" and "no near-exact alignment" in r["reason"], (a, b)
        tried = {t["how"]: t for t in r["alignment"]["tried"]}
        assert residual.WEIGHTS_PERMUTATION in tried and not any(t["accepted"] for t in tried.values())
        assert all(t["quality"] < residual.MIN_QUALITY for t in tried.values())


@pytest.mark.parametrize("child, how", [("rotated", residual.TOKENS_ORTHOGONAL),
                                        ("width-pruned", residual.TOKENS_PERMUTATION),
                                        ("vocab-replaced", residual.WEIGHTS_PERMUTATION)])
def test_rotated_narrowed_and_revocabularised_children_are_aligned_and_matched(lineage, child, how):
    r = neuron_test(lineage / child, lineage / "parent", FAST)
    assert r["status"] == "compared" and r["alignment"]["how"] == how
    # A subset's principal components are not the whole stream's, so the narrowed child's map is a little looser.
    assert r["alignment"]["quality"] > (0.9 if child == "width-pruned" else 0.99)
    assert r["pvalue"] == pytest.approx(FLOOR)
    assert [layer["units"][0]["matches"]["layer"] for layer in r["layers"]] == list(range(24))
    assert r["null"]["max"] < 0.5 * r["statistic"]
    if child == "width-pruned":
        assert (r["alignment"]["suspect_width"], r["alignment"]["candidate_width"]) == (24, 32)
    if child == "vocab-replaced":  # no token of the new vocabulary kept its embedding: the tokens' maps failed
        tried = {t["how"]: t for t in r["alignment"]["tried"]}
        assert not tried[residual.TOKENS_PERMUTATION]["accepted"] and not tried[residual.TOKENS_ORTHOGONAL]["accepted"]


def test_a_child_of_the_independent_model_is_found_through_its_rotation(lineage):
    r = neuron_test(lineage / "independent0-rotated", lineage / "independent0", FAST)
    assert r["alignment"]["how"] == residual.TOKENS_ORTHOGONAL and r["pvalue"] == pytest.approx(FLOOR)


def test_no_shared_vocabulary_falls_back_to_the_weights_and_a_wider_suspect_is_refused(lineage, tmp_path):
    r = neuron_test(lineage / "parent", lineage / "width-pruned", FAST)
    assert r["status"] == "unavailable" and "wider" in r["reason"]
    bare = tmp_path / "bare"
    (bare).mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((lineage / "parent" / f).read_bytes())
    assert vocabulary(bare) == (None, "")
    r = neuron_test(bare, lineage / "parent", FAST)
    assert r["alignment"]["how"] == residual.WEIGHTS_PERMUTATION and r["pvalue"] == pytest.approx(FLOOR)
    assert "shared_tokens" not in r["alignment"]
    r = neuron_test(bare, lineage / "independent1", FAST)
    assert r["status"] == "unavailable" and "share no token" in r["reason"]


def _case(lineage, suspect: str, candidate: str = "parent"):
    controls = ("independent3", "independent4", "independent5")
    fps = {name: fingerprint_model(lineage / name) for name in (suspect, candidate) + controls}
    test = neuron_test(lineage / suspect, lineage / candidate, NeuronSettings(permutations=39, seed=3))
    return compare_case(fps[suspect], {candidate: fps[candidate]},
                        {name: fps[name] for name in controls}, None,
                        Settings(n_permutations=999, n_bootstrap=100, alpha=0.05, seed=1), {candidate: test})


@pytest.mark.parametrize("child", ["rotated", "width-pruned", "vocab-replaced"])
def test_rotated_narrowed_and_revocabularised_children_are_called_derived(lineage, child):
    v = _case(lineage, child)["candidates"]["parent"]["verdict"]
    assert v["verdict"] == "DERIVED" and v["route"] == "neurons"


@pytest.mark.parametrize("suspect, candidate", [("independent1", "parent"), ("independent0-rotated", "parent"),
                                                ("independent0-rotated", "independent1")])
def test_independent_pairs_are_not_called_derived_rotated_or_not(lineage, suspect, candidate):
    res = _case(lineage, suspect, candidate)["candidates"][candidate]
    assert res["verdict"]["verdict"] != "DERIVED"
    assert res["verdict"]["routes"]["neurons"]["role"] == "not applicable"


def test_tamper_flag_fires_on_a_rescaled_child(lineage):
    res = _case(lineage, "updown")["candidates"]["parent"]
    assert res["neurons"]["conclusion"] == EVIDENCE
    assert res["tamper"]["raised"]
    assert {"up", "down"} <= set(res["tamper"]["roles"])
    assert not {"q", "k", "v", "o"} & set(res["tamper"]["roles"])
    assert "output-preserving" in res["tamper"]["statement"]


def test_tamper_flag_stays_down_on_a_plain_fine_tune(lineage):
    res = _case(lineage, "finetuned")["candidates"]["parent"]
    assert res["neurons"]["conclusion"] == EVIDENCE
    assert not res["tamper"]["raised"] and res["tamper"]["roles"] == []
    # With three controls the std-curve route cannot reach alpha (too small a null); neuron matching, first in the
    # pre-specified order, decides: one verdict, the std curves' own rule only a route beside it.
    v = res["verdict"]
    assert v["verdict"] == "DERIVED" and v["route"] == "neurons"
    assert v["routes"]["std_curves"]["conclusion"] == "INCONCLUSIVE" and v["routes"]["neurons"]["role"] == "decided"


def test_tamper_flag_ignores_curves_too_short_to_test():
    """An exact copy of a 6-layer model: every std p is 1 because no permutation test is possible, not because the
    curves differ; that is no sign of tampering."""
    short = {"status": "compared", "pvalue_adjusted": 1.0, "permutation": {"floor": 1.0, "pvalue": 1.0}}
    testable = {"status": "compared", "pvalue_adjusted": 0.3, "permutation": {"floor": 1e-4, "pvalue": 0.3}}
    neuron = {"conclusion": EVIDENCE, "pvalue": 0.005}
    assert not tamper_flag({"q": short, "k": short}, neuron, 0.01)["raised"]
    flag = tamper_flag({"q": short, "k": testable}, neuron, 0.01)
    assert flag["raised"] and flag["roles"] == ["k"] and flag["checked_roles"] == ["k"]


def test_bytes_matched_are_the_fingerprinted_evidence(lineage):
    """Neuron matching reads the models again; what it read must hash as in the fingerprint pass, or the run stops."""
    from forensics.pipeline import same_inputs
    from forensics.errors import ForensicsError

    r = neuron_test(lineage / "qk", lineage / "parent", FAST)
    fps = (fingerprint_model(lineage / "qk"), fingerprint_model(lineage / "parent"))
    weights = {f["path"]: f["sha256"] for f in fps[1]["model"]["files"]}
    assert {f["path"]: f["sha256"] for f in r["inputs"]["candidate"]}.items() <= weights.items()
    assert "model.safetensors" in {f["path"] for f in r["inputs"]["candidate"]}
    same_inputs(r, fps)
    stale = {**fps[1], "model": {**fps[1]["model"], "files": [
        {**f, "sha256": "0" * 64} if f["path"] == "model.safetensors" else f for f in fps[1]["model"]["files"]]}}
    with pytest.raises(ForensicsError, match="changed during the analysis"):
        same_inputs(r, (fps[0], stale))


@pytest.fixture(scope="module")
def bf16(lineage, tmp_path_factory):
    """The permuted child stored in bfloat16 (the fingerprint pass decodes such FFN matrices a chunk at a time, and
    the sketch only at the coordinates it keeps)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("bf16") / "permuted-bf16"
    AutoModelForCausalLM.from_pretrained(lineage / "permuted").to(torch.bfloat16).save_pretrained(out)
    for f in (lineage / "permuted").glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.mark.parametrize("suspect", ["permuted", "bf16", "rotated", "width-pruned", "vocab-replaced"])
def test_a_case_reads_each_model_once_and_matches_as_separate_reads_do(lineage, bf16, suspect):
    """`gather` aligns each pair from look-ups (embedding rows, norm gains) and takes both sketches from the
    fingerprint passes: the same test, byte for byte, as reading each step separately; every file of both models is
    read front to back once, and only a pair aligned through the weights (vocab-replaced) reads the candidate again."""
    import json

    from forensics.pipeline import gather

    path = bf16 if suspect == "bf16" else lineage / suspect
    models = {"suspect": path, "parent": lineage / "parent"}
    ev = gather(models, "cpu", neuron_pairs=[("suspect", "parent")], neuron_settings=FAST, show_progress=False)
    alone = neuron_test(path, lineage / "parent", FAST)
    one_pass = ev.neurons["parent"]
    # The inputs a separate sketch pass names are the files it opened; the fingerprint pass's are all the model's.
    for side, name in (("suspect", "suspect"), ("candidate", "parent")):
        assert all(f in ev.fingerprints[name]["model"]["files"] for f in one_pass["inputs"][side])
        assert all(f in one_pass["inputs"][side] for f in alone["inputs"][side])
    assert json.dumps({**one_pass, "inputs": None}, sort_keys=True) == json.dumps({**alone, "inputs": None},
                                                                                   sort_keys=True)
    assert alone["pvalue"] == pytest.approx(FLOOR)
    weights_route = alone["alignment"]["how"] == residual.WEIGHTS_PERMUTATION
    assert weights_route == (suspect == "vocab-replaced")
    for name, root in models.items():
        sizes = {f["path"]: f["size"] for f in ev.fingerprints[name]["model"]["files"]}
        reads = ev.reads[name]
        assert {f: r["pass"] for f, r in reads.items() if r["pass"]} == sizes
        again = {f: r["again"] for f, r in reads.items() if r["again"]}
        assert again == ({"config.json": sizes["config.json"], "model.safetensors": sizes["model.safetensors"]}
                         if weights_route and name == "parent" else {})
        # Before the pass: the header and the token embedding, and for a rotated pair the candidate's norm gains
        # (the header read again), nothing of the FFN.
        with safe_open(root / "model.safetensors", "np") as f:
            nbytes = {n: int(np.prod(f.get_slice(n).get_shape())) * {"F32": 4, "BF16": 2}[f.get_slice(n).get_dtype()]
                      for n in f.keys()}
        header = 8 + int.from_bytes((root / "model.safetensors").read_bytes()[:8], "little")
        norms = sum(n for name, n in nbytes.items() if "norm" in name)
        assert reads["model.safetensors"]["look-up"] <= nbytes["model.embed_tokens.weight"] + 2 * header + norms
        assert reads["model.safetensors"]["look-up"] < sizes["model.safetensors"] / 4


@pytest.fixture(scope="module")
def records(lineage):
    """Registry records (pipeline.reference_entry's sample) of the parent and of an independent model."""
    from forensics.pipeline import RECORD_DIMS, RECORD_SEED, RECORD_TOKENS
    from forensics.signals.neurons import Record, read_record

    made = {name: read_record(lineage / name, RECORD_DIMS, RECORD_TOKENS, RECORD_SEED)
            for name in ("parent", "independent1")}
    # What the registry stores and reads back (float16), not the record in memory.
    return {name: Record.from_bytes(r.to_bytes(), lineage / name) for name, r in made.items()}


@pytest.mark.parametrize("child, how", [("permuted", residual.TOKENS_PERMUTATION),
                                        ("rotated", residual.TOKENS_ORTHOGONAL),
                                        ("width-pruned", residual.TOKENS_PERMUTATION),
                                        ("vocab-replaced", residual.WEIGHTS_PERMUTATION)])
def test_a_record_finds_the_parent_as_the_weights_do(lineage, records, child, how):
    """Matched against the parent's stored record (its coordinates sampled, the child read through the map): the
    same alignment and the floor."""
    from forensics.pipeline import neuron_test_record

    r = neuron_test_record(lineage / child, records["parent"], FAST)
    assert r["status"] == "compared" and r["alignment"]["how"] == how
    assert r["pvalue"] == pytest.approx(FLOOR)
    assert [layer["units"][0]["matches"]["layer"] for layer in r["layers"]] == list(range(24))
    if child == "width-pruned":  # only the sampled coordinates the narrower child holds are matched
        assert r["alignment"]["dims"] < records["parent"].dims.size


@pytest.mark.parametrize("suspect", ["parent", "independent0-rotated"])
def test_a_record_of_an_independent_model_does_not_align(lineage, records, suspect):
    from forensics.pipeline import neuron_test_record

    r = neuron_test_record(lineage / suspect, records["independent1"], FAST)
    assert r["status"] == "unavailable" and "no near-exact alignment" in r["reason"]


def test_a_suspect_is_read_once_for_every_record(lineage, records):
    """A scan matches the suspect against many records from one pass of it: each result is what the record alone
    gives, the sketches' alignments (tokens here, the weights for the vocab-replaced child) each its own."""
    import json

    from forensics.pipeline import neuron_test_record, record_tests

    refs = {"parent": records["parent"], "independent1": records["independent1"]}
    for child in ("permuted", "vocab-replaced"):
        together = record_tests(lineage / child, refs, FAST)
        for name, record in refs.items():
            alone = neuron_test_record(lineage / child, record, FAST)
            assert json.dumps(together[name], sort_keys=True) == json.dumps(alone, sort_keys=True)
        assert together["parent"]["pvalue"] == pytest.approx(FLOOR)
        assert together["independent1"]["status"] == "unavailable"


def test_a_record_round_trips_byte_for_byte(records):
    from forensics.signals.neurons import Record

    blob = records["parent"].to_bytes()
    assert Record.from_bytes(blob, "parent").to_bytes() == blob
    with pytest.raises(ForensicsError, match="neuron record"):
        Record.from_bytes(blob[:100], "parent")


def test_token_maps_equal_their_dense_numpy_oracle(monkeypatch):
    """The shared components found by Lanczos iterations (wide embeddings) are those of a full SVD, and the signed
    permutation's quality, read without the dense product, is that of `_quality` on the product, in float64."""
    rng = np.random.default_rng(3)
    e = rng.standard_normal((600, 80)) @ np.diag(np.r_[[30.0, 20.0, 12.0, 8.0], np.ones(76)])
    centred = e - e.mean(axis=0)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    oracle = centred - (u[:, :4] * s[:4]) @ vt[:4]
    monkeypatch.setattr(residual, "FULL_SVD_WIDTH", 8)  # the Lanczos path, on a matrix small enough to check
    np.testing.assert_allclose(residual.without_shared_components(e), oracle, atol=1e-10)

    fs, fc = residual._standard(e), residual._standard(e[:, rng.permutation(80)] + 0.5 * rng.standard_normal(e.shape))
    js, jc = residual._standard(rng.standard_normal((600, 70))), rng.standard_normal((600, 80))
    m, quality = residual._permutation_fit((fs[:, :70], fc), (js, jc))
    assert sorted(np.abs(m).sum(axis=0)) == [1.0] * 70 and set(np.unique(m)) <= {-1.0, 0.0, 1.0}
    assert quality == pytest.approx(residual._quality(js, jc @ m), abs=1e-14)
