#!/usr/bin/env bash
# buf breaking for the kfeed.v1 contract. Two references:
#  - the commit that first published proto/ (the v1 baseline clients were generated from), so no
#    change since then may break them, however many commits it took;
#  - main as the remote knows it when there is one (else HEAD~1), so newer additions are kept too.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
baseline=$(git log --diff-filter=A --format=%H --reverse -- proto/kfeed/v1 | head -n 1)
refs=()
[ -n "$baseline" ] && refs+=("$baseline")
if git rev-parse --verify --quiet origin/main >/dev/null; then
  refs+=("$(git rev-parse origin/main)")
elif git rev-parse --verify --quiet HEAD~1 >/dev/null; then
  refs+=("$(git rev-parse HEAD~1)")
fi
for ref in "${refs[@]}"; do
  if [ -z "$(git ls-tree -r --name-only "$ref" -- proto/kfeed/v1)" ]; then
    continue
  fi
  echo "buf breaking against ${ref:0:12}"
  npx --no-install buf breaking --against ".git#ref=${ref},subdir=proto"
done
