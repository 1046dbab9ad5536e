#!/usr/bin/env bash
# Prometheus and promtool from Debian, for the deploy tests (a real Prometheus scraping a running
# ecobatch; the alert rules checked and unit-tested by promtool). Skipped when both are on PATH.
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then exit 0; fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q >/dev/null
$SUDO apt-get install -y -q --no-install-recommends prometheus >/dev/null
# the package starts a service where systemd runs; the tests start their own
$SUDO systemctl stop prometheus >/dev/null 2>&1 || true
command -v promtool >/dev/null && promtool --version | head -1
