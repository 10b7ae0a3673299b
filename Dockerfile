FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY pantheon_es ./pantheon_es
COPY projections ./projections
COPY tools ./tools
RUN pip install --no-cache-dir . && useradd --create-home pantheon && mkdir /data && chown pantheon /data
USER pantheon
ENTRYPOINT []
CMD ["pantheon", "up", "--data-dir", "/data"]
