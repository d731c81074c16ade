# One image for the coordinator and the nodes.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 FLWR_TELEMETRY_ENABLED=0 HF_HUB_OFFLINE=1
WORKDIR /app
COPY . /app
RUN pip install ".[postgres]"
# The coordinator's SuperLink port (`pollinate server --port`) and its status service (`--status-port`); nodes
# only connect out. Publish them on loopback or behind a firewall (docs/deployment-security.md, "Open surfaces").
EXPOSE 9092 9095
CMD ["pollinate", "--help"]
