"""``make demo`` / ``rlhfkit demo``: the bundled end-to-end pipeline (configs/demo.yaml), offline.

pretrain a tiny model on the synthetic world -> SFT -> preferences from simulated annotators on SFT samples
-> reward model -> PPO and DPO from the same SFT model -> evaluation by the gold judge on held-out prompts
-> summary.json and report.html. Stages already done are skipped; ``--force`` reruns them.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path


def bundled_config(name: str) -> Path:
    """Path of a config shipped with the package (``demo``, ``hacking``, ``cai``, ``compare``, ``tools``, ``eval`` or ``loop``)."""
    path = Path(str(resources.files("rlhfkit") / "configs" / f"{name}.yaml"))
    if not path.exists():
        raise FileNotFoundError(path)
    return path


def run_demo(argv: list[str] | None = None) -> int:
    from .pipeline import parse_sets, run_pipeline
    from .world.stages import format_summary

    p = argparse.ArgumentParser(prog="rlhfkit demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=None,
                   help="where the stages go (default: the config's output_dir, e.g. runs/demo, runs/demo-loop)")
    p.add_argument("--seed", type=int, default=None, help="world and training seed (default: the config's, 0)")
    p.add_argument("--config", default="demo", help="a bundled config name (demo, hacking, cai, compare, tools, eval, loop) or a YAML file")
    p.add_argument("--force", nargs="?", const=True, default=False,
                   help="rerun stages that are done: all, or a comma list of names")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.OPTION=VALUE")
    a = p.parse_args(argv)
    from .pipeline import load_pipeline

    config = Path(a.config) if a.config.endswith((".yaml", ".yml")) else bundled_config(a.config)
    out = Path(a.output_dir or load_pipeline(config).get("output_dir") or "runs/demo")
    print(f"rlhfkit demo: {config.name} -> {out}")
    run_pipeline(config, output_dir=str(out), seed=a.seed, force=a.force, overrides=parse_sets(a.set))
    for summary_file, report in _outputs(config, out):
        if summary_file.exists():
            print("\n" + format_summary(json.loads(summary_file.read_text(encoding="utf-8"))))
            print(f"\nsummary: {summary_file}   report: {report}")
    return 0


def _outputs(config: Path, out: Path) -> list[tuple[Path, Path]]:
    """(summary file, report file) of each summary stage of ``config``: configs sharing a folder name their
    own (cai.yaml writes summary_cai.json beside the demo's summary.json)."""
    from .pipeline import load_pipeline

    stages = load_pipeline(config)["stages"].values()
    reports = {str(s.get("summary", "summary.json")): Path(str(s.get("output") or "report.html")).name
               for s in stages if s.get("type") == "report"}
    # a config without a summary stage (hacking.yaml) shows the folder's summary.json, as before
    files = [str(s.get("file", "summary.json")) for s in stages if s.get("type") == "summary"] or ["summary.json"]
    return [(out / f, out / reports.get(f, "report.html")) for f in files]
