# Sourced by the other scripts: make sure .venv exists and holds this package
# (editable) with the extras named in $EXTRAS; reinstall only when setup.cfg changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "Python 3.11+ is required (set PYTHON=...)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=".venv/.installed-$(cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)-${EXTRAS:-none}"
if [ ! -e "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${EXTRAS:+[$EXTRAS]}"
  rm -f .venv/.installed-* && touch "$stamp"
fi
