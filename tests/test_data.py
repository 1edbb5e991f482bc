"""Tests of tfrec_fast.data: loaders, sequences, split, pipelines, synthetic
data."""

import collections
import importlib.util
import sys

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import tensorflow as tf

from tfrec_fast import data
from tfrec_fast.data import _csr

HAS_RECBOLE = importlib.util.find_spec("recbole") is not None
needs_recbole = pytest.mark.skipif(
    not HAS_RECBOLE,
    reason="MovieLens-100k is read from recbole's example data; recbole is "
           "not installed (pip install --no-deps recbole==1.2.1)")


# ----------------------------------------------------------------- helpers


def write(tmp_path, name, text):
    """Writes `text` to tmp_path/name and returns the path."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def rows(seqs):
    """All rows of a SequenceData as lists of item ids."""
    return [seqs.sequence(u).tolist() for u in range(seqs.num_users)]


def raw_rows(seqs):
    """All rows of a SequenceData as lists of raw item ids."""
    return [seqs.item_vocab[seqs.sequence(u)].tolist()
            for u in range(seqs.num_users)]


def make_seqs(sequences, num_items=None):
    """SequenceData from a list of item-id lists (identity vocabularies)."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    items = np.array([i for s in sequences for i in s], dtype=np.int64)
    if num_items is None:
        num_items = int(items.max()) + 1 if items.size else 1
    return data.SequenceData(
        row_splits=_csr.splits_from_lengths(lengths),
        items=items,
        num_items=num_items,
        user_vocab=np.arange(len(sequences), dtype=np.int64),
        item_vocab=np.arange(num_items, dtype=np.int64))


def collect(dataset):
    """Materialises a dataset of dict batches as a list of numpy dicts."""
    out = []
    for batch in dataset:
        out.append({key: (value.to_list() if isinstance(value, tf.RaggedTensor)
                          else value.numpy().tolist())
                    for key, value in batch.items()})
    return out


# --------------------------------------------------------- MovieLens-100k


@pytest.fixture(scope="module")
def ml100k():
    return data.load_movielens_100k()


@needs_recbole
def test_ml100k_counts(ml100k):
    assert len(ml100k) == 100_000
    assert ml100k.users.dtype == np.int64 and ml100k.items.dtype == np.int64
    assert ml100k.timestamps.dtype == np.float64
    assert np.unique(ml100k.users).size == 943
    assert np.unique(ml100k.items).size == 1682
    # First data line of the file: 196 242 3 881250949.
    assert (ml100k.users[0], ml100k.items[0], ml100k.timestamps[0]) == (
        196, 242, 881250949.0)


@needs_recbole
def test_ml100k_path_does_not_import_recbole():
    was_imported = "recbole" in sys.modules
    path = data.movielens_100k_path()
    assert path.name == "ml-100k.inter" and path.is_file()
    if not was_imported:
        assert "recbole" not in sys.modules


@needs_recbole
def test_ml100k_sequences_time_sorted_and_complete(ml100k):
    seqs = data.to_sequences(ml100k)
    assert seqs.num_users == 943 and seqs.num_items == 1682
    assert seqs.num_interactions == 100_000
    np.testing.assert_array_equal(seqs.user_vocab, np.unique(ml100k.users))
    # Look up each position's timestamp by its raw (user, item) pair (the
    # pairs are unique in ML-100k) and check times never decrease in a row.
    keys = ml100k.users * 10**6 + ml100k.items
    assert np.unique(keys).size == keys.size
    key_order = np.argsort(keys)
    raw_users = np.repeat(seqs.user_vocab, seqs.lengths)
    raw_items = seqs.item_vocab[seqs.items]
    seq_keys = raw_users * 10**6 + raw_items
    found = np.searchsorted(keys[key_order], seq_keys)
    np.testing.assert_array_equal(keys[key_order][found], seq_keys)
    times = ml100k.timestamps[key_order][found]
    same_row = np.diff(raw_users) == 0
    assert np.all(np.diff(times)[same_row] >= 0)


