"""The connection state machine, as one table (after h11's _state.py).

Each state names what the core is waiting for; a trigger moves it on.  Any
(state, trigger) pair missing from the table is a bug in the core itself.
"""

from __future__ import annotations

from enum import Enum, auto

from .errors import LocalProtocolError


class State(Enum):
    AWAIT_CLIENT_FLAGS = auto()   # greeting sent, 4 bytes of client flags due
    AWAIT_OPTION = auto()         # 16-byte option request header due
    OPTION_PAYLOAD = auto()       # option data (bounded) due
    OPTION_DISCARD = auto()       # dropping an oversized option's data
    TLS_UPGRADE = auto()          # STARTTLS acknowledged: the transport runs the TLS handshake
    AWAIT_REQUEST = auto()        # 28-byte request header due (transmission)
    WRITE_PAYLOAD = auto()        # NBD_CMD_WRITE data due
    WRITE_DISCARD = auto()        # dropping the data of a refused write
    CLOSED = auto()               # session over (cleanly or by policy)
    ERROR = auto()                # the peer broke the protocol

    __hash__ = object.__hash__    # members are singletons; Enum's own hashes the name, in Python


class Trigger(Enum):
    FLAGS_OK = auto()
    OPTION_HEADER = auto()
    OPTION_TOO_BIG = auto()
    OPTION_DONE = auto()
    GO = auto()                   # NBD_OPT_GO ACK / NBD_OPT_EXPORT_NAME reply sent
    START_TLS = auto()            # NBD_REP_ACK to NBD_OPT_STARTTLS queued
    TLS_STARTED = auto()          # the transport finished the TLS handshake
    REQUEST_DONE = auto()
    WRITE_HEADER = auto()
    WRITE_REFUSED = auto()
    CLOSE = auto()                # DISC, ABORT, EOF, unknown EXPORT_NAME
    PROTOCOL_ERROR = auto()

    __hash__ = object.__hash__


S, T = State, Trigger
TRANSITIONS: dict[State, dict[Trigger, State]] = {
    S.AWAIT_CLIENT_FLAGS: {T.FLAGS_OK: S.AWAIT_OPTION},
    S.AWAIT_OPTION: {T.OPTION_HEADER: S.OPTION_PAYLOAD, T.OPTION_TOO_BIG: S.OPTION_DISCARD},
    S.OPTION_PAYLOAD: {T.OPTION_DONE: S.AWAIT_OPTION, T.GO: S.AWAIT_REQUEST, T.START_TLS: S.TLS_UPGRADE},
    S.OPTION_DISCARD: {T.OPTION_DONE: S.AWAIT_OPTION},
    S.TLS_UPGRADE: {T.TLS_STARTED: S.AWAIT_OPTION},
    S.AWAIT_REQUEST: {T.REQUEST_DONE: S.AWAIT_REQUEST, T.WRITE_HEADER: S.WRITE_PAYLOAD,
                      T.WRITE_REFUSED: S.WRITE_DISCARD},
    S.WRITE_PAYLOAD: {T.REQUEST_DONE: S.AWAIT_REQUEST},
    S.WRITE_DISCARD: {T.REQUEST_DONE: S.AWAIT_REQUEST},
    S.CLOSED: {},
    S.ERROR: {},
}
# From every live state the session can end.
for _state, _moves in TRANSITIONS.items():
    if _state not in (S.CLOSED, S.ERROR):
        _moves[T.CLOSE] = S.CLOSED
        _moves[T.PROTOCOL_ERROR] = S.ERROR

# States in which a peer EOF ends the session cleanly (a message boundary).
EOF_IS_CLEAN = {S.AWAIT_CLIENT_FLAGS, S.AWAIT_OPTION, S.AWAIT_REQUEST}
# States in which replies to requests may be sent.
TRANSMISSION = {S.AWAIT_REQUEST, S.WRITE_PAYLOAD, S.WRITE_DISCARD, S.CLOSED}


class StateMachine:
    def __init__(self):
        self.state = State.AWAIT_CLIENT_FLAGS

    def fire(self, trigger: Trigger) -> State:
        try:
            self.state = TRANSITIONS[self.state][trigger]
        except KeyError:
            raise LocalProtocolError(f"no transition from {self.state.name} on {trigger.name}") from None
        return self.state
