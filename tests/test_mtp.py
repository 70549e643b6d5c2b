"""Multi-token prediction (DeepSeek-V3 §2.2): the combine step as eq. 21-23, the labels against a brute-force
reference, the loss and its gradients, parameter counts, old configs unchanged; self-speculative decoding: greedy
identical to plain decoding (batches with left padding, both cache paths, several depths), sampling with the
model's distribution (chi-square), the acceptance rule, the routing trace and refused inputs."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import dsv3
from dsv3.generate import generate_tokens, probabilities
from dsv3.model import count_params
from dsv3.speculative import DRAFT_VOCAB, judge
from dsv3.trace import Routes

SMALL = dict(vocab_size=32, dim=32, n_layers=2, n_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
             v_head_dim=8, moe_inter_dim=16, dense_inter_dim=48, max_seq_len=96)


pytestmark = pytest.mark.usefixtures("one_thread")


def make(seed=0, scale=1.0, **overrides) -> dsv3.DeepSeekV3:
    """A small MLA + MoE model; scale > 1 makes attention, routing and the logits far from uniform."""
    torch.manual_seed(seed)
    model = dsv3.DeepSeekV3(dsv3.ModelConfig.preset("tiny", **{**SMALL, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.mul_(scale)
    return model


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


# --- the module and the objective ---

def test_combine_step_is_eq_21_to_23_by_hand():
    model = make(n_mtp_layers=1, scale=5)
    layer, eps, d = model.mtp[0], model.cfg.norm_eps, model.cfg.dim
    torch.manual_seed(1)
    h, emb = torch.randn(2, 9, d), torch.randn(2, 9, d)
    cos, sin = model.rope_cos[:9], model.rope_sin[:9]
    # eq. 21, h'_i^k = M_k [RMSNorm(h_i^{k-1}); RMSNorm(Emb(t_{i+k}))]: a (d, 2d) matrix times a concatenation is
    # the sum of its two column blocks' products; DeepSeek's weights put the embedding's half first
    M = layer.eh_proj.weight
    x = rms(emb, layer.enorm.weight, eps) @ M[:, :d].t() + rms(h, layer.hnorm.weight, eps) @ M[:, d:].t()
    x = layer.block(x, cos, sin)[0]  # eq. 22: one Transformer block (MLA + MoE)
    ref = rms(x, layer.norm.weight, eps)  # the shared head's norm; eq. 23 is then model.head(ref)
    with torch.no_grad():
        got = layer(h, emb, cos, sin)[0]
        assert torch.allclose(got, ref, atol=1e-5)
        # each half is RMS-normalised (its scale does not matter) and read by its own columns of M_k
        assert torch.allclose(layer(3 * h, 2 * emb, cos, sin)[0], got, atol=1e-4)
        M[:, d:] = 0  # the hidden state's columns: h no longer matters, the embedding still does
        assert torch.allclose(layer(torch.randn_like(h), emb, cos, sin)[0], layer(h, emb, cos, sin)[0])
        assert not torch.allclose(layer(h, torch.randn_like(emb), cos, sin)[0], layer(h, emb, cos, sin)[0])
    assert isinstance(layer.block.ffn, dsv3.model.MoE)
    # shared, not copied: the MTP modules own no embedding or head
    assert not any("embed" in n or n.startswith("head") for n, _ in model.mtp.named_parameters())


def depth_logits(model, tokens):
    """Per depth k, logits (B, T - k, V) of the chain at every position: depth k at i reads h^{k-1}_i, Emb(t_{i+k})."""
    T = tokens.shape[1]
    h, emb, out = model(tokens).hidden, model.embed(tokens), []
    for k, layer in enumerate(model.mtp[:T - 1], start=1):  # depths with a position inside the window
        h = layer(h[:, :T - k], emb[:, k:], model.rope_cos[:T - k], model.rope_sin[:T - k], losses=False)[0]
        out.append(model.head(h))
    return out


def test_labels_against_a_brute_force_reference():
    """Depth k at position i is scored on t_{i+k+1}, from a run that sees only t_0 .. t_{i+k}; nothing past the end
    of the sequence is scored, and ignored targets (-100) are not scored at any depth."""
    D = 2
    model = make(n_mtp_layers=D, scale=3, mtp_loss_weight=0.7)
    torch.manual_seed(2)
    seq = torch.randint(0, 32, (2, 9))
    x, y = seq[:, :-1], seq[:, 1:].clone()
    y[1, 5] = -100  # an ignored target (t_6 of row 1)
    T = x.shape[1]
    with torch.no_grad():
        out = model(x, y)
        per_depth = []
        for k in range(1, D + 1):
            losses = []
            for i in range(T - k):  # positions with a token t_{i+k+1} inside the window
                target = seq[:, i + k + 1]
                logits = depth_logits(model, x[:, :i + k + 1])[k - 1][:, i]  # the prefix t_0 .. t_{i+k} only
                keep = y[:, i + k] != -100
                losses += [F.cross_entropy(logits[b:b + 1], target[b:b + 1]) for b in range(2) if keep[b]]
            per_depth.append(torch.stack(losses).mean())
        ref = 0.7 / D * sum(per_depth)
    assert len(losses) == 2 * (T - D) - 1  # the last depth scores T - D positions per row, minus the ignored one
    assert torch.allclose(out.mtp_loss, ref, atol=1e-5)
    assert torch.allclose(out.loss, out.ce_loss + out.aux_loss + out.z_loss + out.mtp_loss)


def test_fused_and_plain_heads_agree_in_loss_and_gradients():
    model = make(n_mtp_layers=2, scale=2, tie_embeddings=True).train()
    torch.manual_seed(3)
    x, y = torch.randint(0, 32, (3, 12)), torch.randint(0, 32, (3, 12))
    grads = []
    for fused in (True, False):
        model.zero_grad()
        out = model(x, y, return_logits=not fused)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        if fused:
            first = out
    assert torch.allclose(first.mtp_loss, out.mtp_loss, atol=1e-5) and first.mtp_loss > 0
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4), n
    assert grads[0]["mtp.1.eh_proj.weight"].abs().sum() > 0  # the last depth trains
    # the MTP loss alone reaches the shared embedding/head and the trunk (the denser signal)
    model.zero_grad()
    model(x, y, return_logits=False).mtp_loss.backward()
    assert model.embed.weight.grad.abs().sum() > 0 and model.layers[0].attn.wkv_a.weight.grad.abs().sum() > 0


def test_zero_layers_is_the_default_and_changes_nothing(tmp_path):
    for name in dsv3.PRESETS:
        assert dsv3.ModelConfig.preset(name).n_mtp_layers == 0
    a, b = make(), make(n_mtp_layers=1)
    assert a.mtp is None and not any(k.startswith("mtp.") for k in a.state_dict())
    x, y = torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (2, 8))
    with torch.no_grad():
        out = a(x, y)
        assert out.mtp_loss == 0 and torch.equal(out.loss, out.ce_loss + out.aux_loss + out.z_loss)
        b.load_state_dict({**b.state_dict(), **a.state_dict()})  # the same trunk: the same main logits
        assert torch.equal(a(x).logits, b(x).logits)
    # a checkpoint written before the field existed loads as n_mtp_layers = 0
    path = dsv3.save_checkpoint(tmp_path, a, step=1)
    meta = (path / "meta.json").read_text().replace('"n_mtp_layers": 0, ', "").replace(', "n_mtp_layers": 0', "")
    (path / "meta.json").write_text(meta.replace('"mtp_loss_weight": 0.3, ', ""))
    assert "n_mtp_layers" not in (path / "meta.json").read_text()
    from dsv3.checkpoint import load_weights

    load_weights(a, path)
    assert dsv3.load_checkpoint(path).cfg.n_mtp_layers == 0
    with pytest.raises(ValueError, match="n_mtp_layers must be >= 0"):
        dsv3.ModelConfig.preset("tiny", n_mtp_layers=-1)


def test_count_params_reports_the_mtp_modules_apart():
    plain = count_params(make())
    counts = count_params(make(n_mtp_layers=2))
    mtp = sum(p.numel() for p in make(n_mtp_layers=2).mtp.parameters())
    assert counts["mtp"] == mtp and counts["total"] == plain["total"] + mtp
    assert counts["inference_total"] == plain["total"] and counts["inference_active"] == plain["active"]
    cfg = dsv3.ModelConfig.preset("tiny", **SMALL)
    unused = (cfg.n_routed_experts - cfg.n_activated_experts) * 3 * cfg.dim * cfg.moe_inter_dim
    assert counts["mtp_active"] == mtp - 2 * unused  # each depth's MoE runs top-k of its routed experts
    assert counts["active"] == plain["active"] + counts["mtp_active"]
    assert "mtp" not in plain


# --- self-speculative decoding ---

def markov(n, T, g):
    """Sequences of a fixed random chain: each token has two successors, the first with probability 0.7."""
    succ = torch.randint(0, 32, (32, 2), generator=torch.Generator().manual_seed(0))
    x = torch.zeros(n, T + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, 32, (n,), generator=g)
    for t in range(T):
        x[:, t + 1] = succ[x[:, t], (torch.rand(n, generator=g) < 0.7).long()]
    return x


@pytest.fixture(scope="module")
def trained():
    """A D = 2 model trained briefly on the chain: its drafts are often, not always, right (a random MTP module is
    almost never right, and speculation would then never keep a draft)."""
    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(dsv3.ModelConfig.preset("tiny", **SMALL, n_mtp_layers=2))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        b = markov(16, 24, g)
        model(b[:, :-1], b[:, 1:], return_logits=False).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def run(model, tokens, n, key_mask=None, **kw):
    drafts = []
    ids = torch.stack(list(generate_tokens(model, tokens, n, key_mask=key_mask, drafts=drafts, **kw)), 1)
    return ids, (torch.stack(drafts, 1) if drafts else None)


def first_module_only(trained):
    """The trained model with only its first MTP module."""
    model = dsv3.DeepSeekV3(trained.cfg.replace(n_mtp_layers=1)).eval()
    model.load_state_dict({k: v for k, v in trained.state_dict().items() if not k.startswith("mtp.1.")})
    return model


@pytest.mark.parametrize("depths, n_drafts, draft_vocab", [(1, None, 0), (2, None, 0), (2, None, 8), (1, 3, 12),
                                                            (2, 3, 8)])
def test_greedy_speculative_is_identical_to_plain_greedy(trained, depths, n_drafts, draft_vocab):
    """Any number of drafts (D = trained depths, or more by reusing the last module) and any draft vocabulary."""
    model = trained if depths == 2 else first_module_only(trained)
    g = torch.Generator().manual_seed(5)
    accepted = rejected = 0
    for B, P in ((1, 3), (1, 8), (2, 6), (2, 11)):
        prompt = markov(B, P - 1, g)
        key_mask = torch.ones(B, P, dtype=torch.bool)
        if B == 2:
            key_mask[1, :P // 2] = False  # row 1 is a shorter prompt, left-padded
            prompt[1, :P // 2] = 0
        for cache in ("absorbed", "naive"):
            plain, _ = run(model, prompt, 30, key_mask, temperature=0, cache=cache)
            spec, drafts = run(model, prompt, 30, key_mask, temperature=0, cache=cache, speculative=True,
                               n_drafts=n_drafts, draft_vocab=draft_vocab)
            assert torch.equal(spec, plain), (B, P, cache)
            has = drafts >= 0
            accepted += (has & (drafts == spec)).sum().item()
            rejected += (has & (drafts != spec)).sum().item()
            if draft_vocab:  # the drafts come from the K most frequent tokens only (here: by id)
                assert (drafts[has] < draft_vocab).all()
    assert accepted > 20 and rejected > 5  # both branches ran, so rollbacks happened


def test_draft_vocabulary_ranks_by_stored_counts_and_is_built_once(trained):
    """The draft's head rows are the K most frequent tokens' (by the stored training counts; by id without them),
    built once per model and rebuilt only when the head's weights change."""
    from dsv3.speculative import draft_head, vocabulary_ranking

    model = first_module_only(trained)
    assert torch.equal(vocabulary_ranking(model), torch.arange(32))  # no counts: merge rank = id
    counts = torch.zeros(32)
    counts[[7, 3, 30, 12]] = torch.tensor([5.0, 9.0, 9.0, 1.0])
    model.token_counts = counts
    assert vocabulary_ranking(model)[:5].tolist() == [3, 30, 7, 12, 0]  # ties: the lower id first
    with torch.inference_mode():
        ids, w = draft_head(model, 4)
        assert ids.tolist() == [3, 30, 7, 12] and torch.equal(w, model.head.weight[ids])
        assert draft_head(model, 4)[1] is w  # kept, not rebuilt per token
        for k in (0, 32, 64):  # all of the vocabulary: the head itself
            assert draft_head(model, k)[0] is None and draft_head(model, k)[1] is model.head.weight
    with torch.no_grad():
        model.head.weight.mul_(2)
    with torch.inference_mode():
        assert torch.equal(draft_head(model, 4)[1], model.head.weight[ids])  # the weights changed: rebuilt
    # drafts never leave the vocabulary, and greedy output is still plain greedy's
    prompt = markov(1, 5, torch.Generator().manual_seed(2))
    plain, _ = run(model, prompt, 20, temperature=0)
    spec, drafts = run(model, prompt, 20, temperature=0, speculative=True, draft_vocab=4)
    assert torch.equal(spec, plain)
    assert set(drafts[drafts >= 0].tolist()) <= {3, 30, 7, 12}


