# Clair's image: `pip install .` on Python 3.11. PyPI's torch wheel (pinned in requirements.txt) brings CUDA's
# libraries; the host's NVIDIA driver comes in through the NVIDIA Container Toolkit (compose.yaml).
# Not built on the project's machines (no image registry there): checked offline by tests/test_packaging.py.
FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HOME=/data/huggingface \
    CLAIR_OUTPUT_DIR=/data/outputs \
    CLAIR_STATE_DIR=/data/state \
    CLAIR_LISTEN=1

# Its own user; the folders the volumes mount on belong to it (a new named volume takes their owner).
RUN groupadd --system --gid 10001 clair \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/clair clair \
    && install -d -o clair -g clair /data /data/outputs /data/state /data/huggingface

WORKDIR /opt/clair
# The dependencies first: a change to Clair's code does not download torch again.
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt
COPY pyproject.toml README.md ./
COPY clair ./clair
COPY assets ./assets
RUN pip install --no-cache-dir --no-deps .

USER 10001:10001
WORKDIR /data
# 7860: the web app and /v1; 11435: the Ollama-compatible API (CLAIR_OLLAMA_PORT).
EXPOSE 7860 11435
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/healthz', timeout=4)"]
# Serves every interface of the container (CLAIR_LISTEN=1), so it needs users first:
#   docker compose run --rm clair clair adduser me
CMD ["clair"]
