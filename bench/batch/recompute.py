"""The batch alternative to slipstream, for bench/parts/batch.sh (issue 7, item 3).

What a team without slipstream would run, modelled on Jetstream: the raw events sit in a
columnar store (here a DuckDB database file; in Jetstream, BigQuery tables partitioned by
submission date), and every night a job computes the analysis windows that completed
that night, each from the raw telemetry of the window's span joined with the enrollments:
overlapping windows (the days, the weeks, overall) read the same raw rows again. Per
window and analysis basis it writes the per-client aggregate table and computes the same
statistics slipstream publishes (Bayesian-bootstrap mean with a per-replicate 99.5th-
percentile cap, deciles with bootstrap intervals, Beta-posterior binomial, count, sum,
empirical CDF, identity counts, differences and relative uplifts between branches), in
numpy, vectorized, on both cores.

Phases, each timed (seconds, printed as JSON on stdout at the end):
- load: parse the NDJSON once (line by line: a malformed line never swallows the next),
  count rejects by reason, store telemetry sorted by submission date (so a window's query
  reads only its span: DuckDB skips row groups by min/max) and enrollment events;
- enrollments: the enrollment table, once, when enrollment has closed;
- nights: for each window, `CREATE TABLE` of its per-client aggregates (both bases from one
  scan of the span), then its statistics, written as a table.

`--check DIR` compares chosen windows with the tables slipstream published in DIR (its
local sink): the same clients with the same aggregate values (within 1e-9), the same
statistics rows, equal deterministic statistics (identity, count, sum, binomial), and
bootstrap points within a fraction of the interval width (the replicates are random on
both sides, with different draws). Any difference fails the run.

Run: python recompute.py --config C.toml --events E.ndjson --db DB.duckdb [--check DIR]
"""

import argparse
import datetime as dt
import json
import math
import os
import re
import sys
import time
import tomllib
import zlib
from concurrent.futures import ThreadPoolExecutor

import duckdb
import numpy as np
from scipy.stats import beta as beta_dist

DECILES = [round(0.1 * k, 1) for k in range(1, 10)]
ECDF_POINTS = 256
TS_FORMATS = ["%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S.%fZ"]


def log(*a):
    print("recompute:", *a, file=sys.stderr, flush=True)


# ---- config (the subset of slipstream's TOML that the bench configs use) --------------


DEFAULT_METRICS = [
    {"name": "active_hours", "field": "active_hours", "aggregation": "sum"},
    {"name": "uri_count", "field": "uri_count", "aggregation": "sum"},
    {"name": "search_count", "field": "search_count", "aggregation": "sum"},
    {"name": "days_of_use", "field": None, "aggregation": "days"},
    {"name": "retained", "field": None, "aggregation": "any"},
]


def load_config(path):
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    pipe = raw.get("pipeline", {})
    if pipe.get("mean_cap", "per_replicate") != "per_replicate":
        sys.exit("recompute: only mean_cap = per_replicate (slipstream's default) is implemented")
    exps = raw.get("experiment", [])
    if len(exps) != 1:
        sys.exit("recompute: expected exactly one [[experiment]]")
    e = exps[0]
    branches = [b if isinstance(b, str) else b["name"] for b in e["branches"]]
    start = dt.date.fromisoformat(str(e["enrollment_start"]))
    period = int(e["enrollment_period"])
    last = start + dt.timedelta(days=period - 1)
    end = dt.date.fromisoformat(str(e["end_date"]))
    metrics = [dict(m, data_source="main") for m in DEFAULT_METRICS] if e.get("default_metrics", True) else []
    for m in e.get("metrics", []):
        m = {"field": None, "data_source": "main", **m}
        metrics = [x for x in metrics if x["name"] != m["name"]] + [m]
    for m in metrics:
        if m["data_source"] != "main":
            sys.exit(f"recompute: metric {m['name']}: only data source `main` is implemented")
        m["type"] = {"sum": "float", "max": "float", "mean": "float", "count": "int", "days": "int", "any": "bool"}[
            m["aggregation"]
        ]
        stats = m.get("statistics") or default_statistics(m["name"], m["type"])
        m["stats"] = [s if isinstance(s, str) else s["kind"] for s in stats]
        for s in stats:
            if isinstance(s, dict) and (set(s) - {"kind"}):
                sys.exit(f"recompute: metric {m['name']}: statistic options {s} are not implemented")
    segments = []
    for s in e.get("segments", []):
        clauses = []
        for c in re.split(r"\s+and\s+", s["where"].strip()):
            mm = re.fullmatch(r'(\w+)\s*(=|!=)\s*"([^"]*)"', c.strip())
            if not mm:
                sys.exit(f"recompute: segment {s['name']}: clause `{c}` is not implemented")
            clauses.append(mm.groups())
        segments.append({"name": s["name"], "clauses": clauses})
    return {
        "slug": e["slug"],
        "table_slug": re.sub(r"[^A-Za-z0-9]", "_", e["slug"]),
        "branches": branches,
        "reference": e.get("reference_branch", "control"),
        "start": start,
        "last": last,
        "end": end,
        "bases": e.get("analysis_bases", ["enrollments"]),
        "periods": e.get("periods", ["day", "week", "overall"]),
        "segments": segments,
        "metrics": metrics,
        "replicates": int(pipe.get("replicates", 1000)),
        "lateness_hours": int(pipe.get("allowed_lateness_hours", 24)),
    }


