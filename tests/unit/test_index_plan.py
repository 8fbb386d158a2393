"""The build stage's planning and arithmetic without I/O: sampling, sizing, build and compaction plans, shard
groups, top-k merges, code copying and the delta gate (FAISS in memory, no store, no Ray)."""

import numpy as np
import pytest

from pipeline.config import IndexConfig
from pipeline.errors import PipelineError
from pipeline.index.plan import plan_build, plan_compaction, plan_groups, plan_index, sample_positions
from pipeline.index.quality import merge_topk, recall_at, refine_merged


def test_sample_is_uniform_across_shards_of_different_sizes_and_distributions():
    rows = [5000, 50, 2000, 10, 3000]
    picks = sample_positions(rows, 1000, seed=7)
    counts = [len(p) for p in picks]
    assert sum(counts) == 1000 and all(c > 0 for c in counts[:3] + counts[4:])
    for count, n in zip(counts, rows):
        assert abs(count / 1000 - n / sum(rows)) < 0.05  # proportional: not the first N
    assert all(len(set(p.tolist())) == len(p) and (p < n).all() for p, n in zip(picks, rows))
    assert all((a == b).all() for a, b in zip(picks, sample_positions(rows, 1000, seed=7)))
    assert any((a != b).any() for a, b in zip(picks, sample_positions(rows, 1000, seed=8)) if len(a) == len(b))


def test_sample_covers_shards_holding_different_distributions():
    """Shards hold different clusters (psgs_w100 is ordered by article); a first-N sample would see one."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16)) * 100
    shards = [centers[i] + rng.normal(size=(500, 16)) for i in range(4)]
    picks = sample_positions([500] * 4, 200, seed=1)
    sample = np.concatenate([s[p] for s, p in zip(shards, picks)])
    nearest = np.argmin(((sample[:, None, :] - centers[None]) ** 2).sum(-1), axis=1)
    assert np.bincount(nearest, minlength=4).min() >= 30  # each distribution ~50 of the 200


def test_plan_sizes_training_and_memory():
    config = IndexConfig(train_size=100_000, queries=1000)
    plan = plan_index("OPQ64_256,IVF65536,PQ64", 768, 21_000_000, 100_000, config)
    assert plan.nlist == 65536 and plan.train_size == 100_000  # 39 x 65536 wanted, capped
    assert plan.code_bytes == 64 + 8
    assert 1.4e9 < plan.memory_bytes < 3e9
    small = plan_index("IVF16,PQ8x4", 32, 1000, 100, IndexConfig())
    assert small.train_size == 1000 - small.queries and small.queries == 100
    with pytest.raises(PipelineError, match="not a valid FAISS factory"):
        plan_index("IVF16,Nonsense", 32, 1000, 100, IndexConfig())


def test_recall_at_counts_overlap():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    ann = np.array([[1, 2, 9, 9], [8, 7, 6, 5]])
    assert recall_at(ann, exact, 2) == 0.5 and recall_at(ann, exact, 4) == 0.75


def test_plan_build_picks_delta_full_or_current():
    chain = ["d1", "d2", "d3"]
    assert plan_build(chain, "d1", True) == ("delta", 1)  # add d2 and d3 onto the version of d1
    assert plan_build(chain, "d2", True) == ("delta", 2)
    assert plan_build(chain, "d3", True) == ("current", 3)
    assert plan_build(chain, "d3", False)[0] == "full"  # other settings (nprobe, seed, ...)
    assert plan_build(chain, "x9", True)[0] == "full"  # another lineage
    assert plan_build(chain, None, True)[0] == "full"


def test_compaction_thresholds():
    config = IndexConfig(max_segments=3, max_tombstone_fraction=0.2)
    assert plan_compaction([100, 10, 10], [20, 0, 0], config) == []
    assert plan_compaction([100, 10, 10, 10], [0] * 4, config) == [0, 1, 2, 3]  # a fourth segment: all merged
    assert plan_compaction([100, 10], [23, 0], config) == [0, 1]  # 23 of 110 rows dead
    assert plan_compaction([100], [0], config.model_copy(update={"compact": "always"})) == []  # nothing to gain
    assert plan_compaction([100], [1], config.model_copy(update={"compact": "always"})) == [0]
    assert plan_compaction([100] * 9, [90] * 9, config.model_copy(update={"compact": "never"})) == []


def test_compaction_with_bounded_segments_merges_the_small_and_the_dead_heavy_only():
    """A distributed build's big segments are not copied again because nightly deltas pile up beside them."""
    config = IndexConfig(max_segments=2, max_tombstone_fraction=0.2, segment_vectors=1000)
    big = [1000, 1000, 900]
    assert plan_compaction(big + [10, 10], [0] * 5, config) == []  # two small segments: within the limit
    assert plan_compaction(big + [10, 10, 10], [0] * 6, config) == [3, 4, 5]
    assert plan_compaction(big + [10, 10, 10], [0, 300, 0, 0, 0, 0], config) == [1, 3, 4, 5]  # 30% of one dead
    assert plan_compaction(big + [10], [0, 150, 0, 0], config) == []  # 5% of the version dead
    assert plan_compaction([1000, 1000], [0, 600], config) == [1]  # 30% of the version: the dead-heavy one alone
    assert plan_compaction([1000, 600, 10], [0, 0, 0], config.model_copy(update={"compact": "always"})) == []
    assert plan_compaction([1000, 10, 10], [1, 0, 0], config.model_copy(update={"compact": "always"})) == [0, 1, 2]


