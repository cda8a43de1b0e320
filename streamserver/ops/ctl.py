"""`streamserver status` and `streamserver models load|unload`: an operator's client for running servers.

Plain HTTP against the server's own endpoints (`/gpu-status`, `/models/*`), with
the standard library only, so the tool works wherever the server is installed.
`status` takes `--url` more than once: every server is asked at the same time and
shown in one table, one row per device, with a TOTAL row; a server that cannot be
asked is a row saying why, and the others are still shown.
Exit status: 0 done, 1 a server refused or could not be reached, 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

COMMANDS = ("status", "models")
DEFAULT_URL = "http://127.0.0.1:8000"
STATUS_TIMEOUT = 10.0
LOAD_TIMEOUT = 900.0  # a large model on a cold cache takes minutes

MANY_HEADER = ["SERVER", "STATE", "GPU", "DEVICE", "NAME", "CONNECTIONS", "FREE SLOTS",
               "MEMORY GB (USED/TOTAL)", "MODELS"]


class CtlError(Exception):
    """What went wrong, as one line for the operator."""

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable  # no answer at all (as opposed to an HTTP error answer)


def build_parser() -> argparse.ArgumentParser:
    env_url = os.environ.get("STREAMSERVER_URL", DEFAULT_URL)
    token = argparse.ArgumentParser(add_help=False)
    token.add_argument("--token", default=os.environ.get("STREAMSERVER_TOKEN")
                       or os.environ.get("STREAMSERVER_API_TOKEN"),
                       help="the servers' API token (env STREAMSERVER_TOKEN or STREAMSERVER_API_TOKEN)")
    parser = argparse.ArgumentParser(prog="streamserver", description="Inspect and manage running streamservers")
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", parents=[token],
                                 help="devices, connections, memory and models as a table, for one server or many")
    status.add_argument("--url", action="append", dest="urls", metavar="URL",
                        help=f"a server; repeat for several (env STREAMSERVER_URL; default {DEFAULT_URL})")
    status.add_argument("--json", action="store_true", help="print every server's /gpu-status and the totals as JSON")
    status.set_defaults(env_url=env_url)
    models = commands.add_parser("models", help="load or unload one device's models")
    actions = models.add_subparsers(dest="action", required=True)
    for action in ("load", "unload"):
        sub = actions.add_parser(action, parents=[token], help=f"{action} the models of one device")
        sub.add_argument("--url", default=env_url, help=f"the server (env STREAMSERVER_URL; default {DEFAULT_URL})")
        sub.add_argument("--gpu", type=int, required=True, help="the device's gpu_id")
    return parser


def base_url(url: str) -> str:
    """`host:port` or `http(s)://host:port/`, as `http(s)://host:port`."""
    url = url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


def call(method: str, url: str, token: str | None, timeout: float) -> dict:
    """The JSON answer of one request; CtlError for an HTTP error or an unreachable server."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        request = urllib.request.Request(url, method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("error", "")
        except (ValueError, AttributeError):
            detail = ""
        raise CtlError(f"HTTP {exc.code} from {url}" + (f": {detail}" if detail else "")) from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:  # ValueError: not a URL urllib can open
        reason = getattr(exc, "reason", exc)
        raise CtlError(f"cannot reach {url}: {reason}", unreachable=True) from exc
    try:
        answer = json.loads(body)
    except ValueError as exc:
        raise CtlError(f"not a streamserver answer from {url}: {body[:60]!r}") from exc
    if not isinstance(answer, dict):
        raise CtlError(f"not a streamserver answer from {url}: {answer!r:.60}")
    return answer


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


# -- many servers -------------------------------------------------------------
@dataclass
class ServerReport:
    """One server's answer to `/gpu-status`, or why there is none."""

    url: str
    status: dict | None = None
    error: str | None = None
    unreachable: bool = False

    @property
    def state(self) -> str:
        """`ready`, `full` (no free slot), `draining`, `unreachable` (no answer) or `error` (an HTTP error)."""
        if self.status is None:
            return "unreachable" if self.unreachable else "error"
        if self.status.get("draining"):
            return "draining"
        return "ready" if sum(free_slots(g, False) for g in self.status["gpus"]) > 0 else "full"


def free_slots(gpu: dict, draining: bool) -> int:
    """The device's free connection slots (servers from before `free_slots` was reported: limit - active)."""
    if "free_slots" in gpu:
        return int(gpu["free_slots"])
    return 0 if draining else max(0, gpu["max_connections"] - gpu["active_connections"])


