"""The names metrics are logged under: a split named like its stage is not repeated."""

from mit_lightning.compare.table import Row, metric_columns
from mit_lightning.metrics.names import metric_name, metric_of, split_of


def test_a_split_named_like_its_stage_is_not_repeated_and_others_are_kept():
    assert metric_name("test", "test", "oIoU") == "test/oIoU"
    assert metric_name("val", None, "loss") == "val/loss"
    assert metric_name("test", "testA", "oIoU") == "test/testA/oIoU"
    assert metric_name("test", "val", "oIoU") == "test/val/oIoU"


def test_a_name_gives_back_its_split_and_metric():
    assert [split_of(name) for name in ("test/oIoU", "test/testA/oIoU", "epoch")] == ["test", "testA", None]
    assert metric_of("test/testA/prec@0.5") == "prec@0.5"


def test_the_comparison_table_reads_the_single_test_split_by_its_short_name():
    rows = [Row("mit", {"test/oIoU": 0.5, "test/mIoU": 0.6, "test/loss": 1.0})]
    assert metric_columns(rows, ["oIoU", "mIoU"]) == [("oIoU", "test/oIoU"), ("mIoU", "test/mIoU")]