def test_shard_groups_bound_each_segment():
    assert plan_groups([100, 100, 100, 100, 100], 250) == [[0, 1], [2, 3], [4]]
    assert plan_groups([100, 400, 50, 50], 250) == [[0], [1], [2, 3]]  # a shard over the bound goes alone
    assert plan_groups([10] * 3, 1000) == [[0, 1, 2]]
    assert plan_groups([], 10) == []


def test_merged_topk_is_the_topk_of_the_union():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(5, 40)).astype(np.float32)
    scores[:, 7] = scores[:, 8]  # a tie, broken by the smaller id
    ids = np.arange(40, dtype=np.int64)[None].repeat(5, 0)
    parts = []
    for cut in ((0, 13), (13, 14), (14, 40)):
        part_scores, part_ids = scores[:, cut[0] : cut[1]], ids[:, cut[0] : cut[1]]
        order = np.argsort(-part_scores, axis=1, kind="stable")[:, :10]
        top_scores = np.take_along_axis(part_scores, order, 1)
        top_ids = np.take_along_axis(part_ids, order, 1)
        if top_ids.shape[1] < 10:  # a part with fewer rows than k pads with -1, as FAISS does
            pad = 10 - top_ids.shape[1]
            top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            top_ids = np.pad(top_ids, ((0, 0), (0, pad)), constant_values=-1)
        parts.append((top_scores, top_ids))
    merged_scores, merged_ids = merge_topk(parts, 10)
    expected = np.lexsort((ids, -scores), axis=-1)[:, :10]
    assert (merged_ids == expected).all()
    assert np.allclose(merged_scores, np.take_along_axis(scores, expected, 1))
    few_scores, few_ids = merge_topk([(np.array([[1.0, -np.inf]]), np.array([[4, -1]]))], 2)
    assert few_ids.tolist() == [[4, -1]]


def test_copied_codes_search_like_the_segments_they_merge():
    """Compaction copies codes list by list: the merged segment answers exactly as the live rows of the stacked
    segments did (no vector is needed)."""
    import faiss

    from pipeline.store.segments import SEQ_SHIFT, copy_live_codes, faiss_ids, search_parameters

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3000, 16)).astype(np.float32)
    quantizer = faiss.index_factory(16, "IVF8,PQ8x4", faiss.METRIC_INNER_PRODUCT)
    quantizer.train(vectors)
    parts = []
    for seq, chunk in ((1, vectors[:2000]), (2, vectors[2000:])):
        part = faiss.clone_index(quantizer)
        part.add_with_ids(chunk, faiss_ids(seq, 0, len(chunk)))
        parts.append(part)
    dead = np.concatenate([faiss_ids(1, 0, 2000)[::3], faiss_ids(2, 0, 1000)[::5]])
    alive = {seq: ~np.isin(faiss_ids(seq, 0, n), dead) for seq, n in ((1, 2000), (2, 1000))}
    remap, rows = {}, 0
    for seq in (1, 2):
        remap[seq] = np.where(alive[seq], rows + np.cumsum(alive[seq]) - 1, -1)
        rows += int(alive[seq].sum())
    merged = copy_live_codes(
        [faiss.extract_index_ivf(p).invlists for p in parts], remap, 3, 8, faiss.extract_index_ivf(quantizer).code_size
    )
    compacted = faiss.clone_index(quantizer)
    compacted.replace_invlists(merged, False)
    compacted.ntotal = rows
    stacked = faiss.clone_index(quantizer)
    for part in parts:
        stacked.merge_from(faiss.clone_index(part), 0)
    params, _keep = search_parameters(stacked, 8, dead)
    queries = vectors[::50]
    scores, found = stacked.search(queries, 10, params=params)
    merged_params, _ = search_parameters(compacted, 8, np.empty(0, np.int64))
    merged_scores, merged_found = compacted.search(queries, 10, params=merged_params)
    assert np.allclose(scores, merged_scores)
    old = {
        int(faiss_ids(seq, r, 1)[0]): int(faiss_ids(3, remap[seq][r], 1)[0])
        for seq in (1, 2)
        for r in np.nonzero(alive[seq])[0]
    }
    assert [[old[i] for i in row] for row in found.tolist()] == merged_found.tolist()
    assert (merged_found >> SEQ_SHIFT == 3).all()