def ask(url: str, token: str | None) -> ServerReport:
    try:
        status = call("GET", f"{url}/gpu-status", token, STATUS_TIMEOUT)
        if not isinstance(status.get("gpus"), list):
            raise CtlError(f"not a streamserver answer from {url}/gpu-status: no device list")
        return ServerReport(url, status=status)
    except CtlError as exc:
        return ServerReport(url, error=" ".join(str(exc).split()), unreachable=exc.unreachable)


def ask_all(urls: Sequence[str], token: str | None) -> list[ServerReport]:
    """Every server's report, in the order given; asked concurrently, so the whole takes one timeout at most."""
    with ThreadPoolExecutor(max_workers=max(1, len(urls))) as pool:
        return list(pool.map(lambda u: ask(u, token), urls))


def totals(reports: list[ServerReport]) -> dict:
    gpus = [(g, r.status.get("draining", False)) for r in reports if r.status is not None for g in r.status["gpus"]]
    return {
        "servers": len(reports),
        "answered": sum(r.status is not None for r in reports),
        "unreachable": sum(r.status is None for r in reports),
        "devices": len(gpus),
        "active_connections": sum(g["active_connections"] for g, _ in gpus),
        "max_connections": sum(g["max_connections"] for g, _ in gpus),
        "free_slots": sum(free_slots(g, draining) for g, draining in gpus),
        "allocated_memory_gb": round(sum(g["allocated_memory_gb"] for g, _ in gpus), 2),
        "total_memory_gb": round(sum(g["total_memory_gb"] for g, _ in gpus), 2),
    }


def format_many(reports: list[ServerReport]) -> str:
    """One table over every server: a row per device, a row per server that did not answer, and TOTAL."""
    rows = [MANY_HEADER]
    failed: list[tuple[int, ServerReport]] = []  # (row index, report): written after the widths are known
    for r in reports:
        if r.status is None:
            failed.append((len(rows), r))
            rows.append([r.url, r.state] + [""] * (len(MANY_HEADER) - 2))
            continue
        draining = r.status.get("draining", False)
        for g in r.status["gpus"]:
            rows.append([
                r.url, r.state, str(g["gpu_id"]), g["device"], g["name"],
                f"{g['active_connections']}/{g['max_connections']}", str(free_slots(g, draining)),
                f"{g['allocated_memory_gb']:.2f}/{g['total_memory_gb']:.2f}",
                ", ".join(g["models"]) if g["models_loaded"] else "-",
            ])
    t = totals(reports)
    up = f"{t['answered']}/{t['servers']} up"
    rows.append(["TOTAL", up, "", f"{t['devices']} device(s)", "", f"{t['active_connections']}/{t['max_connections']}",
                 str(t["free_slots"]), f"{t['allocated_memory_gb']:.2f}/{t['total_memory_gb']:.2f}", ""])
    lines = format_table(rows).splitlines()
    width = [max(len(row[i]) for row in rows) for i in (0, 1)]
    for index, r in failed:  # the error runs on from the GPU column, one line, not widening the table
        lines[index] = f"{r.url.ljust(width[0])}  {r.state.ljust(width[1])}  {r.error}"
    states = [r.state for r in reports]
    summary = ", ".join(f"{states.count(s)} {s}" for s in ("ready", "full", "draining", "unreachable", "error")
                        if s in states)
    return f"{len(reports)} server(s): {summary}\n\n" + "\n".join(lines)


def status_json(reports: list[ServerReport]) -> str:
    return json.dumps({
        "servers": [{"url": r.url, "state": r.state, "error": r.error, "status": r.status} for r in reports],
        "total": totals(reports),
    }, indent=2)


def status_command(args: argparse.Namespace) -> int:
    urls = list(dict.fromkeys(base_url(u) for u in (args.urls or [args.env_url])))
    if len(urls) == 1 and not args.json:  # one server: its own heading and table, as always
        try:
            print(format_status(call("GET", f"{urls[0]}/gpu-status", args.token, STATUS_TIMEOUT), urls[0]))
        except CtlError as exc:
            print(f"streamserver status: {exc}", file=sys.stderr)
            return 1
        return 0
    reports = ask_all(urls, args.token)
    print(status_json(reports) if args.json else format_many(reports))
    return 1 if any(r.status is None for r in reports) else 0


def run(args: argparse.Namespace) -> str:
    base = base_url(args.url)
    entry = call("POST", f"{base}/models/{args.action}?gpu={args.gpu}", args.token, LOAD_TIMEOUT)
    if entry["models_loaded"]:
        return f"GPU {entry['gpu_id']}: models loaded ({', '.join(entry['models'])})"
    return f"GPU {entry['gpu_id']}: models unloaded"


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "status":
        return status_command(args)
    try:
        print(run(args))
    except CtlError as exc:
        print(f"streamserver {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0
