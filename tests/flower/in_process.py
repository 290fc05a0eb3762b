"""A Flower grid in one process: messages go straight to ``peft_fed.flower.app``'s ClientApp handlers.

It runs the deployment's server and node code (packing, node store, executor, drops) without processes or
sockets, so their exactness can be checked in a unit test; ``test_loopback.py`` runs the real thing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from flwr.app import Context, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.supercore.task_identity import TaskIdentity

from peft_fed.flower import node as node_module
from peft_fed.flower.app import client_app
from peft_fed.flower.records import TRAIN


class InProcessGrid:
    """``get_node_ids`` and ``send_and_receive`` over nodes given by their node configs.

    ``lost(round_index, node_id) -> bool`` makes a node not answer a train message (a node that died);
    ``tamper(round_index, node_id, reply) -> reply`` changes a reply on its way (a faulty or hostile node). Like
    Flower 1.42's SuperNode, every message is served by a "fresh process": the node's in-memory runtime is dropped
    first, so whatever a node needs between rounds must come from its disk.
    """

    def __init__(
        self,
        node_configs: Mapping[int, Mapping],
        lost: Callable[[int, int], bool] | None = None,
        tamper: Callable[[int, int, Message], Message] | None = None,
    ) -> None:
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config=dict(config), state=RecordDict(), run_config={})
            for node, config in node_configs.items()
        }
        self.lost = lost or (lambda round_index, node: False)
        self.tamper = tamper or (lambda round_index, node, reply: reply)
        # what a ServerApp process has set when it builds messages
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.sent: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            self.sent.append(message)
            node = message.metadata.dst_node_id
            kind = message.metadata.message_type
            if kind == TRAIN and self.lost(_round_of(message), node):
                continue
            node_module._RUNTIMES.clear()  # a fresh ClientApp process per message
            # the node gets its own copy, through Flower's wire format, as over a network
            received = message_from_proto(message_to_proto(message))
            reply = client_app(received, self.contexts[node])  # the ClientApp with its mods, as a SuperNode runs it
            reply = message_from_proto(message_to_proto(reply))
            replies.append(self.tamper(_round_of(message), node, reply) if kind == TRAIN else reply)
        return replies


def _round_of(message: Message) -> int:
    """The round a train message belongs to (-1 for the key-exchange stages of secure aggregation)."""
    import json

    if "peft_fed.meta" not in message.content:
        return -1
    return int(json.loads(str(message.content["peft_fed.meta"]["body"]))["round"])
