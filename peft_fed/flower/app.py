"""The Flower apps of a peft-fed deployment: ``server_app`` and ``client_app``.

A Flower app's ``pyproject.toml`` names them (see ``examples/flower_app/``)::

    [tool.flwr.app.components]
    serverapp = "peft_fed.flower.app:server_app"
    clientapp = "peft_fed.flower.app:client_app"

The server's settings are the app's run config (the keys of ``peft-fed train``, plus the deployment's:
``round_timeout``, ``min_replies``, ``round_retries``, ``node_wait``, ``min_nodes``); a node's are its
``--node-config`` (``partition-id`` or ``data-path`` + ``client-id``, ``state-dir``).
"""

from __future__ import annotations

import logging

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from .node import node_runtime
from .records import (
    MalformedMessageError,
    ProtocolMismatchError,
    pack_node_info,
    pack_reply,
    unpack_query,
    unpack_task,
)
from .secure import (
    is_secure_task,
    pack_secure_reply,
    secure_aggregation_mod,
    secure_contribution,
    unpack_secure_task,
)
from .server import serve

logger = logging.getLogger(__name__)

#: Flower error code of a message a node refuses (a peer of another protocol, a malformed task, a bad node config)
REFUSED = 20

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    from ..cli import configure_logging

    configure_logging("info")
    serve(grid, context.run_config)


def _refuse(message: Message, error: Exception) -> Message:
    logger.error("refused a %s message: %s", message.metadata.message_type, error)
    return Message(Error(code=REFUSED, reason=str(error)), reply_to=message)


@client_app.query()
def node_query(message: Message, context: Context) -> Message:
    """Which client this node is (and, loading the model and data now, that it can serve the run)."""
    try:
        settings, _ = unpack_query(message.content)
        runtime = node_runtime(settings, context.node_config)
    except (ProtocolMismatchError, MalformedMessageError, ValueError) as error:
        return _refuse(message, error)
    return Message(pack_node_info(runtime.info()), reply_to=message)


@client_app.train(mods=[secure_aggregation_mod])
def node_train(message: Message, context: Context) -> Message:
    """One client round on this node's data (see :class:`peft_fed.flower.node.NodeRuntime`); in a secure round
    (SecAgg+), the reply's upload is masked by ``secure_aggregation_mod`` before it leaves the node."""
    secure = is_secure_task(message.content)
    try:
        task = unpack_secure_task(message.content) if secure else unpack_task(message.content)
        runtime = node_runtime(task.settings, context.node_config)
    except (ProtocolMismatchError, MalformedMessageError, ValueError) as error:
        return _refuse(message, error)
    reply = runtime.train(task)
    if not secure:
        return Message(pack_reply(reply), reply_to=message)
    if reply.failure is not None:  # SecAgg+ drops a node that answers with an error and recovers its masks
        return _refuse(message, RuntimeError(f"client {reply.client_id} {reply.failure}"))
    try:
        arrays = secure_contribution(reply, message.content, task.broadcast, runtime.trainer.strategy)
    except MalformedMessageError as error:
        return _refuse(message, error)
    return Message(pack_secure_reply(reply, arrays), reply_to=message)
