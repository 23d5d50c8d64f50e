#!/usr/bin/env bash
# Install the test extras (first time only) and run the whole suite; arguments go to pytest.
EXTRAS=test source "$(dirname "$0")/venv.sh"
# The PostgreSQL tests need a server: COORDINATOR_TEST_DATABASE_URL, or the server binaries to
# start a throwaway one (Debian's `postgresql` package, installed when absent and possible).
if [ -z "${COORDINATOR_TEST_DATABASE_URL:-}" ] && ! command -v initdb >/dev/null \
    && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } \
    || echo "postgresql could not be installed: the PostgreSQL tests will fail" >&2
fi
exec .venv/bin/python -m pytest "$@"
