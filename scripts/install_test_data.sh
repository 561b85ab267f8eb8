#!/usr/bin/env bash
# Installs the Debian packages that the tests and benchmarks use: data (DATA.md) and the headless
# Chromium that drives the dashboard's browser test. Needs root;
# without it, prints the command to run and leaves the decision to the user.
set -u
pkgs=()
[ -d /usr/share/datasets/fashion-mnist ] || pkgs+=(dataset-fashion-mnist)
[ -x /usr/bin/chromium ] || pkgs+=(chromium)
[ -x /usr/bin/chromedriver ] || pkgs+=(chromium-driver)
[ ${#pkgs[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "note: tests that need ${pkgs[*]} will be skipped; install with: sudo apt-get install ${pkgs[*]}" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "${pkgs[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1; apt-get install -y -q "${pkgs[@]}" >/dev/null; }