def test_speculative_trace_routes_exactly_the_kept_tokens(trained):
    """The routing trace skips the positions of rejected drafts: it equals one forward over the final sequence."""
    prompt = markov(2, 6, torch.Generator().manual_seed(8))
    key_mask = torch.ones(2, 7, dtype=torch.bool)
    key_mask[0, :2] = False
    trace = []
    ids, drafts = run(trained, prompt, 24, key_mask, temperature=1.0, seed=3, trace=trace, speculative=True)
    assert 0 < (drafts == ids).sum() < (drafts >= 0).sum()  # some drafts kept, some rejected
    got_ids, got_gates = (torch.cat(t, dim=2) for t in zip(*trace, strict=True))
    full = torch.cat([prompt, ids], 1)
    cache = trained.new_cache(2, full.shape[1], absorb=False)
    cache.key_mask = torch.cat([key_mask, torch.ones_like(ids, dtype=torch.bool)], 1)
    routes = Routes.attach(trained.moe_layers(), 2)
    try:
        with torch.inference_mode():
            trained(full, cache=cache)
        want_ids, want_gates = Routes.stack(routes, slice(None))
    finally:
        Routes.detach(trained.moe_layers(), routes)
    assert got_ids.shape[2] == full.shape[1] and torch.equal(got_ids, want_ids)
    assert torch.allclose(got_gates, want_gates, atol=1e-5)


