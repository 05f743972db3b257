# Quick start: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: bench-scaling demo demo-seeds demo-hacking-seeds demo-hacking demo-eval demo-cai demo-compare demo-compare-seeds demo-tools demo-tools-seeds demo-loop demo-loop-seeds test test-fast lint \
	bench clean system-deps

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: pip takes the CPU wheel; a looser pin would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,app,distributed]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m rlhfkit demo --output-dir runs/demo

# The demo on seeds 0-9, one table with the mean and worst case (SEEDS=0-2 for fewer; about an hour for ten).
SEEDS ?= 0-9
demo-seeds: $(STAMP)
	$(PY) bench/demo_seeds.py --seeds $(SEEDS) --out runs/seeds

# The reward-hacking demo on the same seeds: per seed and PPO run, did the detector fire and when, and how
# many seeds give the expected verdicts (beta=0 and ensemble fire, beta=2 stays silent).
demo-hacking-seeds: $(STAMP)
	$(PY) bench/demo_seeds.py --hacking --seeds $(SEEDS) --out runs/seeds

# The reward-hacking experiment (reuses the demo's world, pretrained and SFT models when present).
demo-hacking: $(STAMP)
	$(PY) -m rlhfkit demo --config hacking --output-dir runs/demo

# Judges a team can trust: the RM's RewardBench-style report, eval with the RM and with a small LM judge,
# both judges audited, and a human eval by the simulated annotators in the labelling app's database, with
# kappa against each judge (reuses the demo's world, models and eval stage when present).
demo-eval: $(STAMP)
	$(PY) -m rlhfkit demo --config eval --output-dir runs/demo

# Constitutional AI: critique -> revision on a helpful-only model, then DPO (reuses the demo's world and
# pretrained model when present).
demo-cai: $(STAMP)
	$(PY) -m rlhfkit demo --config cai --output-dir runs/demo

# Tool use learnt by RL: an atlas and a calculator in the demo world, SFT on a few call demonstrations, then
# GRPO on tool episodes; held-out accuracy with and without the tools (its own folder: its world differs).
demo-tools: $(STAMP)
	$(PY) -m rlhfkit demo --config tools --output-dir runs/demo-tools

# The tool demo on seeds 0-4 (SEEDS=0-9 for more): held-out accuracy of SFT and GRPO per seed, the rise, and how
# many seeds clear the +30-point bar (about 13 minutes a seed on 2 cores).
demo-tools-seeds: SEEDS := $(if $(filter file,$(origin SEEDS)),0-4,$(SEEDS))
demo-tools-seeds: $(STAMP)
	$(PY) bench/demo_seeds.py --config tools --seeds $(SEEDS) --out runs/seeds

# The feedback flywheel and the red-team loop: 3 rounds of red team -> sample -> label (the last round's reward
# model where it is sure, the simulated annotators in the labelling app elsewhere) -> retrain the reward model on
# every label so far -> PPO -> evaluate, beside one round with the same label budget (its own folder and world).
demo-loop: $(STAMP)
	$(PY) -m rlhfkit demo --config loop --output-dir runs/demo-loop

# The loop demo on seeds 0-2 (SEEDS=...), one table: which of its four claims hold on each seed.
demo-loop-seeds: SEEDS := $(if $(filter file,$(origin SEEDS)),0-2,$(SEEDS))
demo-loop-seeds: $(STAMP)
	$(PY) bench/demo_seeds.py --config loop --seeds $(SEEDS) --out runs/seeds

# PPO, GRPO, DPO, KTO, SimPO and ORPO from the same SFT model, one table by the gold judge (reuses the demo's
# world, models, preferences, reward model, PPO and DPO when present; up to ~30 min on 2 cores from scratch).
demo-compare: $(STAMP)
	$(PY) -m rlhfkit demo --config compare --output-dir runs/demo

# The comparison on seeds 0-2 (SEEDS=0-4 for more): per seed and method, then the mean and worst case.
# (SEEDS ?= 0-2 for this target: the 0-9 above is the file's default, a SEEDS given to make wins.)
demo-compare-seeds: SEEDS := $(if $(filter file,$(origin SEEDS)),0-2,$(SEEDS))
demo-compare-seeds: $(STAMP)
	$(PY) bench/demo_seeds.py --config compare --seeds $(SEEDS) --out runs/seeds

# Chromium and PostgreSQL from Debian's packages (installed when root or passwordless sudo, else the command
# to run is printed and make stops).
system-deps:
	bash scripts/system-deps.sh

test: $(STAMP) system-deps
	$(PY) -m ruff check src tests $(wildcard bench)
	$(PY) -m pytest -q

# The inner loop: everything but the slow integration tests.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -x

lint: $(STAMP)
	$(PY) -m ruff check src tests $(wildcard bench)

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) bench/bench_vs_trl.py

# rlhfkit vs TRL on a grid of model sizes x sequence lengths (SFT, RM, DPO; GRPO, RLOO): one table and
# bench/measured/scaling.png. The whole grid takes hours on 2 cores: SIZES=5M,30M BANDS=short,mid for less.
SIZES ?= 5M,30M,120M
BANDS ?= short,mid,long
bench-scaling: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) bench/bench_scaling.py --sizes $(SIZES) --bands $(BANDS)

clean:
	rm -rf runs .pytest_cache
