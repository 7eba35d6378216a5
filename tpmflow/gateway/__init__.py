"""The gateway in front of a pool's replicas (see :mod:`tpmflow.gateway.app`)."""

from tpmflow.gateway.app import ROUTES, Gateway, Route, create_app

__all__ = ["ROUTES", "Gateway", "Route", "create_app"]
