#!/usr/bin/env bash
# Installs the Debian packages that some tests and benchmarks use:
#   dataset-fashion-mnist      Fashion-MNIST (DATA.md) for the image tests and `ds bench realtime`
#   chromium, chromium-driver  the headless browser that drives the dashboard test (tests/test_dashboard.py)
# It never fails `make test`: without root, or when apt cannot install them (no network, no mirror), it prints
# the command to run and exits 0; the tests that need a missing package skip and name the same command.
set -u
pkgs=()
[ -d /usr/share/datasets/fashion-mnist ] || pkgs+=(dataset-fashion-mnist)
[ -x /usr/bin/chromium ] || pkgs+=(chromium)
[ -x /usr/bin/chromedriver ] || pkgs+=(chromium-driver)
[ ${#pkgs[@]} -eq 0 ] && exit 0
note() {
  echo "note: $1; the tests that need ${pkgs[*]} will be skipped; install with: sudo apt-get install ${pkgs[*]}" >&2
  exit 0
}
[ "$(id -u)" -eq 0 ] || note "not root"
export DEBIAN_FRONTEND=noninteractive
apt=(apt-get -q -y -o Acquire::Retries=0 -o Acquire::http::Timeout=10 -o Acquire::https::Timeout=10)
timeout 300 "${apt[@]}" install "${pkgs[@]}" >/dev/null 2>&1 && exit 0
{ timeout 120 "${apt[@]}" update >/dev/null 2>&1 && timeout 300 "${apt[@]}" install "${pkgs[@]}" >/dev/null 2>&1; } ||
  note "apt-get could not install them (no network or no mirror?)"
