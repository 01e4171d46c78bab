# syntax=docker/dockerfile:1
# The wallet service: `wallet serve` on port 8000. Build: docker build -t wallet .
# The builder installs the locked dependencies and the project into /opt/venv; the runtime stage
# copies only that venv, so no compiler, pip cache or source tree reaches the final image.

FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build

# The dependencies first, exactly as locked (every one pinned, every file checked against its
# hash: `make lock` writes requirements.txt), so a source change reuses this layer.
COPY requirements.txt ./
RUN pip install --require-hashes --requirement requirements.txt

# Then the project itself, as a wheel (migrations included as package data), without
# dependencies: the lock has them all, and pip check proves it.
COPY pyproject.toml ./
COPY src ./src
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && pip install --no-deps /wheels/*.whl \
 && pip check


FROM python:3.11-slim AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 wallet \
 && useradd --system --uid 10001 --gid wallet --home-dir /var/lib/wallet --shell /usr/sbin/nologin wallet \
 && install --directory --owner wallet --group wallet /var/lib/wallet
COPY --from=builder /opt/venv /opt/venv

# The default database URL (sqlite+aiosqlite:///wallet.db) is relative: the file lands here.
WORKDIR /var/lib/wallet
USER wallet

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/api/v1/health/ready', timeout=2)"]
ENTRYPOINT ["wallet"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