def test_generate_and_stream_with_speculative_report_drafts():
    model = make(seed=1, scale=3, vocab_size=50257, n_mtp_layers=2, tie_embeddings=False)
    kw = dict(max_new_tokens=20, temperature=0)
    plain = dsv3.generate(model, ["To be", "or not"], return_trace=True, **kw)
    spec = dsv3.generate(model, ["To be", "or not"], return_trace=True, speculative=True, **kw)
    for p, s in zip(plain, spec, strict=True):
        assert s.tokens == p.tokens and s.text == p.text and p.drafts is None and p.acceptance_rate is None
        assert len(s.drafts) == len(s.tokens) - s.n_prompt and s.drafted >= 10  # all but the first and last
        assert s.drafts[0] is None and s.accepted == sum(d == t for d, t in zip(s.drafts, s.tokens[s.n_prompt:],
                                                                                  strict=True))
        assert s.acceptance_rate == s.accepted / s.drafted
        assert torch.equal(s.expert_ids, p.expert_ids)
        assert s.draft_vocab == DRAFT_VOCAB < 50257 and p.draft_vocab is None  # the default K: a part of the head
        by = s.acceptance_by_depth()  # per draft position: depth 1 drafts every round, depth 2 after a keep
        assert set(s.draft_depths) <= {None, 1, 2} and s.draft_depths[0] is None and 1 <= len(by) <= 2
        for depth, rate in enumerate(by, start=1):
            kept = [d == t for d, k, t in zip(s.drafts, s.draft_depths, s.tokens[s.n_prompt:], strict=True)
                    if k == depth]
            assert rate == sum(kept) / len(kept)
        assert [d is None for d in s.drafts] == [k is None for k in s.draft_depths]
    assert "".join(dsv3.stream(model, "To be", speculative=True, **kw)) == plain[0].text
    full = dsv3.generate(model, "To be", return_trace=True, speculative=True, draft_vocab=0, n_drafts=3, **kw)
    assert full.tokens == plain[0].tokens and full.draft_vocab == 50257 and len(full.acceptance_by_depth()) <= 3