@needs_recbole
def test_ml100k_frequency_order(ml100k):
    seqs = data.to_sequences(ml100k)
    counts = np.bincount(seqs.items, minlength=seqs.num_items)
    assert np.all(np.diff(counts) <= 0)
    ties = np.diff(counts) == 0
    assert np.all(np.diff(seqs.item_vocab)[ties] > 0)
    raw_counts = collections.Counter(ml100k.items.tolist())
    assert counts[0] == max(raw_counts.values())
    assert raw_counts[int(seqs.item_vocab[0])] == counts[0]


@needs_recbole
def test_ml100k_split(ml100k):
    split = data.leave_one_out(data.to_sequences(ml100k))
    assert len(split.validation) == len(split.test) == 943
    assert split.train.num_interactions == 100_000 - 2 * 943
    assert split.num_items == 1682


def test_ml100k_without_recbole_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError,
                       match=r"pip install --no-deps recbole==1\.2\.1"):
        data.load_movielens_100k()


# ------------------------------------------------------------- file formats

RECBOLE_TEXT = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "7\t100\t4\t30\n"
    "5\t200\t3\t10\n"
    "7\t300\t5\t10\n"
    "5\t100\t1\t10\n"      # Tie with the line above for user 5: file order.
    "7\t200\t2\t20\n"
    "\n"
    "5\t400\t2\t5\n")


def test_load_recbole_inter(tmp_path):
    log = data.load_recbole_inter(write(tmp_path, "x.inter", RECBOLE_TEXT))
    np.testing.assert_array_equal(log.users, [7, 5, 7, 5, 7, 5])
    np.testing.assert_array_equal(log.items, [100, 200, 300, 100, 200, 400])
    np.testing.assert_array_equal(log.timestamps, [30, 10, 10, 10, 20, 5])
    seqs = data.to_sequences(log, item_order="raw")
    np.testing.assert_array_equal(seqs.user_vocab, [5, 7])
    np.testing.assert_array_equal(seqs.item_vocab, [100, 200, 300, 400])
    assert raw_rows(seqs) == [[400, 200, 100], [300, 200, 100]]
    assert rows(seqs) == [[3, 1, 0], [2, 1, 0]]


def test_load_recbole_inter_other_layouts(tmp_path):
    # Columns reordered, an extra text column, no rating.
    text = ("timestamp:float\tnote:token_seq\titem_id:token\tuser_id:token\n"
            "2\ta b\t11\t1\n"
            "1\t\t12\t1\n")
    log = data.load_recbole_inter(write(tmp_path, "a.inter", text))
    np.testing.assert_array_equal(log.users, [1, 1])
    np.testing.assert_array_equal(log.items, [11, 12])
    np.testing.assert_array_equal(log.timestamps, [2, 1])
    # No timestamp column: line order is the time order.
    text = "user_id:token\titem_id:token\n1\t5\n1\t4\n"
    log = data.load_recbole_inter(write(tmp_path, "b.inter", text))
    np.testing.assert_array_equal(log.timestamps, [0, 1])


def test_load_sasrec_txt(tmp_path):
    text = "1 10\n2 20\n1 30\n\n1\t10\n  2   5  \n"
    log = data.load_sasrec_txt(write(tmp_path, "s.txt", text))
    np.testing.assert_array_equal(log.users, [1, 2, 1, 1, 2])
    np.testing.assert_array_equal(log.items, [10, 20, 30, 10, 5])
    np.testing.assert_array_equal(log.timestamps, [0, 1, 2, 3, 4])
    seqs = data.to_sequences(log)
    # Frequency: 10 (x2) -> 0; then 5, 20, 30 (x1) by raw id -> 1, 2, 3.
    np.testing.assert_array_equal(seqs.item_vocab, [10, 5, 20, 30])
    assert raw_rows(seqs) == [[10, 30, 10], [20, 5]]
    assert rows(seqs) == [[0, 3, 0], [2, 1]]


