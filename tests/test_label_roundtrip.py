"""Round trip: tiny policy -> `rlhfkit label generate` -> scripted labelling -> export -> `rlhfkit rm`."""

from __future__ import annotations

import json
import random

import pytest
from fastapi.testclient import TestClient  # noqa: E402

from rlhfkit.cli import main  # noqa: E402
from rlhfkit.label import service  # noqa: E402
from rlhfkit.label.db import Database  # noqa: E402
from rlhfkit.label.testing import random_answers  # noqa: E402
from rlhfkit.label.web import create_app  # noqa: E402

pytestmark = pytest.mark.slow


def test_generate_label_export_train_rm(tiny_model_dir, tmp_path, capsys):
    db_path = str(tmp_path / "rt.db")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about city number {i}."}) + "\n" for i in range(6)))
    assert main(["label", "generate", "--db", db_path, "--project", "rt", "--model", str(tiny_model_dir),
                 "--prompts", str(prompts), "--num-samples", "3", "--max-new-tokens", "12",
                 "--tasks", "ranking,pairwise,critique", "--overlap", "2"]) == 0
    assert "items added" in capsys.readouterr().out
    db = Database(db_path)
    tokens = [service.create_user(db, f"l{i}")[1] for i in range(2)]
    client = TestClient(create_app(db))
    rng = random.Random(0)
    for token in tokens:
        h = {"Authorization": f"Bearer {token}"}
        while (view := client.post("/api/projects/1/next", headers=h).json()["assignment"]) is not None:
            answers = random_answers(view["tasks"], len(view["responses"]), rng)
            r = client.post(f"/api/assignments/{view['assignment_id']}/label", headers=h,
                            json={"idempotency_key": f"rt-{token[-6:]}-{view['assignment_id']}", "answers": answers})
            assert r.status_code == 201
    out = tmp_path / "prefs.jsonl"
    assert main(["label", "export", "--db", db_path, "--project", "rt", "--out", str(out),
                 "--aggregate", "soft", "--ties", "keep"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all({"prompt", "chosen", "rejected", "margin", "labellers", "timestamps"} <= set(r) for r in rows)
    sft = tmp_path / "sft.jsonl"
    assert main(["label", "export", "--db", db_path, "--project", "rt", "--out", str(sft), "--kind", "sft"]) == 0
    assert all(json.loads(line)["completion"] == "a better answer" for line in sft.read_text().splitlines())
    capsys.readouterr()
    assert main(["rm", "--model", str(tiny_model_dir), "--dataset", str(out), "--output-dir",
                 str(tmp_path / "rm"), "--max-steps", "2", "--per-device-batch-size", "4", "--no-progress-bar",
                 "--eval-on-start", "false", "--max-length", "64"]) == 0
    err = capsys.readouterr().err
    assert f"{len(rows)}/{len(rows)} rows kept" in err, err