def default_statistics(name, typ):
    if typ == "bool":
        return ["binomial"]
    s = ["mean", "deciles"]
    if name == "days_of_use":
        s.append("empirical_cdf")
    return s


def windows(cfg):
    """Every window, as slipstream's window::windows: (period, index, start, end)."""
    length = (cfg["end"] - cfg["last"]).days
    out = []
    for p in cfg["periods"]:
        if p == "overall":
            if length > 0:
                out.append(("overall", 1, 0, length - 1))
            continue
        span = {"day": 1, "week": 7, "days28": 28}[p]
        k = 0
        while (k + 1) * span <= length:
            out.append((p, k + 1, k * span, k * span + span - 1))
            k += 1
    return out


# ---- load --------------------------------------------------------------------------


def load(con, cfg, events):
    fields = sorted({m["field"] for m in cfg["metrics"] if m["field"]})
    struct = {
        "client_id": "VARCHAR",
        "event": "VARCHAR",
        "experiment": "VARCHAR",
        "branch": "VARCHAR",
        "timestamp": "VARCHAR",
        "submission_timestamp": "VARCHAR",
        "data_source": "VARCHAR",
        "experiments": "MAP(VARCHAR, VARCHAR)",
        "dimensions": "MAP(VARCHAR, VARCHAR)",
        "metrics": "MAP(VARCHAR, DOUBLE)",
    }
    fmts = "[" + ", ".join(f"'{f}'" for f in TS_FORMATS) + "]"
    con.execute(
        f"""
        CREATE TEMP TABLE parsed AS
        SELECT CASE WHEN json_valid(line) THEN from_json(line, '{json.dumps(struct)}') END AS j
        FROM read_csv(?, columns = {{'line': 'VARCHAR'}}, delim = '\x1f', quote = '', escape = '',
                      header = false, auto_detect = false, strict_mode = false,
                      max_line_size = 2000000)
        """,
        [events],
    )
    con.execute(
        f"""
        CREATE TEMP TABLE classified AS
        SELECT j, try_strptime(coalesce(j.timestamp, j.submission_timestamp), {fmts}) AS ts,
          CASE
            WHEN j IS NULL THEN 'invalid_json'
            WHEN len(list_filter(map_values(j.metrics), x -> x IS NULL)) > 0 THEN 'invalid_json'
            WHEN j.event IS NULL AND j.submission_timestamp IS NULL THEN 'missing_field'
            WHEN coalesce(j.client_id, '') = '' THEN 'missing_field'
            WHEN j.event IS NOT NULL AND (coalesce(j.experiment, '') = '' OR coalesce(j.branch, '') = ''
                 OR j.timestamp IS NULL) THEN 'missing_field'
            WHEN j.event IS NOT NULL AND j.event NOT IN ('enroll', 'unenroll', 'exposure') THEN 'bad_event'
            WHEN try_strptime(coalesce(j.timestamp, j.submission_timestamp), {fmts}) IS NULL
                 THEN 'bad_timestamp'
            WHEN j.event IS NOT NULL AND j.experiment <> $slug THEN 'unknown_experiment'
            WHEN j.event IS NOT NULL AND j.branch NOT IN (SELECT unnest($branches)) THEN 'unknown_branch'
          END AS reject
        FROM parsed
        """,
        {"slug": cfg["slug"], "branches": cfg["branches"]},
    )
    con.execute("DROP TABLE parsed")
    rejects = dict(con.execute("SELECT reject, count(*) FROM classified WHERE reject IS NOT NULL GROUP BY 1").fetchall())
    lines = con.execute("SELECT count(*) FROM classified").fetchone()[0]
    cols = ", ".join(f"j.metrics['{f}'] AS {f}" for f in fields)
    # Telemetry sorted by day, as a warehouse partitions it: a window's query reads its span.
    con.execute(
        f"""
        CREATE TABLE telemetry AS
        SELECT j.client_id AS client_id, ts AS submission_timestamp, CAST(ts AS DATE) AS submission_date,
               j.data_source AS data_source, j.experiments AS experiments, {cols}
        FROM classified WHERE reject IS NULL AND j.event IS NULL
        ORDER BY submission_date, client_id
        """
    )
    con.execute(
        """
        CREATE TABLE enrollment_events AS
        SELECT j.client_id AS client_id, j.experiment AS experiment, j.branch AS branch, j.event AS event,
               ts AS timestamp, j.dimensions AS dimensions
        FROM classified WHERE reject IS NULL AND j.event IS NOT NULL
        """
    )
    con.execute("DROP TABLE classified")
    con.execute("CHECKPOINT")
    return lines, rejects


