#!/usr/bin/env bash
# Install (first time only) and start the coordinator; arguments go to `python -m coordinator`.
EXTRAS= source "$(dirname "$0")/venv.sh"
exec .venv/bin/python -m coordinator "$@"
