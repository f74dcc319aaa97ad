"""An in-process Flower ``Grid``: the same ServerApp and ClientApp, no network, no Ray.

It stands in for the transport only (a test double for the network, docs/DESIGN.md §2): messages are
real Flower ``Message``s, each virtual site has its own ``Context`` with ``partition-id`` like in
Flower's simulation engine, and a ClientApp exception becomes an error reply exactly as the real
runtimes report it. Used by the fast tests and by ``fedcl simulate --engine inprocess``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

ERROR_CLIENT_APP_RAISED = 2  # Flower's code for "ClientApp raised an exception"

Interceptor = Callable[[int, Message, Context], Message | None]


class LocalGrid(Grid):
    """Delivers each message to a ClientApp in this process and collects the replies."""

    def __init__(
        self,
        client_app: ClientApp,
        num_sites: int,
        *,
        node_configs: list[dict] | None = None,
        run_id: int = 1,
        intercept: Interceptor | None = None,
    ) -> None:
        self.client_app = client_app
        self.intercept = intercept
        self._run = Run.create_empty(run_id=run_id)
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = 0
        TaskIdentity.task_id = 1
        self.contexts: dict[int, Context] = {}
        for i in range(num_sites):
            node_id = 1000 + i
            cfg = {"partition-id": i, "num-partitions": num_sites}
            if node_configs is not None:
                cfg.update(node_configs[i])
            self.contexts[node_id] = Context(
                run_id=run_id, node_id=node_id, node_config=cfg, state=RecordDict(), run_config={}
            )
        self.offline: set[int] = set()
        self._replies: dict[str, Message] = {}

    # --- Grid interface -------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg_id = str(uuid4())
            msg.metadata.__dict__["_message_id"] = msg_id
            reply = self._deliver(msg)
            if reply is not None:
                self._replies[msg_id] = reply
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        return list(self.pull_messages(self.push_messages(messages)))

    # --- delivery ---------------------------------------------------------------------------
    def _deliver(self, msg: Message) -> Message | None:
        node_id = msg.metadata.dst_node_id
        if node_id in self.offline or node_id not in self.contexts:
            return None  # a dropped site simply never answers
        context = self.contexts[node_id]
        try:
            if self.intercept is not None:
                reply = self.intercept(node_id, msg, context)
                if reply is not None:
                    return reply
            # The real runtimes serialise messages; a deep copy keeps the ServerApp's records
            # safe from a ClientApp that mutates what it received.
            return self.client_app(copy_message(msg), context)
        except Exception as exc:
            return Message(
                Error(ERROR_CLIENT_APP_RAISED, f"{type(exc).__name__}: {exc}"), reply_to=msg
            )


def copy_message(msg: Message) -> Message:
    """A deep copy, so a ClientApp can never mutate what the ServerApp still holds."""
    clone = copy.copy(msg)
    clone.__dict__["_content"] = copy.deepcopy(msg.content)
    return clone
