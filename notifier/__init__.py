"""Swimmy notifier: a non-blocking relay from ZeroMQ producers to Discord webhooks."""

__version__ = "0.1.0"
PROJECT_URL = "https://github.com/swimmy/notifier"
