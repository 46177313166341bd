# MedRegion-CT: region-focused report generation for 3D chest CT.
# Entry point: `snakemake --cores 2 all` runs the demo (config/config.yaml); see README.md.
from pathlib import Path

from snakemake.utils import min_version, validate

from pipeline.config_check import check_unknown_keys

min_version("9.0")


# The demo config, found from any working directory; --configfile files are merged over it.
configfile: str(Path(workflow.basedir) / "config" / "config.yaml")


# A key the schema does not know (a typo) stops here, naming it and the nearest valid key, before the
# schema's own validation (which fills the defaults every rule reads).
check_unknown_keys(config)
validate(config, "workflow/schemas/config.schema.yaml")


# Every job imports pipeline/ and model/ from this repository, also inside the envs/ conda environments,
# which do not install the project (Snakemake copies env files elsewhere, so no relative path can reach it).
shell.prefix(
    f"set -euo pipefail; export PYTHONPATH={workflow.basedir}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
)


report: "workflow/report/workflow.rst"


# Jobs that only gather files run on the submitting node, not as cluster jobs.
localrules:
    all,
    export_masks,


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/llm.smk"
include: "workflow/rules/dicom_import.smk"
include: "workflow/rules/cohort.smk"
include: "workflow/rules/segment.smk"
include: "workflow/rules/regions.smk"
include: "workflow/rules/attributes.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/reports.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/samples.smk"
include: "workflow/rules/export.smk"


rule all:
    default_target: True
    input:
        all_outputs,
