# The training image for k8s/training (torch + the genserve package; CPU torch by default).
# Build from the repository root:
#   docker build -f k8s/build/train.Dockerfile -t REGISTRY/genserve-train:TAG .
#   GPU: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
FROM python:3.11-slim
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN groupadd -g 1000 genserve && useradd -m -u 1000 -g 1000 genserve
WORKDIR /app
COPY pyproject.toml README.md ./
COPY numerics ./numerics
COPY artifact ./artifact
COPY training ./training
COPY service ./service
COPY report ./report
COPY cli ./cli
RUN pip install --index-url "$TORCH_INDEX_URL" torch==2.13.0 \
 && pip install '.[cpu]'
USER 1000:1000
ENTRYPOINT ["genserve"]