def test_load_movielens_dat(tmp_path):
    text = ("1::1193::5::978300760\n1::661::3::978302109\n"
            "2::1193::4::978298413\n")
    log = data.load_movielens_ratings(write(tmp_path, "ratings.dat", text))
    np.testing.assert_array_equal(log.users, [1, 1, 2])
    np.testing.assert_array_equal(log.items, [1193, 661, 1193])
    np.testing.assert_array_equal(
        log.timestamps, [978300760, 978302109, 978298413])


def test_load_movielens_csv(tmp_path):
    text = ("userId,movieId,rating,timestamp\r\n"
            "1,2,3.5,1112486027\r\n"
            "1,29,3.5,1112484676\r\n"
            "3,32,4.0,1112484819\r\n")
    for name in ("ratings.csv", "ratings.txt"):  # By extension / by content.
        log = data.load_movielens_ratings(write(tmp_path, name, text))
        np.testing.assert_array_equal(log.users, [1, 1, 3])
        np.testing.assert_array_equal(log.items, [2, 29, 32])
        np.testing.assert_array_equal(
            log.timestamps, [1112486027, 1112484676, 1112484819])
        seqs = data.to_sequences(log, item_order="raw")
        assert raw_rows(seqs) == [[29, 2], [32]]


def test_whitespace_only_line_in_tab_file_is_blank(tmp_path):
    # np.loadtxt rejects this line; the line scan accepts it as blank.
    text = RECBOLE_TEXT.replace("\n\n", "\n   \n")
    log = data.load_recbole_inter(write(tmp_path, "w.inter", text))
    assert len(log) == 6


def test_fast_parse_of_a_larger_file(tmp_path):
    rng = np.random.default_rng(0)
    users = rng.integers(0, 1000, 50_000)
    items = rng.integers(0, 5000, 50_000)
    text = "".join(f"{u} {i}\n"
                   for u, i in zip(users.tolist(), items.tolist()))
    log = data.load_sasrec_txt(write(tmp_path, "big.txt", text))
    np.testing.assert_array_equal(log.users, users)
    np.testing.assert_array_equal(log.items, items)


# ------------------------------------------------------------ input errors

RECBOLE_HEADER = RECBOLE_TEXT.splitlines(keepends=True)[0]
# loader, file name, good data lines, line that must be rejected.
FORMATS = {
    "recbole": (data.load_recbole_inter, "x.inter", RECBOLE_HEADER,
                ["1\t2\t3\t4", "1\t3\t3\t5"]),
    "sasrec": (data.load_sasrec_txt, "x.txt", "", ["1 2", "1 3"]),
    "dat": (data.load_movielens_ratings, "ratings.dat", "",
            ["1::2::3::4", "1::3::3::5"]),
    "csv": (data.load_movielens_ratings, "ratings.csv",
            "userId,movieId,rating,timestamp\n", ["1,2,3,4", "1,3,3,5"]),
}
BAD_LINES = {
    "recbole": {"fields": "1\t2\t3", "extra": "1\t2\t3\t4\t5",
                "float_id": "1\t2.5\t3\t4", "text_id": "u1\t2\t3\t4",
                "bad_time": "1\t2\t3\tnoon"},
    "sasrec": {"fields": "1", "extra": "1 2 3", "float_id": "1 2.0",
               "text_id": "1 abc"},
    "dat": {"fields": "1::2::3", "extra": "1::2::3::4::5",
            "float_id": "1.5::2::3::4", "text_id": "1::x::3::4",
            "tab": "1::2\t3::4::5"},
    "csv": {"fields": "1,2,3", "extra": "1,2,3,4,", "float_id": "1,2.5,3,4",
            "text_id": "1,,3,4"},
}
BAD_CASES = [(fmt, kind) for fmt, kinds in BAD_LINES.items() for kind in kinds]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_missing_file(tmp_path, fmt):
    loader = FORMATS[fmt][0]
    path = tmp_path / "nope" / "missing.file"
    with pytest.raises(FileNotFoundError, match="missing.file"):
        loader(path)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("with_header", [False, True])
