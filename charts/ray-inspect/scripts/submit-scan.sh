#!/bin/bash
# Run by the nightly CronJob's pod: create tonight's scan RayJob from /etc/ray-inspect/rayjob.yaml
# (or $RAYJOB_TEMPLATE) and wait until it has finished: exit 0 when the scan succeeded, 1 when it
# failed, 2 when the RayJob could not be created (the Job then retries the pod).
# The RayJob is named after the scheduled minute (the suffix of the CronJob's Job name), so a
# retried pod re-attaches to the same RayJob instead of launching a second scan.
set -uo pipefail
k() { kubectl --namespace "${POD_NAMESPACE}" "$@"; }
minute="${CRONJOB_JOB_NAME##*-}"
name="${RAYJOB_PREFIX}-${minute}"
if ! k get rayjob "$name" -o name >/dev/null 2>&1; then
  sed "s/__RAYJOB_NAME__/${name}/" "${RAYJOB_TEMPLATE:-/etc/ray-inspect/rayjob.yaml}" | k create -f - || exit 2
fi
echo "waiting for rayjob/${name}"
while true; do
  status="$(k get rayjob "$name" -o jsonpath='{.status.jobDeploymentStatus}/{.status.jobStatus}' 2>/dev/null)" || status="unknown/"
  case "$status" in
    Complete/SUCCEEDED)
      echo "rayjob/${name}: scan succeeded"; exit 0 ;;
    Complete/*|Failed/*|ValidationFailed/*)
      echo "rayjob/${name}: ${status}: $(k get rayjob "$name" -o jsonpath='{.status.message}' 2>/dev/null)" >&2
      exit 1 ;;
  esac
  sleep "${POLL_SECONDS:-60}"
done