def build_enrollments(con, cfg):
    seg_cols = "".join(
        ", " + " AND ".join(f"coalesce(dimensions['{d}'] {op} '{v}', false)" for d, op, v in s["clauses"]) + f" AS {s['name']}"
        for s in cfg["segments"]
    )
    con.execute(
        f"""
        CREATE TABLE enrollments AS
        WITH ev AS (
          SELECT *, CAST(timestamp AS DATE) AS day FROM enrollment_events WHERE experiment = $slug
        ),
        firsts AS (
          SELECT * FROM (
            SELECT *, row_number() OVER (PARTITION BY client_id ORDER BY timestamp, branch) AS rn
            FROM ev WHERE event = 'enroll' AND day BETWEEN $start AND $last
          ) WHERE rn = 1
        ),
        counts AS (
          SELECT client_id,
                 count(*) FILTER (WHERE event = 'enroll' AND day BETWEEN $start AND $last) AS num_enrollment_events,
                 min(timestamp) FILTER (WHERE event = 'exposure') AS first_exposure,
                 count(*) FILTER (WHERE event = 'exposure') AS num_exposure_events
          FROM ev GROUP BY client_id
        )
        SELECT f.client_id, f.branch, f.day AS enrollment_date, c.num_enrollment_events,
               CAST(c.first_exposure AS DATE) AS exposure_date, c.num_exposure_events,
               CASE WHEN CAST(c.first_exposure AS DATE) <= $last
                    THEN greatest(CAST(c.first_exposure AS DATE), f.day) END AS exposure_start
               {seg_cols}
        FROM firsts f JOIN counts c USING (client_id)
        """,
        {"slug": cfg["slug"], "start": cfg["start"], "last": cfg["last"]},
    )
    return con.execute("SELECT count(*) FROM enrollments").fetchone()[0]


# ---- one window: per-client aggregates -------------------------------------------------


def metric_sql(m):
    """(aggregate over a client's events, value for a client without events)."""
    f, a = m["field"], m["aggregation"]
    col = f"t.{f}" if f else None
    if a == "sum":
        return f"sum({col})::DOUBLE", "0::DOUBLE"
    if a == "max":
        return f"max({col})::DOUBLE", "NULL::DOUBLE"
    if a == "mean":
        return f"avg({col})::DOUBLE", "NULL::DOUBLE"
    if a == "count":
        return f"count({col or '*'})::BIGINT", "0::BIGINT"
    if a == "any":
        return (f"coalesce(bool_or({col} > 0), false)" if col else "true"), "false"
    if a == "days":
        return (f"count(DISTINCT CASE WHEN {col} > 0 THEN t.day END)::BIGINT" if col else "count(DISTINCT t.day)::BIGINT"), "0::BIGINT"
    raise ValueError(a)


def aggregate_window(con, cfg, w):
    """CREATE TABLE of one window's per-client rows, both bases from one scan of its span."""
    period, index, start, end = w
    name = f"agg_{period}_{index}"
    lo = cfg["start"] + dt.timedelta(days=start)
    hi = cfg["last"] + dt.timedelta(days=end)
    fields = sorted({m["field"] for m in cfg["metrics"] if m["field"]})
    seg = "".join(f", b.{s['name']}" for s in cfg["segments"])
    aggs = "".join(f",\n {metric_sql(m)[0]} AS {m['name']}" for m in cfg["metrics"])
    outs = "".join(f",\n coalesce(a.{m['name']}, {metric_sql(m)[1]}) AS {m['name']}" for m in cfg["metrics"])
    bases = []
    if "enrollments" in cfg["bases"]:
        bases.append("SELECT *, 'enrollments' AS analysis_basis, enrollment_date AS basis_start FROM enrollments")
    if "exposures" in cfg["bases"]:
        bases.append(
            "SELECT *, 'exposures' AS analysis_basis, exposure_start AS basis_start FROM enrollments"
            " WHERE exposure_start IS NOT NULL"
        )
    # The events of each client's span (a hash join on client_id, the span as a filter),
    # aggregated per client; clients without events get the metrics' empty values.
    con.execute(
        f"""
        CREATE OR REPLACE TABLE {name} AS
        WITH t AS (
          SELECT client_id, submission_date AS day, experiments[$slug] AS tag, {", ".join(fields)}
          FROM telemetry
          WHERE submission_date BETWEEN $lo AND $hi AND data_source = 'main'
        ),
        b AS ({" UNION ALL ".join(bases)}),
        a AS (
          SELECT b.analysis_basis, b.client_id {aggs},
                 bool_or(t.tag IS NOT NULL AND t.tag <> b.branch) AS contradictory,
                 bool_or(t.tag IS NULL) AS non_enrolled
          FROM b JOIN t ON t.client_id = b.client_id
          WHERE t.day BETWEEN b.basis_start + {start} AND b.basis_start + {end}
            AND NOT (t.day = b.enrollment_date AND t.tag IS NULL)
          GROUP BY b.analysis_basis, b.client_id
        )
        SELECT b.analysis_basis, b.client_id, b.branch, b.enrollment_date, b.exposure_date,
               b.num_enrollment_events, b.num_exposure_events,
               {start}::BIGINT AS analysis_window_start, {end}::BIGINT AS analysis_window_end
               {outs},
               coalesce(a.contradictory, false) AS main_has_contradictory_branch,
               coalesce(a.non_enrolled, false) AS main_has_non_enrolled_data
               {seg}
        FROM b LEFT JOIN a USING (analysis_basis, client_id)
        """,
        {"slug": cfg["slug"], "lo": lo, "hi": hi},
    )
    return name