def test_empty_file(tmp_path, fmt, with_header):
    loader, name, header, _ = FORMATS[fmt]
    path = write(tmp_path, name, (header if with_header else "") + "\n\n")
    with pytest.raises(ValueError, match="contains no interactions"):
        loader(path)


@pytest.mark.parametrize("fmt,kind", BAD_CASES)
@pytest.mark.parametrize("position", [0, 1, 2])
def test_bad_line_is_reported_with_its_number(tmp_path, fmt, kind, position):
    loader, name, header, good = FORMATS[fmt]
    bad = BAD_LINES[fmt][kind]
    lines = list(good)
    lines.insert(position, bad)
    path = write(tmp_path, name, header + "\n".join(lines) + "\n")
    line_no = position + 1 + (1 if header else 0)
    with pytest.raises(ValueError) as info:
        loader(path)
    message = str(info.value)
    assert str(path) in message
    assert f"line {line_no}:" in message
    assert repr(bad) in message


def test_non_integer_id_message(tmp_path):
    path = write(tmp_path, "s.txt", "1 2\n\n3 x7\n")
    with pytest.raises(ValueError, match=r"line 3: item id 'x7' is not an "
                                         r"integer: '3 x7'"):
        data.load_sasrec_txt(path)


def test_wrong_field_count_message(tmp_path):
    path = write(tmp_path, "s.txt", "1 2\n3 4 5\n")
    with pytest.raises(ValueError, match=r"line 2: expected 2 fields "
                                         r"separated by whitespace, found 3"):
        data.load_sasrec_txt(path)


def test_recbole_header_without_user_id(tmp_path):
    path = write(tmp_path, "h.inter", "uid:token\titem_id:token\n1\t2\n")
    with pytest.raises(ValueError, match="line 1: .*'user_id'"):
        data.load_recbole_inter(path)


def test_movielens_unknown_separator(tmp_path):
    path = write(tmp_path, "ratings.dat", "1 2 3 4\n")
    with pytest.raises(ValueError, match="not a MovieLens ratings file"):
        data.load_movielens_ratings(path)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(IsADirectoryError):
        data.load_sasrec_txt(tmp_path)


def test_interactions_validation():
    with pytest.raises(ValueError, match="equal lengths"):
        data.Interactions(users=[1, 2], items=[1], timestamps=[0.0, 1.0])
    with pytest.raises(ValueError, match="integers"):
        data.Interactions(users=[1.5], items=[1], timestamps=[0.0])
    log = data.Interactions(users=[1, 2], items=[3, 4], timestamps=[0, 1])
    assert log.users.dtype == np.int64 and log.timestamps.dtype == np.float64


# -------------------------------------------------------------- sequences


def toy_log():
    return data.Interactions(
        users=np.array([3, 1, 3, 1, 2, 3, 9]),
        items=np.array([50, 60, 70, 50, 60, 60, 80]),
        timestamps=np.array([2.0, 5.0, 1.0, 1.0, 0.0, 1.0, 0.0]))


def test_to_sequences_exact():
    seqs = data.to_sequences(toy_log())
    np.testing.assert_array_equal(seqs.user_vocab, [1, 2, 3, 9])
    # Counts: 60 x3, 50 x2, 70 x1, 80 x1.
    np.testing.assert_array_equal(seqs.item_vocab, [60, 50, 70, 80])
    # User 3: times 2, 1, 1 -> items 70 (t=1, earlier line), 60, 50.
    assert raw_rows(seqs) == [[50, 60], [60], [70, 60, 50], [80]]
    assert rows(seqs) == [[1, 0], [0], [2, 0, 1], [3]]
    np.testing.assert_array_equal(seqs.row_splits, [0, 2, 3, 6, 7])
    np.testing.assert_array_equal(seqs.lengths, [2, 1, 3, 1])
    assert seqs.num_users == 4 and seqs.num_items == 4
    assert seqs.row_splits.dtype == np.int64 and seqs.items.dtype == np.int64


