"""Expert tables: every metric against a hand-computed tiny case, streaming, memory, and a real store."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from routesae.analyze import ExpertStats, expert_tables
from routesae.analyze.expert_metrics import (
    coactivation,
    coactivation_rate,
    first_choice,
    lift,
    load_cv,
    max_vio,
    multi_hot,
    normalised_entropy,
    repetition_rate,
    router_entropy,
    switch_aux,
)
from routesae.store import Store

COLUMNS = {
    "expert_domain": ["layer", "domain", "expert", "tokens", "hits_topk", "share_topk", "hits_top1", "share_top1",
                      "uniform_topk", "uniform_top1", "lift_topk", "base_topk", "selectivity"],
    "expert_stats": ["layer", "expert", "load", "load_top1", "mean_weight", "specialisation", "top_domain",
                     "collapse_low", "collapse_high", "top_tokens", "top_token_shares", "base_topk", "selectivity",
                     "top_share", "hub_domains", "hub"],
    "layer_stats": ["layer", "n_experts", "top_k", "tokens", "load_cv", "load_entropy_norm", "max_vio", "switch_aux",
                    "router_entropy", "repetition_rate", "domain_specialisation", "domain_selectivity", "hubs",
                    "bos_tokens"],
    "domain_layer": ["layer", "domain", "tokens", "router_entropy", "specialisation", "mean_active",
                     "repetition_rate", "selectivity", "owner"],
    "experts_per_token": ["layer", "domain", "n_active", "tokens", "fraction"],
    "position_profile": ["layer", "bucket", "tokens", "router_entropy", "specialisation", "max_share",
                         "selectivity"],
    "coactivation": ["layer", "expert_i", "expert_j", "count", "rate"],
}

# ---------------------------------------------------------------- the hand case
# E = 4, k = 2, MoE layers 1 and 3, 6 tokens: context 0 (domain a, positions 0-2), context 1 (b, positions 7-9)
P1 = np.array([0.4, 0.3, 0.2, 0.1])
H1 = -(P1 * np.log(P1)).sum()  # entropy of domain a's router distribution at layer 1
LN4 = math.log(4)


def hand_case():
    idx1 = [[0, 1], [0, 2], [1, 0], [2, 3], [3, 2], [2, -1]]
    w1 = [[.6, .4], [.7, .3], [.6, .4], [.9, .1], [.2, .8], [1., 0.]]  # token 4's first choice is slot 1 (expert 2)
    idx3 = [[0, 1]] + [[0, -1]] * 5                                     # layer 3 collapses onto expert 0
    w3 = [[.5, .5]] + [[1., 0.]] * 5
    logits1 = [np.log(P1)] * 3 + [np.zeros(4)] * 3
    router = {
        "indices": torch.tensor(np.stack([idx1, idx3], 1), dtype=torch.int16),
        "weights": torch.tensor(np.stack([w1, w3], 1), dtype=torch.float32),
        "n_active": torch.tensor([[2, 2], [2, 1], [2, 1], [2, 1], [2, 1], [1, 1]], dtype=torch.uint8),
        "logits": torch.tensor(np.stack([logits1, np.zeros((6, 4))], 1), dtype=torch.float32),
    }
    tokens = pd.DataFrame({"token_id": [5, 6, 5, 5, 7, 8], "token": ["t5", "t6", "t5", "t5", "t7", "t8"],
                           "position": [0, 1, 2, 7, 8, 9], "context": [0, 0, 0, 1, 1, 1],
                           "domain": ["a", "a", "a", "b", "b", "b"]})
    return router, tokens


def hand_tables(chunks=((0, 6),), min_vocab_count=1):
    router, tokens = hand_case()
    st = ExpertStats([1, 3], n_experts=4, top_k=2)
    for a, b in chunks:
        st.update({k: v[a:b] for k, v in router.items()}, tokens.iloc[a:b])
    return st.tables(min_vocab_count=min_vocab_count)


def at(df, **kw):
    m = np.ones(len(df), bool)
    for k, v in kw.items():
        m &= (df[k] == v).to_numpy()
    assert m.sum() == 1, kw
    return df[m].iloc[0]


# ---------------------------------------------------------------- pure functions


def test_pure_metrics_by_hand():
    load = np.array([3, 2, 4, 2])  # top-k hits of layer 1
    assert load_cv(load) == pytest.approx(math.sqrt((.25**2 + .75**2 + 1.25**2 + .75**2) / 4) / 2.75)
    p = load / 11
    assert normalised_entropy(load) == pytest.approx(-(p * np.log(p)).sum() / LN4)
    assert normalised_entropy([1, 1, 1, 1]) == pytest.approx(1.0) and normalised_entropy([5, 0, 0, 0]) == 0
    assert max_vio(load) == pytest.approx((4 - 2.75) / 2.75)
    assert load_cv([2, 2]) == 0 and max_vio([7, 7, 7]) == 0
    # Switch: balanced top-2 of 8 gives k = 2; collapse onto one expert gives E
    assert switch_aux(np.full(8, 2 / 8), np.full(8, 1 / 8)) == pytest.approx(2.0)
    assert switch_aux([1, 0, 0, 0], [1, 0, 0, 0]) == pytest.approx(4.0)
    assert switch_aux([.5, .5, 1, 0], [.1, .2, .3, .4]) == pytest.approx(4 * (.05 + .1 + .3))
    # repetition: pairs (0,1) same, (1,2) differ, (2,3) straddle contexts, (3,4) same, (4,5) token 5 has none
    assert repetition_rate([0, 0, 1, 1, 1, -1], [0, 0, 0, 1, 1, 1]) == pytest.approx(2 / 3)
    assert math.isnan(repetition_rate([0, 1], [0, 1]))
    # co-activation: tokens {0,1}, {0,2}, {0,1}, {2,3}; -1 and ids >= E are not experts
    c = coactivation(np.array([[0, 1], [0, 2], [1, 0], [2, 3], [3, 9]]), 4)
    assert c.tolist() == [[3, 2, 1, 0], [2, 2, 0, 0], [1, 0, 2, 1], [0, 0, 1, 2]]
    r = coactivation_rate(c)
    assert r[0, 1] == pytest.approx(2 / 3) and r[1, 0] == 1 and r[2, 3] == .5 and r[3, 2] == .5 and r[0, 0] == 1
    assert np.isnan(coactivation_rate(np.zeros((2, 2))))[0].all()
    np.testing.assert_allclose(lift([1, 2 / 3, 0], 0.5), [2, 4 / 3, 0])
    assert np.isnan(lift([0.3], 0.0)).all()
    assert multi_hot([[1, -1], [3, 0]], 4).tolist() == [[False, True, False, False], [True, False, False, True]]
    # first choice: the slot with the largest weight; -1 when no real expert
    assert first_choice([[3, 2], [1, 0], [-1, -1]], [[.2, .8], [.5, .5], [0, 0]], 4).tolist() == [2, 1, -1]
    assert first_choice([[3, 2], [-1, 1]]).tolist() == [3, 1]
    np.testing.assert_allclose(router_entropy(np.stack([np.log(P1), np.zeros(4)])), [H1, LN4])


# ---------------------------------------------------------------- the accumulator on the hand case


def test_expert_domain_by_hand():
    ed = hand_tables()["expert_domain"]
    assert len(ed) == 2 * 2 * 4 and list(ed.columns) == COLUMNS["expert_domain"]
    l1 = ed[ed.layer == 1]
    got = {(r.domain, r.expert): (r.hits_topk, r.share_topk, r.hits_top1, r.share_top1, r.lift_topk)
           for r in l1.itertuples()}
    want_k = {"a": [3, 2, 1, 0], "b": [0, 0, 3, 2]}
    want_1 = {"a": [2, 1, 0, 0], "b": [0, 0, 3, 0]}
    for d in "ab":
        for e in range(4):
            hk, sk, h1, s1, lk = got[(d, e)]
            assert (hk, h1) == (want_k[d][e], want_1[d][e])
            assert sk == pytest.approx(want_k[d][e] / 3) and s1 == pytest.approx(want_1[d][e] / 3)
            assert lk == pytest.approx(want_k[d][e] / 3 / 0.5)
    assert (ed.tokens == 3).all() and (ed.uniform_topk == .5).all() and (ed.uniform_top1 == .25).all()
    l3 = ed[ed.layer == 3]
    assert at(l3, domain="a", expert=0).hits_topk == 3 and at(l3, domain="a", expert=1).hits_topk == 1


def test_expert_stats_by_hand():
    es = hand_tables()["expert_stats"]
    assert list(es.columns) == COLUMNS["expert_stats"] and len(es) == 8
    l1 = es[es.layer == 1].set_index("expert")
    np.testing.assert_allclose(l1.load, np.array([3, 2, 4, 2]) / 11)
    np.testing.assert_allclose(l1.load_top1, np.array([2, 1, 3, 0]) / 6)
    np.testing.assert_allclose(l1.mean_weight, [1.7 / 3, .5, 3.0 / 4, .15], rtol=1e-6)
    np.testing.assert_allclose(l1.specialisation, [2, 4 / 3, 2, 4 / 3])
    assert l1.top_domain.tolist() == ["a", "a", "b", "b"]
    assert not l1.collapse_low.any() and not l1.collapse_high.any()
    l3 = es[es.layer == 3].set_index("expert")
    np.testing.assert_allclose(l3.load, [6 / 7, 1 / 7, 0, 0])
    assert l3.collapse_high.tolist() == [True, False, False, False]
    assert l3.collapse_low.tolist() == [False, False, True, True]
    # vocabulary: expert 0 of layer 1 sees token 6 once in 1 and token 5 twice in 3
    assert l1.top_tokens[0] == ["t6", "t5"] and l1.top_token_shares[0] == pytest.approx([1, 2 / 3])
    assert l1.top_tokens[2] == ["t6", "t7", "t8", "t5"]  # ties at share 1 by id; token 5 in 1 of 3
    assert l1.top_tokens[3] == ["t7", "t5"]
    # selectivity = top domain's share / the expert's share of all 6 tokens (3, 2, 4, 2 hits)
    np.testing.assert_allclose(l1.base_topk, [3 / 6, 2 / 6, 4 / 6, 2 / 6])
    np.testing.assert_allclose(l1.selectivity, [1 / .5, (2 / 3) / (1 / 3), 1 / (4 / 6), (2 / 3) / (1 / 3)])
    np.testing.assert_allclose(l1.top_share, [1, 2 / 3, 1, 2 / 3])
    assert l1.hub_domains.tolist() == [1, 1, 1, 1] and not l1.hub.any()
    # layer 3: expert 0 is in every token's top-k: share 1 in both domains, a hub with selectivity 1
    assert l3.hub.tolist() == [True, False, False, False] and l3.selectivity[0] == pytest.approx(1)
    assert l3.specialisation[0] == pytest.approx(2)  # lift E/k in every domain
    strict = hand_tables(min_vocab_count=3)["expert_stats"].set_index(["layer", "expert"])
    assert strict.top_tokens[(1, 0)] == ["t5"] and strict.top_token_shares[(1, 2)] == pytest.approx([1 / 3])


def test_layer_and_domain_stats_by_hand():
    t = hand_tables()
    ls = t["layer_stats"].set_index("layer")
    assert list(t["layer_stats"].columns) == COLUMNS["layer_stats"]
    r = ls.loc[1]
    assert (r.n_experts, r.top_k, r.tokens) == (4, 2, 6)
    assert r.load_cv == pytest.approx(load_cv([3, 2, 4, 2]))
    assert r.load_entropy_norm == pytest.approx(normalised_entropy([3, 2, 4, 2]))
    assert r.max_vio == pytest.approx(5 / 11)
    P = (P1 + 0.25) / 2  # mean softmax over the 6 tokens
    assert r.switch_aux == pytest.approx(4 * (np.array([3, 2, 4, 2]) / 6 * P).sum(), rel=1e-6)
    assert r.switch_aux == pytest.approx(1.85, rel=1e-6)
    assert r.router_entropy == pytest.approx((H1 + LN4) / 2, rel=1e-6)
    assert r.repetition_rate == pytest.approx(3 / 4)  # first choices 0 0 1 | 2 2 2
    assert r.domain_specialisation == pytest.approx(2.0)
    r3 = ls.loc[3]
    assert r3.max_vio == pytest.approx((6 - 7 / 4) / (7 / 4)) and r3.repetition_rate == 1.0
    assert r3.router_entropy == pytest.approx(LN4) and r3.switch_aux == pytest.approx(4 * (6 / 6 + 1 / 6) / 4)
    dl = t["domain_layer"]
    assert list(dl.columns) == COLUMNS["domain_layer"]
    a, b = at(dl, layer=1, domain="a"), at(dl, layer=1, domain="b")
    assert a.router_entropy == pytest.approx(H1, rel=1e-6) and b.router_entropy == pytest.approx(LN4, rel=1e-6)
    assert a.repetition_rate == .5 and b.repetition_rate == 1.0
    assert a.specialisation == pytest.approx(2) and b.specialisation == pytest.approx(2)
    assert a.mean_active == 2 and b.mean_active == pytest.approx(5 / 3) and a.tokens == 3
    assert at(dl, layer=3, domain="a").mean_active == pytest.approx(4 / 3)
    # owners: the most selective expert with load >= 0.5/E that is not a hub (ties: the lower id)
    assert (a.owner, b.owner) == (0, 3) and (a.selectivity, b.selectivity) == pytest.approx((2, 2))
    a3, b3 = at(dl, layer=3, domain="a"), at(dl, layer=3, domain="b")
    assert a3.owner == 1 and a3.selectivity == pytest.approx((1 / 3) / (1 / 6))  # expert 0 is a hub
    assert b3.owner == -1 and np.isnan(b3.selectivity)  # no eligible expert is used by b at layer 3
    assert r.domain_selectivity == pytest.approx(2) and (r.hubs, r3.hubs) == (0, 1) and r.bos_tokens == 0


def test_experts_per_token_position_coactivation_by_hand():
    t = hand_tables()
    ept = t["experts_per_token"]
    assert list(ept.columns) == COLUMNS["experts_per_token"]
    assert at(ept, layer=1, domain="a", n_active=2).fraction == 1
    assert at(ept, layer=1, domain="b", n_active=2).tokens == 2
    assert at(ept, layer=1, domain="b", n_active=1).fraction == pytest.approx(1 / 3)
    assert len(ept[ept.layer == 1]) == 3
    pp = t["position_profile"]
    assert list(pp.columns) == COLUMNS["position_profile"]
    assert pp[pp.layer == 1].bucket.tolist() == ["0", "1", "2", "7", "8+"]
    late = at(pp, layer=1, bucket="8+")  # tokens 4 {3,2} and 5 {2}
    assert late.tokens == 2 and late.max_share == 1 and late.specialisation == 2
    assert late.router_entropy == pytest.approx(LN4, rel=1e-6)
    assert at(pp, layer=1, bucket="0").router_entropy == pytest.approx(H1, rel=1e-6)
    co = t["coactivation"]
    assert list(co.columns) == COLUMNS["coactivation"] and len(co) == 2 * 16
    c1 = co[co.layer == 1]
    assert at(c1, expert_i=0, expert_j=1)["count"] == 2 and at(c1, expert_i=0, expert_j=1).rate == pytest.approx(2 / 3)
    assert at(c1, expert_i=1, expert_j=0).rate == 1 and at(c1, expert_i=2, expert_j=0).rate == .25
    assert at(c1, expert_i=2, expert_j=3).rate == .5 and at(c1, expert_i=2, expert_j=2)["count"] == 4
    assert np.isnan(at(co[co.layer == 3], expert_i=2, expert_j=0).rate)


# ---------------------------------------------------------------- hubs, specialists and BOS
# one MoE layer, E = 4, k = 2; document a: BOS + 2 tokens, document b: BOS + 6 tokens. Expert 0 is in every
# token's top-k (a hub); expert 1 serves a only, experts 2 and 3 serve b; BOS (id 1) always picks {0, 3}.
HUB_IDX = [[0, 3], [0, 1], [1, 0], [0, 3], [0, 2], [2, 0], [0, 2], [2, 0], [0, 3], [3, 0]]


def hub_tables(bos_token_id=1, **kw):
    n = len(HUB_IDX)
    router = {"indices": torch.tensor(np.array(HUB_IDX)[:, None, :], dtype=torch.int16),
              "weights": torch.full((n, 1, 2), .5), "n_active": torch.full((n, 1), 2, dtype=torch.uint8)}
    tokens = pd.DataFrame({"token_id": [1, 10, 11, 1, 12, 13, 14, 15, 16, 17], "token": [f"t{i}" for i in range(n)],
                           "position": [0, 1, 2, 0, 1, 2, 3, 4, 5, 6], "context": [0] * n,
                           "domain": ["a"] * 3 + ["b"] * 7})
    st = ExpertStats([0], 4, 2, bos_token_id=bos_token_id)
    st.update(router, tokens)
    return st.tables(min_vocab_count=1, **kw)


def test_hub_has_lift_e_over_k_but_selectivity_one_and_is_not_ranked():
    from routesae.analyze.specialists import rank_specialists

    t = hub_tables()
    ed, es = t["expert_domain"], t["expert_stats"].set_index("expert")
    # 8 tokens without BOS: a = 2 tokens, b = 6; hits: E0 8, E1 2 (a), E2 4 (b), E3 2 (b)
    for d in "ab":
        hub = at(ed, domain=d, expert=0)
        assert hub.share_topk == 1 and hub.lift_topk == pytest.approx(4 / 2) and hub.selectivity == pytest.approx(1)
    assert at(ed, domain="a", expert=1).selectivity == pytest.approx(1 / (2 / 8))          # 4 = N / N_a
    assert at(ed, domain="b", expert=2).selectivity == pytest.approx((4 / 6) / (4 / 8))    # 4/3
    assert at(ed, domain="b", expert=3).lift_topk == pytest.approx((2 / 6) / .5)
    np.testing.assert_allclose(es.base_topk, [1, 2 / 8, 4 / 8, 2 / 8])
    np.testing.assert_allclose(es.load, [8 / 16, 2 / 16, 4 / 16, 2 / 16])
    assert es.hub.tolist() == [True, False, False, False] and es.hub_domains.tolist() == [2, 1, 1, 0]
    # the lift cannot separate the hub from the owner of a (both 2 = E/k); selectivity can
    assert es.specialisation[0] == es.specialisation[1] == pytest.approx(2)
    np.testing.assert_allclose(es.selectivity, [1, 4, 4 / 3, 4 / 3])
    assert es.top_domain.tolist()[1:] == ["a", "b", "b"]
    ranked = rank_specialists(t["expert_stats"])
    assert ranked.expert.tolist() == [1, 2, 3]  # the hub is not ranked; the owner of a comes first
    # a stricter minimum load (1 x uniform = 0.25) drops experts 1 and 3 (load 0.125)
    assert rank_specialists(t["expert_stats"], min_load_ratio=1.0).expert.tolist() == [2]
    dl = t["domain_layer"].set_index("domain")
    assert dl.owner.tolist() == [1, 2] and dl.selectivity.tolist() == pytest.approx([4, 4 / 3])
    assert t["layer_stats"].hubs[0] == 1


def test_bos_is_left_out_and_reported_apart():
    with_bos, without = hub_tables(bos_token_id=1), hub_tables(bos_token_id=None)
    # BOS excluded: a has 2 tokens and expert 3 none of them; counted as tokens, a has 3 and expert 3 one
    assert at(with_bos["expert_domain"], domain="a", expert=3).hits_topk == 0
    a3 = at(without["expert_domain"], domain="a", expert=3)
    assert (a3.tokens, a3.hits_topk, a3.share_topk) == (3, 1, pytest.approx(1 / 3))
    assert (with_bos["layer_stats"].tokens[0], with_bos["layer_stats"].bos_tokens[0]) == (8, 2)
    assert (without["layer_stats"].tokens[0], without["layer_stats"].bos_tokens[0]) == (10, 0)
    # BOS inflates expert 3 into the owner of a (expert 1's load 1/10 is then below 0.5/E)
    assert at(without["domain_layer"], domain="a").owner == 3
    # position 0: with BOS counted it is a trivial E/k (both BOS tokens pick {0, 3}); left out, position 0 has
    # no token and the BOS bucket holds the two BOS tokens apart
    p_with = with_bos["position_profile"].set_index("bucket")
    p_without = without["position_profile"].set_index("bucket")
    assert p_without.loc["0", "tokens"] == 2 and p_without.loc["0", "max_share"] == 1
    assert p_without.loc["0", "specialisation"] == pytest.approx(4 / 2) and "BOS" not in p_without.index
    assert "0" not in p_with.index and p_with.loc["BOS", "tokens"] == 2
    assert p_with.loc["BOS", "specialisation"] == pytest.approx(2) and p_with.loc["1", "tokens"] == 2
    # selectivity at BOS: expert 3 (share 1, base 2/8; eligible) against the hub's 1
    assert p_with.loc["BOS", "selectivity"] == pytest.approx(1 / (2 / 8))
    # BOS has no first choice, so the pairs (x, BOS) and (BOS, x) are not counted: first choices (first slot)
    # a: 0 1 | b: 0 2 0 2 0 3 -> 6 pairs, none equal; counting BOS (0) too: 0 0 1 0 0 2 0 2 0 3 -> 2 of 9
    assert with_bos["layer_stats"].repetition_rate[0] == 0
    assert without["layer_stats"].repetition_rate[0] == pytest.approx(2 / 9)


def test_without_logits_entropy_is_nan():
    router, tokens = hand_case()
    del router["logits"]
    st = ExpertStats([1, 3], 4, 2)
    st.update(router, tokens)
    t = st.tables()
    assert t["layer_stats"].router_entropy.isna().all() and t["layer_stats"].switch_aux.isna().all()
    assert t["domain_layer"].router_entropy.isna().all() and t["position_profile"].router_entropy.isna().all()
    assert t["layer_stats"].load_cv.notna().all()


# ---------------------------------------------------------------- streaming and memory


def random_chunk(rng, n, n_ctx_start=0, vocab=50):
    E, L = 6, 2
    idx = np.stack([np.stack([rng.choice(E, 2, replace=False) for _ in range(n)]) for _ in range(L)], 1)
    idx[rng.random((n, L)) < .1, 1] = -1
    n_active = (idx >= 0).sum(-1)
    w = rng.random((n, L, 2)) * (idx >= 0)
    ctx = n_ctx_start + np.arange(n) // 7
    router = {"indices": torch.tensor(idx, dtype=torch.int16), "weights": torch.tensor(w, dtype=torch.float16),
              "n_active": torch.tensor(n_active, dtype=torch.uint8),
              "logits": torch.tensor(rng.normal(size=(n, L, E)), dtype=torch.float16)}
    tok = rng.integers(0, vocab, n)
    tokens = pd.DataFrame({"token_id": tok, "token": [f"w{i}" for i in tok], "position": np.arange(n) % 7 * 2,
                           "context": ctx, "domain": np.array(["x", "y", "z"])[ctx % 3]})
    return router, tokens


def test_streaming_one_chunk_equals_three():
    for chunks in [((0, 6),), ((0, 2), (2, 4), (4, 6)), ((0, 1), (1, 5), (5, 6))]:
        got = hand_tables(chunks)
        want = hand_tables()
        for name in want:
            pd.testing.assert_frame_equal(got[name], want[name], check_exact=False, rtol=1e-9)
    router, tokens = random_chunk(np.random.default_rng(0), 300)
    whole, parts = ExpertStats([0, 2], 6, 2), ExpertStats([0, 2], 6, 2)
    whole.update(router, tokens)
    for a, b in [(0, 100), (100, 103), (103, 300)]:  # cuts inside contexts
        parts.update({k: v[a:b] for k, v in router.items()}, tokens.iloc[a:b])
    tw, tp = whole.tables(min_vocab_count=3), parts.tables(min_vocab_count=3)
    for name in tw:
        assert list(tw[name].columns) == COLUMNS[name]
        pd.testing.assert_frame_equal(tp[name], tw[name], check_exact=False, rtol=1e-9)


def test_state_size_is_bounded():
    rng = np.random.default_rng(1)
    st = ExpertStats([0, 2], 6, 2, vocab_size=50)
    st.update(*random_chunk(rng, 200))
    size = st.state_nbytes()
    for i in range(1, 10):
        st.update(*random_chunk(rng, 200, n_ctx_start=1000 * i))
    assert st.state_nbytes() == size
    assert st.tables()["layer_stats"].tokens.iloc[0] == 2000


# ---------------------------------------------------------------- a real (tiny) store


def test_expert_tables_on_captured_store(tiny_ckpt, corpus_jsonl, tmp_path):
    from routesae.capture import CaptureConfig, capture

    torch.set_num_threads(1)
    cfg = CaptureConfig(model=str(tiny_ckpt("olmoe")), corpus=str(corpus_jsonl), out=str(tmp_path / "store"), ctx=32,
                        batch_size=4, layers="all", shard_mb=0.01, device="cpu", progress=False, max_tokens=500)
    store = Store(capture(cfg))
    assert len(store.shards) >= 2
    t = expert_tables(store, min_vocab_count=5)
    E, k, L = store.manifest["n_experts"], store.manifest["top_k"], store.moe_layers
    assert set(t) == set(COLUMNS)
    for name, cols in COLUMNS.items():
        assert list(t[name].columns) == cols and len(t[name]) > 0, name
    for name, df in t.items():  # every table round-trips through Parquet (list columns included)
        df.to_parquet(tmp_path / f"{name}.parquet", index=False)
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / f"{name}.parquet"), df, check_dtype=False)
    ed = t["expert_domain"]
    assert ed.share_topk.between(0, 1).all() and ed.share_top1.between(0, 1).all()
    tokens = store.tokens()
    bos = ((tokens.position == 0) & (tokens.token_id == store.manifest["bos_token_id"])).to_numpy()
    assert bos.sum() > 0  # the tiny tokenizer has a BOS token: left out of the tables, counted apart
    assert (t["layer_stats"].tokens == store.n_tokens - bos.sum()).all() and len(t["layer_stats"]) == len(L)
    assert (t["layer_stats"].bos_tokens == bos.sum()).all()
    assert "0" not in set(t["position_profile"].bucket) and "BOS" in set(t["position_profile"].bucket)
    np.testing.assert_allclose(t["expert_stats"].groupby("layer").load.sum(), 1.0)
    np.testing.assert_allclose(t["layer_stats"].switch_aux, k, rtol=0.5)  # near k for a random router
    assert t["layer_stats"].router_entropy.between(0, math.log(E)).all()
    assert t["coactivation"].rate.between(0, 1).all()
    # hits against a direct recount from the store (BOS left out)
    idx = torch.cat([store.load_router(s["index"])["indices"] for s in store.shards]).long().numpy()
    for li, layer in enumerate(L):
        for dom in tokens.domain.unique():
            rows = (tokens.domain == dom).to_numpy() & ~bos
            want = np.bincount(idx[rows, li][idx[rows, li] >= 0], minlength=E)
            got = ed[(ed.layer == layer) & (ed.domain == dom)].sort_values("expert")
            assert got.hits_topk.tolist() == want.tolist()
            assert (got.tokens == rows.sum()).all()
    # max_tokens stops early and keeps the tables consistent
    small = expert_tables(str(store.root), max_tokens=100)
    assert (small["layer_stats"].tokens == 100 - bos[:100].sum()).all()
    assert (small["layer_stats"].bos_tokens == bos[:100].sum()).all()
    assert small["experts_per_token"].groupby(["layer"]).tokens.sum().eq(100 - bos[:100].sum()).all()
