"""ClientApps for tests: pollinate's real client with one behaviour changed (faulty uploads, a dropout, a hostile
node)."""

from __future__ import annotations

from flwr.clientapp import ClientApp


def answer_honestly(app: ClientApp) -> None:
    """Register pollinate's own evaluate and query handlers on ``app``: a test app changes train only."""
    from pollinate.client.app import describe_node, evaluate_adapter

    app.evaluate()(evaluate_adapter)
    app.query()(describe_node)
