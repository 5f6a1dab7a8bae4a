"""Training status codes of a site, as in the seed (fed_learn.client.client_status)."""

from __future__ import annotations


class ClientStatus:
    """Status codes and their messages."""

    TRAINING_NOT_STARTED = 0
    TRAINING_STARTING = 1
    TRAINING_STARTED = 2
    TRAINING_STOPPED = 3
    TRAINING_EXCEPTION = 4

    status_messages = {
        TRAINING_NOT_STARTED: "training not started",
        TRAINING_STARTING: "training starting",
        TRAINING_STARTED: "training started",
        TRAINING_STOPPED: "training stopped",
        TRAINING_EXCEPTION: "training exception",
    }


def get_status_message(status: int) -> str:
    """The words for a status code; unknown codes are named as such."""
    return ClientStatus.status_messages.get(status, f"unknown status {status}")
