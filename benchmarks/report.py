"""Turning one run's measurements into the ratios the targets ask for and a printable table."""

from __future__ import annotations

import math

import numpy as np


def latency_summary(latencies_ms: list[float]) -> dict:
    if not latencies_ms:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "max": None}
    a = np.asarray(latencies_ms)
    return {
        "p50": round(float(np.percentile(a, 50)), 3),
        "p90": round(float(np.percentile(a, 90)), 3),
        "p99": round(float(np.percentile(a, 99)), 3),
        "mean": round(float(a.mean()), 3),
        "max": round(float(a.max()), 3),
    }


def _get(d: dict, *path, default=None):
    for p in path:
        if not isinstance(d, dict) or p not in d or d[p] is None:
            return default
        d = d[p]
    return d


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def _target(name: str, value, target, op: str, unit: str = "", note: str = "") -> dict:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return {
            "name": name,
            "value": None,
            "target": target,
            "op": op,
            "met": None,
            "margin": None,
            "unit": unit,
            "note": note or "not measured",
        }
    met = value >= target if op == ">=" else value <= target
    margin = (value / target - 1.0) if target else None
    return {
        "name": name,
        "value": round(value, 4),
        "target": target,
        "op": op,
        "met": bool(met),
        "margin": round(margin, 4) if margin is not None else None,
        "unit": unit,
        "note": note,
    }


def _paired(results: dict, key: str) -> tuple[float | None, str]:
    """The median over rounds of a ratio measured in interleaved rounds, and a note with the spread."""
    values = results.get("paired", {}).get(key, [])
    per_core = results.get("paired", {}).get(f"{key} per core", [])
    note = f"rounds {values}" if values else ""
    if per_core:
        note += f"; per CPU-second used: median {_median(per_core):.3f} (rounds {per_core})"
    return _median(values), note


def ratios(results: dict) -> list[dict]:
    """Every target of the issue, computed from this run's numbers."""
    ph = results["phases"]
    rate = lambda name: _get(ph, name, "items_per_s")  # noqa: E731
    out = []
    sb = _get(results, "config", "server_batch", default=32)
    value, note = _paired(results, "3a/L")
    out.append(
        _target(
            f"misses 3a (16 clients x 1 item) / L (in-process decode+preprocess+infer, batch {sb})",
            value,
            0.90,
            ">=",
            note=note,
        )
    )
    value, note = _paired(results, "3a/naive")
    out.append(_target("misses 3a / naive server (16 clients x 1 item)", value, 1.10, ">=", note=note))
    value, note = _paired(results, "3b/L")
    out.append(_target("misses 3b (batch-32 requests, 1 client) / L", value, 0.95, ">=", note=note))
    L = _get(results, "limits", "primary", f"L_b{sb}", "items_per_s")
    b2 = rate("miss_3b_b32_c2")
    out.append(
        _target(
            "misses 3b' (batch-32 requests, 2 clients) / L (mean of rounds)",
            b2 / L if b2 and L else None,
            0.95,
            ">=",
            note="same target with a second request queued; L from other minutes",
        )
    )
    c64, c16 = rate("miss_3c_64x1"), rate("miss_3a_16x1")
    out.append(
        _target(
            "misses 3c: throughput at 64 clients / at 16 clients (3a)",
            c64 / c16 if c64 and c16 else None,
            1.0,
            ">=",
            note="no numeric target in the issue; read as 'must not drop past saturation'",
        )
    )
    for prefix, what, goal in (
        ("hit_single_", "hits, single-item Extract (image sent)", 3000),
        ("sdk_single_", "hits, single-item SDK extract_items (keys first)", 3000),
        ("hit_b64_", "hits, batch-64 Extract (images sent)", 20000),
        ("sdk_b64_", "hits, batch-64 SDK extract_items (keys first)", 20000),
    ):
        found = {n: rate(n) or 0 for n in ph if n.startswith(prefix)}
        if found:
            best = max(found, key=found.get)
            out.append(_target(f"{what}: items/s (best: {best})", found[best], goal, ">=", "items/s"))
    for name in ("hit_single_c1", "hit_single_c4", "hit_single_c16"):
        if name in ph:
            out.append(
                _target(f"p99 single-item hit latency ({name})", _get(ph, name, "latency_ms", "p99"), 5.0, "<=", "ms")
            )
    for backbone, entry in _get(results, "memory", "redis", default={}).items():
        f16 = entry.get("float16")
        if f16 and f16.get("memory_usage_mean"):
            dim = f16["dim"]
            out.append(
                _target(
                    f"Redis bytes per float16 entry ({backbone}, dim {dim}): MEMORY USAGE",
                    f16["memory_usage_mean"],
                    2 * dim + 150,
                    "<=",
                    "bytes",
                    note="target 2 x dim + 150",
                )
            )
            if f16.get("info_delta_per_entry"):
                out.append(
                    _target(
                        f"Redis bytes per float16 entry ({backbone}): INFO used_memory delta / entries",
                        f16["info_delta_per_entry"],
                        2 * dim + 150,
                        "<=",
                        "bytes",
                    )
                )
    return out