@pytest.mark.slow
@pytest.mark.parametrize("draft_vocab", [0, 3])
def test_sampling_follows_the_models_distribution(draft_vocab):
    """Many rows of one prompt: the joint distribution of the first 3 new tokens (t_1, t_2, t_3) with speculation
    (t_2 and t_3 are drafted) matches the model's exact one, computed by enumeration; so does plain sampling.
    With a draft vocabulary of 3 of the 6 tokens, the draft never proposes the other 3 (q = 0 there), and the
    residual max(0, p - q) still gives them their probability."""
    V, top_k, temperature = 6, 5, 0.9
    model = make(seed=4, scale=4, vocab_size=V, n_mtp_layers=1)
    prompt = torch.tensor([[1, 5, 2]])
    rows = 12000
    # exact: p(t1) p(t2 | t1) p(t3 | t1, t2) over all V^3 continuations
    cont = torch.cartesian_prod(*[torch.arange(V)] * 3)
    with torch.inference_mode():
        logits = model(torch.cat([prompt.expand(len(cont), -1), cont[:, :2]], 1)).logits[:, 2:]
    p = torch.stack([probabilities(logits[:, j], temperature, top_k) for j in range(3)], 1)
    exact = p.gather(-1, cont[:, :, None])[..., 0].prod(-1).double()
    assert torch.allclose(exact.sum(), torch.tensor(1.0, dtype=torch.float64))

    def chi2(ids):
        counts = torch.bincount((ids[:, 0] * V + ids[:, 1]) * V + ids[:, 2], minlength=V ** 3).double()
        expected = exact * rows
        big = expected >= 5  # cells expected below 5 are pooled into one
        obs = torch.cat([counts[big], counts[~big].sum()[None]])
        exp = torch.cat([expected[big], expected[~big].sum()[None]])
        stat = ((obs - exp) ** 2 / exp).sum().item()
        df = len(obs) - 1
        z = 3.72  # the 1e-4 quantile of the normal: Wilson-Hilferty approximation of the chi-square's
        return stat, df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3

    batch = prompt.expand(rows, -1)
    sampling = dict(temperature=temperature, top_k=top_k, seed=11)
    plain, _ = run(model, batch, 3, **sampling)
    spec, drafts = run(model, batch, 4, speculative=True, draft_vocab=draft_vocab, **sampling)  # t_3 gets a draft
    spec, drafts = spec[:, :3], drafts[:, :3]
    stat, limit = chi2(spec)
    assert stat < limit, (stat, limit)
    assert chi2(plain)[0] < limit
    acc = (drafts[:, 1:] == spec[:, 1:]).double().mean().item()  # t_2 and t_3 each had a draft
    assert (drafts[:, 1:] >= 0).all() and 0.15 < acc < 0.85
    if draft_vocab:
        assert drafts[:, 1:].max() < draft_vocab and (spec >= draft_vocab).any()
    # the test has power: taking every draft (what a missing rejection step would do) is far off
    wrong = spec.clone()
    wrong[:, 1] = drafts[:, 1]
    assert chi2(wrong)[0] > 3 * limit