def test_to_sequences_raw_order_and_min_length():
    seqs = data.to_sequences(toy_log(), item_order="raw", min_length=2)
    np.testing.assert_array_equal(seqs.user_vocab, [1, 3])
    # Item 80 only occurred for the dropped user 9.
    np.testing.assert_array_equal(seqs.item_vocab, [50, 60, 70])
    assert seqs.num_items == 3
    assert rows(seqs) == [[0, 1], [2, 1, 0]]


def test_to_sequences_errors():
    with pytest.raises(ValueError, match="item_order"):
        data.to_sequences(toy_log(), item_order="popularity")
    with pytest.raises(ValueError, match="min_length"):
        data.to_sequences(toy_log(), min_length=0)
    with pytest.raises(ValueError, match="min_length=10"):
        data.to_sequences(toy_log(), min_length=10)
    empty = data.Interactions(users=np.zeros(0, np.int64),
                              items=np.zeros(0, np.int64),
                              timestamps=np.zeros(0))
    with pytest.raises(ValueError):
        data.to_sequences(empty)


@hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
@hypothesis.given(
    st.lists(st.tuples(st.integers(0, 5), st.integers(0, 7),
                       st.integers(0, 3)), min_size=1, max_size=40),
    st.sampled_from(["frequency", "raw"]),
    st.integers(1, 3))
def test_to_sequences_matches_reference(log, item_order, min_length):
    users, items, times = (np.array(column) for column in zip(*log))
    by_user = collections.defaultdict(list)
    for position, (user, item, time) in enumerate(log):
        by_user[user].append((time, position, item))
    expected = {user: [item for _, _, item in sorted(events)]
                for user, events in by_user.items()
                if len(events) >= min_length}
    interactions = data.Interactions(users, items, times.astype(float))
    if not expected:
        with pytest.raises(ValueError):
            data.to_sequences(interactions, item_order, min_length)
        return
    seqs = data.to_sequences(interactions, item_order, min_length)
    assert seqs.user_vocab.tolist() == sorted(expected)
    assert raw_rows(seqs) == [expected[user] for user in sorted(expected)]
    counts = collections.Counter(i for s in expected.values() for i in s)
    if item_order == "raw":
        assert seqs.item_vocab.tolist() == sorted(counts)
    else:
        assert seqs.item_vocab.tolist() == sorted(
            counts, key=lambda item: (-counts[item], item))


def test_sequence_data_accessors_and_ragged():
    seqs = make_seqs([[0, 1, 2], [], [3]])
    np.testing.assert_array_equal(seqs.sequence(0), [0, 1, 2])
    assert seqs.sequence(1).size == 0
    with pytest.raises(IndexError):
        seqs.sequence(3)
    ragged = seqs.to_ragged()
    assert isinstance(ragged, tf.RaggedTensor)
    assert ragged.dtype == tf.int64 and ragged.row_splits.dtype == tf.int64
    assert ragged.to_list() == [[0, 1, 2], [], [3]]


def test_sequence_data_validation():
    good = dict(row_splits=[0, 2, 3], items=[0, 1, 1], num_items=2,
                user_vocab=[10, 11], item_vocab=[5, 6])
    data.SequenceData(**good)
    for change, pattern in [({"row_splits": [1, 2, 3]}, "start at 0"),
                            ({"row_splits": [0, 2, 4]}, "end at"),
                            ({"row_splits": [0, 3, 2, 3]}, "non-decreasing"),
                            ({"items": [0, 1, 2]}, r"\[0, 2\)"),
                            ({"user_vocab": [10]}, "user_vocab"),
                            ({"item_vocab": [5]}, "item_vocab"),
                            ({"num_items": 0}, "num_items")]:
        with pytest.raises(ValueError, match=pattern):
            data.SequenceData(**{**good, **change})


