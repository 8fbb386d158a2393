"""What a version must equal: a from-scratch build of its snapshot's live passages on its own quantizer (the nightly
tests check every version of a delta chain and its compaction against it)."""

import faiss
import numpy as np

from pipeline.store.keys import keys_of
from pipeline.store.lexical import load_lexical
from pipeline.store.published import load_published
from pipeline.store.segments import KEYS_FILE, split_ids
from pipeline.store.snapshots import LiveEmbeddings, embedding_chain
from pipeline.store.storage import Storage


def live_embeddings(storage: Storage, snapshot: str) -> dict[str, np.ndarray]:
    """The snapshot's live vectors by passage id, its chain of deltas resolved."""
    [fingerprint] = storage.list_names(f"embeddings/{snapshot}")
    out = {}
    for _, ids, vectors in LiveEmbeddings(storage, embedding_chain(storage, snapshot, fingerprint)):
        out.update(zip(ids, vectors))
    return out


def matches_a_scratch_build(storage: Storage, version: str, snapshot: str, cache) -> None:
    """The version returns the same passages and scores as a from-scratch build of the snapshot's live passages on
    its quantizer at its nprobe; its segments' docstores, keys and FAISS ids agree; no dead row is live."""
    published = load_published(storage, version, str(cache))
    vectors = live_embeddings(storage, snapshot)
    ids, names = published.live_ids()
    assert sorted(names) == sorted(vectors) and len(ids) == published.vectors
    scratch = faiss.read_index(str(cache / published.manifest.quantizer))
    order = sorted(vectors)
    scratch.add(np.stack([vectors[p] for p in order]).astype(np.float32))
    faiss.ParameterSpace().set_index_parameter(scratch, "nprobe", int(published.manifest.nprobe))
    queries = np.stack([vectors[p] for p in order[::9]]).astype(np.float32)
    scores, found = published.search(queries, 10)
    expected_scores, expected = scratch.search(queries, 10)
    assert np.allclose(scores, expected_scores, atol=1e-4)
    got = [published.passages(row).column("id").to_pylist() for row in found]
    want = [[order[j] for j in row] for row in expected]
    assert np.mean([g == w for g, w in zip(got, want)]) >= 0.95  # equal up to ties in score
    lists = faiss.extract_index_ivf(published.index).invlists
    stored = np.concatenate(
        [
            faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
            for i in range(lists.nlist)
            if lists.list_size(i)
        ]
    )
    seqs, rows = split_ids(stored)
    for segment in published.manifest.segments:
        assert sorted(rows[seqs == segment.seq].tolist()) == list(range(segment.rows))
        table = published.docstores[segment.seq]
        keys = np.load(cache / segment.name / KEYS_FILE)
        assert (keys == keys_of(table.column("id").to_pylist())).all()
        assert published.stored[segment.seq].shape == (segment.rows, published.d)  # refine's vectors, carried
    # The BM25 index holds exactly the live passages, once each, with their current text (deletes and edits
    # applied), and holds no text itself: a hit's text is the live docstore row's.
    lexical = load_lexical(storage, published.manifest, str(cache))
    keys = lexical.keys()
    assert len(keys) == len(names) and set(keys.tolist()) == set(keys_of(names).tolist())
    live = published.passages(ids)
    texts = dict(zip(live.column("id").to_pylist(), live.column("text").to_pylist()))
    revised = {pid for pid, text in texts.items() if text.endswith(" revised")}
    found = lexical.search(["revised"], len(names))[0]
    assert {hit["id"] for hit in found} == revised and all(hit["text"] == texts[hit["id"]] for hit in found)
