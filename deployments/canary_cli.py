"""`mlx-serving canary ...` and `mlx-serving flags ...`: operator commands over the admin API."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml


class AdminError(Exception):
    pass


class AdminClient:
    """Speaks to the Router's /admin endpoints with the operator token."""

    def __init__(self, url: str, token: str | None, timeout: float = 30.0):
        if not token:
            raise AdminError("no operator token: pass --token or set MLX_SERVING_OPERATOR_TOKEN")
        self._http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout,
                                  headers={"Authorization": f"Bearer {token}"})

    def call(self, method: str, path: str, body: dict | None = None) -> Any:
        try:
            r = self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise AdminError(f"cannot reach {self._http.base_url}: {exc}") from None
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except Exception:
                message = r.text
            raise AdminError(f"HTTP {r.status_code}: {message}")
        return r.json()


# -- rendering -------------------------------------------------------------------------------------
def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def render_status(status: dict) -> str:
    routing, rollout = status["routing"], status.get("rollout")
    lines = [f"stable variant   {routing['stable']}"]
    if rollout is None:
        lines.append("rollout          none (declared variants: "
                     f"{', '.join(status['variants'])})")
        return "\n".join(lines)
    stages = rollout["plan"]["stages"]
    lines += [
        f"rollout          {rollout['rollout_id']}: {rollout['stable']} -> {rollout['canary']}",
        f"phase            {rollout['phase']}",
        f"stage            {rollout['stage_index'] + 1}/{len(stages)} "
        f"(weight {stages[min(rollout['stage_index'], len(stages) - 1)]['weight']:g}%)",
        f"traffic          {routing['stable']} {100 - routing['weight']:g}%"
        + (f"  {routing['canary']} {routing['weight']:g}%" if routing["canary"] else ""),
        f"samples          stable {status['samples']['stable']}  canary "
        f"{status['samples']['canary']} (this stage)",
        f"started          {_when(rollout.get('started_at'))}",
    ]
    if rollout.get("reason"):
        lines.append(f"reason           {rollout['reason']}")
    analysis = rollout.get("last_analysis")
    if analysis:
        lines += ["", f"last analysis: {analysis.get('outcome')}"
                      + (f" ({analysis['reason']})" if analysis.get("reason") else "")]
        rows = [["metric", "n stable", "n canary", "ratio / diff", "cohen d", "p worse (holm)",
                 "p non-inferior", "verdict"]]
        for m in analysis.get("metrics", []):
            rows.append([m.get("name"), m.get("n_stable"), m.get("n_canary"),
                         _num(m.get("ratio", m.get("difference"))), _num(m.get("cohens_d")),
                         _num(m.get("fail_p_holm", m.get("fail_p"))), _num(m.get("ni_p")),
                         m.get("verdict")])
        lines.append(_table(rows))
    return "\n".join(lines)


def _num(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def render_history(entries: list[dict]) -> str:
    rows = [["time", "action", "phase", "stage", "weight", "reason"]]
    for d in entries:
        rows.append([_when(d.get("at")), d.get("action"),
                     f"{d.get('from_phase')} -> {d.get('to_phase')}", d.get("stage"),
                     f"{d.get('weight', 0):g}%", d.get("reason") or ""])
    return _table(rows)


def render_flags(flags: dict) -> str:
    entries = flags.get("flags", flags)
    items = entries.values() if isinstance(entries, dict) else entries
    rows = [["flag", "percent", "variants", "killed"]]
    for f in items:
        rows.append([f["name"], f"{f['percent']:g}%", ",".join(f.get("variants") or []) or "all",
                     "yes" if f.get("killed") else "no"])
    return _table(rows) if len(rows) > 1 else "no flags"


# -- commands --------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    try:
        client = AdminClient(args.url, args.token)
        out, text = _dispatch(client, args)
    except AdminError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2) if args.json else text)
    return 0


