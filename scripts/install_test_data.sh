#!/usr/bin/env bash
# Installs the Debian data packages that the tests and benchmarks use (DATA.md). Needs root;
# without it, prints the command to run and leaves the decision to the user.
set -u
pkgs=()
[ -d /usr/share/datasets/fashion-mnist ] || pkgs+=(dataset-fashion-mnist)
[ ${#pkgs[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "note: tests that need ${pkgs[*]} will be skipped; install with: sudo apt-get install ${pkgs[*]}" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "${pkgs[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1; apt-get install -y -q "${pkgs[@]}" >/dev/null; }
