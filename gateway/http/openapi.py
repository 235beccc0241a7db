"""OpenAPI 3.1 documents generated from the msgspec wire types: the public one (claimant and
ops endpoints) and the admin one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from gateway import __version__
from gateway.domain import Admission, CampaignSpec, Grant
from gateway.reports import Report
from gateway.schemas import (
    BlockEntry,
    BlockList,
    BlockRequest,
    CampaignInfo,
    CampaignList,
    CampaignPatch,
    ClaimList,
    ClaimRequest,
    CodesAdded,
    CodesInfo,
    CodesRequest,
    Health,
    LiveChange,
    ProblemDocument,
    RestockRequest,
)

REF = "#/components/schemas/{name}"


def _ref(t: type) -> dict[str, str]:
    return {"$ref": REF.format(name=t.__name__)}


def _problem(desc: str) -> dict[str, Any]:
    return {"description": desc,
            "content": {"application/problem+json": {"schema": _ref(ProblemDocument)}}}


def _ok(t: type, desc: str = "OK") -> dict[str, Any]:
    return {"description": desc, "content": {"application/json": {"schema": _ref(t)}}}


_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]
# 1-255 visible ASCII characters, inner spaces allowed (a quoted key is accepted too)
_IDEMPOTENCY_KEY = {"type": "string", "pattern": r"^[!#-~]([ -~]{0,253}[!-~])?$"}
_NONCE = {"type": "string", "pattern": r"^[!-~]{1,64}$"}


def _doc(title: str, paths: dict[str, Any], types: Sequence[type]) -> dict[str, Any]:
    _, components = msgspec.json.schema_components(types, ref_template=REF)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": __version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def public_document() -> dict[str, Any]:
    claim_responses = {
        "201": _ok(Grant, "Granted (or the original grant for a repeated Idempotency-Key)"),
        "400": _problem("Malformed JSON or header"),
        "401": _problem("Missing, invalid or expired identity token"),
        "403": _problem("not_eligible, blocked, proof_required, or invalid_code "
                        "(redemption code unknown or used)"),
        "404": _problem("Unknown campaign"),
        "409": _problem("limit_reached, not_started or paused"),
        "410": _problem("sold_out or ended"),
        "413": _problem("Body over the cap"),
        "422": _problem("Body of the wrong shape"),
        "429": _problem("rate_limited, admission, or code_attempts (too many wrong codes)"),
        "503": _problem("Overloaded or Redis unavailable"),
    }
    paths = {
        "/v1/campaigns/{id}/claims": {"post": {
            "summary": "Claim from a campaign",
            "parameters": [*_ID, {"name": "Idempotency-Key", "in": "header",
                                  "required": False, "schema": _IDEMPOTENCY_KEY},
                           {"name": "Proof-Of-Work", "in": "header", "required": False,
                            "description": "The nonce, when the campaign asks for a proof "
                                           "of work", "schema": _NONCE}],
            "security": _BEARER,
            "requestBody": {"required": False,
                            "content": {"application/json": {"schema": _ref(ClaimRequest)}}},
            "responses": claim_responses,
        }},
        "/v1/campaigns/{id}/claims/mine": {"get": {
            "summary": "The caller's claims in this campaign",
            "parameters": _ID, "security": _BEARER,
            "responses": {"200": _ok(ClaimList), "401": _problem("Bad token"),
                          "404": _problem("Unknown campaign"), "503": _problem("Unavailable")},
        }},
        "/healthz": {"get": {"summary": "Process is up", "responses": {"200": _ok(Health)}}},
        "/readyz": {"get": {"summary": "Redis reachable and scripts loaded",
                            "responses": {"200": _ok(Health), "503": _problem("Not ready")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics",
                             "responses": {"200": {"description": "text exposition"}}}},
    }
    return _doc("flashclaim", paths, [Grant, ClaimList, ClaimRequest, ProblemDocument, Health])


def _block_operations() -> dict[str, Any]:
    kind = {"name": "kind", "in": "path", "required": True,
            "schema": {"enum": ["user", "device", "ip"]}}
    denied = {"401": _problem("No admin token"), "403": _problem("Wrong admin token"),
              "404": _problem("Unknown list or entry"), "422": _problem("Invalid")}
    return {
        "get": {"summary": "A blocklist", "security": _BEARER, "parameters": [kind],
                "responses": {"200": _ok(BlockList), **denied}},
        "post": {"summary": "Block a user, a device (hashed here) or an address/CIDR",
                 "security": _BEARER, "parameters": [kind],
                 "requestBody": {"required": True, "content": {
                     "application/json": {"schema": _ref(BlockRequest)}}},
                 "responses": {"201": _ok(BlockEntry, "Added"),
                               "200": _ok(BlockEntry, "Updated"), **denied}},
        "delete": {"summary": "Unblock", "security": _BEARER, "parameters": [
            kind, {"name": "value", "in": "query", "required": True, "schema": {"type": "string"}},
            {"name": "hashed", "in": "query", "schema": {"enum": ["true", "false"]}}],
                   "responses": {"200": _ok(BlockEntry, "Removed"), **denied}},
    }


def admin_document() -> dict[str, Any]:
    def op(summary: str, ok: type, status: str = "200", body: type | None = None,
           params: bool = True) -> dict[str, Any]:
        o: dict[str, Any] = {
            "summary": summary, "security": _BEARER,
            "responses": {status: _ok(ok), "401": _problem("No admin token"),
                          "403": _problem("Unknown admin token, or a read-scope one "
                                          "on a change"),
                          "404": _problem("Unknown"),
                          "409": _problem("Conflict"), "422": _problem("Invalid")},
        }
        if params:
            o["parameters"] = _ID
        if body is not None:
            o["requestBody"] = {"required": True,
                                "content": {"application/json": {"schema": _ref(body)}}}
        return o

    paths = {
        "/v1/campaigns": {
            "post": op("Create a campaign", CampaignInfo, "201", CampaignSpec, params=False),
            "get": op("List campaigns", CampaignList, params=False),
        },
        "/v1/campaigns/{id}": {
            "get": op("A campaign with live numbers", CampaignInfo),
            "patch": op("Change limits, eligibility or admission live (JSON merge patch)",
                        LiveChange, body=CampaignPatch),
        },
        "/v1/campaigns/{id}/pause": {"post": op("Pause", CampaignInfo)},
        "/v1/campaigns/{id}/resume": {"post": op("Resume", CampaignInfo)},
        "/v1/campaigns/{id}/end": {"post": op("End for good", CampaignInfo)},
        "/v1/campaigns/{id}/restock": {"post": op("Add stock", CampaignInfo, body=RestockRequest)},
        "/v1/campaigns/{id}/admission": {"put": op("Change the admission rate live",
                                                   CampaignInfo, body=Admission)},
        "/v1/campaigns/{id}/codes": {
            "post": op("Generate or import redemption codes (generated ones are shown once)",
                       CodesAdded, "201", body=CodesRequest),
            "get": op("Redemption codes not yet used", CodesInfo),
        },
        "/v1/campaigns/{id}/report": {"get": {
            "summary": "Issued, claimed, claim rate, rejections, channels, regions, time to "
                       "sell out, budget; `format=csv` for a section,key,value CSV",
            "security": _BEARER,
            "parameters": [*_ID,
                           {"name": "format", "in": "query", "schema": {"enum": ["json", "csv"]}},
                           {"name": "bucket_s", "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 86400}}],
            "responses": {"200": {"description": "the report",
                                  "content": {"application/json": {"schema": _ref(Report)},
                                              "text/csv": {"schema": {"type": "string"}}}},
                          "401": _problem("No admin token"), "404": _problem("Unknown"),
                          "422": _problem("Invalid"), "503": _problem("Store unreachable")},
        }},
        "/v1/campaigns/{id}/top": {"get": {
            "summary": "The anomaly view: top addresses, devices or networks by grants",
            "security": _BEARER,
            "parameters": [*_ID,
                           {"name": "by", "in": "query",
                            "schema": {"enum": ["ip", "device", "subnet"]}},
                           {"name": "limit", "in": "query", "schema": {"type": "integer"}}],
            "responses": {"200": {"description": "{campaign_id, by, top: [{key, claims}]}"},
                          "401": _problem("No admin token"), "404": _problem("Unknown")},
        }},
        "/v1/blocks/{kind}": _block_operations(),
    }
    types = [CampaignSpec, CampaignInfo, CampaignList, RestockRequest, Admission, ProblemDocument,
             BlockRequest, BlockEntry, BlockList,
             Report,
             CampaignPatch, LiveChange, CodesRequest, CodesAdded, CodesInfo]
    return _doc("flashclaim admin", paths, types)
