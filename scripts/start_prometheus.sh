#!/usr/bin/env bash
# Run Prometheus in the foreground, scraping Ray's and tunelab's metrics.
#
#   scripts/start_prometheus.sh                   # every node of the latest Ray session
#   scripts/start_prometheus.sh HOST:PORT ...     # explicit metrics export ports
#
# With no argument it uses the config Ray writes for its latest session
# ($RAY_TMPDIR/session_latest/metrics/prometheus/prometheus.yml, which finds
# every node through Ray's service-discovery file; needs a head started with
# the dashboard, the default of `ray start --head`). With HOST:PORT arguments
# it scrapes those targets: a head started with
# `ray start --head --metrics-export-port=PORT`, or the local Ray of
# `TUNELAB_METRICS_EXPORT_PORT=PORT platform sweep ...`.
# Installs Debian's prometheus when missing (root + apt). Environment knobs:
# PROMETHEUS_PORT (9090), PROMETHEUS_DATA (~/.cache/tunelab/prometheus),
# SCRAPE_INTERVAL (5s), RAY_TMPDIR (/tmp/ray). Stop it with Ctrl-C.
# Then point Grafana at it: RAY_PROMETHEUS_HOST=http://localhost:9090
# (dashboards/README.md).
set -euo pipefail

port=${PROMETHEUS_PORT:-9090}
data=${PROMETHEUS_DATA:-$HOME/.cache/tunelab/prometheus}
interval=${SCRAPE_INTERVAL:-5s}
ray_tmp=${RAY_TMPDIR:-/tmp/ray}

if ! command -v prometheus >/dev/null; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "start_prometheus.sh: prometheus is not installed (apt-get install prometheus, as root)" >&2
    exit 3
  fi
  apt-get install -y --no-install-recommends prometheus >/dev/null \
    || { apt-get update >/dev/null && apt-get install -y --no-install-recommends prometheus >/dev/null; }
fi

mkdir -p "$data"
config="$data/prometheus.yml"
if [ $# -eq 0 ]; then
  discovery="$ray_tmp/session_latest/prom_metrics_service_discovery.json"
  if [ ! -e "$discovery" ]; then
    echo "start_prometheus.sh: no $discovery; start the head with its dashboard, or pass HOST:PORT" >&2
    exit 2
  fi
  targets="  file_sd_configs:
  - files: ['$discovery']"
else
  list=$(printf "'%s', " "$@")
  targets="  static_configs:
  - targets: [${list%, }]"
fi
cat >"$config" <<EOF
global:
  scrape_interval: $interval
  evaluation_interval: $interval
scrape_configs:
- job_name: ray
$targets
EOF
echo "prometheus on http://localhost:$port (config $config)" >&2
exec prometheus --config.file="$config" --storage.tsdb.path="$data" \
  --web.listen-address=":$port" --log.level=warn
