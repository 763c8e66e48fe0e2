"""An existing local path is always read as that path: model.path, data.source and
storage.output with colons in their folders (timestamps, `granitemoe:embedding_multiplier=12`),
and even a folder named like a URI scheme."""

from __future__ import annotations

import os
import shutil

from common import files
from common.layout import RunLayout
from tests.conftest import fault_config


def test_local_paths_with_colons_win_over_ids_and_uris(planted_checkpoint, tmp_path):
    import moe_outliers

    base = tmp_path / "runs:2026-12-04T10:00:00"
    (tmp_path / "runs").mkdir()  # the part before the first colon exists too
    model = base / "granitemoe:embedding_multiplier=12"
    shutil.copytree(planted_checkpoint, model)
    corpus = base / "data:v1" / "corpus.txt"
    corpus.parent.mkdir()
    corpus.write_text("\n\n".join(f"document {i}: " + "the quick brown fox jumps " * 40 for i in range(4)))
    output = f"{base}/s3://bucket/run"  # a local folder "s3:" holding "bucket"
    os.makedirs(output)
    assert not files.is_uri(output) and files.is_uri("s3://bucket/run")

    config = fault_config(str(model), output, num_sequences=2)
    config["data"]["source"] = str(corpus)
    run = moe_outliers.extract(config, executor="local")
    assert run.record.status == "complete" and run.record.model_path == str(model)
    layout = RunLayout.of(output)
    assert layout.local and layout.root == os.path.abspath(output)
    assert layout.partition_files(0, "ln_attn") and os.path.isfile(layout.summary)  # tables and analysis, there
