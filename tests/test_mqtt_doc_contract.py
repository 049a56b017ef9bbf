"""edge/MQTT.md is what a dashboard or robot integrator codes against: its examples must be the schema of
edge/payloads.py, field for field, so that a field added, renamed or dropped in the code cannot leave the
document behind (pydantic ignores unknown keys and fills defaults, so validation alone would not notice)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import BaseModel

from drywallqa.edge.payloads import (
    AlertPayload,
    ClassResult,
    CommandPayload,
    DetectionPayload,
    Region,
    SnapshotPayload,
    StatusPayload,
)

DOC = Path(__file__).resolve().parents[1] / "edge" / "MQTT.md"
TOPIC_MODELS = {"status": StatusPayload, "detections": DetectionPayload, "alerts": AlertPayload,
                "snapshot": SnapshotPayload}


def topic_examples(text: str) -> dict[str, dict]:
    """`drywallqa/<device>/<topic>` ... followed by a ```json block: topic -> the parsed example."""
    found = {}
    for leaf, block in re.findall(r"`drywallqa/[^/`]+/(\w+)`[^`]*?:\s*\n\s*```json\n(.*?)```", text, re.S):
        found[leaf] = json.loads(block)
    return found


def command_examples(text: str) -> list[dict]:
    block = re.search(r"## Commands\s*\n\s*```json\n(.*?)```", text, re.S)
    assert block, "MQTT.md has no ## Commands json block"
    return [json.loads(line) for line in block.group(1).splitlines() if line.strip()]


def fields(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def test_every_topic_has_an_example_with_exactly_the_schema_fields():
    examples = topic_examples(DOC.read_text(encoding="utf-8"))
    assert set(examples) == set(TOPIC_MODELS), f"MQTT.md examples for {sorted(examples)}"
    for leaf, model in TOPIC_MODELS.items():
        example = examples[leaf]
        assert set(example) == fields(model), (
            f"{leaf}: missing from MQTT.md {sorted(fields(model) - set(example))}, "
            f"not in the schema {sorted(set(example) - fields(model))}")
        model.model_validate(example)  # types and bounds, e.g. area_fraction in [0, 1]


def test_nested_detection_results_and_regions_show_every_field():
    detections = topic_examples(DOC.read_text(encoding="utf-8"))["detections"]
    assert detections["results"], "the detections example shows no class result"
    for result in detections["results"]:
        assert set(result) == fields(ClassResult), sorted(set(result) ^ fields(ClassResult))
    regions = [r for result in detections["results"] for r in result["regions"]]
    assert regions, "the detections example shows no region"
    for region in regions:
        assert set(region) == fields(Region), sorted(set(region) ^ fields(Region))


def test_every_documented_command_is_valid_and_every_command_is_documented():
    commands = command_examples(DOC.read_text(encoding="utf-8"))
    for command in commands:
        CommandPayload.model_validate(command)
    assert set().union(*commands) == fields(CommandPayload), "the examples together show every command field"
    documented = {c["command"] for c in commands}
    allowed = set(CommandPayload.model_fields["command"].annotation.__args__)
    assert documented == allowed, f"documented {sorted(documented)}, accepted {sorted(allowed)}"