def _dispatch(client: AdminClient, args) -> tuple[Any, str]:
    if args.group == "flags":
        if args.action == "list":
            out = client.call("GET", "/admin/flags")
        elif args.action == "set":
            variants = [v for v in (args.variants or "").split(",") if v]
            out = client.call("PUT", f"/admin/flags/{args.name}",
                              {"percent": args.percent, "variants": variants, "killed": False})
        elif args.action in ("kill", "unkill"):
            current = client.call("GET", "/admin/flags")
            flag = _find_flag(current, args.name)
            out = client.call("PUT", f"/admin/flags/{args.name}",
                              {**flag, "killed": args.action == "kill"})
        else:
            out = client.call("DELETE", f"/admin/flags/{args.name}")
        return out, render_flags(out)
    if args.action == "status":
        out = client.call("GET", "/admin/canary/status")
        return out, render_status(out)
    if args.action == "history":
        out = client.call("GET", f"/admin/canary/history?limit={args.limit}")
        return out, render_history(out)
    body: dict[str, Any] = {}
    if args.action == "start":
        body = {"variant": args.variant}
        if args.plan:
            body["plan"] = yaml.safe_load(Path(args.plan).read_text())
    elif args.action == "promote":
        body = {"full": args.full}
    elif args.action in ("pause", "rollback"):
        body = {"reason": args.reason}
    out = client.call("POST", f"/admin/canary/{args.action}", body)
    return out, render_status(out)


def _find_flag(flags: dict, name: str) -> dict:
    entries = flags.get("flags", flags)
    items = entries.values() if isinstance(entries, dict) else entries
    for f in items:
        if f["name"] == name:
            return {k: v for k, v in f.items() if k != "name"}
    raise AdminError(f"no flag named {name!r}")


def add_parsers(sub) -> None:
    """Add the `canary` and `flags` command groups to the top-level CLI."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("MLX_SERVING_URL", "http://127.0.0.1:8000"),
                        help="the Router (default $MLX_SERVING_URL or http://127.0.0.1:8000)")
    common.add_argument("--token", default=os.environ.get("MLX_SERVING_OPERATOR_TOKEN"),
                        help="operator token (default $MLX_SERVING_OPERATOR_TOKEN)")
    common.add_argument("--json", action="store_true", help="print the raw JSON answer")

    canary = sub.add_parser("canary", help="run and inspect canary rollouts")
    actions = canary.add_subparsers(dest="action", required=True)
    actions.add_parser("status", parents=[common], help="phase, stage, weights, samples, analysis")
    start = actions.add_parser("start", parents=[common], help="start a rollout of a declared variant")
    start.add_argument("variant")
    start.add_argument("--plan", help="YAML/JSON file with a RolloutPlan (default: the config's)")
    promote = actions.add_parser("promote", parents=[common], help="go to the next stage")
    promote.add_argument("--full", action="store_true", help="straight to 100%% and promoted")
    for name, text in (("pause", "freeze the weight and the stage clock"),
                       ("rollback", "send all traffic back to stable")):
        p = actions.add_parser(name, parents=[common], help=text)
        p.add_argument("--reason", default="operator")
    actions.add_parser("resume", parents=[common], help="continue the paused stage")
    history = actions.add_parser("history", parents=[common], help="the audit log")
    history.add_argument("--limit", type=int, default=20)
    canary.set_defaults(func=run, group="canary")

    flags = sub.add_parser("flags", help="percentage feature flags per variant")
    factions = flags.add_subparsers(dest="action", required=True)
    factions.add_parser("list", parents=[common])
    fset = factions.add_parser("set", parents=[common], help="create or change a flag")
    fset.add_argument("name")
    fset.add_argument("--percent", type=float, required=True)
    fset.add_argument("--variants", help="comma-separated variants (default: all)")
    for name in ("kill", "unkill", "delete"):
        p = factions.add_parser(name, parents=[common])
        p.add_argument("name")
    flags.set_defaults(func=run, group="flags")