def test_delta_gate_reads_the_quantizers_fit_at_any_number_of_new_rows():
    """The drift measure of a delta build: rows like the training data fit as well whether there are 30 or 3,000
    of them; rows from elsewhere fit measurably worse and send the night to a full build."""
    import faiss

    from pipeline.index.quality import blended, distortion, drifted

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(40, 32)).astype(np.float32)

    def draw(count: int, shift: float = 0.0) -> np.ndarray:
        points = centers[rng.integers(0, len(centers), count)] + 0.3 * rng.normal(size=(count, 32))
        return (points + shift * rng.normal(size=(1, 32))).astype(np.float32)

    index = faiss.index_factory(32, "OPQ8_32,IVF16,PQ8x4", faiss.METRIC_INNER_PRODUCT)
    index.train(draw(4000))
    reference = distortion(index, draw(1000))
    assert 0 < reference < 1
    for count in (30, 300, 3000):
        measured = distortion(index, draw(count))
        assert abs(measured / reference - 1) < 0.15, (count, measured, reference)
        assert not drifted(reference, measured, 0.2)
    elsewhere = distortion(index, draw(300, shift=3.0))
    assert elsewhere > 1.5 * reference and drifted(reference, elsewhere, 0.2)
    assert drifted(None, reference, 0.2) and drifted(reference, None, 0.2)  # figures a version did not record
    assert distortion(index, np.empty((0, 32), np.float32)) == 0.0
    # A version of 30,000 rows: 300 ill-fitting rows a night move it a little, and night after night past the limit.
    version, nights = reference, 0
    while not drifted(reference, version, 0.2):
        version = blended(30_000, version, 300, elsewhere)
        nights += 1
    assert 3 <= nights <= 60, nights
    assert blended(30_000, None, 300, elsewhere) is None


def test_refine_over_segments_merges_to_one_search():
    """The tasks' candidate lists, merged by IVF-PQ score and re-ordered by exact score, are what one refined
    search over the union returns."""
    rng = np.random.default_rng(1)
    ann = rng.normal(size=(5, 60)).astype(np.float32)
    exact = rng.normal(size=(5, 60)).astype(np.float32)
    ids = np.tile(np.arange(60), (5, 1))
    parts = []
    for cut in (slice(0, 25), slice(25, 60)):  # two segments, each sending its top 30 (IVF-PQ) candidates
        order = np.argsort(-ann[:, cut], axis=1)[:, :30]
        parts.append(tuple(np.take_along_axis(a[:, cut], order, axis=1) for a in (ann, ids, exact)))
    merged = refine_merged(parts, depth=30, k=10)
    for query in range(5):
        top = np.argsort(-ann[query])[:30]  # one search: the union's IVF-PQ top 30, then exact order
        assert merged[query].tolist() == top[np.argsort(-exact[query][top], kind="stable")][:10].tolist()


def test_a_factory_its_sample_cannot_train_is_refused_naming_both():
    """PQ16x8 needs 256 training points a sub-quantizer: faiss's own RuntimeError becomes a PipelineError that says
    which factory, how many vectors, why, and what to change (the job exits 1 with it, not "failed unexpectedly")."""
    from pipeline.index.train import split_and_train

    sample = np.random.default_rng(0).standard_normal((240, 32)).astype(np.float32)
    with pytest.raises(PipelineError) as refused:
        split_and_train([sample], None, "IVF4,PQ16x8", train_size=216, seed=0)
    says = str(refused.value)
    assert "training IVF4,PQ16x8 on 216 vectors of 32 dims failed" in says and "(216)" in says and "(256)" in says
    assert "index.factory" in says and "index.train_size" in says