def test_truncate():
    seqs = make_seqs([[0, 1, 2, 3], [4], [5, 6]])
    short = data.truncate(seqs, 2)
    assert rows(short) == [[2, 3], [4], [5, 6]]
    assert short.num_items == seqs.num_items
    np.testing.assert_array_equal(short.item_vocab, seqs.item_vocab)
    np.testing.assert_array_equal(short.user_vocab, seqs.user_vocab)
    assert rows(data.truncate(seqs, 10)) == rows(seqs)
    with pytest.raises(ValueError, match="max_len"):
        data.truncate(seqs, 0)


def test_segment_indices():
    np.testing.assert_array_equal(
        _csr.segment_indices(np.array([5, 0, 2]), np.array([2, 0, 3])),
        [5, 6, 2, 3, 4])
    assert _csr.segment_indices(np.zeros(0), np.zeros(0)).size == 0


# ------------------------------------------------------------------ split


def test_leave_one_out_exact():
    seqs = make_seqs([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9], [1]])
    split = data.leave_one_out(seqs)
    assert rows(split.train) == [[0, 1, 2], [5, 6], [7], [1]]
    assert split.num_items == seqs.num_items == 10
    val, test = split.validation, split.test
    np.testing.assert_array_equal(val.users, [0, 2])
    np.testing.assert_array_equal(test.users, [0, 2])
    np.testing.assert_array_equal(val.targets, [3, 8])
    np.testing.assert_array_equal(test.targets, [4, 9])
    np.testing.assert_array_equal(val.history_splits, [0, 3, 4])
    np.testing.assert_array_equal(val.history_items, [0, 1, 2, 7])
    np.testing.assert_array_equal(test.history_splits, [0, 4, 6])
    np.testing.assert_array_equal(test.history_items, [0, 1, 2, 3, 7, 8])
    assert test.history(1).tolist() == [7, 8]
    for array in (val.history_splits, val.history_items, val.targets,
                  val.users):
        assert array.dtype == np.int64


def test_leave_one_out_reassembles_every_sequence():
    seqs = data.synthetic_zipf(300, 50, mean_length=4, seed=3)
    assert np.any(seqs.lengths < 3)
    split = data.leave_one_out(seqs)
    val, test = split.validation, split.test
    evaluated = set(test.users.tolist())
    assert evaluated == {u for u in range(seqs.num_users)
                         if seqs.lengths[u] >= 3}
    np.testing.assert_array_equal(val.users, test.users)
    for e, u in enumerate(test.users):
        train_row = split.train.sequence(u).tolist()
        full = seqs.sequence(u).tolist()
        assert train_row + [val.targets[e], test.targets[e]] == full
        assert val.history(e).tolist() == train_row
        assert test.history(e).tolist() == full[:-1]
    for u in range(seqs.num_users):
        if u not in evaluated:
            np.testing.assert_array_equal(split.train.sequence(u),
                                          seqs.sequence(u))


def test_eval_set_validation():
    with pytest.raises(ValueError, match="targets"):
        data.EvalSet(history_splits=[0, 1], history_items=[3],
                     targets=[1, 2], users=[0])


# -------------------------------------------------------------- pipelines


def expected_train_rows(seqs, max_len):
    """(inputs, targets) of every row with length >= 2, in row order."""
    out = []
    for u in range(seqs.num_users):
        s = seqs.sequence(u).tolist()
        if len(s) >= 2:
            out.append((s[:-1][-max_len:], s[1:][-max_len:]))
    return out


