#!/usr/bin/env bash
# Run pytest and refuse a run that tested nothing: pytest exits 5 when no test was collected, which
# must not pass silently (a broken collection) nor be mistaken for a test failure.
set -u
"$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating this as a failure (check the test paths and markers)" >&2
  exit 1
fi
exit "$rc"