# ---- one window: statistics ------------------------------------------------------------


def interval(reps, ci):
    if reps is None or len(reps) == 0 or not np.all(np.isfinite(reps)):
        return None
    a = (1 - ci) / 2
    lo, hi = np.percentile(reps, [a * 100, (1 - a) * 100])
    return float(lo), float(hi)


def replicate_weights(n, rc, rngs, pool):
    """n x rc Exp(1) weights in float32 (as slipstream's), filled by two threads."""
    w = np.empty((n, rc), dtype=np.float32)
    h = n // 2
    list(pool.map(lambda a: a[0].standard_exponential(out=a[1], dtype=np.float32), [(rngs[0], w[:h]), (rngs[1], w[h:])]))
    return w


BUCKET_BITS = 9  # replicate quantiles at 2^-9 relative resolution, like slipstream's sketch
EXACT_DISTINCT = 64  # a window with at most this many distinct values is read exactly


def buckets(vals):
    """Start offsets and representative values of the value buckets of sorted `vals`.

    Exact values when the window holds few distinct ones (integers, ties), else buckets of
    2^-BUCKET_BITS relative width (as slipstream reads replicate quantiles, "at bucket
    resolution"), each represented by the midpoint of its smallest and largest value.
    """
    change = np.r_[True, vals[1:] != vals[:-1]]
    if change.sum() > EXACT_DISTINCT:
        mag = np.floor(np.log2(np.maximum(np.abs(vals), 1e-300)) * (1 << BUCKET_BITS))
        keys = np.where(vals == 0, 0, np.sign(vals) * (mag + 1e6))
        change = np.r_[True, keys[1:] != keys[:-1]]
    starts = np.flatnonzero(change)
    ends = np.r_[starts[1:], len(vals)] - 1
    return starts, (vals[starts] + vals[ends]) / 2


class Group:
    """One (segment, metric) of one branch: its sorted values and where replicates read."""

    def __init__(self, s, m, rows, values, wants_mean, wants_deciles):
        self.s, self.m = s, m
        order = rows[np.argsort(values[rows], kind="stable")]
        self.sorted = values[order]
        self.n = n = len(order)
        self.order = order
        self.windows = []  # [kind, q, k0, k1, bucket starts, bucket values, gather offset, column]
        if n == 0:
            return
        targets = ([("mean", 1 - 0.005)] if wants_mean else []) + ([("decile", q) for q in DECILES] if wants_deciles else [])
        for kind, q in targets:
            # Replicate quantiles fall within a few binomial standard deviations of rank q*n;
            # a replicate outside the window is clamped to its edge (as slipstream does).
            c, sd = q * n, math.sqrt(q * (1 - q) * n)
            k0 = max(0, int(math.floor(c - 4 * sd - 2)))
            k1 = min(n - 1, int(math.ceil(c + 4 * sd + 2)))
            starts, reps = buckets(self.sorted[k0 : k1 + 1])
            self.windows.append([kind, q, k0, k1, starts, reps, None, None])


