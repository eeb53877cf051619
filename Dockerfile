# kfeed: one image for `kfeed serve`, `kfeed ingest` and `kfeed sim` (the command picks).

# The dashboard, built by Vite from web/ and the generated TypeScript (served by --web-listen).
FROM node:20-slim AS web
WORKDIR /src
COPY web/package.json web/package-lock.json web/
RUN cd web && npm ci --no-audit --no-fund --loglevel=error
COPY web web
COPY clients/typescript/src/gen clients/typescript/src/gen
RUN cd web && npm run build

FROM python:3.11-slim

# uv from PyPI (the project's pinned uv.lock does the rest); no Python downloads: use the image's.
RUN pip install --no-cache-dir "uv>=0.8,<1"
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    PYTHONUNBUFFERED=1

WORKDIR /app

# Dependencies first, in their own layer: code changes do not reinstall them.
COPY pyproject.toml uv.lock README.md ./
COPY clients/python/pyproject.toml clients/python/
RUN uv sync --frozen --no-dev --no-install-project --no-install-workspace

COPY . .
RUN uv sync --frozen --no-dev
COPY --from=web /src/web/dist /app/web/dist

# Run unprivileged; /data holds the ingest spool (and SQLite, when used).
RUN useradd --system --uid 10001 --home-dir /data --create-home kfeed
USER kfeed
WORKDIR /data
ENV PATH="/app/.venv/bin:$PATH"

ENTRYPOINT ["kfeed"]
CMD ["serve", "--listen", "127.0.0.1:50051"]
