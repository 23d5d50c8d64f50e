#!/usr/bin/env bash
# Install the test extras (first time only) and run the whole suite; arguments go to pytest.
EXTRAS=test source "$(dirname "$0")/venv.sh"
exec .venv/bin/python -m pytest "$@"
