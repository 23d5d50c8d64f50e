# Agent Coordinator: a small sidecar image.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
# Few malloc arenas: the reader threads' large transient answers otherwise keep RSS high.
ENV MALLOC_ARENA_MAX=2
WORKDIR /app

COPY pyproject.toml setup.cfg README.md ./
COPY coordinator.py ./
COPY coordinator_core ./coordinator_core
COPY routes ./routes
COPY store ./store
# Both optional extras: METRICS_ENABLED and AUTH_ENABLED work without rebuilding the image.
RUN pip install ".[metrics,oidc]" \
    && useradd --system --uid 1000 --home-dir /app coordinator \
    && mkdir -p /app/.agent-orchestrator \
    && chown coordinator /app/.agent-orchestrator

USER coordinator
# The database and the agents directory live here (relative to the project dir, /app).
VOLUME ["/app/.agent-orchestrator"]
EXPOSE 8765
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8765/health', timeout=4).status != 200)"
CMD ["python", "-m", "coordinator", "--host", "0.0.0.0", "--port", "8765"]
