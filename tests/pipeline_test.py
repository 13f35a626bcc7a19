import itertools

import jax
import numpy as np
import pytest

from emonet_jax.data import pipeline


def _source(records, kind, split):
    return pipeline.open_split(f"emonet_face_{kind}/64", split, records["data_dir"])


def _take(dataset, n):
    return list(itertools.islice(iter(dataset), n))


def _train(source, seed=0, **kwargs):
    kwargs = {"process_index": 0, "process_count": 1, **kwargs}
    return pipeline.train_dataset(source, global_batch_size=8, image_size=40, seed=seed, **kwargs)


def test_train_batches_have_expected_fields_and_range(synthetic_records):
    batch = _take(_train(_source(synthetic_records, "big", "train")), 1)[0]
    assert batch["image"].shape == (8, 40, 40, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() < 0 < batch["image"].max() <= 1.0
    assert batch["soft_label"].shape == (8, 40, 8)
    np.testing.assert_allclose(batch["soft_label"].sum(-1), 1.0, atol=1e-5)
    assert batch["ratings"].shape == (8, 4, 40)
    assert all(isinstance(i, str) and len(i) == 5 for i in batch["image_id"])


def test_same_seed_same_batches_other_seed_differs(synthetic_records):
    source = _source(synthetic_records, "big", "train")
    a, b = _take(_train(source, seed=1), 3), _take(_train(source, seed=1, threads=1), 3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["image_id"], y["image_id"])
    c = _take(_train(source, seed=2), 1)[0]
    assert not np.array_equal(a[0]["image_id"], c["image_id"])


def test_epochs_reshuffle_and_cover_every_row(synthetic_records):
    source = _source(synthetic_records, "big", "train")
    n = len(source)  # batches run across the epoch boundary
    batches = _take(_train(source), -(-2 * n // 8))
    ids = [i for b in batches for i in b["image_id"]]
    first, second = ids[:n], ids[n:2 * n]
    assert sorted(first) == sorted(second) and len(set(first)) == n
    assert first != second


def test_iterator_state_resumes_exactly(synthetic_records):
    source = _source(synthetic_records, "big", "train")
    it = iter(_train(source))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    resumed = iter(_train(source))
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["soft_label"], want["soft_label"])


def _mixture(records, process_index, process_count):
    """12 Big + 4 Binary rows per global batch of 16."""
    streams = {kind: pipeline.train_stream(_source(records, kind, "train"), image_size=40, seed=seed)
               for kind, seed in (("big", 0), ("binary", 1000))}
    dataset = pipeline.mixture(streams, {"big": 12, "binary": 4}, process_index=process_index,
                               process_count=process_count, threads=1)
    return pipeline.Mixture(dataset, streams)


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_load_disjoint_slices_of_the_single_process_batches(synthetic_records, process_count):
    # 4 batches cross the epoch of the 37-row Binary split; with 4 processes, process 3 loads
    # only Binary rows and process 2 both sources.
    single = _take(_mixture(synthetic_records, 0, 1), 4)
    parts = [_take(_mixture(synthetic_records, p, process_count), 4) for p in range(process_count)]
    for b, want in enumerate(single):
        for key in ("image", "image_id", "soft_label", "binary_mask"):
            np.testing.assert_array_equal(np.concatenate([part[b][key] for part in parts]), want[key])
    judged = single[0]["binary_mask"].any(-1)  # Binary rows carry votes, Big rows none
    assert not judged[:12].any() and judged[12:].all()


def test_mixture_state_names_its_sources_and_reads_the_per_source_layout(synthetic_records):
    it = _mixture(synthetic_records, 0, 1)
    _take(it, 3)
    state = it.get_state()
    assert state["sources"] == ["big", "binary"]
    expected = next(it)
    for saved in (state, {"big": state["iterator"], "binary": state["iterator"]}):
        resumed = _mixture(synthetic_records, 0, 1)
        resumed.set_state(saved)
        np.testing.assert_array_equal(next(resumed)["image"], expected["image"])
    with pytest.raises(ValueError, match="this run trains on"):
        _mixture(synthetic_records, 0, 1).set_state(dict(state, sources=["big", "hq"]))


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_eval_visits_each_row_once_with_equal_batch_counts(synthetic_records, process_count):
    source = _source(synthetic_records, "hq", "test")   # 24 rows; batch 16 leaves a padded tail
    ids, counts = [], set()
    for p in range(process_count):
        batches = list(pipeline.eval_dataset(source, global_batch_size=16, image_size=40,
                                             process_index=p, process_count=process_count))
        counts.add(len(batches))
        for b in batches:
            assert b["image"].shape[0] == 16 // process_count
            ids += list(b["image_id"][b["mask"]])
    assert counts == {2}
    assert sorted(ids) == sorted(source[i]["image_id"].decode() for i in range(len(source)))


def test_eval_is_deterministic_centre_crop(synthetic_records):
    source = _source(synthetic_records, "hq", "test")
    a = next(iter(pipeline.eval_dataset(source, global_batch_size=8, image_size=40, process_index=0, process_count=1)))
    b = next(iter(pipeline.eval_dataset(source, global_batch_size=8, image_size=40, process_index=0, process_count=1)))
    np.testing.assert_array_equal(a["image"], b["image"])


def test_grain_worker_processes_give_the_same_batches(synthetic_records):
    source = _source(synthetic_records, "big", "train")
    in_process = _take(_train(source), 2)
    with_workers = _take(_train(source, num_workers=2), 2)
    for x, y in zip(in_process, with_workers):
        np.testing.assert_array_equal(x["image"], y["image"])


def test_device_batch_is_sharded_over_the_mesh(synthetic_records):
    assert jax.device_count() == 8, "conftest simulates 8 CPU devices"
    mesh = jax.make_mesh((8,), ("data",))
    local = _take(_train(_source(synthetic_records, "big", "train")), 1)[0]
    batch = pipeline.device_batch(local, pipeline.batch_sharding(mesh))
    assert "image_id" not in batch
    assert batch["image"].shape == (8, 40, 40, 3)
    assert len(batch["image"].sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(batch["soft_label"]), local["soft_label"])


def test_bad_batch_size_for_process_count_is_an_error(synthetic_records):
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        pipeline.train_dataset(_source(synthetic_records, "big", "train"), global_batch_size=8,
                               image_size=40, seed=0, process_index=0, process_count=3)


def test_decoded_in_memory_gives_the_records_batches_and_keeps_rows_unchanged(synthetic_records):
    records = _source(synthetic_records, "big", "train")
    held = pipeline.open_split("emonet_face_big/64", "train", synthetic_records["data_dir"], in_memory=True)
    assert len(held) == len(records)
    for want, got in zip(_take(_train(records), 3), _take(_train(held), 3)):
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    row = held[0]
    with pytest.raises(ValueError, match="read-only"):
        row["soft_label"][0, 0] = 1.0  # a transform writing into its input would change every later epoch
    np.testing.assert_array_equal(held[0]["soft_label"], records[0]["soft_label"])


def test_decoded_in_memory_refuses_a_split_larger_than_its_budget(synthetic_records):
    records = _source(synthetic_records, "big", "train")
    assert len(records) == 47
    with pytest.raises(ValueError, match=r"emonet_face_big train: 47 decoded rows would take about [\d.]+ MiB .* input\.in_memory=False"):
        pipeline.DecodedInMemory(records, "emonet_face_big train", max_bytes=1000)