def test_acceptance_rule_keeps_p_for_accepted_rejected_and_bonus_tokens():
    """judge on one (p, q) pair for many rows: the first kept token is distributed as p_0 whether its draft was kept
    or replaced, and the bonus token (after an accepted draft) as p_1; greedy keeps the argmax."""
    torch.manual_seed(0)
    V, rows = 5, 200000
    logits = torch.randn(1, 2, V).mul(2).expand(rows, -1, -1)
    q = torch.softmax(torch.randn(1, 1, V) * 2, -1).expand(rows, -1, -1)
    g = torch.Generator().manual_seed(0)
    d = torch.multinomial(q[:, 0], 1, generator=g)
    kept, fix = judge(logits, q, d, 1.0, generator=g)
    first = torch.where(kept > 0, d[:, 0], fix[:, 0])
    p = torch.softmax(logits[0], -1)
    accept = (torch.minimum(p[0], q[0, 0]).sum()).item()  # P(accept) = sum min(p, q)
    assert abs(kept.double().mean().item() - accept) < 0.01
    for got, want in ((first, p[0]), (fix[kept > 0, 1], p[1])):
        freq = torch.bincount(got, minlength=V).double() / len(got)
        assert (freq - want).abs().max() < 0.01, (freq, want)
    kept, fix = judge(logits[:4], None, logits[:4, 0].argmax(-1, keepdim=True), 0)
    assert kept.tolist() == [1] * 4 and torch.equal(fix, logits[:4].argmax(-1))