def test_next_item_dataset_batches():
    seqs = data.synthetic_zipf(37, 100, mean_length=6, seed=1)
    dataset = data.next_item_dataset(seqs, batch_size=8, max_len=4,
                                     shuffle=False)
    spec = dataset.element_spec
    assert spec["item_ids"].dtype == tf.int64
    assert spec["item_ids"].row_splits_dtype == tf.int64
    got = []
    for batch in dataset:
        item_ids, targets = batch["item_ids"], batch["targets"]
        assert isinstance(item_ids, tf.RaggedTensor)
        assert isinstance(targets, tf.RaggedTensor)
        assert item_ids.dtype == tf.int64 and targets.dtype == tf.int64
        assert item_ids.row_splits.dtype == tf.int64
        np.testing.assert_array_equal(item_ids.row_splits, targets.row_splits)
        assert int(tf.reduce_max(item_ids.row_lengths())) <= 4
        # Shifted by one: targets[t] == item_ids[t + 1] inside a row.
        for inputs, outputs in zip(item_ids.to_list(), targets.to_list()):
            assert inputs[1:] == outputs[:-1]
        got.extend(zip(item_ids.to_list(), targets.to_list()))
    assert got == expected_train_rows(seqs, 4)


def test_next_item_dataset_truncation_and_skipping():
    seqs = make_seqs([[1, 2, 3, 4, 5, 6], [7], [8, 9]])
    batches = collect(data.next_item_dataset(seqs, 10, max_len=3,
                                             shuffle=False))
    assert batches == [{"item_ids": [[3, 4, 5], [8]],
                        "targets": [[4, 5, 6], [9]]}]


def test_next_item_dataset_shuffle_is_seeded_and_reshuffles():
    seqs = data.synthetic_zipf(200, 100, mean_length=5, seed=2)

    def epochs(seed):
        dataset = data.next_item_dataset(seqs, 16, 8, shuffle=True, seed=seed)
        return collect(dataset), collect(dataset)

    first, second = epochs(0)
    assert epochs(0) == (first, second)
    assert first != second
    assert epochs(1)[0] != first
    flat = sorted(zip(*[sum((b[k] for b in first), [])
                        for k in ("item_ids", "targets")]))
    assert flat == sorted(expected_train_rows(seqs, 8))


def test_next_item_dataset_drop_remainder_and_errors():
    seqs = make_seqs([[0, 1]] * 10)
    sizes = [len(b["item_ids"]) for b in collect(
        data.next_item_dataset(seqs, 4, 5, drop_remainder=True))]
    assert sizes == [4, 4]
    with pytest.raises(ValueError, match="batch_size"):
        data.next_item_dataset(seqs, 0, 5)
    with pytest.raises(ValueError, match="max_len"):
        data.next_item_dataset(seqs, 4, 0)
    with pytest.raises(ValueError, match="length >= 2"):
        data.next_item_dataset(make_seqs([[0], [1]]), 4, 5)


def test_eval_dataset_order_and_truncation():
    seqs = data.synthetic_zipf(50, 30, mean_length=8, seed=4)
    test = data.leave_one_out(seqs).test
    batches = collect(data.eval_dataset(test, batch_size=7, max_len=3))
    sizes = [len(b["targets"]) for b in batches]
    assert sizes[:-1] == [7] * (len(sizes) - 1) and 0 < sizes[-1] <= 7
    users = sum((b["users"] for b in batches), [])
    targets = sum((b["targets"] for b in batches), [])
    histories = sum((b["item_ids"] for b in batches), [])
    assert users == test.users.tolist()
    assert targets == test.targets.tolist()
    assert histories == [test.history(e).tolist()[-3:]
                         for e in range(len(test))]
    batch = next(iter(data.eval_dataset(test, batch_size=7, max_len=3)))
    assert isinstance(batch["item_ids"], tf.RaggedTensor)
    assert batch["item_ids"].row_splits.dtype == tf.int64
    assert batch["targets"].dtype == tf.int64
    assert batch["users"].dtype == tf.int64


