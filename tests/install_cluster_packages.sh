#!/usr/bin/env bash
# System packages for the launcher tests (tests/test_cluster.py): SLURM + munge for a throwaway local
# cluster, Open MPI for mpirun and srun --mpi=pmix; and WordNet 3.0 for the synonym attack
# (rose_ds/attacks.py, tests/test_attacks.py). Debian 12, root. Elsewhere it says so and exits 0:
# those tests then skip, naming what is missing.
set -euo pipefail
PACKAGES=(slurm-wlm munge libpmix2 openmpi-bin libopenmpi-dev wordnet-base wordnet-sense-index)
if [[ $EUID -ne 0 ]] || ! command -v apt-get > /dev/null; then
    echo "install_cluster_packages.sh: not root on a Debian-like system; not installing ${PACKAGES[*]}" >&2
    exit 0
fi
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2> /dev/null | grep -q "install ok installed" || missing+=("$p")
done
if (( ${#missing[@]} == 0 )); then
    exit 0
fi
# The packages' maintainer scripts would start munge/slurm services; the tests start their own daemons.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created_policy=1
fi
trap 'if [[ $created_policy == 1 ]]; then rm -f "$policy"; fi' EXIT
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends "${missing[@]}" > /dev/null \
    || { apt-get update -q > /dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" > /dev/null; }
echo "install_cluster_packages.sh: installed ${missing[*]}"