def test_speculation_without_mtp_layers_or_with_no_cache_is_refused():
    model, tokens = make(), torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="n_mtp_layers=0"):
        generate_tokens(model, tokens, 4, speculative=True)
    with pytest.raises(ValueError, match="n_mtp_layers=0"):
        dsv3.generate(model, "hi", 4, speculative=True)
    mtp = make(n_mtp_layers=1)
    with pytest.raises(ValueError, match="cache='none'"):
        generate_tokens(mtp, tokens, 4, speculative=True, cache="none")
    with pytest.raises(ValueError, match="speculative must be True or False"):
        generate_tokens(mtp, tokens, 4, speculative="yes")


def test_speculative_edges_zero_tokens_and_the_longest_generation(trained):
    tokens = markov(1, 3, torch.Generator().manual_seed(3))
    assert list(generate_tokens(trained, tokens, 0, temperature=0, speculative=True)) == []
    n = trained.cfg.max_seq_len - tokens.shape[1]  # fills max_seq_len: drafts stop short of the end
    plain, _ = run(trained, tokens, n, temperature=0)
    spec, _ = run(trained, tokens, n, temperature=0, speculative=True)
    assert torch.equal(plain, spec)


# --- training with MTP: logged, resumed exactly, CLI, bf16, compiled blocks, data parallel ---

needs_corpus = pytest.mark.skipif(not os.environ.get("DSV3_CORPUS"), reason="needs DSV3_CORPUS (Tiny Shakespeare)")
FAST = dict(dim=32, n_layers=2, n_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            moe_inter_dim=32, bias_update_speed=1e-2, n_mtp_layers=1)
TRAIN = dict(preset="tiny", batch_size=4, seq_len=32, lr=3e-3, warmup=2, threads=1, eval_interval=1000,
             eval_batches=1, progress=False)


@pytest.fixture
def data_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DSV3_DATA_DIR", str(tmp_path_factory.getbasetemp() / "dsv3-cache"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