# -------------------------------------------------------------- synthetic


@pytest.mark.parametrize("distribution,kwargs,low,high", [
    ("geometric", {"mean_length": 10}, 1, None),
    ("geometric", {"mean_length": 10, "max_length": 12}, 1, 12),
    ("uniform", {"max_length": 40}, 8, 40),
    ("constant", {"mean_length": 7}, 7, 7),
    ("constant", {"mean_length": 7, "max_length": 5}, 5, 5),
])
def test_synthetic_shapes_and_lengths(distribution, kwargs, low, high):
    seqs = data.synthetic_zipf(2000, 500, length_distribution=distribution,
                               seed=5, **kwargs)
    assert seqs.num_users == 2000 and seqs.num_items == 500
    assert seqs.items.dtype == np.int64 and seqs.row_splits.dtype == np.int64
    assert seqs.items.min() >= 0 and seqs.items.max() < 500
    lengths = seqs.lengths
    assert lengths.min() >= low
    if high is not None:
        assert lengths.max() <= high
    if distribution == "geometric" and "max_length" not in kwargs:
        assert abs(lengths.mean() - 10) < 1.0
    if distribution == "uniform":
        assert lengths.min() == 8 and lengths.max() == 40
    np.testing.assert_array_equal(seqs.user_vocab, np.arange(2000))
    np.testing.assert_array_equal(seqs.item_vocab, np.arange(500))


def test_synthetic_zipf_popularity():
    seqs = data.synthetic_zipf(2000, 1000, mean_length=100,
                               length_distribution="constant", seed=6)
    counts = np.bincount(seqs.items, minlength=1000).astype(float)
    # P(k) ~ 1 / (k + 1): count(0) / count(k) ~ k + 1.
    for k in (1, 3, 9):
        assert counts[0] / counts[k] == pytest.approx(k + 1, rel=0.1)
    assert np.all(np.diff(counts[:10]) < 0)
    flat = data.synthetic_zipf(200, 10, mean_length=1000, zipf_exponent=0.0,
                               length_distribution="constant", seed=6)
    flat_counts = np.bincount(flat.items, minlength=10)
    assert flat_counts.min() / flat_counts.max() > 0.9


def test_synthetic_reproducible():
    a = data.synthetic_zipf(100, 50, seed=7)
    b = data.synthetic_zipf(100, 50, seed=7)
    c = data.synthetic_zipf(100, 50, seed=8)
    np.testing.assert_array_equal(a.row_splits, b.row_splits)
    np.testing.assert_array_equal(a.items, b.items)
    assert not np.array_equal(a.items[:100], c.items[:100])


def test_synthetic_large_catalogue_is_vectorised():
    seqs = data.synthetic_zipf(100_000, 1_000_000, mean_length=50, seed=0)
    assert seqs.num_users == 100_000
    assert abs(seqs.num_interactions / 100_000 - 50) < 1
    assert seqs.items.max() < 1_000_000


@pytest.mark.parametrize("kwargs,name", [
    ({"num_users": 0}, "num_users"),
    ({"num_items": 0}, "num_items"),
    ({"num_items": 2.5}, "num_items"),
    ({"mean_length": 0.5}, "mean_length"),
    ({"mean_length": float("nan")}, "mean_length"),
    ({"max_length": 0}, "max_length"),
    ({"zipf_exponent": -1.0}, "zipf_exponent"),
    ({"length_distribution": "poisson"}, "length_distribution"),
    ({"length_distribution": "uniform"}, "max_length"),
    ({"length_distribution": "constant", "mean_length": 2.5}, "mean_length"),
])
def test_synthetic_argument_errors(kwargs, name):
    arguments = {"num_users": 10, "num_items": 10, **kwargs}
    with pytest.raises(ValueError, match=name):
        data.synthetic_zipf(**arguments)
