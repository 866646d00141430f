#!/usr/bin/env bash
# Runs every end-to-end benchmark and regenerates docs/BENCHMARKS.md:
# migration, the guest's cost of mirroring, and journal first (they write
# target/bench/{migration-table,mirror-cost,journal-table}.md), then the ferry /
# qemu-storage-daemon / fio comparison, whose report (benches/report.py) fills
# benches/report-template.md with its own tables and those three.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash benches/migration.sh
bash benches/mirror_cost.sh
bash benches/journal.sh
bash benches/compare.sh
