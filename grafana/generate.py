"""Dashboards as code: the three flashclaim boards built with grafana-foundation-sdk (pinned in
grafana/requirements.txt) and written to grafana/dashboards/*.json, which are committed.
`python grafana/generate.py` rewrites them; `--check` exits 1 when they are stale."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.builders.common import StackingConfig, VizLegendOptions
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    LegendDisplayMode,
    LegendPlacement,
    StackingMode,
)
from grafana_foundation_sdk.models.dashboard import (
    DashboardLinkType,
    DataSourceRef,
    Panel,
    VariableOption,
    VariableRefresh,
    VariableSort,
)

OUT = Path(__file__).resolve().parent / "dashboards"
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
CLAIM_ROUTE = "/v1/campaigns/{id}/claims"  # the route label of POST claims
C = 'campaign=~"$campaign"'
RI = "$__rate_interval"
BAD = 'outcome=~"unavailable|internal"'  # what the 99.9 % SLO counts against the budget
SLO_BUDGET = 0.001


class Board:
    """A dashboard under construction: numbers its panels and its queries' ref ids."""

    def __init__(self, uid: str, title: str, description: str) -> None:
        self._ids = itertools.count(1)
        self.b = (
            dash.Dashboard(title)
            .uid(uid)
            .description(description)
            .tags(["flashclaim"])
            .editable()
            .refresh("5s")
            .time("now-30m", "now")
            .timezone("browser")
            .link(dash.DashboardLink("flashclaim boards").type(DashboardLinkType.DASHBOARDS)
                  .tags(["flashclaim"]).as_dropdown(True).include_vars(True).keep_time(True))
            .with_variable(dash.DatasourceVariable("datasource").label("Data source")
                           .type("prometheus"))
        )

    def campaign_variable(self) -> Board:
        self.b.with_variable(
            dash.QueryVariable("campaign").label("Campaign").datasource(DS)
            .query("label_values(flashclaim_stock_issued, campaign)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True).all_value(".*")
            .current(VariableOption(selected=True, text=["All"], value=["$__all"]))
        )
        return self

    def row(self, title: str) -> Board:
        self.b.with_row(dash.Row(title).id(next(self._ids)))
        return self

    def add(self, panel: Builder[Panel]) -> Board:
        self.b.with_panel(panel.id(next(self._ids)))  # type: ignore[attr-defined]
        return self

    def json(self) -> str:
        return json.dumps(self.b.build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def q(expr: str, legend: str = "__auto", *, instant: bool = False) -> prometheus.Dataquery:
    query = prometheus.Dataquery().expr(expr).legend_format(legend).datasource(DS)
    return query.instant() if instant else query.range()


def with_refs(panel: Builder[Panel], queries: tuple[prometheus.Dataquery, ...]) -> None:
    for ref, query in zip("ABCDEFGH", queries, strict=False):
        panel.with_target(query.ref_id(ref))  # type: ignore[attr-defined]


def series(title: str, description: str, unit: str, *queries: prometheus.Dataquery,
           w: int = 12, h: int = 8, stacked: bool = False) -> timeseries.Panel:
    panel = (
        timeseries.Panel().title(title).description(description).unit(unit).datasource(DS)
        .span(w).height(h).fill_opacity(10).line_width(1)
        .legend(VizLegendOptions().display_mode(LegendDisplayMode.LIST)
                .placement(LegendPlacement.BOTTOM).show_legend(True))
    )
    if stacked:
        panel.stacking(StackingConfig().mode(StackingMode.NORMAL)).fill_opacity(60)
    with_refs(panel, queries)
    return panel


def single(title: str, description: str, unit: str, *queries: prometheus.Dataquery,
           w: int = 4, h: int = 4, no_value: str = "-") -> stat.Panel:
    panel = (
        stat.Panel().title(title).description(description).unit(unit).datasource(DS)
        .span(w).height(h).no_value(no_value)
    )
    with_refs(panel, queries)
    return panel


def quantiles(metric: str, by: str, matchers: str = "") -> tuple[prometheus.Dataquery, ...]:
    """p50 and p99 of a histogram, grouped by `by` (may be empty)."""
    group = f"{by}, le" if by else "le"
    prefix = f"{{{{{by}}}}} " if by else ""
    selector = f"{metric}_bucket{{{matchers}}}" if matchers else f"{metric}_bucket"
    return tuple(
        q(f"histogram_quantile({p}, sum by ({group}) (rate({selector}[{RI}])))",
          f"{prefix}p{int(p * 100)}")
        for p in (0.5, 0.99)
    )


def release() -> Board:
    granted = f'flashclaim_claims_total{{{C},outcome="granted"}}'
    remaining = f"max by (campaign) (flashclaim_stock_remaining{{{C}}})"
    total = f"max by (campaign) (flashclaim_stock_issued{{{C}}})"
    return (
        Board("flashclaim-release", "flashclaim / Release overview",
              "One release as it happens: stock, claims, rejections and latency per campaign.")
        .campaign_variable()
        .add(single("Stock", "Units put up: initial stock plus restocks.", "short",
                    q(total, "{{campaign}}", instant=True)))
        .add(single("Claimed", "Units granted: stock minus remaining (survives restarts).",
                    "short", q(f"{total} - {remaining}", "{{campaign}}", instant=True)))
        .add(single("Remaining", "Units left to grant.", "short",
                    q(remaining, "{{campaign}}", instant=True)))
        .add(single("Remaining share", "Remaining over stock; FlashclaimStockLow fires "
                    "under 20 % while claims flow.", "percentunit",
                    q(f"{remaining} / {total}", "{{campaign}}", instant=True)))
        .add(single("Time to sell out", "Remaining stock over the grant rate of the last "
                    "5 minutes; empty while nothing is granted.", "s",
                    q(f"{remaining} / (sum by (campaign) (rate({granted}[5m])) > 0)",
                      "{{campaign}}", instant=True), no_value="no grants"))
        .add(single("Error budget burn", "All campaigns, over the dashboard's time range: "
                    "the share of claim answers that were unavailable or internal, over the "
                    "0.1 % the 99.9 % SLO allows (100 % = exactly on budget).", "percentunit",
                    q(f"(sum(increase(flashclaim_claims_total{{{BAD}}}[$__range])) or vector(0))"
                      f" / sum(increase(flashclaim_claims_total[$__range])) / {SLO_BUDGET}",
                      "budget", instant=True)))
        .add(single("Budget used", "Face value granted over face value put up (fixed-amount "
                    "coupons; minor units).", "percentunit",
                    q(f"max by (campaign) (flashclaim_budget_used{{{C}}}) / max by (campaign) "
                      f"(flashclaim_budget_issued{{{C}}})", "{{campaign}}", instant=True)))
        .add(series("Claims per second by outcome", "Every claim answer: granted or the "
                    "problem code.", "reqps",
                    q(f"sum by (outcome) (rate(flashclaim_claims_total{{{C}}}[{RI}]))",
                      "{{outcome}}"), stacked=True))
        .add(series("Remaining stock", "Units left per campaign, and the stock put up.",
                    "short", q(remaining, "{{campaign}} remaining"),
                    q(total, "{{campaign}} stock")))
        .add(series("Rejections by reason", "Claim answers other than granted, by problem "
                    "code (sold_out, limit_reached, rate_limited, unavailable, ...).", "reqps",
                    q(f'sum by (outcome) (rate(flashclaim_claims_total{{{C},outcome!="granted"}}'
                      f"[{RI}]))", "{{outcome}}"), stacked=True))
        .add(series("Waiting rooms", "Users queued and positions admitted so far, for "
                    "every campaign with a waiting room.", "short",
                    q("max by (campaign) (flashclaim_waiting_room_tickets)",
                      "{{campaign}} queued"),
                    q("max by (campaign) (flashclaim_waiting_room_serving)",
                      "{{campaign}} admitted")))
        .add(series("Claim latency p50 / p99", f"POST {CLAIM_ROUTE}, all campaigns (the "
                    "route label does not carry the campaign).", "s",
                    *quantiles("flashclaim_http_request_duration_seconds", "",
                               f'route="{CLAIM_ROUTE}"')))
    )


def gateway() -> Board:
    reqs = "flashclaim_http_requests_total"
    return (
        Board("flashclaim-gateway", "flashclaim / Gateway health",
              "RED per route, Redis batching and round trips, errors and shedding.")
        .add(single("Gateway boxes up", "Scrape targets of job flashclaim answering "
                    "/metrics.", "short", q('sum(up{job="flashclaim"})', "up", instant=True)))
        .add(single("Requests per second", "All routes, all boxes.", "reqps",
                    q(f"sum(rate({reqs}[{RI}]))", "req/s", instant=True)))
        .add(single("5xx share", "Share of responses with a 5xx status, all routes.",
                    "percentunit", q(f'sum(rate({reqs}{{status=~"5.."}}[{RI}])) / '
                                     f"sum(rate({reqs}[{RI}]))", "5xx", instant=True)))
        .add(single("Redis errors per second", "Failed claim-script calls.", "reqps",
                    q(f"sum(rate(flashclaim_redis_errors_total[{RI}])) or vector(0)",
                      "errors", instant=True)))
        .add(single("Claims per Redis call", "Mean batch size: claims decided per "
                    "claim-script call.", "short",
                    q(f"sum(rate(flashclaim_redis_batch_size_sum[{RI}])) / "
                      f"sum(rate(flashclaim_redis_batch_size_count[{RI}]))", "claims/call",
                      instant=True), w=8))
        .row("Requests (rate, errors, duration)")
        .add(series("Requests per second by route", "", "reqps",
                    q(f"sum by (route) (rate({reqs}[{RI}]))", "{{route}}")))
        .add(series("Responses per second by status", "", "reqps",
                    q(f"sum by (status) (rate({reqs}[{RI}]))", "{{status}}"), stacked=True))
        .add(series("5xx share by route", "", "percentunit",
                    q(f'sum by (route) (rate({reqs}{{status=~"5.."}}[{RI}])) / '
                      f"sum by (route) (rate({reqs}[{RI}]))", "{{route}}")))
        .add(series("Latency p50 / p99 by route", "Handler start to response.", "s",
                    *quantiles("flashclaim_http_request_duration_seconds", "route")))
        .add(series("Requests per second by box", "Load spread over gateway boxes.",
                    "reqps", q(f"sum by (instance) (rate({reqs}[{RI}]))", "{{instance}}")))
        .add(series("Shed and refused claims", "Claims turned away to protect the system: "
                    "overloaded (writer backlog cap), rate_limited / admission (admission "
                    "control), unavailable (Redis).", "reqps",
                    q('sum by (outcome) (rate(flashclaim_claims_total{outcome=~"overloaded|'
                      f'rate_limited|admission|unavailable"}}[{RI}]))', "{{outcome}}"),
                    stacked=True))
        .row("Redis")
        .add(series("Claim-script calls per second", "One call decides a batch of claims.",
                    "reqps", q(f"sum(rate(flashclaim_redis_batch_size_count[{RI}]))",
                               "calls/s"), w=8))
        .add(series("Batch size", "Claims decided per claim-script call.", "short",
                    q(f"sum(rate(flashclaim_redis_batch_size_sum[{RI}])) / "
                      f"sum(rate(flashclaim_redis_batch_size_count[{RI}]))", "mean"),
                    *quantiles("flashclaim_redis_batch_size", "")[1:], w=8))
        .add(series("Redis round trip p50 / p99", "Claim-script call time as a worker sees "
                    "it.", "s", *quantiles("flashclaim_redis_roundtrip_seconds", ""), w=8))
        .add(series("Redis errors per second by kind", "Failed claim-script calls by "
                    "exception kind; each failed call answers its claims 503.", "reqps",
                    q(f"sum by (kind) (rate(flashclaim_redis_errors_total[{RI}]))", "{{kind}}"),
                    w=24))
        .row("Shedding")
        .add(series("Turned away before Redis", "Per-user / per-ip request rate (429) and "
                    "claims shed from the queue in front of Redis (503), per second.", "reqps",
                    q(f"sum by (reason) (rate(flashclaim_admission_rejected_total[{RI}]))",
                      "{{reason}}"), w=12))
        .add(series("Claims queued for a Redis slot", "Across all workers.", "short",
                    q("sum(flashclaim_redis_queue_depth)", "queued"), w=12))
    )


def durability() -> Board:
    written = f"flashclaim_writer_written_total{{{C}}}"
    backlog = f"max by (campaign) (flashclaim_writer_backlog{{{C}}})"
    return (
        Board("flashclaim-durability", "flashclaim / Durability",
              "The writer: grants into the durable store, its backlog, dead letters and "
              "errors. Writer numbers need the writer's metrics in the same scrape.")
        .campaign_variable()
        .add(single("Backlog", "Grants not yet acknowledged by the writer.", "short",
                    q(backlog, "{{campaign}}", instant=True), w=6))
        .add(single("Time to drain", "Backlog over the store rate of the last 5 minutes.",
                    "s", q(f"{backlog} / (sum by (campaign) (rate({written}[5m])) > 0)",
                           "{{campaign}}", instant=True), w=6, no_value="not draining"))
        .add(single("Stored", "Claims the writer stored since the gateway started.", "short",
                    q(f"sum by (campaign) ({written})", "{{campaign}}", instant=True), w=6))
        .add(single("Dead-lettered", "Stream entries moved to the dead-letter stream since "
                    "the gateway started.", "short",
                    q(f"sum by (campaign) (flashclaim_writer_dead_lettered_total{{{C}}})",
                      "{{campaign}}", instant=True), w=6, no_value="0"))
        .add(series("Granted vs stored per second", "The writer keeps up when the lines "
                    "meet.", "reqps",
                    q(f'sum(rate(flashclaim_claims_total{{{C},outcome="granted"}}[{RI}]))',
                      "granted"),
                    q(f"sum(rate({written}[{RI}]))", "stored")))
        .add(series("Writer backlog", "Grants not yet in the store, per campaign; at the "
                    "backlog cap claims answer 503 overloaded.", "short",
                    q(backlog, "{{campaign}}")))
        .add(series("Reconcile: granted = stored + backlog", "Grants in Redis (stock put up "
                    "minus remaining) against rows in the store (counted by the writer every "
                    "10 s) plus the unwritten backlog; a gap that stays is lost data — run "
                    "`flashclaim reconcile`.", "short",
                    q(f"max by (campaign) (flashclaim_stock_issued{{{C}}}) - max by (campaign) "
                      f"(flashclaim_stock_remaining{{{C}}})", "{{campaign}} granted"),
                    q(f"max by (campaign) (flashclaim_store_rows{{{C}}}) + {backlog}",
                      "{{campaign}} stored + backlog")))
        .add(series("Writer lag", "Grant-to-commit delay of the newest claim stored.", "s",
                    q(f"max by (campaign) (flashclaim_writer_lag_seconds{{{C}}})",
                      "{{campaign}}")))
        .add(series("Dead letters", "Entries dead-lettered per campaign in each interval.",
                    "short", q(f"sum by (campaign) (increase("
                               f"flashclaim_writer_dead_lettered_total{{{C}}}[{RI}]))",
                               "{{campaign}}")))
        .add(series("Writer errors per second by kind", "store, redis or unexpected; the "
                    "writer backs off and retries.", "reqps",
                    q(f"sum by (kind) (rate(flashclaim_writer_errors_total[{RI}]))",
                      "{{kind}}")))
    )


BOARDS = {"release-overview": release, "gateway-health": gateway, "durability": durability}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when grafana/dashboards/ differs from the generator")
    args = parser.parse_args()
    stale = []
    OUT.mkdir(exist_ok=True)
    for name, make in BOARDS.items():
        path = OUT / f"{name}.json"
        text = make().json()
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}; run `make grafana`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
