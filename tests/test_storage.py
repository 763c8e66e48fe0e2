"""The storage modes and table schemas (common/storage.py): every table a run writes has the
schema spelled there, and no other module compares a mode's name."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common import storage
from common.errors import ConfigError
from common.layout import RunLayout
from tests.conftest import fault_config

ROOT = Path(__file__).resolve().parent.parent


def test_every_table_of_a_run_has_its_schema(planted_checkpoint, tmp_path):
    import moe_outliers

    for mode in storage.MODES:
        output = tmp_path / mode
        config = fault_config(planted_checkpoint, output, num_sequences=2)
        config["capture"] = {"routing": True, "experts": True, "residual": True}
        config["storage"]["mode"] = mode
        hidden = moe_outliers.extract(config, executor="local").record.hidden_size
        layout = RunLayout.of(str(output))
        activations = [storage.ACTIVATIONS] if mode == storage.DENSE else [storage.EXCEEDANCES, storage.STATS]
        kinds = [*activations, storage.ROUTING, storage.EXPERTS, storage.EXPERT_DIMS, storage.HISTOGRAMS]
        assert pq.read_schema(layout.tokens).remove_metadata() == storage.SCHEMAS[storage.TOKENS]
        for kind in kinds:
            if kind == storage.ACTIVATIONS:
                path = layout.partition_files(0, "ln_attn")[0]
                schema = pa.ipc.open_file(path).schema.remove_metadata()
                assert schema == storage.dense_schema(hidden, pa.float32()), schema
            else:
                paths = layout.stage_files(kind)
                assert paths, kind
                assert {pq.read_schema(p).remove_metadata() for p in paths} == {storage.SCHEMAS[kind]}, kind


def test_a_table_is_built_in_its_schema_or_refused():
    table = storage.table(storage.HISTOGRAMS, count=np.array([5]), layer=np.array([2]), bin=np.array([7]))
    assert table.schema == storage.SCHEMAS[storage.HISTOGRAMS] and table.to_pylist() == [
        {"layer": 2, "bin": 7, "count": 5}]  # the schema's order and types, whatever the arguments'
    with pytest.raises(ValueError, match=r"histograms table: columns \['bin', 'layer'\], schema has"):
        storage.table(storage.HISTOGRAMS, layer=[1], bin=[2])
    with pytest.raises(pa.ArrowInvalid):  # a value the column's type cannot hold is not wrapped
        storage.table(storage.HISTOGRAMS, layer=np.array([2**40]), bin=np.array([0]), count=np.array([1]))


def test_a_mode_is_one_of_the_modes():
    assert storage.is_dense(storage.DENSE) and not storage.is_dense(storage.EXCEEDANCES)
    with pytest.raises(ConfigError, match=r"storage.mode='sparse': choose one of \['dense', 'exceedances'\]"):
        storage.StorageConfig(mode="sparse")


def mode_names_in(path: Path) -> list[int]:
    """Lines of `path` with a string constant that names a storage mode."""
    tree = ast.parse(path.read_text())
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in storage.MODES]


def test_no_module_but_the_storage_modes_spells_a_mode():
    # The one other: a model config's `mlp_layer_types` value in the families table.
    allowed = {ROOT / "common" / "storage.py": math.inf, ROOT / "actors" / "families.py": 1}
    paths = [ROOT / "moe_outliers.py", *(path for folder in ("actors", "analysis", "bench", "cluster", "common")
                                         for path in sorted((ROOT / folder).rglob("*.py")))]
    found = {str(path.relative_to(ROOT)): lines for path in paths
             if len(lines := mode_names_in(path)) > allowed.get(path, 0)}
    assert found == {}
