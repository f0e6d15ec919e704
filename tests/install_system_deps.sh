#!/usr/bin/env bash
# Installs the Debian packages the Slurm testbed (tests/slurm_testbed.py) needs, and the headless
# Chromium the dashboard test loads its page in, when missing.
# Idempotent and non-interactive: safe to run on every CI job, as root, with no stdin.
set -euo pipefail

PACKAGES=(
  slurm-wlm slurmdbd munge mariadb-server mariadb-client
  openssh-server openssh-client rsync util-linux procps chromium
)

if [ "$(id -u)" -ne 0 ]; then
  echo "install_system_deps.sh: must run as root (apt-get install)" >&2
  exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "install_system_deps.sh: all packages present"
  exit 0
fi

echo "install_system_deps.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Package postinst scripts try to start services; this machine may have no init system, and the
# testbed starts its own daemons anyway, so forbid service starts during install.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  created_policy=1
fi
trap 'if [ "$created_policy" -eq 1 ]; then rm -f "$policy"; fi' EXIT

apt-get update -q </dev/null
apt-get install -y -q --no-install-recommends \
  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
  "${missing[@]}" </dev/null
echo "install_system_deps.sh: done"
