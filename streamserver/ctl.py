"""`streamserver status` and `streamserver models load|unload`: an operator's client for a running server.

Plain HTTP against the server's own endpoints (`/gpu-status`, `/models/*`), with
the standard library only, so the tool works wherever the server is installed.
Exit status: 0 done, 1 the server refused or could not be reached, 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

COMMANDS = ("status", "models")
DEFAULT_URL = "http://127.0.0.1:8000"
STATUS_TIMEOUT = 10.0
LOAD_TIMEOUT = 900.0  # a large model on a cold cache takes minutes


class CtlError(Exception):
    """What went wrong, as one line for the operator."""


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("STREAMSERVER_URL", DEFAULT_URL),
                        help=f"the server (env STREAMSERVER_URL; default {DEFAULT_URL})")
    common.add_argument("--token", default=os.environ.get("STREAMSERVER_TOKEN")
                        or os.environ.get("STREAMSERVER_API_TOKEN"),
                        help="the server's API token (env STREAMSERVER_TOKEN or STREAMSERVER_API_TOKEN)")
    parser = argparse.ArgumentParser(prog="streamserver", description="Inspect and manage a running streamserver")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("status", parents=[common], help="devices, connections, memory and models as a table")
    models = commands.add_parser("models", help="load or unload one device's models")
    actions = models.add_subparsers(dest="action", required=True)
    for action in ("load", "unload"):
        sub = actions.add_parser(action, parents=[common], help=f"{action} the models of one device")
        sub.add_argument("--gpu", type=int, required=True, help="the device's gpu_id")
    return parser


def call(method: str, url: str, token: str | None, timeout: float) -> dict:
    """The JSON answer of one request; CtlError for an HTTP error or an unreachable server."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("error", "")
        except (ValueError, AttributeError):
            detail = ""
        raise CtlError(f"HTTP {exc.code} from {url}" + (f": {detail}" if detail else "")) from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CtlError(f"cannot reach {url}: {reason}") from exc


def format_table(rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def format_status(status: dict, url: str) -> str:
    kind = "simulated " if status["simulated"] else ""
    head = (f"{url}: {status['total_gpus']} {kind}device(s), {status['total_connections']} connection(s), "
            f"max {status['max_connections_per_gpu']} per device"
            + (", DRAINING" if status["draining"] else ""))
    rows = [["GPU", "DEVICE", "NAME", "CONNECTIONS", "MEMORY GB (USED/TOTAL)", "FREE GB", "UTIL", "MODELS"]]
    for g in status["gpus"]:
        rows.append([
            str(g["gpu_id"]), g["device"], g["name"], f"{g['active_connections']}/{g['max_connections']}",
            f"{g['allocated_memory_gb']:.2f}/{g['total_memory_gb']:.2f}", f"{g['free_memory_gb']:.2f}",
            f"{g['utilization_percent']:.1f}%", ", ".join(g["models"]) if g["models_loaded"] else "-",
        ])
    return head + "\n\n" + format_table(rows)


def run(args: argparse.Namespace) -> str:
    base = args.url.rstrip("/")
    if args.command == "status":
        return format_status(call("GET", f"{base}/gpu-status", args.token, STATUS_TIMEOUT), base)
    entry = call("POST", f"{base}/models/{args.action}?gpu={args.gpu}", args.token, LOAD_TIMEOUT)
    if entry["models_loaded"]:
        return f"GPU {entry['gpu_id']}: models loaded ({', '.join(entry['models'])})"
    return f"GPU {entry['gpu_id']}: models unloaded"


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(run(args))
    except CtlError as exc:
        print(f"streamserver {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0
