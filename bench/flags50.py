#!/usr/bin/env python3
"""The benchmark's 50 flags, as a flagd document (for Bunting) or as an Unleash client-features
dump (for Unleash Edge's offline mode), with the same rules:
  flag-0..29   static booleans, on
  flag-30..39  on when email ends with @example.com and plan is pro or enterprise
  flag-40..49  string variants a/b/c split 50/25/25 by targeting key (userId in Unleash)
Usage: flags50.py flagd|unleash > FILE"""
import json
import sys


def flagd():
    flags = {}
    for i in range(50):
        if i < 30:
            f = {"state": "ENABLED", "variants": {"on": True, "off": False}, "defaultVariant": "on"}
        elif i < 40:
            f = {"state": "ENABLED", "variants": {"on": True, "off": False}, "defaultVariant": "off",
                 "targeting": {"if": [{"and": [
                     {"ends_with": [{"var": "email"}, "@example.com"]},
                     {"in": [{"var": "plan"}, ["pro", "enterprise"]]}]}, "on", None]}}
        else:
            f = {"state": "ENABLED", "variants": {"a": "A", "b": "B", "c": "C"}, "defaultVariant": "a",
                 "targeting": {"fractional": [["a", 50], ["b", 25], ["c", 25]]}}
        flags[f"flag-{i}"] = f
    return {"metadata": {"flagSetId": "bench"}, "flags": flags}


def unleash():
    features = []
    for i in range(50):
        name = f"flag-{i}"
        feature = {"name": name, "type": "release", "enabled": True, "project": "default",
                   "stale": False, "impressionData": False, "variants": []}
        if i < 30:
            feature["strategies"] = [{"name": "default", "parameters": {}, "constraints": []}]
        elif i < 40:
            feature["strategies"] = [{"name": "default", "parameters": {}, "constraints": [
                {"contextName": "email", "operator": "STR_ENDS_WITH", "values": ["@example.com"],
                 "caseInsensitive": False, "inverted": False},
                {"contextName": "plan", "operator": "IN", "values": ["pro", "enterprise"],
                 "caseInsensitive": False, "inverted": False}]}]
        else:
            feature["strategies"] = [{"name": "flexibleRollout", "constraints": [],
                                      "parameters": {"rollout": "100", "stickiness": "userId", "groupId": name}}]
            feature["variants"] = [
                {"name": v, "weight": w, "weightType": "variable", "stickiness": "userId",
                 "payload": {"type": "string", "value": v.upper()}}
                for v, w in (("a", 500), ("b", 250), ("c", 250))]
        features.append(feature)
    return {"version": 2, "features": features}


if __name__ == "__main__":
    kind = sys.argv[1] if len(sys.argv) > 1 else "flagd"
    json.dump(flagd() if kind == "flagd" else unleash(), sys.stdout)
