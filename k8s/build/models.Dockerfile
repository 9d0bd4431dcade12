# A data-only model image for k8s/components/models-volume: the init container copies its
# /models into the pod's models volume. Build from the repository root:
#   docker build -f k8s/build/models.Dockerfile -t REGISTRY/genserve-models:TAG .
FROM busybox:1.36
COPY exported_models/ /models/
RUN rm -rf /models/.checkpoints && chmod -R a+rX /models
USER 1034:1034
