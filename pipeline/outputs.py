"""Where each stage writes, relative to the project root (the params file's directory).

`dvc.yaml` names the same paths; this module is the only place the code names them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Outputs:
    root: Path

    @property
    def scanned(self) -> Path:
        """Facts of the files the scan stage read that no manifest holds yet (machine-local, not in git or DVC)."""
        return self.root / "cache" / "scan.parquet"

    @property
    def md5s(self) -> Path:
        """The md5 of every data file the scan stage has seen, by stamp (machine-local, not in git or DVC)."""
        return self.root / "cache" / "md5.parquet"

    @property
    def data(self) -> Path:
        """The scan stage's output, what the manifest depends on: the data's files, bytes and
        digest (small, in git), changed exactly when the data changes."""
        return self.root / "cache" / "data.json"

    @property
    def extract_settings(self) -> Path:
        """The scan stage's other output, what extract depends on of the evaluate and train
        settings (`scan.write_extract_settings`); small, rewritten from params.yaml on every run."""
        return self.root / "cache" / "extract-settings.json"

    @property
    def manifest(self) -> Path:
        return self.root / "cache" / "manifest.parquet"

    @property
    def embeddings(self) -> Path:
        return self.root / "cache" / "embeddings"

    @property
    def predict_embeddings(self) -> Path:
        """Embeddings of images that `predict` scored: beside the DVC-tracked cache, never in it."""
        return self.root / "cache" / "predict"

    @property
    def faces(self) -> Path:
        """Face detections (`data.faces`), per detector: a DVC output of extract, like the
        embeddings, so that experiments' workspaces and teammates crop without detecting again."""
        return self.root / "cache" / "faces"

    @property
    def extract_summary(self) -> Path:
        return self.root / "cache" / "extract.json"

    @property
    def probe(self) -> Path:
        return self.root / "models" / "probe"

    @property
    def metrics(self) -> Path:
        """Held-out protocol (the train stage's probe)."""
        return self.root / "metrics" / "evaluate.json"

    def protocol_metrics(self, protocol: str) -> Path:
        return self.metrics if protocol == "heldout" else self.root / "metrics" / f"{protocol}.json"

    @property
    def scores(self) -> Path:
        """Every held-out test frame's score, for `compare`."""
        return self.root / "metrics" / "scores.csv"

    @property
    def shortcut(self) -> Path:
        return self.root / "metrics" / "shortcut.json"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def roc_plot(self) -> Path:
        """Every held-out test set's ROC points, one row per point with its `test_set`."""
        return self.root / "plots" / "roc.json"

    @property
    def summary(self) -> Path:
        """The compact metrics DVC lists; the protocol files hold the detail."""
        return self.root / "metrics" / "summary.json"

    @property
    def robustness_plot(self) -> Path:
        """AUC per perturbation level (the robustness protocol), for `dvc plots show`."""
        return self.root / "plots" / "robustness.json"

    @property
    def layers_plot(self) -> Path:
        """AUC per layer (the layers protocol), for `dvc plots show`."""
        return self.root / "plots" / "layers.json"
