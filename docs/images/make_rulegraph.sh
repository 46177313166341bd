#!/usr/bin/env bash
# Redraws docs/images/rulegraph.png, the picture of the workflow's stages in the README, from the
# demo config (config/config.yaml). Needs Graphviz (`apt-get install graphviz`: dot and tred).
#
#   docs/images/make_rulegraph.sh              # stages only: an edge implied by a longer path is not drawn
#   docs/images/make_rulegraph.sh --all-edges  # every input edge (the QC tables make it dense)
#
# Extra arguments after the option go to Snakemake, e.g. `--configfile config/radgenome.yaml`.
set -euo pipefail
cd "$(dirname "$0")/../.."

reduce=tred
if [ "${1:-}" = "--all-edges" ]; then
    reduce=cat
    shift
fi

# Snakemake 9: the target comes first; --rulegraph takes its format (dot) as an optional value.
snakemake all --rulegraph dot "$@" 2>/dev/null | "$reduce" | dot -Tpng -Gdpi=110 > docs/images/rulegraph.png.tmp
mv docs/images/rulegraph.png.tmp docs/images/rulegraph.png
echo "wrote docs/images/rulegraph.png"