@needs_corpus
def test_training_logs_mtp_and_resumes_it_exactly(tmp_path, data_dir):
    kw = dict(TRAIN, model_overrides=FAST, grad_accum=2, decay_steps=8)
    full = dsv3.train(steps=8, out=str(tmp_path / "full"), **kw)
    part = dsv3.train(steps=5, out=str(tmp_path / "part"), **kw)
    rest = dsv3.train(resume=tmp_path / "part", steps=3, progress=False)
    for key in ("loss", "ce", "aux", "z", "mtp", "grad_norm", "expert_load"):
        assert rest.column(key) == full.column(key), key  # exactly equal
    r = full.train[-1]
    assert r["mtp"] > 0 and r["loss"] == pytest.approx(r["ce"] + r["aux"] + r["z"] + r["mtp"], rel=1e-5)
    assert part.train[0]["mtp"] == pytest.approx(0.3 * math.log(50257), rel=0.05)  # lambda x CE at init
    a, b = full.model.state_dict(), rest.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and any(k.startswith("mtp.0.block.") for k in a)
    # the MTP block's router bias follows its own load, like the trunk's
    assert full.model.mtp[0].block.ffn.gate.bias.abs().sum() > 0
    assert "mtp" in dsv3.History.from_jsonl(tmp_path / "full" / "metrics.jsonl").train[0]
    plain = dsv3.train(steps=1, out=str(tmp_path / "plain"), model_overrides={**FAST, "n_mtp_layers": 0}, **TRAIN)
    assert "mtp" not in plain.train[0]  # runs without MTP log what they always logged


@needs_corpus
def test_cli_train_mtp_flags_then_speculative_generate(tmp_path, data_dir, capsys):
    from dsv3.__main__ import main

    out = tmp_path / "run"
    common = ["--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--no-progress", "--threads", "1"]
    fast = [f"--set={k}={v}" for k, v in FAST.items() if k != "n_mtp_layers"]
    assert main(["train", "--preset", "tiny", "--steps", "2", "--out", str(out), "--mtp-layers", "2",
                 "--mtp-weight", "0.5", *common, *fast]) == 0
    loaded = dsv3.load_checkpoint(out)
    cfg = loaded.cfg
    assert (cfg.n_mtp_layers, cfg.mtp_loss_weight, cfg.dim) == (2, 0.5, 32)
    # the training split's token counts came with the checkpoint: the draft vocabulary ranks by them
    from dsv3.data import load_tokens, split_tokens

    train_tok = torch.from_numpy(split_tokens(load_tokens(os.environ["DSV3_CORPUS"]), 0.1)[0].astype("int64"))
    assert torch.equal(loaded.token_counts, torch.bincount(train_tok, minlength=50257).double())
    assert main(["train", "--resume", str(out), "--steps", "1", "--mtp-layers", "1", *common]) == 2
    assert "cannot be combined with --resume" in capsys.readouterr().err
    args = ["generate", "--checkpoint", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "10", "--temperature",
            "0", "--threads", "1"]
    capsys.readouterr()
    assert main(args) == 0
    want = capsys.readouterr().out
    assert main(args + ["--speculative"]) == 0 and capsys.readouterr().out == want
    assert main(args + ["--speculative", "--stream", "--naive-cache"]) == 0 and capsys.readouterr().out == want
    assert main(args + ["--speculative", "--draft-vocab", "64", "--drafts", "3"]) == 0
    assert capsys.readouterr().out == want
    assert main(args + ["--speculative", "--draft-vocab", "-1"]) == 2
    assert capsys.readouterr().err.startswith("error: --draft-vocab must be an int >= 0")
    plain = tmp_path / "plain"
    dsv3.save_checkpoint(plain, make(vocab_size=50257), step=0)
    assert main(["generate", "--checkpoint", str(plain), "--speculative", "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --speculative") and "n_mtp_layers=0" in err and err.count("\n") == 1


def test_bf16_autocast_and_gradient_accumulation():
    model = make(n_mtp_layers=2, scale=2).train()
    torch.manual_seed(5)
    x, y = torch.randint(0, 32, (4, 16)), torch.randint(0, 32, (4, 16))
    ref = model(x, y, return_logits=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, y, return_logits=False)
    assert torch.isfinite(out.loss) and out.mtp_loss.item() == pytest.approx(ref.mtp_loss.item(), rel=3e-2)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # two micro-batches of 2 rows each accumulate the gradient of the 4-row batch (the balance loss is a
    # statistic of the whole batch, so it is switched off for this comparison)
    model.cfg = model.cfg.replace(aux_loss_coef=0.0)
    full = {n: g.clone() for n, g in _grads(model, [(x, y)]).items()}
    acc = _grads(model, [(x[:2], y[:2]), (x[2:], y[2:])])
    for n in full:
        assert torch.allclose(full[n], acc[n], atol=1e-5, rtol=1e-4), n


def _grads(model, batches):
    model.zero_grad()
    for x, y in batches:
        (model(x, y, return_logits=False).loss / len(batches)).backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.slow
def test_compiled_blocks_compute_the_eager_mtp_loss():
    model = make(n_mtp_layers=1, scale=2).train()
    torch.manual_seed(6)
    x, y = torch.randint(0, 32, (2, 16)), torch.randint(0, 32, (2, 16))
    eager = model(x, y, return_logits=False)
    model.compile_blocks()
    compiled = model(x, y, return_logits=False)
    assert torch.allclose(compiled.mtp_loss, eager.mtp_loss, atol=1e-4)
    assert torch.allclose(compiled.loss, eager.loss, atol=1e-4)
    compiled.loss.backward()
    assert model.mtp[0].block.attn.wo.weight.grad.abs().sum() > 0


@needs_corpus
@pytest.mark.slow
def test_two_ranks_train_mtp_like_one_process(tmp_path, data_dir):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = dict(TRAIN, batch_size=8, eval_batches=1)
    ref = dsv3.train(model_overrides=FAST, steps=4, grad_accum=4, out=str(tmp_path / "ref"), **run)
    args = ["--preset=tiny", "--steps=4", f"--out={tmp_path / 'run'}", "--batch-size=8", "--seq-len=32", "--lr=3e-3",
            "--warmup=2", "--eval-interval=1000", "--eval-batches=1", "--threads=1", "--no-progress",
            "--grad-accum=2", "--mtp-layers=1", *[f"--set={k}={v}" for k, v in FAST.items() if k != "n_mtp_layers"]]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                        "dsv3", "train", *args], cwd=root, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    got = dsv3.History.from_jsonl(tmp_path / "run" / "metrics.jsonl")
    for key in ("loss", "mtp"):
        assert got.column(key) == pytest.approx(ref.column(key), abs=1e-5), key
    b = dsv3.load_checkpoint(tmp_path / "run").mtp[0].block.ffn.gate.bias
    assert b.abs().sum() > 0 and torch.allclose(b, ref.model.mtp[0].block.ffn.gate.bias, atol=1e-6)


