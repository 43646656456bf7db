#!/usr/bin/env python3
"""Print a Markdown table of criterion medians (ns/op) for benches/v5_codec.rs.

Reads target/criterion/<op>_<case>/<codec>/new/estimates.json, i.e. the latest run.
Usage: python3 scripts/medians.py [criterion-dir]
"""
import json
import os
import sys

root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "target", "criterion")
ops = ["decode", "encode", "encode_shared"]
cases = ["publish_qos1", "publish_qos1_props", "connect", "subscribe3", "puback"]


def median(group, codec):
    path = os.path.join(root, group, codec, "new", "estimates.json")
    with open(path) as f:
        return json.load(f)["median"]["point_estimate"]


print("| op | case | rumqttc ns | rmqtt ns | rmqtt/rumqttc |")
print("|---|---|---:|---:|---:|")
for op in ops:
    for case in cases:
        g = f"{op}_{case}"
        a, b = median(g, "rumqttc"), median(g, "rmqtt")
        print(f"| {op} | {case} | {a:.1f} | {b:.1f} | {b / a:.2f} |")
