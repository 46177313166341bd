"""Reports stage: the ground truth per volume, as six region texts plus the full findings.

Region texts come from RadGenome's grounded sentences (`Volumename, Anatomy, Sentence`): the first
element of an anatomy path (`lung/lung/right lung/...`) is rolled up to one of the six regions by the
`report_regions` table of `config/regions.yaml` (an anatomy that is a region's own key, as an own-data
table's region texts are written, is that region); rows with an empty anatomy hold the whole report and
are not region text. A volume without grounded sentences gets its findings split into sentences and
every sentence assigned to a region (`pipeline.evaluate.sections`: organ terms, then finding terms, then
the previous sentence's region); grounded "others" rows are placed by `classify_sentence` (dropped when
they name no anatomy).

Output `results/reports/<split>.parquet`: volume_id, patient_id, split, findings, impressions, the six
region columns (REGIONS), `region_source` (grounded | keywords) and the 18 CT-RATE label columns.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import yaml

from pipeline.constants import CTRATE_CLASSES, REGIONS, SPLITS

# The free-text sentence -> region classifier lives with the evaluation (it also splits merged predictions):
# organ terms first, then finding terms, then the previous sentence's topic; see pipeline.evaluate.sections.
from pipeline.evaluate.sections import assign_regions, classify_sentence, split_report, split_sentences
from pipeline.io import InputError, setup_logging, write_parquet

KEYWORDS = "keywords"  # report_regions value: place each sentence by `classify_sentence`
__all__ = ["assign_regions", "classify_sentence", "split_report", "split_sentences"]


def load_report_regions(table: Path) -> dict[str, str]:
    raw = yaml.safe_load(Path(table).read_text(encoding="utf-8"))
    mapping = {str(k): str(v) for k, v in raw["report_regions"].items()}
    bad = sorted(set(mapping.values()) - set(REGIONS) - {KEYWORDS})
    if bad:
        raise ValueError(f"{table}: report_regions maps to unknown regions {bad}")
    return mapping


def region_texts_from_grounded(
    region_rows: pd.DataFrame, report_regions: dict[str, str], source: str
) -> dict[str, dict[str, str]]:
    """volume_id -> region -> text, sentences kept in file order."""
    out: dict[str, dict[str, list[str]]] = {}
    unknown: set[str] = set()
    for vid, anatomy, sentence in region_rows[["Volumename", "Anatomy", "Sentence"]].itertuples(index=False):
        vid = re.sub(r"\.nii(\.gz)?$", "", str(vid))
        anatomy = str(anatomy or "").strip()
        if not anatomy:
            continue  # whole-report rows
        top = anatomy.split("/")[0].strip()
        # an own-data table's region texts name the region itself (pipeline.own_data.write_ground_truth)
        region = report_regions.get(top) or (top if top in REGIONS else None)
        if region is None:
            unknown.add(top)
            continue
        if region == KEYWORDS:
            region = classify_sentence(str(sentence))
            if region is None:
                continue
        out.setdefault(vid, {r: [] for r in REGIONS})[region].append(str(sentence).strip())
    if unknown:
        raise InputError(f"{source}: anatomy regions not in report_regions: {sorted(unknown)}")
    return {vid: {r: " ".join(s) for r, s in regions.items()} for vid, regions in out.items()}


def region_texts_from_keywords(findings: str) -> dict[str, str]:
    """Every sentence of a free-text findings text placed in one of the six regions."""
    return split_report(findings)


def _read_csv(path: Path, what: str, **kw: object) -> pd.DataFrame:
    """A CSV read as UTF-8; an undecodable or malformed file is an InputError naming it."""
    try:
        return pd.read_csv(path, encoding="utf-8", **kw)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputError(f"{path}: cannot parse {what} CSV: {exc}") from None


def read_labels(paths: Sequence[Path]) -> pd.DataFrame:
    frames = []
    for path in paths:
        df = _read_csv(path, "label")
        missing = [c for c in ("VolumeName", *CTRATE_CLASSES) if c not in df.columns]
        if missing:
            raise InputError(f"{path}: label CSV lacks columns {missing}")
        df = df[["VolumeName", *CTRATE_CLASSES]].rename(columns={"VolumeName": "volume_id"})
        df["volume_id"] = df["volume_id"].str.replace(r"\.nii(\.gz)?$", "", regex=True)
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["volume_id", *CTRATE_CLASSES])


def build_reports(
    manifest: pd.DataFrame, region_csvs: Sequence[Path], label_csvs: Sequence[Path], table: Path
) -> pd.DataFrame:
    report_regions = load_report_regions(table)
    grounded: dict[str, dict[str, str]] = {}
    for path in region_csvs:
        rows = _read_csv(path, "region report", dtype=str, keep_default_na=False)
        if not {"Volumename", "Anatomy", "Sentence"} <= set(rows.columns):
            raise InputError(f"{path}: region report CSV needs columns Volumename, Anatomy, Sentence")
        grounded.update(region_texts_from_grounded(rows, report_regions, str(path)))
    records = []
    for row in manifest.itertuples(index=False):
        if row.volume_id in grounded:
            texts, source = grounded[row.volume_id], "grounded"
        else:
            texts, source = region_texts_from_keywords(row.findings), "keywords"
        records.append({"volume_id": row.volume_id, "patient_id": row.patient_id, "split": row.split,
                        "findings": row.findings, "impressions": row.impressions, **texts,
                        "region_source": source})
    reports = pd.DataFrame(records)
    labels = read_labels(label_csvs)
    reports = reports.merge(labels, on="volume_id", how="left")
    return reports


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.reports", description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--manifest", type=Path, required=True,
                    help="the cohort manifest (results/cohort.parquet):\nvolume_id, patient_id, split, findings, impressions")
    ap.add_argument("--region-csv", type=Path, nargs="*", default=[],
                    help="grounded region report CSVs (Volumename, Anatomy, Sentence); a volume in none of them\n"
                         "gets its findings split into region texts by keywords")
    ap.add_argument("--labels-csv", type=Path, nargs="*", default=[],
                    help="CT-RATE label CSVs (VolumeName and the 18 label columns)")
    ap.add_argument("--table", type=Path, required=True,
                    help="the label table (config/regions.yaml): its report_regions roll anatomies up to regions")
    ap.add_argument("--out-dir", type=Path, required=True,
                    help="folder for train.parquet, validation.parquet and test.parquet")
    args = ap.parse_args(argv)
    log = setup_logging()
    reports = build_reports(pd.read_parquet(args.manifest), args.region_csv, args.labels_csv, args.table)
    for split in SPLITS:
        part = reports[reports["split"] == split].reset_index(drop=True)
        write_parquet(part, args.out_dir / f"{split}.parquet")
        log.info("%s: %d reports (%d grounded)", split, len(part), int((part["region_source"] == "grounded").sum()))


if __name__ == "__main__":
    main()
