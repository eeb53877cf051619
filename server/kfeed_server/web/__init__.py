"""The web listener: kfeed.v1 over Connect and gRPC-Web for browsers, and the dashboard."""

from kfeed_server.web.app import WebConfig, build_web_app
from kfeed_server.web.listener import WebListener

__all__ = ["WebConfig", "WebListener", "build_web_app"]
