#!/usr/bin/env bash
# Test the aiohttp range that pyproject.toml declares (aiohttp>=X,<4): for each version, a throwaway
# virtual environment with that aiohttp, ecobatch's other base dependencies and pytest runs the tests of
# the HTTP layer: parser errors in the OpenAI form and the aiohttp names server.py relies on, `ecobatch
# serve` as a process, access keys, the app on the simulated engine, vllm-http against faulty upstreams.
#
# Usage: scripts/test-aiohttp-range.sh [VERSION ...]
#   no VERSION: the floor X from pyproject.toml, then the newest release below 4 ("latest")
#   PYTHON=python3.11 chooses the interpreter of the environments (default: python3)
# Run it when changing the range or server.py's use of aiohttp (see docs/development.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# line 1: the floor; line 2: the other base dependencies; line 3: the test runner's, from the dev extra
mapfile -t spec < <("$PYTHON" - <<'EOF'
import re
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
def name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group().lower()
base = project["dependencies"]
[aiohttp] = [d for d in base if name(d) == "aiohttp"]
floor = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", aiohttp)
if floor is None or "<4" not in aiohttp.replace(" ", ""):
    raise SystemExit(f"pyproject.toml: expected aiohttp>=X,<4, found {aiohttp!r}")
runner = {"pytest", "pytest-asyncio", "pytest-timeout", "pytest-aiohttp"}
print(floor.group(1))
print(" ".join(d for d in base if name(d) != "aiohttp"))
print(" ".join(d for d in project["optional-dependencies"]["dev"] if name(d) in runner))
EOF
)
floor=${spec[0]}
read -r -a base <<<"${spec[1]}"
read -r -a runner <<<"${spec[2]}"
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=("$floor" latest)

TESTS=(
  tests/integration/test_http_limits.py
  tests/integration/test_serve_process.py
  tests/integration/test_access.py
  tests/integration/test_app_simulated.py
  tests/integration/test_vllm_http_failures.py
  # the official openai client is not a dependency of the product: left to `make test`
  --deselect tests/integration/test_app_simulated.py::test_the_official_openai_client_works_unchanged
)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for version in "${versions[@]}"; do
  if [ "$version" = latest ]; then pin="aiohttp<4"; else pin="aiohttp==$version"; fi
  env="$work/aiohttp-$version"
  "$PYTHON" -m venv "$env"
  "$env/bin/python" -m pip install -q --disable-pip-version-check "$pin" "${base[@]}" "${runner[@]}"
  installed=$("$env/bin/python" -c 'import aiohttp; print(aiohttp.__version__)')
  echo "== aiohttp $installed ($pin)"
  PYTHONPATH="$PWD/proxy" "$env/bin/python" -m pytest -p no:cacheprovider -q "${TESTS[@]}"
done
