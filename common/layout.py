"""Where every file of a run lives: the one place that knows the run directory's layout.

    RUN/run.json                                            the run's record (common/record.py)
    RUN/.lock                                               held while a run writes
    RUN/activations/layer=<L>/site=<S>/mb-<i>.arrow         dense tables (Arrow IPC), one per layer-site
                                                            and micro-batch
    RUN/<kind>/layers=<a>-<b>/mb-<i>.parquet                a stage's tables of micro-batch i, one
                                                            per kind: exceedances, stats, routing,
                                                            experts, expert_dims, histograms
    RUN/tokens.parquet                                      seq, pos, token_id of every real token
    RUN/analysis/summary.json, outlier_features.parquet, layer_profile.parquet, plots/<name>.png
    RUN/report.md, RUN/report.html

Tables are hive-partitioned (`layer=`, `site=`, `layers=`), so Polars reads them as they
are. Dense tables are Arrow IPC files, written at memory speed and memory-mapped by readers;
every other table is Parquet. Files of micro-batch i are named `mb-<i>.<suffix>` everywhere: a re-run of the
micro-batch rewrites them, never adds beside them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow.fs as pafs

from common import files
from common.storage import ACTIVATIONS, STAGE_KINDS

SITES = ("ln_attn", "ln_mlp")  # the inputs of the attention and MLP blocks: what the criteria read
RESIDUAL = "resid"  # a decoder layer's output, with capture.residual
_BATCH = re.compile(r"mb-(\d+)\.(parquet|arrow)")
_PARTITION = re.compile(r"layer=(\d+)/site=([^/]+)$")
_STAGE = re.compile(r"layers=(\d+)-(\d+)$")


def batch_file(index: int, suffix: str = "parquet") -> str:
    """The file name of micro-batch `index` (dense tables are Arrow IPC: suffix "arrow")."""
    return f"mb-{index:06d}.{suffix}"


def batch_index(name: str) -> int | None:
    """The micro-batch of a file name `batch_file` made; None for any other name."""
    match = _BATCH.fullmatch(name)
    return int(match[1]) if match else None


def stage_folder(layers: range) -> str:
    """`layers=<first>-<last>`: a stage's own folder, so stages never write the same file."""
    return f"layers={layers.start}-{layers.stop - 1}"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory (a local path or a pyarrow filesystem URI)."""

    fs: pafs.FileSystem
    root: str
    uri: str

    @classmethod
    def of(cls, uri: str) -> RunLayout:
        fs, root = files.resolve(str(uri))
        return cls(fs, root.rstrip("/"), str(uri))

    def __reduce__(self):  # a filesystem object need not pickle; the URI does
        return RunLayout.of, (self.uri,)

    @property
    def local(self) -> bool:
        """Whether the run directory is on this machine's file system (not an object store)."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    # -- the record and the lock --

    @property
    def record(self) -> str:
        return f"{self.root}/run.json"

    @property
    def tokens(self) -> str:
        """seq, pos, token_id of every real token of the run."""
        return f"{self.root}/tokens.parquet"

    def lock(self) -> files.RunLock:
        return files.RunLock(self.fs, f"{self.root}/.lock", self.uri)

    # -- tables --

    def dense_partition(self, layer: int, site: str) -> str:
        return f"{self.root}/{ACTIVATIONS}/layer={layer}/site={site}"

    def dense(self, layer: int, site: str, batch: int) -> str:
        return f"{self.dense_partition(layer, site)}/{batch_file(batch, 'arrow')}"

    def kind(self, kind: str) -> str:
        return f"{self.root}/{kind}"

    def stage_table(self, kind: str, layers: range, batch: int) -> str:
        return f"{self.kind(kind)}/{stage_folder(layers)}/{batch_file(batch)}"

    # -- analysis outputs --

    @property
    def summary(self) -> str:
        """The analysis summary (criteria, run facts, outlier features)."""
        return f"{self.root}/analysis/summary.json"

    @property
    def features(self) -> str:
        """The outlier features as a table."""
        return f"{self.root}/analysis/outlier_features.parquet"

    @property
    def experts(self) -> str:
        """Per (layer, expert): tokens routed and the largest |output|, over the run (MoE view)."""
        return f"{self.root}/analysis/expert_maxima.parquet"

    @property
    def profile(self) -> str:
        """Per layer: the largest magnitudes and the median (what `compare` plots)."""
        return f"{self.root}/analysis/layer_profile.parquet"

    def plot(self, name: str) -> str:
        return f"{self.root}/analysis/plots/{name}.png"

    def plot_link(self, name: str) -> str:
        """A plot's path relative to the run directory, as reports link it."""
        return self.plot(name).removeprefix(f"{self.root}/")

    def report(self, suffix: str) -> str:
        """report.md or report.html."""
        return f"{self.root}/report.{suffix}"

    # -- listing --

    def dense_partitions(self) -> list[tuple[int, str]]:
        """The (layer, site) partitions of dense tables on disk, sorted."""
        found = [(int(m[1]), m[2]) for layer in files.folders(self.fs, self.kind(ACTIVATIONS))
                 for site in files.folders(self.fs, layer) if (m := _PARTITION.search(site))]
        return sorted(found)

    def partition_files(self, layer: int, site: str) -> list[str]:
        """The dense files of one layer-site (Arrow IPC; Parquet in runs made before)."""
        return [e.path for e in files.files(self.fs, self.dense_partition(layer, site))
                if e.path.endswith((".arrow", ".parquet"))]

    def stage_folders(self, kind: str) -> list[str]:
        """The stage folders (`layers=<a>-<b>`) of a stage kind's tables."""
        return [f for f in files.folders(self.fs, self.kind(kind)) if _STAGE.search(f)]

    def stage_files(self, kind: str, folder: str | None = None) -> list[str]:
        """The tables of a stage kind, in one stage folder or in all of them, sorted."""
        folders = [folder] if folder else self.stage_folders(kind)
        return sorted(e.path for f in folders for e in files.files(self.fs, f) if batch_index(e.base_name) is not None)

    def batch_tables(self) -> list[tuple[str, int]]:
        """(path, micro-batch) of every table of every kind."""
        found = []
        for kind in (ACTIVATIONS, *STAGE_KINDS):
            found += [(e.path, i) for e in files.files(self.fs, self.kind(kind), recursive=True)
                      if (i := batch_index(e.base_name)) is not None]
        return found

    def table_bytes(self) -> int:
        """Bytes of every captured table of the run (what a scan reads at most)."""
        return sum(e.size for kind in (ACTIVATIONS, *STAGE_KINDS)
                   for e in files.files(self.fs, self.kind(kind), recursive=True)
                   if batch_index(e.base_name) is not None)

    def remove_uncommitted(self, committed: set[int]) -> int:
        """Delete the tables of micro-batches not committed; returns how many files.

        They are re-run on resume. A dense table would be overwritten under the same name, but
        a stage table lives in its stage's folder: a resume with another stage split would
        leave the old one beside the new one, counted twice.
        """
        stale = [path for path, index in self.batch_tables() if index not in committed]
        for path in stale:
            self.fs.delete_file(path)
        return len(stale)