def _fmt(v, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def phase_table(results: dict) -> str:
    header = (
        "phase",
        "clients x items",
        "items/s",
        "p50 ms",
        "p99 ms",
        "hit %",
        "client cores",
        "frontend cores",
        "worker cores",
        "redis cores",
        "other cores",
        "items/server-core-s",
        "mean batch",
        "pad %",
    )
    rows = []
    for name, p in results["phases"].items():
        g = _get(p, "usage", "groups", default={})
        if p.get("server") in ("naive", "floor"):
            frontend, workers = _get(g, p["server"], "cores"), None
        else:
            frontend, workers = _get(g, f"{p['server']}.frontend", "cores"), _get(g, f"{p['server']}.workers", "cores")
        rows.append(
            (
                name + (f" ({len(p['rounds'])} rounds)" if p.get("rounds") else ""),
                f"{p['concurrency']} x {p['items_per_request']}" + (" Lookup" if p.get("method") == "Lookup" else ""),
                _fmt(p.get("items_per_s")),
                _fmt(_get(p, "latency_ms", "p50"), 2),
                _fmt(_get(p, "latency_ms", "p99"), 2),
                _fmt(100 * p["hit_ratio"] if p.get("hit_ratio") is not None else None, 0),
                _fmt(p.get("client_cores"), 2),
                _fmt(frontend, 2),
                _fmt(workers, 2),
                _fmt(_get(g, "redis", "cores"), 2),
                _fmt(p.get("other_cores"), 2),
                _fmt(p.get("items_per_server_core_s"), 1),
                _fmt(_get(p, "server_stats", "mean_batch_size"), 1),
                _fmt(
                    100 * p["server_stats"]["padding_overhead"]
                    if _get(p, "server_stats", "padding_overhead") is not None
                    else None,
                    0,
                ),
            )
        )
    return _table(header, rows)


def limits_table(results: dict) -> str:
    header = ("in-process", "backbone", "runs", "items/s", "call p50 ms", "per-item p50 ms", "cores", "other cores")
    rows = []
    for which, r in results["limits"].items():
        for key in ("L0_b32", "L_b32", "L0_b8", "L_b8", "L0_b1", "L_b1", "L0_b4", "L0_b16", "preprocess"):
            m = r.get(key)
            if m:
                rows.append(
                    (
                        f"{key} ({which})",
                        r["backbone"],
                        m.get("n_runs", 1),
                        _fmt(m["items_per_s"]),
                        _fmt(m["call_p50_ms"]),
                        _fmt(m["per_item_p50_ms"], 2),
                        _fmt(m["cores"], 2),
                        _fmt(m.get("other_cores"), 2),
                    )
                )
    return _table(header, rows)


def latency_table(results: dict) -> str:
    header = ("backbone", "path", "batch", "per-item p50 ms", "request p50 ms")
    rows = [
        (r["backbone"], r["path"], r["batch"], _fmt(r["per_item_p50_ms"], 2), _fmt(r["request_p50_ms"], 1))
        for r in results.get("latency_table", [])
    ]
    return _table(header, rows)


def ratio_table(results: dict) -> str:
    header = ("target", "value", "goal", "met", "by", "note")
    rows = []
    for t in results["ratios"]:
        met = {True: "met", False: "NOT met", None: "-"}[t["met"]]
        by = "-" if t["margin"] is None else f"{t['margin']:+.0%}"
        rows.append(
            (
                t["name"],
                _fmt(t["value"], 3),
                f"{t['op']} {t['target']:g} {t['unit']}".strip(),
                met,
                by,
                t.get("note", ""),
            )
        )
    return _table(header, rows)


def zipf_table(results: dict) -> str:
    z = results.get("zipf")
    if not z:
        return ""
    header = ("window", "items/s", "hit ratio", "ideal hit ratio")
    rows = [
        (
            f"{w['t0']:.0f}-{w['t1']:.0f}s",
            _fmt(w["items_per_s"]),
            _fmt(w["hit_ratio"], 3),
            _fmt(w.get("ideal_hit_ratio"), 3),
        )
        for w in z["windows"]
    ]
    return _table(header, rows)


def memory_table(results: dict) -> str:
    header = (
        "backbone",
        "stored dtype",
        "dim",
        "value bytes",
        "MEMORY USAGE mean",
        "INFO delta/entry",
        "2 x dim + 150",
    )
    rows = []
    for backbone, entry in _get(results, "memory", "redis", default={}).items():
        for dtype, m in entry.items():
            if not m:
                continue
            rows.append(
                (
                    backbone,
                    dtype,
                    m["dim"],
                    _fmt(m.get("value_bytes_mean"), 0),
                    _fmt(m.get("memory_usage_mean"), 0),
                    _fmt(m.get("info_delta_per_entry"), 0),
                    2 * m["dim"] + 150 if dtype == "float16" else "-",
                )
            )
    return _table(header, rows)


def _table(header: tuple, rows: list[tuple]) -> str:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


def render(results: dict) -> str:
    m = results["machine"]
    v = m["versions"]
    parts = [
        f"featurebank benchmark: {results['config']['backbone']} ({'quick' if results['config']['quick'] else 'full'}), "
        f"{results['config']['started']}",
        f"machine: {m['cpu_model']}, {m['cpus_usable']} usable CPUs, {m['ram_gib']} GiB RAM, Linux {m['kernel']}, "
        f"Python {m['python']}, TensorFlow {v.get('tensorflow')}, grpcio {v.get('grpcio')}, numpy {v.get('numpy')}; "
        f"load average at start {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}, "
        f"at end {', '.join(f'{x:.2f}' for x in m.get('loadavg_at_end', []))}",
        "",
        "In-process limits (no gRPC, no batcher):",
        limits_table(results),
        "",
        "Through a server (misses use cache_policy=BYPASS; hits are Redis hits):",
        phase_table(results),
        "",
        "Per-item latency (issue 3):",
        latency_table(results),
    ]
    if results.get("zipf"):
        z = results["zipf"]
        parts += [
            "",
            f"Zipf s={z['exponent']} over {z['num_distinct']} distinct inputs, {z['concurrency']} clients x 1 item, "
            f"cold cache ({z['items']} items, overall hit ratio {z['hit_ratio']:.3f}):",
            zipf_table(results),
        ]
    parts += ["", "Redis memory per entry:", memory_table(results)]
    rss = _get(results, "memory", "server_rss_mib")
    if rss:
        parts += ["", "featurebank server RSS under load (peak MiB): " + ", ".join(f"{k} {v}" for k, v in rss.items())]
    idle = results.get("idle", {})
    if idle:
        parts += [
            "",
            f"Idle check before load: this run's processes "
            f"{sum(g['cores'] for g in idle.get('groups', {}).values()):.2f} cores, "
            f"other processes on the machine {idle.get('other_cores', 0):.2f} cores",
        ]
    parts += [
        "",
        "Targets (computed from this run; paired ratios are medians over interleaved rounds):",
        ratio_table(results),
    ]
    if results.get("profiles"):
        parts += [
            "",
            f"Profiles (py-spy, raw stacks in {results['config']['out_dir']}/profiles; frontend: on-CPU "
            "samples; worker: main thread wall clock, TensorFlow's own threads are invisible to py-spy):",
        ]
        for name, prof in sorted(results["profiles"].items()):
            top = ", ".join(f"{share:.0%} {frame}" for frame, share in prof["top_self"][:6])
            files = ", ".join(f"{share:.0%} {f}" for f, share in prof["self_by_file"][:5])
            parts += [f"- {name} ({prof['samples']} samples): self: {top}", f"    by file: {files}"]
    if results.get("warnings"):
        parts += ["", "Warnings:"] + [f"- {w}" for w in results["warnings"]]
    return "\n".join(parts)
