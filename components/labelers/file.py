"""The `file` labeler: an existing preference set (`data.source`) instead of labels of samples."""

from __future__ import annotations

from components.data import preferences
from components.data.records import PreferencePair, Sample
from components.labelers import LabelingContext, LabelingError


class FileLabeler:
    """Ingests `data.source` (components/data/preferences.py) into the preference folder: pairs,
    quarantine, report and Data Docs. Too many quarantined rows is an error naming them."""

    needs_samples = False

    def __init__(self, source: str, data_cfg, out):
        self.source, self.data_cfg, self.out = source, data_cfg, out

    @classmethod
    def from_context(cls, context: LabelingContext) -> "FileLabeler":
        if not context.cfg.data.source:
            raise LabelingError("the file labeler reads data.source, which is not set")
        return cls(context.cfg.data.source, context.cfg.data, context.out)

    def label(self, samples: list[Sample], seed: int) -> tuple[list[PreferencePair], dict[str, float]]:
        if samples:
            raise LabelingError("the file labeler cannot label fresh samples (online rounds need another labeler)")
        try:
            result = preferences.ingest(self.source, self.out, self.data_cfg)
        except preferences.DataError as error:
            raise LabelingError(f"data.source: {error}") from error
        if not result.ok:
            shown = "\n".join(entry.message() for entry in result.quarantine[:20])
            raise LabelingError(
                f"{self.source}: {result.report['quarantined_rows']} of {result.report['rows']} rows quarantined "
                f"(more than data.max_invalid_fraction={self.data_cfg.max_invalid_fraction}), see "
                f"{self.out / 'quarantine.jsonl'}\n{shown}"
            )
        return result.pairs, preferences.report_metrics(result.report)
