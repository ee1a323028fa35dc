"""Tests: real processes on ipc sockets and loopback ports."""
