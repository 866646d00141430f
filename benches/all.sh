#!/usr/bin/env bash
# Runs every end-to-end benchmark and regenerates docs/BENCHMARKS.md:
# migration and journal first (they write target/bench/{migration,journal}.md), then the
# ferry / qemu-storage-daemon / fio comparison, whose report appends those sections.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash benches/migration.sh
if [[ -f benches/journal.sh ]]; then bash benches/journal.sh; fi
bash benches/compare.sh