def branch_replicates(values, seg_masks, metrics, n_reps, seed, pool):
    """Bootstrap replicates of one branch: {(s, m): {"mean": [R], "deciles": [9][R]}}.

    Replicate r gives client i the weight w(i, r) ~ Exp(1) (the Bayesian bootstrap's
    Dirichlet weights, unnormalized). Per replicate and (segment, metric): the total weight
    and the weighted sum come from one matrix product over all clients; a weighted quantile
    is found in a window of ranks around it, from the weight below the window (another
    product) and the window's weights summed per value bucket.
    """
    n = len(values[0]) if values else 0
    groups = []
    for m, spec in enumerate(metrics):
        wm, wd = "mean" in spec["stats"], "deciles" in spec["stats"]
        if not (wm or wd):
            continue
        notnull = ~np.isnan(values[m])
        for s, mask in enumerate(seg_masks):
            groups.append(Group(s, m, np.flatnonzero(mask & notnull), values[m], wm, wd))
    # Columns of one matrix product with the weights: per group its weight total and
    # weighted sum; per mean the weight and weighted sum of the tail above its cap window;
    # per decile the weight below its window. Float32, as slipstream's weights: replicate
    # sums carry ~1e-5 relative rounding, far inside intervals ~1e-2 wide. Then the rows
    # gathered for the windows.
    ncols = sum(2 + sum(2 if w[0] == "mean" else 1 for w in g.windows) for g in groups)
    a = np.zeros((n, ncols), dtype=np.float32)
    gather = []
    col = off = 0
    for g in groups:
        g.col_t, g.col_s = col, col + 1
        a[g.order, col] = 1
        a[g.order, col + 1] = g.sorted
        col += 2
        for win in g.windows:
            kind, q, k0, k1 = win[:4]
            win[6] = off
            gather.append(g.order[k0 : k1 + 1])
            off += k1 - k0 + 1
            win[7] = col
            if kind == "mean":
                tail = g.order[k1 + 1 :]
                a[tail, col] = 1
                a[tail, col + 1] = values[g.m][tail]
                col += 2
            else:
                a[g.order[:k0], col] = 1
                col += 1
    gather = np.concatenate(gather) if gather else np.zeros(0, dtype=np.int64)
    out = {(g.s, g.m): {"mean": np.full(n_reps, np.nan), "deciles": np.full((9, n_reps), np.nan)} for g in groups}
    clamped = 0
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2)]
    rc = max(16, min(256, (32 << 20) // max(n, 1)))  # replicates per pass: ~128 MB of weights
    for r0 in range(0, n_reps, rc):
        r1 = min(n_reps, r0 + rc)
        w = replicate_weights(n, r1 - r0, rngs, pool)
        sums = (a.T @ w).astype(np.float64)
        wg = w[gather]
        for g in groups:
            if g.n == 0:
                continue
            total, wsum = sums[g.col_t], sums[g.col_s]
            for kind, q, k0, k1, starts, reps, goff, col in g.windows:
                rows = wg[goff : goff + k1 - k0 + 1]
                per_bucket = np.add.reduceat(rows, starts, axis=0).astype(np.float64)
                cum = np.cumsum(per_bucket, axis=0)
                target = q * total
                if kind == "mean":
                    # weight at or below bucket j: total - tail - (window weight above j)
                    tail_w, tail_wx = sums[col], sums[col + 1]
                    at_or_below = total - tail_w - (cum[-1] - cum)
                    hit = at_or_below >= target
                    found = hit.any(axis=0)
                    j = np.where(found, hit.argmax(axis=0), len(starts) - 1)
                    clamped += int((~found).sum() + (total - tail_w - cum[-1] >= target).sum())
                    cap = reps[j]
                    # Buckets above the cap's are replaced by the cap: subtract their excess.
                    wx = np.add.reduceat(rows * g.sorted[k0 : k1 + 1, None].astype(np.float32), starts, axis=0).astype(np.float64)
                    above = np.arange(len(starts))[:, None] > j[None, :]
                    excess = ((wx - cap[None, :] * per_bucket) * above).sum(axis=0)
                    out[(g.s, g.m)]["mean"][r0:r1] = (wsum - (tail_wx - cap * tail_w) - excess) / total
                else:
                    below = sums[col]
                    cum += below[None, :]
                    hit = cum >= target
                    found = hit.any(axis=0)
                    j = np.where(found, hit.argmax(axis=0), len(starts) - 1)
                    clamped += int((~found).sum() + (below >= target).sum())
                    out[(g.s, g.m)]["deciles"][DECILES.index(q), r0:r1] = reps[j]
    return out, groups, clamped


def window_statistics(cfg, cols, basis, seed, pool):
    """Rows of the statistics table for one (window, basis), as slipstream computes them."""
    branches = cfg["branches"]
    seg_names = ["all"] + [s["name"] for s in cfg["segments"]]
    metrics = cfg["metrics"]
    R = cfg["replicates"]
    rows = []
    per_branch = []
    clamped = 0
    for b, bname in enumerate(branches):
        sel = cols["branch"] == bname
        values = [np.asarray(cols[m["name"]][sel], dtype=np.float64) for m in metrics]
        segs = [np.ones(int(sel.sum()), dtype=bool)] + [np.asarray(cols[s["name"]][sel], dtype=bool) for s in cfg["segments"]]
        reps, groups, c = branch_replicates(values, segs, metrics, R, [seed, b], pool)
        clamped += c
        per_branch.append((values, segs, reps, {(g.s, g.m): g for g in groups}))

    def emit(seg, metric, stat, param, branch, cmp, to, ci, v):
        rows.append((seg, metric, stat, param, branch, cmp, to, ci, *v, basis))

    def with_comparisons(seg, metric, stat, param, own, reps, ci=0.95):
        for a, an in enumerate(branches):
            emit(seg, metric, stat, param, an, None, None, ci, own[a])
            for r, rn in enumerate(branches):
                if r == a:
                    continue
                for cmp in ("difference", "relative_uplift"):
                    v = (None, None, None)
                    if reps[a] is not None and reps[r] is not None:
                        with np.errstate(divide="ignore", invalid="ignore"):
                            p = reps[a] - reps[r] if cmp == "difference" else reps[a] / reps[r] - 1
                        iv = interval(p, ci)
                        if iv:
                            v = (float(np.mean(p)), *iv)  # Jetstream's `exp`
                    emit(seg, metric, stat, param, an, cmp, rn, ci, v)

    for s, sname in enumerate(seg_names):
        for b, bname in enumerate(branches):
            emit(sname, "identity", "count", None, bname, None, None, 0.95, (float(per_branch[b][1][s].sum()), None, None))
        for m, spec in enumerate(metrics):
            vals = []
            for b in range(len(branches)):
                v = per_branch[b][0][m][per_branch[b][1][s]]
                vals.append(np.sort(v[~np.isnan(v)]))
            for stat in spec["stats"]:
                if stat == "mean":
                    reps = [per_branch[b][2][(s, m)]["mean"] if len(vals[b]) else None for b in range(len(branches))]
                    own = []
                    for r in reps:
                        iv = interval(r, 0.95)
                        own.append((float(np.mean(r)), *iv) if iv else (None, None, None))
                    with_comparisons(sname, spec["name"], "mean", None, own, reps)
                elif stat == "binomial":
                    own, reps = [], []
                    for b in range(len(branches)):
                        n, k = len(vals[b]), int(np.count_nonzero(vals[b]))
                        if n == 0:
                            own.append((None, None, None))
                            reps.append(None)
                            continue
                        a = 0.025
                        own.append(((k + 1) / (n + 2), float(beta_dist.ppf(a, k + 1, n - k + 1)), float(beta_dist.ppf(1 - a, k + 1, n - k + 1))))
                        rng = np.random.default_rng([seed[0], seed[1], s, m, b, 7])
                        reps.append(rng.beta(k + 1, n - k + 1, R))
                    with_comparisons(sname, spec["name"], "binomial", None, own, reps)
                elif stat == "deciles":
                    for d, q in enumerate(DECILES):
                        reps, own = [], []
                        for b in range(len(branches)):
                            if len(vals[b]) == 0:
                                reps.append(None)
                                own.append((None, None, None))
                                continue
                            r = per_branch[b][2][(s, m)]["deciles"][d]
                            reps.append(r)
                            iv = interval(r, 0.95)
                            pt = float(np.quantile(vals[b], q))
                            own.append((pt, *iv) if iv else (pt, None, None))
                        with_comparisons(sname, spec["name"], "deciles", q, own, reps)
                elif stat in ("count", "sum"):
                    for b, bname in enumerate(branches):
                        pt = float(len(vals[b])) if stat == "count" else math.fsum(vals[b])
                        emit(sname, spec["name"], stat, None, bname, None, None, 0.95, (pt, None, None))
                elif stat == "empirical_cdf":
                    nonempty = [v for v in vals if len(v)]
                    if not nonempty:
                        continue
                    lo, hi = min(v[0] for v in nonempty), max(v[-1] for v in nonempty)
                    grid = [lo] if lo == hi else [hi if j == ECDF_POINTS - 1 else lo + (hi - lo) * j / (ECDF_POINTS - 1) for j in range(ECDF_POINTS)]
                    for x in grid:
                        for b, bname in enumerate(branches):
                            pt = float(np.searchsorted(vals[b], x, side="right") / len(vals[b])) if len(vals[b]) else None
                            emit(sname, spec["name"], "empirical_cdf", round(x * 1e9) / 1e9, bname, None, None, 0.95, (pt, None, None))
                else:
                    sys.exit(f"recompute: statistic {stat} is not implemented")
    return rows, clamped


STAT_COLUMNS = ["segment", "metric", "statistic", "parameter", "branch", "comparison", "comparison_to_branch",
                "ci_width", "point", "lower", "upper", "analysis_basis"]


def write_statistics(con, name, rows):
    # Columns as plain numpy arrays (fixed-width strings, floats), which DuckDB scans by
    # the local variable's name; "" and NaN stand for NULL.
    numeric = {"parameter", "ci_width", "point", "lower", "upper"}
    stat_rows = {
        c: np.array([np.nan if r[i] is None else r[i] for r in rows], dtype=np.float64)
        if c in numeric
        else np.array(["" if r[i] is None else r[i] for r in rows], dtype=str)
        for i, c in enumerate(STAT_COLUMNS)
    }
    empty = {c: "'NaN'::DOUBLE" if c in numeric else "''" for c in STAT_COLUMNS}
    nulls = ", ".join(f"nullif({c}, {empty[c]}) AS {c}" for c in STAT_COLUMNS)
    con.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT {nulls} FROM stat_rows")


# ---- correctness check against slipstream's published tables ------------------------------


def check(con, cfg, w, agg, stats_rows, out_dir):
    period, index, _, _ = w
    problems, compared = [], 0
    metric_names = [m["name"] for m in cfg["metrics"]]
    for basis in cfg["bases"]:
        path = os.path.join(out_dir, f"{cfg['table_slug']}_{basis}_{period}_{index}.ndjson")
        con.execute(f"CREATE OR REPLACE TEMP TABLE theirs AS SELECT * FROM read_ndjson(?, sample_size = -1)", [path])
        exact = ["branch", "enrollment_date", "exposure_date", "num_enrollment_events", "num_exposure_events",
                 "analysis_window_start", "analysis_window_end", "main_has_contradictory_branch",
                 "main_has_non_enrolled_data"] + [s["name"] for s in cfg["segments"]]
        conds = [f"o.{c} IS DISTINCT FROM CAST(t.{c} AS {typ})" for c, typ in
                 [(c, "VARCHAR" if c == "branch" else "DATE" if c.endswith("_date") else "BOOLEAN" if c.startswith("main_") or c in [s["name"] for s in cfg["segments"]] else "BIGINT") for c in exact]]
        for m in metric_names:
            conds.append(f"(o.{m} IS NULL) <> (t.{m} IS NULL) OR abs(CAST(o.{m} AS DOUBLE) - CAST(t.{m} AS DOUBLE)) > 1e-9")
        q = f"""
            SELECT count(*) AS rows,
                   count(*) FILTER (WHERE o.client_id IS NULL) AS only_slipstream,
                   count(*) FILTER (WHERE t.client_id IS NULL) AS only_batch,
                   count(*) FILTER (WHERE o.client_id IS NOT NULL AND t.client_id IS NOT NULL AND ({" OR ".join(conds)})) AS differing
            FROM (SELECT * FROM {agg} WHERE analysis_basis = '{basis}') o FULL OUTER JOIN theirs t USING (client_id)
        """
        n, only_s, only_b, diff = con.execute(q).fetchone()
        compared += n
        if only_s or only_b or diff:
            problems.append(f"{period} {index} {basis}: {only_s} clients only in slipstream, {only_b} only in the batch, {diff} differing rows of {n}")
    # Statistics: the same rows; deterministic ones equal; bootstrap points close.
    path = os.path.join(out_dir, f"statistics_{cfg['table_slug']}_{period}_{index}.ndjson")
    theirs = {}
    for line in open(path):
        r = json.loads(line)
        key = (r["segment"], r["metric"], r["statistic"], None if r["parameter"] is None else round(r["parameter"], 6),
               r["branch"], r["comparison"], r["comparison_to_branch"], r["analysis_basis"])
        theirs[key] = r
    ours = {}
    for r in stats_rows:
        key = (r[0], r[1], r[2], None if r[3] is None else round(r[3], 6), r[4], r[5], r[6], r[11])
        ours[key] = r
    if set(ours) != set(theirs):
        problems.append(f"{period} {index}: statistics rows differ: {len(set(ours) - set(theirs))} only in the batch, "
                        f"{len(set(theirs) - set(ours))} only in slipstream (e.g. {sorted(set(ours) ^ set(theirs), key=str)[:3]})")
    # Deterministic statistics must agree; bootstrap points (random on both sides, with
    # different draws) within a quarter of the interval width (for decile comparisons, of
    # the width or 1 when wider: their intervals can be a single integer).
    worst = {"mean": 0.0, "deciles": 0.0, "binomial": 0.0, "width": 0.0}
    for key in set(ours) & set(theirs):
        o, t = ours[key], theirs[key]
        po, pt = o[8], t["point"]
        stat, cmp = key[2], key[5]
        if (po is None) != (pt is None):
            if cmp is None:
                problems.append(f"{key}: point {po} vs {pt}")
            continue
        if po is None:
            continue
        if stat in ("count", "sum") or key[1] == "identity" or (stat == "binomial" and cmp is None):
            if abs(po - pt) > 1e-9 * max(1.0, abs(pt)):
                problems.append(f"{key}: point {po} vs {pt}")
        elif stat == "empirical_cdf":
            if abs(po - pt) > 1e-3:
                problems.append(f"{key}: point {po} vs {pt}")
        elif stat == "deciles" and cmp is None:
            if abs(po - pt) > 1e-3 * max(1.0, abs(pt)):
                problems.append(f"{key}: point {po} vs {pt}")
        elif stat == "deciles" and o[9] is not None and t["lower"] is not None:
            # Comparison points are means of paired replicate deciles; for integer metrics
            # the replicates take a few integer values and the interval is often a single
            # value, so the distance is over the width but at least the integer step, 1.
            width = max(t["upper"] - t["lower"], o[10] - o[9], 1.0)
            rel = abs(po - pt) / width
            worst["deciles"] = max(worst["deciles"], rel)
            if rel > 0.25:
                problems.append(f"{key}: point {po} vs {pt} ({rel:.2f} of the interval width or 1)")
        elif stat in ("mean", "binomial") and o[9] is not None and t["lower"] is not None:
            width = max(t["upper"] - t["lower"], o[10] - o[9], 1e-12)
            rel = abs(po - pt) / width
            worst[stat] = max(worst[stat], rel)
            if stat == "mean" and cmp is None:
                worst["width"] = max(worst["width"], abs((o[10] - o[9]) / max(t["upper"] - t["lower"], 1e-12) - 1))
            if rel > 0.25:
                problems.append(f"{key}: point {po} vs {pt} ({rel:.2f} of the interval width)")
    return problems, compared, len(ours), worst


# ---- main -------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--events", required=True)
    ap.add_argument("--db", required=True, help="DuckDB database file (created; must not exist)")
    ap.add_argument("--temp", help="DuckDB spill directory")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--check", help="slipstream's --out directory to compare with")
    ap.add_argument("--check-windows", default="day:1,week:1,overall:1",
                    help="period:index list of windows to compare (default day:1,week:1,overall:1)")
    args = ap.parse_args()
    cfg = load_config(args.config)
    if os.path.exists(args.db):
        sys.exit(f"recompute: {args.db} exists; give a fresh path")
    con = duckdb.connect(args.db, config={"threads": args.threads, "preserve_insertion_order": False})
    if args.temp:
        con.execute(f"SET temp_directory = '{args.temp}'")
    pool = ThreadPoolExecutor(2)
    times = {"load": 0.0, "enrollments": 0.0, "aggregates": 0.0, "statistics": 0.0, "write": 0.0}
    t0 = time.perf_counter()
    lines, rejects = load(con, cfg, args.events)
    times["load"] = time.perf_counter() - t0
    telemetry = con.execute("SELECT count(*) FROM telemetry").fetchone()[0]
    log(f"loaded {lines} lines in {times['load']:.1f}s: {telemetry} telemetry, rejected {rejects}")

    t = time.perf_counter()
    enrolled = build_enrollments(con, cfg)
    times["enrollments"] = time.perf_counter() - t

    ws = windows(cfg)
    # Night of completion: the day after (last enrollment + end) plus the allowed lateness.
    night = lambda w: cfg["last"] + dt.timedelta(days=w[3] + 1 + math.ceil(cfg["lateness_hours"] / 24))
    checks = {tuple((p, int(i))) for p, i in (x.split(":") for x in args.check_windows.split(",") if x)}
    check_report = {"windows": [], "aggregate_rows_compared": 0, "statistics_rows_compared": 0, "problems": [],
                    "worst_point_over_width": {"mean": 0.0, "binomial": 0.0, "deciles": 0.0}, "worst_mean_width_ratio_minus_1": 0.0}
    tables = rows_out = clamped = 0
    check_seconds = 0.0  # not part of the measured total
    for w in sorted(ws, key=lambda w: (night(w), w)):
        t = time.perf_counter()
        agg = aggregate_window(con, cfg, w)
        cols_all = con.execute(f"SELECT * FROM {agg}").fetchnumpy()
        times["aggregates"] += time.perf_counter() - t
        all_rows = []
        for bi, basis in enumerate(cfg["bases"]):
            t = time.perf_counter()
            sel = cols_all["analysis_basis"] == basis
            cols = {k: np.asarray(v)[sel] for k, v in cols_all.items()}
            for m in cfg["metrics"]:  # NULL (masked) -> NaN
                v = cols_all[m["name"]]
                data = np.ma.filled(np.ma.asarray(v).astype(np.float64), np.nan)
                cols[m["name"]] = data[sel]
            stat_rows, c = window_statistics(cfg, cols, basis, [zlib.crc32(f"{w[0]}_{w[1]}".encode()), bi], pool)
            clamped += c
            all_rows += stat_rows
            times["statistics"] += time.perf_counter() - t
        t = time.perf_counter()
        write_statistics(con, f"statistics_{w[0]}_{w[1]}", all_rows)
        times["write"] += time.perf_counter() - t
        tables += len(cfg["bases"]) + 1
        rows_out += len(cols_all["client_id"]) + len(all_rows)
        if args.check and (w[0], w[1]) in checks:
            t = time.perf_counter()
            problems, n, ns, worst = check(con, cfg, w, agg, all_rows, args.check)
            check_report["windows"].append(f"{w[0]}_{w[1]}")
            check_report["aggregate_rows_compared"] += n
            check_report["statistics_rows_compared"] += ns
            check_report["problems"] += problems
            for k in ("mean", "binomial", "deciles"):
                check_report["worst_point_over_width"][k] = max(check_report["worst_point_over_width"][k], worst[k])
            check_report["worst_mean_width_ratio_minus_1"] = max(check_report["worst_mean_width_ratio_minus_1"], worst["width"])
            log(f"checked {w[0]} {w[1]}: {n} aggregate rows, {ns} statistics rows, {len(problems)} problems")
            check_seconds += time.perf_counter() - t
        log(f"night {night(w)}: {w[0]} {w[1]} done ({sum(times.values()):.1f}s so far)")
    t = time.perf_counter()
    con.execute("CHECKPOINT")
    times["write"] += time.perf_counter() - t
    total = time.perf_counter() - t0 - check_seconds
    con.close()
    result = {
        "lines": lines,
        "telemetry_rows": telemetry,
        "rejects": rejects,
        "rejected": sum(rejects.values()),
        "enrolled": enrolled,
        "windows": len(ws),
        "tables": tables,
        "rows": rows_out,
        "clamped_replicate_quantiles": clamped,
        "seconds": {k: round(v, 3) for k, v in times.items()} | {"total": round(total, 3), "check": round(check_seconds, 3)},
        "db_bytes": os.path.getsize(args.db),
        "check": check_report if args.check else None,
    }
    print(json.dumps(result))
    if args.check and check_report["problems"]:
        for p in check_report["problems"][:20]:
            log("MISMATCH", p)
        sys.exit(1)


if __name__ == "__main__":
    main()