@pytest.mark.slow
def test_compiled_speculative_greedy_is_identical_to_plain_greedy(trained):
    """compile=True: the verifying and drafting steps run compiled over the whole cache under a mask, where slots
    past the position hold the latents of rejected drafts; D = 1, 2 (trained) and 3 (the last module reused), with
    and without a draft vocabulary."""
    g = torch.Generator().manual_seed(5)
    rejected = 0
    cases = [(trained, None, 0, ((1, 3), (1, 8), (2, 6), (2, 11))), (trained, 3, 8, ((2, 11),)),
             (first_module_only(trained), 1, 12, ((2, 11),))]
    for model, n_drafts, draft_vocab, shapes in cases:
        for B, P in shapes:
            prompt = markov(B, P - 1, g)
            key_mask = torch.ones(B, P, dtype=torch.bool)
            if B == 2:
                key_mask[1, :P // 2] = False
            plain, _ = run(model, prompt, 30, key_mask, temperature=0)
            spec, drafts = run(model, prompt, 30, key_mask, temperature=0, speculative=True, compile=True,
                               n_drafts=n_drafts, draft_vocab=draft_vocab)
            assert torch.equal(spec, plain), (B, P, n_drafts)
            rejected += ((drafts >= 0) & (drafts != spec)).sum().item()
    assert rejected > 0
