"""Data sources, snapshots, validation and the split, on the real Breast Cancer Wisconsin data."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import postgres_database

from ml import data


@pytest.fixture(scope="module")
def cancer() -> pd.DataFrame:
    return data.load_source("sklearn:breast_cancer")


def validate(frame: pd.DataFrame, **overrides):
    options = {"label": "target", "source": "test.csv", "min_rows": 50, "min_rows_per_class": 5} | overrides
    return data.validate_frame(frame, **options)


def test_bundled_source_is_the_breast_cancer_data(cancer):
    assert cancer.shape == (569, 31)
    assert set(cancer["target"].unique()) == {0, 1}
    assert validate(cancer) == [c for c in cancer.columns if c != "target"]


def test_a_label_the_bundled_data_set_does_not_have_is_refused():
    with pytest.raises(
        data.DataValidationError,
        match="label column 'nosuch' is not a column of the bundled data set sklearn:breast_cancer; "
        "its label column is 'target'",
    ):
        data.load_source("sklearn:breast_cancer", label="nosuch")


def test_csv_parquet_and_sql_sources_read_the_same_content(cancer, tmp_path):
    csv_path, parquet_path, db_path = tmp_path / "d.csv", tmp_path / "d.parquet", tmp_path / "d.db"
    cancer.to_csv(csv_path, index=False)
    cancer.to_parquet(parquet_path, index=False)
    with sqlite3.connect(db_path) as connection:
        cancer.to_sql("cases", connection, index=False)

    from_csv = data.load_source(str(csv_path))
    from_parquet = data.load_source(parquet_path.as_uri())
    from_table = data.load_source(f"sqlite:///{db_path}", "cases")
    from_query = data.load_source(f"sqlite:///{db_path}", "SELECT * FROM cases WHERE target = 1")

    assert data.content_digest(from_parquet) == data.content_digest(cancer)
    assert from_csv.shape == from_table.shape == cancer.shape
    np.testing.assert_allclose(from_csv["mean radius"], cancer["mean radius"])
    assert len(from_query) == int((cancer["target"] == 1).sum())


def test_snapshot_is_content_addressed(cancer, tmp_path):
    store = str(tmp_path / "store")
    first = data.write_snapshot(cancer, store)
    again = data.write_snapshot(cancer.copy(), store)
    changed = data.write_snapshot(cancer.iloc[:-1], store)
    assert first.uri == again.uri and first.digest == again.digest
    assert changed.digest != first.digest
    pd.testing.assert_frame_equal(data.read_frame(first.uri), cancer)


def test_the_same_rows_in_another_order_are_the_same_data(cancer, tmp_path):
    store = str(tmp_path / "store")
    snapshot = data.write_snapshot(cancer, store)
    written = Path(snapshot.uri).read_bytes()
    shuffled = cancer.sample(frac=1, random_state=3)
    csv_path = tmp_path / "shuffled.csv"
    shuffled.to_csv(csv_path, index=False)
    with sqlite3.connect(tmp_path / "d.db") as connection:
        shuffled.to_sql("cases", connection, index=False)

    assert data.content_digest(data.load_source(str(csv_path))) == snapshot.digest
    assert data.content_digest(data.load_source(f"sqlite:///{tmp_path / 'd.db'}", "cases")) == snapshot.digest
    # The snapshot already at the address is kept, in the order it was first written: every run reads the same file.
    assert data.write_snapshot(shuffled, store) == snapshot
    assert Path(snapshot.uri).read_bytes() == written
    pd.testing.assert_frame_equal(data.read_frame(snapshot.uri), cancer)


def test_the_digest_still_sees_every_row(cancer):
    digest = data.content_digest(cancer)
    assert data.content_digest(pd.concat([cancer, cancer.iloc[[0]]])) != digest, "a duplicated row is a row more"
    swapped = cancer.copy()
    swapped.loc[[0, 1], "mean radius"] = cancer.loc[[1, 0], "mean radius"].to_numpy()
    assert data.content_digest(swapped) != digest, "the same values in other rows are other rows"
    assert data.content_digest(cancer[cancer.columns[::-1]]) != digest, "columns keep their order"


def test_a_snapshot_named_by_the_digest_of_rows_in_order_is_still_read(cancer, tmp_path):
    # Named as snapshots were before the digest left the order of the rows out; a Production version trained then
    # refers to one, and drift is measured against it.
    hasher = hashlib.sha256()
    for name, dtype in cancer.dtypes.items():
        hasher.update(f"{name}\x1f{dtype}\x1e".encode())
    hasher.update(pd.util.hash_pandas_object(cancer, index=False).to_numpy().tobytes())
    uri = str(tmp_path / "snapshots" / f"{hasher.hexdigest()}.parquet")
    data.write_frame(cancer, uri)
    pd.testing.assert_frame_equal(data.read_frame(uri), cancer)
    data.write_frame(cancer.iloc[1:], uri)
    with pytest.raises(data.SnapshotDigestError, match="does not hold the content its name promises"):
        data.read_frame(uri)


def test_rows_moved_on_disk_by_postgresql_are_the_same_data(cancer):
    import sqlalchemy

    with postgres_database("mlops_data") as url:
        engine = sqlalchemy.create_engine(url)
        try:
            cancer.to_sql("cases", engine, index=False)
            before = data.load_source(url, "cases")
            with engine.begin() as connection:
                # An update that changes nothing writes new row versions at the end of the table: a plain SELECT
                # returns the rows in another order.
                connection.execute(sqlalchemy.text("UPDATE cases SET target = target WHERE target = 0"))
            after = data.load_source(url, "cases")
        finally:
            engine.dispose()
    assert not after.equals(before), "the rows did move"
    assert data.content_digest(after) == data.content_digest(before) == data.content_digest(cancer)


def test_stored_frames_write_floats_plain_and_keep_every_dtype(tmp_path):
    import pyarrow.parquet as pq

    frame = pd.DataFrame(
        {
            "reading": [1.5, np.nan, 2.25, 1.5],
            "nullable": pd.array([1.0, None, 2.0, 1.0], dtype="Float64"),
            "count": [3, 1, 3, 2],
            "flag": [True, False, True, True],
            "city": ["Oslo", "Lima", "Oslo", "Pune"],
            "grade": pd.Categorical(["a", "b", "a", "a"]),
        }
    )
    uri = str(tmp_path / "frame.parquet")
    data.write_frame(frame, uri)
    metadata = pq.ParquetFile(uri).metadata.row_group(0)
    encodings = {
        metadata.column(i).path_in_schema: set(metadata.column(i).encodings) for i in range(metadata.num_columns)
    }
    assert not encodings["reading"] & {"PLAIN_DICTIONARY", "RLE_DICTIONARY"}
    assert not encodings["nullable"] & {"PLAIN_DICTIONARY", "RLE_DICTIONARY"}
    assert all("RLE_DICTIONARY" in encodings[column] for column in ("count", "city", "grade"))
    pd.testing.assert_frame_equal(data.read_frame(uri), frame)
    assert data.content_digest(data.read_frame(uri)) == data.content_digest(frame)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("sklearn:digits_of_pi", "unknown bundled data set 'digits_of_pi'"),
        ("/data/cases.xlsx", "is not recognised"),
        ("/nowhere/cases.csv", "does not exist"),
        ("sqlite:////nowhere/cases.db", "the SQLite database file /nowhere/cases.db does not exist"),
    ],
)
def test_unreadable_sources_name_the_source(source, message):
    with pytest.raises(data.DataSourceError, match=message):
        data.load_source(source, "cases")


def test_sql_source_without_query_is_refused(tmp_path):
    with pytest.raises(data.DataSourceError, match="no query or table name"):
        data.load_source(f"sqlite:///{tmp_path / 'd.db'}", "")


def test_sql_credentials_are_not_echoed():
    with pytest.raises(data.DataSourceError) as error:
        data.load_source("postgresql://reader:s3cret@127.0.0.1:1/none", "cases")
    assert "s3cret" not in str(error.value)


def test_empty_and_garbled_files_are_named(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(data.DataValidationError, match=f"data file {empty} is empty"):
        data.load_source(str(empty))
    garbled = tmp_path / "garbled.parquet"
    garbled.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(data.DataSourceError, match="not readable Parquet"):
        data.load_source(str(garbled))


def test_duplicated_csv_header_is_refused(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("a,b,a,target\n1,2,3,0\n")
    with pytest.raises(data.DataValidationError, match="duplicated column names: a"):
        data.load_source(str(path))


def test_missing_label_is_named(cancer):
    with pytest.raises(data.DataValidationError, match="label column 'target' is missing"):
        validate(cancer.drop(columns="target"))


def test_single_class_is_refused(cancer):
    with pytest.raises(data.DataValidationError, match=r"has 1 class\(es\) \(1\); at least 2 are needed"):
        validate(cancer[cancer["target"] == 1])


def test_non_numeric_and_empty_columns_are_named(cancer):
    frame = cancer.copy()
    frame["diagnosis note"] = "benign?"
    frame["unused"] = np.nan
    with pytest.raises(data.DataValidationError) as error:
        validate(frame)
    assert "non-numeric feature columns: diagnosis note (e.g. 'benign?')" in str(error.value)
    assert "columns entirely empty: unused" in str(error.value)


def test_too_few_rows_and_rows_per_class(cancer):
    few = pd.concat([cancer[cancer["target"] == 0].head(3), cancer[cancer["target"] == 1].head(40)])
    with pytest.raises(data.DataValidationError) as error:
        validate(few)
    assert "only 43 rows; at least 50" in str(error.value)
    assert "too few rows per class" in str(error.value) and "0: 3" in str(error.value)


def test_a_refusal_listing_many_classes_stays_short(cancer):
    frame = cancer.assign(target=np.arange(len(cancer)))
    with pytest.raises(data.DataValidationError) as error:
        validate(frame)
    message = str(error.value)
    assert "569 classes in all" in message and "and 559 more" in message
    assert len(message) < 400


def test_infinite_feature_values_are_named(cancer):
    frame = cancer.copy()
    frame.loc[[1, 2], "worst area"] = [np.inf, -np.inf]
    with pytest.raises(data.DataValidationError, match=r"infinite values in feature columns: worst area \(2 rows\)"):
        validate(frame)


def test_a_held_out_fraction_that_empties_a_side_is_named():
    with pytest.raises(data.DataValidationError, match=r"test_size 0\.999 leaves 0 of 569 rows for training"):
        data.check_split_sizes(569, 2, 0.999)
    with pytest.raises(data.DataValidationError, match="leaves 568 of 569 rows for training and 1 for validation"):
        data.check_split_sizes(569, 2, 0.001)
    data.check_split_sizes(569, 2, 0.2)


def test_empty_frame_is_refused():
    with pytest.raises(data.DataValidationError, match="is empty"):
        validate(pd.DataFrame())


def test_columns_must_match_production_signature(cancer):
    expected = [c for c in cancer.columns if c != "target"]
    with pytest.raises(data.DataValidationError, match="missing: mean radius; unexpected: radius"):
        validate(cancer.rename(columns={"mean radius": "radius"}), expected_features=expected)


def test_split_is_stratified_seeded_and_stored(cancer, tmp_path):
    features = validate(cancer)
    options = {"label": "target", "features": features, "test_size": 0.2, "seed": 7, "run_folder": "r"}
    split = data.split_frame(cancer, data_store=str(tmp_path / "a"), **options)
    again = data.split_frame(cancer, data_store=str(tmp_path / "b"), **options)
    train, test = data.read_frame(split.train_uri), data.read_frame(split.test_uri)
    assert (split.train_rows, split.test_rows) == (455, 114)
    pd.testing.assert_frame_equal(test, data.read_frame(again.test_uri))
    assert abs(train["target"].mean() - test["target"].mean()) < 0.01
    assert all(train[c].dtype == np.float64 for c in features)


def test_a_wide_table_unlike_production_is_named_in_one_readable_line(cancer):
    """Another data set entirely (iris against breast cancer): the first ten names of each side, and how many more."""
    expected = [c for c in cancer.columns if c != "target"]
    other = pd.DataFrame({f"feature {i}": [0.0, 1.0] * 30 for i in range(25)}).assign(target=[0, 1] * 30)
    with pytest.raises(data.DataValidationError) as refused:
        validate(other, expected_features=expected)
    message = str(refused.value)
    assert "missing: mean radius, mean texture" in message and "mean fractal dimension and 20 more;" in message
    assert "unexpected: feature 0, feature 1" in message and "feature 9 and 15 more" in message
    assert "worst symmetry" not in message
