#!/usr/bin/env bash
# azd postprovision hook: import every infra/grafana/*.json dashboard into the
# environment's Managed Grafana, overwriting the previous version. Needs the
# Azure CLI (with the amg extension, added if missing) and Grafana Admin, which
# main.bicep grants to the deployer (AZURE_PRINCIPAL_ID).
set -euo pipefail
cd "$(dirname "$0")/../.."

shopt -s nullglob
dashboards=(infra/grafana/*.json)
if [ ${#dashboards[@]} -eq 0 ]; then
  echo "No dashboards in infra/grafana/: nothing to import."
  exit 0
fi
: "${AZURE_GRAFANA_NAME:?not set: run azd provision first}"
: "${AZURE_RESOURCE_GROUP:?not set: run azd provision first}"

az extension add --name amg --upgrade --only-show-errors >/dev/null

for f in "${dashboards[@]}"; do
  # A new Grafana Admin role assignment can take a few minutes to apply.
  for attempt in 1 2 3 4 5 6; do
    if az grafana dashboard import --name "$AZURE_GRAFANA_NAME" --resource-group "$AZURE_RESOURCE_GROUP" \
      --definition "$f" --overwrite true --only-show-errors >/dev/null; then
      echo "Imported $f"
      break
    fi
    if [ "$attempt" -eq 6 ]; then
      echo "Could not import $f into $AZURE_GRAFANA_NAME" >&2
      exit 1
    fi
    echo "Import of $f failed (attempt $attempt); retrying in 30 s"
    sleep 30
  done
done
